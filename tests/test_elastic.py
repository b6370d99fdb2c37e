"""Elastic expert parallelism on real rank processes: a rank SIGKILLed by its PID does not stop its
unit (actors/unit_elastic.py). Survivors re-form without it, its experts stay served, its requests
resume on survivors, a replacement joins; every request's greedy tokens equal the single-rank run."""
from __future__ import annotations

import os
import signal
import time

import pytest
import ray
import torch

from conftest import prompts_of, single_rank_outputs
from epserve.actors.unit import UnitSupervisor
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape

N_NEW = 24


def greedy(n=N_NEW):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    prompts = prompts_of([9, 30, 4, 40, 17, 12], seed=3)
    return prompts, single_rank_outputs(tiny_dir, prompts, greedy())


@pytest.fixture
def make_unit(ray_cluster, tiny_dir):
    """Fresh elastic 2-node x 2-GPU units with 16 redundant experts (32 slots, 8 per rank): any two
    survivors hold all 16 experts. Keyword arguments go to the RankSpec (test hooks)."""
    args = read_config(tiny_dir)
    made = []

    def make(grow_back: bool = True, **spec_kw):
        shape = UnitShape(2, 2, args.n_routed_experts, redundant_experts=16)
        # overlap auto (the served default): every member's schedule choice must stay unanimous across joins
        spec = RankSpec(tiny_dir, kernels="reference", kv_pages=64, elastic=True, overlap="auto", **spec_kw)
        sup = UnitSupervisor.remote(0, "decode", spec, shape, n_moe_layers=args.n_moe_layers, step_timeout_s=60,
                                    grow_back=grow_back)
        ray.get(sup.start.remote(), timeout=180)
        made.append(sup)
        return sup
    yield make
    for sup in made:
        ray.get(sup.shutdown.remote(), timeout=60)


@pytest.fixture
def unit(make_unit):
    return make_unit()


def pids(sup) -> list[int]:
    return [i["pid"] for i in ray.get(sup.status.remote())["ranks"]]


def start_and_wait_steps(sup, prompts, n_steps: int = 3):
    items = [(Sequence(f"e{i}", p, greedy()), i % 4) for i, p in enumerate(prompts)]
    ref = sup.generate.remote(items)
    steps0 = ray.get(sup.status.remote())["steps"]
    deadline = time.time() + 120
    while ray.get(sup.status.remote())["steps"] < steps0 + n_steps and time.time() < deadline:
        time.sleep(0.05)
    return ref


def wait_for(sup, pred, timeout_s: float = 120.0) -> dict:
    """Poll the supervisor's status until pred(status) (or the time is up) -> the last status."""
    deadline = time.time() + timeout_s
    while True:
        st = ray.get(sup.status.remote())
        if pred(st) or time.time() > deadline:
            return st
        time.sleep(0.1)


def test_death_mid_decode_survivors_go_on_and_a_replacement_joins(unit, reference):
    prompts, want = reference
    before = pids(unit)
    ref = start_and_wait_steps(unit, prompts)
    os.kill(before[1], signal.SIGKILL)
    got = ray.get(ref, timeout=300)
    assert [g.token_ids for g in got] == want
    st = wait_for(unit, lambda s: any(e["kind"] == "grow" for e in s["elastic"]))
    shrink = [e for e in st["elastic"] if e["kind"] == "shrink"]
    assert shrink and shrink[0]["dead"] == [1] and shrink[0]["n_ranks"] == 3, st["elastic"]
    assert shrink[0]["kept"] > 0, shrink          # survivors decoded on from their KV, no re-prefill
    assert st["n_ranks"] == 4 and any(e["kind"] == "grow" for e in st["elastic"]), st["elastic"]
    now = pids(unit)
    assert now[:3] == [before[0], before[2], before[3]]      # the survivors kept their processes
    assert now[3] not in before
    again = ray.get(unit.generate.remote([(Sequence("after", prompts[0], greedy()), 3)]), timeout=120)
    assert again[0].token_ids == want[0]                      # the replacement decodes correctly


def test_death_during_an_eplb_switch_voids_the_switch_not_a_request(make_unit, tiny_dir):
    """Rank 2 exits at the step every member agreed to switch to a staged placement, before it
    switches (the exit_in_switch hook, a real process exit): the survivors had switched, the switch
    is void, and the unit goes on with every survivor on the supervisor's one map; every stream's
    greedy tokens equal the unfaulted run. Long streams, so the switch lands while they decode."""
    unit = make_unit(grow_back=False, exit_in_switch=2)
    n = 300
    prompts = prompts_of([9, 30, 4, 40], seed=5)
    want = single_rank_outputs(tiny_dir, prompts, greedy(n))
    before = pids(unit)
    items = [(Sequence(f"s{i}", p, greedy(n)), i) for i, p in enumerate(prompts)]
    ref = unit.generate.remote(items)
    wait_for(unit, lambda s: s["steps"] >= 3)
    p = ray.get(unit.phy2log_now.remote())
    switch = unit.apply_placement.remote(torch.roll(p, 8, dims=1))      # every slot moves
    with pytest.raises(ray.exceptions.RayTaskError, match="was not applied"):
        ray.get(switch, timeout=300)
    got = ray.get(ref, timeout=300)
    assert [g.token_ids for g in got] == want
    st = ray.get(unit.status.remote())
    shrink = [e for e in st["elastic"] if e["kind"] == "shrink"]
    assert len(shrink) == 1 and shrink[0]["dead"] == [2] and shrink[0]["n_ranks"] == 3, st["elastic"]
    assert shrink[0]["kept"] > 0, shrink            # streams were decoding on the survivors at the death
    assert pids(unit) == [before[0], before[1], before[3]] and st["map_version"] == 0
    # the survivors had switched to the void map; each now routes with the supervisor's one map
    placements = ray.get(unit.rank_placements.remote())
    current = ray.get(unit.phy2log_now.remote())
    assert current.shape[1] == 3 * 8 and len(placements) == 3
    assert all(torch.equal(q["phy2log"], current) for q in placements)
    again = ray.get(unit.generate.remote([(Sequence(f"after{r}", prompts[1], greedy(N_NEW)), r) for r in range(3)]),
                    timeout=120)
    assert all(g.token_ids == want[1][:N_NEW] for g in again)


def test_two_ranks_in_a_row(make_unit, reference):
    """Ranks 0 and 3 die one after the other (no replacement: grow_back off): the unit goes on with
    ranks 1 and 2 renumbered 0 and 1; admission sees two ranks, and a request aimed at an old
    index beyond them is taken by a survivor."""
    unit = make_unit(grow_back=False)
    prompts, want = reference
    before = pids(unit)
    ref = start_and_wait_steps(unit, prompts)
    os.kill(before[0], signal.SIGKILL)
    wait_for(unit, lambda s: any(e["kind"] == "shrink" for e in s["elastic"]))
    os.kill(before[3], signal.SIGKILL)
    got = ray.get(ref, timeout=300)
    assert [g.token_ids for g in got] == want
    st = wait_for(unit, lambda s: sum(e["kind"] == "shrink" for e in s["elastic"]) >= 2)
    assert [e["dead"] for e in st["elastic"]] == [[0], [2]], st["elastic"]     # old rank 3 was rank 2 by then
    assert st["n_ranks"] == 2 and pids(unit) == [before[1], before[2]]
    assert [s.rank for s in ray.get(unit.stats.remote())] == [0, 1]            # the balancer's view: two ranks
    late = ray.get(unit.generate.remote([(Sequence("late", prompts[2], greedy()), 3)]), timeout=120)
    assert late[0].token_ids == want[2]


def test_death_during_the_membership_change(make_unit, reference):
    """Rank 1 is SIGKILLed; survivor 2 exits while the survivors re-form without it (the
    exit_in_reform hook, a real process exit at that point): the change is retried without rank 2
    too, the two left hold every expert, and every request completes with the reference tokens."""
    unit = make_unit(exit_in_reform=2)
    prompts, want = reference
    before = pids(unit)
    ref = start_and_wait_steps(unit, prompts)
    os.kill(before[1], signal.SIGKILL)
    got = ray.get(ref, timeout=300)
    assert [g.token_ids for g in got] == want
    st = ray.get(unit.status.remote())
    shrink = [e for e in st["elastic"] if e["kind"] == "shrink"]
    assert shrink and shrink[0]["dead"] == [1, 2] and shrink[0]["n_ranks"] == 2, st["elastic"]
    assert pids(unit)[:2] == [before[0], before[3]]


def test_eplb_rebalances_a_unit_short_of_a_rank(make_unit, tiny_dir):
    """Rank 1 dies and no replacement comes (grow_back off): the EPLB controller places over the
    three survivors' 24 slots and the unit switches to it live, mid-generation, every survivor
    on the new map at one agreed step; tokens equal the unfaulted run."""
    from epserve.actors.eplb_controller import EplbController
    unit = make_unit(grow_back=False)
    args = read_config(tiny_dir)
    before = pids(unit)
    os.kill(before[1], signal.SIGKILL)
    unit.generate.remote([(Sequence("wake", [5] * 8, greedy(2)), 0)])       # a step finds the dead peer
    st = wait_for(unit, lambda s: s["n_ranks"] == 3 and s["steps"] > 0 and
                  any(e["kind"] == "shrink" for e in s["elastic"]))
    assert st["n_ranks"] == 3, st["elastic"]
    n = 150
    prompts = [[7] * 30, [7] * 29 + [9], [11] * 30]          # repetitive: a skewed expert load
    want = single_rank_outputs(tiny_dir, prompts, greedy(n))
    shape = UnitShape(2, 2, args.n_routed_experts, redundant_experts=16)
    ctrl = EplbController.remote(unit, shape, args.n_expert_groups, interval_s=3600, window_steps=10 ** 9)
    ray.get(unit.expert_counters.remote(reset=True))
    steps0 = ray.get(unit.status.remote())["steps"]
    running = unit.generate.remote([(Sequence(f"m{i}", p, greedy(n)), i) for i, p in enumerate(prompts)])
    wait_for(unit, lambda s: s["steps"] >= steps0 + 8)
    report = ray.get(ctrl.rebalance.remote(force=True), timeout=180)
    got = ray.get(running, timeout=300)
    assert [g.token_ids for g in got] == want
    assert report["applied"] and report["n_ranks"] == 3 and report["weights_moved"] > 0, report
    assert report["balancedness_after"] <= report["balancedness_before"], report
    st = ray.get(unit.status.remote())
    assert st["n_ranks"] == 3 and st["map_version"] == 1
    placements = ray.get(unit.rank_placements.remote())
    new_map = ray.get(unit.phy2log_now.remote())
    assert new_map.shape[1] == 3 * 8 and len(placements) == 3
    assert {q["switched_at"][1] for q in placements} == {report["switch_step"]}      # one agreed step
    assert all(torch.equal(q["phy2log"], new_map) for q in placements)
    for layer in new_map:                               # every logical expert keeps a live replica
        assert set(layer.tolist()) == set(range(args.n_routed_experts))
    ray.kill(ctrl)
