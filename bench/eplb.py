"""EPLB benchmark: the reference (placement/eplb_baseline.py) vs the default (placement/eplb.py).

Owns: seeded synthetic expert loads and the comparison at production shapes. Prints
nothing; `run()` returns a JSON-able dict. Not a test: figures only.

Shapes (DeepSeek-V3: 58 MoE layers, 256 routed experts in 8 groups, 32 redundant):
  prefill: 288 slots on 32 GPUs / 4 nodes  (9 slots per GPU, hierarchical allowed)
  decode:  288 slots on 144 GPUs / 18 nodes (2 slots per GPU, global only)
Figures per load kind: runtime (ms), balancedness (max / mean GPU load) mean and max
over layers with a lower bound no placement can beat, duplicate slots, and the expert
weights copied when the load shifts and EPLB runs again: from scratch (what the
reference does) vs migration-aware (current_phy2log given).
"""

import time

import numpy as np
import torch

from epserve.placement import eplb, eplb_baseline
from epserve.placement.loads import KINDS, synthetic_loads  # noqa: F401  (re-exported: the tests import them here)
from epserve.placement.migration import plan_migration

SHAPES = {
    "prefill": dict(num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32),
    "decode": dict(num_replicas=288, num_groups=8, num_nodes=18, num_gpus=144),
}
N_LAYERS, N_EXPERTS = 58, 256


def shifted(weight: torch.Tensor, rng: np.random.Generator, sigma: float = 0.3) -> torch.Tensor:
    """The same loads after a drift: each expert's load times lognormal(0, sigma)."""
    return weight * torch.from_numpy(rng.lognormal(0.0, sigma, tuple(weight.shape)))


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def _one(weight, shift, shape) -> dict:
    num_gpus = shape["num_gpus"]
    gpn = num_gpus // shape["num_nodes"]
    (ref, _, _), ref_ms = _timed(eplb_baseline.rebalance_experts, weight, **shape)
    (new, _, _), new_ms = _timed(eplb.rebalance_experts, weight, **shape)
    ref_bal, new_bal = eplb.balancedness(weight, ref, num_gpus), eplb.balancedness(weight, new, num_gpus)

    (ref2, _, _), _ = _timed(eplb_baseline.rebalance_experts, shift, **shape)
    (scratch2, _, _), _ = _timed(eplb.rebalance_experts, shift, **shape)
    (aware2, _, _), aware_ms = _timed(eplb.rebalance_experts, shift, **shape, current_phy2log=new)
    aware_ok = bool((eplb.balancedness(shift, aware2, num_gpus)
                     <= eplb.balancedness(shift, scratch2, num_gpus) * (1 + 1e-9)).all())
    return {
        "runtime_ms": {"baseline": round(ref_ms, 1), "improved": round(new_ms, 1),
                       "improved_migration_aware": round(aware_ms, 1)},
        "balancedness_mean": {"baseline": round(float(ref_bal.mean()), 4), "improved": round(float(new_bal.mean()), 4)},
        "balancedness_max": {"baseline": round(float(ref_bal.max()), 4), "improved": round(float(new_bal.max()), 4)},
        "balancedness_lower_bound_mean": round(float(_lower_bound(weight, shape).mean()), 4),
        "layers_improved_worse": int((new_bal > ref_bal * (1 + 1e-9)).sum()),
        "duplicate_slots": {"baseline": _duplicates(ref, num_gpus), "improved": _duplicates(new, num_gpus)},
        "copies_after_shift": {
            "of_slots": int(weight.shape[0] * shape["num_replicas"]),
            "baseline_scratch": plan_migration(ref, ref2, num_gpus, gpn).n_copies,
            "improved_scratch": plan_migration(new, scratch2, num_gpus, gpn).n_copies,
            "improved_migration_aware": plan_migration(new, aware2, num_gpus, gpn).n_copies,
            "aware_balance_no_worse_than_scratch": aware_ok,
        },
    }


def _lower_bound(weight, shape) -> torch.Tensor:
    """[L]: no placement beats max(mean GPU load, the smallest possible largest replica
    load), the latter reached by replicating greedily by load per replica."""
    logcnt = eplb_baseline.replicate_experts(weight.double(), shape["num_replicas"])[2]
    mean = weight.sum(1) / shape["num_gpus"]
    bound = torch.maximum(mean, (weight / logcnt).max(1).values)
    return torch.where(mean > 0, bound / mean.clamp(min=1e-300), torch.ones_like(mean))


def _duplicates(phy2log: torch.Tensor, num_gpus: int) -> int:
    """Slots holding an expert that the same GPU already holds, summed over layers."""
    per_gpu = phy2log.view(phy2log.shape[0], num_gpus, -1).sort(-1).values
    return int((per_gpu[..., 1:] == per_gpu[..., :-1]).sum())


def run(seed: int = 0) -> dict:
    """All shapes x load kinds -> {shape: {kind: figures}} plus the settings used."""
    eplb.rebalance_experts(torch.ones(2, 16), 24, 4, 2, 4)  # warm-up: first calls pay imports
    eplb_baseline.rebalance_experts(torch.ones(2, 16), 24, 4, 2, 4)
    out = {"settings": {"seed": seed, "layers": N_LAYERS, "experts": N_EXPERTS, "shapes": SHAPES,
                        "shift": "x lognormal(0, 0.3) per expert"}}
    for name, shape in SHAPES.items():
        rng = np.random.default_rng(seed)
        out[name] = {}
        for kind in KINDS:
            weight = synthetic_loads(kind, rng, num_groups=shape["num_groups"])
            out[name][kind] = _one(weight, shifted(weight, rng), shape)
    return out
