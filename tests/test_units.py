"""Expert-parallel units on a simulated multi-node Ray cluster (fake nodes, fake GPUs, gloo)."""
from __future__ import annotations

import os
import time

import pytest
import ray
import torch

from conftest import hf_greedy, hf_model, prompts_of, single_rank_outputs
from epserve.actors.unit import UnitSupervisor
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape, initial_phy2log

N_NEW = 10


@pytest.fixture(scope="module")
def unit(ray_cluster, tiny_dir):
    """One 2-node x 2-GPU unit with 4 redundant experts (20 slots, 5 per rank)."""
    args = read_config(tiny_dir)
    shape = UnitShape(2, 2, args.n_routed_experts, redundant_experts=4)
    sup = UnitSupervisor.remote(0, "decode", RankSpec(tiny_dir, kernels="reference", kv_pages=64), shape,
                                n_moe_layers=args.n_moe_layers, step_timeout_s=60)
    info = ray.get(sup.start.remote(), timeout=180)
    yield sup, info, shape, args
    ray.get(sup.shutdown.remote(), timeout=60)


def greedy(n=N_NEW):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference_outputs(tiny_dir):
    """Single-rank outputs (and transformers' for two of the prompts) for the prompts used below."""
    prompts = prompts_of([9, 30, 4, 65, 17], seed=7)
    return prompts, single_rank_outputs(tiny_dir, prompts, greedy())


def test_ranks_sit_on_planned_nodes_and_load_only_their_experts(unit):
    sup, info, shape, args = unit
    nodes = [i["node_id"] for i in info]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]
    phy2log = initial_phy2log(args.n_moe_layers, args.n_routed_experts, shape.n_slots)
    for r, i in enumerate(info):
        for layer, experts in i["experts"].items():
            want = sorted(set(phy2log[int(layer) - args.n_dense_layers, list(shape.slots_of_rank(r))].tolist()))
            assert experts == want
        assert i["load"]["experts"] == sum(len(e) for e in i["experts"].values())
        assert i["load"]["experts"] < args.n_moe_layers * args.n_routed_experts   # never the whole set


def test_uneven_batches_equal_single_rank_and_transformers(unit, reference_outputs, tiny_dir):
    sup, _, _, _ = unit
    prompts, want = reference_outputs
    ranks = [0, 0, 2, 0, 2]                     # ranks 1 and 3 get nothing: they run empty batches
    items = [(Sequence(f"u{i}", p, greedy()), r) for i, (p, r) in enumerate(zip(prompts, ranks))]
    got = ray.get(sup.generate.remote(items), timeout=300)
    assert [g.token_ids for g in got] == want
    hf = hf_model(tiny_dir)
    for p, w in list(zip(prompts, want))[:2]:
        assert w == hf_greedy(hf, p, N_NEW)[0]


def test_dispatch_loses_and_duplicates_nothing(unit, reference_outputs):
    sup, _, _, args = unit
    ray.get(sup.expert_counters.remote(reset=True))
    before = ray.get(sup.expert_counters.remote(reset=False))
    prompts, _ = reference_outputs
    items = [(Sequence(f"c{i}", p, greedy(4)), i % 4) for i, p in enumerate(prompts[:3])]
    ray.get(sup.generate.remote(items), timeout=300)
    after = ray.get(sup.expert_counters.remote(reset=False))
    sent = sum(a["pairs_sent"] - b["pairs_sent"] for a, b in zip(after, before))
    received = sum(a["pairs_received"] - b["pairs_received"] for a, b in zip(after, before))
    forwarded = sum(len(p) + 4 - 1 for p in prompts[:3])       # the last sampled token is never fed
    assert torch.equal(sent, received)
    assert torch.equal(sent, torch.full_like(sent, forwarded * args.n_activated_experts))
    counted = sum(a["counts"] for a in after)                   # per logical expert, per layer
    assert torch.equal(counted.sum(1), sent)


def test_overlapped_schedule_gives_identical_outputs(ray_cluster, tiny_dir, reference_outputs):
    """The overlapped prefill and five-stage decode schedules on a 2x2 unit with redundant experts and
    an injected exchange latency: uneven batches, ranks with nothing, prompts split across micro-batches."""
    args = read_config(tiny_dir)
    spec = RankSpec(tiny_dir, kernels="reference", kv_pages=64, overlap="on", latency_s=0.001)
    sup = UnitSupervisor.remote(9, "decode", spec, UnitShape(2, 2, args.n_routed_experts, 4),
                                n_moe_layers=args.n_moe_layers, step_timeout_s=60)
    try:
        ray.get(sup.start.remote(), timeout=180)
        prompts, want = reference_outputs
        items = [(Sequence(f"o{i}", p, greedy()), r) for i, (p, r) in enumerate(zip(prompts, [0, 0, 2, 0, 2]))]
        assert [g.token_ids for g in ray.get(sup.generate.remote(items), timeout=300)] == want
        alone = ray.get(sup.generate.remote([(Sequence("solo", prompts[3], greedy()), 3)]), timeout=300)
        assert alone[0].token_ids == want[3]
        # the ranks' own counters (status() reads their reports, which may lag the last steps by 50 ms)
        ran = ray.get(ray.get(sup.rank_handles.remote())[0].loop_counters.remote())["schedules"]
        assert ran["prefill"] >= 2 and ran["decode"] >= N_NEW - 1   # both overlapped schedules ran
        assert ran["plain"] >= N_NEW - 1                            # the solo request: nothing to split
    finally:
        ray.get(sup.shutdown.remote(), timeout=60)
        ray.kill(sup)


def test_eplb_rebalances_live_mid_generation_without_changing_outputs(unit, tiny_dir):
    from epserve.actors.eplb_controller import EplbController
    sup, _, shape, args = unit
    prompts = [[7] * 30, [7] * 29 + [9], [11] * 30, [7, 11] * 15]      # repetitive: a skewed expert load
    n = 150                         # long enough that the switch lands mid-generation on a loaded box
    engine = make_local_engine(tiny_dir)
    ref = [Sequence(f"e{i}", p, greedy(n)) for i, p in enumerate(prompts)]
    for s_ in ref:
        engine.add(s_)
    while engine.has_work:
        engine.step()
    ctrl = EplbController.remote(sup, shape, args.n_expert_groups, interval_s=3600, window_steps=10 ** 9)
    ray.get(sup.expert_counters.remote(reset=True))
    steps0 = ray.get(sup.status.remote())["steps"]
    running = sup.generate.remote([(Sequence(f"m{i}", p, greedy(n)), i) for i, p in enumerate(prompts)])
    while ray.get(sup.status.remote())["steps"] < steps0 + 8:
        time.sleep(0.02)
    report = ray.get(ctrl.rebalance.remote(force=True), timeout=120)
    got = ray.get(running, timeout=300)
    assert [g.token_ids for g in got] == [s_.output_ids for s_ in ref]       # no request failed or changed
    assert report["applied"] and report["weights_moved"] > 0
    assert report["balancedness_after"] < report["balancedness_before"]
    status = ray.get(sup.status.remote())
    assert steps0 + 8 <= report["switch_step"] < status["steps"] and status["map_version"] == 1
    placements = ray.get(sup.rank_placements.remote())
    new_map = ray.get(sup.phy2log_now.remote())
    assert {p["switched_at"][1] for p in placements} == {report["switch_step"]}   # one agreed step
    assert all(torch.equal(p["phy2log"], new_map) for p in placements)
    hf_want = hf_greedy(hf_model(tiny_dir), prompts[0], n)[0]
    assert got[0].token_ids == hf_want
    ray.kill(ctrl)


def test_killing_a_rank_rebuilds_the_unit_and_completes_every_request(unit, reference_outputs):
    sup, info, _, _ = unit
    prompts, want = reference_outputs
    old_pids = [i["pid"] for i in ray.get(sup.status.remote())["ranks"]]
    long = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    items = [(Sequence(f"k{i}", p, long), i % 4) for i, p in enumerate(prompts)]
    ref = sup.generate.remote(items)
    steps0 = ray.get(sup.status.remote())["steps"]
    deadline = time.time() + 60
    while ray.get(sup.status.remote())["steps"] < steps0 + 3 and time.time() < deadline:
        time.sleep(0.05)
    victim = ray.get(sup.rank_handles.remote())[1]
    ray.kill(victim, no_restart=True)
    got = ray.get(ref, timeout=300)
    assert [g.token_ids for g in got] == want
    status = ray.get(sup.status.remote())
    assert status["restarts"] == 1 and len(status["ranks"]) == 4
    new_pids = [i["pid"] for i in status["ranks"]]
    assert not set(new_pids) & set(old_pids)
    time.sleep(1.0)
    for pid in old_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_rank_dying_between_the_agreement_and_the_step_rebuilds_and_resumes(ray_cluster, tiny_dir,
                                                                             reference_outputs):
    """Rank 1 agrees to the unit's 4th step, then its process exits: rank 0 is already in that step's
    exchanges. The unit is rebuilt and every request resumes from prompt + produced tokens."""
    args = read_config(tiny_dir)
    spec = RankSpec(tiny_dir, kernels="reference", kv_pages=64, exit_before_step=(1, 4))
    sup = UnitSupervisor.remote(8, "decode", spec, UnitShape(1, 2, args.n_routed_experts),
                                n_moe_layers=args.n_moe_layers, step_timeout_s=20)
    try:
        ray.get(sup.start.remote(), timeout=180)
        prompts, want = reference_outputs
        items = [(Sequence(f"x{i}", p, greedy()), i % 2) for i, p in enumerate(prompts)]
        got = ray.get(sup.generate.remote(items), timeout=300)
        assert [g.token_ids for g in got] == want
        assert ray.get(sup.status.remote())["restarts"] == 1
    finally:
        ray.get(sup.shutdown.remote(), timeout=60)
        ray.kill(sup)


def test_llm_runs_units_on_the_initialised_cluster(ray_cluster, tiny_dir, reference_outputs):
    import epserve
    prompts, want = reference_outputs
    cfg = {"dtype": "float32", "kernels": "reference",
           "decode": {"units": 1, "nodes_per_unit": 2, "gpus_per_node": 2, "redundant_experts": 4, "kv_pages": 32}}
    with epserve.LLM(model=tiny_dir, config=cfg) as llm:
        assert llm._ray is None                     # joined, did not start its own
        outs = llm.generate(prompts, greedy())
        assert [o.token_ids for o in outs] == want
        assert all(o.usage.completion_tokens == N_NEW for o in outs)


@pytest.mark.parametrize("nodes,gpus,per_gpu", [(4, 8, 9), (18, 8, 2)])
def test_production_placement_plans_are_valid(nodes, gpus, per_gpu):
    shape = UnitShape(nodes, gpus, 256, 32)
    assert shape.n_slots == 288 and shape.slots_per_rank == per_gpu
    phy2log = initial_phy2log(58, 256, shape.n_slots)
    assert phy2log.shape == (58, 288)
    for layer in phy2log:
        assert set(layer.tolist()) == set(range(256))
        for r in range(shape.n_ranks):          # no expert twice on one GPU
            slots = layer[list(shape.slots_of_rank(r))].tolist()
            assert len(set(slots)) == len(slots)
