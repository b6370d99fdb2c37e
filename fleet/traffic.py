"""Traffic for the fleet simulator: who arrives when, with how many tokens.

Two sources behind one interface (expected_requests, per_request, arrivals):
  DiurnalTraffic  a Poisson process whose rate follows a daily profile, each request's tokens
                  drawn from a RequestMix (lognormal prompt and output, Beta cache-hit fraction);
  TraceTraffic    recorded requests (read_trace: CSV or JSONL, each bad value named by line).
`arrivals` gives one step's Cohort: exact token sums over all its requests, and the few requests
the simulator follows one by one (its probes). Pure: numpy only; reads no file but read_trace's.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from epserve.fleet.cost_model import mix_attn_pairs_per_new_token

BEIJING = timezone(timedelta(hours=8), "Beijing")
SEED_START = datetime(2025, 2, 27, 12, 0, tzinfo=BEIJING)
# Relative request rate by Beijing hour (linear in between): a flat day, an evening fall that
# stays under each night step of the schedule, a trough at 04:00-06:00 and a morning rise.
DEEPSEEK_PROFILE = ((0, .60), (.5, .54), (1, .47), (1.5, .42), (2, .36), (2.5, .30), (3, .23), (3.5, .17),
                    (4, .15), (5, .15), (6, .16), (6.5, .2), (7, .28), (7.5, .4), (8, .53), (8.5, .66),
                    (9, .76), (10, .8), (11, .82), (12, .8), (13, .78), (14, .8), (15, .82), (16, .82),
                    (17, .8), (18, .78), (19, .79), (20, .81), (21, .82), (22, .79), (23, .7), (24, .60))
TRACE_COLUMNS = ("ts_s", "prompt_tokens", "cached_tokens", "output_tokens")


@dataclass
class Cohort:
    """One step's arrivals: n requests, sums [prompt, cached, output, attn pairs, KV sum] over all of
    them (probes included), and the probes' (prompt, cached, output, arrival s) arrays."""

    n: int
    sums: np.ndarray
    probes: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def cohort_sums(prompt, cached, output) -> np.ndarray:
    new = prompt - cached
    return np.array([prompt.sum(), cached.sum(), output.sum(), (new * (cached + new / 2)).sum(),
                     (output * prompt + output * (output - 1) / 2).sum()], dtype=float)


@dataclass(frozen=True)
class RequestMix:
    """Tokens per request: lognormal prompt and output lengths (mean, coefficient of variation), and a
    Beta(mean cache_hit_rate, concentration a + b) fraction of each prompt found in the KV cache."""

    prompt_tokens: float
    prompt_cv: float
    cache_hit_rate: float
    hit_concentration: float
    output_tokens: float
    output_cv: float

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, cached, output) int64 arrays of n requests."""
        def lognormal(mean, cv):
            s2 = math.log1p(cv * cv)
            return np.maximum(1, np.rint(rng.lognormal(math.log(mean) - s2 / 2, math.sqrt(s2), n))).astype(np.int64)
        prompt = lognormal(self.prompt_tokens, self.prompt_cv)
        a = self.cache_hit_rate * self.hit_concentration
        hit = rng.beta(a, self.hit_concentration - a, n)
        return prompt, np.floor(prompt * hit).astype(np.int64), lognormal(self.output_tokens, self.output_cv)

    def means(self) -> np.ndarray:
        """Per-request expectations [prompt, cached, output, attn pairs, KV sum] (Cohort's sums)."""
        p, o = self.prompt_tokens, self.output_tokens
        new = p * (1 - self.cache_hit_rate)
        pairs = new * mix_attn_pairs_per_new_token(p, self.prompt_cv, self.cache_hit_rate, self.hit_concentration)
        kv_sum = o * p + (o * o * (1 + self.output_cv ** 2) - o) / 2  # E[sum over outputs i of (P + i)]
        return np.array([p, p * self.cache_hit_rate, o, pairs, kv_sum])


@dataclass(frozen=True)
class DiurnalTraffic:
    """requests_per_day arriving as a Poisson process whose rate follows profile: (local hour, relative
    rate) knots, linear in between, wrapping at 24 h (only the shape matters)."""

    requests_per_day: float
    profile: tuple[tuple[float, float], ...]
    mix: RequestMix

    def rate(self, hour: float) -> float:
        """Requests/s at a local hour."""
        hours, rel = np.array(self.profile, dtype=float).T
        mean = np.interp(np.arange(0, 24, 1 / 60), hours, rel, period=24).mean()
        return self.requests_per_day / 86_400 * float(np.interp(hour % 24, hours, rel, period=24)) / mean

    def expected_requests(self, duration_s: float) -> float:
        return self.requests_per_day * duration_s / 86_400

    def per_request(self) -> np.ndarray:
        return self.mix.means()

    def arrivals(self, t0: float, t1: float, hour0: float, frac: float, rng) -> Cohort:
        """The cohort arriving in [t0, t1) s (hour0: local hour at 0 s); each request a probe with odds frac."""
        n = int(rng.poisson(self.rate(hour0 + (t0 + t1) / 7200) * (t1 - t0)))
        k = int(rng.binomial(n, frac))
        probe = self.mix.sample(rng, k)
        return Cohort(n, (n - k) * self.mix.means() + cohort_sums(*probe), (*probe, np.sort(rng.uniform(t0, t1, k))))


@dataclass(frozen=True, eq=False)
class TraceTraffic:
    """Recorded requests, sorted by arrival: ts_s (s after Scenario.start) and token counts (int64 arrays)."""

    ts_s: np.ndarray
    prompt_tokens: np.ndarray
    cached_tokens: np.ndarray
    output_tokens: np.ndarray

    def expected_requests(self, duration_s: float) -> float:
        return float(len(self.ts_s))

    def per_request(self) -> np.ndarray:
        return cohort_sums(self.prompt_tokens, self.cached_tokens, self.output_tokens) / max(len(self.ts_s), 1)

    def arrivals(self, t0: float, t1: float, hour0: float, frac: float, rng) -> Cohort:
        lo, hi = np.searchsorted(self.ts_s, [t0, t1])
        cols = [self.prompt_tokens[lo:hi], self.cached_tokens[lo:hi], self.output_tokens[lo:hi]]
        pick = rng.random(hi - lo) < frac
        return Cohort(hi - lo, cohort_sums(*cols), (*(c[pick] for c in cols), self.ts_s[lo:hi][pick]))


def read_trace(path: str | Path) -> TraceTraffic:
    """The requests of a CSV (header row naming TRACE_COLUMNS) or JSONL (one object per line) file,
    sorted by arrival.

    ts_s: arrival, seconds after the scenario's start (>= 0); token counts: whole numbers >= 0 with
    cached_tokens <= prompt_tokens. Other columns are ignored. FileNotFoundError, or ValueError
    naming the file, the line and the bad value.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace {str(path)!r} does not exist")
    rows = []
    with open(path, newline="") as f:
        if path.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"trace {str(path)!r}: header {reader.fieldnames} lacks columns {missing}")
            rows = [(reader.line_num, r) for r in reader]
        elif path.suffix.lower() in (".jsonl", ".ndjson"):
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((line_no, json.loads(line)))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"trace {str(path)!r} line {line_no}: not JSON ({err.msg})") from None
        else:
            raise ValueError(f"trace {str(path)!r}: unsupported type {path.suffix!r}, expected .csv or .jsonl")
    if not rows:
        raise ValueError(f"trace {str(path)!r} holds no requests")
    data = np.array([[_trace_value(path, n, r, c) for c in TRACE_COLUMNS] for n, r in rows])
    bad = np.flatnonzero(data[:, 2] > data[:, 1])
    if bad.size:
        n = rows[bad[0]][0]
        raise ValueError(f"trace {str(path)!r} line {n}: cached_tokens={data[bad[0], 2]:.0f} exceeds "
                         f"prompt_tokens={data[bad[0], 1]:.0f}")
    data = data[np.argsort(data[:, 0], kind="stable")]
    return TraceTraffic(data[:, 0], *(data[:, i].astype(np.int64) for i in (1, 2, 3)))


def _trace_value(path: Path, line: int, row, column: str) -> float:
    if not isinstance(row, dict) or column not in row:
        raise ValueError(f"trace {str(path)!r} line {line}: missing {column!r} (columns: {', '.join(TRACE_COLUMNS)})")
    raw = row[column]
    try:
        value = float(raw) if not isinstance(raw, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0 and (column == "ts_s" or value == int(value))):
        kind = "a number >= 0" if column == "ts_s" else "a whole number >= 0"
        raise ValueError(f"trace {str(path)!r} line {line}: {column}={raw!r} must be {kind}")
    return value
