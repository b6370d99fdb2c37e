"""Prefill load balancer: which DP rank of which prefill unit runs a new prompt.

SEED "Three load balancers", 1: DP ranks get different numbers and lengths of
prompts, so core-attention compute and dispatch send volume differ. Objective:
equal core-attention work per GPU and equal input tokens per GPU.

Owns one decision and nothing else. Pure: live `RankStats` in, a `RankRef` out;
no Ray, no I/O, no clock. `serve/router.py` and `fleet/simulator.py` both call it.
The min-max search (`pick_min_max`) is shared with `decode_balancer.py`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from epserve.errors import NoRankAvailable
from epserve.messages import RankRef, RankStats


def attn_work(new_tokens: int, cached_tokens: int) -> float:
    """Core-attention pairs of one prompt: new_tokens * (cached_tokens + new_tokens / 2).

    Each new token attends to every cached token and (causally) to about half of
    the new ones; cached tokens are loaded, not computed, so they add no rows.
    """
    return new_tokens * (cached_tokens + new_tokens / 2)


def eligible_ranks(stats: Sequence[RankStats], role: str) -> list[RankStats]:
    """The alive, non-draining ranks; raises NoRankAvailable when there are none.

    Also rejects a stats list naming one (unit, rank) twice (a router bug).
    """
    refs = [s.ref for s in stats]
    if len(set(refs)) != len(refs):
        dup = next(r for r in refs if refs.count(r) > 1)
        raise ValueError(f"{role} stats name {dup} more than once")
    live = [s for s in stats if s.is_alive and not s.is_draining]
    if not live:
        n_dead = sum(not s.is_alive for s in stats)
        raise NoRankAvailable(role, len(stats), n_dead, len(stats) - n_dead)
    return live


def pick_min_max(
    before: Sequence[tuple[float, ...]],
    after: Sequence[tuple[float, ...]],
    is_candidate: Sequence[bool],
    tie_keys: Sequence[tuple],
) -> int | None:
    """Index of the candidate rank whose choice minimises the largest normalised load.

    before[i] / after[i]: load vector of rank i (D dimensions, e.g. attention work
    and tokens) without / with the new request. Each dimension is divided by its
    mean over all N ranks after the choice, so dimensions are comparable and a
    score reads as an imbalance ratio (1.0 = perfectly even; N = all on one rank).
    Candidates are ordered by (resulting max ratio over ranks and dimensions,
    the candidate's own resulting ratio, tie_keys[i]). None when no candidate.
    O(N * D): the max over the other ranks comes from each dimension's top two.
    """
    n = len(before)
    n_dims = len(before[0]) if n else 0
    tops, sums = [], []
    for d in range(n_dims):
        first, second, arg = -math.inf, -math.inf, -1
        for i, vec in enumerate(before):
            if vec[d] > first:
                first, second, arg = vec[d], first, i
            elif vec[d] > second:
                second = vec[d]
        tops.append((first, second, arg))
        sums.append(math.fsum(vec[d] for vec in before))
    best_key, best_i = None, None
    for i in range(n):
        if not is_candidate[i]:
            continue
        worst = own = 0.0
        for d in range(n_dims):
            mean = (sums[d] - before[i][d] + after[i][d]) / n
            if mean <= 0:
                continue  # nothing anywhere in this dimension: perfectly even
            first, second, arg = tops[d]
            others = second if arg == i else first
            mine = after[i][d] / mean
            own = max(own, mine)
            worst = max(worst, mine, others / mean)
        key = (worst, own, tie_keys[i])
        if best_key is None or key < best_key:
            best_key, best_i = key, i
    return best_i


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")


def pick_prefill_rank(stats: list[RankStats], new_tokens: int, cached_tokens: int) -> RankRef:
    """Choose the (unit, rank) for a prompt of new_tokens uncached + cached_tokens cached tokens.

    stats: one RankStats per DP rank of every prefill unit. Dead or draining
    ranks are skipped. The choice minimises the resulting max over ranks of the
    normalised (pending_attn_work, pending_prefill_tokens); ties go to the rank
    that ends least loaded, then fewest requests, then lowest (unit, rank).
    Raises NoRankAvailable when no rank is eligible, ValueError on negative counts.
    """
    _check_counts(new_tokens=new_tokens, cached_tokens=cached_tokens)
    live = eligible_ranks(stats, "prefill")
    work = attn_work(new_tokens, cached_tokens)
    before = [(s.pending_attn_work, float(s.pending_prefill_tokens)) for s in live]
    after = [(a + work, t + new_tokens) for a, t in before]
    ties = [(s.n_requests, s.unit, s.rank) for s in live]
    return live[pick_min_max(before, after, [True] * len(live), ties)].ref


def apply_prefill_choice(
    stats: list[RankStats], ref: RankRef, new_tokens: int, cached_tokens: int
) -> list[RankStats]:
    """stats with the prompt booked on `ref` (one more waiting request, its tokens and work).

    Lets a router balance a batch of prompts in a loop before fresh stats arrive.
    The input list is not modified. ValueError when ref is not in stats.
    """
    _check_counts(new_tokens=new_tokens, cached_tokens=cached_tokens)
    out, found = [], False
    for s in stats:
        if s.ref == ref:
            found = True
            s = dataclasses.replace(
                s,
                n_waiting=s.n_waiting + 1,
                pending_prefill_tokens=s.pending_prefill_tokens + new_tokens,
                pending_attn_work=s.pending_attn_work + attn_work(new_tokens, cached_tokens),
            )
        out.append(s)
    if not found:
        raise ValueError(f"{ref} is not among the {len(stats)} prefill ranks in stats")
    return out
