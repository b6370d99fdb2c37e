"""`epserve report`: a ledger's tables -> the seed's day of statistics (SEED "One day's statistics").

Tokens in (cache hit/miss) and out, average output speed, KV length per output
token, GPU-hours integrated from unit start/stop events, nodes, per-node
throughput, cost, theoretical revenue at API prices, and margin; plus a PNG
like the seed's figures (node staircase, tokens/s, cost vs income).

A top-level tool that only `cli.py` calls. Reads tables (`fleet/ledger.py`
schemas), never files; writes only the PNG it is asked for. Times are UTC.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from epserve.config import PricingConfig
from epserve.fleet.ledger import to_utc

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = 1_000_000


# USD per GPU-hour and per million tokens (config `pricing:`); defaults: $2 per H800-hour and R1's prices.
Pricing = PricingConfig


def revenue_usd(hit_tokens: float, miss_tokens: float, output_tokens: float, pricing: Pricing) -> float:
    """Theoretical revenue: every token billed at the list price."""
    return (hit_tokens * pricing.input_hit_per_m + miss_tokens * pricing.input_miss_per_m
            + output_tokens * pricing.output_per_m) / 1e6


def cost_usd(gpu_hours: float, pricing: Pricing) -> float:
    return gpu_hours * pricing.gpu_hour_usd


def margin(revenue: float, cost: float) -> float | None:
    """Cost profit margin (revenue - cost) / cost; None when nothing was spent."""
    return (revenue - cost) / cost if cost > 0 else None


def _us(dt: datetime) -> int:
    return (to_utc(dt) - _EPOCH) // timedelta(microseconds=1)


def _dt(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _ts_us(table: pa.Table) -> np.ndarray:
    return table["ts"].cast(pa.int64()).to_numpy().astype(np.int64) if table.num_rows else np.zeros(0, np.int64)


def unit_runs(capacity: pa.Table, start_us: int, end_us: int) -> list[tuple[str, str, int, int, int]]:
    """(unit, role, gpus, t0_us, t1_us) for each run of a unit, clipped to [start_us, end_us].

    A unit started before the window counts from start_us; one never stopped runs
    to end_us; a stop with no earlier start counts from start_us (its start predates
    the ledger); a second start without a stop ends the first run there (a restart
    whose stop was lost). At one instant stops apply before starts.
    """
    cols = capacity.select(["unit", "role", "event", "gpus"]).to_pydict()
    ts = _ts_us(capacity)
    order = sorted(range(len(ts)), key=lambda i: (ts[i], cols["event"][i] == "start"))
    open_runs: dict[str, tuple[str, int, int]] = {}
    runs = []
    for i in order:
        unit, role, event, gpus, t = *(cols[c][i] for c in ("unit", "role", "event", "gpus")), int(ts[i])
        if unit in open_runs:
            runs.append((unit, *open_runs.pop(unit), t))
        elif event == "stop":
            runs.append((unit, role, gpus, start_us, t))
        if event == "start":
            open_runs[unit] = (role, gpus, t)
    runs += [(unit, *run, end_us) for unit, run in open_runs.items()]
    clipped = [(u, r, g, max(t0, start_us), min(t1, end_us)) for u, r, g, t0, t1 in runs]
    return [run for run in clipped if run[4] > run[3]]


def gpu_series(runs, roles=("prefill", "decode")) -> tuple[np.ndarray, np.ndarray]:
    """Staircase of GPUs in use: (times_us[K], gpus[K]), gpus[k] holding from times_us[k] on."""
    deltas: dict[int, int] = {}
    for _, role, gpus, t0, t1 in runs:
        if role in roles:
            deltas[t0] = deltas.get(t0, 0) + gpus
            deltas[t1] = deltas.get(t1, 0) - gpus
    times = np.array(sorted(deltas), dtype=np.int64)
    return times, np.cumsum([deltas[t] for t in times]).astype(np.int64)


@dataclass(frozen=True)
class Report:
    """The seed's statistics over [start, end). Token counts are sums over requests
    finished in the window; None marks a figure with nothing to average over."""

    start: datetime
    end: datetime
    hours: float
    n_requests: int
    input_tokens: int
    cache_hit_tokens: int
    cache_miss_tokens: int
    cache_hit_rate: float | None
    output_tokens: int
    avg_output_speed_tps: float | None
    avg_kv_len_per_output_token: float | None
    gpu_hours: float
    prefill_gpu_hours: float
    decode_gpu_hours: float
    gpus_per_node: int
    avg_nodes: float
    peak_nodes: float
    prefill_input_tps_per_node: float | None
    decode_output_tps_per_node: float | None
    cost_usd: float
    revenue_usd: float
    margin: float | None
    pricing: Pricing

    def to_dict(self) -> dict:
        """JSON-ready: datetimes as ISO 8601 strings, pricing as a nested dict."""
        out = dataclasses.asdict(self)
        out["start"], out["end"] = self.start.isoformat(), self.end.isoformat()
        return out


def _window(requests: pa.Table, capacity: pa.Table, start, end) -> tuple[int, int]:
    stamps = np.concatenate([_ts_us(requests), _ts_us(capacity)])
    start_us = _us(start) if start is not None else int(stamps.min()) if stamps.size else 0
    # a defaulted end includes the latest row (the window is half-open)
    end_us = _us(end) if end is not None else int(stamps.max()) + 1 if stamps.size else start_us
    if end_us < start_us:
        raise ValueError(f"end={_dt(end_us).isoformat()} is before start={_dt(start_us).isoformat()}")
    return start_us, end_us


def build_report(
    requests: pa.Table,
    capacity: pa.Table,
    pricing: Pricing = Pricing(),
    start: datetime | None = None,
    end: datetime | None = None,
    gpus_per_node: int = 8,
) -> Report:
    """Statistics of the requests finished in [start, end) and the GPUs held in [start, end].

    start/end default to the earliest/latest timestamp in either table.
    avg_output_speed_tps: unweighted mean over requests with decode_s > 0 of
    output_tokens / decode_s (the per-request speed a user sees, as in SEED).
    avg_kv_len_per_output_token: the KV length when output token i (0-based) is
    generated is prompt_tokens + i; averaged over all output tokens of all requests.
    Per-node throughput divides tokens by the node-seconds that role occupied
    (cache hits count as prefill input, as in SEED).
    """
    if gpus_per_node < 1:
        raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 1")
    start_us, end_us = _window(requests, capacity, start, end)
    ts = _ts_us(requests)
    reqs = requests.filter(pa.array((ts >= start_us) & (ts < end_us)))
    col = lambda name: reqs[name].to_numpy()  # noqa: E731
    n_in, n_hit, n_out = (int(col(c).sum()) for c in ("prompt_tokens", "cache_hit_tokens", "output_tokens"))
    prompt, out, decode_s = (col(c).astype(np.float64) for c in ("prompt_tokens", "output_tokens", "decode_s"))
    fast = decode_s > 0
    speed = float(np.mean(out[fast] / decode_s[fast])) if fast.any() else None
    kv_len = float(np.sum(out * prompt + out * (out - 1) / 2)) / n_out if n_out else None  # sum_{i<O} (P + i)

    runs = unit_runs(capacity, start_us, end_us)
    gpu_s = {role: sum(g * (t1 - t0) for _, r, g, t0, t1 in runs if r == role) / _US
             for role in ("prefill", "decode")}
    gpu_hours = (gpu_s["prefill"] + gpu_s["decode"]) / 3600
    hours = (end_us - start_us) / _US / 3600
    _, gpus = gpu_series(runs)
    node_s = {role: s / gpus_per_node for role, s in gpu_s.items()}  # occupied node-seconds per role
    cost = cost_usd(gpu_hours, pricing)
    revenue = revenue_usd(n_hit, n_in - n_hit, n_out, pricing)
    return Report(
        start=_dt(start_us), end=_dt(end_us), hours=hours, n_requests=reqs.num_rows,
        input_tokens=n_in, cache_hit_tokens=n_hit, cache_miss_tokens=n_in - n_hit,
        cache_hit_rate=n_hit / n_in if n_in else None, output_tokens=n_out,
        avg_output_speed_tps=speed, avg_kv_len_per_output_token=kv_len,
        gpu_hours=gpu_hours, prefill_gpu_hours=gpu_s["prefill"] / 3600, decode_gpu_hours=gpu_s["decode"] / 3600,
        gpus_per_node=gpus_per_node,
        avg_nodes=gpu_hours / hours / gpus_per_node if hours > 0 else 0.0,
        peak_nodes=float(gpus.max()) / gpus_per_node if gpus.size else 0.0,
        prefill_input_tps_per_node=n_in / node_s["prefill"] if node_s["prefill"] else None,
        decode_output_tps_per_node=n_out / node_s["decode"] if node_s["decode"] else None,
        cost_usd=cost, revenue_usd=revenue, margin=margin(revenue, cost), pricing=pricing,
    )


def _si(x: float) -> str:
    for scale, suffix in ((1e12, " T"), (1e9, " B"), (1e6, " M"), (1e3, " k")):
        if abs(x) >= scale:
            return f"{x / scale:,.3g}{suffix}" if abs(x) < 1000 * scale else f"{x / scale:,.0f}{suffix}"
    return f"{x:,.4g}"


def format_report(report: Report) -> str:
    """The statistics as a two-column text table (figure, value)."""
    r, p = report, report.pricing
    opt = lambda x, fmt: "n/a" if x is None else fmt.format(x)  # noqa: E731
    lines = [
        ("window", f"{r.start:%Y-%m-%d %H:%M:%S} .. {r.end:%Y-%m-%d %H:%M:%S} UTC ({r.hours:.2f} h)"),
        ("requests", f"{r.n_requests:,}"),
        ("input tokens", f"{_si(r.input_tokens)} ({r.input_tokens:,})"),
        ("  cache hit", f"{_si(r.cache_hit_tokens)} ({opt(r.cache_hit_rate and 100 * r.cache_hit_rate, '{:.1f}')} %)"),
        ("  cache miss", _si(r.cache_miss_tokens)),
        ("output tokens", f"{_si(r.output_tokens)} ({r.output_tokens:,})"),
        ("average output speed", opt(r.avg_output_speed_tps, "{:.1f} tokens/s per request")),
        ("average KV length per output token", opt(r.avg_kv_len_per_output_token, "{:,.0f} tokens")),
        ("GPU-hours", f"{r.gpu_hours:,.1f} (prefill {r.prefill_gpu_hours:,.1f}, decode {r.decode_gpu_hours:,.1f})"),
        (f"nodes ({r.gpus_per_node} GPUs each)", f"{r.avg_nodes:,.2f} average, {r.peak_nodes:,.2f} peak"),
        ("prefill throughput per node", opt(r.prefill_input_tps_per_node and _si(r.prefill_input_tps_per_node),
                                            "{} input tokens/s (cache hits included)")),
        ("decode throughput per node", opt(r.decode_output_tps_per_node and _si(r.decode_output_tps_per_node),
                                           "{} output tokens/s")),
        (f"cost at ${p.gpu_hour_usd:g} per GPU-hour", f"${r.cost_usd:,.0f}"),
        ("theoretical revenue", f"${r.revenue_usd:,.0f} (per M tokens: hit ${p.input_hit_per_m:g}, "
                                f"miss ${p.input_miss_per_m:g}, output ${p.output_per_m:g})"),
        ("cost profit margin", opt(r.margin and 100 * r.margin, "{:,.1f} %")),
    ]
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in lines)


def plot_report(
    requests: pa.Table,
    capacity: pa.Table,
    path: str | Path,
    gpus_per_node: int = 8,
    bucket_s: float | None = None,
    *,
    pricing: Pricing | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Path:
    """Write a PNG: node count over time (staircase, total and per role), input and
    output tokens/s per bucket (requests counted at their finish time), and, with
    pricing, cost vs theoretical income per bucket. bucket_s defaults to window / 24."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    start_us, end_us = _window(requests, capacity, start, end)
    end_us = max(end_us, start_us + _US)
    bucket_us = int((bucket_s or max((end_us - start_us) / _US / 24, 1.0)) * _US)
    edges = np.arange(start_us, end_us + bucket_us, bucket_us, dtype=np.int64)
    width_s = np.diff(edges) / _US
    runs = unit_runs(capacity, start_us, end_us)
    ts = _ts_us(requests)
    idx = np.searchsorted(edges, ts, side="right") - 1
    keep = (ts >= start_us) & (ts < end_us)

    def per_bucket(column: str) -> np.ndarray:
        values = requests[column].to_numpy().astype(np.float64) if requests.num_rows else np.zeros(0)
        return np.bincount(idx[keep], weights=values[keep], minlength=len(edges) - 1)[: len(edges) - 1]

    n_panels = 3 if pricing else 2
    fig = Figure(figsize=(12, 3.6 * n_panels))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_panels, 1, sharex=True)
    to_dt = lambda us: np.asarray(us, dtype="datetime64[us]")  # noqa: E731
    for roles, label in ((("prefill", "decode"), "total"), (("prefill",), "prefill"), (("decode",), "decode")):
        times, gpus = gpu_series(runs, roles)
        if times.size:
            gpus[-1] = gpus[-2] if times[-1] == end_us and gpus.size > 1 else gpus[-1]  # window end, not a stop
            axes[0].step(to_dt(times), gpus / gpus_per_node, where="post", label=label,
                         linewidth=2 if label == "total" else 1)
    axes[0].set(title="Node count for inference service", ylabel=f"nodes ({gpus_per_node} GPUs)")
    if runs:
        axes[0].legend(loc="lower left")
    mids = to_dt(edges[:-1] + bucket_us // 2)
    axes[1].plot(mids, per_bucket("prompt_tokens") / width_s, marker=".", label="input tokens/s")
    axes[1].plot(mids, per_bucket("output_tokens") / width_s, marker=".", label="output tokens/s")
    axes[1].set(title="Throughput", ylabel="tokens/s")
    axes[1].legend(loc="best")
    if pricing:
        hit, prompt, out = per_bucket("cache_hit_tokens"), per_bucket("prompt_tokens"), per_bucket("output_tokens")
        gpu_s = np.zeros(len(edges) - 1)
        for _, _, g, t0, t1 in runs:
            gpu_s += g * np.clip(np.minimum(t1, edges[1:]) - np.maximum(t0, edges[:-1]), 0, None) / _US
        bar_w = np.timedelta64(int(bucket_us * 0.4), "us")
        income = revenue_usd(hit, prompt - hit, out, pricing)
        axes[2].bar(mids - bar_w / 2, income, width=bar_w, label="theoretical income")
        axes[2].bar(mids + bar_w / 2, cost_usd(gpu_s / 3600, pricing), width=bar_w, label="cost")
        axes[2].set(title="Cost and theoretical income", ylabel="USD")
        axes[2].legend(loc="best")
    axes[-1].set_xlabel("time (UTC)")
    fig.autofmt_xdate()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return Path(path)
