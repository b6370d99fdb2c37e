"""How fast the front door admits: requests/s at max_tokens=1 with 1 and 2 ingress replicas.

Starts the embedded default deployment (serve.ingress_replicas = n, KV store off so every
request is a plain admission), sends `requests` completions of one token from `concurrency`
closed-loop clients on loopback, and reports admitted requests/s, 429s and failures, how the
shared router spread them over the decode ranks (max/mean), and the highest KV use any decode
rank reported and the highest share of its pages the router had booked on it while it ran (either
over 1.0 would be a balancer violation).
"""
from __future__ import annotations

import asyncio
import dataclasses
import socket
import time

import httpx
import ray

from epserve.config import load_config


async def _fire(base: str, model: str, n: int, concurrency: int) -> dict:
    counts = {"ok": 0, "429": 0, "failed": 0}
    todo = iter(range(n))

    async def worker(client):
        for i in todo:
            try:
                r = await client.post(base + "/v1/completions", json={"model": model, "prompt": f"hello {i % 7}",
                                                                        "max_tokens": 1, "temperature": 0.0})
                counts["ok" if r.status_code == 200 else "429" if r.status_code == 429 else "failed"] += 1
            except httpx.HTTPError:
                counts["failed"] += 1
    async with httpx.AsyncClient(timeout=120) as client:
        t = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(concurrency)])
        counts["wall_s"] = time.perf_counter() - t
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(replicas: int, requests: int, concurrency: int, model: str | None = None) -> dict:
    from epserve.serve.app import start_deployment
    cfg = load_config({"model": model, "kv_store": {"enabled": False}, "eplb": {"enabled": False}})
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=_free_port(), ingress_replicas=replicas,
                                                             max_queue=4096))
    dep = start_deployment(cfg)
    try:
        base = f"http://127.0.0.1:{cfg.serve.port}"
        peak = {"kv": 0.0, "booked": 0.0}

        async def watch(stop):
            """The decode ranks' own KV use and the router's bookings on them, every 50 ms: either over
            1.0 means a decode rank was handed more pages than it has."""
            while not stop.is_set():
                snap = await dep.router.snapshot.remote()
                for s in snap["decode"]:
                    total = max(1, s.kv_blocks_total)
                    peak["kv"] = max(peak["kv"], s.kv_blocks_used / total)
                    peak["booked"] = max(peak["booked"], snap["decode_booked"].get(f"{s.unit}/{s.rank}", 0) / total)
                await asyncio.sleep(0.05)

        async def main():
            await _fire(base, cfg.serve.model_name, min(20, requests), min(4, concurrency))   # warm
            stop = asyncio.Event()
            w = asyncio.create_task(watch(stop))
            out = await _fire(base, cfg.serve.model_name, requests, concurrency)
            stop.set()
            await w
            return out
        out = asyncio.run(main())
        snap = ray.get(dep.router.snapshot.remote())
        per = list(snap["per_decode_rank"].values())
        return {"ingress_replicas": replicas, "requests": requests, "concurrency": concurrency,
                "admitted_per_s": round(out["ok"] / out["wall_s"], 1), "ok": out["ok"], "n_429": out["429"],
                "failed": out["failed"], "decode_rank_spread_max_over_mean": round(max(per) / (sum(per) / len(per)), 3),
                "peak_decode_kv_used": round(peak["kv"], 3), "peak_decode_kv_booked": round(peak["booked"], 3),
                "balancer_violation": max(peak.values()) > 1.0}
    finally:
        dep.shutdown()


def run(model: str | None = None, replicas=(1, 2), requests: int = 300, concurrency: int = 32) -> list[dict]:
    return [measure(n, requests, concurrency, model) for n in replicas]
