"""Capacity policy: schedule, bounds, load, hysteresis, downscale delay, parsing and validation."""
import math

import pytest

from epserve.placement.capacity import (
    CapacityPolicy, CapacityState, DownscaleHold, FleetLoad, ScheduleEntry, desired_units,
    parse_schedule, scheduled_units,
)

# SEED "Day and night" read as units (Beijing hours): 29 prefill (4 nodes) + 9 decode (18 nodes)
# = 278 nodes by day; each step is 3 prefill + 1 decode unit = 30 nodes; 68 nodes at night.
SEED_DAY = [
    {"at": "00:00", "prefill": 23, "decode": 7}, {"at": "01:15", "prefill": 20, "decode": 6},
    {"at": "02:00", "prefill": 17, "decode": 5}, {"at": "02:45", "prefill": 14, "decode": 4},
    {"at": "03:00", "prefill": 11, "decode": 3}, {"at": "03:30", "prefill": 8, "decode": 2},
    {"at": "06:30", "prefill": 11, "decode": 3}, {"at": "07:00", "prefill": 14, "decode": 4},
    {"at": "07:30", "prefill": 20, "decode": 6}, {"at": "08:00", "prefill": 23, "decode": 7},
    {"at": "08:30", "prefill": 29, "decode": 9},
]


def seed_policy(**kw):
    base = dict(schedule=parse_schedule(SEED_DAY), prefill_bounds=(1, 40), decode_bounds=(1, 12),
                downscale_delay_s=0.0, prefill_unit_capacity_tps=1000.0, decode_unit_capacity_tps=100.0)
    return CapacityPolicy(**(base | kw))


def nodes(units):
    return 4 * units[0] + 18 * units[1]


@pytest.mark.parametrize("hour, expected", [
    (12.0, (29, 9)), (23.99, (29, 9)), (0.0, (23, 7)), (1.25, (20, 6)), (3.6, (8, 2)), (6.49, (8, 2)),
    (8.5, (29, 9)), (24.5, (23, 7)), (-0.5, (29, 9)), (48 + 7.75, (20, 6)),
])
def test_scheduled_units_seed_day(hour, expected):
    assert scheduled_units(seed_policy(), hour) == expected


def test_schedule_wraps_to_yesterdays_last_entry():
    policy = CapacityPolicy(schedule=((8, 5, 2), (20, 2, 1)), prefill_bounds=(0, 9), decode_bounds=(0, 9))
    assert [scheduled_units(policy, h) for h in (3.0, 8.0, 19.9, 20.0)] == [(2, 1), (5, 2), (5, 2), (2, 1)]
    assert scheduled_units(CapacityPolicy(prefill_bounds=(2, 4), decode_bounds=(1, 3)), 5.0) == (2, 1)


def test_idle_day_reproduces_seed_staircase_average():
    """No load, no delay: one minute steps from 12:00 give the seed's 278 peak and 226.75 average nodes."""
    policy, state, current, counts = seed_policy(), CapacityState(), (29, 9), []
    for minute in range(24 * 60):
        hour = (12 + minute / 60) % 24
        current, state = desired_units(policy, FleetLoad(now_s=minute * 60.0), hour, current, state)
        counts.append(nodes(current))
    assert max(counts) == 278 and min(counts) == 68
    assert sum(counts) / len(counts) == pytest.approx(226.75)


def test_schedule_up_is_immediate_down_waits_for_delay():
    policy, state = seed_policy(downscale_delay_s=900.0), CapacityState()
    # 00:00: schedule drops to (23, 7); nothing happens for 15 minutes
    cur, state = desired_units(policy, FleetLoad(now_s=0.0), 0.0, (29, 9), state)
    assert cur == (29, 9) and state.prefill_hold == DownscaleHold(0.0, 23)
    cur, state = desired_units(policy, FleetLoad(now_s=899.0), 0.25, cur, state)
    assert cur == (29, 9)
    cur, state = desired_units(policy, FleetLoad(now_s=900.0), 0.25, cur, state)
    assert cur == (23, 7) and state == CapacityState()
    # 08:30: schedule jumps back to the day shape at once
    cur, state = desired_units(policy, FleetLoad(now_s=1000.0), 8.5, (8, 2), CapacityState())
    assert cur == (29, 9)


# prefill: 1000 tokens/s per unit; decode: 100 tokens/s per unit; no schedule, bounds 1..20
LOAD_CASES = [
    # (name, current, load kwargs, expected after one call with zero delay)
    ("over 85% -> up to <=85%", (10, 4), dict(prefill_demand_tps=10_000.0, decode_output_tps=300.0), (12, 4)),
    ("exactly 85% stays", (10, 4), dict(prefill_demand_tps=8_500.0, decode_output_tps=340.0), (10, 4)),
    ("in the band stays", (10, 4), dict(prefill_demand_tps=7_000.0, decode_output_tps=300.0), (10, 4)),
    ("under 60% at lower count -> down", (10, 4), dict(prefill_demand_tps=2_000.0, decode_output_tps=100.0), (4, 2)),
    ("huge load capped at max", (10, 4), dict(prefill_demand_tps=1e9, decode_output_tps=1e9), (20, 20)),
    ("zero load floored at min", (10, 4), dict(), (1, 1)),
    ("KV pressure scales decode", (10, 4), dict(prefill_demand_tps=7_000.0, decode_kv_used_fraction=0.95), (10, 5)),
    ("KV pressure holds decode", (10, 4), dict(prefill_demand_tps=7_000.0, decode_kv_used_fraction=0.5), (10, 4)),
    ("measured capacity overrides policy", (6, 4),
     dict(prefill_demand_tps=10_000.0, prefill_unit_tps=2000.0, decode_output_tps=300.0), (6, 4)),
    ("above max bound clamps at once", (25, 4), dict(prefill_demand_tps=7_000.0, decode_output_tps=300.0), (20, 4)),
    ("below min bound clamps at once", (0, 0), dict(), (1, 1)),
]


@pytest.mark.parametrize("name, current, load, expected", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_driven_units(name, current, load, expected):
    policy = CapacityPolicy(prefill_bounds=(1, 20), decode_bounds=(1, 20), downscale_delay_s=0.0,
                            prefill_unit_capacity_tps=1000.0, decode_unit_capacity_tps=100.0)
    assert desired_units(policy, FleetLoad(now_s=0.0, **load), 12.0, current, CapacityState())[0] == expected


def test_hysteresis_prevents_flapping():
    """Utilisation wandering between 62% and 84% of 10 units never changes the count."""
    policy = CapacityPolicy(prefill_bounds=(1, 20), decode_bounds=(1, 1), downscale_delay_s=0.0,
                            prefill_unit_capacity_tps=1000.0)
    cur, state = (10, 1), CapacityState()
    for step in range(200):
        demand = 6_200.0 + 2_200.0 * (0.5 + 0.5 * math.sin(step / 3))
        cur, state = desired_units(policy, FleetLoad(now_s=step * 60.0, prefill_demand_tps=demand), 12.0, cur, state)
        assert cur == (10, 1), (step, demand)


def test_downscale_delay_held_reset_and_max_target():
    policy = CapacityPolicy(prefill_bounds=(1, 20), decode_bounds=(1, 1), downscale_delay_s=600.0,
                            prefill_unit_capacity_tps=1000.0)

    def step(now_s, demand, cur, state):
        return desired_units(policy, FleetLoad(now_s=now_s, prefill_demand_tps=demand), 12.0, cur, state)

    cur, state = step(0.0, 3_000.0, (10, 1), CapacityState())          # 6 units would do
    assert cur == (10, 1) and state.prefill_hold == DownscaleHold(0.0, 6)
    cur, state = step(300.0, 7_000.0, cur, state)                         # load back: hold dropped
    assert cur == (10, 1) and state.prefill_hold is None
    cur, state = step(400.0, 3_000.0, cur, state)                         # new hold from 400 s
    cur, state = step(700.0, 1_000.0, cur, state)                         # lower still: target stays 6
    assert state.prefill_hold == DownscaleHold(400.0, 6)
    cur, state = step(999.0, 1_000.0, cur, state)
    assert cur == (10, 1)
    cur, state = step(1000.0, 1_000.0, cur, state)                        # held 600 s: down to what held
    assert cur == (6, 1) and state.prefill_hold is None


@pytest.mark.parametrize("kw, message", [
    (dict(schedule=((24.0, 1, 1),)), r"schedule\[0\]\.start_hour=24\.0 must be in \[0, 24\)"),
    (dict(schedule=((-1, 1, 1),)), r"start_hour=-1"),
    (dict(schedule=((1, 1, 1), (1, 1, 1))), r"start_hour=1 appears twice"),
    (dict(schedule=((3, 9, 1),)),
     r"schedule\[0\]\.prefill_units=9 \(at hour 3\) must be a whole number within prefill_bounds \(1, 4\)"),
    (dict(schedule=((3, 1, 0),)), r"decode_units=0"),
    (dict(prefill_bounds=(5, 4)), r"prefill_bounds=\(5, 4\)"),
    (dict(decode_bounds=(-1, 4)), r"decode_bounds=\(-1, 4\)"),
    (dict(up_threshold=0.5, down_threshold=0.6), r"down_threshold=0.6, up_threshold=0.5"),
    (dict(up_threshold=1.2), r"up_threshold=1.2"),
    (dict(downscale_delay_s=-1.0), r"downscale_delay_s=-1.0"),
    (dict(prefill_unit_capacity_tps=0.0), r"prefill_unit_capacity_tps=0.0 must be > 0"),
])
def test_policy_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        CapacityPolicy(**(dict(prefill_bounds=(1, 4), decode_bounds=(1, 4)) | kw))


@pytest.mark.parametrize("kw, message", [
    (dict(prefill_demand_tps=-1.0), "prefill_demand_tps=-1.0"),
    (dict(decode_kv_used_fraction=1.5), r"decode_kv_used_fraction=1.5 must be in \[0, 1\]"),
    (dict(decode_unit_tps=0.0), "decode_unit_tps=0.0"),
])
def test_load_validation(kw, message):
    with pytest.raises(ValueError, match=message):
        FleetLoad(now_s=0.0, **kw)


def test_desired_units_validation():
    with pytest.raises(ValueError, match="now_hour=nan"):
        desired_units(CapacityPolicy(), FleetLoad(now_s=0.0), math.nan, (1, 1), CapacityState())
    with pytest.raises(ValueError, match=r"current=\(-1, 1\)"):
        desired_units(CapacityPolicy(), FleetLoad(now_s=0.0), 1.0, (-1, 1), CapacityState())


def test_parse_schedule_forms():
    got = parse_schedule([
        "20:00 prefill=4 decode=2",
        {"at": "08:30", "prefill": 29, "decode": 9},
        "03:30:00 8 2",
        (12.25, 10, 3),
        {"at": 6, "prefill": "11", "decode": 3},
        ScheduleEntry(1.0, 1, 1),
    ])
    assert got == (ScheduleEntry(1.0, 1, 1), ScheduleEntry(3.5, 8, 2), ScheduleEntry(6.0, 11, 3),
                   ScheduleEntry(8.5, 29, 9), ScheduleEntry(12.25, 10, 3), ScheduleEntry(20.0, 4, 2))


@pytest.mark.parametrize("entries, message", [
    ([{"at": "24:00", "prefill": 1, "decode": 1}], r"schedule\[0\]\.at='24:00' is not a time of day"),
    ([{"at": "8h", "prefill": 1, "decode": 1}], r"schedule\[0\]\.at='8h' is not a time like '08:30'"),
    ([{"at": 510, "prefill": 1, "decode": 1}], r"at=510 is not an hour in \[0, 24\); quote times"),
    ([{"at": "01:00", "prefill": 1}], r"schedule\[0\] has keys \['at', 'prefill'\]"),
    ([{"at": "01:00", "prefill": -2, "decode": 1}], r"schedule\[0\]\.prefill=-2 must be a whole number"),
    ([{"at": "01:00", "prefill": 1.5, "decode": 1}], r"schedule\[0\]\.prefill=1.5"),
    (["01:00 decode=1 prefill=2"], r"expected prefill=N, got 'decode=1'"),
    (["01:00 1"], r"must read 'HH:MM prefill=P decode=D'"),
    ([(1, 2)], r"schedule\[0\]=\(1, 2\) must be \(hour, prefill_units, decode_units\)"),
    ([3.0], r"schedule\[0\]=3.0 must be a mapping, string or tuple"),
    (["01:00 1 1", "02:00 1 1", "1:00 2 2"], r"schedule\[2\] starts at hour 1.0, like schedule\[0\]"),
])
def test_parse_schedule_errors(entries, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(entries)
