"""`epserve bench serve --constrained`: what JSON-constrained decoding costs the batch it runs in.

Two workloads of `n_requests` streaming chat requests sent at once (one decode batch), each
decoding exactly `max_tokens` tokens, so both batches keep the same size for the same steps:
  none:  every request unconstrained (ignore_eos);
  half:  every other request with a json_schema response_format whose one string field must be
         longer than `max_tokens` tokens can fill (the grammar never lets it end early: it stops
         at `length` like the others), the rest as in `none`.
The two alternate `rounds` times; reported per workload: TPOT p50 over all requests (ms; TPOT =
(e2e - TTFT) / (tokens - 1)), and the ratio half / none (the target is <= 1.2). Also: grammar
compile time per schema, cold (a fresh GrammarCache per schema) and cached, in this process on
the served model's tokenizer (model/grammar.py, the code the ranks run).
Talks to loopback only (bench/serve.py's check).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx

from epserve.bench.serve import check_loopback

LONG = {"type": "object", "additionalProperties": False, "required": ["story"],
        "properties": {"story": {"type": "string", "minLength": 2000}}}
SCHEMAS = {
    "json_object": None,
    "weather": {"type": "object", "additionalProperties": False, "required": ["city", "days"],
                "properties": {"city": {"type": "string", "maxLength": 32}, "days": {"type": "integer"},
                               "sky": {"enum": ["sun", "rain", "snow"]}}},
    "nested": {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {
            "type": "string"}}}, "required": ["id"]}}, "total": {"type": "number"}}, "required": ["items"]},
    "long_string": LONG,
}


async def _one(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            usage = chunk.get("usage") or usage
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
    n = usage["completion_tokens"]
    return {"tpot_s": (time.perf_counter() - t0 - ttft) / (n - 1) if ttft and n > 1 else None, "tokens": n}


async def _batch(base_url: str, headers: dict, bodies: list[dict]) -> list[dict]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=600,
                                 trust_env=False) as client:
        return await asyncio.gather(*[_one(client, b) for b in bodies])


def _bodies(model: str, n: int, max_tokens: int, constrained: bool) -> list[dict]:
    out = []
    for i in range(n):
        b = {"model": model, "messages": [{"role": "user", "content": f"Tell story number {i}."}],
             "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": True,
             "stream_options": {"include_usage": True}}
        if constrained and i % 2:
            b["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": LONG}}
        else:
            b["ignore_eos"] = True
        out.append(b)
    return out


def compile_times(model_dir: str, repeats: int = 5) -> dict:
    """ms per schema: cold compile (fresh cache) median, and a cached lookup."""
    from epserve.model.checkpoint import read_config
    from epserve.model.grammar import GrammarCache, GrammarSpec, load_lltokenizer
    args = read_config(model_dir)
    tok = load_lltokenizer((Path(model_dir) / "tokenizer.json").read_text(), args.vocab_size, args.eos_token_ids)
    out = {}
    for name, schema in SCHEMAS.items():
        spec = GrammarSpec("json_object") if schema is None else GrammarSpec("json_schema", json.dumps(schema))
        cold, warm = [], []
        for _ in range(repeats):
            cache = GrammarCache(tok)
            t = time.perf_counter()
            cache.matcher(spec)
            cold.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            cache.matcher(spec)
            warm.append((time.perf_counter() - t) * 1e3)
        out[name] = {"compile_ms": round(statistics.median(cold), 3), "cached_ms": round(statistics.median(warm), 3)}
    return out


def run(base_url: str, model: str, api_key: str | None = None, n_requests: int = 32, max_tokens: int = 64,
        rounds: int = 3, model_dir: str | None = None) -> dict:
    base_url = check_loopback(base_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    tpot: dict[str, list[float]] = {"none": [], "half": []}
    asyncio.run(_batch(base_url, headers, _bodies(model, 4, 8, True)))            # warm-up (compiles, graphs)
    for _ in range(rounds):
        for kind in ("none", "half"):
            res = asyncio.run(_batch(base_url, headers, _bodies(model, n_requests, max_tokens, kind == "half")))
            if any(r["tokens"] != max_tokens for r in res):
                raise RuntimeError(f"{kind}: a request ended before max_tokens={max_tokens}")
            tpot[kind].append(statistics.median(r["tpot_s"] for r in res if r["tpot_s"]) * 1e3)
    none, half = statistics.median(tpot["none"]), statistics.median(tpot["half"])
    out = {"n_requests": n_requests, "constrained": n_requests // 2, "max_tokens": max_tokens, "rounds": rounds,
           "tpot_ms_p50_none": round(none, 2), "tpot_ms_p50_half_json": round(half, 2),
           "ratio": round(half / none, 3), "tpot_ms_rounds": {k: [round(x, 2) for x in v] for k, v in tpot.items()}}
    if model_dir:
        out["grammar_compile"] = compile_times(model_dir)
    return out
