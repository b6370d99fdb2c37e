"""RMSNorm as one Triton kernel: a decode layer's four norms were seven torch kernels each
(upcast, square, mean, add, rsqrt, multiply, downcast, weight), about 30 launches a layer, each
as long as its work at decode sizes. Rounds as reference.rms_norm: normalise in fp32, round to
x's dtype, multiply by the weight in that dtype.
Never: changes the math; falls back to reference for dtypes or layouts it does not take.
"""
from __future__ import annotations

import torch

from epserve.kernels import reference

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU machines: the module imports, rms_norm falls back to reference
    triton = None


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x, w, y, D, stride_x, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        v = tl.load(x + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(v * v, axis=0) / D + eps)
        n = (v * r).to(y.dtype.element_ty).to(tl.float32)
        g = tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y + row * D + cols, (n * g).to(y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (rows may be strided views, e.g. a split of a stacked GEMM's output) -> [..., D]."""
    d = x.shape[-1]
    if (triton is None or not x.is_cuda or x.dtype != weight.dtype or x.stride(-1) != 1
            or weight.stride(-1) != 1 or d > 16384):
        return reference.rms_norm(x, weight, eps)
    x2 = x if x.dim() == 2 else x.reshape(-1, d)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, d, x2.stride(0), eps,
                                         BLOCK=triton.next_power_of_2(d), num_warps=8 if d > 2048 else 4)
    return y.view(x.shape)
