"""The `triton` backend's FP8 quantisation: 1x128 activation groups (reference.per_token_group_quant_fp8,
bit for bit), and SwiGLU fused with that quantisation between the two expert GEMMs.

Scales come row-major, or MN-major with TMA-aligned columns (the layout DeepGEMM reads on Hopper;
kernels/layouts.py). Never: picks a backend or holds state.
"""
from __future__ import annotations

import math

import torch

from epserve.kernels.layouts import empty_mn_major_scales
from epserve.kernels.reference import AMAX_FLOOR, FP8, FP8_MAX
from epserve.kernels.triton_jit import BLOCK, OFF, _cdiv, _const, _jit, tl

# kernels may read only constexpr globals
_FLOOR, _QMAX = _const(AMAX_FLOOR), _const(FP8_MAX)
_INV_QMAX = _const(1.0 / FP8_MAX)


def _scale_strides(s: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows per group, group stride, row stride, column stride) of a [M, n] or [G, M, n] scale tensor,
    so a kernel indexing flat rows r writes s[r // rpg, r % rpg, col] whatever the layout."""
    if s.dim() == 2:
        return max(1, s.shape[0]), 0, s.stride(0), s.stride(1)
    return max(1, s.shape[1]), s.stride(0), s.stride(1), s.stride(2)


@_jit
def _quant_kernel(x, q, s, src, K, n_groups, stride_xm, rpg, s_sg, s_sm, s_sk, GROUP: tl.constexpr,
                  GPP: tl.constexpr, GATHER: tl.constexpr):
    """One row, GPP groups: s = max(amax, floor) / 448, q = e4m3(clamp(x / s)). GATHER: output row m
    quantises input row src[m]."""
    m = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = cols < K
    xr = tl.load(src + m).to(tl.int64) if GATHER else m
    v = tl.load(x + xr * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(v), axis=1), _FLOOR)
    # torch on CUDA divides by a scalar as a multiply by its fp32 reciprocal (so do DeepGEMM's
    # and reference.py's amax / 448 there); then an IEEE division: q and s match torch bit for bit
    sc = amax * _INV_QMAX
    qv = tl.clamp(tl.math.div_rn(v, sc[:, None]), -_QMAX, _QMAX)
    tl.store(q + m * K + cols, qv.to(tl.float8e4nv), mask=ok)
    tl.store(s + (m // rpg) * s_sg + (m % rpg) * s_sm + offs_g * s_sk, sc, mask=offs_g < n_groups)


def per_token_group_quant_fp8(x: torch.Tensor, group: int = BLOCK, mn_major: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q fp8 [..., K], s fp32 [..., ceil(K/group)]), x ~= q * s per group.

    mn_major (2-D or 3-D x): s is laid out column-major per leading group with TMA-aligned
    columns, the layout DeepGEMM reads activation scales in on Hopper; same values either way.
    """
    assert group >= 16 and group & (group - 1) == 0, f"group must be a power of two >= 16, got {group}"
    k = x.shape[-1]
    n_groups = math.ceil(k / group)
    x2 = x.reshape(-1, k)
    if k and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    q = torch.empty(x2.shape, dtype=FP8, device=x.device)
    if mn_major:
        assert x.dim() in (2, 3), f"mn_major scales need a 2-D or 3-D input, got {tuple(x.shape)}"
        s = empty_mn_major_scales((*x.shape[:-1], n_groups), x.device)
    else:
        s = torch.empty(*x.shape[:-1], n_groups, dtype=torch.float32, device=x.device)
    if x2.shape[0] and k:
        gpp = 8 if group <= 128 else 1
        _quant_kernel[(x2.shape[0], _cdiv(n_groups, gpp))](x2, q, s, x2, k, n_groups, x2.stride(0), *_scale_strides(s),
                                                                  GROUP=group, GPP=gpp, GATHER=False, num_warps=4)
    return q.view(x.shape), s


def quant_rows_fp8(x: torch.Tensor, src: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows x[src] (x [T, K] bf16, src int64 [G * M]) as DeepGEMM's masked-layout input, in one launch:
    (q fp8 [G, M, K], s fp32 [G, M, K/128] MN-major), each row as per_token_group_quant_fp8 quantises it
    (so the same codes as quantising x once and gathering: rows that land already quantised).
    None where it is off on this machine (triton_jit.OFF) or x is not on CUDA: the caller gathers."""
    if "quant_rows_fp8" in OFF or not x.is_cuda:
        return None
    k = x.shape[-1]
    n_groups, m = math.ceil(k / BLOCK), src.numel() // groups
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(groups, m, k, dtype=FP8, device=x.device)
    s = empty_mn_major_scales((groups, m, n_groups), x.device)
    if src.numel() and k:
        _quant_kernel[(src.numel(), _cdiv(n_groups, 8))](x, q, s, src, k, n_groups, x.stride(0), *_scale_strides(s),
                                                        GROUP=BLOCK, GPP=8, GATHER=True, num_warps=4)
    return q, s


@_jit
def _silu_mul_quant_kernel(h, q, s, I, stride_hm, rpg, s_sg, s_sm, s_sk, GROUP: tl.constexpr):
    """One row, one 128-wide group of the output: y = silu(gate) * up, then 1x128 FP8 as above."""
    m = tl.program_id(0).to(tl.int64)
    gi = tl.program_id(1)
    cols = gi * GROUP + tl.arange(0, GROUP)
    ok = cols < I
    gate = tl.load(h + m * stride_hm + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(h + m * stride_hm + I + cols, mask=ok, other=0.0)
    # round through the activation dtype, as the unfused silu(g) * u in bf16 does
    y = ((gate / (1.0 + tl.exp(-gate))).to(up.dtype).to(tl.float32) * up.to(tl.float32)).to(up.dtype)
    y = y.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(y), axis=0), _FLOOR)
    sc = amax * _INV_QMAX
    tl.store(q + m * I + cols, tl.clamp(tl.math.div_rn(y, sc), -_QMAX, _QMAX).to(tl.float8e4nv), mask=ok)
    tl.store(s + (m // rpg) * s_sg + (m % rpg) * s_sm + gi * s_sk, sc)


def silu_mul_quant_fp8(h13: torch.Tensor, mn_major: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """h13 [..., 2I] (gate | up; 2-D or 3-D) -> 1x128 FP8 of silu(gate) * up: (q [..., I], s [..., ceil(I/128)]).

    One pass instead of three (silu, multiply, quantise) between the two expert GEMMs; with
    mn_major the scales come in DeepGEMM's layout (see per_token_group_quant_fp8).
    """
    assert h13.dim() in (2, 3) and h13.shape[-1] % 2 == 0, f"need [..., 2I], got {tuple(h13.shape)}"
    i = h13.shape[-1] // 2
    h2 = h13.reshape(-1, 2 * i)
    if h2.stride(-1) != 1:
        h2 = h2.contiguous()
    n_groups = math.ceil(i / BLOCK)
    q = torch.empty(*h13.shape[:-1], i, dtype=FP8, device=h13.device)
    shape = (*h13.shape[:-1], n_groups)
    s = empty_mn_major_scales(shape, h13.device) if mn_major else \
        torch.empty(shape, dtype=torch.float32, device=h13.device)
    if h2.shape[0] and i:
        _silu_mul_quant_kernel[(h2.shape[0], n_groups)](h2, q, s, i, h2.stride(0), *_scale_strides(s),
                                                         GROUP=BLOCK, num_warps=4)
    return q, s
