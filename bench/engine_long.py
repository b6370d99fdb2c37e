"""`bench engine --device cuda --arch v32`: the whole engine (epserve.LLM through Ray, one unit on one
GPU, bench/engine.py `run_gpu`) on DeepSeek-V3.2 against V3 at one long context, each on its EP144-rank
preset (model/tiny.py `v3-ep144-rank` / `v32-ep144-rank`: V3 widths, 1 dense + 3 MoE layers, an EP144
rank's 2 routed experts; V3.2 adds the released indexer: 64 heads of 128, top-2,048). small: the same
on CPU with the `tiny` and `v32-tiny` checkpoints (3 layers, V3.2 choosing 16 tokens) at a short context.

Owns: the choice of the batch sizes that fit (`engine_bytes`: run_gpu's KV pool, the preset's weights
and one layer's working set, against the GPU's free memory; a batch that does not fit is listed
under "skipped" with those numbers, never run into an out-of-memory error) and the comparison
(V3.2's decode step speedup over V3 at each batch both ran).
Never: times anything itself (run_gpu does, and with a V3-width checkpoint it also times
bench step's layer at the same batch and context).
"""
from __future__ import annotations

import gc
import math

import torch

from epserve.bench.step_ep import PRESETS, preset_dir
from epserve.bench.step_long import GB, ep_rank_bytes, free_bytes
from epserve.model.checkpoint import read_config

DECODE_STEPS = 50               # run_gpu's default: the steps each batch's decode window times
SMALL = {"v3": "tiny", "v32": "v32-tiny"}


def engine_bytes(a, n: int, ctx: int, prefill_tokens: int = 16384) -> dict:
    """Bytes run_gpu's one-GPU engine holds at batch n of ctx-token prompts on checkpoint shape `a`
    -> ep_rank_bytes' keys, the KV pool sized as run_gpu sizes it (n x the pages of ctx + 2 x
    DECODE_STEPS + 64 tokens, at least two prefill steps' worth) over a's layers."""
    pages = max(n * math.ceil((ctx + 2 * DECODE_STEPS + 64) / 64) + 64, 2 * prefill_tokens // 64 + 64)
    out = ep_rank_bytes(a, n, ctx, slots=a.n_routed_experts, layers=a.n_layers)
    out["kv_cache"] = pages * 64 * a.cache_dim * 2 * a.n_layers
    out["total"] = out["kv_cache"] + out["weights"] + out["working_set"]
    return out


def run(batches=(64, 128), ctx: int = 65536, kernels: str = "auto", memory_budget: int | None = None,
        small: bool = False) -> dict:
    """{"context", "v3": run_gpu's dict | {"skipped"}, "v32": ..., "skipped": {arch: {batch: why}},
    "v32_decode_speedup": {batch: V3's step ms / V3.2's}} for the batches of `batches` that fit.
    memory_budget: bytes the engine may use (default: 90 % of the GPU's free memory, or half the
    host's available memory with small)."""
    from epserve.bench.engine import run_gpu
    presets = SMALL if small else {k: v["decode"] for k, v in PRESETS.items()}
    prefill_tokens = 1024 if small else 16384
    out = {"context": ctx, "presets": presets, "skipped": {}}
    for name, preset in presets.items():
        model_dir = preset_dir(preset, "cpu" if small else "cuda")
        a = read_config(model_dir)
        gc.collect()
        budget = memory_budget or free_bytes(torch.device("cpu" if small else "cuda"))
        need = {b: engine_bytes(a, b, ctx, prefill_tokens) for b in batches}
        fits = [b for b in batches if need[b]["total"] <= budget]
        out["skipped"][name] = {b: f"needs {need[b]['total'] / GB:.2f} GB (KV pool {need[b]['kv_cache'] / GB:.2f} GB"
                                   f" + weights {need[b]['weights'] / GB:.2f} GB) > {budget / GB:.2f} GB free"
                                for b in batches if b not in fits}
        if not fits:
            out[name] = {"skipped": f"no batch of {list(batches)} fits at context {ctx}"}
            continue
        out[name] = run_gpu(model=model_dir, batches=tuple(fits), ctx=ctx, kernels=kernels, decode_steps=DECODE_STEPS,
                            prefill_tokens=prefill_tokens)
    v3, v32 = out["v3"].get("decode", {}), out["v32"].get("decode", {})
    out["v32_decode_speedup"] = {b: round(v3[b]["step_ms"] / v32[b]["step_ms"], 3) for b in v3 if b in v32}
    return out
