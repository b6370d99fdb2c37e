"""The `triton` backend's GEMMs: the block-FP8 GEMM (1x128 activation scales, 128x128 weight
scales, promoted to fp32 once per 128-wide K block as DeepGEMM does), `linear` over it, and the
grouped expert GEMM over the contiguous layout (rows carry a group id, -1 = zero row) that the
routed experts run on.

Syncs the host only to move CPU-side group ids to the GPU, or once per new expert set (weight
offsets). Never: picks a backend or holds model state.
"""
from __future__ import annotations

import math

import torch

from epserve.kernels import reference
from epserve.kernels.reference import FP8, Weight, expert_ffn_masked_with, expert_ffn_with
from epserve.kernels.triton_jit import BLOCK, _cdiv, _const, _jit, tl
from epserve.kernels.triton_quant import per_token_group_quant_fp8


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
swiglu_linear = reference.swiglu_linear_with(linear)


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
