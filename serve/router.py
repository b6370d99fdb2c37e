"""② The router: live per-rank stats of every unit, the two balancers, and the in-flight table.

`Router` is the logic; `RouterActor` runs one per deployment, shared by every ingress
replica (one process holds the whole in-flight picture, so the balancers see every
admission at once, however many replicas the front door has); `RouterClient` is what a
replica holds. It reads RankStats from the unit supervisors
(refreshed at most every `refresh_s`, and accounted locally between refreshes with
placement's apply_*_choice), picks the decode rank first (it reserves KV pages), then
the prefill rank, and refuses with 429 when the fleet is full. Each admitted request's decode
pages stay booked until it is released, and every refresh raises the reports to the bookings
(with_bookings): a request still in prefill, or decoding into pages it has not allocated yet,
keeps its pages, so no decode rank is handed more pages than it has.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass

import ray

from epserve.config import kv_pages
from epserve.errors import ClientClosed, EpserveError, KVCacheFull, Overloaded, TenantRateLimited, Unavailable
from epserve.messages import RankRef, RankStats
from epserve.placement.decode_balancer import apply_decode_choice, pick_decode_rank, with_bookings
from epserve.placement.prefill_balancer import apply_prefill_choice, pick_prefill_rank
from epserve.serve.tenants import Tenant, TenantLimits

log = logging.getLogger("epserve.router")


@dataclass
class Route:
    prefill: RankRef
    decode: RankRef


@dataclass(frozen=True)
class Booking:
    """An admitted request until it is released: where it goes, the decode pages it may fill, and
    the tenant whose slot it holds."""

    route: Route
    pages: int
    tenant: Tenant | None = None


class Router:
    """units: {"prefill": [handles], "decode": [handles]} for a fixed fleet; or a CapacityController
    whose registry (unit ids, handles, draining flags) is re-read every `registry_s`."""

    def __init__(self, units: dict | None, max_in_flight: int, page_tokens: int, refresh_s: float = 0.05,
                 controller=None, registry_s: float = 0.5):
        self.controller, self.registry_s, self.registry_read = controller, registry_s, 0.0
        self.handles = {role: dict(enumerate(units[role])) for role in ("prefill", "decode")} if units else {}
        self.draining: dict[str, set[int]] = {"prefill": set(), "decode": set()}
        self.max_in_flight, self.page_tokens, self.refresh_s = max_in_flight, page_tokens, refresh_s
        self.prefill_stats: list[RankStats] = []
        self.decode_stats: list[RankStats] = []         # what the decode ranks last reported
        self.decode_view: list[RankStats] = []          # what admission sees: the reports raised to the bookings
        self.refreshed = 0.0
        self.in_flight: dict[str, Booking] = {}
        self.limits = TenantLimits()                    # per-tenant rate and concurrency, for every replica at once
        self.lock = asyncio.Lock()

    def handle(self, role: str, unit: int):
        h = self.handles[role].get(unit)
        if h is None:
            raise Unavailable(f"{role} unit {unit} was removed; retry", retry_after=1)
        return h

    async def _read_registry(self) -> None:
        if self.controller is None or time.monotonic() - self.registry_read < self.registry_s:
            return
        try:
            reg = await asyncio.wait_for(self.controller.registry.remote(), 2.0)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
            if not self.handles:
                raise
            # restarting (Ray brings it back): keep admitting on the last registry rather than fail every request
            log.warning("capacity controller unreachable (%s); routing on the registry read %.1fs ago",
                        type(exc).__name__, time.monotonic() - self.registry_read)
            self.registry_read = time.monotonic()
            return
        self.handles = {role: {uid: h for uid, h, _ in reg[role]} for role in reg}
        self.draining = {role: {uid for uid, _, d in reg[role] if d} for role in reg}
        self.registry_read = time.monotonic()

    async def _role_stats(self, role: str) -> list[RankStats]:
        """Every rank of the role's units; a unit that cannot answer (its supervisor gone) is left out,
        so requests go to the others (or are a 503 when none is left) rather than all failing."""
        units = sorted(self.handles[role].items())
        per_unit = await asyncio.gather(*[h.stats.remote() for _, h in units], return_exceptions=True)
        for (uid, _), got in zip(units, per_unit):
            if isinstance(got, BaseException):
                log.warning("%s unit %d did not report its stats (%s); routing around it", role, uid,
                            type(got).__name__)
        return [dataclasses.replace(s, is_draining=True) if uid in self.draining[role] else s
                for (uid, _), stats in zip(units, per_unit) if not isinstance(stats, BaseException) for s in stats]

    async def refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.refreshed < self.refresh_s:
            return
        await self._read_registry()
        self.prefill_stats = await self._role_stats("prefill")
        self.decode_stats = await self._role_stats("decode")
        self.decode_view = with_bookings(self.decode_stats, self.booked())
        self.refreshed = time.monotonic()

    def booked(self) -> dict[RankRef, tuple[int, int]]:
        """Decode rank -> (pages, requests) of the admitted requests not released yet."""
        out: dict[RankRef, tuple[int, int]] = {}
        for b in self.in_flight.values():
            pages, n = out.get(b.route.decode, (0, 0))
            out[b.route.decode] = (pages + b.pages, n + 1)
        return out

    async def admit(self, request_id: str, n_prompt: int, n_cached: int, max_tokens: int, n_seqs: int = 1,
                    tenant: Tenant | None = None) -> Route:
        """Choose (decode rank, prefill rank) for a request of n_seqs choices (all decode on one rank,
        each in its own pages), or raise Overloaded / KVCacheFull / TenantRateLimited (429) or
        NoRankAvailable (503). A tenant with limits takes one of its slots here, last, so a refused
        request holds none; `release` gives it back."""
        async with self.lock:
            if len(self.in_flight) >= self.max_in_flight:
                raise Overloaded(f"server is at capacity ({self.max_in_flight} requests in flight); retry later",
                                 retry_after=1)
            await self.refresh()
            pages = n_seqs * kv_pages(n_prompt + max_tokens, self.page_tokens)
            dref = pick_decode_rank(self.decode_view, pages)          # NoRankAvailable (503) when all are down
            pref = pick_prefill_rank(self.prefill_stats, n_prompt - n_cached, n_cached)
            if dref is None:
                raise KVCacheFull(f"no decode rank has {pages} free KV pages for this request now; retry later",
                                  retry_after=1)
            if tenant is not None:
                retry = self.limits.acquire(tenant, time.monotonic())
                if retry is not None:
                    lim = tenant.limits
                    raise TenantRateLimited(f"tenant {tenant.name!r} is over its limit ({lim.max_requests_per_s:g} "
                                            f"requests/s, {lim.max_concurrent} in flight; 0 = unlimited); retry after "
                                            f"{retry} s", retry_after=retry)
            self.decode_view = apply_decode_choice(self.decode_view, dref, pages)
            self.prefill_stats = apply_prefill_choice(self.prefill_stats, pref, n_prompt - n_cached, n_cached)
            route = Route(pref, dref)
            self.in_flight[request_id] = Booking(route, pages, tenant)
            return route

    async def check_alive(self) -> None:
        """A local router lives in its replica's process: alive while its caller is."""

    def release(self, request_id: str) -> None:
        """The request ended: its pages and tenant slot go (admission sees the pages free at the next refresh)."""
        b = self.in_flight.pop(request_id, None)
        if b is not None and b.tenant is not None:
            self.limits.release(b.tenant)


RELEASE_FIRST_KEEP_S = 60.0     # an admit overtaken by its release starts well within this


def note_release_first(seen: dict[str, float], request_id: str, now: float) -> None:
    """Remember a release that came before its admit (pruning entries older than RELEASE_FIRST_KEEP_S:
    a release of a request that had already ended, or was never admitted, is forgotten in time)."""
    for rid in [r for r, t in seen.items() if now - t > RELEASE_FIRST_KEEP_S]:
        del seen[rid]
    seen[request_id] = now


def took_release_first(seen: dict[str, float], request_id: str, now: float) -> bool:
    """Whether this admit's release already came (then the admit must book nothing)."""
    t = seen.pop(request_id, None)
    return t is not None and now - t <= RELEASE_FIRST_KEEP_S


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1000)
class RouterActor:
    """The one router of a deployment, shared by every ingress replica.

    Admissions from all replicas pass through this actor's event loop one at a time, so the
    balancers see every admission exactly as with one replica (no decode rank is handed more
    KV pages than it has), and a tenant's rate and concurrency limits hold across replicas. Its
    state is rebuilt from the units' live stats when it restarts (bookings and tenant counts start
    empty), and an ingress replica's restart loses nothing here: requests it admitted are released by
    `release`, or, if it died first, by the reconciliation against the units' own requests.
    """

    def __init__(self, units: dict | None, max_in_flight: int, page_tokens: int, controller=None,
                 reconcile_s: float = 5.0):
        self.router = Router(units, max_in_flight, page_tokens, controller=controller)
        self.admitted_at: dict[str, float] = {}
        self.reconcile_s = reconcile_s
        self.n_admitted = 0
        self.per_decode_rank: dict[str, int] = {}       # "unit/rank" -> requests admitted there
        self.admitting: set[str] = set()                # admissions under way
        self.abandoned: set[str] = set()                # ... whose caller released them before they ended
        self.released_first: dict[str, float] = {}      # released before their admit started -> when
        self.task = None

    @ray.method(enable_task_events=False)
    async def admit(self, request_id: str, n_prompt: int, n_cached: int, max_tokens: int, n_seqs: int = 1,
                    tenant: Tenant | None = None):
        """-> (Route, prefill unit handle, decode unit handle), or the refusal (an EpserveError) as a
        value: a refusal is an answer, not this actor's failure (Ray would log it as one)."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._reconcile_loop())
        if took_release_first(self.released_first, request_id, time.monotonic()):
            return ClientClosed("the client closed the request before it was admitted")
        self.admitting.add(request_id)
        try:
            route = await self.router.admit(request_id, n_prompt, n_cached, max_tokens, n_seqs, tenant)
            handles = (self.router.handle("prefill", route.prefill.unit), self.router.handle("decode", route.decode.unit))
        except EpserveError as exc:
            self.router.release(request_id)
            return exc
        finally:
            self.admitting.discard(request_id)
            gone = request_id in self.abandoned
            self.abandoned.discard(request_id)
        if gone:                             # its client left while it waited here: nothing may stay booked
            self.router.release(request_id)
            return ClientClosed("the client closed the request before it was admitted")
        self.admitted_at[request_id] = time.monotonic()
        self.n_admitted += 1
        key = f"{route.decode.unit}/{route.decode.rank}"
        self.per_decode_rank[key] = self.per_decode_rank.get(key, 0) + 1
        return route, *handles

    @ray.method(enable_task_events=False)
    def ping(self) -> None:
        """Answers while this actor lives (RouterClient.check_alive)."""

    @ray.method(enable_task_events=False)
    def release(self, request_id: str) -> None:
        """A request ended, or its caller gave up on it while its admission was still under way
        (a client that left mid-admission): that admission is undone when it ends."""
        if request_id in self.admitting:
            self.abandoned.add(request_id)
        elif request_id not in self.router.in_flight and request_id not in self.admitted_at:
            # an async actor may start calls out of their submission order: a client's release can
            # run before its admit has started; that admit is then refused, never booked
            note_release_first(self.released_first, request_id, time.monotonic())
        self.router.release(request_id)
        self.admitted_at.pop(request_id, None)

    @ray.method(enable_task_events=False)
    async def snapshot(self, force: bool = False) -> dict:
        """Live stats for /health and /metrics: per-rank stats, in-flight count, unit handles."""
        await self.router.refresh(force)
        return {"prefill": list(self.router.prefill_stats), "decode": list(self.router.decode_stats),
                "decode_booked": {f"{ref.unit}/{ref.rank}": pages for ref, (pages, _) in self.router.booked().items()},
                "in_flight": len(self.router.in_flight), "admitted": self.n_admitted,
                "per_decode_rank": dict(self.per_decode_rank),
                "handles": {r: dict(h) for r, h in self.router.handles.items()}}

    async def _reconcile_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reconcile_s)
            try:
                await self.reconcile()
            except Exception as exc:   # a unit restarting: try again next round
                log.debug("router reconcile failed: %r", exc)

    async def reconcile(self, min_age_s: float = 30.0) -> int:
        """Release in-flight entries no unit knows and that are older than min_age_s (their ingress
        replica died before releasing them); -> how many."""
        units = [h for hs in self.router.handles.values() for h in hs.values()]
        known = set().union(*(await asyncio.gather(*[u.request_ids.remote() for u in units]))) if units else set()
        now = time.monotonic()
        stale = [rid for rid, t in self.admitted_at.items() if rid not in known and now - t > min_age_s]
        for rid in stale:
            self.release(rid)
        return len(stale)


class RouterClient:
    """What an ingress replica holds: the shared RouterActor behind the Router calls it makes."""

    def __init__(self, actor):
        self.actor = actor
        self.prefill_stats: list[RankStats] = []
        self.decode_stats: list[RankStats] = []
        self.handles: dict = {"prefill": {}, "decode": {}}
        self.n_in_flight = 0
        self._unit_handles: dict[tuple[str, int], object] = {}

    async def admit(self, request_id: str, n_prompt: int, n_cached: int, max_tokens: int, n_seqs: int = 1,
                    tenant: Tenant | None = None) -> Route:
        out = await self.actor.admit.remote(request_id, n_prompt, n_cached, max_tokens, n_seqs, tenant)
        if isinstance(out, EpserveError):
            raise out
        route, pre, dec = out
        self._unit_handles[("prefill", route.prefill.unit)] = pre
        self._unit_handles[("decode", route.decode.unit)] = dec
        return route

    def handle(self, role: str, unit: int):
        return self._unit_handles[(role, unit)]

    def release(self, request_id: str) -> None:
        self.actor.release.remote(request_id)

    async def check_alive(self, timeout_s: float = 10.0) -> None:
        """Raises Ray's actor error once the shared RouterActor is dead: its owner, the Units replica,
        died (serve/units.py), and these handles will not come back. A router too busy to answer
        within timeout_s is slow, not dead: no error."""
        try:
            await asyncio.wait_for(_answer(self.actor.ping.remote()), timeout_s)
        except asyncio.TimeoutError:
            log.warning("the shared router did not answer a ping within %g s", timeout_s)

    async def refresh(self, force: bool = False) -> None:
        snap = await self.actor.snapshot.remote(force)
        self.prefill_stats, self.decode_stats = snap["prefill"], snap["decode"]
        self.handles, self.n_in_flight = snap["handles"], snap["in_flight"]

    @property
    def in_flight(self) -> range:
        """Only its size is read (metrics)."""
        return range(self.n_in_flight)


async def _answer(ref):
    return await ref
