"""`epserve simulate`: run the fleet simulator and render what the CLI prints.

Owns the choice of scenario, policy and cost model for the command, and the text (or JSON)
output: the capacity staircase (one line per change), the statistics table
(fleet.report.format_report), latency percentiles, expert balance and the comparison with
the seed's day. Writes only the PNG it is asked for; `cli.py` prints the returned string.
"""
from __future__ import annotations

import dataclasses
import json
from datetime import timedelta

from epserve.fleet.cost_model import CostModel
from epserve.fleet.report import Pricing, format_report, plot_report
from epserve.fleet.simulator import SimResult, deepseek_day, load_policy, load_trace, seed_policy, simulate

SCENARIOS = {"deepseek-day": (deepseek_day, seed_policy)}  # name -> (Scenario builder, CapacityPolicy builder)
_LABELS = {  # figure -> (label, format of its value)
    "avg_nodes": ("average nodes", "{:,.2f}"), "peak_nodes": ("peak nodes", "{:,.0f}"),
    "trough_nodes": ("trough nodes", "{:,.0f}"), "cost_usd": ("cost per day", "${:,.0f}"),
    "revenue_usd": ("theoretical revenue", "${:,.0f}"), "margin_pct": ("cost profit margin", "{:,.1f} %"),
    "input_tokens": ("input tokens (B)", "{:,.1f}"), "cache_hit_rate": ("cache hit rate", "{:.3f}"),
    "output_tokens": ("output tokens (B)", "{:,.1f}"), "avg_output_speed_tps": ("output speed (tok/s)", "{:.1f}"),
    "avg_kv_len_per_output_token": ("KV length per output token", "{:,.0f}"),
    "prefill_input_tps_per_node": ("prefill input tok/s per node", "{:,.0f}"),
    "decode_output_tps_per_node": ("decode output tok/s per node", "{:,.0f}"),
}
_BILLIONS = {"input_tokens", "output_tokens"}


def run_simulate(scenario: str | None, trace: str | None, as_json: bool, plot: str | None = None, *,
                 step_s: float = 60.0, seed: int = 0, rank_failures: int = 0) -> str:
    """Simulate a named scenario (default 'deepseek-day', under simulator.seed_policy) or a trace file
    (under simulator.load_policy), with CostModel.from_seed() and the seed's prices; return the text
    or JSON to print. plot: also write fleet.report's PNG there. rank_failures: decode-rank deaths
    over the run, elastic EP against rebuild (fleet/rank_failures.py). ValueError for a bad choice or trace.
    """
    if scenario and trace:
        raise ValueError(f"give a scenario ({scenario!r}) or a trace ({trace!r}), not both")
    if trace:
        sc, policy = load_trace(trace), load_policy()
    else:
        name = scenario or "deepseek-day"
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        build, make_policy = SCENARIOS[name]
        sc, policy = build(), make_policy()
    sc = dataclasses.replace(sc, rank_failures=rank_failures)
    pricing = Pricing()
    result = simulate(sc, policy, CostModel.from_seed(), pricing, step_s=step_s, seed=seed)
    if plot:
        plot = str(plot_report(result.requests, result.capacity, plot, sc.gpus_per_node, pricing=pricing,
                               start=result.report.start, end=result.report.end))
    if as_json:
        return json.dumps(result.to_dict() | {"seed": seed, "plot": plot}, indent=1)
    return format_result(result, sc.start, plot)


def format_result(result: SimResult, start, plot: str | None = None) -> str:
    """The text `epserve simulate` prints; start: the scenario's aware start (staircase in its local time)."""
    r = result
    lines = [f"epserve simulate: {r.scenario} (step {r.step_s:g} s)", f"cost model: {r.cost_source}", "",
             "capacity staircase (local time: prefill units, decode units, nodes)"]
    for t, p, d, n in r.staircase:
        lines.append(f"  {start + timedelta(seconds=t):%Y-%m-%d %H:%M}  prefill {p:>3}  decode {d:>3}  {n:>5} nodes")
    lines += ["", format_report(r.report), "", _latency(r.latency)]
    u = r.utilization
    lines.append("utilization (arriving tokens / running capacity): " + ", ".join(
        f"{role} mean {v['mean']:.2f} max {v['max']:.2f}" for role, v in u.items() if v["mean"] is not None))
    if r.eplb:
        lines.append(f"expert balance (max / mean GPU load, {r.eplb['windows']} EPLB windows of "
                     f"{r.eplb['layers']} synthetic layers, {r.eplb['slots']} slots):")
        for role in ("prefill", "decode"):
            e = r.eplb[role]
            lines.append(f"  {role} unit ({e['gpus']} GPUs): {e['without_eplb']:.2f} static layout, "
                         f"{e['with_eplb']:.2f} with EPLB on the previous window's loads")
    if r.rank_failures:
        lines += _failures(r.rank_failures)
    lines += ["", "compared with the seed's day (SEED.md)",
              f"  {'figure':<30}{'simulated':>16}{'seed':>16}{'off':>9}"]
    for key, (sim, seed, rel) in r.vs_seed.items():
        label, fmt = _LABELS.get(key, (key, "{:,.4g}"))
        if key in _BILLIONS:
            sim, seed = sim / 1e9, seed / 1e9
        lines.append(f"  {label:<30}{fmt.format(sim):>16}{fmt.format(seed):>16}{100 * rel:>+8.1f}%")
    lines += ["", "why: " + r.why]
    if plot:
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def _latency(lat: dict) -> str:
    head = f"latency ({lat['n_probes']} sampled requests through the balancers, {lat['n_overloaded']} overloaded)"
    if not lat["ttft_s"]:
        return head + ": no sampled request was served"
    ttft, tpot = lat["ttft_s"], lat["tpot_s"]
    return (f"{head}\n  TTFT  p50 {ttft['p50']:.2f} s   p99 {ttft['p99']:.2f} s\n"
            f"  TPOT  p50 {1e3 * tpot['p50']:.1f} ms  p99 {1e3 * tpot['p99']:.1f} ms "
            f"({1 / tpot['p50']:.1f} tokens/s per request at p50)")


def _failures(f: dict) -> list[str]:
    tot = f["totals"]
    lines = [f"decode rank deaths ({tot['n_events']}, {f['unit_ranks']}-rank units; fleet/recovery_model.py's "
             f"assumptions): elastic EP {tot['elastic_stall_s']:,.1f} s of unit stall, "
             f"{tot['elastic_gpu_s_lost']:,.0f} GPU-s lost; today's rebuild {tot['rebuild_stall_s']:,.1f} s, "
             f"{tot['rebuild_gpu_s_lost']:,.0f} GPU-s ({tot['n_rebuilds']} of them rebuilt under elastic too)"]
    for e in f["events"]:
        lines.append(f"  t {e['t_s']:>8,.0f} s  unit {e['unit']:>2} rank {e['dead_rank']:>3}: {e['decision']} to "
                     f"{e['n_ranks']} ranks, {e['experts_reloaded']:,.0f} experts reloaded (busiest rank "
                     f"{e['max_reload_per_rank']:,.0f}); stall {e['elastic_stall_s']:.1f} s vs rebuild "
                     f"{e['rebuild_stall_s']:.1f} s")
    return lines
