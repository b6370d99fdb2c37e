"""`epserve bench soak`: the server at its measured capacity for a long run, every process's memory watched.

1. Capacity: `epserve serve` (bench/chaos_server.py; embedded default shapes, float32) under closed-loop
   load of bounded requests (prompts 16-160 tokens, a third sharing a prefix; 8-32 output tokens; half
   streamed) at rising concurrency; capacity C is the smallest concurrency whose output tokens/s is
   within 10 % of the best level's.
2. The server restarts with its tenant limited to C requests in flight (`serve.tenants[].max_concurrent`),
   then runs `duration_s`: in every minute, 50 s at capacity (C closed-loop clients: every request must
   succeed) and 10 s above it (2C clients: the excess must be 429 with Retry-After, nothing may fail).
3. Every 10 s, the RSS of every process of the server (ingress replica, ranks, unit supervisors, ledger,
   router, Serve's controller and proxy, raylet, GCS ...) by pid. After warm-up (the first fifth of the
   run), each process's RSS must stay within 10 % of its value at the end of warm-up.
Loopback only; bounded requests; no retries (a failure is counted, not hidden).
"""
from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from epserve.bench.chaos_server import ChaosServer

KEY = "soak-key"


def base_config(max_concurrent: int = 0) -> dict:
    return {"dtype": "float32", "kernels": "reference",
            "prefill": {"kv_pages": 64}, "decode": {"kv_pages": 256},
            "kv_store": {"capacity_gb": 0.25},
            "ledger": {"flush_rows": 256, "flush_interval_s": 10.0},
            "serve": {"model_name": "soak", "max_queue": 256,
                      "tenants": [{"name": "soak", "api_keys": [KEY], "max_concurrent": max_concurrent}]}}


def request_body(rng: random.Random, shared: list[int]) -> dict:
    n = rng.randrange(16, 160)
    prompt = (shared[:64] if rng.random() < 0.33 else []) + [rng.randrange(4, 512) for _ in range(n)]
    return {"model": "soak", "prompt": prompt, "max_tokens": rng.randrange(8, 33), "temperature": 0.0,
            "ignore_eos": True, "stream": rng.random() < 0.5}


async def send(client: httpx.AsyncClient, base: str, body: dict) -> tuple[str, int]:
    """-> (outcome ok | 429 | failed, output tokens)."""
    try:
        if body["stream"]:
            n, done = 0, False
            async with client.stream("POST", base + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    return ("429" if r.status_code == 429 else "failed"), 0
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: ") and '"error"' in line[:20]:
                        return "failed", n
                    elif line.startswith("data: "):
                        n += 1
            return ("ok" if done else "failed"), n
        r = await client.post(base + "/v1/completions", json=body)
        if r.status_code == 429:
            return "429", 0
        if r.status_code != 200:
            return "failed", 0
        return "ok", r.json()["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return "failed", 0


async def closed_loop(base: str, n_clients: int, until: float, seed: int) -> dict:
    rng, shared = random.Random(seed), [random.Random(1).randrange(4, 512) for _ in range(64)]
    out = {"ok": 0, "429": 0, "failed": 0, "tokens": 0, "latency_s": []}
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {KEY}"},
                                 limits=httpx.Limits(max_connections=4 * n_clients + 8)) as client:
        async def worker():
            while time.time() < until:
                t0 = time.time()
                what, n = await send(client, base, request_body(rng, shared))
                out[what] += 1
                out["tokens"] += n
                if what == "ok":
                    out["latency_s"].append(time.time() - t0)
                elif what == "429":
                    await asyncio.sleep(0.2)       # a client told to retry later does not spin
        await asyncio.gather(*[worker() for _ in range(n_clients)])
    return out


def measure_capacity(base: str, levels=(2, 4, 8, 16, 32, 64), seconds: float = 25.0) -> tuple[int, list[dict]]:
    rows = []
    for c in levels:
        t0 = time.time()
        r = asyncio.run(closed_loop(base, c, t0 + seconds, seed=c))
        dt = time.time() - t0
        lat = sorted(r["latency_s"]) or [0.0]
        rows.append({"concurrency": c, "ok": r["ok"], "failed": r["failed"], "n_429": r["429"],
                     "output_tokens_per_s": round(r["tokens"] / dt, 1), "requests_per_s": round(r["ok"] / dt, 2),
                     "latency_p50_s": round(statistics.median(lat), 2),
                     "latency_p99_s": round(lat[int(0.99 * (len(lat) - 1))], 2)})
    best = max(x["output_tokens_per_s"] for x in rows)
    cap = min(x["concurrency"] for x in rows if x["output_tokens_per_s"] >= 0.9 * best)
    return cap, rows


def label(p) -> str:
    """A process's role, from Ray's process title (`ray::RankActor.run_loop` -> RankActor)."""
    try:
        cmd = p.cmdline()
    except Exception:
        return "?"
    head = cmd[0] if cmd else p.name()
    if head.startswith("ray::"):
        return head[5:].split(".")[0].split(" ")[0]
    for name in ("gcs_server", "raylet", "dashboard_agent", "runtime_env", "log_monitor", "monitor.py",
                 "dashboard.py", "epserve"):
        if any(name in part for part in cmd[:4]):
            return name
    return p.name()


def rss_snapshot(srv: ChaosServer) -> dict[int, tuple[str, float]]:
    import psutil
    out = {}
    for pid in srv.tree():
        try:
            p = psutil.Process(pid)
            out[pid] = (label(p), p.memory_info().rss / 2**20)
        except psutil.NoSuchProcess:
            pass
    return out


async def soak(srv: ChaosServer, cap: int, duration_s: float, sample_s: float = 10.0) -> dict:
    t0 = time.time()
    end = t0 + duration_s
    samples: list[tuple[float, dict]] = []
    load_avg: list[float] = []          # the machine's 1-minute load average (other work shares it)
    phases = {"at_capacity": {"ok": 0, "429": 0, "failed": 0, "tokens": 0},
              "above_capacity": {"ok": 0, "429": 0, "failed": 0, "tokens": 0}}

    async def sampler():
        while time.time() < end:
            samples.append((time.time() - t0, await asyncio.to_thread(rss_snapshot, srv)))
            load_avg.append(os.getloadavg()[0])
            await asyncio.sleep(sample_s)
        samples.append((time.time() - t0, await asyncio.to_thread(rss_snapshot, srv)))
    task = asyncio.ensure_future(sampler())
    minute = 0
    while time.time() < end:
        at_end = min(end, time.time() + 50)
        r = await closed_loop(srv.base, cap, at_end, seed=1000 + minute)
        _add(phases["at_capacity"], r)
        if time.time() < end:
            r = await closed_loop(srv.base, 2 * cap, min(end, time.time() + 10), seed=2000 + minute)
            _add(phases["above_capacity"], r)
        minute += 1
    await task
    return {"phases": phases, "memory": memory_report(samples, warmup_s=duration_s / 5), "elapsed_s": round(
        time.time() - t0, 1), "load_average_1min": {"mean": round(statistics.mean(load_avg), 1),
                                                    "max": round(max(load_avg), 1)} if load_avg else None}


def _add(acc: dict, r: dict) -> None:
    for k in ("ok", "429", "failed", "tokens"):
        acc[k] += r[k]


def memory_report(samples: list[tuple[float, dict]], warmup_s: float, tolerance: float = 0.10) -> dict:
    """Per process alive from the end of warm-up to the end: RSS then, at the end, the most after warm-up."""
    after = [(t, snap) for t, snap in samples if t >= warmup_s]
    if not after:
        return {"processes": [], "flat": None}
    first, last = after[0][1], after[-1][1]
    procs = []
    for pid, (name, mb0) in sorted(first.items(), key=lambda kv: kv[1][0]):
        if pid not in last:
            continue
        series = [snap[pid][1] for _, snap in after if pid in snap]
        growth = last[pid][1] / mb0 - 1
        procs.append({"pid": pid, "process": name, "rss_mb_after_warmup": round(mb0, 1),
                      "rss_mb_end": round(last[pid][1], 1), "rss_mb_max": round(max(series), 1),
                      "growth_pct": round(100 * growth, 1),
                      "max_over_warmup_pct": round(100 * (max(series) / mb0 - 1), 1)})
    return {"warmup_s": round(warmup_s), "samples": len(samples), "tolerance_pct": 100 * tolerance,
            "processes_watched": len(procs),
            "flat": all(abs(p["growth_pct"]) <= 100 * tolerance for p in procs),
            "worst": max(procs, key=lambda p: abs(p["growth_pct"])) if procs else None,
            "total_rss_mb_after_warmup": round(sum(p["rss_mb_after_warmup"] for p in procs), 1),
            "total_rss_mb_end": round(sum(p["rss_mb_end"] for p in procs), 1),
            "processes": procs}


def run(duration_s: float = 600.0, model: str | None = None, workdir: str | None = None) -> dict:
    import logging
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from epserve.model.tiny import default_model_dir
    work = Path(workdir or tempfile.mkdtemp(prefix="epserve-soak-"))
    model_dir = str(model or default_model_dir())
    out: dict = {"duration_s": duration_s}
    srv = ChaosServer(work / "capacity", model_dir, base=base_config(), small_fs=False)
    srv.auth = {"Authorization": f"Bearer {KEY}"}
    try:
        srv.start()
        cap, rows = measure_capacity(srv.base)
    finally:
        srv.close()
    out["capacity"] = {"concurrency": cap, "levels": rows}
    srv = ChaosServer(work / "soak", model_dir, base=base_config(max_concurrent=cap), small_fs=False)
    srv.auth = {"Authorization": f"Bearer {KEY}"}
    try:
        srv.start()
        out["soak"] = asyncio.run(soak(srv, cap, duration_s))
    finally:
        srv.close()
    ph = out["soak"]["phases"]
    out["verdict"] = {"failed_at_capacity": ph["at_capacity"]["failed"],
                      "n_429_at_capacity": ph["at_capacity"]["429"],
                      "failed_above_capacity": ph["above_capacity"]["failed"],
                      "n_429_above_capacity": ph["above_capacity"]["429"],
                      "rss_flat_within_10pct": out["soak"]["memory"]["flat"]}
    return out
