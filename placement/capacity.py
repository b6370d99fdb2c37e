"""Capacity policy: how many whole prefill and decode units should run now (SEED "Day and night").

Baseline from a time-of-day schedule, raised by live load, kept within bounds,
with hysteresis so the fleet does not flap:
- up at once when the current units would run over `up_threshold` utilisation
  (or the schedule asks for more);
- down only to a count that would sit under `down_threshold`, and only after
  that held for `downscale_delay_s` (the hold lives in `CapacityState`).

Utilisation of n units is L / n, where L is the load in units-worth of work:
prefill L = demand tokens/s / one unit's tokens/s; decode L = max(output
tokens/s / one unit's tokens/s, KV fraction used * current units).

Pure: policy, load and state in, unit counts and the next state out. No Ray,
no I/O, no clock: the caller passes `now_hour` (local hour of day) and
`FleetLoad.now_s` (monotonic seconds). `actors/capacity_controller.py` applies it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

_EPS = 1e-9  # keeps ceil(8.5 / 0.85) at 10, not 11


@dataclass(frozen=True)
class ScheduleEntry:
    """From start_hour (local hour of day, [0, 24)) on, run this baseline of units."""

    start_hour: float
    prefill_units: int
    decode_units: int


@dataclass(frozen=True, kw_only=True)
class CapacityPolicy:
    """What the operator decides. schedule entries may be ScheduleEntry or (hour, prefill, decode).

    *_bounds: (min, max) units of the role. *_unit_capacity_tps: tokens/s one unit
    sustains (prefill: input tokens, decode: output tokens); inf means unknown, so
    only the schedule and KV pressure decide.
    """

    schedule: tuple[ScheduleEntry, ...] = ()
    prefill_bounds: tuple[int, int] = (1, 1)
    decode_bounds: tuple[int, int] = (1, 1)
    up_threshold: float = 0.85
    down_threshold: float = 0.60
    downscale_delay_s: float = 600.0
    prefill_unit_capacity_tps: float = math.inf
    decode_unit_capacity_tps: float = math.inf

    def __post_init__(self):
        entries = tuple(e if isinstance(e, ScheduleEntry) else ScheduleEntry(*e) for e in self.schedule)
        object.__setattr__(self, "schedule", tuple(sorted(entries, key=lambda e: e.start_hour)))
        for name in ("prefill_bounds", "decode_bounds"):
            lo, hi = getattr(self, name)
            if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
                raise ValueError(f"{name}={(lo, hi)!r} must be whole units with 0 <= min <= max")
            object.__setattr__(self, name, (lo, hi))
        if not 0 < self.down_threshold < self.up_threshold <= 1:
            raise ValueError(
                f"thresholds down_threshold={self.down_threshold}, up_threshold={self.up_threshold} "
                "must satisfy 0 < down_threshold < up_threshold <= 1"
            )
        if not 0 <= self.downscale_delay_s < math.inf:
            raise ValueError(f"downscale_delay_s={self.downscale_delay_s} must be finite and >= 0")
        for name in ("prefill_unit_capacity_tps", "decode_unit_capacity_tps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (inf = unknown)")
        seen = set()
        for i, e in enumerate(self.schedule):
            if not 0 <= e.start_hour < 24:
                raise ValueError(f"schedule[{i}].start_hour={e.start_hour} must be in [0, 24)")
            if e.start_hour in seen:
                raise ValueError(f"schedule[{i}].start_hour={e.start_hour} appears twice")
            seen.add(e.start_hour)
            for role in ("prefill", "decode"):
                n, (lo, hi) = getattr(e, f"{role}_units"), getattr(self, f"{role}_bounds")
                if not (isinstance(n, int) and lo <= n <= hi):
                    raise ValueError(
                        f"schedule[{i}].{role}_units={n!r} (at hour {e.start_hour}) "
                        f"must be a whole number within {role}_bounds {(lo, hi)}"
                    )


@dataclass(frozen=True)
class FleetLoad:
    """Live load, measured by the caller.

    now_s: monotonic seconds (only differences matter). prefill_demand_tps: input
    tokens/s prefill must absorb (arrivals plus queue drain). decode_output_tps:
    output tokens/s generated. decode_kv_used_fraction: KV blocks used / total over
    the running decode units, [0, 1]. *_unit_tps: measured per-unit capacity,
    overriding the policy's when given.
    """

    now_s: float
    prefill_demand_tps: float = 0.0
    decode_output_tps: float = 0.0
    decode_kv_used_fraction: float = 0.0
    prefill_unit_tps: float | None = None
    decode_unit_tps: float | None = None

    def __post_init__(self):
        for name in ("prefill_demand_tps", "decode_output_tps"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name}={getattr(self, name)} must be finite and >= 0")
        if not 0 <= self.decode_kv_used_fraction <= 1:
            raise ValueError(f"decode_kv_used_fraction={self.decode_kv_used_fraction} must be in [0, 1]")
        for name in ("prefill_unit_tps", "decode_unit_tps"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be > 0 or None")


@dataclass(frozen=True)
class DownscaleHold:
    """A downscale waiting out its delay: wanted since since_s, to to_units (the highest
    lower count seen while it held, so the fleet only drops to what held throughout)."""

    since_s: float
    to_units: int


@dataclass(frozen=True)
class CapacityState:
    """What desired_units remembers between calls; start from CapacityState()."""

    prefill_hold: DownscaleHold | None = None
    decode_hold: DownscaleHold | None = None


def scheduled_units(policy: CapacityPolicy, now_hour: float) -> tuple[int, int]:
    """(prefill, decode) baseline in force at now_hour (wraps mod 24; before the first entry
    of the day, yesterday's last entry holds). An empty schedule gives the lower bounds."""
    if not policy.schedule:
        return policy.prefill_bounds[0], policy.decode_bounds[0]
    hour = now_hour % 24.0
    entry = policy.schedule[-1]
    for e in policy.schedule:
        if e.start_hour <= hour:
            entry = e
    return entry.prefill_units, entry.decode_units


def _decide_role(current, baseline, bounds, load_units, policy, now_s, hold):
    """(units, hold) for one role; load_units = L, so n units run at L / n utilisation."""
    lo, hi = bounds
    if not lo <= current <= hi:  # bounds are hard: obey them at once
        return min(max(current, lo), hi), None
    n_up = math.ceil(load_units / policy.up_threshold - _EPS) if load_units > 0 else 0
    need = min(max(baseline, n_up, lo), hi)
    if need > current:
        return need, None
    n_floor = math.floor(load_units / policy.down_threshold + _EPS) + 1 if load_units > 0 else 0
    lower = min(max(need, n_floor), hi)
    if lower >= current:  # inside the hysteresis band: stay, forget any pending downscale
        return current, None
    if hold is None:
        hold = DownscaleHold(now_s, lower)
    else:
        hold = DownscaleHold(hold.since_s, max(hold.to_units, lower))
    if now_s - hold.since_s >= policy.downscale_delay_s:
        return hold.to_units, None
    return current, hold


def desired_units(
    policy: CapacityPolicy,
    load: FleetLoad,
    now_hour: float,
    current: tuple[int, int],
    state: CapacityState,
) -> tuple[tuple[int, int], CapacityState]:
    """((prefill_units, decode_units) to run, next state), given the (prefill, decode) units running.

    Each role: max(schedule baseline, units keeping utilisation <= up_threshold),
    clamped to bounds; up moves apply now; a down move needs the lower count to
    sit under down_threshold for downscale_delay_s in a row.
    """
    if not math.isfinite(now_hour):
        raise ValueError(f"now_hour={now_hour} must be finite")
    cur_p, cur_d = current
    if cur_p < 0 or cur_d < 0:
        raise ValueError(f"current={current} must be non-negative unit counts")
    base_p, base_d = scheduled_units(policy, now_hour)
    cap_p = load.prefill_unit_tps or policy.prefill_unit_capacity_tps
    cap_d = load.decode_unit_tps or policy.decode_unit_capacity_tps
    load_p = load.prefill_demand_tps / cap_p
    load_d = max(load.decode_output_tps / cap_d, load.decode_kv_used_fraction * cur_d)
    now_s = load.now_s
    p, hold_p = _decide_role(cur_p, base_p, policy.prefill_bounds, load_p, policy, now_s, state.prefill_hold)
    d, hold_d = _decide_role(cur_d, base_d, policy.decode_bounds, load_d, policy, now_s, state.decode_hold)
    return (p, d), CapacityState(hold_p, hold_d)


_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")
_KEYS = {"at", "prefill", "decode"}


def _parse_hour(value, where: str) -> float:
    if isinstance(value, str):
        m = _TIME.match(value.strip())
        if not m:
            raise ValueError(f"{where}.at={value!r} is not a time like '08:30'")
        h, mnt, sec = int(m[1]), int(m[2]), int(m[3] or 0)
        if h >= 24 or mnt >= 60 or sec >= 60:
            raise ValueError(f"{where}.at={value!r} is not a time of day in [00:00, 24:00)")
        return h + mnt / 60 + sec / 3600
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < 24:
            raise ValueError(
                f"{where}.at={value!r} is not an hour in [0, 24); quote times in YAML "
                "('8:30' unquoted is read as the base-60 number 510)"
            )
        return float(value)
    raise ValueError(f"{where}.at={value!r} must be 'HH:MM' or an hour number")


def _parse_string(text: str, where: str) -> dict:
    """'08:30 prefill=29 decode=9' or '08:30 29 9'."""
    parts = text.split()
    if len(parts) != 3:
        raise ValueError(f"{where}={text!r} must read 'HH:MM prefill=P decode=D' or 'HH:MM P D'")
    entry = {"at": parts[0]}
    for key, part in zip(("prefill", "decode"), parts[1:]):
        name, _, value = part.rpartition("=")
        if name not in ("", key):
            raise ValueError(f"{where}={text!r}: expected {key}=N, got {part!r}")
        entry[key] = value
    return entry


def _parse_units(value, where: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}={value!r} must be a whole number of units >= 0")
    return value


def parse_schedule(entries: Iterable) -> tuple[ScheduleEntry, ...]:
    """ScheduleEntries, sorted by hour, from YAML-friendly entries.

    Each entry: {"at": "08:30", "prefill": 29, "decode": 9}, the string
    "08:30 prefill=29 decode=9" (or "08:30 29 9"), a ScheduleEntry, or a tuple
    (hour, prefill, decode). ValueError names the entry's index and the bad value.
    Bounds are checked by CapacityPolicy, which takes the result as `schedule`.
    """
    out = []
    for i, raw in enumerate(entries):
        where = f"schedule[{i}]"
        if isinstance(raw, ScheduleEntry):
            out.append(raw)
            continue
        if isinstance(raw, (tuple, list)):
            if len(raw) != 3:
                raise ValueError(f"{where}={raw!r} must be (hour, prefill_units, decode_units)")
            raw = dict(zip(("at", "prefill", "decode"), raw))
        elif isinstance(raw, str):
            raw = _parse_string(raw, where)
        elif not isinstance(raw, dict):
            raise ValueError(f"{where}={raw!r} must be a mapping, string or tuple")
        if set(raw) != _KEYS:
            raise ValueError(f"{where} has keys {sorted(raw)}; expected exactly {sorted(_KEYS)}")
        out.append(ScheduleEntry(
            _parse_hour(raw["at"], where),
            _parse_units(raw["prefill"], f"{where}.prefill"),
            _parse_units(raw["decode"], f"{where}.decode"),
        ))
    hours = [e.start_hour for e in out]
    for i, h in enumerate(hours):
        if hours.index(h) != i:
            raise ValueError(f"schedule[{i}] starts at hour {h}, like schedule[{hours.index(h)}]")
    return tuple(sorted(out, key=lambda e: e.start_hour))
