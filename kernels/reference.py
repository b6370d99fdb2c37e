"""Reference kernels in plain torch: the semantics every backend must match.

Owns: FP8 block quantisation (e4m3, 1x128 activation scales, 128x128 weight
scales, dequant multipliers as in DeepSeek's `weight_scale_inv`), dense and
grouped GEMMs on those layouts, and MLA attention (naive prefill, absorbed
paged decode). Runs on any device; computes in float32 internally.
Never: import Ray, hold state, or pick a backend (kernels/__init__.py does).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepGEMM per_token_cast_to_fp8 / DeepEP kFP8Margin


def per_token_group_quant_fp8(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (q fp8 [..., K], s fp32 [..., ceil(K/group)]), x ~= q * s per group."""
    k = x.shape[-1]
    n_groups = math.ceil(k / group)
    pad = n_groups * group - k
    xf = F.pad(x.float(), (0, pad)) if pad else x.float()
    xg = xf.unflatten(-1, (n_groups, group))
    s = xg.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (xg / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2)[..., :k], s


def per_block_quant_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q fp8 [N, K], s fp32 [ceil(N/b), ceil(K/b)]), edges zero-padded."""
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    wp = F.pad(w.float(), (0, kb * block - k, 0, nb * block - n))
    tiles = wp.view(nb, block, kb, block)
    s = tiles.abs().amax(dim=(1, 3)).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (tiles / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(nb * block, kb * block)[:n, :k].contiguous(), s


def dequant_block(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    """(q fp8 [N, K], s [ceil(N/b), ceil(K/b)]) -> float32 [N, K]: W = q * s per block."""
    n, k = q.shape
    full = s.float().repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return q.float() * full


def fp8_gemm_nt(a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype = torch.float32, block: int = 128) -> torch.Tensor:
    """out[m, n] = sum_kb (sum_{k in kb} a*b) * a_s[m, kb] * b_s[n // 128, kb].

    a_q [M, K] fp8 with a_s [M, K/128]; b_q [N, K] fp8 with b_s [N/128, K/128].
    Promotion per 128-wide K block mirrors DeepGEMM; on CPU it equals
    dequantise-then-matmul, which is how it is computed here.
    """
    k = a_q.shape[-1]
    a = a_q.float() * a_s.float().repeat_interleave(block, -1)[..., :k]
    return (a @ dequant_block(b_q, b_s, block).t()).to(out_dtype)


class Weight:
    """A Linear weight: float [N, K], or FP8 [N, K] with 128x128 dequant scales.

    `act_quant` makes FP8 GEMMs quantise activations 1x128 as the seed does;
    without it FP8 weights are dequantised on use (weight-only FP8).
    """

    __slots__ = ("w", "scale", "act_quant")

    def __init__(self, w: torch.Tensor, scale: torch.Tensor | None = None, act_quant: bool = False):
        self.w, self.scale, self.act_quant = w, scale, act_quant

    @property
    def is_fp8(self) -> bool:
        return self.scale is not None

    @property
    def shape(self) -> torch.Size:
        return self.w.shape

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        return dequant_block(self.w, self.scale).to(dtype) if self.is_fp8 else self.w.to(dtype)

    def nbytes(self) -> int:
        n = self.w.numel() * self.w.element_size()
        return n + (self.scale.numel() * 4 if self.is_fp8 else 0)


def linear_with(quant, gemm):
    """A backend's `linear` from its 1x128 quantiser and FP8 GEMM (the three cases are the same everywhere)."""
    def linear(x: torch.Tensor, weight: Weight) -> torch.Tensor:
        """x [..., K] @ W[N, K]^T -> [..., N] in x's dtype."""
        if not weight.is_fp8:
            return F.linear(x, weight.w)
        if weight.act_quant:
            q, s = quant(x.reshape(-1, x.shape[-1]))
            return gemm(q, s, weight.w, weight.scale, x.dtype).view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight.dense(x.dtype))
    return linear


linear = linear_with(per_token_group_quant_fp8, fp8_gemm_nt)


def grouped_linear(x: torch.Tensor, weights: list[Weight], group_ids: torch.Tensor) -> torch.Tensor:
    """Contiguous-layout grouped GEMM: row m uses weights[group_ids[m]]; -1 rows give 0.

    x [M, K], group_ids int64 [M] sorted or not -> [M, N].
    """
    n = weights[0].shape[0] if weights else 0
    out = x.new_zeros(x.shape[0], n)
    if x.shape[0] == 0:
        return out
    for g in torch.unique(group_ids).tolist():
        if g < 0:
            continue
        rows = (group_ids == g).nonzero(as_tuple=True)[0]
        out[rows] = linear(x[rows], weights[g])
    return out


def mla_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Naive-form MLA for one sequence's new tokens.

    q [Tq, H, Dqk], k [Tk, H, Dqk], v [Tk, H, Dv] with Tk >= Tq: the last Tq keys are
    the new tokens, so query i sees keys < Tk - Tq + i + 1. -> [Tq, H, Dv].
    """
    tq, tk = q.shape[0], k.shape[0]
    mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(diagonal=tk - tq)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode over a paged latent cache (FlashMLA's semantics).

    q [B, H, L+R] (latent-space query), kv_cache [P, page, L+R], block_table int [B, max_pages],
    seq_lens int [B] -> (out [B, H, v_dim] = softmax(q k^T * scale) @ kv[..., :v_dim],
    lse fp32 [B, H], natural log).
    """
    b, h, _ = q.shape
    n_max = block_table.shape[1] * kv_cache.shape[1]
    kv = kv_cache[block_table].reshape(b, n_max, kv_cache.shape[-1]).float()   # pages gathered, padded
    scores = torch.einsum("bhd,bnd->bhn", q.float(), kv) * scale
    valid = torch.arange(n_max, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    probs = torch.nan_to_num(scores.softmax(-1))       # a zero-length row gives zeros, not NaN
    return torch.einsum("bhn,bnd->bhd", probs, kv[..., :v_dim]).to(q.dtype), lse
