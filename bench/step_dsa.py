"""V3.2's attention pieces in bench step's one layer: the indexer's random weights, and the stages
of sparse attention timed on their own (bench/step.py `_layer_ms` adds them when `a.is_dsa`).

Owns: `attach_indexer` (random FP8 indexer weights on an MLA built by bench/step.py `build_layer`) and
`dsa_parts` (the per-layer stages of V3.2's attention, as zero-argument callables):
  attention.core        model/dsa.py `sparse_attend` itself: index scores, top-k, sparse MLA, W_UV
  attention.indexer     the lightning indexer: its projections, RoPE, key write into the cache, the
                        ReLU-weighted scores over every visible key and the top-k choice
  attention.sparse_mla  MLA over the K chosen latents per query alone (the backend's `sparse_mla`)
The indexer and sparse MLA stages call the same backend functions `sparse_attend` calls, on the keys
and rows it gathers (the gathers are repeated here, line for line, so each half can be timed apart).
Never: changes the model's math or builds a batch (bench/step.py `make_batch` does, with rows
`a.cache_dim` wide: latent | index key).
"""
from __future__ import annotations

import math

import torch

from epserve.bench.kernels import rand_fp8_weight
from epserve.kernels import reference_dsa
from epserve.kernels.reference import Weight
from epserve.model.dsa import sparse_attend


def attach_indexer(mla, a, dev, g) -> None:
    """Gives mla.indexer (made empty by MLA when a.is_dsa) random weights of V3.2's shapes: wq_b
    [Hi*Di, q_lora_rank] and wk [Di, D] FP8 with 128x128 scales, weights_proj [Hi, D] unquantised."""
    ix, hi, di = mla.indexer, a.index_n_heads, a.index_head_dim
    ix.wq_b = rand_fp8_weight(hi * di, a.q_lora_rank, dev, g)
    ix.wk = rand_fp8_weight(di, a.dim, dev, g)
    ix.k_norm = torch.ones(di, device=dev, dtype=torch.bfloat16)
    ix.k_norm_bias = torch.zeros(di, device=dev, dtype=torch.bfloat16)
    ix.weights_proj = Weight(torch.randn(hi, a.dim, device=dev, generator=g) / a.dim ** 0.5)     # fp32, as loaded


def dsa_parts(mla, kb, batch, cache: torch.Tensor, xn: torch.Tensor, rope) -> tuple:
    """((name, fn), ...) for the three stages above; xn [T, D] the layer's normed input, cache
    [pages, page, C]. Runs MLA's projections once first (their outputs are the stages' inputs)."""
    a, page = mla.args, cache.shape[1]
    select = getattr(kb, "dsa_index_select", reference_dsa.dsa_index_select)
    attend = getattr(kb, "sparse_mla", reference_dsa.sparse_mla)
    flat = cache.view(-1, cache.shape[-1])
    q = mla.project(xn, batch, rope, cache)
    qr = kb.rms_norm(kb.linear(xn, mla.wq_a), mla.q_norm, a.rms_norm_eps)
    w_uk = mla.absorbed(xn.dtype)[0]

    def project_index():
        return mla.indexer.project(xn, qr, rope, flat, batch.slot_mapping)

    if batch.is_decode_only:       # as sparse_attend: B*S queries, each over its row's whole page table
        s_q, dev = batch.n_q, cache.device
        lens = (batch.seq_lens.long()[:, None] - s_q + 1 + torch.arange(s_q, device=dev)).flatten()
        paged = getattr(kb, "dsa_paged_select", reference_dsa.dsa_paged_select)

        def indexer():
            iq, iw = project_index()
            return [paged(iq, iw, cache, a.kv_dim, batch.block_tables, lens, s_q, a.index_topk)]
        seqs = [(None, None, None, q.q_lat)]
        rows = indexer()
    else:                          # as sparse_attend: one sequence at a time, its keys shared by its queries
        seqs = []
        for i, (n, c) in enumerate(zip(batch.seq_new, batch.seq_ctx)):
            s, total = slice(batch.starts[i], batch.starts[i] + n), c + n
            pages = batch.block_tables[i, : math.ceil(total / page)].long()
            sl = (pages[:, None] * page + torch.arange(page, device=pages.device)).flatten()[:total]
            q_lat = torch.cat([torch.einsum("thp,hpl->thl", q.q_nope[s], w_uk), q.q_pe[s]], -1)
            seqs.append((s, sl, torch.arange(c + 1, total + 1, device=sl.device), q_lat))

        def indexer():
            iq, iw = project_index()
            return [select(iq[s], iw[s], flat[:, a.kv_dim:][sl][None], lens, a.index_topk) for s, sl, lens, _ in seqs]
        rows = [torch.where(ok, sl[idx], -1) for (_, sl, _, _), (idx, ok) in zip(seqs, indexer())]

    def sparse():
        return [attend(q_lat, flat, r, a.softmax_scale, a.kv_lora_rank) for (_, _, _, q_lat), r in zip(seqs, rows)]

    return (("attention.core", lambda: sparse_attend(mla, q, batch, cache)),
            ("attention.indexer", indexer), ("attention.sparse_mla", sparse))
