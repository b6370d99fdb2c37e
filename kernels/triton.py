"""The `triton` backend: reference.py's functions as Triton kernels on one CUDA GPU.

Owns: 1x128 FP8 activation quantisation, the block-FP8 GEMM (1x128 activation scales,
128x128 weight scales, promoted to fp32 once per 128-wide K block as DeepGEMM does), the
grouped expert GEMM over the contiguous layout (rows carry a group id, -1 = zero row),
absorbed MLA decode over the 64-token paged latent cache (split-KV, then an LSE merge),
and prefill attention through torch's SDPA. `self_test` checks every op against
reference.py on identical quantised inputs; kernels/__init__.py calls it before use.
Never: pick a backend or hold model state; ops sync the host only to move CPU-side index
inputs (seq_lens, group ids) to the GPU, or once per new expert set (weight offsets).
Imports without triton (CPU CI tests the pure planning helpers); kernels then refuse.
One file over 400 lines on purpose: the registry imports a backend as one module.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from epserve.kernels import reference
from epserve.kernels.layouts import empty_mn_major_scales
from epserve.kernels.triton_norm import rms_norm
from epserve.kernels.reference import (AMAX_FLOOR, FP8, FP8_MAX, ExpertWeights, Weight, dequant_block,
                                      multi_query_decode, expert_ffn_masked_with, expert_ffn_with, per_block_quant_fp8,
                                      plan_mla_decode)

try:
    import triton
    import triton.language as tl
    _jit, _const = triton.jit, tl.constexpr
except ImportError:  # no triton: keep the module importable, fail on first kernel use
    triton = tl = None

    class _Missing:
        def __getitem__(self, grid):
            raise RuntimeError("kernels.triton: triton is not importable here")

    def _jit(fn):
        return _Missing()

    def _const(v):
        return v

__all__ = ["per_token_group_quant_fp8", "per_block_quant_fp8", "dequant_block", "fp8_gemm_nt", "Weight",
           "ExpertWeights", "linear", "grouped_linear", "expert_ffn", "expert_ffn_masked", "silu_mul_quant_fp8",
           "mla_prefill", "plan_mla_decode", "mla_decode", "combine_rows", "route_topk", "self_test", "plan_kv_splits",
           "plan_group_tiles", "rms_norm"]

BLOCK = 128       # quantisation block: 1x128 activations, 128x128 weights
LOG2E = 1.4426950408889634
# kernels may read only constexpr globals
_FLOOR, _QMAX, _LN2 = _const(AMAX_FLOOR), _const(FP8_MAX), _const(0.6931471805599453)
_INV_QMAX = _const(1.0 / FP8_MAX)


# ---------------------------------------------------------------- pure planning helpers

def plan_kv_splits(batch: int, n_head_blocks: int, max_pages: int, n_sm: int,
                   min_pages: int = 4, max_splits: int = 64) -> tuple[int, int]:
    """-> (n_splits, pages_per_split) for split-KV decode.

    Enough programs to fill ~2 waves of n_sm, each split covering >= min_pages pages.
    Uses only host-known sizes (block_table width), so it never syncs.
    """
    programs = max(1, batch * n_head_blocks)
    want = math.ceil(2 * n_sm / programs)
    n_splits = max(1, min(want, max_pages // min_pages, max_splits))
    per_split = max(1, math.ceil(max_pages / n_splits))
    return max(1, math.ceil(max_pages / per_split)), per_split


def plan_group_tiles(group_ids: torch.Tensor, n_groups: int, block_m: int):
    """Sort rows by group and cut each group into block_m-row tiles, on device, no sync.

    group_ids int [M] (values in -1..n_groups-1) -> (sorted_rows [M], tile_group [T],
    tile_row0 [T], tile_row1 [T]) with T = ceil(M/block_m) + n_groups, an upper bound.
    Tile t covers sorted_rows[tile_row0[t]:tile_row1[t]] (<= block_m rows) of group
    tile_group[t]; unused tiles have group -1. Rows with id -1 sort first and get no tile.
    """
    m, dev = group_ids.numel(), group_ids.device
    ids = group_ids.long()
    sorted_rows = torch.argsort(ids, stable=True)
    counts = torch.zeros(n_groups + 1, dtype=torch.long, device=dev)
    counts.scatter_add_(0, ids + 1, torch.ones_like(ids))
    n_pad, counts = counts[0], counts[1:]
    starts = n_pad + torch.cumsum(counts, 0) - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    t = torch.arange(math.ceil(m / block_m) + n_groups, device=dev)
    g = torch.searchsorted(tile_end, t, right=True)
    valid = g < n_groups
    gc = g.clamp(max=n_groups - 1)
    row0 = starts[gc] + (t - (tile_end - tiles)[gc]) * block_m
    row1 = starts[gc] + counts[gc]
    return sorted_rows, torch.where(valid, gc, -1), row0, row1


def _gemm_config(m: int) -> dict:
    """Tile shape for the FP8 GEMMs by rows (per group when grouped), from an H100 sweep.

    Up to 256 rows (decode) 64-row tiles give more programs; 128x256 tiles spilled (~190 TF/s).
    """
    if m <= 256:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=8)
def _n_sm(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# ---------------------------------------------------------------- FP8 quantisation

def _scale_strides(s: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows per group, group stride, row stride, column stride) of a [M, n] or [G, M, n] scale tensor,
    so a kernel indexing flat rows r writes s[r // rpg, r % rpg, col] whatever the layout."""
    if s.dim() == 2:
        return max(1, s.shape[0]), 0, s.stride(0), s.stride(1)
    return max(1, s.shape[1]), s.stride(0), s.stride(1), s.stride(2)


@_jit
def _quant_kernel(x, q, s, K, n_groups, stride_xm, rpg, s_sg, s_sm, s_sk, GROUP: tl.constexpr, GPP: tl.constexpr):
    """One row, GPP groups: s = max(amax, floor) / 448, q = e4m3(clamp(x / s))."""
    m = tl.program_id(0).to(tl.int64)
    offs_g = tl.program_id(1) * GPP + tl.arange(0, GPP)
    cols = offs_g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    ok = cols < K
    v = tl.load(x + m * stride_xm + cols, mask=ok, other=0.0).to(tl.float32)
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
        _quant_kernel[(x2.shape[0], _cdiv(n_groups, gpp))](x2, q, s, k, n_groups, x2.stride(0), *_scale_strides(s),
                                                                  GROUP=group, GPP=gpp, num_warps=4)
    return q.view(x.shape), s


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


# ---------------------------------------------------------------- block-FP8 and grouped GEMMs

@_jit
def _load_k_tiles(a_ptrs, b_ptrs, K, kb, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The kb-th K tiles of a [BM, BK] and b [BK, BN], zero past K when K is ragged."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        k_ok = tl.arange(0, BLOCK_K) < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
    return a, b


@_jit
def _fp8_block_dot(a_ptrs, as_ptrs, b_ptrs, bs_ptr, K, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """sum_kb dot(a[:, kb], b[kb, :]) * a_s[:, kb] * b_s[kb]; a_ptrs [BM, BK], b_ptrs [BK, BN].

    bs_ptr is one pointer (BLOCK_N <= 128: the tile sits in one 128-row weight block) or [BN].
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_kb):
        a, b = _load_k_tiles(a_ptrs, b_ptrs, K, kb, BLOCK_K, EVEN_K)
        sa = tl.load(as_ptrs + kb)
        if BLOCK_N > 128:
            sb = tl.load(bs_ptr + kb)[None, :]
        else:
            sb = tl.load(bs_ptr + kb)
        acc += tl.dot(a, b) * (sa[:, None] * sb)  # promote each 128-wide K block in fp32
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@_jit
def _float_dot(a_ptrs, b_ptrs, K, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               EVEN_K: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, n_kb):
        a, b = _load_k_tiles(a_ptrs, b_ptrs, K, kb, BLOCK_K, EVEN_K)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@_jit
def _gemm_kernel(a, a_s, b, b_s, c, M, N, K, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """c [M, N] = block-FP8 a [M, K] @ b [N, K]^T; tiles ordered in GROUP_M bands for L2 reuse."""
    pid = tl.program_id(0)
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    band = GROUP_M * n_n
    first_m = (pid // band) * GROUP_M
    rows_in_band = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % rows_in_band
    pid_n = (pid % band) // rows_in_band
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)  # wrap instead of masking: loads stay unmasked and wide
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    if BLOCK_N > 128:
        bs = b_s + (cols // 128) * n_kb
    else:
        bs = b_s + (pid_n * BLOCK_N // 128) * n_kb
    acc = _fp8_block_dot(a + rows[:, None] * K + offs_k[None, :], a_s + rows * n_kb,
                         b + cols[None, :] * K + offs_k[:, None], bs, K, n_kb, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
    out = c + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(c.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def fp8_gemm_nt(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    """a_q [M, K] fp8 with a_s fp32 [M, K/128]; b_q [N, K] fp8 with b_s fp32 [N/128, K/128] -> [M, N]."""
    assert block == BLOCK, f"only 128-wide blocks are supported, got {block}"
    assert a_q.dim() == 2 and b_q.dim() == 2, f"need 2-D operands, got {tuple(a_q.shape)} and {tuple(b_q.shape)}"
    (m, k), (n, kb_) = a_q.shape, b_q.shape
    n_kb = math.ceil(k / BLOCK)
    assert kb_ == k, f"K mismatch: a has {k}, b has {kb_}"
    assert a_q.dtype == FP8 and b_q.dtype == FP8, f"need e4m3 operands, got {a_q.dtype} and {b_q.dtype}"
    assert tuple(a_s.shape) == (m, n_kb), f"a_s must be [{m}, {n_kb}], got {tuple(a_s.shape)}"
    assert tuple(b_s.shape) == (math.ceil(n / BLOCK), n_kb), f"b_s must be [{math.ceil(n / BLOCK)}, {n_kb}], " \
                                                             f"got {tuple(b_s.shape)}"
    c = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    a_q, b_q = a_q.contiguous(), b_q.contiguous()
    a_s, b_s = a_s.float().contiguous(), b_s.float().contiguous()
    cfg = _gemm_config(m)
    grid = (_cdiv(m, cfg["BLOCK_M"]) * _cdiv(n, cfg["BLOCK_N"]),)
    _gemm_kernel[grid](a_q, a_s, b_q, b_s, c, m, n, k, n_kb, BLOCK_K=BLOCK, GROUP_M=8,
                       EVEN_K=k % BLOCK == 0, **cfg)
    return c


linear = reference.linear_with(per_token_group_quant_fp8, fp8_gemm_nt)   # reference.linear's three cases


@_jit
def _grouped_kernel(a, a_s, sorted_rows, tile_group, tile_row0, tile_row1, b0, b_off, bs0, bs_off, c,
                    N, K, n_kb, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, IS_FP8: tl.constexpr):
    """One (row tile of one group, N tile): c[rows] = a[rows] @ W_g^T; W_g = b0 + b_off[g]."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    g = tl.load(tile_group + pid_m)
    if g < 0:
        return
    r0, r1 = tl.load(tile_row0 + pid_m), tl.load(tile_row1 + pid_m)
    offs = r0 + tl.arange(0, BLOCK_M)
    rows = tl.load(sorted_rows + tl.minimum(offs, r1 - 1)).to(tl.int64)  # tail rows repeat the last
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a + rows[:, None] * K + offs_k[None, :]
    b_ptrs = b0 + tl.load(b_off + g) * _W_ALIGN + cols[None, :] * K + offs_k[:, None]
    if IS_FP8:
        if BLOCK_N > 128:
            bs = bs0 + tl.load(bs_off + g) + (cols // 128) * n_kb
        else:
            bs = bs0 + tl.load(bs_off + g) + (pid_n * BLOCK_N // 128) * n_kb
        acc = _fp8_block_dot(a_ptrs, a_s + rows * n_kb, b_ptrs, bs, K, n_kb, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
    else:
        acc = _float_dot(a_ptrs, b_ptrs, K, n_kb, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
    out = c + rows[:, None] * N + offs_n[None, :]
    tl.store(out, acc.to(c.dtype.element_ty), mask=(offs < r1)[:, None] & (offs_n < N)[None, :])


_OFFSETS: dict[tuple, torch.Tensor] = {}
W_ALIGN = 16  # expert weights are addressed in 16-element units, so 16-byte vector loads stay legal
_W_ALIGN = _const(W_ALIGN)


def _element_offsets(tensors: list[torch.Tensor], unit: int = 1) -> torch.Tensor | None:
    """int64 [G]: offset of each tensor from the first, in units of `unit` elements (no stacking).

    None when some offset is not a multiple of the unit. Keyed by the addresses themselves,
    so a cached entry is right whenever it is found.
    """
    key = (tensors[0].device, tensors[0].element_size(), unit, *(t.data_ptr() for t in tensors))
    if key not in _OFFSETS:
        base, size = tensors[0].data_ptr(), tensors[0].element_size() * unit
        diffs = [t.data_ptr() - base for t in tensors]
        if any(d % size for d in diffs):
            return None
        if len(_OFFSETS) > 4096:
            _OFFSETS.clear()
        _OFFSETS[key] = torch.tensor([d // size for d in diffs], dtype=torch.int64, device=tensors[0].device)
    return _OFFSETS[key]


def _grouped_kind(x: torch.Tensor, weights: list[Weight]) -> str | None:
    """'fp8' or 'float' when the grouped Triton kernel applies, else None (reference path)."""
    w0 = weights[0]
    same = all(w.shape == w0.shape and w.w.dtype == w0.w.dtype and w.w.is_contiguous()
               and w.is_fp8 == w0.is_fp8 and w.act_quant == w0.act_quant for w in weights)
    if not same or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if w0.is_fp8:
        return "fp8" if w0.act_quant and all(w.scale.is_contiguous() for w in weights) else None
    return "float" if w0.w.dtype == x.dtype else None


def grouped_linear(x: torch.Tensor, weights: list[Weight], group_ids: torch.Tensor) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: row m uses weights[group_ids[m]]; -1 rows give 0.

    x [M, K], group_ids int [M] (sorted or not, values < len(weights)) -> [M, N] in x's dtype.
    FP8 act-quant or bf16/fp16 weights run one Triton launch; other kinds take reference's loop.
    """
    n = weights[0].shape[0] if weights else 0
    assert x.dim() == 2 and group_ids.shape == (x.shape[0],), \
        f"need x [M, K] and group_ids [M], got {tuple(x.shape)} and {tuple(group_ids.shape)}"
    if x.shape[0] == 0 or not weights:
        return x.new_zeros(x.shape[0], n)
    k = x.shape[1]
    assert weights[0].shape[1] == k, f"K mismatch: x has {k}, weights have {weights[0].shape[1]}"
    kind = _grouped_kind(x, weights)
    b_off = _element_offsets([w.w for w in weights], W_ALIGN) if kind else None
    if b_off is None:
        return reference.grouped_linear(x, weights, group_ids)
    group_ids = group_ids.to(x.device)
    m, block_k = x.shape[0], BLOCK if kind == "fp8" else 64
    cfg = _gemm_config(m // len(weights))
    sorted_rows, tile_group, row0, row1 = plan_group_tiles(group_ids, len(weights), cfg["BLOCK_M"])
    out = torch.zeros(m, n, dtype=x.dtype, device=x.device)
    if kind == "fp8":
        a, a_s = per_token_group_quant_fp8(x)
        bs0, bs_off = weights[0].scale, _element_offsets([w.scale for w in weights])
    else:
        a, a_s = x.contiguous(), x  # a_s unused
        bs0, bs_off = weights[0].w, b_off
    grid = (tile_group.numel(), _cdiv(n, cfg["BLOCK_N"]))
    _grouped_kernel[grid](a, a_s, sorted_rows, tile_group, row0, row1, weights[0].w, b_off, bs0, bs_off, out,
                          n, k, _cdiv(k, block_k), BLOCK_K=block_k, EVEN_K=k % block_k == 0,
                          IS_FP8=kind == "fp8", **cfg)
    return out


expert_ffn = expert_ffn_with(grouped_linear)
expert_ffn_masked = expert_ffn_masked_with(expert_ffn)


# ---------------------------------------------------------------- MLA attention

def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv], Tk >= Tq; query i sees keys < Tk - Tq + i + 1.

    -> [Tq, H, Dv]. Through SDPA: with Tq == Tk the causal flag (flash attention, V zero-padded
    to Dqk because flash wants equal head dims); otherwise an explicit bottom-right causal mask.
    """
    tq, h, dqk = q.shape
    tk, dv = k.shape[0], v.shape[-1]
    assert k.shape == (tk, h, dqk) and v.shape[:2] == (tk, h), \
        f"shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert tk >= tq, f"need Tk >= Tq, got Tk={tk} Tq={tq}"
    if tq == 0:
        return q.new_empty(0, h, dv)
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
    if tq == tk:
        if dv < dqk:
            vh = F.pad(vh, (0, dqk - dv))
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
        o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o[0, ..., :dv].transpose(0, 1).contiguous().to(q.dtype)


@_jit
def _mla_decode_kernel(q, kv, block_table, seq_lens, o_part, lse_part, H, scale_log2, pages_per_split,
                       stride_qb, stride_qh, stride_kvp, stride_kvt, stride_bt,
                       DV: tl.constexpr, DR: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_R: tl.constexpr,
                       PAGE: tl.constexpr, BLOCK_H: tl.constexpr, N_SPLITS: tl.constexpr, IS_F32: tl.constexpr):
    """One (head block, KV split, sequence): online softmax over the split's pages, one page a step.

    A whole page per step keeps each tile one affine block (the page id is a scalar), which
    pipelines better than gathering rows token by token (measured: 870 vs 700 GB/s on H100).
    Writes o_part [B, H, S, BLOCK_DV] normalised per split and lse_part [B, H, S] (log2 domain).
    """
    hb, sp, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    seq = tl.load(seq_lens + b)
    p0 = sp * pages_per_split
    p1 = tl.minimum(p0 + pages_per_split, tl.cdiv(seq, PAGE))
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_v, offs_r, offs_t = tl.arange(0, BLOCK_DV), tl.arange(0, BLOCK_R), tl.arange(0, PAGE)
    ok_h, ok_v, ok_r = offs_h < H, offs_v < DV, offs_r < DR
    q_row = q + b * stride_qb + offs_h[:, None] * stride_qh
    dt = kv.dtype.element_ty
    q_lat = tl.load(q_row + offs_v[None, :], mask=ok_h[:, None] & ok_v[None, :], other=0.0).to(dt)
    q_pe = tl.load(q_row + DV + offs_r[None, :], mask=ok_h[:, None] & ok_r[None, :], other=0.0).to(dt)
    m = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_DV), tl.float32)
    for p in range(p0, p1):
        page = tl.load(block_table + b * stride_bt + p).to(tl.int64)
        tok_ok = p * PAGE + offs_t < seq
        rows = kv + page * stride_kvp + offs_t[:, None] * stride_kvt
        k_lat = tl.load(rows + offs_v[None, :], mask=tok_ok[:, None] & ok_v[None, :], other=0.0)  # [PAGE, DV]
        k_pe = tl.load(rows + DV + offs_r[None, :], mask=tok_ok[:, None] & ok_r[None, :], other=0.0)
        if IS_F32:
            s = tl.dot(q_lat, tl.trans(k_lat), input_precision="ieee")
            s = tl.dot(q_pe, tl.trans(k_pe), s, input_precision="ieee")
        else:
            s = tl.dot(q_pe, tl.trans(k_pe), tl.dot(q_lat, tl.trans(k_lat)))
        s = tl.where(tok_ok[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every visited page holds a live token
        alpha = tl.exp2(m - m_new)
        pr = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(pr, 1)
        if IS_F32:
            acc = tl.dot(pr, k_lat, acc * alpha[:, None], input_precision="ieee")
        else:
            acc = tl.dot(pr.to(dt), k_lat, acc * alpha[:, None])
        m = m_new
    live = l > 0
    o = acc / tl.where(live, l, 1.0)[:, None]
    lse2 = tl.where(live, m + tl.log2(tl.where(live, l, 1.0)), float("-inf"))
    row = (b * H + offs_h) * N_SPLITS + sp
    tl.store(o_part + row[:, None] * BLOCK_DV + offs_v[None, :], o, mask=ok_h[:, None])
    tl.store(lse_part + row, lse2, mask=ok_h)


@_jit
def _mla_merge_kernel(o_part, lse_part, out, lse, DV: tl.constexpr, BLOCK_DV: tl.constexpr,
                      N_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr):
    """One (sequence, head): out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M); lse natural."""
    row = tl.program_id(0).to(tl.int64)
    offs_s, offs_v = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_DV)
    ok_s = offs_s < N_SPLITS
    ls = tl.load(lse_part + row * N_SPLITS + offs_s, mask=ok_s, other=float("-inf"))
    mx = tl.max(ls, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(ls - mx)
    tot = tl.sum(w, 0)
    o = tl.load(o_part + (row * N_SPLITS + offs_s)[:, None] * BLOCK_DV + offs_v[None, :], mask=ok_s[:, None],
                other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out + row * DV + offs_v, res.to(out.dtype.element_ty), mask=offs_v < DV)
    tl.store(lse + row, tl.where(tot > 0, (mx + tl.log2(tl.where(tot > 0, tot, 1.0))) * _LN2, float("-inf")))


MLA_DECODE_CONFIG = dict(block_h=64, num_warps=8, num_stages=2)  # picked by a sweep on H100


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, v_dim: int, plan=None, config: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over a paged latent cache (FlashMLA's semantics, reference.mla_decode's).

    q [B, H, L+R], kv_cache [P, page, L+R] (V = first v_dim channels), block_table int [B, max_pages],
    seq_lens int [B] -> (out [B, H, v_dim] in q's dtype, lse fp32 [B, H], natural log).
    config overrides MLA_DECODE_CONFIG (tuning only). q [B, S, H, L+R]: S causal query positions per
    sequence (MTP verify), as B*S rows (reference.multi_query_decode).
    """
    if q.dim() == 4:
        return multi_query_decode(lambda *a: mla_decode(*a, config=config), q, kv_cache, block_table, seq_lens,
                                  scale, v_dim, plan)
    b, h, d = q.shape
    _, page, dk = kv_cache.shape
    assert dk == d, f"q width {d} != cache width {dk}"
    assert page >= 16 and page & (page - 1) == 0, f"page size must be a power of two >= 16, got {page}"
    assert 0 < v_dim <= d, f"v_dim {v_dim} outside (0, {d}]"
    assert block_table.shape[0] == b and seq_lens.shape == (b,), \
        f"block_table {tuple(block_table.shape)} / seq_lens {tuple(seq_lens.shape)} disagree with B={b}"
    cfg = {**MLA_DECODE_CONFIG, **(config or {})}
    out = q.new_empty(b, h, v_dim)
    lse = torch.empty(b, h, dtype=torch.float32, device=q.device)
    if b == 0 or h == 0:
        return out, lse
    q = q if q.stride(-1) == 1 else q.contiguous()
    kv_cache = kv_cache if kv_cache.stride(-1) == 1 else kv_cache.contiguous()
    block_table = block_table.to(q.device).contiguous()
    seq_lens = seq_lens.to(device=q.device, dtype=torch.int32)
    block_h = min(cfg["block_h"], max(16, _pow2(h)))
    n_hb = _cdiv(h, block_h)
    n_splits, per_split = plan_kv_splits(b, n_hb, block_table.shape[1], _n_sm(q.device))
    block_dv, block_r = _pow2(v_dim), max(16, _pow2(max(1, d - v_dim)))
    o_part = torch.empty(b, h, n_splits, block_dv, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, h, n_splits, dtype=torch.float32, device=q.device)
    _mla_decode_kernel[(n_hb, n_splits, b)](
        q, kv_cache, block_table, seq_lens, o_part, lse_part, h, scale * LOG2E, per_split,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        DV=v_dim, DR=d - v_dim, BLOCK_DV=block_dv, BLOCK_R=block_r, PAGE=page, BLOCK_H=block_h,
        N_SPLITS=n_splits, IS_F32=kv_cache.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _mla_merge_kernel[(b * h,)](o_part, lse_part, out, lse, DV=v_dim, BLOCK_DV=block_dv, N_SPLITS=n_splits,
                                BLOCK_S=_pow2(n_splits), num_warps=4)
    return out, lse


# ---------------------------------------------------------------- the MoE combine's reduction

@_jit
def _combine_kernel(y, rows, w, out, D, stride_y, K: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    m = offs < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in tl.static_range(K):
        if HAS_ROWS:
            r = tl.load(rows + t * K + k).to(tl.int64)
        else:
            r = (t * K + k).to(tl.int64)
        v = tl.load(y + r * stride_y + offs, mask=m & (r >= 0), other=0.0)   # a dropped pair's row is never read
        acc += tl.load(w + t * K + k).to(tl.float32) * v.to(tl.float32)
    tl.store(out + t.to(tl.int64) * D + offs, acc.to(out.dtype.element_ty), mask=m)


def combine_rows(y: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """reference.combine_rows in one pass: each token reads its K rows once and writes its sum (the
    gather, the weighting and the sum were three kernels and a [T, K, D] temporary)."""
    t, k = weights.shape
    d = y.shape[1]
    if y.device.type != "cuda" or t == 0:
        return reference.combine_rows(y, weights, rows)
    y = y if y.stride(1) == 1 else y.contiguous()
    out = torch.empty(t, d, dtype=y.dtype, device=y.device)
    block = min(1024, _pow2(d))
    _combine_kernel[(t, _cdiv(d, block))](y, rows if rows is not None else y, weights.contiguous(), out, d,
                                          y.stride(0), K=k, HAS_ROWS=rows is not None, BLOCK_D=block)
    return out


# ---------------------------------------------------------------- MoE routing

@_jit
def _route_kernel(logits, bias, w_out, idx_out, scale, E: tl.constexpr, G: tl.constexpr, TOPG: tl.constexpr,
                  K: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E)
    s = tl.sigmoid(tl.load(logits + t * E + offs))
    c = s
    if HAS_BIAS:
        c = s + tl.load(bias + offs)
    if G > 1:      # rank the groups by their two best choices, keep the TOPG best
        cg = tl.reshape(c, (G, E // G))
        col = tl.arange(0, E // G)
        first = tl.argmax(cg, axis=1)
        gs = tl.max(cg, axis=1) + tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), cg), axis=1)
        gid = tl.arange(0, G)
        keep = gid < 0
        for _ in tl.static_range(TOPG):
            best = tl.argmax(gs, axis=0)
            keep = keep | (gid == best)
            gs = tl.where(gid == best, float("-inf"), gs)
        c = tl.where(tl.reshape(tl.broadcast_to(keep[:, None], (G, E // G)), (E,)), c, float("-inf"))
    kk = tl.arange(0, K)
    ws = tl.zeros([K], dtype=tl.float32)
    ids = tl.zeros([K], dtype=tl.int64)
    for j in tl.static_range(K):
        e = tl.argmax(c, axis=0)
        hit = offs == e
        ws = tl.where(kk == j, tl.sum(tl.where(hit, s, 0.0), axis=0), ws)
        ids = tl.where(kk == j, e.to(tl.int64), ids)
        c = tl.where(hit, float("-inf"), c)
    if NORM:
        ws = ws / (tl.sum(ws, axis=0) + 1e-20)
    tl.store(w_out + t * K + kk, ws * scale)
    tl.store(idx_out + t * K + kk, ids)


def _pow2_ok(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def route_topk(logits: torch.Tensor, bias: torch.Tensor | None, k: int, n_groups: int = 1, topk_groups: int = 1,
               score_func: str = "sigmoid", noaux: bool = True, norm: bool = True, scale: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.route_topk as one kernel per token (its sigmoid, bias, group ranking and top-k were
    some fifteen small kernels, 0.07 ms at 256 tokens on an H200). Sigmoid scoring with noaux_tc
    (or one group) at power-of-two sizes; anything else takes reference's."""
    t, e = logits.shape
    if (logits.device.type != "cuda" or t == 0 or score_func != "sigmoid" or not (noaux or n_groups == 1)
            or not (_pow2_ok(e) and _pow2_ok(k) and _pow2_ok(n_groups) and e % n_groups == 0 and k <= e)):
        return reference.route_topk(logits, bias, k, n_groups, topk_groups, score_func, noaux, norm, scale)
    logits = logits.float().contiguous()
    w = torch.empty(t, k, dtype=torch.float32, device=logits.device)
    idx = torch.empty(t, k, dtype=torch.int64, device=logits.device)
    _route_kernel[(t,)](logits, bias if bias is not None else logits, w, idx, float(scale), E=e, G=n_groups,
                        TOPG=topk_groups, K=k, HAS_BIAS=bias is not None, NORM=norm and k > 1)
    return w, idx


# ---------------------------------------------------------------- start-up self-test

def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2) in float64 (DeepGEMM's measure; 0 = equal)."""
    x, y = x.double(), y.double()
    return float(1 - 2 * (x * y).sum() / (x * x + y * y).sum().clamp(min=1e-300))


def _check_quant(dev, g) -> str:
    for m, k in ((7, 7168), (33, 200)):
        x = torch.randn(m, k, generator=g, device=dev).bfloat16() * 3
        x[0, :128] = 0  # a zero group exercises the amax floor
        q, s = per_token_group_quant_fp8(x)
        rq, rs = reference.per_token_group_quant_fp8(x)
        bad = int((q.view(torch.uint8) != rq.view(torch.uint8)).sum())
        ds = float(((s - rs).abs() / rs).max())
        assert ds <= 1e-6 and bad <= q.numel() // 1000, f"quant {m}x{k}: {bad} codes differ, scale rel {ds:.1e}"
    return f"quant ok ({bad} codes differ)"


def _check_gemm(dev, g) -> str:
    worst = 0.0
    for m, k, n in ((1, 7168, 2048), (200, 7168, 4096), (333, 1536, 576), (40, 320, 200)):
        a = torch.randn(m, k, generator=g, device=dev)
        aq, as_ = per_token_group_quant_fp8(a)
        bq, bs = per_block_quant_fp8(torch.randn(n, k, generator=g, device=dev) / k ** 0.5)
        a_deq = aq.double() * as_.double().repeat_interleave(BLOCK, 1)[:, :k]
        want = a_deq @ reference.dequant_block(bq, bs).double().t()
        for dt in (torch.bfloat16, torch.float32):
            d = calc_diff(fp8_gemm_nt(aq, as_, bq, bs, dt), want)
            worst = max(worst, d)
            assert d <= 1e-5, f"fp8_gemm_nt {m}x{k}x{n} {dt}: calc_diff {d:.2e} > 1e-5"
    return f"gemm calc_diff {worst:.1e}"


def _check_linear(dev, g) -> str:
    worst = 0.0
    x = torch.randn(3, 50, 7168, generator=g, device=dev).bfloat16()
    w = torch.randn(2048, 7168, generator=g, device=dev) / 85
    wq, ws = per_block_quant_fp8(w)
    for weight in (Weight(wq, ws, act_quant=True), Weight(wq, ws), Weight(w.bfloat16())):
        d = calc_diff(linear(x, weight), reference.linear(x, weight))
        worst = max(worst, d)
        assert d <= 1e-5, f"linear (fp8={weight.is_fp8}, act_quant={weight.act_quant}): calc_diff {d:.2e}"
    for m, n_groups, k, n in ((300, 9, 7168, 2048), (64, 2, 2048, 7168), (37, 4, 320, 200)):
        x = torch.randn(m, k, generator=g, device=dev).bfloat16()
        ids = torch.randint(-1, n_groups, (m,), generator=g, device=dev)
        ids[ids == n_groups - 1] = 0  # one group empty
        ws = [per_block_quant_fp8(torch.randn(n, k, generator=g, device=dev) / k ** 0.5) for _ in range(n_groups)]
        for weights in ([Weight(q, s, act_quant=True) for q, s in ws],
                        [Weight(reference.dequant_block(q, s).bfloat16()) for q, s in ws]):
            got, want = grouped_linear(x, weights, ids), reference.grouped_linear(x, weights, ids)
            d = calc_diff(got, want)
            worst = max(worst, d)
            assert d <= 1e-5 and bool((got[ids < 0] == 0).all()), \
                f"grouped_linear {m}x{k}x{n} G={n_groups} fp8={weights[0].is_fp8}: calc_diff {d:.2e}"
    return f"linear/grouped calc_diff {worst:.1e}"


def _check_mla(dev, g) -> str:
    worst_o, worst_l = 0.0, 0.0
    cases = ((torch.bfloat16, 128, 512, 64, [1, 64, 65, 700, 2000, 0]), (torch.float32, 5, 32, 8, [3, 130, 17]))
    for dt, h, lat, r, lens in cases:
        b, page = len(lens), 64
        width = max(math.ceil(n / page) for n in lens) + 2
        cache = torch.randn(b * width, page, lat + r, generator=g, device=dev).to(dt)
        table = torch.argsort(torch.rand(b * width, generator=g, device=dev)).view(b, width)  # scattered pages
        seq_lens = torch.tensor(lens, device=dev)
        q = torch.randn(b, h, lat + r, generator=g, device=dev).to(dt)
        out, lse = mla_decode(q, cache, table, seq_lens, 0.1352, lat)
        r_out, r_lse = reference.mla_decode(q, cache, table, seq_lens, 0.1352, lat)
        rel = float((out.float() - r_out.float()).norm() / r_out.float().norm())
        live = seq_lens > 0
        dl = float((lse[live] - r_lse[live]).abs().max())
        worst_o, worst_l = max(worst_o, rel), max(worst_l, dl)
        assert rel <= 5e-3 and dl <= 1e-3, f"mla_decode H={h} {dt}: out rel {rel:.2e}, lse abs {dl:.2e}"
        assert bool((lse[~live] == float("-inf")).all()) and bool((out[~live] == 0).all()), "empty sequence"
    for tq, tk in ((300, 300), (40, 333)):
        q, k = (torch.randn(t, 16, 192, generator=g, device=dev).bfloat16() for t in (tq, tk))
        v = torch.randn(tk, 16, 128, generator=g, device=dev).bfloat16()
        d = calc_diff(mla_prefill(q, k, v, 0.1352), reference.mla_prefill(q, k, v, 0.1352))
        assert d <= 1e-4, f"mla_prefill Tq={tq} Tk={tk}: calc_diff {d:.2e}"
    return f"mla_decode out rel {worst_o:.1e} lse abs {worst_l:.1e}; prefill calc_diff {d:.1e}"


def _check_combine(dev, g) -> str:
    for t, k, d in ((5, 8, 7168), (33, 2, 200)):
        y = torch.randn(t * k + 3, d, generator=g, device=dev).bfloat16()
        w = torch.rand(t, k, generator=g, device=dev)
        rows = torch.randperm(t * k + 3, generator=g, device=dev)[: t * k]
        rows[::3] = -1
        rows[rows == t * k + 2] = -1
        y[t * k + 2] = float("nan")               # garbage no live pair points at, and no dropped one reads
        for r in (rows, None):
            got, want = combine_rows(y, w, r), reference.combine_rows(y, w, r)
            d_ = float((got.float() - want.float()).abs().max() / want.float().abs().max())
            assert d_ <= 2 ** -6 and not got.isnan().any(), f"combine_rows {t}x{k}x{d}: max diff {d_:.2e} (relative)"
    return "combine ok"


def _check_route(dev, g) -> str:
    for t, e, groups, top_groups, k in ((300, 256, 8, 4, 8), (7, 16, 4, 2, 4), (5, 2, 1, 1, 2)):
        logits = torch.randn(t, e, generator=g, device=dev)
        bias = torch.randn(e, generator=g, device=dev) * 0.1
        w, idx = route_topk(logits, bias, k, groups, top_groups, scale=2.5)
        rw, ridx = reference.route_topk(logits, bias, k, groups, top_groups, scale=2.5)
        same = idx.sort(1)[0] == ridx.sort(1)[0]
        assert same.all(), f"route_topk {t}x{e}: {int((~same.all(1)).sum())} tokens chose other experts"
        dw = float((w.sort(1)[0] - rw.sort(1)[0]).abs().max())
        assert dw <= 1e-5, f"route_topk {t}x{e}: weights differ by {dw:.1e}"
    return "route ok"


def self_test(device) -> tuple[bool, str]:
    """Every op once on seeded inputs (small and V3 shapes) against reference.py. Never raises."""
    try:
        if triton is None:
            return False, "triton is not importable"
        dev = torch.device(device)
        if dev.type != "cuda":
            return False, "needs CUDA"
        g = torch.Generator(device=dev).manual_seed(0)
        return True, "; ".join(check(dev, g) for check in (_check_quant, _check_gemm, _check_linear, _check_mla,
                                                                  _check_combine, _check_route))
    except Exception as exc:  # a failed check or a kernel error both mean: do not use this backend
        return False, f"{type(exc).__name__}: {exc}"
