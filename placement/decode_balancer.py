"""Decode load balancer: which DP rank of which decode unit holds a request's KV and decodes it.

SEED "Three load balancers", 2: core-attention compute follows KV-cache use and
dispatch send volume follows request count. Objective: equal KV-cache use per
GPU and equal request count per GPU. Hard rule: never place a request on a rank
with fewer free KV blocks than it needs.

Pure: live `RankStats` in, a `RankRef` (or None) out; no Ray, no I/O, no clock.
The router picks the decode rank at admission (DESIGN "Load balancers"), so the
rank can reserve its blocks before prefill pushes the KV to it.
"""
from __future__ import annotations

import dataclasses

from epserve.messages import RankRef, RankStats
from epserve.placement.prefill_balancer import NoRankAvailable, eligible_ranks, pick_min_max

__all__ = ["NoRankAvailable", "apply_decode_choice", "kv_used_fraction", "pick_decode_rank", "with_bookings"]


def kv_used_fraction(used_blocks: int, total_blocks: int) -> float:
    """Fraction of a rank's KV blocks in use; a rank without blocks counts as full (1.0)."""
    return used_blocks / total_blocks if total_blocks > 0 else 1.0


def pick_decode_rank(stats: list[RankStats], kv_blocks_needed: int) -> RankRef | None:
    """Choose the (unit, rank) to decode a request that needs kv_blocks_needed 64-token blocks.

    stats: one RankStats per DP rank of every decode unit. Dead or draining ranks
    are skipped; so is every rank with kv_blocks_free < kv_blocks_needed. The
    choice minimises the resulting max over ranks of the normalised (KV fraction
    used, request count); ties go to the rank that ends least loaded, then fewest
    requests, then lowest (unit, rank).

    Returns None when live ranks exist but none has room (over capacity: queue or
    429). Raises NoRankAvailable when no rank is alive and undrained (an outage),
    ValueError when kv_blocks_needed < 0.
    """
    if kv_blocks_needed < 0:
        raise ValueError(f"kv_blocks_needed={kv_blocks_needed} must be >= 0")
    live = eligible_ranks(stats, "decode")
    before = [(kv_used_fraction(s.kv_blocks_used, s.kv_blocks_total), float(s.n_requests)) for s in live]
    after = [
        (kv_used_fraction(s.kv_blocks_used + kv_blocks_needed, s.kv_blocks_total), s.n_requests + 1.0)
        for s in live
    ]
    fits = [s.kv_blocks_free >= kv_blocks_needed for s in live]
    ties = [(s.n_requests, s.unit, s.rank) for s in live]
    i = pick_min_max(before, after, fits, ties)
    return None if i is None else live[i].ref


def apply_decode_choice(stats: list[RankStats], ref: RankRef, kv_blocks_needed: int) -> list[RankStats]:
    """stats with the request booked on `ref`: its blocks reserved and one more waiting request.

    Lets a router place a batch in a loop before fresh stats arrive; the input
    list is not modified. ValueError when ref is not in stats or lacks the free
    blocks (booking it would over-commit the rank's KV cache).
    """
    if kv_blocks_needed < 0:
        raise ValueError(f"kv_blocks_needed={kv_blocks_needed} must be >= 0")
    out, found = [], False
    for s in stats:
        if s.ref == ref:
            found = True
            if s.kv_blocks_free < kv_blocks_needed:
                raise ValueError(
                    f"{ref} has {s.kv_blocks_free} free KV blocks, fewer than the {kv_blocks_needed} needed"
                )
            s = dataclasses.replace(
                s, n_waiting=s.n_waiting + 1, kv_blocks_used=s.kv_blocks_used + kv_blocks_needed
            )
        out.append(s)
    if not found:
        raise ValueError(f"{ref} is not among the {len(stats)} decode ranks in stats")
    return out


def with_bookings(stats: list[RankStats], booked: dict[RankRef, tuple[int, int]]) -> list[RankStats]:
    """The ranks' reported stats raised to what the router has booked on them: (pages, requests).

    A rank reports the pages it has allocated; a request the router admitted is still in prefill
    (not on its decode rank yet) or decoding into pages it has not allocated yet. The router books
    each admitted request's whole budget until it is released, so a decode rank's commitment is
    at least its bookings; taking the max with the report also covers requests the router does
    not know (sent before a router restart, or by a direct caller). Without this every refresh
    would forget the requests in flight and hand their pages out again.
    """
    out = []
    for s in stats:
        pages, n = booked.get(s.ref, (0, 0))
        if pages > s.kv_blocks_used or n > s.n_requests:
            s = dataclasses.replace(s, kv_blocks_used=max(s.kv_blocks_used, pages),
                                    n_waiting=max(s.n_waiting, n - s.n_running))
        out.append(s)
    return out
