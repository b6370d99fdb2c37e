"""Reference kernels of DeepSeek-V3.2's sparse attention (DSA) in plain torch: the semantics the
native ones (kernels/native_dsa.py: DeepGEMM's MQA logits, FlashMLA's sparse attention) must match.

Owns: `dsa_index_qk` (the indexer's per-token work between its projections and its scores),
`dsa_index_select` (the lightning indexer's ReLU-weighted scores and top-k choice) and
`sparse_mla` (absorbed MLA over an explicit list of cache rows per query). Any device; float32 inside.
Never: holds state, reads the model, or picks a backend (model/dsa.py asks the backend `kb` for these
names and falls back to these).
Shape legend: T queries, Hi indexer heads, Di index_head_dim, N key positions, K chosen per query,
H heads, S cache rows (pages x page_size, flattened), C row width (>= the latent's L+R).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from epserve.errors import ConfigError
from epserve.kernels.reference import apply_rope, per_token_group_quant_fp8


def hadamard(n: int, device, dtype=torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two): H @ H^T = I."""
    if n & (n - 1):
        raise ConfigError(f"config.json: index_head_dim={n} must be a power of two for the FP8 indexer's "
                          "Hadamard rotation")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h * n ** -0.5


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x [..., Di] -> the e4m3 value times its 1x128 scale, in x's dtype (what FP8 scoring multiplies)."""
    q, s = per_token_group_quant_fp8(x, 128)
    return (q.float() * s.repeat_interleave(128, -1)[..., : x.shape[-1]]).to(x.dtype)


def _rope_head(v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = 2 cos.shape[-1] dims of v [T, n, Di], half-split; the rest pass through."""
    r = 2 * cos.shape[-1]
    return torch.cat([apply_rope(v[..., :r], cos, sin, False), v[..., r:]], -1)


def dsa_index_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_norm: torch.Tensor,
                 k_norm_bias: torch.Tensor, eps: float, rot: torch.Tensor | None, flat_cache: torch.Tensor,
                 key_off: int, slots: torch.Tensor) -> torch.Tensor:
    """The indexer's per-token work between its projections and its scores: q [T, Hi, Di] (wq_b's
    output) and k [T, Di] (wk's) -> q ready to score, in q's dtype; the key goes into
    flat_cache[slots, key_off:key_off + Di].

    The key is LayerNormed (fp32, then q's dtype); both take RoPE on their first R = 2 cos.shape[-1]
    dims, half-split (cos, sin [T, R/2]); with rot (the Hadamard [Di, Di] fp32: FP8 activations) both
    are rotated by it in fp32, rounded to the dtype, and go through the 1x128 e4m3 round trip."""
    di = k.shape[-1]
    kn = F.layer_norm(k.float(), (di,), k_norm.float(), k_norm_bias.float(), eps).to(q.dtype)
    q, kn = _rope_head(q, cos, sin), _rope_head(kn[:, None], cos, sin)[:, 0]
    if rot is not None:
        q, kn = (fp8_round_trip((v.float() @ rot).to(v.dtype)) for v in (q, kn))
    flat_cache[:, key_off:key_off + di][slots] = kn.to(flat_cache.dtype)
    return q


def dsa_index_select(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, lens: torch.Tensor,
                     topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hi, Di], w fp32 [T, Hi], keys [T, N, Di] (each query's own) or [1, N, Di] (shared: one
    sequence's prefill), lens int [T] (query t sees positions < lens[t])
    -> (idx int64 [T, min(topk, N)] positions, ok bool [same]: chosen and visible).

    I[t, s] = sum_h w[t, h] * relu(q[t, h] . keys[s] / sqrt(Di)); the top-k visible s by I. While
    fewer than topk positions are visible, every visible one is chosen (ok marks the rest False)."""
    n = keys.shape[1]
    qf, kf = q.float(), keys.float()
    s = torch.einsum("thd,nd->thn", qf, kf[0]) if keys.shape[0] == 1 else torch.einsum("thd,tnd->thn", qf, kf)
    score = torch.einsum("th,thn->tn", w.float(), s.mul_(q.shape[-1] ** -0.5).relu_())
    visible = torch.arange(n, device=q.device)[None, :] < lens.to(q.device)[:, None]
    idx = score.masked_fill(~visible, float("-inf")).topk(min(topk, n), -1).indices
    return idx, visible.gather(1, idx)


def sparse_mla(q_lat: torch.Tensor, kv_rows: torch.Tensor, slots: torch.Tensor, scale: float,
               v_dim: int) -> torch.Tensor:
    """Absorbed MLA over chosen rows (FlashMLA's sparse semantics): q_lat [T, H, Dqk], kv_rows [S, C]
    (the flat paged cache of one layer; the first Dqk values of a row are its key, the first v_dim its
    value), slots int [T, K] (row of each chosen token; < 0: none) -> [T, H, v_dim] in q_lat's dtype,
    softmax(q k^T * scale) over each query's valid rows; a query with none gives zeros."""
    d = q_lat.shape[-1]
    ok = slots >= 0
    kv = kv_rows[slots.clamp_min(0).long()][..., :d].float()                  # [T, K, Dqk]
    scores = torch.einsum("thd,tkd->thk", q_lat.float(), kv) * scale
    probs = torch.nan_to_num(scores.masked_fill(~ok[:, None], float("-inf")).softmax(-1))
    return torch.einsum("thk,tkv->thv", probs, kv[..., :v_dim]).to(q_lat.dtype)


def paged_positions(block_tables: torch.Tensor, page: int, s_q: int) -> torch.Tensor:
    """The flat cache row of every key position of every decode query: block_tables int [B, P] ->
    int64 [B*s_q, P*page] (row b's table repeated for its s_q queries)."""
    dev = block_tables.device
    slots = (block_tables.long()[:, :, None] * page + torch.arange(page, device=dev)).flatten(1)
    return slots.repeat_interleave(s_q, 0)


def dsa_paged_select(q: torch.Tensor, w: torch.Tensor, cache_layer: torch.Tensor, key_off: int,
                     block_tables: torch.Tensor, lens: torch.Tensor, s_q: int, topk: int) -> torch.Tensor:
    """The decode form of the indexer's choice, read straight from the paged cache: q [B*S, Hi, Di],
    w fp32 [B*S, Hi], cache_layer [pages, page, C] (each row's index key at [key_off, key_off + Di)),
    block_tables int [B, P], lens int [B*S] (query t sees its row's positions < lens[t]), s_q = S
    -> int64 [B*S, min(topk, P*page)]: the flat cache row of each chosen position, -1 where none
    (dsa_index_select over the row's gathered keys; a backend scores without the gather)."""
    page, di = cache_layer.shape[1], q.shape[-1]
    flat = cache_layer.view(-1, cache_layer.shape[-1])
    slots = paged_positions(block_tables, page, s_q)
    idx, ok = dsa_index_select(q, w, flat[:, key_off:key_off + di][slots], lens, topk)
    return torch.where(ok, slots.gather(1, idx), -1)
