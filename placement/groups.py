"""One unit's placement group: one GPU bundle per rank, ranks ordered by node.

The only Ray code in placement/. Bundle index order is not node order (RAY-NOTES
section 2), so the rank -> bundle map is built from where the bundles landed:
bundles grouped by node, nodes in a stable order, rank r = node_idx * gpus_per_node
+ local index. A unit whose bundles did not land exactly gpus_per_node per node is
refused (removed, with an error naming the counts) rather than run misplaced.

Group names say whose a group is: `epserve/<scope>/<owner>/<unit>`, scope the Serve application
(or `direct` for units started outside Serve: llm.py, tests, benches), owner the hex actor id of
the unit supervisor that made it, unit `<role>-unit<id>-gen<restart>`. A group outlives its
maker when the maker is hard-killed (Ray ties a non-detached actor's groups to its job, and under
Serve that job is the controller's), so `remove_orphan_groups(scope)` removes the groups of one
scope whose owner is dead; it never touches another scope's groups or a live owner's.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import ray
from ray import PlacementGroupID
from ray._private.state import actors as gcs_actors    # the GCS actor table; ray.util.state needs the dashboard
from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

from epserve.errors import PlacementFailed

log = logging.getLogger("epserve.groups")
PREFIX = "epserve"
DIRECT_SCOPE = "direct"      # units started outside a Serve application
ACTOR_ID = re.compile(r"[0-9a-f]{32}")     # a Ray actor id in hex (16 bytes)


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


def group_name(scope: str, owner: str, unit: str) -> str:
    """`epserve/<scope>/<owner>/<unit>`; the owner (an actor id) and the unit may hold no '/'
    (the scope may: an application name is the operator's)."""
    if not scope or "/" in owner or "/" in unit or not owner or not unit:
        raise ValueError(f"placement group name parts: scope {scope!r}, owner {owner!r}, unit {unit!r}: "
                         "none may be empty; owner and unit may hold no '/'")
    return f"{PREFIX}/{scope}/{owner}/{unit}"


def parse_group_name(name: str) -> tuple[str, str, str] | None:
    """Pure: (scope, owner, unit) of a name `group_name` made; None for any other name."""
    head, _, rest = name.partition("/")
    parts = rest.rsplit("/", 2)
    if head != PREFIX or len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def orphans(scope: str, groups: dict[str, str], dead: set[str]) -> list[str]:
    """Pure: the ids of the groups (id -> name, removed ones left out) of `scope` whose owner is in
    `dead`, in name order. Another scope's groups, foreign names and live owners' groups stay."""
    mine = {gid: parse_group_name(name) for gid, name in groups.items()}
    return sorted((gid for gid, p in mine.items() if p is not None and p[0] == scope and p[1] in dead),
                  key=lambda gid: groups[gid])


def remove_orphan_groups(scope: str) -> list[str]:
    """Remove every placement group of `scope` whose owner actor is dead -> their names (logged).
    Reads the GCS directly (placement group and actor tables), not the state API: an embedded Ray
    runs without the dashboard that API needs. An owner the GCS no longer knows (dead actors are
    evicted from its table after a while) counts as dead; one in any other state (alive, pending,
    restarting) keeps its groups."""
    table = placement_group_table()
    groups = {gid: g["name"] for gid, g in table.items() if g["state"] != "REMOVED" and g.get("name")}
    owners = {p[1] for p in map(parse_group_name, groups.values()) if p is not None and p[0] == scope}
    # an owner that is no actor id (a name someone else made) is never asked about, never dead
    dead = {o for o in owners
            if ACTOR_ID.fullmatch(o) and (gcs_actors(actor_id=o) or {}).get("State", "DEAD") == "DEAD"}
    names = []
    for gid in orphans(scope, groups, dead):
        remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(gid))))
        names.append(groups[gid])
    if names:
        log.warning("removed %d placement group(s) of %r whose owner is dead: %s", len(names), scope, ", ".join(names))
    return names
