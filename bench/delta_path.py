"""`epserve bench delta_path`: decode-heavy tokens/s through the front door, and the Ray calls per token
on the delta path (rank -> stream sink -> ingress replica).

Starts the embedded default deployment (KV store and EPLB off), sends `rounds` x `streams`
streaming completions of `max_tokens` tokens each (ignore_eos, greedy) from `streams` closed-loop
clients on loopback after a short warm-up, and reports output tokens/s. Then it reads every
ingress replica's stream sink (named `epserve-sink-*`): `deliveries` are the ranks' pushes it
applied (one Ray call each, many deltas per call), `feed_yields` the batches it handed its
replica (one streaming-generator item each), `deltas` the tokens; calls per token is their sum
over the tokens. A build without sinks (before issue 14) reports tokens/s only: there every
push went to the unit's supervisor and every token was its own generator yield to the replica.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import httpx
import ray

from epserve.config import load_config


async def _stream(client: httpx.AsyncClient, model: str, i: int, max_tokens: int) -> int:
    body = {"model": model, "prompt": f"the sea and the sky {i % 11}", "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    n = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                usage = json.loads(line[5:]).get("usage")
                if usage:
                    n = int(usage["completion_tokens"])
    return n


async def _load(base: str, model: str, n: int, streams: int, max_tokens: int) -> tuple[int, float]:
    todo = iter(range(n))
    total = 0
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits, trust_env=False) as client:
        async def worker():
            nonlocal total
            for i in todo:
                n = await _stream(client, model, i, max_tokens)     # (not `total += await`: lost updates)
                total += n
        t = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(streams)])
        return total, time.perf_counter() - t


def _sinks() -> list:
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("epserve-sink-")]


def _sink_counters() -> dict | None:
    sinks = _sinks()
    if not sinks:
        return None
    got = ray.get([s.stats.remote() for s in sinks])
    return {k: sum(g[k] for g in got) for k in ("deliveries", "deltas", "feed_yields", "stream_yields")}


def run(model: str | None = None, streams: int = 32, max_tokens: int = 64, rounds: int = 2) -> dict:
    from epserve.serve.app import start_deployment
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config({"model": model, "kv_store": {"enabled": False}, "eplb": {"enabled": False}})
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=port, max_queue=4096))
    dep = start_deployment(cfg)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=5, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        asyncio.run(_load(base, cfg.serve.model_name, 8, 4, 8))        # warm-up
        before = _sink_counters()
        tokens, wall = asyncio.run(_load(base, cfg.serve.model_name, rounds * streams, streams, max_tokens))
        after = _sink_counters()
        out = {"streams": streams, "max_tokens": max_tokens, "requests": rounds * streams, "output_tokens": tokens,
               "wall_s": round(wall, 2), "output_tokens_per_s": round(tokens / wall, 1)}
        if after is not None:
            d = {k: after[k] - before[k] for k in after}
            out["delta_path"] = {**d, "rank_pushes_per_token": round(d["deliveries"] / max(1, d["deltas"]), 4),
                                 "ingress_calls_per_token": round((d["feed_yields"] + d["stream_yields"])
                                                                  / max(1, d["deltas"]), 4),
                                 "ray_calls_per_token": round((d["deliveries"] + d["feed_yields"] + d["stream_yields"])
                                                              / max(1, d["deltas"]), 4)}
        return out
    finally:
        dep.shutdown()


if __name__ == "__main__":
    print(json.dumps(run(), indent=1))
