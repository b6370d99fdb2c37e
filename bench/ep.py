"""Benchmarks across the GPUs of one host: one process per GPU, NCCL on loopback, results as JSON.

`require_gpus(n)` refuses with one readable line on a host with fewer; `spawn` runs a worker on
every GPU and returns each rank's dict. `run_step` is `bench step --gpus N`: one V3 layer per GPU
as bench/step.py builds it, with the MoE exchange real: the unit's dispatcher
(model/ep_select.py: DeepEP where it passes its self-test, else NCCL all-to-all) carries a
V3-sized batch's (token, expert) pairs across the N GPUs, and its three halves are timed apart.
Experts: 256 over N GPUs (32 slots per GPU at N = 8, not production's 9 or 2), routing uniform.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time

import torch


def require_gpus(n: int, what: str) -> None:
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        raise ValueError(f"bench {what}: --gpus must be >= 2, got {n}")
    if have < n:
        raise RuntimeError(f"bench {what} needs {n} GPUs on this host, it has {have}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, n: int, port: int, out_dir: str, fn, kwargs: dict) -> None:
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                            device_id=torch.device("cuda", rank))
    try:
        res = fn(rank, n, **kwargs)
        with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


def spawn(n: int, fn, **kwargs) -> list[dict]:
    """fn(rank, n, **kwargs) -> dict on each of n GPUs (NCCL world of n); -> the dicts by rank."""
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(n, _port(), out, fn, kwargs), nprocs=n, join=True)
        return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(n)]


def timed(fn, reps: int) -> float:
    """Median ms of fn() with a device sync around each call."""
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


# ---------------------------------------------------------------- bench step --gpus N

def _step_worker(rank: int, n: int, phase: str, tokens: int | None, backend: str) -> dict:
    import torch.distributed as dist

    from epserve import kernels
    from epserve.bench.step import PHASES, V3, _layer_ms, build_layer
    from epserve.model.ep_select import make_ep_dispatcher
    from epserve.model.moe_dispatch import ExpertMap
    from epserve.placement.topology import initial_phy2log
    a, dev = V3, torch.device("cuda", rank)
    spr = a.n_routed_experts // n
    p = {**PHASES[phase], "slots": spr, "ranks": n}
    if tokens:
        p["tokens"] = tokens
    t = p["tokens"]
    kb = kernels.get_backend(backend, dev)
    g = torch.Generator(device=dev).manual_seed(rank)
    layer = build_layer(a, kb, dev, g, spr)
    mla, gate, shared, shard, dense, attn_norm, ffn_norm = layer
    em = ExpertMap(initial_phy2log(1, a.n_routed_experts, a.n_routed_experts), a.n_routed_experts, n, n)
    disp = make_ep_dispatcher(kb, a, em, rank, n, n, True, f"cuda:{rank}", "auto",
                              max_batch=t if phase == "decode" else 128)
    moe = a.n_dense_layers                      # the dispatcher's first (only) MoE layer
    x = torch.randn(t, a.dim, device=dev, generator=g, dtype=torch.bfloat16)
    idx = torch.rand(t, a.n_routed_experts, device=dev, generator=g).topk(a.n_activated_experts, -1)[1]
    w = torch.rand(t, a.n_activated_experts, device=dev, generator=g)
    w = w / w.sum(-1, keepdim=True)
    low_latency = phase == "decode" and getattr(disp, "low_latency_ok", False)
    with torch.inference_mode(), disp.step_mode(low_latency):
        reps = 5 if phase == "prefill" else 20
        for _ in range(2):
            disp.run(moe, x, idx, w, shard)
        halves = {"launch": [], "compute": [], "finish": []}
        for _ in range(reps):
            dist.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            ex = disp.launch(moe, x, idx, w)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            ex = disp.compute(ex, shard)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            disp.finish(ex)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            for k, v in zip(halves, (t1 - t0, t2 - t1, t3 - t2)):
                halves[k].append(v * 1e3)
        half_ms = {k: statistics.median(v) for k, v in halves.items()}
        rows = t * a.n_activated_experts          # pairs this rank receives on average (uniform routing)
        recv_slot = torch.randint(0, spr, (rows,), device=dev, generator=g)
        recv_x = torch.randn(rows, a.dim, device=dev, generator=g, dtype=torch.bfloat16)
        recv_in = kb.per_token_group_quant_fp8(recv_x) if getattr(kb, "TAKES_FP8_ROWS", False) else recv_x
        experts_ms = timed(lambda: shard.compute(kb, recv_in, recv_slot), reps)
        xn = torch.randn(t, a.dim, device=dev, generator=g, dtype=torch.bfloat16)
        gate_ms = timed(lambda: gate.forward(xn), reps)
        shared_ms = timed(lambda: shared.forward(xn), reps)
        main, _ = _layer_ms(phase, p, layer, kb, dev, g, False)
    dispatch_ms = half_ms["launch"] + max(0.0, half_ms["compute"] - experts_ms)
    moe_ms = gate_ms + sum(half_ms.values()) + shared_ms
    moe_layer = main["attention"] + moe_ms
    dense_layer = main["attention"] + main["dense_ffn"]
    total = a.n_dense_layers * dense_layer + a.n_moe_layers * moe_layer
    if hasattr(disp, "close"):
        disp.close()
    return {"dispatcher": type(disp).__name__, "low_latency": low_latency, "halves_ms": half_ms,
            "experts_ms_local_estimate": experts_ms, "dispatch_ms": dispatch_ms, "combine_ms": half_ms["finish"],
            "moe_ffn_ms_with_exchange": moe_ms, "attention_ms": main["attention"], "dense_ffn_ms": main["dense_ffn"],
            "moe_layer_ms": moe_layer, "model_61_layers_ms": total, "tokens_per_gpu": t,
            "tokens_per_s_per_gpu_61_layers": t / total * 1e3}


def run_step(gpus: int, backend: str = "native", phase: str = "decode", tokens: int | None = None) -> dict:
    """`bench step --gpus N`: per-GPU throughput with the MoE exchange real across N GPUs."""
    require_gpus(gpus, "step --gpus")
    from epserve.bench.kernels import env_info
    per_rank = spawn(gpus, _step_worker, phase=phase, tokens=tokens, backend=backend)
    worst = max(per_rank, key=lambda r: r["model_61_layers_ms"])
    return {"env": env_info(torch.device("cuda"), backend), "gpus": gpus, "phase": phase,
            "dispatcher": per_rank[0]["dispatcher"], "low_latency": per_rank[0]["low_latency"],
            "tokens_per_s_per_gpu_61_layers": worst["tokens_per_s_per_gpu_61_layers"],
            "slowest_rank": {k: round(v, 3) if isinstance(v, float) else v for k, v in worst.items()},
            "per_rank_dispatch_ms": [round(r["dispatch_ms"], 3) for r in per_rank],
            "per_rank_combine_ms": [round(r["combine_ms"], 3) for r in per_rank],
            "assumptions": {"experts": "256 over the GPUs, one MoE layer's exchange timed per GPU, uniform routing",
                            "halves": "launch | compute (waits for the dispatch, runs the experts, launches the "
                                      "combine) | finish (waits for the combine), device-synced apart; dispatch_ms "
                                      "= launch + compute - the same rows' local expert time",
                            "not_overlapped": "no micro-batch overlap here: bench overlap --gpus N measures that",
                            "attention_dense": "bench/step.py's single-GPU layer pieces, run on every GPU at once"}}
