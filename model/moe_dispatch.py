"""The MoE seam: where a layer's (token, expert) pairs meet the experts that serve them.

`ExpertShard` holds one rank's expert slots of one layer. A `Dispatcher` routes each
(token, expert) pair to one replica slot and brings the weighted results back:
`LocalDispatcher` when every slot is on this rank (one rank, the test oracle);
model/ep_dispatch.py's all-to-all version across a unit's ranks.
Both count routed tokens per logical expert per layer for the expert balancer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F

from epserve.kernels.reference import Weight
from epserve.placement.topology import choose_replicas, maps_from_phy2log


@dataclass
class ExpertShard:
    """This rank's slots of one MoE layer: weights per local slot (w1 gate, w3 up, w2 down)."""

    w1: list[Weight] = field(default_factory=list)
    w2: list[Weight] = field(default_factory=list)
    w3: list[Weight] = field(default_factory=list)

    def compute(self, kb: ModuleType, x: torch.Tensor, local_slot: torch.Tensor) -> torch.Tensor:
        """x [M, D], local_slot int64 [M] (-1 = padding row, gives 0) -> [M, D]."""
        if x.shape[0] == 0 or not self.w1:
            return torch.zeros_like(x)
        h = F.silu(kb.grouped_linear(x, self.w1, local_slot)) * kb.grouped_linear(x, self.w3, local_slot)
        return kb.grouped_linear(h, self.w2, local_slot)


class ExpertMap:
    """phy2log of every MoE layer (indexed by MoE layer number) with derived maps."""

    def __init__(self, phy2log: torch.Tensor, n_experts: int, n_ranks: int, gpus_per_node: int):
        if phy2log.shape[1] % n_ranks:
            raise ValueError(f"{phy2log.shape[1]} slots do not divide over {n_ranks} ranks")
        self.phy2log = phy2log.clone()
        self.n_experts, self.n_ranks = n_experts, n_ranks
        self.slots_per_rank = phy2log.shape[1] // n_ranks
        self.log2phy, self.logcnt = maps_from_phy2log(self.phy2log, n_experts)
        self.slot_rank = torch.arange(phy2log.shape[1]) // self.slots_per_rank
        self.slot_node = self.slot_rank // gpus_per_node
        self._tables: dict[torch.device, tuple] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log2phy, logcnt, slot_node) on `device`, where the router runs (copied once)."""
        if device not in self._tables:
            self._tables[device] = (self.log2phy.to(device), self.logcnt.to(device), self.slot_node.to(device))
        return self._tables[device]

    def local_slots(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)


class LocalDispatcher:
    """All slots on this rank: pick a replica, compute, weight and sum. No communication."""

    def __init__(self, kb: ModuleType, expert_map: ExpertMap, first_moe_layer: int):
        self.kb, self.map, self.first = kb, expert_map, first_moe_layer
        self.rank, self.node = 0, 0
        n_moe = expert_map.phy2log.shape[0]
        self.counts = torch.zeros(n_moe, expert_map.n_experts, dtype=torch.long)

    def make_shard(self, layer: int) -> ExpertShard:
        return ExpertShard()

    def slots_for(self, layer: int) -> list[int]:
        """Global slot ids this rank holds in `layer`, in local-slot order."""
        return list(self.map.local_slots(self.rank))

    def route(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        m = layer - self.first
        if self.counts.device != idx.device:
            self.counts = self.counts.to(idx.device)
        self.counts[m] += torch.bincount(idx.flatten(), minlength=self.map.n_experts)
        log2phy, logcnt, slot_node = self.map.tables(idx.device)
        return choose_replicas(idx, log2phy[m], logcnt[m], slot_node, self.node)

    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
            shard: ExpertShard) -> torch.Tensor:
        """x [T, D], idx/weights [T, K] -> sum_k weights[t, k] * expert_{idx[t, k]}(x[t])."""
        slots = self.route(layer, idx)
        t, k = idx.shape
        rows = x.repeat_interleave(k, 0)
        y = shard.compute(self.kb, rows, slots.flatten() - self.rank * self.map.slots_per_rank)
        return (y.view(t, k, x.shape[1]) * weights.unsqueeze(-1).to(y.dtype)).sum(1)

    # launch / compute / finish: the split interface of model/ep_dispatch.py (here nothing is in flight)
    def launch(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor):
        return (layer, x, idx, weights)

    def compute(self, ex, shard: ExpertShard) -> torch.Tensor:
        return self.run(*ex, shard)

    def finish(self, ex) -> torch.Tensor:
        return ex

    def take_counts(self) -> torch.Tensor:
        """Tokens per logical expert per MoE layer since the last call [n_moe, E]; resets."""
        c, self.counts = self.counts, torch.zeros_like(self.counts)
        return c.cpu()
