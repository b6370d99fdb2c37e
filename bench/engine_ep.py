"""`bench engine --device cuda --ep-presets`: the whole engine (epserve.LLM through Ray, one unit on
one GPU) on the emulated EP rank of DeepSeek's deployment, against bench step's step on the same rank,
checkpoint and schedule, so the engine-vs-layers ratio is measured where the headline is.

Owns: the two presets and the config of their one-GPU units (`ep_engine_config`):
  decode    checkpoint `v3-ep144-rank-61l` (V3 widths, 61 layers, the 2 routed slots of an EP144
            rank) with `ep_dispatch: emulated`, ranks 144: every MoE layer receives the EP144 rank's
            rows (~1,024 at 128 requests, top-8 over the unit, skewed loads after EPLB), exchanges
            held for DeepEP's published time, `overlap: on` (two micro-batches);
  prefill   checkpoint `v3-ep32-rank` (V3 widths, 4 layers, 9 slots) with ranks 32: ~131K rows per
            MoE layer at 16K tokens per step (4 layers: a prefill step's fixed costs are small next
            to its work, and a 61-layer copy would not fit the GPU host's disk beside the decode one).
For each, the engine's rank-side step time (bench/engine.py's windows) and then, with the unit gone,
bench/step_ep.py's overlapped step on the same checkpoint at the same batch (decode: context
ctx + the decode window; prefill: the engine's prompts): engine_over_layers = engine step / that step.
`run()` returns a JSON-able dict. Not a test.
"""
from __future__ import annotations

import gc
import time

import torch

from epserve.bench.engine import _decode_window
from epserve.bench.step_ep import preset_dir
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence

PRESETS = {"decode": ("v3-ep144-rank-61l", 144), "prefill": ("v3-ep32-rank", 32)}


def ep_engine_config(ranks: int, skew: str = "lognormal", kernels: str = "auto", dtype: str = "bfloat16",
                     max_batch_size: int = 128, kv_pages: int = 4096, max_batch_tokens: int = 16384) -> dict:
    """The config of a deployment whose units are one GPU each, every one the emulated rank of an EP
    unit of `ranks` GPUs, running the overlapped schedules (what the presets run; tests run it on CPU)."""
    unit = {"units": 1, "nodes_per_unit": 1, "gpus_per_node": 1, "max_batch_size": max_batch_size,
            "kv_pages": kv_pages, "max_batch_tokens": max_batch_tokens}
    return {"dtype": dtype, "kernels": kernels, "eplb": {"enabled": False}, "kv_store": {"enabled": False},
            "ep_dispatch": "emulated", "overlap": "on", "ep_emulate": {"ranks": ranks, "skew": skew},
            "decode": unit, "prefill": {"nodes_per_unit": 1, "gpus_per_node": 1}}


def _free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(batches=(64, 128, 256), ctx: int = 4096, kernels: str = "auto", skew: str = "lognormal",
        decode_steps: int = 30, prefill_tokens: int = 16384, prompt: int = 4096) -> dict:
    import epserve
    import ray
    from epserve.bench import step_ep
    from epserve.model.checkpoint import read_config
    out = {"presets": {k: {"checkpoint": p, "ep_ranks": r} for k, (p, r) in PRESETS.items()}, "skew": skew,
           "context": ctx, "schedule": "overlap: on (two micro-batches) in the engine; bench step's overlapped "
                                       "step (one CUDA graph for decode) as the layers figure"}
    g = torch.Generator().manual_seed(0)
    model, ranks = PRESETS["decode"]
    model_dir = preset_dir(model, "cuda")
    args = read_config(model_dir)
    pages = max(batches) * (-(-(ctx + 3 * decode_steps + 72) // 64)) + 64
    dec = {}
    with epserve.LLM(model=model_dir, config=ep_engine_config(ranks, skew, kernels, max_batch_size=max(batches),
                                                              kv_pages=pages)) as llm:
        unit = llm.units[0]
        for b in batches:
            params = SamplingParams(max_tokens=decode_steps * 3 + 8, temperature=0.0, ignore_eos=True)
            items = [(Sequence(f"d{b}-{i}", torch.randint(4, args.vocab_size, (ctx,), generator=g).tolist(),
                               params), 0) for i in range(b)]
            ref = unit.generate.remote(items)
            dec[b] = {"engine": _decode_window(unit, b, decode_steps)}
            ray.get(ref)
    _free_gpu()
    for b in batches:
        s = step_ep.run("decode", backend=kernels if kernels != "auto" else "native", tokens=b, ranks=ranks,
                        skew=skew, model=model_dir, ctx=ctx + 2 * decode_steps)
        layers = s["overlapped"]["held"]["step_ms"]
        dec[b].update(step_bench_overlapped_ms=layers, step_bench_one_batch_ms=s["one_batch"]["held"]["step_ms"],
                      engine_over_layers=round(dec[b]["engine"]["step_ms"] / layers, 3))
        _free_gpu()
    out["decode"] = dec

    model, ranks = PRESETS["prefill"]
    model_dir = preset_dir(model, "cuda")
    args = read_config(model_dir)
    per_step = max(1, prefill_tokens // prompt)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    cfg = ep_engine_config(ranks, skew, kernels, kv_pages=2 * prefill_tokens // 64 + 64,
                           max_batch_tokens=prefill_tokens)
    with epserve.LLM(model=model_dir, config=cfg) as llm:
        unit = llm.units[0]
        for rnd in ("warm", "timed"):
            items = [(Sequence(f"p{rnd}{i}", torch.randint(4, args.vocab_size, (prompt,), generator=g).tolist(),
                               params), 0) for i in range(per_step * 3)]
            t = time.perf_counter()
            ray.get(unit.generate.remote(items))
            dt = time.perf_counter() - t
    _free_gpu()
    s = step_ep.run("prefill", backend=kernels if kernels != "auto" else "native", tokens=prefill_tokens,
                    ranks=ranks, skew=skew, model=model_dir, prompt=prompt)
    step_ms = dt * 1e3 / 3
    out["prefill"] = {"prompt_tokens": prompt, "prompts_per_step": per_step, "steps": 3,
                      "engine": {"input_tok_s": round(per_step * 3 * prompt / dt, 1), "step_ms": round(step_ms, 2),
                                 "note": "wall time of 3 steps through Ray (admission and sampling included)"},
                      "step_bench_overlapped_ms": s["overlapped"]["held"]["step_ms"],
                      "engine_over_layers": round(step_ms / s["overlapped"]["held"]["step_ms"], 3)}
    return out
