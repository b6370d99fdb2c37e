"""The unit's per-step agreement as a host collective: an element-wise MAX of a few integers.

gloo's `all_reduce` is a ring: 2 (N - 1) hops one after another, so its latency grows with the
unit (measured on a 16-core host: 0.21 / 0.50 / 0.89 ms at 2 / 4 / 8 ranks, about 17 ms at 144
by that slope). The vote is a handful of integers, so bandwidth is irrelevant and only the number
of hops in a row counts: recursive doubling needs ceil(log2 N) pairwise exchanges (plus one
send in and one out for the ranks above the largest power of two), 9 steps at N = 144.
Built from gloo's own send/recv on the unit's control group; a dead peer makes recv raise (the
connection closes, or the group's timeout passes), as the ring did.

Elastic units (actors/rank_elastic.py) run it on a standalone gloo backend (no default group:
the survivors of a death form a fresh one) and need every survivor to leave its agreement when
one rank is gone. A survivor blocked on a live peer that itself failed would otherwise wait for
the group's timeout, so a rank that fails sends every peer the POISON vector (`spread_loss`):
whoever receives it raises PeerLost and spreads it in turn, so all survivors leave within a few
hops of the first one that saw the closed connection.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from epserve.errors import PeerLost

POISON = -(1 << 62)      # every field of a vector sent by a rank that lost a peer (no vote is this low)


def _is_backend(group) -> bool:
    """A standalone backend (an elastic unit's group), called by its own methods and group ranks."""
    return isinstance(group, dist.ProcessGroupGloo)


def _send(values: torch.Tensor, peer: int, group):
    return group.send([values], peer, 0) if _is_backend(group) else dist.isend(values, peer, group=group)


def _recv(values: torch.Tensor, peer: int, group) -> None:
    if _is_backend(group):
        group.recv([values], peer, 0).wait()
    else:
        dist.recv(values, peer, group=group)
    if int(values[0]) == POISON:
        raise PeerLost(f"peer {peer} reported a lost rank")


def spread_loss(group, rank: int, world: int, n_values: int) -> list:
    """Send POISON (n_values long, as the votes are) to every other rank of `group` (a standalone
    backend) -> the sends in flight (keep them: they hold their tensors). Never waits; a send to
    a dead peer fails quietly: the group is abandoned after this."""
    sends = []
    for peer in range(world):
        if peer != rank:
            try:
                sends.append(group.send([torch.full((n_values,), POISON, dtype=torch.long)], peer, 0))
            except Exception:          # that peer is the dead one (or already gone): nothing to tell
                pass
    return sends


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
    if _is_backend(group):
        peer_of = lambda r: r                     # noqa: E731  (a standalone group: its own ranks)
    else:
        peer_of = (lambda r: dist.get_global_rank(group, r)) if group is not None else (lambda r: r)
    if rank >= p:
        _send(values, peer_of(rank - p), group).wait()
        _recv(values, peer_of(rank - p), group)
        return values
    other = torch.empty_like(values)
    if rank + p < world:
        _recv(other, peer_of(rank + p), group)
        torch.maximum(values, other, out=values)
    step = 1
    while step < p:
        peer = peer_of(rank ^ step)
        mine = values.clone()                    # values is overwritten below while the send is in flight
        sent = _send(mine, peer, group)
        _recv(other, peer, group)
        sent.wait()
        torch.maximum(values, other, out=values)
        step <<= 1
    if rank + p < world:
        _send(values, peer_of(rank + p), group).wait()
    return values
