"""The application's own units: one Serve deployment whose single replica starts and owns them.

`Units` is what makes `serve run` / `serve deploy` / `serve shutdown` of
`epserve.serve.app:build_app` whole: its replica's constructor starts every configured
prefill and decode unit (actors/launch.py: supervisors, which make their placement
groups and rank actors), the ledger, the capacity controller (when autoscale is on) and
the shared RouterActor; the ingress replicas ask it for their handles (`parts`).

Lifetimes, and why teardown is explicit. A Serve replica is a detached actor that the
Serve controller creates. Every actor started here is a plain (non-detached) actor, so
this replica is its owner and Ray kills it when the replica dies, however it dies (ranks
are owned by their supervisor and go with it). Placement groups are not fate-shared that
way: a group made by a non-detached actor lives until that actor is dead AND its job has
ended, and the job here is the Serve controller's, which outlives any one application.
So the replica's `__del__`, which Serve calls when it stops the replica (`serve shutdown`,
`serve delete`, a redeploy with new code or args), first waits (bounded) for the
application's Ingress replicas to stop, then tears down in order: capacity
controller (it owns the units it started), the ledger's stop rows and last flush, the
router, then every unit supervisor, whose `shutdown` removes its placement group and
ends its ranks. `graceful_shutdown_timeout_s` gives that time; Serve kills the replica
only after it.

A replica hard-killed (process crash, node loss, `ray.kill`) runs no `__del__`: its actors die
with it, its units' placement groups do not, and they would hold the GPUs its replacement needs.
So every unit's group is named by the application and the supervisor that made it
(placement/groups.py), and a new replica first removes its application's groups whose supervisor
is dead; another application's groups, and groups of live supervisors (an old replica still
tearing down during a redeploy), are never touched.

This module must never answer HTTP or hold request state: that is the ingress's.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve

from epserve.actors.capacity_controller import CapacityController
from epserve.actors.cluster import control_options
from epserve.actors.launch import orders, start_all
from epserve.actors.ledger import LedgerActor
from epserve.config import Config, ledger_root
from epserve.errors import UnitStartFailed
from epserve.model.checkpoint import check_model_dir
from epserve.placement.groups import remove_orphan_groups
from epserve.serve.router import RouterActor

log = logging.getLogger("epserve.units")

FRONT_DOOR_S = 40.0    # the Ingress's own graceful stop (Serve's default 20 s) and some
TEARDOWN_S = 240.0     # the graceful budget Serve gives __del__: the front door, then every unit in parallel


def capacity_rows(cfg: Config, unit_ids: dict[str, list[int]], event: str) -> list:
    """Ledger rows for units starting or stopping: one per unit, with its GPU count."""
    from epserve.fleet.ledger import CapacityRow
    now = time.time()
    return [CapacityRow(ts=now, unit=f"{role}-{uid}", role=role, event=event, gpus=getattr(cfg, role).ranks_per_unit)
            for role, ids in unit_ids.items() for uid in ids]


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                  graceful_shutdown_timeout_s=TEARDOWN_S, max_constructor_retry_count=1)
class Units:
    """The one replica that owns the units, ledger, router and capacity controller of one application.

    `parts()` -> {"prefill": [supervisor], "decode": [supervisor], "ledger", "capacity" (None when
    autoscale is off), "router"}: actor handles an ingress replica binds to. A constructor that
    fails leaves nothing started (Serve then marks the application failed with its message)."""

    async def __init__(self, cfg: Config, model_dir: str):
        self.cfg, self.ledger, self.capacity, self.router = cfg, None, None, None
        self.prefill, self.decode = [], []
        args = check_model_dir(model_dir)
        self.scope = serve.get_replica_context().app_name
        await asyncio.to_thread(remove_orphan_groups, self.scope)     # a killed predecessor's; logged
        todo = orders("prefill", cfg.prefill, "prefill") + orders("decode", cfg.decode, "decode")
        ok, failed = await start_all(cfg, model_dir, args, todo, self.scope)
        for o, h in ok:
            getattr(self, o.role).append(h)
        try:
            for role in ("prefill", "decode"):
                if not getattr(self, role):
                    raise UnitStartFailed(f"no {role} unit could start: " + "; ".join(
                        f"unit {o.uid}: {why}" for o, why in failed if o.role == role))
            ctl = control_options()
            self.ledger = LedgerActor.options(**ctl).remote(ledger_root(cfg), cfg.ledger.flush_rows,
                                                            cfg.ledger.flush_interval_s)
            await self.ledger.start.remote()
            await self.ledger.append.remote(capacity_rows(cfg, self._unit_ids(), "start"))
            if cfg.autoscale.enabled:
                self.capacity = CapacityController.options(**ctl).remote(
                    cfg, model_dir, args, {"prefill": self.prefill, "decode": self.decode}, self.ledger, self.scope)
                await self.capacity.start.remote()
            units = None if self.capacity is not None else {"prefill": self.prefill, "decode": self.decode}
            self.router = RouterActor.options(**ctl).remote(units, cfg.serve.max_queue, cfg.kv_page_tokens,
                                                            self.capacity)
        except BaseException:
            await self.teardown()
            raise
        log.info("units up: prefill %d x %d ranks, decode %d x %d ranks", len(self.prefill),
                 cfg.prefill.ranks_per_unit, len(self.decode), cfg.decode.ranks_per_unit)

    def parts(self) -> dict:
        return {"prefill": list(self.prefill), "decode": list(self.decode), "ledger": self.ledger,
                "capacity": self.capacity, "router": self.router}

    def _unit_ids(self) -> dict[str, list[int]]:
        return {"prefill": list(range(len(self.prefill))), "decode": list(range(len(self.decode)))}

    async def __del__(self):
        await self._front_door_closed()
        await self.teardown()

    async def _front_door_closed(self) -> None:
        """Wait, at most FRONT_DOOR_S, until this application has no Ingress replica left. Serve stops
        an application's deployments all at once; waiting lets requests in flight finish on live units
        and their ledger rows land before the ledger closes (as `epserve serve` always did: the front
        door first). A controller that cannot be asked ends the wait: teardown must still run."""
        app = serve.get_replica_context().app_name
        deadline = time.monotonic() + FRONT_DOOR_S
        while time.monotonic() < deadline:
            try:
                status = (await asyncio.to_thread(serve.status)).applications.get(app)
            except Exception as exc:
                log.warning("cannot read Serve's status (%r); tearing down now", exc)
                return
            door = status.deployments.get("Ingress") if status is not None else None
            if door is None or not sum(door.replica_states.values()):
                return
            await asyncio.sleep(0.5)
        log.warning("Ingress replicas still up after %g s; tearing the units down under them", FRONT_DOOR_S)

    async def teardown(self) -> None:
        """Stop everything this replica started, in dependency order; idempotent. Each step that fails
        is logged and the rest still run (a unit left running would hold its GPUs)."""
        live = self._unit_ids()
        if self.capacity is not None:
            try:
                reg = await asyncio.wait_for(_ref(self.capacity.registry.remote()), 30)
                live = {role: [uid for uid, _, _ in reg[role]] for role in reg}
                await asyncio.wait_for(_ref(self.capacity.shutdown.remote()), 60)
            except Exception as exc:
                log.warning("capacity controller shutdown failed: %r", exc)
            ray.kill(self.capacity, no_restart=True)
            self.capacity = None
        if self.ledger is not None:
            try:
                await asyncio.wait_for(_ref(self.ledger.append.remote(capacity_rows(self.cfg, live, "stop"))), 30)
                await asyncio.wait_for(_ref(self.ledger.close.remote()), 30)
            except Exception as exc:
                log.warning("ledger close failed: %r", exc)
            ray.kill(self.ledger, no_restart=True)       # it restarts itself otherwise
            self.ledger = None
        if self.router is not None:
            ray.kill(self.router, no_restart=True)
            self.router = None
        units, self.prefill, self.decode = self.prefill + self.decode, [], []
        results = await asyncio.gather(*[asyncio.wait_for(_ref(u.shutdown.remote()), 60) for u in units],
                                       return_exceptions=True)
        for u, r in zip(units, results):
            if isinstance(r, BaseException):
                log.warning("unit supervisor shutdown failed: %r", r)
            ray.kill(u, no_restart=True)


async def _ref(ref):
    return await ref
