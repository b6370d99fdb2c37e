"""Pure topology maps of a unit: ranks on nodes, expert slots on ranks, replica choice.

Legend (EPLB's mapping algebra): phy2log[layer, slot] = logical expert held by a
physical slot; log2phy[layer, expert, k] = slot of its k-th replica (-1 padded);
logcnt[layer, expert] = its number of replicas. Slot s lives on rank
s // slots_per_rank; rank r on node r // gpus_per_node.
Never: imports Ray or touches devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UnitShape:
    nodes_per_unit: int
    gpus_per_node: int
    n_routed_experts: int
    redundant_experts: int = 0

    def __post_init__(self):
        if self.nodes_per_unit < 1 or self.gpus_per_node < 1:
            raise ValueError(f"unit shape {self.nodes_per_unit}x{self.gpus_per_node} must have >= 1 node and GPU")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts={self.redundant_experts} must be >= 0")
        if self.n_slots % self.n_ranks:
            raise ValueError(f"{self.n_routed_experts} experts + {self.redundant_experts} redundant = "
                             f"{self.n_slots} slots do not divide over {self.n_ranks} ranks; "
                             f"choose redundant_experts so the sum is a multiple of {self.n_ranks}")

    @property
    def n_ranks(self) -> int:
        return self.nodes_per_unit * self.gpus_per_node

    @property
    def n_slots(self) -> int:
        return self.n_routed_experts + self.redundant_experts

    @property
    def slots_per_rank(self) -> int:
        return self.n_slots // self.n_ranks

    def node_of_rank(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def slots_of_rank(self, rank: int) -> range:
        return range(rank * self.slots_per_rank, (rank + 1) * self.slots_per_rank)


def initial_phy2log(n_layers: int, n_experts: int, n_slots: int) -> torch.Tensor:
    """Experts in order, redundant slots cycling from expert 0: [n_layers, n_slots] int64."""
    return (torch.arange(n_slots) % n_experts).repeat(n_layers, 1)


def maps_from_phy2log(phy2log: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [L, S] -> (log2phy [L, E, X] padded -1, logcnt [L, E])."""
    n_layers, n_slots = phy2log.shape
    logcnt = torch.zeros(n_layers, n_experts, dtype=torch.long)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    width = max(int(logcnt.max()), 1)
    log2phy = torch.full((n_layers, n_experts, width), -1, dtype=torch.long)
    order = torch.argsort(phy2log * n_slots + torch.arange(n_slots), dim=1)  # slots grouped by expert
    for layer in range(n_layers):
        sorted_exp = phy2log[layer, order[layer]]
        first = torch.searchsorted(sorted_exp, sorted_exp, right=False)
        rank_in_expert = torch.arange(n_slots) - first
        log2phy[layer, sorted_exp, rank_in_expert] = order[layer]
    return log2phy, logcnt


def choose_replicas(idx: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                    slot_node: torch.Tensor | None = None, my_node: int | None = None) -> torch.Tensor:
    """Pick one physical slot for each (token, expert) pair.

    idx [T, K] logical experts of one layer; log2phy [E, X]; logcnt [E] -> slots [T, K].
    A replica on the sender's node is preferred (slot_node [S] gives each slot's node);
    among the candidates, token t takes candidate t mod count, spreading tokens evenly.
    Runs on the device without a host sync; every expert must have a replica (ExpertMap checks
    that once when a placement is built).
    """
    t = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1).expand_as(idx)
    cand = log2phy[idx]                                    # [T, K, X]
    valid = cand >= 0
    if slot_node is not None and my_node is not None:
        local = valid & (slot_node[cand.clamp(min=0)] == my_node)
        has_local = local.any(-1, keepdim=True)
        valid = torch.where(has_local, local, valid)
    n_valid = valid.sum(-1).clamp(min=1)                   # [T, K]; every expert is placed (ExpertMap checks)
    pick = t % n_valid                                     # which valid candidate
    order = torch.cumsum(valid.long(), -1) - 1             # rank of each valid candidate
    chosen = valid & (order == pick.unsqueeze(-1))
    return (cand * chosen).sum(-1)
