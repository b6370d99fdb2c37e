"""fleet/rank_failures.py: a decode rank's death in the simulator, decided by placement/elastic.py and
timed by fleet/recovery_model.py, against today's rebuild; `epserve simulate --rank-failures`."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from epserve.fleet.rank_failures import decide, failure_events
from epserve.fleet.recovery_model import RecoveryAssumptions, recovery_times
from epserve.fleet.simulate_cli import run_simulate
from epserve.fleet.simulator import deepseek_day


def small(**kw):
    """A decode unit of 2 nodes x 4 GPUs, 32 experts + 8 redundant (5 slots per rank), 2 synthetic layers."""
    base = dict(decode_nodes_per_unit=2, gpus_per_node=4, n_experts=32, n_redundant_experts=8, n_expert_groups=4,
                eplb_layers=2)
    return dataclasses.replace(deepseek_day(), **(base | kw))


def test_decide_counts_the_reloads_of_the_docstring_example():
    p = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 4, 5]])     # placement/elastic.py's worked example
    d = decide(p, 1, 4, 8, torch.ones(1, 8))
    # shrunk [6 7 2 3 | 0 1 4 5]: survivor 0 reads experts 6 and 7, survivor 1 (old rank 2) nothing
    assert d == {"decision": "shrink", "n_ranks": 2, "reloads": [2, 0]}


def test_decide_falls_back_to_rebuild_when_survivors_cannot_hold_every_expert():
    p = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]])
    assert decide(p, 0, 4, 8, torch.ones(1, 8)) == {"decision": "rebuild", "n_ranks": 2, "reloads": []}


def test_events_shrink_and_stall_less_than_a_rebuild():
    sc = small()
    out = failure_events(sc, lambda t: 3, 4, np.random.default_rng(0))
    ev = out["events"]
    assert len(ev) == 4 and out["unit_ranks"] == 8
    assert [e["t_s"] for e in ev] == [sc.duration_s * (i + 0.5) / 4 for i in range(4)]
    a = dataclasses.replace(RecoveryAssumptions(), n_ranks=8, gpus_per_node=4, n_experts=32, n_redundant=8)
    rebuild = recovery_times(a)["rebuild"]["total"]
    for e in ev:
        assert e["decision"] == "shrink" and e["n_ranks"] == 7 and 0 <= e["unit"] < 3 and 0 <= e["dead_rank"] < 8
        assert e["experts_reloaded"] >= e["max_reload_per_rank"] > 0
        elastic = recovery_times(a, max_reload_per_rank=e["max_reload_per_rank"])["elastic"]["total"]
        assert e["elastic_stall_s"] == pytest.approx(elastic, abs=0.1) and e["rebuild_stall_s"] == round(rebuild, 3)
        assert e["elastic_stall_s"] < e["rebuild_stall_s"] and e["elastic_gpu_s_lost"] < e["rebuild_gpu_s_lost"]
    assert out["totals"]["rebuild_stall_s"] == pytest.approx(4 * rebuild, abs=0.01)
    assert out["totals"]["n_events"] == 4 and out["totals"]["n_rebuilds"] == 0


def test_without_redundant_slots_every_death_rebuilds():
    out = failure_events(small(n_redundant_experts=0), lambda t: 2, 3, np.random.default_rng(1))
    assert out["totals"]["n_rebuilds"] == 3
    assert all(e["elastic_stall_s"] == e["rebuild_stall_s"] and e["experts_reloaded"] == 0 for e in out["events"])


def test_no_decode_unit_running_means_no_event_and_a_bad_count_is_refused():
    assert failure_events(small(), lambda t: 0, 2, np.random.default_rng(0))["totals"]["n_events"] == 0
    with pytest.raises(ValueError, match="rank failures must be >= 0, got -1"):
        failure_events(small(), lambda t: 1, -1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="rank_failures=-2 must be >= 0"):
        small(rank_failures=-2)


def test_simulate_reports_the_difference():
    text = run_simulate(None, None, False, step_s=3600.0, rank_failures=2)
    assert "decode rank deaths (2, 144-rank units" in text and text.count("shrink to 143 ranks") == 2
    r = subprocess.run([sys.executable, "-m", "epserve", "simulate", "--rank-failures", "-1"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "--rank-failures" in r.stderr
