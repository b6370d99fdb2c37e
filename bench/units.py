"""What the all-to-all and the lockstep cost: step latency of units of 1, 2 and 4 ranks.

Runs on an embedded single-node Ray with fake GPUs; each rank is its own process and
the MoE exchange is gloo all_to_all_single over loopback.
"""
from __future__ import annotations

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


def _time_steps(ranks, inputs_fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        ray.get([rk.step.remote(inputs_fn(r, i)) for r, rk in enumerate(ranks)])
        out.append((time.perf_counter() - t) * 1e3)
    return out


def run(model: str | None = None, sizes=(1, 2, 4), batch: int = 32, n_steps: int = 20) -> list:
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, max(sizes))
    rows = []
    try:
        for n in sizes:
            shape = UnitShape(1, n, args.n_routed_experts)
            sup = UnitSupervisor.remote(0, "bench", RankSpec(model_dir, kernels="reference", kv_pages=128), shape,
                                        cpus_per_rank=0.01, n_moe_layers=args.n_moe_layers)
            ray.get(sup.start.remote())
            ranks = ray.get(sup.rank_handles.remote())
            empty = _time_steps(ranks, lambda r, i: StepInput(), n_steps)
            # batch-32 decode: 32 requests spread over the ranks, prefilled once, then timed decode steps
            params = SamplingParams(max_tokens=n_steps + 2, temperature=0.0, ignore_eos=True)
            first = {r: [Sequence(f"b{r}-{j}", [5 + j % 100] * 16, params) for j in range(batch) if j % n == r]
                     for r in range(n)}
            _time_steps(ranks, lambda r, i: StepInput(new=first[r]), 1)
            decode = _time_steps(ranks, lambda r, i: StepInput(), n_steps)
            rows.append({"ranks": n, "empty_step_ms": round(statistics.median(empty), 2),
                         f"decode_batch{batch}_step_ms": round(statistics.median(decode), 2),
                         f"decode_batch{batch}_tok_s": round(batch / statistics.median(decode) * 1e3, 1)})
            ray.get(sup.shutdown.remote())
            ray.kill(sup)
    finally:
        if started is not None:
            started.shutdown()
    return rows
