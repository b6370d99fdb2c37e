"""The unit's per-step agreement as a host collective: an element-wise MAX of a few integers.

gloo's `all_reduce` is a ring: 2 (N - 1) hops one after another, so its latency grows with the
unit (measured on a 16-core host: 0.21 / 0.50 / 0.89 ms at 2 / 4 / 8 ranks, about 17 ms at 144
by that slope). The vote is a handful of integers, so bandwidth is irrelevant and only the number
of hops in a row counts: recursive doubling needs ceil(log2 N) pairwise exchanges (plus one
send in and one out for the ranks above the largest power of two), 9 steps at N = 144.
Built from gloo's own send/recv on the unit's control group; a dead peer makes recv raise (the
connection closes, or the group's timeout passes), as the ring did.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def exchange_steps(world: int) -> int:
    """Hops in a row of one agreement among `world` ranks (the cost model's multiplier):
    log2 of the largest power of two <= world, plus the fold in and out when world is not one."""
    p = 1 << (world.bit_length() - 1)
    return p.bit_length() - 1 + (2 if world > p else 0)


def max_all_reduce(values: torch.Tensor, group, rank: int, world: int) -> torch.Tensor:
    """Element-wise MAX of an int64 vector over the group, in place; every rank gets the result.

    Ranks >= p (the largest power of two <= world) first hand their vector to rank - p and get
    the result back at the end; ranks < p run log2(p) rounds, exchanging with rank XOR 2^i.
    `rank` / `world` are positions in `group` (the control group spans the whole unit)."""
    if world == 1:
        return values
    p = 1 << (world.bit_length() - 1)
    peer_of = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    if rank >= p:
        dist.send(values, peer_of(rank - p), group=group)
        dist.recv(values, peer_of(rank - p), group=group)
        return values
    other = torch.empty_like(values)
    if rank + p < world:
        dist.recv(other, peer_of(rank + p), group=group)
        torch.maximum(values, other, out=values)
    step = 1
    while step < p:
        peer = peer_of(rank ^ step)
        mine = values.clone()                    # values is overwritten below while the send is in flight
        sent = dist.isend(mine, peer, group=group)
        dist.recv(other, peer, group=group)
        sent.wait()
        torch.maximum(values, other, out=values)
        step <<= 1
    if rank + p < world:
        dist.send(values, peer_of(rank + p), group=group)
    return values
