"""DeepSeek-V3.2 (sparse attention, the indexer keys in the cache rows) through the paths that move KV:
a 2 x 2 expert-parallel unit, and prefill -> decode handoff with the on-disk KV store; each must give the
single-rank greedy tokens. On the shared loopback Ray cluster (fake nodes and GPUs, gloo)."""
from __future__ import annotations

import pytest
import ray

from conftest import prompts_of, single_rank_outputs
from epserve.messages import KVStoreSpec, RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.model.tiny import make_tiny_model
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape


def greedy(n=8):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def v32_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("v32u") / "m", preset="v32-tiny", seed=11))


def test_2x2_ep_unit_with_overlap_gives_the_single_rank_tokens(ray_cluster, v32_dir):
    import epserve
    prompts = prompts_of([9, 30, 4, 75, 40], seed=7)      # most longer than index_topk = 16: the selection prunes
    want = single_rank_outputs(v32_dir, prompts, greedy())
    cfg = {"dtype": "float32", "kernels": "reference", "overlap": "on",     # two micro-batches: ATTN-0/1 split
           "decode": {"units": 1, "nodes_per_unit": 2, "gpus_per_node": 2, "redundant_experts": 4, "kv_pages": 32}}
    with epserve.LLM(model=v32_dir, config=cfg) as llm:
        assert llm.args.is_dsa
        assert [o.token_ids for o in llm.generate(prompts, greedy())] == want


def test_pd_handoff_with_the_kv_store_gives_the_single_rank_tokens(ray_cluster, v32_dir, tmp_path):
    from epserve.actors.unit import UnitSupervisor
    args = read_config(v32_dir)
    shape = UnitShape(1, 1, args.n_routed_experts)
    store = KVStoreSpec(str(tmp_path / "kv"), 1 << 30)
    pre = UnitSupervisor.remote(60, "prefill", RankSpec(v32_dir, kernels="reference", kv_pages=64, role="prefill",
                                                        kv_store=store), shape, n_moe_layers=args.n_moe_layers,
                                step_timeout_s=60)
    dec = UnitSupervisor.remote(61, "decode", RankSpec(v32_dir, kernels="reference", kv_pages=64, role="decode"),
                                shape, n_moe_layers=args.n_moe_layers, step_timeout_s=60)
    try:
        ray.get([pre.start.remote(), dec.start.remote()], timeout=180)
        prompts = prompts_of([20, 150], seed=3)            # 150 tokens: two full 64-token blocks to store
        want = single_rank_outputs(v32_dir, prompts, greedy())
        for attempt, hits in (("cold", [0, 0]), ("warm", [0, 128])):    # the second prefill reads the store
            firsts = ray.get([pre.prefill.remote(Sequence(f"{attempt}{i}", p, greedy(), tenant="t"), 0)
                              for i, p in enumerate(prompts)], timeout=120)
            assert all(f.error is None and f.finish_reason == "handoff" for f in firsts), firsts
            assert [f.n_cached for f in firsts] == hits
            items = [(Sequence(f"{attempt}{i}", p, greedy(), output_ids=list(f.token_ids), kv_blocks=f.kv_blocks), 0)
                     for i, (p, f) in enumerate(zip(prompts, firsts))]
            got = ray.get(dec.generate.remote(items), timeout=120)
            assert [g.token_ids for g in got] == want, attempt
    finally:
        ray.get([pre.shutdown.remote(), dec.shutdown.remote()], timeout=60)
        ray.kill(pre)
        ray.kill(dec)
