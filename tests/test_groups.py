"""Placement group names that say whose a group is, and removing the groups a dead owner left."""
from __future__ import annotations

import time

import pytest
import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from epserve.placement.groups import group_name, orphans, parse_group_name, remove_orphan_groups

OWNER_A, OWNER_B = "a" * 32, "b" * 32


@pytest.mark.parametrize("scope, owner, unit", [("epserve", OWNER_A, "decode-unit0-gen0"),
                                                ("team/app", OWNER_B, "prefill-unit3-gen2")])
def test_a_group_name_parses_back_to_its_parts(scope, owner, unit):
    name = group_name(scope, owner, unit)
    assert name == f"epserve/{scope}/{owner}/{unit}"
    assert parse_group_name(name) == (scope, owner, unit)


@pytest.mark.parametrize("name", ["epserve-decode-unit8-gen0", "other/app/" + OWNER_A + "/u", "epserve/x/y",
                                  "epserve//" + OWNER_A + "/u", "epserve/app//u", ""])
def test_names_not_made_by_group_name_parse_to_none(name):
    assert parse_group_name(name) is None


@pytest.mark.parametrize("scope, owner, unit", [("", OWNER_A, "u"), ("app", "a/b", "u"), ("app", OWNER_A, "x/y"),
                                                ("app", "", "u")])
def test_group_name_refuses_parts_it_could_not_parse_back(scope, owner, unit):
    with pytest.raises(ValueError, match="placement group name parts"):
        group_name(scope, owner, unit)


def test_orphans_are_only_the_scopes_groups_whose_owner_is_dead():
    groups = {"g1": group_name("app", OWNER_A, "decode-unit0-gen1"),     # dead owner, this app: removed
              "g0": group_name("app", OWNER_A, "decode-unit0-gen0"),     # dead owner, this app: removed
              "g2": group_name("app", OWNER_B, "prefill-unit0-gen0"),    # live owner
              "g3": group_name("other", OWNER_A, "decode-unit0-gen0"),   # another application's
              "g4": group_name("app/x", OWNER_A, "decode-unit0-gen0"),   # a scope that only starts alike
              "g5": "someone-elses-group"}
    assert orphans("app", groups, {OWNER_A}) == ["g0", "g1"]             # in name order
    assert orphans("app", groups, set()) == []
    assert orphans("app/x", groups, {OWNER_A}) == ["g4"]


@ray.remote(num_cpus=0)
class Maker:
    """Makes a small placement group named by a scope and its own actor id, as a unit supervisor does."""

    def make(self, scope: str, unit: str) -> str:
        from ray.util.placement_group import placement_group
        me = ray.get_runtime_context().get_actor_id()
        pg = placement_group([{"CPU": 0.01}], name=group_name(scope, me, unit))
        ray.get(pg.ready(), timeout=60)
        return pg.id.hex()


def live_groups(names: set[str]) -> dict[str, str]:
    return {g["name"]: g["state"] for g in ray.util.placement_group_table().values()
            if g["name"] in names and g["state"] != "REMOVED"}


def test_remove_orphan_groups_removes_a_killed_owners_groups_and_nothing_else(ray_cluster):
    dead, live, other = Maker.remote(), Maker.remote(), Maker.remote()
    ids = {"dead": ray.get(dead.make.remote("t-app", "decode-unit0-gen0")),
           "live": ray.get(live.make.remote("t-app", "decode-unit1-gen0")),
           "other": ray.get(other.make.remote("t-other", "decode-unit0-gen0"))}
    table = ray.util.placement_group_table()
    names = {k: table[v]["name"] for k, v in ids.items()}
    ray.kill(dead)
    ray.kill(other)                    # dead too, but of another application
    deadline = time.monotonic() + 60  # the GCS marks a killed actor DEAD shortly after
    while (ray._private.state.actors(actor_id=dead._actor_id.hex()) or {}).get("State") != "DEAD":
        assert time.monotonic() < deadline, "the killed actor never became DEAD"
        time.sleep(0.1)
    assert set(live_groups(set(names.values()))) == set(names.values())      # a killed owner's group stays...
    try:
        assert remove_orphan_groups("t-app") == [names["dead"]]               # ...until its scope cleans up
        assert set(live_groups(set(names.values()))) == {names["live"], names["other"]}
        assert remove_orphan_groups("t-app") == []                            # nothing twice
    finally:
        ray.kill(live)
        for gid in ids.values():                      # free the shared cluster's CPU, whatever failed above
            if ray.util.placement_group_table().get(gid, {}).get("state") != "REMOVED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(gid))))
