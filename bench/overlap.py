"""Step time with the overlapped schedules on and off, prefill and decode, as ratios from one run:
with no injected exchange latency, and with one comparable to the compute it should hide.
`profile` writes PyTorch profiler traces of an overlapped prefill and decode step on every rank.

One 2-rank unit per latency; on and off steps alternate within it (the schedule is chosen per
step, pipelines/overlap.py), so both see the same machine state.
"""
from __future__ import annotations

import itertools
import os
import statistics
import time

import ray

from epserve.actors.cluster import ensure_ray
from epserve.actors.rank import StepInput
from epserve.actors.unit import UnitSupervisor
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.model.tiny import default_model_dir
from epserve.pipelines.runner import RankSpec
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape

PROMPT_TOKENS, PROMPTS_PER_STEP = 256, 2


class _Unit:
    """A 2-rank unit on one fake node, stepped directly (no supervisor loop) for timing."""

    def __init__(self, model_dir: str, args, latency_s: float, kernels: str = "reference"):
        spec = RankSpec(model_dir, kernels=kernels, kv_pages=512, overlap=True, latency_s=latency_s)
        self.sup = UnitSupervisor.remote(0, "bench", spec, UnitShape(1, 2, args.n_routed_experts),
                                         cpus_per_rank=0.01, n_moe_layers=args.n_moe_layers)
        ray.get(self.sup.start.remote())
        self.ranks = ray.get(self.sup.rank_handles.remote())
        self.ids = itertools.count()
        self.params = SamplingParams(max_tokens=10 ** 4, temperature=0.0, ignore_eos=True)

    def prompts(self) -> list[Sequence]:
        return [Sequence(f"p{next(self.ids)}", [5 + (j * 7 + len(str(j))) % 300 for j in range(PROMPT_TOKENS)],
                         self.params) for _ in range(PROMPTS_PER_STEP)]

    def step(self, schedule: str | None, new: bool, profile_dir: str | None = None) -> float:
        t = time.perf_counter()
        inputs = [StepInput(new=self.prompts() if new else [], schedule=schedule) for _ in self.ranks]
        if profile_dir:
            outs = ray.get([rk.profiled_step.remote(i, os.path.join(profile_dir, f"{schedule}-rank{r}.json"))
                            for r, (rk, i) in enumerate(zip(self.ranks, inputs))])
            self.stages = [o[1] for o in outs]
        else:
            ray.get([rk.step.remote(i) for rk, i in zip(self.ranks, inputs)])
        return (time.perf_counter() - t) * 1e3

    def close(self) -> None:
        ray.get(self.sup.shutdown.remote())
        ray.kill(self.sup)


def _on_off(unit: _Unit, phase: str, n_steps: int) -> dict:
    """Median step ms with the phase's schedule and with one batch, steps alternating."""
    on, off = [], []
    for i in range(2 * n_steps):
        use = i % 2 == 0
        ms = unit.step(phase if use else None, new=phase == "prefill")
        (on if use else off).append(ms)
    return {"on_ms": round(statistics.median(on), 2), "off_ms": round(statistics.median(off), 2),
            "speedup_on_vs_off": round(statistics.median(off) / statistics.median(on), 3)}


def _measure(model_dir, args, latency_s: float, n_steps: int) -> dict:
    unit = _Unit(model_dir, args, latency_s)
    try:
        unit.step(None, new=True)                       # warm-up
        prefill = _on_off(unit, "prefill", n_steps)     # leaves 2 x n_steps running sequences per rank
        decode = _on_off(unit, "decode", n_steps)
        return {"prefill": prefill, "decode": decode}
    finally:
        unit.close()


def run(model: str | None = None, latency_ms: float | None = None, n_steps: int = 8) -> dict:
    """latency_ms None: derive it from the no-latency run: one exchange's share of the plain
    decode step's compute (2 exchanges per MoE layer), the regime where overlap can hide it."""
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, 2)
    try:
        base = _measure(model_dir, args, 0.0, n_steps)
        out = {"latency_0ms": base}
        phases = {}
        for phase in ("prefill", "decode"):
            lat = latency_ms if latency_ms is not None else base[phase]["off_ms"] / (2 * args.n_moe_layers)
            phases.setdefault(round(lat, 2), []).append(phase)
        for lat, which in phases.items():
            res = _measure(model_dir, args, lat / 1e3, n_steps)
            for phase in which:
                out.setdefault(f"latency_{lat:g}ms", {})[phase] = res[phase]
        out["note"] = ("2 ranks on one fake node, gloo over loopback, tiny model; the latency is injected per "
                       "dispatch and per combine of every MoE layer; on/off steps alternate in one unit; "
                       f"prefill steps add {PROMPTS_PER_STEP} prompts of {PROMPT_TOKENS} tokens per rank")
        return out
    finally:
        if started is not None:
            started.shutdown()


def profile(out_dir: str, model: str | None = None, latency_ms: float = 0.0) -> dict:
    """Chrome traces of one overlapped prefill step and one overlapped decode step, every rank."""
    os.makedirs(out_dir, exist_ok=True)
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, 2)
    try:
        unit = _Unit(model_dir, args, latency_ms / 1e3)
        try:
            unit.step(None, new=True)                                   # warm-up, then decode-ready
            res = {}
            for phase in ("prefill", "decode"):
                ms = unit.step(phase, new=phase == "prefill", profile_dir=out_dir)
                res[phase] = {"step_ms": round(ms, 2),
                              "stage_ms_rank0": {k: round(v, 2) for k, v in sorted(unit.stages[0].items())}}
            files = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".json"))
            return {"traces": files, "view": "open in https://ui.perfetto.dev or chrome://tracing",
                    "latency_ms": latency_ms, **res}
        finally:
            unit.close()
    finally:
        if started is not None:
            started.shutdown()
