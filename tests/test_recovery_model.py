"""fleet/recovery_model.py: the EP144 recovery-time model's terms move the way its assumptions say."""
from __future__ import annotations

import dataclasses

from epserve.fleet.recovery_model import RecoveryAssumptions, recovery_table, recovery_times


def test_terms_add_up_and_elastic_beats_the_rebuild():
    r = recovery_times()
    for side in ("elastic", "rebuild"):
        terms = {k: v for k, v in r[side].items() if k != "total"}
        assert abs(sum(terms.values()) - r[side]["total"]) < 0.01
    assert r["elastic"]["total"] < r["rebuild"]["total"] and r["ratio"] > 1


def test_deepep_mask_removes_the_regroup_and_kept_kv_the_own_reprefill():
    built, masked = recovery_times(), recovery_times(deepep_mask=True)
    dropped = recovery_times(survivors_keep_kv=False)
    assert masked["elastic"]["regroup"] == 0 and built["elastic"]["regroup"] > 0
    assert built["elastic"]["resume"] < dropped["elastic"]["resume"]
    assert len(recovery_table()) == 4


def test_a_slower_disk_slows_the_rebuild_more_than_the_elastic_reload():
    fast, slow = RecoveryAssumptions(), dataclasses.replace(RecoveryAssumptions(), nvme_gb_s=0.5, node_disk_gb_s=2.0)
    f, s = recovery_times(fast), recovery_times(slow)
    assert s["rebuild"]["load"] - f["rebuild"]["load"] > s["elastic"]["reload"] - f["elastic"]["reload"] > 0


def test_more_redundant_slots_leave_fewer_experts_to_reload():
    few = recovery_times(dataclasses.replace(RecoveryAssumptions(), n_redundant=0))
    many = recovery_times(dataclasses.replace(RecoveryAssumptions(), n_redundant=64))
    assert many["experts_reloaded"] < few["experts_reloaded"]
