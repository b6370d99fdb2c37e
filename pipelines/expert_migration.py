"""A rank's side of live expert migration: stage new slot weights, then switch at one step.

Staging builds, off the step path, this rank's ExpertShard of every MoE layer under a
new phy2log: a slot whose expert is unchanged keeps its weights; a changed slot takes
the expert from another of this rank's slots or loads it from the checkpoint
(copies from other ranks' slots, which placement/migration.py plans, are not built). Switching swaps the shards and the dispatcher's map together; the unit
supervisor tells every rank to switch before the same step, so every rank routes with
the same map in every exchange. Replicas hold identical weights, so outputs do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.model.checkpoint import LoadOptions, TensorIndex, load_expert
from epserve.model.moe_dispatch import ExpertMap, ExpertShard


@dataclass
class StagedPlacement:
    phy2log: torch.Tensor              # [n_moe, n_slots]
    shards: dict[int, ExpertShard]     # layer -> this rank's new shard
    n_loaded: int                      # experts read from the checkpoint
    n_reused: int


def stage(engine, new_phy2log: torch.Tensor) -> StagedPlacement:
    """Build this rank's shards for `new_phy2log`; runs in a background thread of the rank."""
    args, d = engine.args, engine.dispatcher
    opts = LoadOptions(engine.dtype, engine.spec.fp8_activations, progress=False)
    index = TensorIndex(engine.spec.model_dir)
    shards, loaded, reused = {}, 0, 0
    slots = list(d.map.local_slots(d.rank))
    for layer, blk in enumerate(engine.model.layers):
        if not args.is_moe_layer(layer):
            continue
        m = layer - args.n_dense_layers
        old = blk.ffn.experts
        have = {int(d.map.phy2log[m, s]): i for i, s in enumerate(slots)}
        new, cache = ExpertShard(), {}
        for s in slots:
            e = int(new_phy2log[m, s])
            if e in have:
                w = {"w1": old.w1[have[e]], "w2": old.w2[have[e]], "w3": old.w3[have[e]]}
                reused += 1
            else:
                if e not in cache:
                    cache[e] = load_expert(index, args, layer, e, opts, engine.device)
                    loaded += 1
                w = cache[e]
            new.w1.append(w["w1"])
            new.w2.append(w["w2"])
            new.w3.append(w["w3"])
        shards[layer] = new
    return StagedPlacement(new_phy2log.clone(), shards, loaded, reused)


def switch(engine, staged: StagedPlacement, gpus_per_node: int) -> None:
    """Swap in the staged shards and the new map together (called between two steps)."""
    d = engine.dispatcher
    for layer, shard in staged.shards.items():
        engine.model.layers[layer].ffn.experts = shard
    d.map = ExpertMap(staged.phy2log, d.map.n_experts, d.map.n_ranks, gpus_per_node)
