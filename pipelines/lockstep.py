"""The unit's agreement before every step: what each rank says, and the one plan they all derive.

Ranks drive their own step loop (actors/rank.py). Before each step every rank contributes a
`Vote`; one all-reduce (MAX) on the unit's control group combines them, and every rank runs
`agree` on the same combined vote, so all reach the same `Plan` without a coordinator: whether
to step, which overlap schedule (their collectives must be issued in one order), whether to
switch to a staged expert placement before this step, and whether to park. Every field
combines by max (a field wanted as a min, the staged version, travels negated), so the
agreement is one small all-reduce: log2(ranks) rounds, not a gather of every rank's vote.
`tuner` (pipelines/overlap.py) is fed the previous step's ms per token of the busiest rank
(slowest step over most tokens), the same number on every rank, so auto's choice stays
unanimous too.
Never: talks to Ray or torch.distributed (the rank does the all-reduce), reads a clock, or
holds per-rank state beyond what the votes carry.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from epserve.pipelines.overlap_tuner import OverlapTuner, choose_schedule, step_phase, tuner_record


@dataclass(frozen=True)
class Vote:
    """One rank's state before a step, or (after the all-reduce) the unit's."""

    stop: int = 0                # the rank is shutting down (any)
    has_work: int = 0            # requests waiting, running or loading (any)
    wants_prefill: int = 0       # new prompts arrived or the batcher would prefill next (any)
    n_running: int = 0           # (max)
    ready_version: int = 0       # placement version staged AND asked for (min: every rank has it)
    step_us: int = 0             # wall time of the previous step, microseconds (max)
    n_tokens: int = 0            # tokens computed in the previous step (max)

    def encode(self) -> list[int]:
        """The all-reduce (MAX) form: ready_version negated, so max gives the min."""
        return [-int(v) if f.name == "ready_version" else int(v) for f, v in zip(fields(self), self._values())]

    def _values(self):
        return [getattr(self, f.name) for f in fields(self)]

    @classmethod
    def decode(cls, row) -> "Vote":
        return cls(*[-int(v) if f.name == "ready_version" else int(v) for f, v in zip(fields(cls), row)])


N_FIELDS = len(fields(Vote))


def combine(votes: list[Vote]) -> Vote:
    """What the MAX all-reduce of the encoded votes gives (the pure form, for tests and one rank)."""
    return Vote.decode([max(col) for col in zip(*(v.encode() for v in votes))])


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


def agree(unit: Vote, state: LoopState) -> Plan:
    """The plan every rank derives from the unit's combined vote (pure; feeds the tuner)."""
    if unit.stop:
        return Plan(False, None, None, None, False, True)
    if state.last is not None and state.mode == "auto" and state.tuner is not None:
        phase, split = state.last
        if phase is not None and unit.n_tokens > 0:
            tuner_record(state.tuner, phase, split, unit.step_us / 1e3 / unit.n_tokens)
    switch_to = unit.ready_version if unit.ready_version > state.version else None
    if not unit.has_work:
        return Plan(False, None, None, switch_to, switch_to is None, False)
    phase = step_phase(bool(unit.wants_prefill), unit.n_running)
    return Plan(True, phase, choose_schedule(state.mode, phase, state.tuner), switch_to, False, False)
