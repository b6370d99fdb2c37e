"""The driven step: a caller steps every rank of a unit itself, one remote call per rank per step.

Benchmarks only (bench units' central-driver baseline, bench overlap, `epserve bench --profile`):
the live system never drives ranks, each runs its own loop (actors/rank.py). A unit whose ranks
are driven was started with `drive=False`, so no loop runs beside these calls; every rank of the
unit must be called for every step (each joins the step's dispatch and combine).

RankActor's `step`, `profiled_step` and `time_collective` methods are thin entries into the
functions here, which run inside the rank process on the actor's own state (`rank` below is the
RankActor instance, not its handle). Owns the driven step's messages and the profiler's reading
of the schedule stages; never used by the loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

from epserve.messages import RankStats
from epserve.messages import TokenDelta
from epserve.pipelines.sequence import Sequence


@dataclass
class StepInput:
    """What the caller tells every rank before a driven step."""

    new: list[Sequence] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    switch_map: int | None = None      # switch to this staged placement version first
    schedule: str | None = None        # the overlap schedule (pipelines/overlap.py); None: one batch
    decode_only: bool = False          # no rank prefills in this step (DeepEP: low-latency kernels)


@dataclass
class StepOutput:
    deltas: list[TokenDelta]
    stats: RankStats
    has_work: bool
    rejected: list[tuple[str, Exception]] = field(default_factory=list)   # (request_id, its typed error)
    map_version: int = 0
    n_tokens: int = 0
    prefill_next: bool = False


def run_step(rank, inp: StepInput) -> StepOutput:
    """One driven step on `rank` (a RankActor instance): the placement switch if asked, aborts,
    new requests (handed-off KV imported), the engine step, the KV handoff's publication."""
    eng = rank.engine
    with rank.engine_lock:
        if inp.switch_map is not None:
            rank.switch_placement(inp.switch_map)
        rank.n_steps += 1
        for rid in inp.aborts:
            eng.abort(rid)
        rejected = rank.admit(inp.new)
        deltas = eng.step(inp.schedule, inp.decode_only)
        rank.kv.publish(deltas)
        return StepOutput(deltas, rank.stats_now(), eng.has_work, rejected, rank.versions.version,
                          eng.last_step_tokens, eng.can_prefill())


def profiled(step, trace_path: str):
    """step() under the PyTorch profiler; writes a Chrome trace (chrome://tracing, Perfetto) and
    returns (step's result, {stage: ms}): host ms per schedule stage (ops named like "MLP[0]@3"),
    and on CUDA also "<stage> gpu": kernel ms (the launches are asynchronous there)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        out = step()
    prof.export_chrome_trace(trace_path)
    stages: dict[str, float] = {}
    for ev in prof.key_averages():
        if "[" in ev.key and ev.key.split("[")[0].isupper():       # schedule ops: "MLP[0]@3"
            name = ev.key.split("[")[0]
            stages[name] = stages.get(name, 0.0) + ev.cpu_time_total / 1e3
            if torch.cuda.is_available():
                stages[f"{name} gpu"] = stages.get(f"{name} gpu", 0.0) + ev.device_time_total / 1e3
    return out, stages


def time_agreement(all_reduce, vote, n: int = 200) -> float:
    """Median ms of one agreement all-reduce of `vote` over n calls (every rank of the unit must
    call it at once, n times)."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        all_reduce(vote)
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]
