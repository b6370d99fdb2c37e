"""Step time with the overlapped schedules on and off, prefill and decode, as ratios from one run:
with no injected exchange cost, and with a latency or a bandwidth comparable to the compute it
should hide. `profile` writes PyTorch profiler traces of an overlapped prefill and decode step on
every rank.

One 2-rank unit per injected cost (on two GPUs when the host has them, else CPU ranks over
gloo); on and off steps alternate within it (the schedule is chosen per step,
pipelines/overlap.py), so both see the same machine state; then `auto` steps choose with the
OverlapTuner the live supervisor uses. The default model is a random one with 512-wide layers
(made once in the cache): the tiny model's kernels are too small for the split to be anything
but launch overhead on a CPU.
"""
from __future__ import annotations

import itertools
import os
import statistics
import time

import ray
import torch

from epserve.actors.cluster import ensure_ray
from epserve.actors.driven_step import StepInput
from epserve.actors.unit import UnitSupervisor
from epserve.config import cache_root
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.model.tiny import make_tiny_model
from epserve.pipelines.overlap_tuner import OverlapTuner, choose_schedule, tuner_record
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape

PROMPT_TOKENS, PROMPTS_PER_STEP = 256, 2
BENCH_MODEL = {"hidden_size": 512, "intermediate_size": 512, "moe_intermediate_size": 256,
               "num_attention_heads": 8, "num_key_value_heads": 8, "q_lora_rank": 256, "kv_lora_rank": 128,
               "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64}


def bench_model_dir() -> str:
    out = cache_root() / "bench-deepseek-v3-512"
    if not (out / "config.json").exists():
        try:
            make_tiny_model(out, config_overrides=BENCH_MODEL)
        except FileExistsError:        # made concurrently
            pass
    return str(out)


class _Unit:
    """A 2-rank unit on one fake node, stepped directly (no supervisor loop) for timing."""

    def __init__(self, model_dir: str, args, latency_s: float = 0.0, bandwidth: float = 0.0,
                 kernels: str = "reference", n_gpus: int | None = None):
        gpus = n_gpus or (2 if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else 0)
        spec = RankSpec(model_dir, kernels=kernels if not gpus else "auto", kv_pages=512, overlap="on",
                        latency_s=latency_s, bandwidth=bandwidth, device="cuda" if gpus else "cpu",
                        dtype="bfloat16" if n_gpus else "float32", cuda_graphs=False)
        self.sup = UnitSupervisor.remote(0, "bench", spec, UnitShape(1, max(2, gpus), args.n_routed_experts),
                                         cpus_per_rank=0.01, n_moe_layers=args.n_moe_layers)
        self.info = ray.get(self.sup.start.remote(drive=False))       # the bench steps the ranks itself
        self.ranks = ray.get(self.sup.rank_handles.remote())
        self.dispatcher = self.info[0].get("ep_dispatch")
        self.ids = itertools.count()
        self.params = SamplingParams(max_tokens=1024, temperature=0.0, ignore_eos=True)   # outlives the bench

    def prompts(self) -> list[Sequence]:
        return [Sequence(f"p{next(self.ids)}", [5 + (j * 7 + len(str(j))) % 300 for j in range(PROMPT_TOKENS)],
                         self.params) for _ in range(PROMPTS_PER_STEP)]

    def step(self, schedule: str | None, new: bool, profile_dir: str | None = None) -> float:
        t = time.perf_counter()
        # decode steps say so (decode_only): a DeepEP unit then runs its low-latency kernels
        inputs = [StepInput(new=self.prompts() if new else [], schedule=schedule, decode_only=not new)
                  for _ in self.ranks]
        if profile_dir:
            outs = ray.get([rk.profiled_step.remote(i, os.path.join(profile_dir, f"{schedule}-rank{r}.json"))
                            for r, (rk, i) in enumerate(zip(self.ranks, inputs))])
            self.stages = [o[1] for o in outs]
        else:
            outs = ray.get([rk.step.remote(i) for rk, i in zip(self.ranks, inputs)])
        ms = (time.perf_counter() - t) * 1e3
        self.last = [o[0] if isinstance(o, tuple) else o for o in outs]
        for o in self.last:
            if o.rejected:      # a bench that times empty steps would be a wrong answer
                raise RuntimeError(f"bench request rejected: {o.rejected[0][1]}")
        return ms

    def close(self) -> None:
        ray.get(self.sup.shutdown.remote())
        ray.kill(self.sup)


def _on_off(unit: _Unit, phase: str, n_steps: int) -> dict:
    """Median step ms with the phase's schedule (on), with one batch (off), steps alternating;
    then with `auto`'s choice once its probes are done."""
    on, off, auto = [], [], []
    for i in range(2 * n_steps):
        use = i % 2 == 0
        ms = unit.step(phase if use else None, new=phase == "prefill")
        (on if use else off).append(ms)
    tuner = OverlapTuner()
    for i in range(2 * tuner.probes + n_steps):
        sched = choose_schedule("auto", phase, tuner)
        ms = unit.step(sched, new=phase == "prefill")
        tuner_record(tuner, phase, sched is not None, ms)
        if i >= 2 * tuner.probes:           # after its probes (12 of every 500 steps)
            auto.append(ms)
    med = {k: statistics.median(v) for k, v in (("on", on), ("off", off), ("auto", auto))}
    return {"on_ms": round(med["on"], 2), "off_ms": round(med["off"], 2), "auto_ms": round(med["auto"], 2),
            "speedup_on_vs_off": round(med["off"] / med["on"], 3),
            "speedup_auto_vs_off": round(med["off"] / med["auto"], 3), "auto_splits": tuner.best[phase],
            "tokens_per_rank": PROMPTS_PER_STEP * PROMPT_TOKENS if phase == "prefill" else
            max(o.stats.n_running for o in unit.last)}


def _measure(model_dir, args, n_steps: int, latency_s: float = 0.0, bandwidth: float = 0.0,
             decode: bool = True) -> dict:
    """Both phases; decode=False skips the decode steps (prefill runs anyway: it makes decode's batch)."""
    unit = _Unit(model_dir, args, latency_s, bandwidth)
    try:
        unit.step(None, new=True)                       # warm-up
        out = {"prefill": _on_off(unit, "prefill", n_steps)}
        if decode:
            out["decode"] = _on_off(unit, "decode", n_steps)
        return out
    finally:
        unit.close()


def _exchange_bytes(args, tokens: int) -> int:
    """What one rank sends in a step's exchanges: a dispatch row (activations + 4-byte slot id) and
    a combine row per (token, expert) pair per MoE layer, float32."""
    return tokens * args.n_activated_experts * args.n_moe_layers * (2 * args.dim * 4 + 4)


def run_gpus(gpus: int, model: str | None = None, n_steps: int = 12) -> dict:
    """`bench overlap --gpus N`: a unit of N ranks on N GPUs of this host, real exchanges (NCCL or
    DeepEP, whichever the unit picks), overlap on / off / auto for prefill and decode."""
    from epserve.bench.ep import require_gpus
    require_gpus(gpus, "overlap --gpus")
    model_dir = str(model or bench_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, gpus)
    try:
        unit = _Unit(model_dir, args, n_gpus=gpus)
        try:
            unit.step(None, new=True)                       # warm-up
            out = {"prefill": _on_off(unit, "prefill", n_steps), "decode": _on_off(unit, "decode", n_steps)}
            return {"model": model_dir, "gpus": gpus, "device": torch.cuda.get_device_name(),
                    "ep_dispatch": unit.dispatcher, "kernels": unit.info[0].get("kernels"), "real_exchanges": out,
                    "note": f"{gpus} ranks, one per GPU, no injected cost; on/off steps alternate in one unit, then "
                            "auto's tuner probes and picks (auto_ms: after its probes)"}
        finally:
            unit.close()
    finally:
        if started is not None:
            started.shutdown()


def run(model: str | None = None, latency_ms: float | None = None, n_steps: int = 12,
        gpus: int | None = None) -> dict:
    """Three regimes per phase: no injected cost; an injected latency; an injected bandwidth.
    Unless given, both are derived from the no-cost run so that communication is comparable to
    compute. Latency: each micro-batch's exchanges (2 per MoE layer) take as long as its half of
    the plain step's compute, L = off_ms / (4 x MoE layers) (splitting doubles the exchanges, so
    the plain step waits half as long as the split one). Bandwidth: a step's bytes take as long
    to send as the plain step computes (splitting does not change the bytes)."""
    if gpus:
        return run_gpus(gpus, model, n_steps)
    model_dir = str(model or bench_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, 2)
    try:
        base = _measure(model_dir, args, n_steps)
        out = {"model": model_dir, "no_injected_cost": base}
        for phase in ("prefill", "decode"):
            off_ms = base[phase]["off_ms"]
            lat = latency_ms if latency_ms is not None else off_ms / (4 * args.n_moe_layers)
            res = _measure(model_dir, args, n_steps, latency_s=lat / 1e3, decode=phase == "decode")
            out.setdefault("injected_latency", {})[phase] = {"latency_ms": round(lat, 2), **res[phase]}
            bw = _exchange_bytes(args, base[phase]["tokens_per_rank"]) / (off_ms / 1e3)
            res = _measure(model_dir, args, n_steps, bandwidth=bw, decode=phase == "decode")
            out.setdefault("injected_bandwidth", {})[phase] = {"bandwidth_MBps": round(bw / 1e6, 1), **res[phase]}
        out["note"] = ("2 ranks on one fake node, gloo over loopback, 1 CPU thread each; latency and bandwidth are "
                       "injected per dispatch and per combine of every MoE layer and micro-batch; on/off steps "
                       "alternate in one unit, then auto's tuner probes and picks (auto_ms: after its probes); "
                       f"prefill steps add {PROMPTS_PER_STEP} prompts of {PROMPT_TOKENS} tokens per rank")
        return out
    finally:
        if started is not None:
            started.shutdown()


def profile(out_dir: str, model: str | None = None, latency_ms: float = 0.0) -> dict:
    """Chrome traces of one overlapped prefill step and one overlapped decode step, every rank."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--profile {out_dir}: exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    model_dir = str(model or bench_model_dir())
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
