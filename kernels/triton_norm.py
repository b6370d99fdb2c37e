"""RMSNorm as one Triton kernel: a decode layer's four norms were seven torch kernels each
(upcast, square, mean, add, rsqrt, multiply, downcast, weight), about 30 launches a layer, each
as long as its work at decode sizes. Rounds as reference.rms_norm: normalise in fp32, round to
x's dtype, multiply by the weight in that dtype. `add_rms_norm` also adds the attention's output
into the residual stream in the same pass (the sum rounded to the dtype first, as torch's add).
Never: changes the math; falls back to reference for dtypes or layouts it does not take.
"""
from __future__ import annotations

import torch

from epserve.kernels import reference
from epserve.kernels.triton_jit import OFF

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


    @triton.jit
    def _add_rms_norm_kernel(h, dx, w, hs, y, D, stride_h, stride_d, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < D
        a = tl.load(h + row * stride_h + cols, mask=ok, other=0.0)
        b = tl.load(dx + row * stride_d + cols, mask=ok, other=0.0)
        s = (a.to(tl.float32) + b.to(tl.float32)).to(hs.dtype.element_ty)     # the residual, rounded as torch's add
        tl.store(hs + row * D + cols, s, mask=ok)
        v = s.to(tl.float32)
        r = tl.rsqrt(tl.sum(v * v, axis=0) / D + eps)
        n = (v * r).to(y.dtype.element_ty).to(tl.float32)
        g = tl.load(w + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y + row * D + cols, (n * g).to(y.dtype.element_ty), mask=ok)


def add_rms_norm(h: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.add_rms_norm in one pass: the residual stream's add and the next norm (h [T, D], dx [T, D])."""
    d = h.shape[-1]
    if ("add_rms_norm" in OFF or triton is None or not h.is_cuda or h.dim() != 2 or h.shape != dx.shape or not (h.dtype == dx.dtype == weight.dtype)
            or h.stride(-1) != 1 or dx.stride(-1) != 1 or weight.stride(-1) != 1 or d > 16384):
        return reference.add_rms_norm(h, dx, weight, eps)
    hs, y = (torch.empty(h.shape, dtype=h.dtype, device=h.device) for _ in range(2))
    if h.shape[0]:
        _add_rms_norm_kernel[(h.shape[0],)](h, dx, weight, hs, y, d, h.stride(0), dx.stride(0), eps,
                                            BLOCK=triton.next_power_of_2(d), num_warps=8 if d > 2048 else 4)
    return hs, y


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
