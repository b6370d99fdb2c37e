"""Micro-batch planning for communication-computation overlap (issue 7, the pure part).

DeepSeek's prefill splits each batch into two micro-batches so that one computes while
the other's dispatch/combine is in flight; decode runs a five-stage pipeline over two
micro-batches. `split_two` decides the split (state in, plan out); `forward_overlapped`
runs the prefill schedule on the dispatcher's launch / compute / finish halves
(model/ep_dispatch.py, non-blocking collectives).

A piece is (sequence index, first new token, end): a long prompt may be split across
the two micro-batches, its first part in micro-batch 0, so that micro-batch 1's part
finds the first part's latents already in the cache (micro-batch 0's attention runs
first in every layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epserve.model.deepseek_v3 import Batch, MoE, rms_norm

@dataclass(frozen=True)
class Piece:
    seq: int
    start: int      # offset into the sequence's new tokens
    end: int


def piece_cost(ctx: int, start: int, end: int, attn_weight: float) -> float:
    """Tokens (GEMMs, dispatch volume) plus attn_weight x core-attention pairs of new tokens [start, end)."""
    n = end - start
    return n + attn_weight * n * (ctx + start + (n + 1) / 2)


def split_two(seq_new: list[int], seq_ctx: list[int], attn_weight: float = 1e-3,
              allow_split: bool = True) -> tuple[list[Piece], list[Piece]]:
    """Two micro-batches of about equal cost; every new token is in exactly one piece.

    Greedy heaviest-first onto the lighter side; then, if allowed, the longest piece on the
    heavier side is cut at the token that best balances the two sides.
    """
    order = sorted(range(len(seq_new)), key=lambda i: -piece_cost(seq_ctx[i], 0, seq_new[i], attn_weight))
    sides: list[list[Piece]] = [[], []]
    cost = [0.0, 0.0]
    for i in order:
        if seq_new[i] == 0:
            continue
        side = 0 if cost[0] <= cost[1] else 1
        sides[side].append(Piece(i, 0, seq_new[i]))
        cost[side] += piece_cost(seq_ctx[i], 0, seq_new[i], attn_weight)
    heavy = 0 if cost[0] > cost[1] else 1
    if allow_split and sides[heavy]:
        big = max(sides[heavy], key=lambda p: p.end - p.start)
        cut = _balancing_cut(big, seq_ctx[big.seq], cost, heavy, attn_weight)
        if cut is not None:
            sides[heavy].remove(big)
            head, tail = Piece(big.seq, big.start, cut), Piece(big.seq, cut, big.end)
            sides[0].append(head)     # the head always runs in micro-batch 0: the tail needs its latents
            sides[1].append(tail)
    return sides[0], sides[1]


def _balancing_cut(big: Piece, ctx: int, cost: list[float], heavy: int, w: float) -> int | None:
    """Cut point k in (start, end) minimising |cost0 - cost1| after moving one part of `big` across:
    the tail to micro-batch 1 when micro-batch 0 is heavy, the head to micro-batch 0 otherwise."""
    base = [cost[0], cost[1]]
    base[heavy] -= piece_cost(ctx, big.start, big.end, w)
    best_k, best = None, abs(cost[0] - cost[1])
    for k in range(big.start + 1, big.end):
        c0 = base[0] + piece_cost(ctx, big.start, k, w)
        c1 = base[1] + piece_cost(ctx, k, big.end, w)
        if abs(c0 - c1) < best:
            best_k, best = k, abs(c0 - c1)
    return best_k


def sub_batches(batch: Batch) -> tuple[list[Batch], list[list[tuple[int, int]]]]:
    """The step's two micro-batches as Batches, and for each, (row in its logits, sequence) of
    the pieces that end a sequence (their last token's logits are the step's output)."""
    mb_pieces = split_two(batch.seq_new, batch.seq_ctx)
    starts = [0] + torch.tensor(batch.seq_new, dtype=torch.long).cumsum(0).tolist()
    out, ends = [], []
    for pieces in mb_pieces:
        if not pieces:
            out.append(Batch.empty())
            ends.append([])
            continue
        rows = torch.cat([torch.arange(starts[p.seq] + p.start, starts[p.seq] + p.end) for p in pieces])
        rows = rows.to(batch.input_ids.device)
        out.append(Batch(batch.input_ids[rows], batch.positions[rows], [p.end - p.start for p in pieces],
                         [batch.seq_ctx[p.seq] + p.start for p in pieces], batch.block_tables[[p.seq for p in pieces]],
                         batch.slot_mapping[rows], batch.force_naive))
        ends.append([(j, p.seq) for j, p in enumerate(pieces) if p.end == batch.seq_new[p.seq]])
    return out, ends


def forward_overlapped(model, batch: Batch, kv_cache: torch.Tensor) -> torch.Tensor:
    """Two-micro-batch forward: one micro-batch's dispatch/combine is in flight while the other
    computes. Per MoE layer: attn(0), launch dispatch(0) | attn(1), launch dispatch(1) |
    experts(0), launch combine(0) | experts(1), launch combine(1) | and micro-batch 0's combine
    is finished (with its shared expert) only when its next attention needs it, while 1's flies.
    Same logits as model.forward: every token sees the same math. -> logits fp32 [B, vocab]."""
    a = model.args
    mbs, ends = sub_batches(batch)
    h = [model.embed[b.input_ids].to(model.dtype) for b in mbs]
    rope = [model.rope(b.positions) for b in mbs]
    pending: list = [None, None]

    def land(j):                      # finish micro-batch j's combine and add its MoE output
        ffn, x, ex = pending[j]
        shared = ffn.shared.forward(x) if ffn.shared is not None else 0
        h[j] = h[j] + ffn.dispatcher.finish(ex) + shared
        pending[j] = None

    with torch.inference_mode():
        for i, blk in enumerate(model.layers):
            for j in (0, 1):
                if pending[j] is not None:
                    land(j)
                h[j] = h[j] + blk.attn.forward(rms_norm(h[j], blk.attn_norm, a.rms_norm_eps), mbs[j], rope[j],
                                               kv_cache[i])
                x = rms_norm(h[j], blk.ffn_norm, a.rms_norm_eps)
                if isinstance(blk.ffn, MoE):
                    w, idx = blk.ffn.gate.forward(x)
                    pending[j] = (blk.ffn, x, blk.ffn.dispatcher.launch(i, x, idx, w))
                else:
                    h[j] = h[j] + blk.ffn.forward(x)
            for j in (0, 1):
                if pending[j] is not None:
                    ffn, x, ex = pending[j]
                    pending[j] = (ffn, x, ffn.dispatcher.compute(ex, ffn.experts))
        for j in (0, 1):
            if pending[j] is not None:
                land(j)
        logits = torch.empty(len(batch.seq_new), a.vocab_size, dtype=torch.float32, device=model.device)
        for j in (0, 1):
            if not ends[j]:
                continue
            last = mbs[j].last_token_index[[r for r, _ in ends[j]]]
            hj = rms_norm(h[j][last], model.norm, a.rms_norm_eps)
            logits[[s for _, s in ends[j]]] = F.linear(hj, model.head.to(hj.dtype)).float()
    return logits
