"""The unit's agreement before every step: what each rank says, and the one plan they all derive.

Ranks drive their own step loop (actors/rank.py). Before each step every rank contributes a
`Vote` to one small all-gather on the unit's control group; every rank then runs `agree` on
the same gathered votes and so reaches the same `Plan` without a coordinator: whether to step,
which overlap schedule (their collectives must be issued in one order), whether to switch to a
staged expert placement before this step, and whether to park. `tuner` (pipelines/overlap.py)
is fed the previous step's ms per token of the busiest rank (slowest step over most tokens),
the same number on every rank, so auto's choice stays unanimous too.
Never: talks to Ray or torch.distributed (the rank does the all-gather), reads a clock, or
holds per-rank state beyond what the votes carry.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass, fields

from epserve.pipelines.overlap import OverlapTuner, choose_schedule, step_phase, tuner_record


@dataclass(frozen=True)
class Vote:
    has_work: int = 0            # requests waiting, running or loading here
    wants_prefill: int = 0       # new prompts arrived or the batcher would prefill next
    n_running: int = 0
    ready_version: int = 0       # highest placement version staged here AND asked for by the supervisor
    step_us: int = 0             # wall time of this rank's previous step, microseconds
    n_tokens: int = 0            # tokens this rank computed in its previous step
    stop: int = 0                # the rank is shutting down

    def encode(self) -> list[int]:
        return [int(v) for v in astuple(self)]

    @classmethod
    def decode(cls, row) -> "Vote":
        return cls(*[int(v) for v in row])


N_FIELDS = len(fields(Vote))


@dataclass(frozen=True)
class Plan:
    run: bool                    # run a forward step (every rank, empty batches included)
    phase: str | None            # what a split step would run (for the tuner)
    schedule: str | None         # overlap schedule of this step, None: one batch
    switch_to: int | None        # switch to this staged placement version before the step
    park: bool                   # nothing to do anywhere: wait for the inbox
    stop: bool


@dataclass
class LoopState:
    """What a rank remembers between agreements; identical on every rank of the unit."""

    mode: str = "off"            # overlap: on | off | auto
    version: int = 0             # placement version in use
    tuner: OverlapTuner | None = None
    last: tuple[str | None, bool] | None = None   # (phase, split) of the previous step, for the tuner


def agree(votes: list[Vote], state: LoopState) -> Plan:
    """The plan every rank derives from the same votes (pure; updates the tuner from the votes)."""
    if any(v.stop for v in votes):
        return Plan(False, None, None, None, False, True)
    if state.last is not None and state.mode == "auto" and state.tuner is not None:
        phase, split = state.last
        tokens = max(v.n_tokens for v in votes)
        if phase is not None and tokens > 0:
            tuner_record(state.tuner, phase, split, max(v.step_us for v in votes) / 1e3 / tokens)
    ready = min(v.ready_version for v in votes)
    switch_to = ready if ready > state.version else None
    if not any(v.has_work for v in votes):
        return Plan(False, None, None, switch_to, switch_to is None, False)
    phase = step_phase(any(v.wants_prefill for v in votes), max(v.n_running for v in votes))
    return Plan(True, phase, choose_schedule(state.mode, phase, state.tuner), switch_to, False, False)
