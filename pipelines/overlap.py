"""Micro-batch planning for communication-computation overlap (issue 7, the pure part).

DeepSeek's prefill splits each batch into two micro-batches so that one computes while
the other's dispatch/combine is in flight; decode runs a five-stage pipeline over two
micro-batches. This module decides the split: state in, plan out. The schedules that
run it on asynchronous collectives are not built yet (see README, "What is not done").

A piece is (sequence index, first new token, end): a long prompt may be split across
the two micro-batches, its first part in micro-batch 0, so that micro-batch 1's part
finds the first part's latents already in the cache (micro-batch 0's attention runs
first in every layer).
"""
from __future__ import annotations

from dataclasses import dataclass

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
