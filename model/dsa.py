"""DeepSeek-V3.2's sparse attention (DSA), reference form: the lightning indexer, and MLA over the
tokens it picks.

Owns: the Indexer of one layer (wq_b, wk, k_norm, weights_proj), which writes each token's index key
into the paged cache beside its MLA latent (one row per token, [latent L+R | index key Di], so one
page table serves both and every path that moves a row moves both); and `sparse_attend`: the top-k
choice and absorbed MLA over the chosen latents (kernels/reference_dsa.py, or the backend's), for
mixed prefill/decode `Batch`es and fixed-shape `DecodeBatch`es (no host sync: CUDA-graph safe) alike.
Never: allocates pages, decides the batch, or talks to other ranks. model/deepseek_v3.py's MLA calls
in here when `args.is_dsa`; this module reads the MLA duck-typed (no import of it: no cycle).

Shape legend: T query tokens, N key positions of a query's sequence, Hi index_n_heads, Di index_head_dim,
K = min(index_topk, N), H heads, P qk_nope_head_dim, R qk_rope_head_dim, L kv_lora_rank, V v_head_dim,
C cache row width L + R + Di.

The index score of query t (at position pos_t) for key position s (DeepSeek's Indexer, transformers'
DeepseekV32Indexer):
    I[t, s] = sum_h w[t, h] * relu(q[t, h] . k[s] * Di^-0.5),   w = weights_proj(x) * Hi^-0.5
Query t attends to the K positions s <= pos_t with the largest I[t, s]; while pos_t < K that is every
earlier position, so short contexts are dense. The indexer's RoPE rotates the first R dims of q and k,
half-split, unlike MLA's interleaved pairs. With FP8 activations q and k also go through an orthonormal
Hadamard rotation (dot products keep) and a 1x128 e4m3 round trip, as DeepSeek's release does; the cache
holds the key as q8 * scale (what its fp8 key and scale multiply out to).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from epserve.kernels import reference_dsa
from epserve.kernels.reference_dsa import hadamard
from epserve.kernels.reference import Weight


@dataclass
class Indexer:
    """The lightning indexer of one layer (names as DeepSeek's and transformers' checkpoints)."""

    args: object                      # model/deepseek_v3.py ModelArgs
    kb: ModuleType
    wq_b: Weight = None               # [Hi*Di, q_lora_rank]
    wk: Weight = None                 # [Di, D]
    k_norm: torch.Tensor = None       # LayerNorm weight [Di]
    k_norm_bias: torch.Tensor = None  # LayerNorm bias [Di]
    weights_proj: Weight = None       # [Hi, D], applied in float32 (transformers keeps it fp32)
    fp8: bool = False                 # FP8 q/k (Hadamard + 1x128 e4m3), set by the loader with fp8_activations
    _h: torch.Tensor | None = field(default=None, repr=False)

    def project(self, x: torch.Tensor, qr: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                flat_cache: torch.Tensor, slots: torch.Tensor, k_raw: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D], qr [T, q_lora_rank] (MLA's normed query down-projection), rope (cos, sin) [T, R/2]
        -> (q [T, Hi, Di], w fp32 [T, Hi]); writes each token's key into flat_cache [slots, L+R:].
        k_raw: x @ wk^T when the caller computed it (MLA.down stacks wk into its GEMM)."""
        a, kb = self.args, self.kb
        t, hi, di = x.shape[0], a.index_n_heads, a.index_head_dim
        k_raw = kb.linear(x, self.wk) if k_raw is None else k_raw
        if self.fp8 and self._h is None:
            self._h = hadamard(di, x.device)
        index_qk = getattr(kb, "dsa_index_qk", reference_dsa.dsa_index_qk)
        q = index_qk(kb.linear(qr, self.wq_b).view(t, hi, di), k_raw, rope[0], rope[1], self.k_norm,
                     self.k_norm_bias, 1e-6, self._h if self.fp8 else None, flat_cache, a.kv_dim, slots)
        w = F.linear(x.float(), self.weights_proj.dense(torch.float32)) * hi ** -0.5
        return q, w


def sparse_attend(mla, q, batch, cache_layer: torch.Tensor) -> torch.Tensor:
    """ATTN-1's core under DSA: q (MLA's Queries, q.index = the indexer's (q, w)), cache_layer
    [pages, page, C] -> [T, H, V] (before wo). Every token attends in the absorbed form, prefill too
    (as FlashMLA's sparse prefill does): K chosen latents, not the whole context. The backend's
    dsa_index_select / dsa_paged_select (decode) / sparse_mla run when it has them (kernels/native_dsa.py), else the reference's."""
    a, kb, page = mla.args, mla.kb, cache_layer.shape[1]
    select = getattr(kb, "dsa_index_select", reference_dsa.dsa_index_select)
    attend = getattr(kb, "sparse_mla", reference_dsa.sparse_mla)
    flat = cache_layer.view(-1, cache_layer.shape[-1])
    iq, iw = q.index
    w_uk, w_uv = mla.absorbed(q.q_nope.dtype)
    if batch.is_decode_only:     # B rows of S = n_q queries; query j of row b sees seq_lens[b] - S + j + 1
        s_q, dev = batch.n_q, cache_layer.device
        lens = (batch.seq_lens.long()[:, None] - s_q + 1 + torch.arange(s_q, device=dev)).flatten()
        paged = getattr(kb, "dsa_paged_select", reference_dsa.dsa_paged_select)
        rows = paged(iq, iw, cache_layer, a.kv_dim, batch.block_tables, lens, s_q, a.index_topk)
        o_lat = attend(q.q_lat, flat, rows, a.softmax_scale, a.kv_lora_rank)
        return torch.einsum("thl,hvl->thv", o_lat, w_uv)
    out = q.q_nope.new_zeros(q.q_nope.shape[0], a.n_heads, a.v_head_dim)
    for i, (n, c) in enumerate(zip(batch.seq_new, batch.seq_ctx)):
        if n == 0:
            continue
        total, s = c + n, slice(batch.starts[i], batch.starts[i] + n)
        pages = batch.block_tables[i, : math.ceil(total / page)].long()
        slots = (pages[:, None] * page + torch.arange(page, device=pages.device)).flatten()[:total]   # [N]
        lens = torch.arange(c + 1, total + 1, device=slots.device)
        idx, ok = select(iq[s], iw[s], flat[:, a.kv_dim:][slots][None], lens, a.index_topk)
        q_lat = torch.cat([torch.einsum("thp,hpl->thl", q.q_nope[s], w_uk), q.q_pe[s]], -1)
        o_lat = attend(q_lat, flat, torch.where(ok, slots[idx], -1), a.softmax_scale, a.kv_lora_rank)
        out[s] = torch.einsum("thl,hvl->thv", o_lat, w_uv)
    return out
