"""Fleet simulator: the seed's day, whole units, the live placement functions, trace replay, cost model."""
import dataclasses
import json
import math
import sys
from collections import Counter

import numpy as np
import pytest

from epserve.fleet.cost_model import SEED, CostModel
from epserve.fleet.report import Pricing
from epserve.fleet.simulate_cli import run_simulate
from epserve.fleet.simulator import deepseek_day, load_trace, seed_policy, simulate
from epserve.placement import capacity, decode_balancer, prefill_balancer


@pytest.fixture(scope="module")
def day():
    """deepseek-day at one-minute steps; fewer probes and EPLB windows than the CLI, to stay fast."""
    scenario = dataclasses.replace(deepseek_day(), n_probes=200, eplb_interval_s=6 * 3600.0)
    return simulate(scenario, seed_policy(), CostModel.from_seed(), Pricing())


def write_trace(path, rows):
    if path.suffix == ".csv":
        lines = ["ts_s,prompt_tokens,cached_tokens,output_tokens,tenant"] + [",".join(map(str, r)) + ",t" for r in rows]
    else:
        lines = [json.dumps(dict(zip(("ts_s", "prompt_tokens", "cached_tokens", "output_tokens"), r))) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def burst_rows():
    """30 minutes: 0.5 requests/s, then 6 requests/s from minute 10 to 20, then 0.5 again."""
    rng = np.random.default_rng(1)
    ts = np.sort(np.concatenate([rng.uniform(0, 1800, 900), rng.uniform(600, 1200, 3600)]))
    prompt = rng.integers(500, 8000, ts.size)
    cached = (prompt * rng.uniform(0, 1, ts.size)).astype(int) // 64 * 64
    return [(round(float(t), 3), int(p), int(c), int(o))
            for t, p, c, o in zip(ts, prompt, cached, rng.integers(50, 2000, ts.size))]


def tiny_units(scenario):
    """One-GPU units, so a small trace needs several of them."""
    return dataclasses.replace(scenario, prefill_nodes_per_unit=1, decode_nodes_per_unit=1, gpus_per_node=1,
                               eplb_interval_s=None)


TRACE_POLICY = capacity.CapacityPolicy(prefill_bounds=(1, 6), decode_bounds=(1, 6), downscale_delay_s=120.0)


# ---------------------------------------------------------------- the seed's day

def test_deepseek_day_lands_near_the_seed(day):
    """The headline figures land near the seed's. Most of them cannot miss by construction (the schedule
    sets the nodes, the traffic sets the tokens, and CostModel.from_seed is calibrated on the decode and
    prefill tokens/s per node, the KV length and the hit rate), so two figures carry the check:
    the revenue, a seed figure that nothing in the simulator is calibrated on, and the decode fleet's
    utilisation, worked out below by hand from the cost model's formula rather than read from it."""
    r = day.report
    assert r.revenue_usd == pytest.approx(SEED["revenue_usd"], rel=1e-3)   # tokens x list prices, not an input
    # By hand: a decode step is fixed + s_kv * (KV tokens in the batch). Core attention reads the
    # BF16 latent cache, 61 layers x (512 + 64) x 2 bytes per token, at 3.0 TB/s: s_kv = 23.4 ns.
    # At the seed's 1,850 tok/s/GPU and 21 tok/s per request a GPU runs 1850/21 = 88.1 requests of
    # 4,989 KV tokens each in a 1/21 s step, so fixed = 1/21 - s_kv * 88.1 * 4989 = 37.3 ms; a full
    # batch of 128 then takes 37.3 + 15.0 = 52.3 ms: 2,448 tok/s/GPU. The day's decode GPU-seconds at
    # that rate could have produced output / utilisation tokens.
    s_kv = 61 * (512 + 64) * 2 / 3.0e12
    fixed = 1 / 21 - s_kv * (14_800 / 8 / 21) * 4_989
    full_tps = 128 / (fixed + s_kv * 128 * 4_989)
    assert full_tps == pytest.approx(2_448, abs=1)
    by_hand = r.output_tokens / (r.decode_gpu_hours * 3600 * full_tps)
    assert day.utilization["decode"]["mean"] == pytest.approx(by_hand, rel=0.01)
    assert by_hand == pytest.approx(0.75, abs=0.02)     # the seed's fleet ran at ~3/4 of its decode capacity
    assert r.avg_nodes == pytest.approx(226.75, rel=0.02)
    assert abs(r.peak_nodes - 278) <= 30  # within one staircase step (3 prefill + 1 decode units)
    assert day.trough_nodes == pytest.approx(68, rel=0.15)
    assert r.cost_usd == pytest.approx(87_072, rel=0.02)
    assert 100 * r.margin == pytest.approx(545, rel=0.02)
    assert r.input_tokens == pytest.approx(608e9, rel=0.01)
    assert r.output_tokens == pytest.approx(168e9, rel=0.01)
    assert r.cache_hit_rate == pytest.approx(0.563, abs=0.002)
    assert r.avg_kv_len_per_output_token == pytest.approx(4_989, rel=0.01)
    assert r.prefill_input_tps_per_node == pytest.approx(73_700, rel=0.05)
    assert r.decode_output_tps_per_node == pytest.approx(14_800, rel=0.05)
    assert r.n_requests > 1e8  # the request count of the cohorts, not the number of ledger rows
    assert day.requests.num_rows < 2 * 24 * 60 + 200


def test_result_states_how_far_off_the_seed_it_is(day):
    for key in ("avg_nodes", "peak_nodes", "trough_nodes", "cost_usd", "margin_pct", "input_tokens"):
        sim, seed, rel = day.vs_seed[key]
        assert seed == SEED[key] and rel == pytest.approx((sim - seed) / seed)
    assert day.vs_seed["avg_nodes"][0] == pytest.approx(day.report.avg_nodes)
    assert "whole units" in day.why and "delay" in day.why
    out = json.loads(json.dumps(day.to_dict()))
    assert out["vs_seed"]["cost_usd"]["seed"] == 87_072 and out["staircase"][0]["nodes"] == 278
    lat = day.latency
    assert lat["n_probes"] > 20 and 0 < lat["ttft_s"]["p50"] <= lat["ttft_s"]["p99"] < 60
    assert 1 / 30 < lat["tpot_s"]["p50"] <= lat["tpot_s"]["p99"] < 1 / 10  # 10-30 tokens/s per request
    assert 1.0 <= day.eplb["prefill"]["with_eplb"] < day.eplb["prefill"]["without_eplb"]
    assert 1.0 <= day.eplb["decode"]["with_eplb"] < day.eplb["decode"]["without_eplb"]


def test_capacity_moves_in_whole_units_within_bounds(day):
    policy = seed_policy()
    cap = day.capacity.to_pydict()
    assert set(zip(cap["role"], cap["gpus"])) == {("prefill", 32), ("decode", 144)}
    running, counts = {"prefill": set(), "decode": set()}, {}
    for ts, unit, role, event in sorted(zip(cap["ts"], cap["unit"], cap["role"], cap["event"]),
                                        key=lambda r: (r[0], r[3] == "start")):
        assert (unit in running[role]) == (event == "stop"), f"{event} of {unit} at {ts}"
        (running[role].add if event == "start" else running[role].discard)(unit)
        counts[ts] = (len(running["prefill"]), len(running["decode"]))
    for t, p, d, nodes in day.staircase:
        assert policy.prefill_bounds[0] <= p <= policy.prefill_bounds[1]
        assert policy.decode_bounds[0] <= d <= policy.decode_bounds[1]
        assert nodes == 4 * p + 18 * d
    assert list(counts.values()) == [(p, d) for _, p, d, _ in day.staircase]  # change for change


def test_seed_schedule_alone_is_the_seed_staircase():
    """Next to no traffic and no delay, the policy is its schedule: the seed's 278 / 68 / 226.75 nodes."""
    quiet = deepseek_day()
    quiet = dataclasses.replace(quiet, traffic=dataclasses.replace(quiet.traffic, requests_per_day=10.0),
                                n_probes=0, eplb_interval_s=None)
    result = simulate(quiet, seed_policy(downscale_delay_s=0.0), CostModel.from_seed(), step_s=900.0)
    assert result.report.avg_nodes == pytest.approx(226.75)
    assert result.report.peak_nodes == 278 and result.trough_nodes == 68
    assert [n for *_, n in result.staircase] == [278, 218, 188, 158, 128, 98, 68, 98, 128, 188, 218, 278]


# ---------------------------------------------------------------- the live placement functions

def test_simulator_calls_the_live_placement_functions(monkeypatch, tmp_path, burst_rows):
    from epserve.placement import eplb
    calls = Counter()
    for module, name in ((capacity, "desired_units"), (prefill_balancer, "pick_prefill_rank"),
                         (decode_balancer, "pick_decode_rank"), (eplb, "rebalance_experts")):
        real = getattr(module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counting)
    scenario = dataclasses.replace(load_trace(write_trace(tmp_path / "t.csv", burst_rows)), n_probes=50,
                                   eplb_interval_s=900.0)
    result = simulate(scenario, TRACE_POLICY, CostModel.from_seed(), step_s=60.0)
    assert calls["desired_units"] == math.ceil(scenario.duration_s / 60.0) == 30
    assert calls["pick_prefill_rank"] == calls["pick_decode_rank"] == result.latency["n_probes"] > 0
    assert calls["rebalance_experts"] == 2 * 2  # two 15-minute windows, prefill and decode units


def test_missing_eplb_fails_loudly(monkeypatch, tmp_path, burst_rows):
    import epserve.placement
    monkeypatch.delattr(epserve.placement, "eplb", raising=False)
    monkeypatch.setitem(sys.modules, "epserve.placement.eplb", None)
    scenario = dataclasses.replace(load_trace(write_trace(tmp_path / "t.csv", burst_rows[:50])), n_probes=0)
    with pytest.raises(ImportError, match="needs placement/eplb.py.*eplb_interval_s=None"):
        simulate(scenario, TRACE_POLICY, CostModel.from_seed())
    assert simulate(dataclasses.replace(scenario, eplb_interval_s=None), TRACE_POLICY, CostModel.from_seed()).eplb is None


# ---------------------------------------------------------------- traces

@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_trace_replays_with_exact_totals_and_scales_on_load(tmp_path, burst_rows, suffix):
    scenario = tiny_units(load_trace(write_trace(tmp_path / f"trace{suffix}", burst_rows)))
    assert scenario.duration_s == 1800.0 and scenario.n_probes == 600
    result = simulate(scenario, TRACE_POLICY, CostModel.from_seed(), step_s=60.0)
    r, rows = result.report, np.array(burst_rows)
    assert (r.n_requests, r.input_tokens, r.cache_hit_tokens) == (len(rows), rows[:, 1].sum(), rows[:, 2].sum())
    assert r.output_tokens == pytest.approx(rows[:, 3].sum(), rel=1e-3)  # probes finishing after the window
    peak = max(s[1] for s in result.staircase), max(s[2] for s in result.staircase)
    assert peak[0] >= 2 and peak[1] >= 2  # the burst needs more than one one-GPU unit of each role
    assert result.staircase[0][1:3] == (1, 1) and result.staircase[-1][1:3] == (1, 1)
    assert all(1 <= p <= 6 and 1 <= d <= 6 for _, p, d, _ in result.staircase)


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "ts_s,prompt_tokens,cached_tokens\n0,10,0\n", "lacks columns ['output_tokens']"),
    ("a.csv", "ts_s,prompt_tokens,cached_tokens,output_tokens\n0,10,0,5\n1,abc,0,5\n",
     "line 3: prompt_tokens='abc' must be a whole number >= 0"),
    ("a.csv", "ts_s,prompt_tokens,cached_tokens,output_tokens\n0,10,20,5\n", "line 2: cached_tokens=20 exceeds"),
    ("a.csv", "ts_s,prompt_tokens,cached_tokens,output_tokens\n-1,10,0,5\n", "ts_s='-1' must be a number >= 0"),
    ("a.csv", "ts_s,prompt_tokens,cached_tokens,output_tokens\n", "holds no requests"),
    ("a.jsonl", '{"ts_s": 0, "prompt_tokens": 10, "cached_tokens": 0, "output_tokens": 5}\n{oops\n',
     "line 2: not JSON"),
    ("a.jsonl", '{"ts_s": 0, "prompt_tokens": 10, "cached_tokens": 0}\n', "line 1: missing 'output_tokens'"),
    ("a.jsonl", '{"ts_s": 0, "prompt_tokens": 1.5, "cached_tokens": 0, "output_tokens": 5}\n',
     "prompt_tokens=1.5 must be a whole number"),
    ("a.parquet", "x", "unsupported type '.parquet'"),
])
def test_bad_trace_gives_a_clear_error(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match="trace '.*" + name) as err:
        load_trace(path)
    assert message in str(err.value)


def test_missing_trace_and_bad_cli_choices(tmp_path, burst_rows):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trace(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unknown scenario 'nope'; known: deepseek-day"):
        run_simulate("nope", None, False)
    with pytest.raises(ValueError, match="not both"):
        run_simulate("deepseek-day", "t.csv", False)
    path = write_trace(tmp_path / "t.csv", burst_rows[:300])
    text = run_simulate(None, str(path), False)
    assert "capacity staircase" in text and "compared with the seed's day" in text and "TTFT" in text
    out = json.loads(run_simulate(None, str(path), True))
    assert out["report"]["input_tokens"] == sum(r[1] for r in burst_rows[:300])
    assert out["staircase"][0]["nodes"] == 4 + 18 and set(out["vs_seed"]) >= {"avg_nodes", "cost_usd"}


# ---------------------------------------------------------------- cost model

def test_cost_model_from_seed_reproduces_the_seed_averages():
    cost = CostModel.from_seed()
    n_avg = 1_850 / 21.0  # requests per GPU at the seed's average decode rate and 21 tokens/s
    assert 1 / cost.decode_step_s(n_avg, n_avg * 4_989) == pytest.approx(21.0)
    assert cost.decode_requests_per_gpu(1_850, 4_989) == pytest.approx(n_avg)
    full = cost.decode_unit_tps(1, 4_989)
    assert cost.decode_requests_per_gpu(2 * full, 4_989) == cost.decode_max_batch
    assert cost.prefill_s(0, 0) == 0 and cost.prefill_s(100, 1000) < cost.prefill_s(100, 2000)


def test_cost_model_from_bench_reads_bench_step_json_and_rejects_other_shapes():
    prefill = {"bench": "step", "results": {"phase": "prefill", "tokens_per_s_per_gpu_61_layers": 20_000.0,
                                            "assumptions": {"tokens_per_gpu": 16_384, "context": 4_096}}}
    decode = {"phase": "decode", "tokens_per_s_per_gpu_61_layers": 3_000.0,
              "assumptions": {"tokens_per_gpu": 128, "context": 5_120},
              "ms": {"attention": 0.2, "model_61_layers": 40.0}}
    cost = CostModel.from_bench([prefill, decode])
    assert cost.prefill_s(4_096, 0) * 4 == pytest.approx(16_384 / 20_000.0)
    assert 128 / cost.decode_step_s(128, 128 * 5_120) == pytest.approx(3_000.0)
    assert cost.decode_s_per_kv_token * 128 * 5_120 == pytest.approx(128 / 3_000 * 61 * 0.2 / 40)
    assert CostModel.from_bench(prefill, fallback=CostModel.from_seed()).decode_fixed_s > 0
    with pytest.raises(ValueError, match="lack the decode phase"):
        CostModel.from_bench(prefill)
    with pytest.raises(ValueError, match="missing field 'tokens_per_s_per_gpu_61_layers'"):
        CostModel.from_bench({"results": {"phase": "decode"}})
    with pytest.raises(ValueError, match="phase='train'"):
        CostModel.from_bench({"phase": "train", "tokens_per_s_per_gpu_61_layers": 1.0,
                              "assumptions": {"tokens_per_gpu": 1, "context": 1}})
