"""placement/elastic.py: who a unit is after a death or a join, and where every expert lives then."""
from __future__ import annotations

import pytest
import torch

from epserve.placement.elastic import (MemberShape, grow_phy2log, member_shape, shrink_membership, shrink_phy2log,
                                       spread_targets)


def test_membership_keeps_survivors_in_old_order():
    m = shrink_membership(4, {1, 3})
    assert m.survivors == (0, 2) and m.dead == (1, 3) and m.n_ranks == 2
    assert m.new_rank(2) == 1 and m.new_rank(1) is None


def test_membership_rejects_a_rank_outside_the_unit():
    with pytest.raises(ValueError, match="dead rank 4 is not in a unit of 4 ranks"):
        shrink_membership(4, [4])


def test_worked_example_of_the_docstring():
    p = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 4, 5]])
    out = shrink_phy2log(p, (0, 2), 4, 8)
    assert out.tolist() == [[6, 7, 2, 3, 0, 1, 4, 5]]


@pytest.mark.parametrize("n_ranks,spr,n_experts,dead", [(3, 8, 16, [1]), (4, 8, 16, [0, 3]), (4, 6, 16, [2]),
                                                         (3, 8, 16, [0]), (2, 16, 16, [1])])
def test_every_expert_keeps_a_replica_and_survivors_keep_most_slots(n_ranks, spr, n_experts, dead):
    g = torch.Generator().manual_seed(n_ranks * 7 + spr)
    rows = [torch.cat([torch.randperm(n_experts, generator=g),
                       torch.randint(0, n_experts, (n_ranks * spr - n_experts,), generator=g)]) for _ in range(3)]
    p = torch.stack(rows)
    mem = shrink_membership(n_ranks, dead)
    out = shrink_phy2log(p, mem.survivors, spr, n_experts)
    assert out.shape == (3, mem.n_ranks * spr)
    kept = p[:, [s for r in mem.survivors for s in range(r * spr, (r + 1) * spr)]]
    for m in range(3):
        assert set(out[m].tolist()) == set(range(n_experts))
        lost = n_experts - len(set(kept[m].tolist()))
        assert int((out[m] != kept[m]).sum()) == lost          # one changed slot per expert that lost its replicas


def test_no_shrunk_placement_when_survivors_cannot_hold_every_expert():
    p = torch.arange(24).remainder(16).view(1, 24)     # 3 ranks x 8 slots, 16 experts
    assert shrink_phy2log(p, (0,), 8, 16) is None
    p2 = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]])   # 8 experts, survivors 0, 1 hold only 4 distinct
    assert shrink_phy2log(p2, (0, 1), 4, 8) is not None        # 8 slots: 4 duplicates give way
    assert shrink_phy2log(torch.tensor([[0, 1, 2, 3, 4, 5]]), (0, 1), 2, 6) is None


def test_a_missing_expert_takes_the_slot_of_the_lightest_spare_replica():
    p = torch.tensor([[0, 1, 2, 3, 0, 1]])        # 3 ranks x 2 slots; rank 1 (experts 2, 3) dies
    load = torch.tensor([[1.0, 100.0, 5.0, 50.0]])
    out = shrink_phy2log(p, (0, 2), 2, 4, load)
    # expert 3 (heavier) goes first, over a replica of expert 0 (lighter per replica than 1)
    # then expert 2 over the one spare left (expert 1's first slot)
    assert out.tolist() == [[3, 2, 0, 1]]


def test_grow_adds_replicas_of_the_heaviest_experts_per_replica():
    p = torch.tensor([[0, 1, 2, 3]])
    load = torch.tensor([[1.0, 9.0, 4.0, 2.0]])
    out = grow_phy2log(p, 2, 4, load)
    assert out[:, :4].tolist() == p.tolist()
    assert out[0, 4:].tolist() == [1, 2]


def test_grow_then_shrink_is_the_old_map_again_in_coverage():
    p = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    grown = grow_phy2log(p, 4, 8)
    assert grown.shape == (1, 12) and set(grown[0, 8:].tolist()) <= set(range(8))
    assert len(set(grown[0, 8:].tolist())) == 4            # no expert twice on the new rank
    back = shrink_phy2log(grown, (0, 1), 4, 8)
    assert back.tolist() == p.tolist()


def test_spread_targets_fewest_requests_first():
    assert spread_targets(3, [4, 1, 1]) == [1, 2, 0]
    with pytest.raises(ValueError):
        spread_targets(2, [1])


def test_config_unit_elastic_defaults_off_and_reaches_the_rank_spec():
    from epserve.actors.launch import rank_spec
    from epserve.config import ConfigError, load_config
    assert load_config().decode.elastic is False
    cfg = load_config({"decode": {"elastic": True}})
    assert cfg.decode.elastic and not cfg.prefill.elastic
    assert rank_spec(cfg, "/m", cfg.decode, "decode").elastic is True
    with pytest.raises(ConfigError, match="decode.elastic: true needs the all-to-all exchange"):
        load_config({"decode": {"elastic": True}, "ep_dispatch": "deepep"})


@pytest.mark.parametrize("n_slots,spr,gpn,want", [(32, 8, 2, MemberShape(32, 2, 4)),    # whole: 2 nodes x 2
                                                  (24, 8, 2, MemberShape(24, 1, 3)),    # one dead: a partial node
                                                  (16, 8, 2, MemberShape(16, 1, 2)),    # two dead: one whole node
                                                  (48, 4, 4, MemberShape(48, 3, 12)),
                                                  (8, 8, 8, MemberShape(8, 1, 1))])
def test_member_shape_places_over_the_live_slots(n_slots, spr, gpn, want):
    got = member_shape(n_slots, spr, gpn)
    assert got == want and got.n_nodes * got.gpus_per_node == got.n_ranks


@pytest.mark.parametrize("n_slots,spr", [(20, 8), (0, 8), (8, 0)])
def test_member_shape_rejects_a_map_that_is_not_whole_ranks(n_slots, spr):
    with pytest.raises(ValueError, match=f"{n_slots} slots are not a whole number"):
        member_shape(n_slots, spr, 2)
