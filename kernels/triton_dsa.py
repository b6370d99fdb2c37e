"""DeepSeek-V3.2's indexer in Triton: its per-token q/k work in one launch, and its decode scores
over the paged cache rows in another.

`dsa_index_qk` (reference_dsa's contract) is the key's LayerNorm, both RoPEs, and with FP8
activations the Hadamard rotation and the e4m3 round trip of q and k, plus the key's write into the
cache: in torch about 30 launches a layer, each as long as its work at decode sizes. One program per
token: its Hi query rows as one tile (the Hadamard is one tl.dot in IEEE fp32, rounded to the dtype
once, as the reference's fp32 matmul) and its key row. The RoPE rounds each product and sum in the
dtype, as torch's ops on it do (as kernels/triton_latent.py).

kernels/reference_dsa.py `dsa_paged_select` gathers every visible index key of every query into a
[T, N, Di] tensor before scoring it (at 128 requests x 64K context: 2 GB written and read again, then a
[T, Hi, N] fp32 score tensor). Here one program scores BLOCK_N positions of one query straight from the
pool: it reads their keys through the block table, takes q . k for all Hi heads in one tl.dot, and
writes the ReLU-weighted sum over heads: the keys are read once and only the [T, N] logits are written,
so decode's indexer costs a read of the keys (Di x 2 bytes per position) instead of V3's whole latents.
The top-k of those logits is torch's. Why not DeepGEMM's `fp8_paged_mqa_logits`: it reads a page-major
FP8 key cache, and the pool keeps one bf16 row per token [latent | index key] (kernels/native_dsa.py).

Owns: `dsa_index_qk`, `paged_index_logits` and `dsa_paged_select` (reference_dsa's contracts).
Never: changes the cache but for the new keys `dsa_index_qk` writes.
Imports without triton (kernels/triton_jit.py); the kernel then refuses at launch.
"""
from __future__ import annotations

import torch

from epserve.kernels import reference_dsa
from epserve.kernels.reference import AMAX_FLOOR, FP8_MAX
from epserve.kernels.triton_jit import OFF, _const, _jit, _pow2, tl

BLOCK_N = 64          # key positions per program
_FLOOR, _QMAX, _INV_QMAX = _const(AMAX_FLOOR), _const(FP8_MAX), _const(1.0 / FP8_MAX)


@_jit
def _fp8_round_trip(v, axis: tl.constexpr):
    """The 1x128 e4m3 value times its scale along `axis` (one group: Di <= 128), as quantisation's kernel."""
    sc = tl.maximum(tl.max(tl.abs(v), axis=axis), _FLOOR) * _INV_QMAX
    sc = tl.expand_dims(sc, axis)
    return tl.clamp(tl.math.div_rn(v, sc), -_QMAX, _QMAX).to(tl.float8e4nv).to(tl.float32) * sc


@_jit
def _index_qk_kernel(q, stride_qt, stride_qh, k, stride_k, cos, sin, stride_cs, nw, nb, rot, cache, stride_c,
                     slots, out, eps, HI: tl.constexpr, HP: tl.constexpr, DI: tl.constexpr, R: tl.constexpr,
                     KEY_OFF: tl.constexpr, ROT: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    dt = out.dtype.element_ty
    d = tl.arange(0, DI)
    first = d < R // 2
    in_rope = d < R
    partner = tl.where(first, d + R // 2, tl.where(in_rope, d - R // 2, d))
    fi = tl.where(first, d, d - R // 2)
    c = tl.load(cos + t * stride_cs + fi, mask=in_rope, other=1.0).to(tl.float32)
    s = tl.load(sin + t * stride_cs + fi, mask=in_rope, other=0.0).to(tl.float32)
    sign = tl.where(first, -1.0, 1.0)
    # the key: LayerNorm in fp32 rounded to the dtype (each element and its partner), then RoPE
    kv = tl.load(k + t * stride_k + d).to(tl.float32)
    kp = tl.load(k + t * stride_k + partner).to(tl.float32)
    mean = tl.sum(kv, axis=0) / DI
    rstd = tl.rsqrt(tl.sum((kv - mean) * (kv - mean), axis=0) / DI + eps)
    kn = ((kv - mean) * rstd * tl.load(nw + d).to(tl.float32) + tl.load(nb + d).to(tl.float32)).to(dt).to(tl.float32)
    kpn = ((kp - mean) * rstd * tl.load(nw + partner).to(tl.float32)
           + tl.load(nb + partner).to(tl.float32)).to(dt).to(tl.float32)
    # half-split RoPE; each product and the sum rounded to the dtype, as torch's ops on it round
    y = ((kn * c).to(dt).to(tl.float32) + sign * (kpn * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    key = tl.where(in_rope, y, kn)
    # the query's heads as one [HP, DI] tile
    h = tl.arange(0, HP)[:, None]
    hm = h < HI
    qa = q + t * stride_qt + h * stride_qh
    qv = tl.load(qa + d[None, :], mask=hm, other=0.0).to(tl.float32)
    qp = tl.load(qa + partner[None, :], mask=hm, other=0.0).to(tl.float32)
    c, s, sign = c[None, :], s[None, :], sign[None, :]
    y = ((qv * c).to(dt).to(tl.float32) + sign * (qp * s).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    qr = tl.where(in_rope[None, :], y, qv)
    if ROT:       # the Hadamard in fp32, rounded to the dtype, then the e4m3 round trip
        hm_ = tl.load(rot + d[:, None] * DI + d[None, :])
        qr = _fp8_round_trip(tl.dot(qr, hm_, input_precision="ieee").to(dt).to(tl.float32), 1)
        key = _fp8_round_trip(tl.sum(key[:, None] * hm_, axis=0).to(dt).to(tl.float32), 0)
    tl.store(out + t * HI * DI + h * DI + d[None, :], qr.to(dt), mask=hm)
    row = tl.load(slots + t).to(tl.int64) * stride_c
    tl.store(cache + row + KEY_OFF + d, key.to(dt).to(cache.dtype.element_ty))


def dsa_index_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_norm: torch.Tensor,
                 k_norm_bias: torch.Tensor, eps: float, rot: torch.Tensor | None, flat_cache: torch.Tensor,
                 key_off: int, slots: torch.Tensor) -> torch.Tensor:
    """reference_dsa.dsa_index_qk in one launch (the module docstring); other layouts run the reference."""
    t, hi, di = q.shape
    r = 2 * cos.shape[-1]
    if ("dsa_index_qk" in OFF or not q.is_cuda or t == 0 or not 16 <= di <= 128 or _pow2(di) != di or r > di or r % 4
            or q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride()
            or cos.dtype != q.dtype or sin.dtype != q.dtype or flat_cache.stride(-1) != 1 or slots.stride(0) != 1
            or not (k_norm.is_contiguous() and k_norm_bias.is_contiguous())
            or (rot is not None and (rot.dtype != torch.float32 or not rot.is_contiguous()))):
        return reference_dsa.dsa_index_qk(q, k, cos, sin, k_norm, k_norm_bias, eps, rot, flat_cache, key_off, slots)
    out = torch.empty(t, hi, di, dtype=q.dtype, device=q.device)
    _index_qk_kernel[(t,)](q, q.stride(0), q.stride(1), k, k.stride(0), cos, sin, cos.stride(0), k_norm, k_norm_bias,
                           q if rot is None else rot, flat_cache, flat_cache.stride(0), slots, out, eps,
                           HI=hi, HP=max(16, _pow2(hi)), DI=di, R=r, KEY_OFF=key_off, ROT=rot is not None,
                           num_warps=4)
    return out


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
