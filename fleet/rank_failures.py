"""Rank failures in the fleet simulator: what a decode rank's death costs its unit under elastic EP
(placement/elastic.py decides, as the live supervisor does) against today's whole-unit rebuild,
both timed by fleet/recovery_model.py.

Pure (no Ray, no I/O, no clock); fleet/simulator.py calls `failure_events` after its replay. Per
event (n deaths spread evenly over the run, each of a random rank of a random decode unit running at
that time, from a seeded rng):
 1. the unit's placement: EPLB (placement/eplb.py) on a synthetic load of the scenario's
    `eplb_layers` layers (lognormal expert hotness, as the simulator's expert-balance estimate);
 2. shrink_membership and shrink_phy2log (weighted by that load) decide: the survivors and their
    map, or None (they cannot hold every expert: the unit rebuilds, as the live unit falls back);
 3. a survivor reads from disk the experts of its slots whose expert changed; survivors load in
    parallel, so the busiest one sets the reload time. Counts on the synthetic layers are scaled to
    the model's MoE layers (RecoveryAssumptions.n_moe_layers; assumption: the synthetic layers'
    hotness is typical of every layer);
 4. recovery_times gives each path's stall; GPU-seconds with no token out = stalled ranks x stall
    (elastic: the survivors; rebuild: every rank of the unit).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from epserve.fleet.recovery_model import RecoveryAssumptions, recovery_times
from epserve.placement import eplb
from epserve.placement.elastic import shrink_membership, shrink_phy2log


def decide(phy2log: torch.Tensor, dead: int, slots_per_rank: int, n_experts: int, load: torch.Tensor) -> dict:
    """One death in a unit routing with phy2log [L, R] -> {"decision": "shrink" | "rebuild",
    "n_ranks": ranks after, "reloads": [experts each survivor reads, per survivor] (empty on rebuild)}."""
    n_ranks = phy2log.shape[1] // slots_per_rank
    mem = shrink_membership(n_ranks, [dead])
    new = shrink_phy2log(phy2log, mem.survivors, slots_per_rank, n_experts, load)
    if new is None:
        return {"decision": "rebuild", "n_ranks": n_ranks, "reloads": []}
    spr = slots_per_rank
    reloads = [int((new[:, i * spr:(i + 1) * spr] != phy2log[:, r * spr:(r + 1) * spr]).sum())
               for i, r in enumerate(mem.survivors)]
    return {"decision": "shrink", "n_ranks": mem.n_ranks, "reloads": reloads}


def failure_events(sc, decode_units_at, n_failures: int, rng: np.random.Generator,
                   assumptions: RecoveryAssumptions = RecoveryAssumptions()) -> dict:
    """n_failures decode-rank deaths over sc.duration_s (sc: a fleet.simulator.Scenario; decode_units_at:
    t_s -> decode units running then) -> {"events": [...], "totals": {...}}: per event its time,
    unit, dead rank, the elastic decision and both stalls (s) and GPU-seconds lost."""
    if n_failures < 0:
        raise ValueError(f"rank failures must be >= 0, got {n_failures}")
    gpn = sc.gpus_per_node
    n_ranks = sc.decode_nodes_per_unit * gpn
    n_slots = sc.n_experts + sc.n_redundant_experts
    if n_slots % n_ranks:
        raise ValueError(f"{n_slots} expert slots do not divide over a decode unit of {n_ranks} ranks")
    spr = n_slots // n_ranks
    a = dataclasses.replace(assumptions, n_ranks=n_ranks, gpus_per_node=gpn, n_experts=sc.n_experts,
                            n_redundant=sc.n_redundant_experts)
    scale = a.n_moe_layers / sc.eplb_layers
    events = []
    for i in range(n_failures):
        t = (i + 0.5) * sc.duration_s / n_failures
        n_units = decode_units_at(t)
        if n_units < 1:
            continue
        unit, dead = int(rng.integers(n_units)), int(rng.integers(n_ranks))
        load = np.exp(rng.standard_normal((sc.eplb_layers, sc.n_experts)))
        phy2log = eplb.rebalance_experts(load, n_slots, sc.n_expert_groups, sc.decode_nodes_per_unit, n_ranks)[0]
        d = decide(phy2log, dead, spr, sc.n_experts, torch.from_numpy(load))
        rebuild = recovery_times(a)["rebuild"]["total"]
        if d["decision"] == "shrink":
            busiest = max(d["reloads"]) * scale
            elastic = recovery_times(a, max_reload_per_rank=busiest)["elastic"]["total"]
            lost = (d["n_ranks"] * elastic, n_ranks * rebuild)
        else:
            busiest, elastic, lost = 0.0, rebuild, (n_ranks * rebuild, n_ranks * rebuild)
        events.append({"t_s": round(t, 1), "unit": unit, "dead_rank": dead, "decision": d["decision"],
                       "n_ranks": d["n_ranks"], "experts_reloaded": round(sum(d["reloads"]) * scale, 1),
                       "max_reload_per_rank": round(busiest, 1), "elastic_stall_s": round(elastic, 3),
                       "rebuild_stall_s": round(rebuild, 3), "elastic_gpu_s_lost": round(lost[0], 1),
                       "rebuild_gpu_s_lost": round(lost[1], 1)})
    totals = {k: round(sum(e[k] for e in events), 3) for k in
              ("elastic_stall_s", "rebuild_stall_s", "elastic_gpu_s_lost", "rebuild_gpu_s_lost")}
    totals["n_events"] = len(events)
    totals["n_rebuilds"] = sum(e["decision"] == "rebuild" for e in events)
    return {"events": events, "totals": totals, "unit_ranks": n_ranks}
