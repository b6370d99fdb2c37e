"""The prefill -> decode KV handoff, both transports, between real rank processes on the simulated
cluster: tokens equal across the collective (pair group, gloo here, NCCL on GPUs) and object-store
paths and the single-rank engine; a pair whose prefill rank died falls back to recomputing, in
bounded time. Plus the parking rules (pure)."""
from __future__ import annotations

import pytest
import ray
import torch

from conftest import prompts_of, wait_dead
from epserve.model.sampling import SamplingParams
from epserve.pipelines.kv_handoff import KvTicket, ParkedKv, join_blocks, split_blocks
from epserve.pipelines.sequence import Sequence

N_NEW = 8


def test_parked_latents_expire_and_are_taken_once():
    p = ParkedKv(ttl_s=10)
    a, b = torch.zeros(2, 5, 3), torch.ones(2, 7, 3)
    p.park("a", a, now=0.0)
    p.park("b", b, now=5.0)
    assert p.nbytes == (30 + 42) * 4
    assert p.take("a", now=9.0) is a and p.take("a", now=9.0) is None      # taken once
    assert p.take("b", now=15.1) is None and not p.items                    # expired
    p.park("c", a, now=0.0)
    assert p.purge(now=100.0) == 1


def test_blocks_roundtrip_and_ticket_size():
    lat = torch.randn(3, 150, 8)
    blocks = split_blocks(lat, 64)
    assert [b.shape[1] for b in blocks] == [64, 64, 22] and torch.equal(join_blocks(blocks), lat)
    assert KvTicket("r", (3, 150, 8), "bfloat16", None, "x").nbytes == 3 * 150 * 8 * 2


def _greedy():
    return SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def units(ray_cluster, tiny_dir):
    """One 1-rank prefill unit and one 1-rank decode unit per transport (collective, object)."""
    from epserve.actors.unit import UnitSupervisor
    from epserve.model.checkpoint import read_config
    from epserve.messages import RankSpec
    from epserve.placement.topology import UnitShape
    args = read_config(tiny_dir)
    shape = UnitShape(1, 1, args.n_routed_experts)
    out = {}
    for i, mode in enumerate(("collective", "object")):
        pre = UnitSupervisor.remote(40 + 2 * i, "prefill", RankSpec(tiny_dir, kernels="reference", kv_pages=64,
                                                                    role="prefill", kv_handoff=mode),
                                    shape, n_moe_layers=args.n_moe_layers, step_timeout_s=60)
        dec = UnitSupervisor.remote(41 + 2 * i, "decode", RankSpec(tiny_dir, kernels="reference", kv_pages=64,
                                                                   role="decode", kv_handoff=mode),
                                    shape, n_moe_layers=args.n_moe_layers, step_timeout_s=60)
        ray.get([pre.start.remote(), dec.start.remote()], timeout=180)
        out[mode] = (pre, dec)
    yield out
    for pre, dec in out.values():
        ray.get([pre.shutdown.remote(), dec.shutdown.remote()], timeout=60)
        ray.kill(pre)
        ray.kill(dec)


def _single_rank(tiny_dir, prompts):
    from epserve.pipelines.local import make_local_engine
    eng = make_local_engine(tiny_dir, kv_pages=64)
    seqs = [Sequence(f"ref{i}", p, _greedy()) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    while eng.has_work:
        eng.step()
    return [s.output_ids for s in seqs]


def _handoff(pre, dec, prompts, tag):
    """Prefill each prompt, then decode it from the handed-off KV (as serve/generation.py does)."""
    firsts = ray.get([pre.prefill.remote(Sequence(f"{tag}{i}", p, _greedy()), 0) for i, p in enumerate(prompts)],
                     timeout=120)
    assert all(f.error is None for f in firsts), firsts
    items = [(Sequence(f"{tag}{i}", p, _greedy(), output_ids=list(f.token_ids), kv_blocks=f.kv_blocks), 0)
             for i, (p, f) in enumerate(zip(prompts, firsts))]
    got = ray.get(dec.generate.remote(items), timeout=120)
    assert all(g.error is None for g in got), got
    return firsts, got


def test_collective_and_object_handoff_give_the_single_rank_tokens(units, tiny_dir):
    prompts = prompts_of([5, 70, 130], seed=3)
    want = _single_rank(tiny_dir, prompts)
    for mode, (pre, dec) in units.items():
        firsts, got = _handoff(pre, dec, prompts, f"h-{mode}-")
        assert all(f.finish_reason == "handoff" for f in firsts)
        kinds = {type(f.kv_blocks).__name__ for f in firsts}
        assert kinds == ({"KvTicket"} if mode == "collective" else {"list"})
        assert [g.token_ids for g in got] == want, mode
    dec_rank = ray.get(units["collective"][1].rank_handles.remote())[0]
    st = ray.get(dec_rank.handoff_stats.remote())
    assert st["pairs"] == 1 and st["received"] == len(prompts) and st["failed"] == 0   # one pair, reused
    pre_rank = ray.get(units["collective"][0].rank_handles.remote())[0]
    assert ray.get(pre_rank.handoff_stats.remote())["parked"] == 0                      # nothing left parked


def test_dead_prefill_rank_falls_back_to_recompute_without_hanging(units, tiny_dir):
    pre, dec = units["collective"]
    prompts = prompts_of([40], seed=5)
    want = _single_rank(tiny_dir, prompts)
    first = ray.get(pre.prefill.remote(Sequence("dead0", prompts[0], _greedy()), 0), timeout=120)
    assert isinstance(first.kv_blocks, KvTicket)
    rank0 = ray.get(pre.rank_handles.remote())[0]
    ray.kill(rank0, no_restart=True)     # the latents die with their rank
    wait_dead(rank0)                     # ray.kill returns before the rank is gone
    # without hanging: a hung handoff raises GetTimeoutError here (its own waits are bounded by 30 s)
    got = ray.get(dec.generate.remote([(Sequence("dead0", prompts[0], _greedy(), output_ids=list(first.token_ids),
                                                 kv_blocks=first.kv_blocks), 0)]), timeout=120)
    assert got[0].token_ids == want[0]                  # recomputed on the decode rank, same tokens
    st = ray.get(ray.get(dec.rank_handles.remote())[0].handoff_stats.remote())
    assert st["failed"] >= 1
