"""Kernel micro-benchmarks at DeepSeek-V3 shapes: FP8 GEMM, grouped GEMM, quant, MLA decode.

Owns: seeded random inputs, event timing after warm-up, figures against the chip's peaks.
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


def time_ms(fn, warmup: int = 3, reps: int = 20) -> float:
    """Median of reps CUDA-event timings of fn() after warm-up."""
    for _ in range(warmup):
        fn()
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


def bench_grouped(kb, dev, g, pk) -> dict:
    out = {}
    for case, (rows, slots) in GROUPED_CASES.items():
        ids = torch.randint(0, slots, (rows,), device=dev, generator=g)
        for wname, (n, k) in (("w1 (gate)", (2048, 7168)), ("w2 (down)", (7168, 2048))):
            x = torch.randn(rows, k, device=dev, generator=g, dtype=torch.bfloat16)
            ws = [rand_fp8_weight(n, k, dev, g) for _ in range(slots)]
            t = time_ms(lambda: kb.grouped_linear(x, ws, ids), reps=10 if rows > 10000 else 20)
            flops = 2 * rows * n * k
            out[f"{case} {wname}"] = {"rows": rows, "groups": slots, "N": n, "K": k, "ms": t,
                                      "tflops": flops / t / 1e9,
                                      "pct_of_fp8_peak": 100 * flops / t / 1e9 / pk["fp8_tflops"]}
    return out


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
    kw = {} if block_h is None else {"block_h": block_h}
    t = time_ms(lambda: kb.mla_decode(q, cache, table, lens, 0.1352, 512, **kw))
    tokens = int(lens.sum())
    moved = tokens * d * 2 + q.numel() * 2 + b * h * 512 * 2 + b * h * 4
    flops = 2 * tokens * h * (d + 512)
    return {"batch": b, "heads": h, "mean_ctx": tokens / b, "page": cache.shape[1], "ms": t,
            "gb_per_s": moved / t / 1e6, "pct_of_hbm": 100 * moved / t * 1e3 / pk["hbm_bytes_per_s"],
            "tflops": flops / t / 1e9}


def run(device: str = "cuda", backend: str = "triton") -> dict:
    """All micro-benchmarks -> {settings, env, gemm, quant, grouped, mla_decode}."""
    dev = torch.device(device)
    kb = kernels.get_backend(backend, dev)
    g = torch.Generator(device=dev).manual_seed(0)
    name = torch.cuda.get_device_name(dev)
    pk = peaks(name)
    out = {"env": env_info(dev, backend), "peaks": pk, "timing": "CUDA events, median of 20 after 3 warm-ups"}
    out["gemm"] = bench_gemm(kb, dev, g, pk)
    out["quant"] = bench_quant(kb, dev, g, pk)
    out["grouped"] = bench_grouped(kb, dev, g, pk)
    out["mla_decode"] = bench_mla_decode(kb, dev, g, pk)
    return out


def env_info(dev, backend: str) -> dict:
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__, "backend": backend}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
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
    p.add_argument("--backend", default="triton")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args()
    emit(run(backend=a.backend), f"python -m epserve.bench.kernels --backend {a.backend}", a.out)
