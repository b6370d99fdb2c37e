"""One unit's placement group: one GPU bundle per rank, ranks ordered by node.

The only Ray code in placement/. Bundle index order is not node order (RAY-NOTES
section 2), so the rank -> bundle map is built from where the bundles landed:
bundles grouped by node, nodes in a stable order, rank r = node_idx * gpus_per_node
+ local index. A unit whose bundles did not land exactly gpus_per_node per node is
refused (removed, with an error naming the counts) rather than run misplaced.
"""
from __future__ import annotations

from dataclasses import dataclass

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

from epserve.errors import PlacementFailed


@dataclass
class UnitPlacement:
    pg: object
    rank_bundle: list[int]     # rank -> bundle index
    rank_node: list[str]       # rank -> Ray node id


def rank_order(bundle_nodes: list[str], gpus_per_node: int) -> list[int]:
    """Pure: bundle -> node ids in, rank -> bundle out (grouped by node, first-seen node order)."""
    by_node: dict[str, list[int]] = {}
    for b, node in enumerate(bundle_nodes):
        by_node.setdefault(node, []).append(b)
    bad = {n: len(bs) for n, bs in by_node.items() if len(bs) != gpus_per_node}
    if bad:
        raise PlacementFailed(f"unit bundles landed {sorted(bad.values())} per node on {len(bad)} node(s); "
                              f"each node must host exactly gpus_per_node={gpus_per_node}")
    return [b for bs in by_node.values() for b in bs]


def create_unit_placement(name: str, nodes_per_unit: int, gpus_per_node: int, cpus_per_rank: float,
                          timeout_s: float = 120.0, extra_resources: dict | None = None) -> UnitPlacement:
    n = nodes_per_unit * gpus_per_node
    bundle = {"GPU": 1, "CPU": cpus_per_rank, **(extra_resources or {})}
    strategy = "STRICT_PACK" if nodes_per_unit == 1 else "PACK"
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise PlacementFailed(f"unit {name}: {n} bundles of {bundle} not placed within {timeout_s:.0f}s "
                              f"({nodes_per_unit} node(s) x {gpus_per_node} GPUs needed)")
    table = placement_group_table(pg)["bundles_to_node_id"]
    bundle_nodes = [table[i] for i in range(n)]
    try:
        order = rank_order(bundle_nodes, gpus_per_node)
    except PlacementFailed:
        remove_placement_group(pg)
        raise
    if len({bundle_nodes[b] for b in order}) != nodes_per_unit:
        remove_placement_group(pg)
        raise PlacementFailed(f"unit {name}: bundles landed on the wrong number of nodes")
    return UnitPlacement(pg, order, [bundle_nodes[b] for b in order])


def remove_unit_placement(placement: UnitPlacement) -> None:
    try:
        remove_placement_group(placement.pg)
    except Exception:  # already gone with its cluster
        pass
