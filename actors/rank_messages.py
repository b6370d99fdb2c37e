"""What crosses between a rank actor and its unit's supervisor (small dataclasses, no tensors).

UnitLayout says where a rank sits in its unit; RankReport is a rank's state for its supervisor
(stats and counters, at a bounded rate). What a rank pushes to stream sinks (Delivery of Deltas)
is in messages.py: the sinks' callers read it too. The benchmarks' driven step has its own
messages (actors/driven_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from epserve.messages import RankStats


@dataclass
class RankReport:
    """What a rank tells its supervisor (lifecycle, admission stats, placement switches), at most
    every report_every(world) while it steps (actors/rank.py) and at once on a switch or before it parks."""

    rank: int
    generation: int
    seq: int                           # report counter: the supervisor keeps the newest
    stats: RankStats
    n_steps: int
    map_version: int
    switched_at: dict[int, int]
    schedule_steps: dict[str, int]
    split_pays: dict[str, bool]
    timing: dict[str, float]           # seconds summed over the loop's steps: total, agree, step, inbox, push
    n_tokens: int = 0                  # tokens produced since the last report (a rebuild loop resets on any)
    n_pushes: int = 0                  # pushes to sinks so far in this loop (all sinks)


@dataclass(frozen=True)
class UnitLayout:
    unit: int
    rank: int
    world: int
    gpus_per_node: int
    fp8_dispatch: bool = False
