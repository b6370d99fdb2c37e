"""The emulated EP rank (model/ep_emulate.py) on CPU in float32: the LocalDispatcher's tokens with
and without the overlap schedules, the EP share's row counts, load counters of real rows only,
DeepEP's published figures, and config validation."""

import numpy as np
import pytest
import torch

from conftest import prompts_of
from epserve.config import ConfigError, load_config
from epserve.model.ep_emulate import EmulatedDispatcher, EmulationError, ep_share, exchange_us, gbps
from epserve.model.ep_select import make_ep_dispatcher
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.overlap_tuner import step_phase
from epserve.pipelines.sequence import Sequence

EMU = {"ranks": 4, "top_k": 8, "experts": 64, "groups": 8, "skew": "lognormal", "seed": 3}


def _generate(engine, overlap: bool, n_tokens: int = 6) -> list[list[int]]:
    """Greedy tokens of a few prompts; overlap: each step on the schedule a unit would pick."""
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"e{i}", p, params) for i, p in enumerate(prompts_of([37, 5, 18, 9], seed=11))]
    for s in seqs:
        engine.add(s)
    phases = set()
    while engine.has_work:
        phase = step_phase(engine.can_prefill(), len(engine.batcher.running)) if overlap else None
        phases.add(phase)
        engine.step(schedule=phase)
    if overlap:
        assert {"prefill", "decode"} <= phases, phases
    return [s.output_ids for s in seqs]


@pytest.fixture(scope="module")
def local_tokens(tiny_dir):
    eng = make_local_engine(tiny_dir, redundant_experts=4, kv_pages=64)
    return _generate(eng, overlap=False)


@pytest.mark.parametrize("overlap", [False, True], ids=["one_batch", "overlapped"])
def test_emulated_rank_gives_the_local_dispatchers_greedy_tokens(tiny_dir, local_tokens, overlap):
    eng = make_local_engine(tiny_dir, redundant_experts=4, kv_pages=64, ep_dispatch="emulated", ep_emulate=EMU)
    assert isinstance(eng.dispatcher, EmulatedDispatcher)
    got = _generate(eng, overlap)
    assert got == local_tokens
    assert int(eng.dispatcher.received.sum()) > int(eng.dispatcher.take_counts().sum())   # peers' rows were computed


@pytest.fixture(scope="module")
def local_engine(tiny_dir):
    return make_local_engine(tiny_dir, redundant_experts=4, kv_pages=16)


def _pair(eng, ep_emulate):
    """(args, emulated dispatcher, the engine's LocalDispatcher, the first MoE layer's loaded shard)."""
    a, local = eng.args, eng.dispatcher
    emu = EmulatedDispatcher(eng.kb, local.map, a.n_dense_layers, a.dim, ep_emulate, torch.device("cpu"))
    return a, emu, local, eng.model.layers[a.n_dense_layers].ffn.experts


def _inputs(t, d, n_experts, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=g)
    return x, idx, w


@pytest.mark.parametrize("top_k", [8, 96], ids=["own_rows_can_exceed_share", "share_dominates"])
def test_received_rows_are_the_ep_share_per_slot_with_skew(local_engine, top_k):
    args, emu, local, shard = _pair(local_engine, {**EMU, "top_k": top_k})
    layer, t, k = args.n_dense_layers, 12, args.n_activated_experts
    x, idx, w = _inputs(t, args.dim, args.n_routed_experts, k)
    share = emu.rows_for(layer, t)
    # the busiest rank's share after EPLB: R = N x T x top_k x frac, more than the mean under skew
    assert sum(share) == pytest.approx(t * top_k * emu.share.imbalance[0], rel=0.02)
    assert emu.share.imbalance[0] > 1.0 and len(set(share)) > 1
    own = torch.bincount(local.route(layer, idx).flatten(), minlength=len(share))
    for path in ("run", "run_static"):
        emu.received.zero_()
        if path == "run":
            got = emu.run(layer, x, idx, w, shard)
        else:
            got = emu.run_static(layer, x, idx, w, shard, torch.ones(t, dtype=torch.bool))
        torch.testing.assert_close(got, local.run(layer, x, idx, w, shard), rtol=0, atol=1e-5)
        want = torch.maximum(own, torch.tensor(share))
        assert emu.received[0].tolist() == want.tolist(), path
        if top_k == 96:                                       # every slot's share >= T: exactly R_j
            assert emu.received[0].tolist() == share


def test_load_counters_count_only_real_rows(local_engine):
    args, emu, local, shard = _pair(local_engine, EMU)
    layer, t, k = args.n_dense_layers, 9, args.n_activated_experts
    x, idx, w = _inputs(t, args.dim, args.n_routed_experts, k, seed=5)
    valid = torch.arange(t) < t - 2                           # two padding rows of a graph bucket
    emu.run(layer, x, idx, w, shard)
    emu.run_static(layer, x, idx, w, shard, valid)
    counts = emu.take_counts()
    want = torch.bincount(idx.flatten(), minlength=args.n_routed_experts) \
        + torch.bincount(idx[valid].flatten(), minlength=args.n_routed_experts)
    assert counts[0].tolist() == want.tolist()
    assert int(emu.received.sum()) > int(counts.sum())


def test_ep144_and_ep32_row_counts_of_the_issue():
    """Uniform loads: EP144 at 128 requests (2 slots) receives 1,024 rows, EP32 at 16K tokens
    (9 slots) 131,072; lognormal skew after EPLB puts more on the busiest rank."""
    for ranks, slots, tokens, rows in ((144, 2, 128, 1024), (32, 9, 16384, 131072)):
        even = ep_share(2, slots, ranks, 8, 256, 8, "equal", 0)
        skew = ep_share(2, slots, ranks, 8, 256, 8, "lognormal", 0)
        assert abs(sum(even.rows(0, tokens)) - rows * even.imbalance[0]) <= slots
        assert sum(skew.rows(0, tokens)) > rows * 0.99
        assert np.all(skew.imbalance >= 1.0)


def test_exchange_time_is_deepeps_published_latency_at_its_shapes():
    """128 tokens x top-8 at hidden 7168 over the published low-latency bandwidth gives the
    published latency (docs/legacy.md of DeepEP): dispatch EP8 77 us, combine EP128 369 us."""
    rows = 128 * 8
    assert exchange_us("dispatch", 8, 7168, 128, rows, rows) == pytest.approx(77, rel=0.01)
    assert exchange_us("combine", 128, 7168, 128, rows, rows) == pytest.approx(369, rel=0.03)
    assert gbps("ll", "dispatch", 144) == pytest.approx(39.0)
    assert gbps("ll", "combine", 181) == pytest.approx(39.5, rel=1e-4)     # 181 ~ 2 ** 7.5: the log2 midpoint
    assert gbps("normal", "dispatch", 32) == 58 and gbps("normal", "combine", 512) == 50   # clamped
    # more rows received than sent (the busiest rank) hold longer; > 256 tokens: the normal kernels
    assert exchange_us("dispatch", 144, 7168, 128, rows, 2 * rows) == pytest.approx(
        2 * exchange_us("dispatch", 144, 7168, 128, rows, rows))
    # normal kernels: one row per destination node, EP32 = 4 nodes of 8: 4 of a token's 8 rows cross
    assert exchange_us("dispatch", 32, 7168, 4096, 8, 8) == pytest.approx(4 * (7168 + 224) / 58e3)


def test_bad_emulation_values_are_refused(local_engine):
    with pytest.raises(EmulationError, match="ep_emulate.skew: 'steep'"):
        _pair(local_engine, {**EMU, "skew": "steep"})
    with pytest.raises(EmulationError, match="hold fewer than ep_emulate.experts=256"):
        _pair(local_engine, {**EMU, "experts": 256})
    with pytest.raises(EmulationError, match="ep_emulate.ranks: must be an integer >= 2"):
        _pair(local_engine, {**EMU, "ranks": 1})
    with pytest.raises(EmulationError, match="ep_emulate.width: unknown key"):
        _pair(local_engine, {**EMU, "width": 3})


def test_config_allows_emulated_only_for_one_rank_units():
    one = {"nodes_per_unit": 1, "gpus_per_node": 1}
    cfg = load_config({"ep_dispatch": "emulated", "prefill": one, "decode": one, "ep_emulate": {"ranks": 32}})
    assert cfg.ep_emulate.ranks == 32
    with pytest.raises(ConfigError, match="ep_dispatch: emulated runs one-rank units.*decode units have 2 ranks"):
        load_config({"ep_dispatch": "emulated", "prefill": one})
    with pytest.raises(ConfigError, match="ep_emulate.skew: 'steep' is not one of"):
        load_config({"ep_emulate": {"skew": "steep"}})
    with pytest.raises(ConfigError, match="ep_emulate.groups: 3 must divide ep_emulate.experts=256"):
        load_config({"ep_emulate": {"groups": 3}})
    with pytest.raises(ValueError, match="ep_dispatch: emulated is one rank"):
        make_ep_dispatcher(None, None, None, 0, 2, 2, False, "cpu", "emulated")


def test_rank_spec_carries_the_emulation_and_keeps_overlap():
    from epserve.actors.launch import rank_spec
    one = {"nodes_per_unit": 1, "gpus_per_node": 1}
    cfg = load_config({"ep_dispatch": "emulated", "overlap": "on", "prefill": one, "decode": one,
                       "ep_emulate": {"ranks": 32, "skew": "zipf"}})
    spec = rank_spec(cfg, "m", cfg.decode)
    assert spec.ep_dispatch == "emulated" and spec.overlap == "on"
    assert spec.ep_emulate["ranks"] == 32 and spec.ep_emulate["skew"] == "zipf"
    plain = load_config({"overlap": "on", "prefill": one, "decode": one})
    assert rank_spec(plain, "m", plain.decode).overlap == "off" and rank_spec(plain, "m", plain.decode).ep_emulate is None


def test_bench_step_headline_runs_the_overlapped_schedule_on_the_emulated_rank(tiny_dir):
    from epserve.bench import step_ep
    out = step_ep.run("decode", device="cpu", backend="reference", tokens=4, ranks=16, ctx=40, reps=1,
                      model=tiny_dir)
    assert out["headline"] == "overlapped" and out["ep_emulate"]["ranks"] == 16
    for block in ("overlapped", "one_batch"):
        assert set(out[block]["per_moe_layer_us"]) == {"exchange", "exposed", "hidden"}
        assert out[block]["exchange_us_per_layer"]["dispatch"] > 0
    rows = out["ep_emulate"]["received_rows_one_batch_first_moe_layer"]
    assert sum(rows) == pytest.approx(4 * 8 * out["ep_emulate"]["busiest_rank_over_mean"], rel=0.5)


def test_bench_step_kernel_table_sets_the_overlapped_step_beside_the_one_batch(tiny_dir):
    """--kernel-table: the overlapped step's kernels against the one batch's, per MoE layer (on CPU the
    aten ops): two micro-batches launch more, and the rows come largest extra time first."""
    from epserve.bench import step_ep
    out = step_ep.run("decode", device="cpu", backend="reference", tokens=4, ranks=16, ctx=40, reps=1,
                      model=tiny_dir, kernel_table=True)
    t = out["kernel_table"]
    assert (t["a"], t["b"], t["per"]) == ("overlapped", "one_batch", out["shape"]["moe_layers"])
    assert t["total"]["a"]["launches"] > t["total"]["b"]["launches"] > 0
    extra = [row["extra_us"] for row in t["kernels"]]
    assert extra == sorted(extra, reverse=True) and 0 < len(extra) <= 40
    assert "kernel_table" not in step_ep.run("decode", device="cpu", backend="reference", tokens=4, ranks=16,
                                             ctx=40, reps=1, model=tiny_dir)


def test_a_ray_unit_on_the_emulated_rank_gives_the_single_rank_tokens(ray_cluster, tiny_dir):
    """Through actors/launch.py and actors/rank.py: one-rank units with ep_dispatch: emulated and
    overlap on (split steps on one rank) answer as the single-rank engine."""
    import epserve
    prompts = prompts_of([37, 5, 18, 9], seed=11)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    eng = make_local_engine(tiny_dir, dtype="float32", kv_pages=64)
    seqs = [Sequence(f"r{i}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    while eng.has_work:
        eng.step()
    one = {"nodes_per_unit": 1, "gpus_per_node": 1, "kv_pages": 32}
    cfg = {"dtype": "float32", "kernels": "reference", "overlap": "on", "ep_dispatch": "emulated",
           "ep_emulate": {"ranks": 16, "skew": "zipf"}, "eplb": {"enabled": False}, "kv_store": {"enabled": False},
           "prefill": one, "decode": one}
    with epserve.LLM(model=tiny_dir, config=cfg) as llm:
        outs = llm.generate(prompts, params)
        import ray
        kinds = {r["ep_dispatch"] for u in llm.units for r in ray.get(u.status.remote())["ranks"]}
    assert kinds == {"EmulatedDispatcher"}
    assert [o.token_ids for o in outs] == [s.output_ids for s in seqs]


@pytest.mark.parametrize("ep_dispatch", ["local", "emulated"])
def test_the_prepared_static_overlapped_step_replays_the_plain_forward(tiny_dir, ep_dispatch):
    """What bench step captures as one CUDA graph: the micro-batches prepared once, the MoE layers on
    the fixed-shape path; run twice from the same preparation (a replay), it gives the plain
    forward's logits both times."""
    from epserve.pipelines.batcher import Step
    from epserve.pipelines.overlap import prepare_overlapped, run_overlapped
    kw = {"ep_dispatch": "emulated", "ep_emulate": {"ranks": 16, "experts": 8, "groups": 1}} \
        if ep_dispatch == "emulated" else {}
    eng = make_local_engine(tiny_dir, **kw)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"s{i}", p, params) for i, p in enumerate(prompts_of([9, 14, 5, 11], seed=3))]
    for s in seqs:
        s.pages = eng.cache.allocate(eng.cache.pages_for(len(s.prompt_ids) + 1))
        s.n_computed = len(s.prompt_ids) - 1                # one new token each: a decode step
    batch = eng.prepare(Step(seqs, [1] * len(seqs), False))
    want = eng.model.forward(batch, eng.cache.kv.clone())
    mbs, rows = prepare_overlapped(eng.model, batch, static=True)
    assert all(m.valid is not None for m in mbs)
    for _ in range(2):
        got = run_overlapped(eng.model, mbs, rows, eng.cache.kv.clone(), len(seqs), "decode")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
