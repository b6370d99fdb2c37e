"""The rank-driven lockstep's agreement (pure) and what the live loop guarantees on a real unit:
unanimous plans under uneven load, parking and waking, aborts that land mid-step."""
from __future__ import annotations

import time

import pytest
import ray

from conftest import prompts_of, wait_unit_empty
from epserve.actors.unit import UnitSupervisor
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.pipelines.lockstep import LoopState, Vote, agree, combine
from epserve.pipelines.overlap_tuner import OverlapTuner
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape


def test_combined_vote_takes_any_max_and_min_where_each_belongs():
    u = combine([Vote(has_work=1, n_running=3, ready_version=2, step_us=10, n_tokens=4),
                 Vote(wants_prefill=1, n_running=7, ready_version=1, step_us=30, n_tokens=2), Vote(ready_version=2)])
    assert (u.has_work, u.wants_prefill, u.n_running, u.step_us, u.n_tokens) == (1, 1, 7, 30, 4)
    assert u.ready_version == 1 and u.stop == 0                       # every rank must have staged it
    assert Vote.decode(u.encode()) == u


@pytest.mark.parametrize("votes, version, want", [
    ([Vote()], 0, dict(run=False, park=True, switch_to=None)),
    ([Vote(has_work=1)], 0, dict(run=True, park=False, schedule=None)),
    ([Vote(has_work=1, wants_prefill=1)], 0, dict(run=True, phase="prefill")),
    ([Vote(has_work=1, n_running=2), Vote()], 0, dict(run=True, phase="decode")),
    ([Vote(ready_version=1), Vote(ready_version=1)], 0, dict(run=False, park=False, switch_to=1)),
    ([Vote(ready_version=1), Vote(ready_version=0)], 0, dict(switch_to=None, park=True)),
    ([Vote(has_work=1), Vote(stop=1)], 0, dict(stop=True, run=False)),
])
def test_agree_is_one_plan_from_the_combined_vote(votes, version, want):
    plan = agree(combine(votes), LoopState("on", version, OverlapTuner()))
    for k, v in want.items():
        assert getattr(plan, k) == v, k


def test_a_unit_sends_its_supervisor_a_bounded_number_of_reports():
    from epserve.actors.rank import REPORT_EVERY_S, UNIT_REPORTS_PER_S, report_every
    assert report_every(1) == report_every(8) == REPORT_EVERY_S          # small units: every 50 ms
    for world in (1, 2, 8, 16, 32, 144, 320):
        assert world / report_every(world) <= UNIT_REPORTS_PER_S + 1e-9    # reports a second, whole unit
    assert report_every(144) == pytest.approx(0.36)


def test_auto_tuner_sees_the_same_costs_on_every_rank():
    """Two ranks' states fed the same combined votes make the same choices step after step."""
    states = [LoopState("auto", 0, OverlapTuner(probes=2, period=10)) for _ in range(2)]
    plans = [[], []]
    for i in range(12):
        u = combine([Vote(has_work=1, n_running=4, step_us=1000 + 90 * (i % 2), n_tokens=4), Vote(has_work=1)])
        for k, st in enumerate(states):
            p = agree(u, st)
            st.last = (p.phase, p.schedule is not None)
            plans[k].append(p.schedule)
    assert plans[0] == plans[1] and {None, "decode"} <= set(plans[0])


@pytest.fixture(scope="module")
def unit2(ray_cluster, tiny_dir):
    args = read_config(tiny_dir)
    sup = UnitSupervisor.remote(5, "decode", RankSpec(tiny_dir, kernels="reference", kv_pages=64, overlap="on"),
                                UnitShape(1, 2, args.n_routed_experts, 2), n_moe_layers=args.n_moe_layers,
                                step_timeout_s=60)
    ray.get(sup.start.remote(), timeout=180)
    yield sup
    ray.get(sup.shutdown.remote(), timeout=60)


def test_every_rank_runs_the_same_steps_and_schedules_under_uneven_load(unit2):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    items = [(Sequence(f"un{i}", p, params), 0) for i, p in enumerate(prompts_of([5, 40, 17], seed=3))]
    assert all(r.error is None for r in ray.get(unit2.generate.remote(items), timeout=120))   # rank 1: nothing
    counters = ray.get([rk.loop_counters.remote() for rk in ray.get(unit2.rank_handles.remote())])
    same = ("steps", "schedules", "map_version")
    assert [{k: c[k] for k in same} for c in counters[1:]] == [{k: counters[0][k] for k in same}]
    assert counters[0]["steps"] > 0
    assert counters[0]["schedules"]["prefill"] >= 1 and counters[0]["schedules"]["decode"] >= 1


def test_idle_unit_parks_and_the_first_request_wakes_it(unit2):
    """An idle unit takes no steps; a request posted to rank 1 wakes its parked peer, rank 0, with a
    wake message (at once) rather than leaving it to find the work on its next poll (PARK_POLL_S)."""
    ranks = ray.get(unit2.rank_handles.remote())
    steps = ray.get(unit2.status.remote())["steps"]
    time.sleep(1.5)                                                # idle: no step is taken
    assert ray.get(unit2.status.remote())["steps"] == steps
    before = ray.get([rk.loop_counters.remote() for rk in ranks])
    out = ray.get(unit2.generate.remote([(Sequence("wake", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.0,
                                                                                      ignore_eos=True)), 1)]),
                  timeout=60)
    assert len(out[0].token_ids) == 2
    after = ray.get([rk.loop_counters.remote() for rk in ranks])
    assert after[0]["woken"] > before[0]["woken"]                  # the peer parked too, and its peer woke it
    assert after[0]["steps"] > before[0]["steps"]                  # and stepped with rank 1


def test_abort_arriving_mid_step_frees_the_request_and_others_finish(unit2):
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    keep = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    steps0 = ray.get(unit2.status.remote())["steps"]
    victim = unit2.generate.remote([(Sequence("ab-long", list(range(5, 60)), params), 1)])
    other = unit2.generate.remote([(Sequence("ab-short", list(range(9, 30)), keep), 0)])
    deadline = time.time() + 60
    while ray.get(unit2.status.remote())["steps"] < steps0 + 5 and time.time() < deadline:
        time.sleep(0.01)
    assert ray.get(unit2.abort.remote("ab-long"))
    assert len(ray.get(other, timeout=60)[0].token_ids) == 8
    stats = wait_unit_empty(unit2, 30.0)
    assert sum(s.n_running + s.kv_blocks_used for s in stats) == 0
    res = ray.get(victim, timeout=10)[0]
    assert res.finish_reason == "abort" and 0 < len(res.token_ids) < 400
