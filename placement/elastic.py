"""Elastic expert parallelism: who a unit is after a rank dies or a replacement joins, and where
every logical expert lives then. Pure: state in, decision out (no Ray, no I/O, no clock).

The live supervisor (actors/unit_elastic.py) and tests call these; DESIGN.md "Units and ranks"
has the rule: a dead rank costs its unit as little as possible, a whole-unit rebuild is the
fallback. Legend (EPLB's algebra, placement/eplb.py): phy2log [L, R] is the logical expert of
every physical slot of every MoE layer, slot s lives on rank s // spr (spr: slots per rank).

Shrink (a rank died), worked example: 3 ranks, spr 4, 8 experts, 4 redundant slots, layer 0
  phy2log = [0 1 2 3 | 4 5 6 7 | 0 1 4 5]      rank 1 dies
  kept    = [0 1 2 3 | 0 1 4 5]                 survivors 0 and 2, renumbered 0 and 1
  missing = {6, 7}; the slots of experts with a spare replica (0 and 1 twice) take them:
  shrunk  = [6 7 2 3 | 0 1 4 5]                 every expert has one live replica again
Survivors keep their slots where they can (a slot that changes is one expert read from disk);
when a layer has more distinct experts than the survivors have slots, there is no shrunk
placement (None) and the unit falls back to the rebuild.

Grow (a replacement joined as the last rank): its spr new slots take replicas of the experts
with the most load per replica, as EPLB's replication step does, so the unit is back to full
speed without moving any survivor's slot; the EPLB controller rebalances later as usual.

EPLB on a shrunk unit (no replacement yet, or none coming): `member_shape` is the shape EPLB
places over, the members' slots only, so a long-lived shrunk unit still rebalances.
Never: decides when a rank is dead (the supervisor sees the process gone), or moves weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Membership:
    """A unit's ranks after a change. survivors: old rank indices in their new order (new rank i
    was old rank survivors[i]); dead: old indices gone."""

    survivors: tuple[int, ...]
    dead: tuple[int, ...]

    @property
    def n_ranks(self) -> int:
        return len(self.survivors)

    def new_rank(self, old: int) -> int | None:
        return self.survivors.index(old) if old in self.survivors else None


def shrink_membership(n_ranks: int, dead: set[int] | list[int]) -> Membership:
    """The survivors of `n_ranks` ranks once `dead` (old indices) are gone, in old order."""
    bad = [r for r in dead if not 0 <= r < n_ranks]
    if bad:
        raise ValueError(f"dead rank {bad[0]} is not in a unit of {n_ranks} ranks")
    return Membership(tuple(r for r in range(n_ranks) if r not in set(dead)), tuple(sorted(set(dead))))


def _spread(load: torch.Tensor | None, n_layers: int, n_experts: int) -> torch.Tensor:
    """load [L, E] as float64 (uniform 1.0 when none is known)."""
    if load is None:
        return torch.ones(n_layers, n_experts, dtype=torch.float64)
    if tuple(load.shape) != (n_layers, n_experts):
        raise ValueError(f"load has shape {tuple(load.shape)}; expected [{n_layers}, {n_experts}]")
    return load.to(torch.float64) + 1e-9        # an expert never seen still counts (ties: fewer replicas)


def shrink_phy2log(phy2log: torch.Tensor, survivors: tuple[int, ...], slots_per_rank: int, n_experts: int,
                   load: torch.Tensor | None = None) -> torch.Tensor | None:
    """phy2log [L, R] -> [L, len(survivors) * spr] with every logical expert on at least one
    survivor slot, or None when some layer has more experts than the survivors have slots.

    Survivor i keeps old rank survivors[i]'s slots in order; each expert left without a replica
    (heaviest first) takes the slot of the expert with the most replicas (then the least load
    per replica, then the lowest slot), so as few slots change as possible."""
    n_layers = phy2log.shape[0]
    if len(survivors) * slots_per_rank < n_experts:
        return None
    w = _spread(load, n_layers, n_experts)
    cols = [s for r in survivors for s in range(r * slots_per_rank, (r + 1) * slots_per_rank)]
    out = phy2log[:, cols].clone()
    for m in range(n_layers):
        row = out[m]
        cnt = torch.bincount(row, minlength=n_experts)
        missing = sorted((int(e) for e in (cnt == 0).nonzero().flatten()), key=lambda e: (-float(w[m, e]), e))
        for e in missing:
            spare = [s for s in range(row.numel()) if cnt[row[s]] > 1]
            if not spare:
                return None
            s = min(spare, key=lambda s: (-int(cnt[row[s]]), float(w[m, row[s]]) / int(cnt[row[s]]), s))
            cnt[row[s]] -= 1
            row[s] = e
            cnt[e] += 1
    return out


def grow_phy2log(phy2log: torch.Tensor, slots_per_rank: int, n_experts: int,
                 load: torch.Tensor | None = None) -> torch.Tensor:
    """phy2log [L, R] -> [L, R + spr]: a joining rank's slots, appended as the last rank, each a
    replica of the expert with the most load per replica at that point (no expert twice on the
    new rank while another fits; ties: the lowest expert id)."""
    n_layers = phy2log.shape[0]
    w = _spread(load, n_layers, n_experts)
    new = torch.empty(n_layers, slots_per_rank, dtype=phy2log.dtype)
    for m in range(n_layers):
        cnt = torch.bincount(phy2log[m], minlength=n_experts).to(torch.float64)
        here: set[int] = set()
        for j in range(slots_per_rank):
            pool = [e for e in range(n_experts) if e not in here] or list(range(n_experts))
            e = max(pool, key=lambda e: (float(w[m, e]) / max(float(cnt[e]), 1.0), -e))
            new[m, j] = e
            cnt[e] += 1
            here.add(e)
    return torch.cat([phy2log, new], 1)


@dataclass(frozen=True)
class MemberShape:
    """EPLB's shape for the ranks a unit runs on now (rebalance_experts' num_replicas, num_nodes,
    num_gpus). After a change the members are renumbered 0..k-1 and rank r routes as node
    r // gpus_per_node, so k ranks are whole nodes only when gpus_per_node divides k; otherwise
    node-local placement has no whole node to keep experts in, and EPLB places over one node."""

    n_slots: int
    n_nodes: int
    n_ranks: int

    @property
    def gpus_per_node(self) -> int:
        return self.n_ranks // self.n_nodes


def member_shape(n_slots: int, slots_per_rank: int, gpus_per_node: int) -> MemberShape:
    """The shape of a placement over `n_slots` live slots (the width of the unit's current phy2log:
    its members' slots, spr each). Worked example: 2 nodes x 2 GPUs, spr 8, one rank dead ->
    24 slots -> MemberShape(24, 1, 3); two dead -> MemberShape(16, 1, 2)."""
    if slots_per_rank < 1 or gpus_per_node < 1 or n_slots < slots_per_rank or n_slots % slots_per_rank:
        raise ValueError(f"{n_slots} slots are not a whole number (>= 1) of ranks of {slots_per_rank} slots")
    n_ranks = n_slots // slots_per_rank
    return MemberShape(n_slots, n_ranks // gpus_per_node if n_ranks % gpus_per_node == 0 else 1, n_ranks)


def spread_targets(n_ranks: int, n_requests: list[int]) -> list[int]:
    """Where a dead rank's requests go: new rank indices, fewest requests first (ties: lowest
    index); the caller deals them out round-robin in this order."""
    if len(n_requests) != n_ranks:
        raise ValueError(f"{len(n_requests)} request counts for {n_ranks} ranks")
    return sorted(range(n_ranks), key=lambda r: (n_requests[r], r))
