"""Step time with the two-micro-batch overlap on and off, prefill and decode, with an injected
per-exchange latency comparable to compute and with none (ratios from one run)."""
from __future__ import annotations

import statistics

import ray

from epserve.actors.cluster import ensure_ray
from epserve.actors.rank import StepInput
from epserve.actors.unit import UnitSupervisor
from epserve.bench.units import _time_steps
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.model.tiny import default_model_dir
from epserve.pipelines.runner import RankSpec
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape


def _measure(model_dir, args, overlap: bool, latency_s: float, n_steps: int = 10) -> dict:
    spec = RankSpec(model_dir, kernels="reference", kv_pages=256, overlap=overlap, latency_s=latency_s)
    sup = UnitSupervisor.remote(0, "bench", spec, UnitShape(1, 2, args.n_routed_experts), cpus_per_rank=0.01,
                                n_moe_layers=args.n_moe_layers)
    ray.get(sup.start.remote())
    ranks = ray.get(sup.rank_handles.remote())
    params = SamplingParams(max_tokens=10 ** 4, temperature=0.0, ignore_eos=True)
    k = iter(range(10 ** 6))

    def prompts(r, i):   # a fresh prefill batch per step: 2 prompts of 256 tokens per rank
        return StepInput(new=[Sequence(f"p{next(k)}", [5 + (j % 300) for j in range(256)], params) for _ in range(2)])
    prefill = _time_steps(ranks, prompts, n_steps)
    decode = _time_steps(ranks, lambda r, i: StepInput(), n_steps)     # the 2 x 20 running requests decode
    ray.get(sup.shutdown.remote())
    ray.kill(sup)
    return {"prefill_ms": statistics.median(prefill), "decode_ms": statistics.median(decode)}


def run(model: str | None = None, latency_ms: float = 5.0) -> dict:
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, 2)
    try:
        out = {}
        for lat in (0.0, latency_ms):
            off = _measure(model_dir, args, False, lat / 1e3)
            on = _measure(model_dir, args, True, lat / 1e3)
            out[f"latency_{lat:g}ms"] = {
                "off_ms": {k: round(v, 2) for k, v in off.items()},
                "on_ms": {k: round(v, 2) for k, v in on.items()},
                "speedup_on_vs_off": {k: round(off[k] / on[k], 3) for k in off}}
        out["note"] = ("2 ranks on one fake node (gloo over loopback), tiny model; latency is injected per "
                       "dispatch and per combine of every MoE layer")
        return out
    finally:
        if started is not None:
            started.shutdown()
