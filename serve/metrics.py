"""Prometheus metrics of the serving path (one registry per ingress replica).

Queue lengths, per-rank KV use and request counts (from the router's live RankStats),
tokens/s over a sliding window, TTFT / time-per-output-token histograms, and each rank's KV-store
writes by outcome (counters kept on the rank, carried in its RankStats, exported as they stand).

A scrape collects from the router and from every unit supervisor (`collect`). A source that fails
(the router's refresh, a dead or stuck supervisor) is logged and counted in
`epserve_metrics_errors_total{source}`, and the scrape still answers 200 with everything else
current: one dead unit must not blind the dashboards to the rest of the fleet. Per-unit and
per-rank gauges show only what reported in this scrape (a dead unit's vanish, never stay at old
values); a router that cannot refresh leaves its last rank stats, and the counter says so.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from epserve.messages import KV_WRITE_OUTCOMES

log = logging.getLogger("epserve.metrics")
_LAT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    def __init__(self, window_s: float = 10.0):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("epserve_requests", "Finished HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("epserve_prompt_tokens", "Prompt tokens served", registry=r)
        self.cache_hit_tokens = Counter("epserve_prompt_cache_hit_tokens", "Prompt tokens from the KV store",
                                        registry=r)
        self.completion_tokens = Counter("epserve_completion_tokens", "Output tokens produced", registry=r)
        self.ttft = Histogram("epserve_ttft_seconds", "Time to first token", buckets=_LAT_BUCKETS, registry=r)
        self.tpot = Histogram("epserve_time_per_output_token_seconds", "Decode time per output token",
                              buckets=_LAT_BUCKETS, registry=r)
        self.in_flight = Gauge("epserve_in_flight_requests", "Requests admitted and not finished", registry=r)
        self.queue = Gauge("epserve_rank_waiting_requests", "Requests queued on a rank", ["role", "unit", "rank"],
                           registry=r)
        self.running = Gauge("epserve_rank_running_requests", "Requests running on a rank",
                             ["role", "unit", "rank"], registry=r)
        self.kv_used = Gauge("epserve_rank_kv_used_ratio", "Fraction of a rank's KV pages in use",
                             ["role", "unit", "rank"], registry=r)
        self.tokens_per_s = Gauge("epserve_output_tokens_per_second", "Output tokens/s over the last window",
                                  registry=r)
        self.eplb_before = Gauge("epserve_eplb_balancedness_before", "Mean max/mean GPU expert load before the "
                                 "last EPLB round", ["role", "unit"], registry=r)
        self.eplb_after = Gauge("epserve_eplb_balancedness_after", "Same, after the last EPLB round",
                                ["role", "unit"], registry=r)
        self.eplb_moved = Gauge("epserve_eplb_weights_moved", "Expert weight copies of the last applied round",
                                ["role", "unit"], registry=r)
        self.eplb_seconds = Gauge("epserve_eplb_seconds", "Duration of the last applied EPLB round",
                                  ["role", "unit"], registry=r)
        self.schedule_steps = Gauge("epserve_unit_schedule_steps", "Steps a unit ran one batch (plain) or split "
                                    "on an overlap schedule", ["role", "unit", "schedule"], registry=r)
        self.split_pays = Gauge("epserve_overlap_split_pays", "overlap: auto's current choice per phase "
                                "(1: split steps measured faster)", ["role", "unit", "phase"], registry=r)
        self.errors = Counter("epserve_metrics_errors", "Scrapes where a source failed to report (router, "
                              "prefill_unit, decode_unit)", ["source"], registry=r)
        self._unit_gauges = (self.eplb_before, self.eplb_after, self.eplb_moved, self.eplb_seconds,
                             self.schedule_steps, self.split_pays)
        self._rank_gauges = (self.queue, self.running, self.kv_used)
        self.window_s = window_s
        self._recent: deque[tuple[float, int]] = deque()

        self.mtp_acceptance = Gauge("epserve_mtp_acceptance_rate", "MTP drafts accepted / verified since the "
                                    "rank started", ["role", "unit", "rank"], registry=r)
        self.mtp_tokens_per_step = Gauge("epserve_mtp_tokens_per_step", "Tokens a sequence gets per MTP verify step "
                                         "(1 + accepted drafts), since the rank started", ["role", "unit", "rank"],
                                         registry=r)
        self.kv_writes = _KvWrites()
        r.register(self.kv_writes)

    async def collect(self, router, timeout_s: float = 10.0) -> None:
        """Refresh the router's stats and observe every unit's status(); a failing source is logged
        and counted (see the module docstring), never raised and never silent."""
        try:
            await asyncio.wait_for(router.refresh(force=True), timeout_s)   # a scrape reads now, not 50 ms ago
        except Exception as exc:
            self._failed("router", None, exc)
        await self.observe_units(router.handles, timeout_s)

    async def observe_units(self, handles: dict, timeout_s: float = 10.0) -> None:
        """handles: {role: {unit id: supervisor handle}}. Each unit is asked on its own: a dead one
        costs its own gauges (they are dropped, not left at their last values), not the others'."""
        asked = [(role, uid, asyncio.wait_for(_ask_status(h), timeout_s))
                 for role, units in handles.items() for uid, h in units.items()]
        got = await asyncio.gather(*[a for _, _, a in asked], return_exceptions=True)
        for g in self._unit_gauges:          # refilled below, with no await in between (one scrape's view)
            g.clear()
        for (role, uid, _), status in zip(asked, got):
            if isinstance(status, Exception):
                self._failed(f"{role}_unit", uid, status)
            else:
                self.observe_unit(role, status)

    def _failed(self, source: str, unit, exc: BaseException) -> None:
        self.errors.labels(source).inc()
        log.error("/metrics: %s%s failed to report: %r", source, "" if unit is None else f" {unit}", exc)

    def observe_tokens(self, n: int) -> None:
        now = time.monotonic()
        self._recent.append((now, n))
        self.completion_tokens.inc(n)

    def observe_unit(self, role: str, status: dict) -> None:
        """A unit supervisor's status(): its last EPLB round and its overlap schedules."""
        unit = str(status["unit"])
        for schedule, n in status.get("schedule_steps", {}).items():
            self.schedule_steps.labels(role, unit, schedule).set(n)
        for phase, pays in status.get("overlap", {}).get("split_pays", {}).items():
            self.split_pays.labels(role, unit, phase).set(int(pays))
        self.observe_eplb(role, status["unit"], status.get("eplb"))

    def observe_eplb(self, role: str, unit: int, report: dict | None) -> None:
        if report:
            labels = (role, str(unit))
            self.eplb_before.labels(*labels).set(report.get("balancedness_before", 0))
            self.eplb_after.labels(*labels).set(report.get("balancedness_after", 0))
            self.eplb_moved.labels(*labels).set(report.get("weights_moved", 0))
            self.eplb_seconds.labels(*labels).set(report.get("total_s", report.get("staged_s", 0)))

    def render(self, prefill_stats, decode_stats, in_flight: int) -> bytes:
        now = time.monotonic()
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        self.tokens_per_s.set(sum(n for _, n in self._recent) / self.window_s)
        self.in_flight.set(in_flight)
        for g in (*self._rank_gauges, self.mtp_acceptance, self.mtp_tokens_per_step):
            g.clear()                        # a rank that did not report this time shows nothing, not old values
        self.kv_writes.ranks = [(role, s) for role, stats in (("prefill", prefill_stats), ("decode", decode_stats))
                                for s in stats if s.kv_store_write_blocks]
        for role, stats in (("prefill", prefill_stats), ("decode", decode_stats)):
            for s in stats:
                labels = (role, str(s.unit), str(s.rank))
                self.queue.labels(*labels).set(s.n_waiting)
                self.running.labels(*labels).set(s.n_running)
                self.kv_used.labels(*labels).set(s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0)
                if s.mtp_sequence_steps:
                    self.mtp_acceptance.labels(*labels).set(s.mtp_accepted / max(1, s.mtp_proposed))
                    self.mtp_tokens_per_step.labels(*labels).set(s.mtp_emitted / s.mtp_sequence_steps)
        return generate_latest(self.registry)


class _KvWrites:
    """Each rank's KV-store writer counters as Prometheus counters: the rank keeps the totals since
    it started (pipelines/kv_writer.py), so they are exported as they stand, not incremented here; a
    restarted rank starts again at 0, which Prometheus' rate() reads as a counter reset."""

    def __init__(self):
        self.ranks: list = []           # (role, RankStats) of the ranks with a writer, set by render()

    def collect(self):
        blocks = CounterMetricFamily("epserve_kv_store_writes", "KV-store blocks a rank handed to its writer, by "
                                     "outcome", labels=["role", "unit", "rank", "outcome"])
        n_bytes = CounterMetricFamily("epserve_kv_store_write_bytes", "Latent bytes of those blocks, by outcome",
                                      labels=["role", "unit", "rank", "outcome"])
        for role, s in self.ranks:
            for outcome, b, n in zip(KV_WRITE_OUTCOMES, s.kv_store_write_blocks, s.kv_store_write_bytes):
                labels = [role, str(s.unit), str(s.rank), outcome]
                blocks.add_metric(labels, b)
                n_bytes.add_metric(labels, n)
        yield blocks
        yield n_bytes


async def _ask_status(unit) -> dict:
    return await unit.status.remote()
