"""When a unit splits its steps into two micro-batches (issue 7): pure decisions over state.

`step_phase` names the schedule a split step would use; `choose_schedule` picks it per step from
the unit's `overlap:` mode; with `overlap: auto` an `OverlapTuner` measures whether splitting pays
on this machine. pipelines/overlap.py (which re-exports these) runs the schedules.
Never: runs a model, or reads a clock (the caller records the cost it measured).
"""
from __future__ import annotations

from dataclasses import dataclass, field


def step_phase(any_prefill: bool, max_running: int) -> str | None:
    """Which schedule a split step would use: prefill work on any rank -> prefill; else decode,
    if some rank has two sequences for the two micro-batches (None: nothing to split)."""
    if any_prefill:
        return "prefill"
    return "decode" if max_running >= 2 else None


@dataclass
class OverlapTuner:
    """`overlap: auto`: whether the split pays depends on the machine (exchange cost against the
    split's extra kernel launches and weight reads), so measure it. Each `period` steps of a
    phase start with `probes` alternating split / plain steps; the rest of the round uses the
    one with the lower median cost (the supervisor records ms per token of the busiest rank, so
    steps of different sizes compare). State only; `tuner_choice` and `tuner_record` decide and learn."""

    probes: int = 6
    period: int = 500
    steps: dict = field(default_factory=dict)      # phase -> steps seen
    times: dict = field(default_factory=dict)      # (phase, split?) -> this round's probe ms
    best: dict = field(default_factory=dict)       # phase -> split? (after a round's probes)


def tuner_choice(t: OverlapTuner, phase: str) -> bool:
    n = t.steps.get(phase, 0) % t.period
    if n < 2 * t.probes:
        return n % 2 == 0
    return t.best.get(phase, False)


def tuner_record(t: OverlapTuner, phase: str, split: bool, cost: float) -> None:
    n = t.steps.get(phase, 0) % t.period
    t.steps[phase] = t.steps.get(phase, 0) + 1
    if n >= 2 * t.probes:
        return
    if n == 0:
        t.times[(phase, True)], t.times[(phase, False)] = [], []
    t.times[(phase, split)].append(cost)
    if n == 2 * t.probes - 1:
        on, off = (sorted(t.times[(phase, v)])[len(t.times[(phase, v)]) // 2] for v in (True, False))
        t.best[phase] = on < off


def choose_schedule(mode: str, phase: str | None, tuner: OverlapTuner | None = None) -> str | None:
    """The unit's schedule for the next step (None: one batch): `on` splits every splittable
    step, `off` none, `auto` what the tuner measured to be faster for this phase."""
    if phase is None or mode == "off":
        return None
    if mode == "on" or tuner is None:
        return phase
    return phase if tuner_choice(tuner, phase) else None
