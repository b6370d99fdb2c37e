"""② The router: live per-rank stats of every unit, the two balancers, and the in-flight table.

Runs inside the ingress replica (one process holds the whole in-flight picture, so the
balancers see every admission at once). It reads RankStats from the unit supervisors
(refreshed at most every `refresh_s`, and accounted locally between refreshes with
placement's apply_*_choice), picks the decode rank first (it reserves KV pages), then
the prefill rank, and refuses with 429 when the fleet is full.
"""
from __future__ import annotations

import asyncio
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
    def __init__(self, prefill_units: list, decode_units: list, max_in_flight: int, page_tokens: int = 64,
                 refresh_s: float = 0.05):
        self.prefill_units, self.decode_units = prefill_units, decode_units
        self.max_in_flight, self.page_tokens, self.refresh_s = max_in_flight, page_tokens, refresh_s
        self.prefill_stats: list[RankStats] = []
        self.decode_stats: list[RankStats] = []
        self.refreshed = 0.0
        self.in_flight: dict[str, Route] = {}
        self.lock = asyncio.Lock()

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.refreshed < self.refresh_s:
            return
        pre = await asyncio.gather(*[u.stats.remote() for u in self.prefill_units])
        dec = await asyncio.gather(*[u.stats.remote() for u in self.decode_units])
        self.prefill_stats = [s for unit in pre for s in unit]
        self.decode_stats = [s for unit in dec for s in unit]
        self.refreshed = time.monotonic()

    async def admit(self, request_id: str, n_prompt: int, n_cached: int, max_tokens: int) -> Route:
        """Choose (decode rank, prefill rank) for a request, or raise a 429/503 APIError."""
        async with self.lock:
            if len(self.in_flight) >= self.max_in_flight:
                raise APIError(429, f"server is at capacity ({self.max_in_flight} requests in flight); retry later",
                               "rate_limit_error", code="overloaded", headers={"Retry-After": "1"})
            await self.refresh()
            pages = math.ceil((n_prompt + max_tokens) / self.page_tokens)
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
