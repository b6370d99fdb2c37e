"""A rank's side of live expert migration: stage new slot weights, then switch at one step.

Staging reads, off the step path, the weights of every slot whose expert changes under a new
phy2log: from another of this rank's slots that holds it (a copy taken now, since that slot
may change too) or from the checkpoint (copies from other ranks' slots, which
placement/migration.py plans, are not built). Unchanged slots are not touched. Switching
copies the staged experts into their slots in place (the stacked tensors keep their
addresses) and swaps the dispatcher's map; the unit tells every rank to switch before the
same step, so every rank routes with the same map in every exchange. Replicas hold identical
weights, so outputs do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.kernels.reference import Weight
from epserve.model.checkpoint import LoadOptions, TensorIndex, load_expert
from epserve.model.moe_dispatch import ExpertMap


@dataclass
class StagedPlacement:
    phy2log: torch.Tensor                                   # [n_moe, n_slots]
    slots: dict[int, dict[int, dict[str, Weight]]]          # layer -> local slot -> its new {w1, w3, w2}
    n_loaded: int                                           # experts read from the checkpoint
    n_reused: int                                           # slots kept or copied from this rank's slots


def _copy(w: dict[str, Weight]) -> dict[str, Weight]:
    return {k: Weight(v.w.clone(), None if v.scale is None else v.scale.clone(), v.act_quant) for k, v in w.items()}


def stage(engine, new_phy2log: torch.Tensor) -> StagedPlacement:
    """This rank's changed slots under `new_phy2log`; runs in a background thread of the rank."""
    args, d = engine.args, engine.dispatcher
    opts = LoadOptions(engine.dtype, engine.spec.fp8_activations, progress=False)
    index = TensorIndex(engine.spec.model_dir)
    staged, loaded, reused = {}, 0, 0
    slots = list(d.map.local_slots(d.rank))
    for layer in range(args.n_kv_layers):           # the MTP layer's experts move with the main ones'
        if not args.is_moe_layer(layer):
            continue
        blk = engine.model.block(layer)
        m = layer - args.n_dense_layers
        shard = blk.ffn.experts
        have = {int(d.map.phy2log[m, s]): j for j, s in enumerate(slots)}
        changes, cache = {}, {}
        for j, s in enumerate(slots):
            e = int(new_phy2log[m, s])
            if int(d.map.phy2log[m, s]) == e:
                reused += 1
                continue
            if e not in cache:
                if e in have:
                    cache[e] = _copy(shard.slot_weights(have[e]))
                    reused += 1
                else:
                    cache[e] = load_expert(index, args, layer, e, opts, "cpu")
                    loaded += 1
            changes[j] = cache[e]
        if changes:
            staged[layer] = changes
    return StagedPlacement(new_phy2log.clone(), staged, loaded, reused)


def switch(engine, staged: StagedPlacement, gpus_per_node: int) -> None:
    """Copy the staged experts into their slots and swap the map (called between two steps)."""
    d = engine.dispatcher
    for layer, changes in staged.slots.items():
        experts = engine.model.block(layer).ffn.experts.experts
        for j, w in changes.items():
            experts.set_slot(j, w["w1"], w["w3"], w["w2"])
    d.map = ExpertMap(staged.phy2log, d.map.n_experts, d.map.n_ranks, gpus_per_node)
    engine.on_placement_switched()
