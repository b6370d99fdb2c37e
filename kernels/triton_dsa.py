"""DeepSeek-V3.2's indexer scores in decode as one Triton kernel over the paged cache rows.

kernels/reference_dsa.py `dsa_paged_select` gathers every visible index key of every query into a
[T, N, Di] tensor before scoring it (at 128 requests x 64K context: 2 GB written and read again, then a
[T, Hi, N] fp32 score tensor). Here one program scores BLOCK_N positions of one query straight from the
pool: it reads their keys through the block table, takes q . k for all Hi heads in one tl.dot, and
writes the ReLU-weighted sum over heads: the keys are read once and only the [T, N] logits are written,
so decode's indexer costs a read of the keys (Di x 2 bytes per position) instead of V3's whole latents.
The top-k of those logits is torch's. Why not DeepGEMM's `fp8_paged_mqa_logits`: it reads a page-major
FP8 key cache, and the pool keeps one bf16 row per token [latent | index key] (kernels/native_dsa.py).

Owns: `paged_index_logits` and `dsa_paged_select` (reference_dsa's contract). Never: changes the cache.
Imports without triton (kernels/triton_jit.py); the kernel then refuses at launch.
"""
from __future__ import annotations

import torch

from epserve.kernels.triton_jit import _jit, tl

BLOCK_N = 64          # key positions per program


@_jit
def _index_logits_kernel(q, w, cache, block_table, lens, out, s_q, stride_row, stride_bt, n_max, scale,
                         KEY_OFF: tl.constexpr, HI: tl.constexpr, DI: tl.constexpr, PAGE: tl.constexpr,
                         BLOCK: tl.constexpr):
    """out[t, n] = sum_h w[t, h] relu(q[t, h] . key(n) * scale) for n < lens[t], -inf for lens[t] <= n < n_max."""
    t = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ln = tl.load(lens + t)
    live = offs_n < ln
    offs_h, offs_d = tl.arange(0, HI), tl.arange(0, DI)
    page = tl.load(block_table + (t // s_q) * stride_bt + offs_n // PAGE, mask=live, other=0).to(tl.int64)
    rows = page * PAGE + offs_n % PAGE
    k = tl.load(cache + rows[:, None] * stride_row + KEY_OFF + offs_d[None, :], mask=live[:, None], other=0.0)
    qv = tl.load(q + t * HI * DI + offs_h[:, None] * DI + offs_d[None, :])
    s = tl.dot(qv.to(k.dtype), tl.trans(k))                                   # [HI, BLOCK] fp32
    s = tl.maximum(s * scale, 0.0)
    wv = tl.load(w + t * HI + offs_h)
    logit = tl.sum(s * wv[:, None], 0)
    tl.store(out + t * n_max + offs_n, tl.where(live, logit, float("-inf")), mask=offs_n < n_max)


def paged_index_logits(q: torch.Tensor, w: torch.Tensor, cache_layer: torch.Tensor, key_off: int,
                       block_tables: torch.Tensor, lens: torch.Tensor, s_q: int) -> torch.Tensor:
    """-> fp32 [T, P*page] logits (reference_dsa's I[t, s]; -inf at s >= lens[t]). q [T, Hi, Di] is
    scored in the cache's dtype with fp32 accumulation."""
    t, hi, di = q.shape
    page, c = cache_layer.shape[1], cache_layer.shape[2]
    n_max = block_tables.shape[1] * page
    out = torch.empty(t, n_max, dtype=torch.float32, device=q.device)
    if t == 0 or n_max == 0:
        return out
    bt = block_tables.to(torch.int32).contiguous()
    grid = (t, -(-n_max // BLOCK_N))
    _index_logits_kernel[grid](q.contiguous(), w.float().contiguous(), cache_layer, bt,
                               lens.to(torch.int32).contiguous(), out, s_q, c, bt.stride(0), n_max, di ** -0.5,
                               KEY_OFF=key_off, HI=hi, DI=di, PAGE=page, BLOCK=BLOCK_N, num_warps=4)
    return out


def dsa_paged_select(q: torch.Tensor, w: torch.Tensor, cache_layer: torch.Tensor, key_off: int,
                     block_tables: torch.Tensor, lens: torch.Tensor, s_q: int, topk: int) -> torch.Tensor:
    """reference_dsa.dsa_paged_select on the kernel above, then torch's top-k (no host sync)."""
    logits = paged_index_logits(q, w, cache_layer, key_off, block_tables, lens, s_q)
    page = cache_layer.shape[1]
    idx = logits.topk(min(topk, logits.shape[1]), -1, sorted=False).indices   # a set: no sort of 2,048 per query
    pages = block_tables.long().repeat_interleave(s_q, 0).gather(1, idx // page)
    return torch.where(idx < lens.to(idx.device)[:, None], pages * page + idx % page, -1)
