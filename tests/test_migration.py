"""placement/migration.py and the migration-aware path of placement/eplb.py.

The assignment solver is exact; relabelling keeps balance and locality; the
migration-aware rebalance copies fewer weights than a rebalance from scratch with
no worse balance; the copy plan turns the old placement into the new one, sourcing
from live replicas (same rank, then same node) before the checkpoint.
"""

import itertools

import numpy as np
import pytest
import torch

from epserve.bench.eplb import SHAPES, shifted, synthetic_loads
from epserve.placement import eplb, eplb_baseline
from epserve.placement.migration import Copy, assign, copies_for_rank, match_placement, plan_migration


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6])
@pytest.mark.parametrize("kind", ["small_ints", "normal"])
def test_assign_is_optimal(n, kind):
    rng = np.random.default_rng(n)
    cost = rng.integers(-3, 1, (30, n, n)).astype(float) if kind == "small_ints" else rng.normal(size=(30, n, n))
    col = assign(cost)
    for b in range(30):
        assert sorted(col[b].tolist()) == list(range(n))
        best = min(sum(cost[b, i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert cost[b, np.arange(n), col[b]].sum() == pytest.approx(best)


def test_match_placement_undoes_a_relabelling():
    rng = np.random.default_rng(0)
    n_layers, num_gpus, num_nodes, spg = 4, 8, 2, 3
    old = np.stack([rng.permutation(24) for _ in range(n_layers)])          # 24 experts, 24 slots
    gpn = num_gpus // num_nodes
    # layers 0-1: any GPU permutation; layers 2-3 (node-local): nodes swapped, GPUs shuffled inside
    node_swap = [np.concatenate([gpn + rng.permutation(gpn), rng.permutation(gpn)]) for _ in range(2)]
    perm = [rng.permutation(num_gpus), rng.permutation(num_gpus), *node_swap]
    new = np.stack([old[l].reshape(num_gpus, spg)[perm[l]][:, rng.permutation(spg)].ravel()
                    for l in range(n_layers)])
    keep = np.array([False, False, True, True])
    out = match_placement(new, old, num_gpus, num_nodes, keep_nodes=keep)
    assert (out == old).all()


def test_match_placement_keeps_loads_and_node_locality():
    rng = np.random.default_rng(1)
    new = np.stack([rng.permutation(32) % 16 for _ in range(3)])           # 16 experts x 2 replicas
    old = np.stack([rng.permutation(32) % 16 for _ in range(3)])
    w = torch.tensor(rng.lognormal(0, 1, (3, 16)))
    out = match_placement(new, old, 8, 2, keep_nodes=np.array([True, True, True]))
    for l in range(3):
        new_gpus = sorted(sorted(g) for g in new[l].reshape(8, 4).tolist())
        out_gpus = sorted(sorted(g) for g in out[l].reshape(8, 4).tolist())
        assert new_gpus == out_gpus                                            # same GPU contents
        new_nodes = sorted(sorted(n) for n in new[l].reshape(2, 16).tolist())
        assert new_nodes == sorted(sorted(n) for n in out[l].reshape(2, 16).tolist())
    assert torch.allclose(eplb.gpu_loads(w, torch.tensor(out), 8).sort(1).values,
                          eplb.gpu_loads(w, torch.tensor(new), 8).sort(1).values)
    assert (out != old).sum() <= (new != old).sum()


@pytest.mark.parametrize("shape_name,kind", [("prefill", "lognormal"), ("decode", "zipf"), ("decode", "hot_expert")])
def test_migration_aware_copies_fewer_with_no_worse_balance(shape_name, kind):
    shape = SHAPES[shape_name]
    rng = np.random.default_rng(3)
    weight = synthetic_loads(kind, rng)[:16]
    after = shifted(weight, rng)
    current = eplb.rebalance_experts(weight, **shape)[0]
    scratch = eplb.rebalance_experts(after, **shape)[0]
    aware, log2phy, logcnt = eplb.rebalance_experts(after, **shape, current_phy2log=current)
    counted = torch.zeros_like(logcnt).scatter_add_(1, aware, torch.ones_like(aware))
    assert torch.equal(counted, logcnt) and (logcnt >= 1).all()
    num_gpus = shape["num_gpus"]
    assert (eplb.balancedness(after, aware, num_gpus)
            <= eplb.balancedness(after, scratch, num_gpus) * (1 + 1e-9)).all()
    n_aware, n_scratch = int((aware != current).sum()), int((scratch != current).sum())
    assert n_aware < 0.9 * n_scratch
    if shape_name == "decode":
        assert n_aware < 0.5 * n_scratch
    ref_before = eplb_baseline.rebalance_experts(weight, **shape)[0]
    ref_after = eplb_baseline.rebalance_experts(after, **shape)[0]
    assert n_aware < int((ref_after != ref_before).sum())


def test_unchanged_load_moves_nothing():
    rng = np.random.default_rng(4)
    weight = torch.tensor(rng.lognormal(0, 1, (3, 32)))
    current = eplb.rebalance_experts(weight, 48, 4, 2, 8)[0]
    # the live placement has the same content under other GPU labels (whole nodes swapped)
    relabelled = current.view(3, 2, 4, 6).flip(1).reshape(3, 48)
    again = eplb.rebalance_experts(weight, 48, 4, 2, 8, current_phy2log=relabelled)[0]
    assert plan_migration(relabelled, again, 8, 4).n_copies == 0


def test_plan_turns_old_into_new_with_live_sources():
    old = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])       # 4 ranks x 2 slots, 2 nodes x 2 ranks
    new = torch.tensor([[0, 6, 2, 3, 0, 5, 8, 7]])
    plan = plan_migration(old, new, num_gpus=4, gpus_per_node=2)
    assert plan.n_copies == 3 and plan.n_from_checkpoint == 1
    assert plan.copies == [Copy(0, 1, 6, 6), Copy(0, 4, 0, 0), Copy(0, 6, 8, None)]
    staged = old.clone()
    for c in plan.copies:
        assert c.src_slot is None or old[c.layer, c.src_slot] == c.expert
        staged[c.layer, c.dst_slot] = c.expert
    assert torch.equal(staged, new)


@pytest.mark.parametrize("dst_slot,gpus_per_node,expected_src", [
    (1, 2, 0),      # rank 0 already holds expert 9 in slot 0: local copy
    (3, 2, 0),      # rank 1: same node as slot 0
    (7, 2, 5),      # rank 3: same node as slot 5 (rank 2)
    (7, None, 0),   # no node map: fewest sends, then lowest slot
])
def test_plan_prefers_same_rank_then_same_node(dst_slot, gpus_per_node, expected_src):
    # 4 ranks x 2 slots; nodes {0, 1} and {2, 3}; expert 9 lives in slots 0 and 5.
    old = torch.tensor([[9, 1, 2, 3, 4, 9, 6, 7]])
    new = old.clone()
    new[0, dst_slot] = 9
    (copy,) = plan_migration(old, new, num_gpus=4, gpus_per_node=gpus_per_node).copies
    assert (copy.dst_slot, copy.expert, copy.src_slot) == (dst_slot, 9, expected_src)


def test_copies_for_rank_partitions_the_plan():
    rng = np.random.default_rng(5)
    old = torch.tensor(np.stack([rng.permutation(16) for _ in range(3)]))
    new = torch.tensor(np.stack([rng.permutation(16) for _ in range(3)]))
    plan = plan_migration(old, new, num_gpus=4)
    parts = [copies_for_rank(plan, r, 4) for r in range(4)]
    assert sum(len(p) for p in parts) == plan.n_copies == int((old != new).sum())
    assert all(c.dst_slot // 4 == r for r, p in enumerate(parts) for c in p)


@pytest.mark.parametrize("args,message", [
    (dict(old_phy2log=torch.zeros(2, 8), new_phy2log=torch.zeros(2, 6), num_gpus=2), "of one shape"),
    (dict(old_phy2log=torch.zeros(2, 8), new_phy2log=torch.zeros(2, 8), num_gpus=3), "num_gpus=3"),
    (dict(old_phy2log=torch.zeros(2, 8), new_phy2log=torch.zeros(2, 8), num_gpus=4, gpus_per_node=3),
     "gpus_per_node=3"),
])
def test_plan_bad_inputs(args, message):
    with pytest.raises(ValueError, match=message):
        plan_migration(**args)
