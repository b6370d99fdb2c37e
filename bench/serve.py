"""`epserve bench serve`: an HTTP load generator for an OpenAI-compatible server on loopback.

Owns: drawing a seeded workload, sending it as streaming POST /v1/completions, and turning the
streams into one JSON row per concurrency level. Must never: talk to a host other than
127.0.0.1 / localhost / ::1 (ValueError before any socket opens), retry, or run unbounded:
each level sends at most `n_requests` and stops at `timeout_s` wall time.

Workload (the same for every level, so rows compare): prompt and output lengths are drawn
log-uniformly, round(exp(U(log lo, log hi))), i.e. as many short requests per octave as long
ones. A prompt is that many words from a list of common one-token English words, so its
token count is roughly the drawn length; the server's `usage.prompt_tokens` is what gets
reported. `max_tokens` is the drawn output length; the server may stop earlier at EOS (no
ignore_eos in the OpenAI API), so output tokens are the final usage chunk's
`completion_tokens` (asked for with stream_options.include_usage), or else the count of
non-empty content chunks.

Arrivals: with `rate=None` each level is closed-loop: `concurrency` workers each send the next
request as soon as their last one ends. With `rate` (req/s) arrivals are Poisson (exponential
gaps, seeded) and `concurrency` caps the requests in flight, as vLLM's benchmark_serving does.

Metrics per request: TTFT = send to first non-empty content chunk; TPOT = (e2e - TTFT) /
(output tokens - 1), for requests with 2+ output tokens; e2e = send to `data: [DONE]`.
A 429 is counted in `n_429`, not retried; any other failure (status, stream error, no
[DONE], cancelled at the deadline) in `failed`. ok + failed + n_429 + unsent == n_requests.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
from urllib.parse import urlsplit

import httpx
import numpy as np

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part").split()


def check_loopback(base_url: str) -> str:
    """base_url without a trailing slash; ValueError unless http(s) on a loopback host."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(f"base_url={base_url!r}: the load generator only talks to loopback; "
                         f"scheme must be http or https and host one of {LOOPBACK_HOSTS}, "
                         f"got scheme={parts.scheme!r} host={parts.hostname!r}")
    return base_url.rstrip("/")


def _log_uniform(rng: np.random.Generator, lo_hi, n: int) -> list[int]:
    lo, hi = lo_hi
    if not 1 <= lo <= hi:
        raise ValueError(f"length range {lo_hi!r}: need 1 <= lo <= hi")
    return [int(x) for x in np.clip(np.round(np.exp(rng.uniform(math.log(lo), math.log(hi), n))), lo, hi)]


def make_workload(n_requests: int, prompt_len, output_len, seed: int) -> list[dict]:
    """n_requests dicts {prompt (str), prompt_words, max_tokens}; same seed -> same workload."""
    rng = np.random.default_rng(seed)
    p_lens, o_lens = _log_uniform(rng, prompt_len, n_requests), _log_uniform(rng, output_len, n_requests)
    return [{"prompt": " ".join(rng.choice(WORDS, p)), "prompt_words": p, "max_tokens": o}
            for p, o in zip(p_lens, o_lens)]


async def _one(client: httpx.AsyncClient, model: str, item: dict) -> dict:
    """Send one streaming completion; a result dict with status "ok" | "429" | "failed"."""
    body = {"model": model, "prompt": item["prompt"], "max_tokens": item["max_tokens"], "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    res = {"status": "failed", "ttft_s": None, "e2e_s": None, "prompt_tokens": item["prompt_words"],
           "completion_tokens": 0, "cache_hit_tokens": 0, "error": None}
    t0 = time.perf_counter()
    n_chunks, usage, done = 0, None, False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                res["status"] = "429" if r.status_code == 429 else "failed"
                res["error"] = f"HTTP {r.status_code}: {text}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue                                  # blank separators, ": keep-alive" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res["error"] = f"stream error: {chunk['error']}"
                    return res
                if chunk.get("usage"):
                    usage = chunk["usage"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if n_chunks == 0:
                        res["ttft_s"] = time.perf_counter() - t0
                    n_chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
        return res
    if not done:
        res["error"] = "stream ended without data: [DONE]"
        return res
    res["e2e_s"] = time.perf_counter() - t0
    res["completion_tokens"] = int(usage["completion_tokens"]) if usage else n_chunks
    if usage:
        res["prompt_tokens"] = int(usage.get("prompt_tokens", item["prompt_words"]))
        res["cache_hit_tokens"] = int(usage.get("prompt_cache_hit_tokens", 0))
    res["status"] = "ok"
    return res


async def _level(base_url, model, headers, work, concurrency, rate, seed, timeout_s) -> tuple[list[dict], float]:
    """Run `work` at one concurrency level; (results of the requests that were sent, wall seconds)."""
    results: list[dict] = []
    n_started = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # trust_env=False: no proxy from the environment may carry a request off loopback.
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=timeout_s,
                                 trust_env=False, follow_redirects=False) as client:
        async def send(item):
            nonlocal n_started
            n_started += 1
            results.append(await _one(client, model, item))

        queue = iter(work)

        async def worker():                                 # closed loop: next request when the last ends
            for item in queue:
                await send(item)

        async def open_loop():                              # Poisson arrivals, at most `concurrency` in flight
            gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, len(work))
            sem, tasks = asyncio.Semaphore(concurrency), []

            async def gated(item):
                async with sem:
                    await send(item)
            try:
                for item, gap in zip(work, gaps):
                    tasks.append(asyncio.create_task(gated(item)))
                    await asyncio.sleep(gap)
                await asyncio.gather(*tasks)
            finally:                                        # at the deadline: no task outlives the client
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        t0 = time.perf_counter()
        main = open_loop() if rate else asyncio.gather(*(worker() for _ in range(concurrency)))
        try:
            await asyncio.wait_for(main, timeout_s)
        except asyncio.TimeoutError:
            pass                                            # in-flight requests were cancelled; recorded below
        wall = time.perf_counter() - t0
    cut = {"status": "failed", "ttft_s": None, "e2e_s": None, "prompt_tokens": 0, "completion_tokens": 0,
           "cache_hit_tokens": 0, "error": f"cancelled at the level deadline timeout_s={timeout_s}"}
    results += [dict(cut) for _ in range(n_started - len(results))]
    return results, wall


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)) * 1e3, 2) if xs else None


def summarize(results: list[dict], n_requests: int, wall_s: float) -> dict:
    """One row from per-request results; latencies in ms, rates per wall second."""
    ok = [r for r in results if r["status"] == "ok"]
    n_in = sum(r["prompt_tokens"] for r in ok)
    n_out = sum(r["completion_tokens"] for r in ok)
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [(r["e2e_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1)
            for r in ok if r["ttft_s"] is not None and r["completion_tokens"] > 1]
    e2e = [r["e2e_s"] for r in ok]
    per_s = (lambda x: round(x / wall_s, 2)) if wall_s > 0 else (lambda x: 0.0)
    return {"ok": len(ok), "failed": sum(r["status"] == "failed" for r in results),
            "n_429": sum(r["status"] == "429" for r in results), "unsent": n_requests - len(results),
            "wall_s": round(wall_s, 3), "requests_per_s": per_s(len(ok)),
            "input_tokens": n_in, "output_tokens": n_out, "cache_hit_tokens": sum(r["cache_hit_tokens"] for r in ok),
            "input_tokens_per_s": per_s(n_in), "output_tokens_per_s": per_s(n_out),
            "ttft_ms_p50": _pct(ttft, 50), "ttft_ms_p99": _pct(ttft, 99),
            "tpot_ms_p50": _pct(tpot, 50), "tpot_ms_p99": _pct(tpot, 99),
            "e2e_ms_p50": _pct(e2e, 50), "e2e_ms_p99": _pct(e2e, 99),
            "errors": sorted({r["error"] for r in results if r["error"]})[:5]}


def served_model(base_url: str, api_key: str | None = None) -> str:
    """The first model id the server lists (GET /v1/models)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(check_loopback(base_url).rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def run(base_url: str = "http://127.0.0.1:8000", model: str = "epserve", concurrency=(1, 4, 16),
        n_requests: int = 32, rate: float | None = None, prompt_len=(16, 256), output_len=(8, 64),
        seed: int = 0, api_key: str | None = None, timeout_s: float = 300) -> list[dict]:
    """One row per concurrency level (see `summarize`), each level sending the same `n_requests`.

    timeout_s bounds both one request and one level's wall time; requests still in flight at
    the level deadline are cancelled and counted as failed, those never sent as `unsent`."""
    base_url = check_loopback(base_url)
    if n_requests < 1 or timeout_s <= 0 or (rate is not None and rate <= 0):
        raise ValueError(f"need n_requests >= 1, timeout_s > 0, rate > 0 or None; "
                         f"got n_requests={n_requests}, timeout_s={timeout_s}, rate={rate}")
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency={concurrency!r}: need a non-empty list of levels >= 1")
    work = make_workload(n_requests, prompt_len, output_len, seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows = []
    for c in concurrency:
        results, wall = asyncio.run(_level(base_url, model, headers, work, int(c), rate, seed, timeout_s))
        rows.append({"concurrency": int(c), "rate": rate, "n_requests": n_requests,
                     **summarize(results, n_requests, wall)})
    return rows
