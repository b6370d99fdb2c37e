"""The MoE seam: where a layer's (token, expert) pairs meet the experts that serve them.

`ExpertShard` holds one rank's expert slots of one layer (stacked weights, kernels/reference.py's
ExpertWeights). A `Dispatcher` routes each (token, expert) pair to one replica slot and brings
the weighted results back: `LocalDispatcher` when every slot is on this rank (one rank, the test
oracle); model/ep_dispatch.py's all-to-all version across a unit's ranks. Both count routed
tokens per logical expert per layer for the expert balancer.

Two local paths: `run` (rows in the contiguous layout, any step) and `run_static` (the masked
layout [slots, tokens in whole 128-row tiles, D]: fixed shapes and no host sync, what a decode step replays inside a
CUDA graph; padded rows of the graph's bucket route nowhere and are not counted).
"""
from __future__ import annotations

import contextlib
from types import ModuleType

import torch

from epserve.kernels.layouts import masked_layout
from epserve.kernels.reference import ExpertWeights, Weight
from epserve.placement.topology import choose_replicas, maps_from_phy2log

MASKED_ROWS_ALIGN = 128        # rows per group of a masked-layout buffer come in whole GEMM tiles


def masked_route(idx: torch.Tensor, valid: torch.Tensor, log2phy: torch.Tensor, slot_node: torch.Tensor | None,
                 my_node: int | None, first_slot: int, n_slots: int, per_group: int, counts: torch.Tensor,
                 floor: torch.Tensor | None = None, received: torch.Tensor | None = None):
    """kernels/triton_routing.py's masked_route as torch ops (its contract, and the path off CUDA):
    choose_replicas, then masked_layout, then the rows' scatter. -> (src, pair_row, masked_m)."""
    t, k = idx.shape
    ones = valid[:, None].expand_as(idx).long()
    counts.scatter_add_(0, idx.flatten(), ones.flatten())
    local = choose_replicas(idx, log2phy, None, slot_node, my_node) - first_slot
    local = torch.where(valid[:, None] & (local < n_slots), local, -1).flatten()
    lay = masked_layout(local, n_slots, t)
    flat = torch.where(lay.keep, lay.group * per_group + lay.slot, -1)
    tok = torch.arange(t * k, device=idx.device) // k
    # filled by a row gather (a scatter of ints inverts the map; rows no pair lands on read token 0
    # and are past masked_m, so never used): an index_put of the rows would run element by element.
    # Dropped pairs scatter into one spare row past the buffer.
    spare = n_slots * per_group
    src = torch.zeros(spare + 1, dtype=torch.long, device=idx.device).scatter_(
        0, torch.where(flat >= 0, flat, spare), tok)[:spare]
    masked_m = lay.masked_m if floor is None else torch.maximum(lay.masked_m, floor.to(lay.masked_m.dtype))
    if received is not None:
        received += masked_m
    return src, flat, masked_m


class ExpertShard:
    """This rank's slots of one MoE layer; `experts` is None until the checkpoint fills it."""

    def __init__(self, experts: ExpertWeights | None = None):
        self.experts = experts

    @classmethod
    def from_weights(cls, slots: list[dict[str, Weight]], device=None) -> "ExpertShard":
        """Stack per-slot {w1, w3, w2} Weights (all of one kind) into one shard."""
        w = slots[0]
        ex = ExpertWeights.empty(len(slots), w["w1"].shape[0], w["w1"].shape[1], w["w1"],
                                 device if device is not None else w["w1"].w.device)
        for j, s in enumerate(slots):
            ex.set_slot(j, s["w1"], s["w3"], s["w2"])
        return cls(ex)

    @property
    def n_slots(self) -> int:
        return 0 if self.experts is None else self.experts.n_slots

    def slot_weights(self, j: int) -> dict[str, Weight]:
        return self.experts.slot(j)

    def compute(self, kb: ModuleType, x, local_slot: torch.Tensor) -> torch.Tensor:
        """x [M, D] (or FP8 rows (q, s) as dispatched), local_slot int64 [M] (-1 = padding row, gives 0) -> [M, D]."""
        rows = x[0] if isinstance(x, tuple) else x
        if rows.shape[0] == 0 or not self.n_slots:
            return torch.zeros(rows.shape, dtype=torch.bfloat16 if isinstance(x, tuple) else x.dtype, device=rows.device)
        return kb.expert_ffn(x, self.experts, local_slot)


class ExpertMap:
    """phy2log of every MoE layer (indexed by MoE layer number) with derived maps."""

    def __init__(self, phy2log: torch.Tensor, n_experts: int, n_ranks: int, gpus_per_node: int):
        if phy2log.shape[1] % n_ranks:
            raise ValueError(f"{phy2log.shape[1]} slots do not divide over {n_ranks} ranks")
        self.phy2log = phy2log.clone()
        self.n_experts, self.n_ranks = n_experts, n_ranks
        self.slots_per_rank = phy2log.shape[1] // n_ranks
        self.log2phy, self.logcnt = maps_from_phy2log(self.phy2log, n_experts)
        missing = (self.logcnt == 0).nonzero()
        if missing.numel():   # checked once here, so routing never has to (it runs without a host sync)
            layer, expert = missing[0].tolist()
            raise ValueError(f"placement has no replica of expert {expert} in MoE layer {layer}")
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

    def route(self, layer: int, idx: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """idx [T, K] logical experts -> slots [T, K]; counts the pairs of valid tokens (no sync)."""
        m = layer - self.first
        if self.counts.device != idx.device:
            self.counts = self.counts.to(idx.device)
        ones = torch.ones_like(idx) if valid is None else valid[:, None].expand_as(idx).long()
        self.counts[m].scatter_add_(0, idx.flatten(), ones.flatten())
        log2phy, logcnt, slot_node = self.map.tables(idx.device)
        return choose_replicas(idx, log2phy[m], logcnt[m], slot_node, self.node)

    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
            shard: ExpertShard) -> torch.Tensor:
        """x [T, D], idx/weights [T, K] -> sum_k weights[t, k] * expert_{idx[t, k]}(x[t])."""
        slots = self.route(layer, idx)
        t, k = idx.shape
        rows = x[torch.arange(t * k, device=x.device) // k]
        y = shard.compute(self.kb, rows, slots.flatten() - self.rank * self.map.slots_per_rank)
        return self.kb.combine_rows(y, weights)

    def run_static(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                   shard: ExpertShard, valid: torch.Tensor) -> torch.Tensor:
        """run() through the masked layout with fixed shapes: x [T, D], valid bool [T] (False: a
        padding row of a CUDA-graph bucket: routed nowhere, not counted, output 0)."""
        t, k = idx.shape
        d = x.shape[1]
        if t == 0:        # an empty micro-batch (a one-row step's second half): no row to gather from
            return x.new_zeros(0, d)
        # at most t rows a group (a token picks a slot once), padded to whole 128-row tiles: DeepGEMM's
        # masked GEMM stores whole tiles, so a group's last tile must not reach into the next group's rows
        per_group = -(-t // MASKED_ROWS_ALIGN) * MASKED_ROWS_ALIGN
        src, pair_row, masked_m = self.masked_rows(layer, idx, valid, shard.n_slots, per_group)
        buf = x[src].view(shard.n_slots, per_group, d)
        y = self.kb.expert_ffn_masked(buf, shard.experts, masked_m, max(1, t * k // max(1, shard.n_slots)))
        # each token reads its K rows straight out of the GEMM's buffer (a dropped pair's row is never read)
        return self.kb.combine_rows(y.view(-1, d), weights, pair_row)

    def masked_rows(self, layer: int, idx: torch.Tensor, valid: torch.Tensor, n_slots: int, per_group: int,
                    floor: torch.Tensor | None = None, received: torch.Tensor | None = None):
        """Where a fixed-shape step's (token, expert) pairs land in a masked-layout buffer of n_slots
        groups of per_group rows (route(), then masked_layout; pairs of padding rows land nowhere).
        floor [n_slots]: raise each group's row count to it (the emulated rank's peer rows);
        received [n_slots] int64: add the row counts into it. The backend's `masked_route` does it in
        one kernel where it has one (kernels/triton_routing.py), else this module's masked_route.
        -> (src [n_slots * per_group]: the token each buffer row reads, 0 where no pair lands (rows
        past masked_m are never read back); pair_row [T * K]: each pair's row, -1 dropped; masked_m)."""
        m = layer - self.first
        if self.counts.device != idx.device:
            self.counts = self.counts.to(idx.device)
        log2phy, _, slot_node = self.map.tables(idx.device)
        args = (idx, valid, log2phy[m], slot_node, self.node, self.rank * self.map.slots_per_rank, n_slots, per_group,
                self.counts[m], floor, received)
        fused = getattr(self.kb, "masked_route", None)
        got = fused(*args) if fused is not None else None
        return got if got is not None else masked_route(*args)

    def step_mode(self, low_latency: bool):
        """The kernels of one step (DeepEP's normal or low-latency); nothing to choose here."""
        return contextlib.nullcontext()

    # launch / compute / finish: the split interface of model/ep_dispatch.py (here nothing is in flight)
    def launch(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
               valid: torch.Tensor | None = None):
        return (layer, x, idx, weights, valid)

    def compute(self, ex, shard: ExpertShard) -> torch.Tensor:
        layer, x, idx, weights, valid = ex
        return self.run(layer, x, idx, weights, shard) if valid is None else \
            self.run_static(layer, x, idx, weights, shard, valid)

    def finish(self, ex) -> torch.Tensor:
        return ex

    def take_counts(self) -> torch.Tensor:
        """Tokens per logical expert per MoE layer since the last call [n_moe, E]; resets in place
        (a captured CUDA graph keeps adding into the same tensor)."""
        c = self.counts.cpu().clone()
        self.counts.zero_()
        return c
