"""The lockstep's control cost, old loop against new, for units of 1, 2, 4 and 8 ranks.

old: a central caller fans one step() call out to every rank per step and awaits them all (what
     the unit supervisor did before ranks drove their own loop);
new: each rank runs its own loop (actors/rank.py): an inbox read, one small all-gather of votes,
     the step, one fire-and-forget push of its deltas. Its rank-side timings split every step
     into the agreement collective, the step itself (compute and the MoE exchanges) and the
     rest: the control cost the loop adds.
Runs on an embedded single-node Ray with fake GPUs; each rank is its own process and the
exchanges are gloo over loopback, so on a small box the ranks also compete for cores.
"""
from __future__ import annotations

import statistics
import time

import ray

from epserve.actors.cluster import ensure_ray
from epserve.actors.driven_step import StepInput
from epserve.actors.unit import UnitSupervisor
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.model.tiny import default_model_dir
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape


def _time_steps(ranks, inputs_fn, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        ray.get([rk.step.remote(inputs_fn(r, i)) for r, rk in enumerate(ranks)])
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _requests(tag: str, n_ranks: int, batch: int, n_steps: int) -> dict[int, list[Sequence]]:
    params = SamplingParams(max_tokens=n_steps + 1, temperature=0.0, ignore_eos=True)
    return {r: [Sequence(f"{tag}{r}-{j}", [5 + j % 100] * 16, params) for j in range(batch) if j % n_ranks == r]
            for r in range(n_ranks)}


def _old_loop(model_dir, args, n: int, batch: int, n_steps: int) -> dict:
    sup = UnitSupervisor.remote(0, "bench", RankSpec(model_dir, kernels="reference", kv_pages=128),
                                UnitShape(1, n, args.n_routed_experts), cpus_per_rank=0.01,
                                n_moe_layers=args.n_moe_layers)
    ray.get(sup.start.remote(drive=False))
    ranks = ray.get(sup.rank_handles.remote())
    try:
        empty = _time_steps(ranks, lambda r, i: StepInput(), n_steps)
        first = _requests("o", n, batch, n_steps)
        _time_steps(ranks, lambda r, i: StepInput(new=first.get(r, [])), 1)
        decode = _time_steps(ranks, lambda r, i: StepInput(), n_steps)
        coll = max(ray.get([rk.time_collective.remote(200) for rk in ranks])) if n > 1 else 0.0
        return {"empty_step_ms": statistics.median(empty), f"decode_batch{batch}_step_ms": statistics.median(decode),
                "agreement_all_reduce_ms": coll}
    finally:
        ray.get(sup.shutdown.remote())
        ray.kill(sup)


def _loop_delta(before: list[dict], after: list[dict]) -> dict:
    """ms per step of each part, from the ranks' own timings; the slowest rank's figures."""
    per_rank = []
    for b, a in zip(before, after):
        steps = max(1, a["steps"] - b["steps"])
        d = {k: (a[k] - b[k]) * 1e3 / steps for k in ("total", "agree", "step", "inbox", "push", "cpu_control")}
        d["control"] = d["total"] - d["agree"] - d["step"]
        per_rank.append(d)
    return {k: max(r[k] for r in per_rank) for k in per_rank[0]}


def _new_loop(model_dir, args, n: int, batch: int, n_steps: int) -> dict:
    sup = UnitSupervisor.remote(0, "bench", RankSpec(model_dir, kernels="reference", kv_pages=128),
                                UnitShape(1, n, args.n_routed_experts), cpus_per_rank=0.01,
                                n_moe_layers=args.n_moe_layers)
    ray.get(sup.start.remote())
    try:
        out = {}
        for name, b in (("one_request", 1), (f"decode_batch{batch}", batch)):
            warm = _requests(f"w{name}", n, b, 2)
            ray.get(sup.generate.remote([(s, r) for r, seqs in warm.items() for s in seqs]))
            before = ray.get(sup.status.remote())["loop_timing"]
            reqs = _requests(name, n, b, n_steps)
            t = time.perf_counter()
            ray.get(sup.generate.remote([(s, r) for r, seqs in reqs.items() for s in seqs]))
            wall = time.perf_counter() - t
            time.sleep(0.3)                                # the ranks' last pushes land
            after = ray.get(sup.status.remote())["loop_timing"]
            d = _loop_delta(before, after)
            out[name] = {"step_ms": round(d["total"], 3), "agree_ms": round(d["agree"], 3),
                         "compute_and_exchange_ms": round(d["step"], 3), "control_ms": round(d["control"], 3),
                         "control_cpu_ms": round(d["cpu_control"], 3),
                         "inbox_ms": round(d["inbox"], 4), "push_ms": round(d["push"], 4),
                         "wall_ms_per_token_step": round(wall * 1e3 / (n_steps + 1), 3)}
        return out
    finally:
        ray.get(sup.shutdown.remote())
        ray.kill(sup)


def run(model: str | None = None, sizes=(1, 2, 4, 8), batch: int = 32, n_steps: int = 40) -> dict:
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    started = ensure_ray(None, 1, max(sizes))
    rows = []
    try:
        for n in sizes:
            old = _old_loop(model_dir, args, n, batch, n_steps)
            new = _new_loop(model_dir, args, n, batch, n_steps)
            rows.append({"ranks": n, "old_loop": {k: round(v, 3) for k, v in old.items()}, "new_loop": new})
    finally:
        if started is not None:
            started.shutdown()
    key = f"decode_batch{batch}"
    ratio = {what: {r["ranks"]: round(r["new_loop"][key][what] / max(rows[0]["new_loop"][key][what], 1e-6), 2)
                    for r in rows} for what in ("control_ms", "control_cpu_ms")}
    return {"rows": rows, "new_control_ratio_vs_1_rank": ratio, "ep144_model": ep144_model(rows, key)}


def ep144_model(rows: list[dict], key: str, ranks: int = 144) -> dict:
    """The new loop's control cost per step at EP144, from per-hop costs measured here.

    control(N) = inbox read + delta push + agree() (each rank's own CPU work, measured at one rank:
    it does not grow with N: a rank reads only its inbox, pushes only its deltas, and agree() reads
    one combined vote) + the agreement: recursive doubling (actors/agreement.py), exchange_steps(N)
    pairwise exchanges in a row (9 at 144: 7 rounds and a fold in and out), each costing the
    measured 2-rank agreement (which is one such exchange). Loopback gloo here is the measured hop;
    the growth with N is measured by `python -m epserve.bench.vote_round` on a host with a core per rank.
    """
    from epserve.actors.agreement import exchange_steps
    from epserve.pipelines.lockstep import LoopState, Vote, agree
    one = rows[0]["new_loop"][key]
    two = next((r for r in rows if r["ranks"] == 2), None)
    per_round = two["old_loop"]["agreement_all_reduce_ms"] if two else 0.0
    t = time.perf_counter()
    for _ in range(1000):
        agree(Vote(has_work=1, n_running=64), LoopState())
    agree_ms = (time.perf_counter() - t)
    rounds = exchange_steps(ranks)
    per_rank = one["inbox_ms"] + one["push_ms"] + agree_ms
    return {"ranks": ranks, "per_rank_work_ms": round(per_rank, 4), "exchange_ms": round(per_round, 4),
            "exchanges_in_a_row": rounds, "control_ms_per_step": round(per_rank + rounds * per_round, 3),
            "measured_agreement_ms": {r["ranks"]: round(r["old_loop"]["agreement_all_reduce_ms"], 4) for r in rows},
            "assumptions": "per-rank work measured with one rank (inbox read, one push of the step's deltas, agree); "
                           "the agreement as exchange_steps(N) pairwise exchanges of the measured 2-rank agreement "
                           "(recursive doubling over gloo send/recv)"}
