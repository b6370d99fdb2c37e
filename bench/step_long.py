"""`bench step --arch v32`: DeepSeek-V3.2 against V3 at long context, one layer's one-batch figure
(bench/step.py `_layer_ms`, no exchange), extrapolated to the model's layers.

Owns: the sweep (decode at each context x requests per GPU, prefill of one long prompt), the memory
check of each point (`point_bytes`: the KV cache and the largest working set, from their shapes,
against the device's free memory; a point that does not fit is skipped with those numbers in the
JSON, never run into an out-of-memory error), and the comparison (V3.2's speedup over V3 at the same
batch: the model's step ms, and attention alone).
Never: times anything itself (bench/step.py does, with V3.2's indexer and sparse MLA as their own
stages from bench/step_dsa.py), or runs an exchange.

Shapes: V3 (bench/step.py V3) and V3.2 = V3 plus the release's indexer (index_n_heads 64,
index_head_dim 128, index_topk 2048). Decode: contexts 4K / 32K / 64K / 128K (each request's context
uniform in [0.8, 1.2] x it), 64 and 128 requests per GPU, an EP144 rank's 2 routed slots; prefill: one
32K prompt computed whole, an EP32 rank's 9 slots. `small`: bench/step.py SMALL with a 4 x 64 indexer
choosing 32 tokens, contexts 64 / 128, 2 / 4 requests, prefill 128: the same code at a CPU's size.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os

import torch

from epserve import kernels
from epserve.bench import step
from epserve.bench.kernels import env_info
from epserve.model.deepseek_v3 import ModelArgs

V32 = dataclasses.replace(step.V3, index_n_heads=64, index_head_dim=128, index_topk=2048)
SMALL_V32 = dataclasses.replace(step.SMALL, index_n_heads=4, index_head_dim=64, index_topk=32)
FULL = dict(archs={"v3": step.V3, "v32": V32}, contexts=(4096, 32768, 65536, 131072), requests=(64, 128),
            prefill=32768, slots={"decode": 2, "prefill": 9}, reps=None)
SMALL = dict(archs={"v3": step.SMALL, "v32": SMALL_V32}, contexts=(64, 128), requests=(2, 4), prefill=128,
             slots={"decode": 4, "prefill": 4}, reps=(2, 1))
GB = 1e9


def point_bytes(a: ModelArgs, phase: str, n: int, ctx: int, backend: str) -> dict:
    """Bytes one layer's point holds at once, beyond the layer's weights -> {"kv_cache", "working_set",
    "total"}. n: decode requests, or prefill prompt tokens (one prompt of ctx = n tokens).

    kv_cache: bf16 rows of a.cache_dim (V3: 576; V3.2: 704) for whole 64-token pages, decode rows up to
    1.2 x ctx (bench/step.py make_batch). working_set: the largest transient, by its shape:
      decode V3.2  each query's gathered index keys (bf16 and fp32) and [Hi, N] fp32 scores, as the
                   reference select computes them (the native backend scores only shared keys on
                   DeepGEMM, i.e. prefill: kernels/native_dsa.py), and the int64 row lists
      prefill V3   the core's q/k/v and MLA's naive expansion of the latent (k [N, H, P+R], v [N, H, V]),
                   plus [H, n, N] fp32 scores unless the backend has a fused attention (native)
      prefill V3.2 the index logits ([n, N] fp32 on DeepGEMM, [n, Hi, N] in the reference), the absorbed
                   queries [n, H, L+R] (twice) and, without FlashMLA's sparse kernel, the chosen
                   latents gathered in fp32 [n, K, L+R]
      both         the received expert rows (n x top-k x D bf16: rows, their expert output, a copy)."""
    row, fused = a.cache_dim * 2, backend == "native"
    n_keys = (math.ceil(1.2 * ctx / 64) if phase == "decode" else math.ceil(ctx / 64)) * 64
    kv = (n if phase == "decode" else 1) * n_keys * row
    if phase == "decode":
        per_key = a.index_head_dim * 6 + a.index_n_heads * 4 + 3 * 8 + 2 * 4 if a.is_dsa else 0
        work = n * n_keys * per_key + n * a.n_heads * a.kv_dim * 4 * 4
    elif a.is_dsa:
        k = min(a.index_topk, ctx)
        work = n * n_keys * 4 * (2 if fused else a.index_n_heads + 2) + n * k * 8 * 3
        work += 0 if fused else n * k * (a.kv_dim * 4 * 2 + a.n_heads * 4)
        work += 2 * n * a.n_heads * a.kv_dim * 2          # absorbed queries: sparse_attend's and the stage's
    else:
        work = n_keys * a.n_heads * (3 * a.qk_head_dim + a.qk_nope_head_dim + 3 * a.v_head_dim) * 2
        work += 0 if fused else 2 * a.n_heads * n * n_keys * 4
    work += n * a.n_activated_experts * a.dim * 2 * 3
    return {"kv_cache": kv, "working_set": work, "total": kv + work}


def ep_rank_bytes(a: ModelArgs, n: int, ctx: int, slots: int = 2, layers: int = 5) -> dict:
    """Bytes bench/step_ep.py's engine holds for a decode point on a preset (`v3-ep144-rank` /
    `v32-ep144-rank`: 1 dense + 3 MoE layers + the MTP layer, FP8 weights, bf16 embedding and head)
    -> {"kv_cache": its KV pool (step_ep's page count x `layers` x 64 rows of a.cache_dim bf16),
    "weights", "working_set": one layer's (point_bytes), "total"}."""
    kv = (n * (math.ceil(ctx * 1.2 / 64) + 2) + 64) * 64 * a.cache_dim * 2 * layers
    h, ql = a.n_heads, a.q_lora_rank or 0
    mla = (ql * a.dim + h * a.qk_head_dim * (ql or a.dim) + a.kv_dim * a.dim
           + h * (a.qk_nope_head_dim + a.v_head_dim) * a.kv_lora_rank + a.dim * h * a.v_head_dim
           + a.index_n_heads * a.index_head_dim * ql + a.index_head_dim * a.dim
           + a.index_n_heads * a.dim * 4)
    weights = (layers * mla + 3 * a.dim * a.inter_dim + (layers - 1) * (slots + 1) * 3 * a.dim * a.moe_inter_dim
               + 2 * a.vocab_size * a.dim * 2)
    work = point_bytes(a, "decode", n, ctx, "native")["working_set"]
    return {"kv_cache": kv, "weights": weights, "working_set": work, "total": kv + weights + work}


def free_bytes(dev: torch.device) -> int:
    """What a point may use: 90 % of the GPU's free memory, or half the host's available memory."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        return int(torch.cuda.mem_get_info(dev)[0] * 0.9)
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2


def _figures(a: ModelArgs, ms: dict, stages: dict, n: int, need: dict) -> dict:
    model = (a.n_dense_layers * (ms["attention"] + ms["dense_ffn"])
             + a.n_moe_layers * (ms["attention"] + ms["moe_ffn"]) + ms.get("mla_plan_per_step", 0.0))
    return {"ms": ms, "stages_ms": stages, "moe_layer_ms": ms["attention"] + ms["moe_ffn"], "model_ms": model,
            "tokens_per_s_per_gpu": n / model * 1e3, "bytes": need,
            "kv_bytes_all_layers": need["kv_cache"] * a.n_layers}


def run(backend: str = "native", device: str = "cuda", small: bool = False, contexts=None, requests=None,
        phases=("decode", "prefill"), graphs: bool = True, memory_budget: int | None = None,
        ep_ranks: int | None = None, skew: str = "lognormal") -> dict:
    """V3 and V3.2, one layer each, at every point -> {"decode": [...], "prefill": [...]}; a point is
    {"context", "requests" | "prompt_tokens", "v3": figures | {"skipped"}, "v32": ..., "v32_speedup"}.
    memory_budget: bytes a point may use (default: what free_bytes finds before each point).
    ep_ranks (CUDA, not small): each decode point also runs bench/step_ep.py's emulated EP rank of that
    size (`skew` loads) on each arch's EP144 preset, where the preset engine's KV pool fits (ep_rank_bytes), under
    the point's "emulated_ep_rank"."""
    if ep_ranks and small:
        raise ValueError("ep_ranks: the emulated EP rank runs the V3-width presets, not small shapes")
    shape = SMALL if small else FULL
    for c in (*(contexts or ()), *(requests or ())):
        if c < 1:
            raise ValueError(f"contexts and requests must be positive, got {c}")
    dev = torch.device(device)
    kb = kernels.get_backend(backend, dev)
    use_graphs = graphs and dev.type == "cuda"
    out = {"env": env_info(dev, backend), "shapes": "small (CPU)" if small else "DeepSeek-V3 / V3.2",
           "archs": {k: {"layers": {"dense": a.n_dense_layers, "moe": a.n_moe_layers}, "index_n_heads": a.index_n_heads,
                         "index_head_dim": a.index_head_dim, "index_topk": a.index_topk,
                         "kv_row_bytes": a.cache_dim * 2} for k, a in shape["archs"].items()},
           "assumptions": {"routed_slots_per_gpu": shape["slots"], "cuda_graphs": use_graphs,
                           "decode_context": "each request's uniform in [0.8, 1.2] x context",
                           "prefill": "one prompt of `context` tokens, computed whole",
                           "not_timed": "dispatch/combine communication, embedding, LM head, sampling"}}
    for phase in phases:
        if phase == "decode":
            points = [(c, n) for c in contexts or shape["contexts"] for n in requests or shape["requests"]]
        else:
            points = [(shape["prefill"], shape["prefill"])]
        res = {pt: {} for pt in points}
        for name, a in shape["archs"].items():
            g = torch.Generator(device=dev).manual_seed(0)
            layer = step.build_layer(a, kb, dev, g, shape["slots"][phase])
            for ctx, n in points:
                need, budget = point_bytes(a, phase, n, ctx, backend), memory_budget or free_bytes(dev)
                if need["total"] > budget:
                    res[(ctx, n)][name] = {"skipped": f"needs {need['total'] / GB:.2f} GB (KV cache "
                                           f"{need['kv_cache'] / GB:.2f} GB + working set {need['working_set'] / GB:.2f}"
                                           f" GB) > {budget / GB:.2f} GB free on {dev.type}", "bytes": need}
                    continue
                p = {"tokens": n, "ctx": ctx, "prompt": ctx, "slots": shape["slots"][phase], "reps": shape["reps"]}
                with torch.inference_mode():
                    ms, stages = step._layer_ms(phase, p, layer, kb, dev, g, use_graphs and phase == "decode", a)
                res[(ctx, n)][name] = _figures(a, ms, stages, n, need)
            del layer
        out[phase] = [_point(phase, ctx, n, r) for (ctx, n), r in res.items()]
    if ep_ranks and "decode" in phases:
        for pt in out["decode"]:
            pt["emulated_ep_rank"] = _ep_rank(shape["archs"], backend, pt["context"], pt["requests"], ep_ranks,
                                              skew, graphs, memory_budget)
    return out


def _ep_rank(archs: dict, backend: str, ctx: int, n: int, ranks: int, skew: str, graphs: bool,
             memory_budget) -> dict:
    from epserve.bench import step_ep
    res = {}
    for name, a in archs.items():
        need, budget = ep_rank_bytes(a, n, ctx), memory_budget or free_bytes(torch.device("cuda"))
        if need["total"] > budget:
            res[name] = {"skipped": f"the {step_ep.PRESETS[name]['decode']} engine needs {need['total'] / GB:.2f} GB "
                                    f"(KV pool {need['kv_cache'] / GB:.2f} GB) > {budget / GB:.2f} GB free", "bytes": need}
            continue
        res[name] = step_ep.run("decode", backend=backend, tokens=n, ctx=ctx, ranks=ranks, skew=skew, graphs=graphs,
                                 arch=name)
    return res


def _point(phase: str, ctx: int, n: int, r: dict) -> dict:
    pt = {"context": ctx, "requests" if phase == "decode" else "prompt_tokens": n, **r}
    v3, v32 = r.get("v3", {}), r.get("v32", {})
    if "model_ms" in v3 and "model_ms" in v32:
        pt["v32_speedup"] = {"model": round(v3["model_ms"] / v32["model_ms"], 3),
                             "attention": round(v3["ms"]["attention"] / v32["ms"]["attention"], 3)}
    return pt
