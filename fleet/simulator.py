"""Fleet simulator: a day (or a trace) of traffic through the live system's own decisions.

Owns the replay loop. Calls, unchanged and through their modules (so a test can wrap them), the
pure functions the live system calls: placement.capacity.desired_units every step,
placement.{prefill,decode}_balancer for sampled requests, placement.eplb once per EPLB interval,
placement.elastic for each decode-rank death asked for (fleet/rank_failures.py, after the replay).
Emits ledger tables so fleet.report.build_report gives the seed's table. Never imports Ray, an
actor or a Serve deployment; reads no file but a trace (fleet/traffic.py, which owns the traffic).

One step of step_s seconds (deterministic for a seed):
 1. arrivals: one cohort (Poisson count; token sums from the mix's means, never token by token)
    and a thinned sample of its requests, the probes (n_probes expected over the run);
 2. capacity: FleetLoad measured over the previous step (arrival tokens/s plus what still waits,
    the decode KV fraction) with unit capacities from the cost model -> desired_units -> whole
    units start (fresh names) or stop (latest first), one capacity row each;
 3. service: one fluid queue per phase; tokens beyond the running units' capacity wait;
 4. probes: a RankStats snapshot of every running rank; the balancers place each probe; TTFT and
    TPOT come from the cost model, the unit's slowest rank setting each lockstep step;
 5. ledger: one aggregate row per cohort (finish_reason 'cohort', decode_s 0) and one row per
    probe. build_report gives exact token totals, GPU-hours, nodes, cost, revenue and margin from
    them, and the output speed from the probes; the request count and KV length per output token
    are recomputed from the cohorts (an aggregate row cannot carry them) and replaced in the Report.

About 410 lines: the replay loop with the probes it samples each step; they are the next noun to
split out (_prefill_probes, _decode_probes, _probe_rows) if this file grows.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from epserve.fleet.cost_model import SEED, SEED_MIX, CostModel
from epserve.fleet.ledger import CAPACITY_SCHEMA, REQUESTS_SCHEMA, CapacityRow, RequestRow, rows_to_table
from epserve.fleet.rank_failures import failure_events
from epserve.fleet.report import Pricing, Report, build_report
from epserve.fleet.traffic import (DEEPSEEK_PROFILE, SEED_START, DiurnalTraffic, RequestMix, TraceTraffic, cohort_sums,
                                   read_trace)
from epserve.messages import RankStats
from epserve.placement import capacity, decode_balancer, prefill_balancer

# The seed's staircase (SEED "Day and night", Beijing hours): each step is 3 prefill + 1 decode units.
SEED_SCHEDULE = ((0.0, 23, 7), (1.25, 20, 6), (2.0, 17, 5), (2.75, 14, 4), (3.0, 11, 3), (3.5, 8, 2),
                 (6.5, 11, 3), (7.0, 14, 4), (7.5, 20, 6), (8.0, 23, 7), (8.5, 29, 9))


@dataclass(frozen=True)
class Scenario:
    """What to replay. start: aware datetime; the capacity schedule reads hours in its UTC offset.
    Units are nodes x gpus_per_node ranks. n_probes: requests followed one by one (expected).
    eplb_interval_s: how often EPLB reruns on the synthetic expert loads (None: skip it).
    rank_failures: decode-rank deaths over the run, elastic EP against rebuild (fleet/rank_failures.py)."""

    name: str
    traffic: DiurnalTraffic | TraceTraffic
    start: datetime = SEED_START
    duration_s: float = 86_400.0
    prefill_nodes_per_unit: int = 4
    decode_nodes_per_unit: int = 18
    gpus_per_node: int = 8
    n_probes: int = 600
    eplb_interval_s: float | None = 3_600.0
    eplb_layers: int = 4
    n_experts: int = 256
    n_redundant_experts: int = 32
    n_expert_groups: int = 8
    rank_failures: int = 0

    def __post_init__(self):
        if self.start.tzinfo is None:
            raise ValueError(f"Scenario.start={self.start!r} is naive; give a timezone")
        if not 0 < self.duration_s < math.inf:
            raise ValueError(f"Scenario.duration_s={self.duration_s} must be finite and > 0")
        for name in ("prefill_nodes_per_unit", "decode_nodes_per_unit", "gpus_per_node", "eplb_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"Scenario.{name}={getattr(self, name)} must be >= 1")
        if self.rank_failures < 0:
            raise ValueError(f"Scenario.rank_failures={self.rank_failures} must be >= 0")
        if self.n_probes < 0 or (self.eplb_interval_s is not None and not self.eplb_interval_s > 0):
            raise ValueError(f"Scenario: n_probes={self.n_probes} must be >= 0 and "
                             f"eplb_interval_s={self.eplb_interval_s} > 0 or None")


@dataclass(frozen=True)
class SimResult:
    """staircase: (s from start, prefill units, decode units, nodes) at the start and at every change.
    latency: probes' TTFT / TPOT percentiles (s). vs_seed: {figure: (simulated, seed, relative error)}."""

    scenario: str
    step_s: float
    staircase: tuple[tuple[float, int, int, int], ...]
    report: Report
    latency: dict
    utilization: dict
    eplb: dict | None
    vs_seed: dict[str, tuple[float, float, float]]
    why: str
    cost_source: str
    requests: pa.Table
    capacity: pa.Table
    rank_failures: dict | None = None

    @property
    def trough_nodes(self) -> int:
        return min(s[3] for s in self.staircase)

    def to_dict(self) -> dict:
        """JSON-ready (the ledger tables are left out)."""
        start = self.report.start
        return {
            "scenario": self.scenario, "step_s": self.step_s, "cost_model": self.cost_source,
            "staircase": [{"t_s": t, "time": (start + timedelta(seconds=t)).isoformat(), "prefill_units": p,
                           "decode_units": d, "nodes": n} for t, p, d, n in self.staircase],
            "report": self.report.to_dict(), "latency": self.latency, "utilization": self.utilization,
            "eplb": self.eplb, "rank_failures": self.rank_failures, "why": self.why,
            "vs_seed": {k: {"simulated": s, "seed": e, "rel_error": r} for k, (s, e, r) in self.vs_seed.items()},
        }


def deepseek_day() -> Scenario:
    """The seed's day, 2025-02-27 12:00 Beijing + 24 h: 608 B input tokens (56.3 % cached), 168 B output
    (SEED_MIX requests, 155.5 M of them), following DEEPSEEK_PROFILE. Replay with seed_policy()."""
    mix = RequestMix(SEED_MIX["prompt_tokens"], SEED_MIX["prompt_cv"], SEED["cache_hit_rate"],
                     SEED_MIX["hit_concentration"], SEED_MIX["output_tokens"], SEED_MIX["output_cv"])
    return Scenario("deepseek-day", DiurnalTraffic(SEED["output_tokens"] / mix.output_tokens, DEEPSEEK_PROFILE, mix))


def seed_policy(**overrides) -> capacity.CapacityPolicy:
    """SEED_SCHEDULE within the seed's bounds (8-29 prefill, 2-9 decode units), with a load guard.

    The seed's fleet ran at ~76 % of its capacity on average (CostModel.from_seed), and a drop needs
    the lower count under down_threshold, so the live default band [0.60, 0.85] holds the night steps
    back (deepseek-day: trough 86 nodes, not 68; +2.8 % average nodes); this band, [0.70, 0.90], lets
    the schedule lead. overrides: CapacityPolicy fields.
    """
    base = dict(schedule=capacity.parse_schedule(SEED_SCHEDULE), prefill_bounds=(8, 29), decode_bounds=(2, 9),
                up_threshold=0.90, down_threshold=0.70, downscale_delay_s=600.0)
    return capacity.CapacityPolicy(**(base | overrides))


def load_policy(prefill_bounds=(1, 29), decode_bounds=(1, 9)) -> capacity.CapacityPolicy:
    """No schedule: units follow load alone, with the live defaults (band [0.60, 0.85], 600 s delay)."""
    return capacity.CapacityPolicy(prefill_bounds=prefill_bounds, decode_bounds=decode_bounds)


def load_trace(path: str | Path, *, start: datetime = SEED_START, name: str | None = None) -> Scenario:
    """A Scenario replaying a trace file (format, errors: fleet/traffic.read_trace) from `start`, for
    the whole minutes that cover its last arrival."""
    traffic = read_trace(path)
    duration = (math.floor(traffic.ts_s[-1] / 60) + 1) * 60.0
    return Scenario(name or Path(path).name, traffic, start=start, duration_s=duration,
                    n_probes=min(600, len(traffic.ts_s)))


def _prefill_probes(cost: CostModel, units: list[int], gpus: int, new_tps: float, backlog_new: float,
                    per: np.ndarray, probes, rng) -> list[tuple[float, int, int]]:
    """(TTFT s, unit, rank) of each probe (prompt, cached) placed by pick_prefill_rank.

    Snapshot of rank (u, r): its unit is a uniform `phase` into a lockstep step; a rank's batch
    collects the new tokens arriving during one step, b[u, r] (mean B, the steady state of
    B = arrival rate * step(B), capped at a full batch; gamma spread for the few requests per
    batch), so phase * b has queued and the fleet's waiting tokens add backlog_new / ranks.
    TTFT = rest of the current step + full steps for queued tokens past a batch + the next
    step, as long as the unit's slowest rank with its booked probes. Only the probes go through
    the balancer; the background is spread as unbalanced arrivals would be (a pessimistic bound).
    """
    bmax, fixed = cost.prefill_max_batch_tokens, cost.prefill_fixed_s
    new_req, cached_req, pairs_req = per[0] - per[1], per[1], per[3]
    per_new = (cost.prefill_s(bmax, bmax * cached_req / new_req, bmax * pairs_req / new_req) - fixed) / bmax
    lam = new_tps / (len(units) * gpus)
    batch = bmax if lam * per_new >= 1 else min(bmax, lam * fixed / (1 - lam * per_new))
    shape = max(batch / new_req / 3, 1e-3)  # ~batch/new_req requests per batch, new-token cv ~1.4
    b = batch * rng.gamma(shape, 1 / shape, (len(units), gpus))
    phase = rng.random((len(units), 1))
    pending = phase * b + backlog_new / (len(units) * gpus)
    step_now = np.where(b.max(1) > 0, fixed + per_new * np.minimum(b, bmax).max(1), 0.0)
    at_next = pending + (1 - phase) * b  # background tokens of each rank at the next step boundary
    own_s = np.zeros_like(b)
    stats = [RankStats(unit=u, rank=r, n_waiting=int(q / new_req), pending_prefill_tokens=int(q),
                       pending_attn_work=q * pairs_req / new_req)
             for u, row in zip(units, pending.tolist()) for r, q in enumerate(row)]
    index = {u: i for i, u in enumerate(units)}
    out = []
    for prompt, cached in zip(*probes):
        new, cached = int(prompt - cached), int(cached)
        ref = prefill_balancer.pick_prefill_rank(stats, new, cached)
        stats = prefill_balancer.apply_prefill_choice(stats, ref, new, cached)
        u = index[ref.unit]
        own_s[u, ref.rank] += cost.prefill_s(new, cached) - fixed
        ahead = at_next[u, ref.rank]
        full_steps = max(math.ceil(ahead / bmax) - 1, 0) * (fixed + per_new * bmax)
        next_step = fixed + (per_new * np.minimum(at_next[u], bmax) + own_s[u]).max()
        out.append(((1 - phase[u, 0]) * step_now[u] + full_steps + next_step, ref.unit, ref.rank))
    return out


def _decode_probes(cost: CostModel, units: list[int], gpus: int, out_tps: float, kv_len: float,
                   probes, rng) -> list[tuple[float, int, int] | None]:
    """(TPOT s, unit, rank) of each probe (prompt, output) placed by pick_decode_rank; None when no
    rank has the KV blocks. Snapshot: every rank runs the count that produces out_tps
    (CostModel.decode_requests_per_gpu) to within one request (the balancer keeps counts even),
    holding the sum of that many KV lengths of mean kv_len and cv 1 (KV stays uneven);
    TPOT = the step of the unit's slowest rank once the probe is booked (lockstep)."""
    shape = (len(units), gpus)
    n_avg = cost.decode_requests_per_gpu(out_tps / (len(units) * gpus), kv_len)
    n = np.floor(n_avg) + (rng.random(shape) < n_avg % 1)
    n = np.minimum(n, cost.decode_batch_limit(kv_len))
    kv = n * kv_len * np.clip(1 + rng.standard_normal(shape) / np.sqrt(np.maximum(n, 1)), 0, None)
    total = cost.kv_tokens_per_gpu // 64
    used = np.minimum(np.ceil(kv / 64), total).astype(int)
    stats = [RankStats(unit=u, rank=r, n_running=int(k), kv_blocks_used=int(b), kv_blocks_total=total)
             for u, ks, bs in zip(units, n.tolist(), used.tolist()) for r, (k, b) in enumerate(zip(ks, bs))]
    index = {u: i for i, u in enumerate(units)}
    out = []
    for prompt, output in zip(*probes):
        need = math.ceil((prompt + output) / 64)
        ref = decode_balancer.pick_decode_rank(stats, need)
        if ref is None:
            out.append(None)
            continue
        stats = decode_balancer.apply_decode_choice(stats, ref, need)
        u = index[ref.unit]
        n[u, ref.rank] += 1
        kv[u, ref.rank] += prompt + output / 2
        steps = np.where(n[u] > 0, cost.decode_fixed_s + cost.decode_s_per_request * n[u]
                         + cost.decode_s_per_kv_token * kv[u], 0.0)
        out.append((float(steps.max()), ref.unit, ref.rank))
    return out


def _eplb_imbalance(sc: Scenario, n_windows: int, rng) -> dict:
    """Mean balancedness (max / mean GPU expert load, 1.0 = even) per unit role, over n_windows of
    synthetic loads (lognormal expert hotness, sigma 1, drifting AR(1) 0.9 per window): the static
    layout (slot s holds expert s mod E) vs EPLB rerun on the previous window's loads."""
    try:
        from epserve.placement import eplb
    except ImportError as err:
        raise ImportError("fleet.simulator needs placement/eplb.py (rebalance_experts, balancedness) for the "
                          "EPLB estimate; use a Scenario with eplb_interval_s=None to skip it") from err
    n_layers, n_experts = sc.eplb_layers, sc.n_experts
    n_slots = n_experts + sc.n_redundant_experts
    hot = rng.standard_normal((n_layers, n_experts))
    weights = []
    for _ in range(n_windows + 1):
        hot = 0.9 * hot + math.sqrt(1 - 0.81) * rng.standard_normal(hot.shape)
        weights.append(np.exp(hot))
    static = np.tile(np.arange(n_slots) % n_experts, (n_layers, 1))
    out = {"windows": n_windows, "layers": n_layers, "slots": n_slots}
    for role, nodes in (("prefill", sc.prefill_nodes_per_unit), ("decode", sc.decode_nodes_per_unit)):
        gpus = nodes * sc.gpus_per_node
        without, with_ = [], []
        for before, now in zip(weights, weights[1:]):
            phy2log = eplb.rebalance_experts(before, n_slots, sc.n_expert_groups, nodes, gpus)[0]
            with_.append(float(eplb.balancedness(now, phy2log, gpus).mean()))
            without.append(float(eplb.balancedness(now, static, gpus).mean()))
        out[role] = {"gpus": gpus, "without_eplb": float(np.mean(without)), "with_eplb": float(np.mean(with_))}
    return out


def _resize(running: list[int], next_id: list[int], role: str, want: int, gpus: int, ts, rows: list) -> None:
    """Start fresh units or stop the latest ones until `want` run, one CapacityRow each."""
    while len(running) < want:
        running.append(next_id[0])
        rows.append(CapacityRow(ts=ts, unit=f"{role}-{next_id[0]}", role=role, event="start", gpus=gpus))
        next_id[0] += 1
    while len(running) > want:
        rows.append(CapacityRow(ts=ts, unit=f"{role}-{running.pop()}", role=role, event="stop", gpus=gpus))


def _probe_rows(sc, cost, k, coh, per, running, served_tps, backlog, cap_tps, rng, latency) -> list[RequestRow]:
    """One RequestRow per probe of step k; appends TTFT/TPOT to latency["ttft"/"tpot"]. A probe no rank
    can take (no running unit, no free KV blocks) is 'overloaded': it keeps its tokens, but no times."""
    prompt, cached, output, t_arr = coh.probes
    g_p, g_d = sc.prefill_nodes_per_unit * sc.gpus_per_node, sc.decode_nodes_per_unit * sc.gpus_per_node
    new_share, kv_len = (per[0] - per[1]) / per[0], per[4] / max(per[2], 1.0)
    none = [None] * prompt.size
    pre = _prefill_probes(cost, running[0], g_p, served_tps[0] * new_share, backlog[0] * new_share, per,
                          (prompt, cached), rng) if running[0] else none
    dec = _decode_probes(cost, running[1], g_d, served_tps[1], kv_len, (prompt, output), rng) if running[1] else none
    wait_d = backlog[1] / cap_tps[1] if cap_tps[1] > 0 else math.inf  # output tokens queued for decode
    rows = []
    for i, (p, d) in enumerate(zip(pre, dec)):
        row = dict(request_id=f"probe-{k}-{i}", tenant="sim", model=sc.name, prompt_tokens=int(prompt[i]),
                   cache_hit_tokens=int(cached[i]), output_tokens=int(output[i]))
        arrival = sc.start + timedelta(seconds=float(t_arr[i]))
        if p is None or d is None or not math.isfinite(wait_d):
            latency["overloaded"] += 1
            rows.append(RequestRow(ts=arrival, ttft_s=0.0, decode_s=0.0, finish_reason="overloaded", **row))
            continue
        decode_s = wait_d + int(output[i]) * d[0]
        latency["ttft"].append(p[0])
        latency["tpot"].append(d[0])
        # Stamped at its finish, but no later than the window's last microsecond: in a steady state the
        # requests still running at the end stand in for the earlier ones finishing at the start.
        finish = min(float(t_arr[i]) + p[0] + decode_s, sc.duration_s - 1e-6)
        rows.append(RequestRow(ts=sc.start + timedelta(seconds=finish), ttft_s=p[0], decode_s=decode_s,
                               prefill_unit=p[1], prefill_rank=p[2], decode_unit=d[1], decode_rank=d[2],
                               finish_reason="length", **row))
    return rows


def simulate(scenario: Scenario, policy: capacity.CapacityPolicy, cost: CostModel, pricing: Pricing = Pricing(),
             step_s: float = 60.0, seed: int = 0) -> SimResult:
    """Replay `scenario` under `policy` in steps of step_s seconds (the module docstring's steps 1-5)."""
    sc = scenario
    if not 0 < step_s < math.inf:
        raise ValueError(f"step_s={step_s} must be finite and > 0")
    rng = np.random.default_rng(seed)
    gpus = (sc.prefill_nodes_per_unit * sc.gpus_per_node, sc.decode_nodes_per_unit * sc.gpus_per_node)
    nodes = lambda units: units[0] * sc.prefill_nodes_per_unit + units[1] * sc.decode_nodes_per_unit  # noqa: E731
    bounds = (policy.prefill_bounds, policy.decode_bounds)
    clamp = lambda units: tuple(min(max(n, lo), hi) for n, (lo, hi) in zip(units, bounds))  # noqa: E731
    hour0 = sc.start.hour + sc.start.minute / 60 + sc.start.second / 3600
    frac = min(1.0, sc.n_probes / max(sc.traffic.expected_requests(sc.duration_s), 1.0))
    base = sc.traffic.per_request()
    cur, state = clamp(capacity.scheduled_units(policy, hour0)), capacity.CapacityState()
    running, next_id, cap_rows, req_rows, stairs = ([], []), ([0], [0]), [], [], []
    backlog, prev, kv_frac = np.zeros(2), None, 0.0  # tokens waiting [input, output]; last step's tokens/s
    totals, arrived, offered, peak = np.zeros(3), np.zeros(2), np.zeros(2), np.zeros(2)
    above = {"held": 0, "load": 0, "node_s": 0.0}
    latency = {"ttft": [], "tpot": [], "overloaded": 0}
    for k in range(math.ceil(sc.duration_s / step_s - 1e-9)):
        t0, t1 = k * step_s, min((k + 1) * step_s, sc.duration_s)
        dt, hour = t1 - t0, (hour0 + t0 / 3600) % 24
        coh = sc.traffic.arrivals(t0, t1, hour0, frac, rng)
        per = coh.sums / coh.n if coh.n and coh.sums[0] > coh.sums[1] else base
        kv_len = per[4] / max(per[2], 1.0)
        unit_tps = np.array([cost.prefill_unit_tps(gpus[0], per[0] - per[1], per[1], per[3]),
                             cost.decode_unit_tps(gpus[1], kv_len)])
        rates = coh.sums[[0, 2]] / dt  # arriving [input, output] tokens/s
        seen = (rates if prev is None else prev) + backlog / dt
        load = capacity.FleetLoad(now_s=t0, prefill_demand_tps=seen[0], decode_output_tps=seen[1],
                                  decode_kv_used_fraction=kv_frac, prefill_unit_tps=unit_tps[0],
                                  decode_unit_tps=unit_tps[1])
        cur, state = capacity.desired_units(policy, load, hour, cur, state)
        for role, i in (("prefill", 0), ("decode", 1)):
            _resize(running[i], next_id[i], role, cur[i], gpus[i], sc.start + timedelta(seconds=t0), cap_rows)
        if not stairs or stairs[-1][1:3] != cur:
            stairs.append((t0, cur[0], cur[1], nodes(cur)))
        extra = nodes(cur) - nodes(clamp(capacity.scheduled_units(policy, hour)))
        if extra > 0:
            above["held" if state.prefill_hold or state.decode_hold else "load"] += 1
            above["node_s"] += extra * dt

        cap_tps = np.array(cur) * unit_tps
        queued = backlog + rates * dt
        served = np.minimum(queued, cap_tps * dt)
        backlog, prev = queued - served, rates
        arrived, offered = arrived + rates * dt, offered + cap_tps * dt
        peak = np.maximum(peak, rates / np.maximum(cap_tps, 1e-9))
        n_gpu = cost.decode_requests_per_gpu(served[1] / dt / (cur[1] * gpus[1]), kv_len) if cur[1] else 0.0
        kv_frac = min(1.0, n_gpu * kv_len / cost.kv_tokens_per_gpu)

        if coh.probes[0].size:
            req_rows += _probe_rows(sc, cost, k, coh, per, running, served / dt, backlog, cap_tps, rng, latency)
        if coh.n > coh.probes[0].size:
            rest = coh.sums - cohort_sums(*coh.probes[:3])
            n_in = int(round(rest[0]))
            req_rows.append(RequestRow(
                ts=sc.start + timedelta(seconds=(t0 + t1) / 2), request_id=f"cohort-{k}", tenant="sim",
                model=sc.name, prompt_tokens=n_in, cache_hit_tokens=min(int(round(rest[1])), n_in),
                output_tokens=int(round(rest[2])), ttft_s=0.0, decode_s=0.0, finish_reason="cohort"))
        totals += (coh.n, coh.sums[2], coh.sums[4])

    requests, cap_table = rows_to_table(req_rows, REQUESTS_SCHEMA), rows_to_table(cap_rows, CAPACITY_SCHEMA)
    report = build_report(requests, cap_table, pricing, start=sc.start,
                          end=sc.start + timedelta(seconds=sc.duration_s), gpus_per_node=sc.gpus_per_node)
    report = dataclasses.replace(report, n_requests=int(totals[0]),
                                 avg_kv_len_per_output_token=totals[2] / totals[1] if totals[1] else None)
    pct = lambda xs: {"p50": float(np.percentile(xs, 50)), "p99": float(np.percentile(xs, 99))}  # noqa: E731
    lat = {"n_probes": len(latency["ttft"]) + latency["overloaded"], "n_overloaded": latency["overloaded"],
           "ttft_s": pct(latency["ttft"]) if latency["ttft"] else None,
           "tpot_s": pct(latency["tpot"]) if latency["tpot"] else None}
    util = {role: {"mean": float(arrived[i] / offered[i]) if offered[i] else None, "max": float(peak[i])}
            for i, role in enumerate(("prefill", "decode"))}
    eplb = None if sc.eplb_interval_s is None else _eplb_imbalance(
        sc, max(1, math.ceil(sc.duration_s / sc.eplb_interval_s)), np.random.default_rng([seed, 1]))
    why = "; ".join([
        f"whole units: the fleet moves in {sc.prefill_nodes_per_unit}-node prefill and "
        f"{sc.decode_nodes_per_unit}-node decode units ({len(stairs) - 1} changes)",
        f"{above['held'] + above['load']} steps ran above the schedule ({above['node_s'] / 3600:+,.0f} node-hours, "
        f"{above['node_s'] / sc.duration_s:+.2f} average nodes): in {above['held']} a downscale waited out its "
        f"{policy.downscale_delay_s:.0f} s delay, in {above['load']} load kept units up (hysteresis band "
        f"[{policy.down_threshold:.2f}, {policy.up_threshold:.2f}]; arrivals/capacity peaked at "
        f"prefill {peak[0]:.2f}, decode {peak[1]:.2f})",
        f"tokens: Poisson arrivals ({totals[0]:,.0f} requests); revenue and margin follow tokens and cost",
        f"speed: {len(latency['tpot'])} probes; every decode step waits for its unit's slowest rank (uneven KV), "
        f"while the cost model's speed is an average rank's",
    ])
    failures = None if not sc.rank_failures else failure_events(
        sc, lambda t: [s[2] for s in stairs if s[0] <= t][-1], sc.rank_failures, np.random.default_rng([seed, 2]))
    return SimResult(sc.name, step_s, tuple(stairs), report, lat, util, eplb,
                     compare_with_seed(report, min(s[3] for s in stairs)), why, cost.source, requests, cap_table,
                     failures)


def compare_with_seed(report: Report, trough_nodes: float) -> dict[str, tuple[float, float, float]]:
    """{figure: (simulated, seed, (simulated - seed) / seed)} for each of the seed's headline figures."""
    r = report
    sim = {"avg_nodes": r.avg_nodes, "peak_nodes": r.peak_nodes, "trough_nodes": trough_nodes,
           "cost_usd": r.cost_usd, "revenue_usd": r.revenue_usd,
           "margin_pct": None if r.margin is None else 100 * r.margin, "input_tokens": r.input_tokens,
           "cache_hit_rate": r.cache_hit_rate, "output_tokens": r.output_tokens,
           "avg_output_speed_tps": r.avg_output_speed_tps, "avg_kv_len_per_output_token": r.avg_kv_len_per_output_token,
           "prefill_input_tps_per_node": r.prefill_input_tps_per_node,
           "decode_output_tps_per_node": r.decode_output_tps_per_node}
    return {k: (float(v), SEED[k], (float(v) - SEED[k]) / SEED[k]) for k, v in sim.items() if v is not None}
