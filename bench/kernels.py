"""Kernel micro-benchmarks at DeepSeek-V3 shapes: FP8 GEMM, grouped GEMM, quant, MLA decode.

Owns: seeded random inputs, event timing after warm-up, figures against the chip's peaks, and
the backends side by side (native = DeepGEMM + FlashMLA, triton = ours) in one process.
`run()` returns a JSON-able dict; `python -m epserve.bench.kernels [--out FILE]` prints it.
Not a test: figures only. Needs CUDA.

Peaks (dense, datasheet, H100 SXM5; H200 has the same compute and 4.8 TB/s HBM):
FP8 1979 TFLOP/s (3958 is with 2:4 sparsity), BF16 989 TFLOP/s, HBM3 3.35 TB/s.
FLOPs count 2*M*N*K over live rows only; MLA bytes count the KV read once plus q and out.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from epserve import kernels

FP8 = torch.float8_e4m3fn
M_TOKENS = 4096
# name: (N, K) of a Linear as stored; DeepSeek-V3 dims (hidden 7168, 128 heads x 192/128, q_lora 1536)
GEMM_SHAPES = {
    "attn.wq_a": (1536, 7168),
    "attn.wkv_a": (576, 7168),
    "attn.wq_b": (128 * 192, 1536),
    "attn.wo": (7168, 128 * 128),
    "moe.w1|w3 (fused)": (2 * 2048, 7168),
    "moe.w2": (7168, 2048),
}
# rows per EP rank (see bench/step.py): prefill EP32 -> 131072 pair rows on 9 slots; decode EP144 -> 1024 on 2
GROUPED_CASES = {"prefill EP32 (9 slots)": (131072, 9), "decode EP144 (2 slots)": (1024, 2)}


def peaks(name: str) -> dict:
    """Dense datasheet peaks used for the percentages; H200 differs only in HBM."""
    hbm = 4.8e12 if "H200" in name else 3.35e12
    return {"fp8_tflops": 1979.0, "bf16_tflops": 989.0, "hbm_bytes_per_s": hbm,
            "source": "NVIDIA H100 SXM5 datasheet, dense (no sparsity)"
                      + ("; H200 HBM3e 4.8 TB/s" if hbm > 4e12 else "")}


def graphed(fn):
    """fn captured as a CUDA graph (after two warm-up runs on a side stream); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def kernel_profile(fn, reps: int = 5) -> dict[str, tuple[float, float]]:
    """kernel name -> (launches, us) per fn() call, over `reps` calls under torch.profiler after one
    warm-up call: the GPU kernels' time on CUDA (a graph replay's kernels too), the aten ops' self
    time on CPU. Names are cut at 120 characters (template arguments)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    fn()
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    table: dict[str, list] = {}
    for e in prof.events():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        us = (getattr(e, "device_time_total", 0) or e.cuda_time_total) if cuda else e.self_cpu_time_total
        row = table.setdefault(e.name[:120], [0, 0.0])
        row[0] += 1
        row[1] += us
    return {k: (n / reps, us / reps) for k, (n, us) in table.items()}


def kernel_diff(a: dict, b: dict, per: int, top: int = 40) -> dict:
    """Two kernel_profile tables side by side (a: the schedule under study, b: its baseline), per
    `per` (MoE layers): totals, and the `top` kernels by a's extra time over b's."""
    rows = sorted(set(a) | set(b), key=lambda k: -(a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1]))

    def fmt(n: float, us: float) -> dict:
        return {"launches": round(n / per, 2), "us": round(us / per, 2)}

    return {"per": per,
            "total": {"a": fmt(sum(v[0] for v in a.values()), sum(v[1] for v in a.values())),
                      "b": fmt(sum(v[0] for v in b.values()), sum(v[1] for v in b.values()))},
            "kernels": [{"kernel": k, "a": fmt(*a.get(k, (0, 0))), "b": fmt(*b.get(k, (0, 0))),
                         "extra_us": round((a.get(k, (0, 0))[1] - b.get(k, (0, 0))[1]) / per, 2)}
                        for k in rows[:top]]}


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median of reps CUDA-event timings of fn() after warm-up (wall-clock timings without CUDA)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        import time
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rand_fp8_weight(n: int, k: int, dev, g, act_quant: bool = True):
    """Random FP8 Weight [n, k] with 128x128 scales (values ~ N(0, 1/k) after dequant)."""
    from epserve.kernels.reference import Weight
    q = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16).to(FP8)
    s = torch.rand(math.ceil(n / 128), math.ceil(k / 128), device=dev, generator=g) * (2 / k ** 0.5)
    return Weight(q, s, act_quant=act_quant)


def bench_gemm(kb, dev, g, pk) -> dict:
    out = {}
    for name, (n, k) in GEMM_SHAPES.items():
        x = torch.randn(M_TOKENS, k, device=dev, generator=g, dtype=torch.bfloat16)
        w = rand_fp8_weight(n, k, dev, g)
        aq, as_ = kb.per_token_group_quant_fp8(x)
        flops = 2 * M_TOKENS * n * k
        t_gemm = time_ms(lambda: kb.fp8_gemm_nt(aq, as_, w.w, w.scale, torch.bfloat16))
        t_lin = time_ms(lambda: kb.linear(x, w))
        wb = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16)
        t_bf16 = time_ms(lambda: x @ wb.t())
        out[name] = {"M": M_TOKENS, "N": n, "K": k, "fp8_gemm_ms": t_gemm,
                     "fp8_gemm_tflops": flops / t_gemm / 1e9,
                     "fp8_pct_of_peak": 100 * flops / t_gemm / 1e9 / pk["fp8_tflops"],
                     "linear_with_act_quant_ms": t_lin, "linear_tflops": flops / t_lin / 1e9,
                     "cublas_bf16_ms": t_bf16, "cublas_bf16_tflops": flops / t_bf16 / 1e9}
    return out


def bench_quant(kb, dev, g, pk) -> dict:
    x = torch.randn(16384, 7168, device=dev, generator=g, dtype=torch.bfloat16)
    t = time_ms(lambda: kb.per_token_group_quant_fp8(x))
    moved = x.numel() * 2 + x.numel() + x.numel() // 128 * 4
    return {"shape": [16384, 7168], "ms": t, "gb_per_s": moved / t / 1e6,
            "pct_of_hbm": 100 * moved / t * 1e3 / pk["hbm_bytes_per_s"]}


def rand_experts(slots: int, dev, g, inter: int = 2048, dim: int = 7168):
    """Random FP8 ExpertWeights at V3's expert shape (w13 [slots, 2I, D], w2 [slots, D, I])."""
    from epserve.kernels.reference import ExpertWeights
    ex = ExpertWeights.empty(slots, inter, dim, rand_fp8_weight(1, 1, dev, g), dev)
    for j in range(slots):
        ex.set_slot(j, rand_fp8_weight(inter, dim, dev, g), rand_fp8_weight(inter, dim, dev, g),
                    rand_fp8_weight(dim, inter, dev, g))
    return ex


def bench_grouped(kb, dev, g, pk) -> dict:
    """The routed experts' whole SwiGLU FFN (w13 GEMM, SiLU*up + quant, w2 GEMM) as the model runs it:
    the contiguous layout for the prefill rank, the masked layout for the decode rank."""
    out = {}
    for case, (rows, slots) in GROUPED_CASES.items():
        ex = rand_experts(slots, dev, g)
        flops = 2 * rows * 3 * 2048 * 7168
        if "prefill" in case:
            x = torch.randn(rows, 7168, device=dev, generator=g, dtype=torch.bfloat16)
            ids = torch.randint(0, slots, (rows,), device=dev, generator=g)
            t = time_ms(lambda: kb.expert_ffn(x, ex, ids), reps=10)
            layout = "contiguous"
        else:
            per = rows // slots
            x = torch.randn(slots, per, 7168, device=dev, generator=g, dtype=torch.bfloat16)
            counts = torch.full((slots,), per, dtype=torch.int32, device=dev)
            t = time_ms(lambda: kb.expert_ffn_masked(x, ex, counts, per))
            layout = "masked"
        out[case] = {"rows": rows, "groups": slots, "layout": layout, "N_K": "w13 4096x7168, w2 7168x2048",
                     "ms": t, "tflops": flops / t / 1e9, "pct_of_fp8_peak": 100 * flops / t / 1e9 / pk["fp8_tflops"]}
    return out


def bench_prefill_attention(kb, dev, g, pk) -> dict:
    """MLA prefill attention (naive form, 192/128 head dims), one 4096-token prompt, 128 heads."""
    q, k = (torch.randn(4096, 128, 192, device=dev, generator=g, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(4096, 128, 128, device=dev, generator=g, dtype=torch.bfloat16)
    t = time_ms(lambda: kb.mla_prefill(q, k, v, 0.1352), reps=10)
    flops = 2 * 128 * 4096 * 4096 * (192 + 128) / 2          # causal: half the score matrix
    return {"tokens": 4096, "heads": 128, "ms": t, "tflops": flops / t / 1e9,
            "pct_of_bf16_peak": 100 * flops / t / 1e9 / pk["bf16_tflops"]}


def make_decode_inputs(dev, g, batch: int = 128, ctx: int = 5120, heads: int = 128, lat: int = 512,
                       rope: int = 64, page: int = 64):
    """Seeded MLA decode inputs: context lengths uniform in [0.8, 1.2] x ctx, pages scattered."""
    lens = (torch.rand(batch, device=dev, generator=g) * 0.4 + 0.8).mul(ctx).long().clamp(min=1)
    width = math.ceil(int(lens.max()) / page)
    n_pages = batch * width
    cache = torch.randn(n_pages, page, lat + rope, device=dev, generator=g, dtype=torch.bfloat16)
    table = torch.argsort(torch.rand(n_pages, device=dev, generator=g)).view(batch, width)
    q = torch.randn(batch, heads, lat + rope, device=dev, generator=g, dtype=torch.bfloat16)
    return q, cache, table, lens


def bench_mla_decode(kb, dev, g, pk, block_h: int | None = None) -> dict:
    q, cache, table, lens = make_decode_inputs(dev, g)
    b, h, d = q.shape
    kw = {} if block_h is None else {"config": {"block_h": block_h}}
    table, lens = table.int(), lens.int()
    plan = kb.plan_mla_decode()     # one per step, shared by the layers (FlashMLA's tile schedule)
    t = time_ms(lambda: kb.mla_decode(q, cache, table, lens, 0.1352, 512, plan, **kw))
    tokens = int(lens.sum())
    moved = tokens * d * 2 + q.numel() * 2 + b * h * 512 * 2 + b * h * 4
    flops = 2 * tokens * h * (d + 512)
    return {"batch": b, "heads": h, "mean_ctx": tokens / b, "page": cache.shape[1], "ms": t,
            "gb_per_s": moved / t / 1e6, "pct_of_hbm": 100 * moved / t * 1e3 / pk["hbm_bytes_per_s"],
            "tflops": flops / t / 1e9}


def run_backend(kb, dev, pk) -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    return {"gemm": bench_gemm(kb, dev, g, pk), "quant": bench_quant(kb, dev, g, pk),
            "experts": bench_grouped(kb, dev, g, pk), "mla_decode": bench_mla_decode(kb, dev, g, pk),
            "mla_prefill": bench_prefill_attention(kb, dev, g, pk)}


def run(device: str = "cuda", backends: tuple[str, ...] = ("native", "triton")) -> dict:
    """All micro-benchmarks for each backend, side by side in one process, against the chip's peaks.
    A backend that cannot run here is reported with the reason instead of figures."""
    dev = torch.device(device)
    pk = peaks(torch.cuda.get_device_name(dev))
    out = {"env": env_info(dev, ",".join(backends)), "peaks": pk,
           "timing": "CUDA events, median of 20 (10 for the large cases) after 3 warm-ups"}
    for name in backends:
        try:
            kb = kernels.get_backend(name, dev)
        except kernels.BackendUnavailable as exc:
            out[name] = {"unavailable": str(exc)}
            continue
        out[name] = run_backend(kb, dev, pk)
    if all("gemm" in out.get(b, {}) for b in backends[:2]) and len(backends) >= 2:
        a, b = backends[:2]
        out["speedup"] = {f"{a}_over_{b}": _ratios(out[a], out[b])}
    return out


def _ratios(fast: dict, slow: dict) -> dict:
    """Time ratios slow/fast for every benchmark both backends ran."""
    r = {f"gemm {k}": slow["gemm"][k]["fp8_gemm_ms"] / v["fp8_gemm_ms"] for k, v in fast["gemm"].items()}
    r.update({f"experts {k}": slow["experts"][k]["ms"] / v["ms"] for k, v in fast["experts"].items()})
    for k in ("quant", "mla_decode", "mla_prefill"):
        r[k] = slow[k]["ms"] / fast[k]["ms"]
    return {k: round(v, 2) for k, v in r.items()}


def env_info(dev, backend: str) -> dict:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "backend": backend}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        from epserve.kernels import native
        info.update(native.versions())
    except Exception:   # informational only
        pass
    import os
    import subprocess
    from pathlib import Path
    info["commit"] = os.environ.get("EPSERVE_COMMIT")     # a copied tree may carry a stale .git: say it
    if not info["commit"]:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
        except Exception:
            info["commit"] = None
    return info


def emit(res: dict, command: str, out: str | None) -> None:
    """Print a GPU bench's JSON with the command that made it; also write it to `out`."""
    res["command"] = command
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="native,triton", help="comma-separated, side by side in one run")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    emit(run(backends=tuple(a.backends.split(","))), f"python -m epserve.bench.kernels --backends {a.backends}", a.out)
