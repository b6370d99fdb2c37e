"""② The router: live per-rank stats of every unit, the two balancers, and the in-flight table.

Runs inside the ingress replica (one process holds the whole in-flight picture, so the
balancers see every admission at once). It reads RankStats from the unit supervisors
(refreshed at most every `refresh_s`, and accounted locally between refreshes with
placement's apply_*_choice), picks the decode rank first (it reserves KV pages), then
the prefill rank, and refuses with 429 when the fleet is full.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass

from epserve.messages import RankRef, RankStats
from epserve.placement.decode_balancer import apply_decode_choice, pick_decode_rank
from epserve.placement.prefill_balancer import NoRankAvailable, apply_prefill_choice, pick_prefill_rank
from epserve.serve.openai_models import APIError


@dataclass
class Route:
    prefill: RankRef
    decode: RankRef


class Router:
    """units: {"prefill": [handles], "decode": [handles]} for a fixed fleet; or a CapacityController
    whose registry (unit ids, handles, draining flags) is re-read every `registry_s`."""

    def __init__(self, units: dict | None, max_in_flight: int, page_tokens: int = 64, refresh_s: float = 0.05,
                 controller=None, registry_s: float = 0.5):
        self.controller, self.registry_s, self.registry_read = controller, registry_s, 0.0
        self.handles = {role: dict(enumerate(units[role])) for role in ("prefill", "decode")} if units else {}
        self.draining: dict[str, set[int]] = {"prefill": set(), "decode": set()}
        self.max_in_flight, self.page_tokens, self.refresh_s = max_in_flight, page_tokens, refresh_s
        self.prefill_stats: list[RankStats] = []
        self.decode_stats: list[RankStats] = []
        self.refreshed = 0.0
        self.in_flight: dict[str, Route] = {}
        self.lock = asyncio.Lock()

    def handle(self, role: str, unit: int):
        h = self.handles[role].get(unit)
        if h is None:
            raise APIError(503, f"{role} unit {unit} was removed; retry", "server_error", code="unavailable",
                           headers={"Retry-After": "1"})
        return h

    async def _read_registry(self) -> None:
        if self.controller is None or time.monotonic() - self.registry_read < self.registry_s:
            return
        reg = await self.controller.registry.remote()
        self.handles = {role: {uid: h for uid, h, _ in reg[role]} for role in reg}
        self.draining = {role: {uid for uid, _, d in reg[role] if d} for role in reg}
        self.registry_read = time.monotonic()

    async def _role_stats(self, role: str) -> list[RankStats]:
        units = sorted(self.handles[role].items())
        per_unit = await asyncio.gather(*[h.stats.remote() for _, h in units])
        return [dataclasses.replace(s, is_draining=True) if uid in self.draining[role] else s
                for (uid, _), stats in zip(units, per_unit) for s in stats]

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.refreshed < self.refresh_s:
            return
        await self._read_registry()
        self.prefill_stats = await self._role_stats("prefill")
        self.decode_stats = await self._role_stats("decode")
        self.refreshed = time.monotonic()

    async def admit(self, request_id: str, n_prompt: int, n_cached: int, max_tokens: int, n_seqs: int = 1) -> Route:
        """Choose (decode rank, prefill rank) for a request of n_seqs choices (all decode on one rank,
        each in its own pages), or raise a 429/503 APIError."""
        async with self.lock:
            if len(self.in_flight) >= self.max_in_flight:
                raise APIError(429, f"server is at capacity ({self.max_in_flight} requests in flight); retry later",
                               "rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
            await self.refresh()
            pages = n_seqs * math.ceil((n_prompt + max_tokens) / self.page_tokens)
            try:
                dref = pick_decode_rank(self.decode_stats, pages)
                pref = pick_prefill_rank(self.prefill_stats, n_prompt - n_cached, n_cached)
            except NoRankAvailable as exc:
                raise APIError(503, str(exc), "server_error", code="unavailable",
                               headers={"Retry-After": "5"}) from None
            if dref is None:
                raise APIError(429, f"no decode rank has {pages} free KV pages for this request now; retry later",
                               "rate_limit_error", code="kv_cache_full", headers={"Retry-After": "1"})
            self.decode_stats = apply_decode_choice(self.decode_stats, dref, pages)
            self.prefill_stats = apply_prefill_choice(self.prefill_stats, pref, n_prompt - n_cached, n_cached)
            route = Route(pref, dref)
            self.in_flight[request_id] = route
            return route

    def release(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)
