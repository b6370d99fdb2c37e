"""The `triton` backend's MLA attention: absorbed decode over the 64-token paged latent cache
(split-KV, one page a step, then an LSE merge; FlashMLA's and reference.mla_decode's semantics)
and prefill attention through torch's SDPA.

Syncs the host only to move CPU-side seq_lens to the GPU. Never: picks a backend or holds state.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from epserve.kernels.reference import multi_query_decode
from epserve.kernels.triton_jit import _cdiv, _const, _jit, _n_sm, _pow2, tl

LOG2E = 1.4426950408889634
_LN2 = _const(0.6931471805599453)   # kernels may read only constexpr globals


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
