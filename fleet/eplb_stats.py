"""Offline EPLB report for `epserve eplb --stats FILE`: load counters in, a table out.

Owns: reading a saved expert-load matrix (.npy, .pt, .csv) and comparing, per layer,
the balance of no rebalancing (when there are no spare slots), the reference EPLB
(placement/eplb_baseline.py) and the default (placement/eplb.py). Reads files only;
no Ray. Balancedness = max / mean GPU load (1.0 is perfect).
"""

import time
from pathlib import Path

import numpy as np
import torch

from epserve.placement import eplb, eplb_baseline

SUFFIXES = (".npy", ".pt", ".csv")


def load_stats(path) -> torch.Tensor:
    """File of routed-token counts -> weight [L, E] float64 (rows = MoE layers).

    .npy: a 2-D array; .pt: torch.save of a 2-D tensor; .csv: one row per layer,
    comma-separated, an optional header row. Raises FileNotFoundError or ValueError
    naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EPLB stats file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"EPLB stats file {str(path)!r}: unsupported type {suffix!r}, expected one of {SUFFIXES}")
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        elif suffix == ".pt":
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor):
                raise ValueError(f"holds a {type(data).__name__}, expected a tensor")
        else:
            data = _read_csv(path)
        weight = torch.as_tensor(np.asarray(data, dtype=np.float64))
    except (OSError, ValueError, RuntimeError, TypeError, EOFError) as err:
        raise ValueError(f"EPLB stats file {str(path)!r} is unreadable: {err}") from err
    if weight.ndim != 2 or min(weight.shape) < 1:
        raise ValueError(f"EPLB stats file {str(path)!r}: expected a 2-D [layers, experts] matrix, "
                         f"got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError(f"EPLB stats file {str(path)!r}: loads must be finite and >= 0")
    return weight


def _read_csv(path: Path) -> np.ndarray:
    """Rows of numbers; the first row is skipped when it is not numeric (a header)."""
    try:
        return np.loadtxt(path, delimiter=",", ndmin=2)
    except ValueError:
        return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=1)


def eplb_table(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int) -> dict:
    """weight [L, E] -> per-layer balancedness and summary for each placement.

    Returns {"shape": {...}, "per_layer": {name: [L floats]}, "summary": {name: {"mean",
    "max"[, "runtime_ms"]}}} with names "before" (identity placement, slot p = expert p;
    only when num_replicas == E), "baseline" and "improved". JSON-able.
    """
    weight = torch.as_tensor(weight, dtype=torch.float64)
    start = time.perf_counter()
    improved = eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]  # validates
    improved_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    baseline = eplb_baseline.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]
    baseline_ms = (time.perf_counter() - start) * 1e3

    n_layers, n_experts = weight.shape
    placements = {"baseline": (baseline, baseline_ms), "improved": (improved, improved_ms)}
    if num_replicas == n_experts:
        identity = torch.arange(n_experts, dtype=torch.int64).expand(n_layers, -1)
        placements = {"before": (identity, None), **placements}
    per_layer, summary = {}, {}
    for name, (phy2log, ms) in placements.items():
        bal = eplb.balancedness(weight, phy2log, num_gpus)
        per_layer[name] = [round(float(b), 4) for b in bal]
        summary[name] = {"mean": round(float(bal.mean()), 4), "max": round(float(bal.max()), 4)}
        if ms is not None:
            summary[name]["runtime_ms"] = round(ms, 1)
    shape = {"layers": n_layers, "experts": n_experts, "num_replicas": num_replicas,
             "num_groups": num_groups, "num_nodes": num_nodes, "num_gpus": num_gpus}
    return {"shape": shape, "per_layer": per_layer, "summary": summary}


def format_table(table: dict) -> str:
    """eplb_table's dict -> a fixed-width text table: one row per layer, then mean, max, ms."""
    names = list(table["per_layer"])
    shape = table["shape"]
    lines = [f"EPLB balancedness (max / mean GPU load; 1.0 = perfect): {shape['layers']} layers x "
             f"{shape['experts']} experts -> {shape['num_replicas']} slots on {shape['num_gpus']} GPUs, "
             f"{shape['num_nodes']} nodes, {shape['num_groups']} groups",
             f"{'layer':>7}" + "".join(f"{n:>12}" for n in names)]
    for layer in range(shape["layers"]):
        lines.append(f"{layer:>7}" + "".join(f"{table['per_layer'][n][layer]:>12.4f}" for n in names))
    lines.append("-" * (7 + 12 * len(names)))
    for stat in ("mean", "max"):
        lines.append(f"{stat:>7}" + "".join(f"{table['summary'][n][stat]:>12.4f}" for n in names))
    ms = [table["summary"][n].get("runtime_ms") for n in names]
    lines.append(f"{'ms':>7}" + "".join(f"{'-' if m is None else f'{m:.1f}':>12}" for m in ms))
    return "\n".join(lines)
