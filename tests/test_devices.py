"""A unit's ranks on distinct GPUs: the device-index rules (pure), where Ray put a unit's ranks on
the simulated cluster, and (skipped without >= 2 GPUs) a 2-GPU NCCL unit's greedy tokens equal to
the single-rank run."""
from __future__ import annotations

import pytest
import ray
import torch

from conftest import prompts_of
from epserve.placement.devices import (DeviceAssignmentError, check_distinct_gpus, data_backend,
                                       local_device_index)


@pytest.mark.parametrize("assigned, visible, want", [
    (["0"], "0", 0),                    # Ray's default: only the assigned GPU is visible
    (["5"], "5", 0),
    (["3"], None, 3),                   # NOSET, nothing set: all GPUs of the node, physical order
    (["3"], "", 3),
    (["5"], "2,3,4,5", 3),              # NOSET under an outer CUDA_VISIBLE_DEVICES
    (["1"], " 0, 1 ", 1),
])
def test_local_device_index(assigned, visible, want):
    assert local_device_index(assigned, visible) == want


@pytest.mark.parametrize("assigned, visible", [([], None), (["0", "1"], None), (["4"], "0,1,2")])
def test_local_device_index_refuses(assigned, visible):
    with pytest.raises(DeviceAssignmentError):
        local_device_index(assigned, visible)


def test_distinct_gpus():
    check_distinct_gpus([("nodeA", ["0"]), ("nodeA", ["1"]), ("nodeB", ["0"]), ("nodeB", ["1"])])
    with pytest.raises(DeviceAssignmentError, match="ranks 0 and 2 both hold GPU 1"):
        check_distinct_gpus([("nodeA", ["1"]), ("nodeA", ["0"]), ("nodeA", ["1"])])
    with pytest.raises(DeviceAssignmentError, match="exactly one"):
        check_distinct_gpus([("nodeA", [])])


def test_data_backend():
    assert data_backend("cuda:3") == "nccl" and data_backend("cuda") == "nccl" and data_backend("cpu") == "gloo"


def test_unit_ranks_hold_distinct_gpus(ray_cluster, tiny_dir):
    """A 2-node x 2-GPU unit on the simulated cluster: every rank got its own GPU id of its node."""
    from epserve.actors.unit import UnitSupervisor
    from epserve.model.checkpoint import read_config
    from epserve.messages import RankSpec
    from epserve.placement.topology import UnitShape
    args = read_config(tiny_dir)
    sup = UnitSupervisor.remote(31, "decode", RankSpec(tiny_dir, kernels="reference", kv_pages=16),
                                UnitShape(2, 2, args.n_routed_experts), n_moe_layers=args.n_moe_layers)
    try:
        info = ray.get(sup.start.remote(drive=False), timeout=180)
        where = [(i["node_id"], i["gpu_ids"]) for i in info]
        check_distinct_gpus(where)
        assert sorted(g for n, gs in where if n == where[0][0] for g in gs) == ["0", "1"]
        assert all(i["device"] == "cpu" for i in info)
    finally:
        ray.get(sup.shutdown.remote(), timeout=60)
        ray.kill(sup)


two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs >= 2 CUDA GPUs")


@two_gpus
def test_two_gpu_nccl_unit_equals_single_rank(ray_cluster, tiny_dir):
    """One node x 2 GPUs, NCCL data collectives, each rank on its own GPU: greedy tokens equal the
    single-rank engine's on one GPU (float32, triton/reference backend, no CUDA graphs)."""
    from epserve.actors.unit import UnitSupervisor
    from epserve.model.checkpoint import read_config
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.local import make_local_engine
    from epserve.messages import RankSpec
    from epserve.pipelines.sequence import Sequence
    from epserve.placement.topology import UnitShape
    args = read_config(tiny_dir)
    prompts = prompts_of([9, 30, 4, 65], seed=11)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    eng = make_local_engine(tiny_dir, device="cuda", kv_pages=64, cuda_graphs=False)
    seqs = [Sequence(f"s{i}", p, greedy) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    while eng.has_work:
        eng.step()
    spec = RankSpec(tiny_dir, kernels="reference", device="cuda", kv_pages=64, cuda_graphs=False)
    sup = UnitSupervisor.remote(32, "decode", spec, UnitShape(1, 2, args.n_routed_experts),
                                n_moe_layers=args.n_moe_layers, step_timeout_s=120)
    try:
        info = ray.get(sup.start.remote(), timeout=300)
        assert len({i["device"] for i in info}) == 2, info           # two distinct CUDA devices
        items = [(Sequence(f"g{i}", p, greedy), i % 2) for i, p in enumerate(prompts)]
        got = ray.get(sup.generate.remote(items), timeout=300)
        assert [g.token_ids for g in got] == [s.output_ids for s in seqs]
    finally:
        ray.get(sup.shutdown.remote(), timeout=60)
        ray.kill(sup)
