"""CapacityController: applies placement/capacity.py's unit counts to the running deployment.

It owns the registry of live units (the router reads it), evaluates the policy every
`autoscale.interval_s` from the time of day and live load (KV pressure of the decode
ranks), starts whole units (all a tick adds at once; one that fails does not stop the
others), and removes whole units by draining them: a draining unit
takes no new requests, its running ones finish, then it stops and its nodes are
released (the `autoscale.release_hook` command runs with EPSERVE_FREED_GPUS set, e.g.
a `ray job submit` of a training entrypoint). Start and stop events go to the ledger, and a
start or stop is done only once the ledger has its row (or, if the ledger cannot be reached,
once the row is written as a part of its own).

Killed, it is restarted by Ray with the units it was built with; its loop comes back with the
router's next registry read. Units it had started itself die with it (Ray actors share their
owner's fate) and the rebuilt registry no longer lists them; a drain in progress is forgotten.

Why not Ray Serve's autoscaling policy: units are not Serve replicas (a unit is a
placement group of rank actors with one lockstep owner), and prefill and decode must
be decided together from token-level load, so the policy runs here as a plain function.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import subprocess
import time

import ray

from epserve.actors.launch import UnitOrder, start_all
from epserve.actors.ledger import append_durably
from epserve.config import ledger_root
from epserve.fleet.ledger import CapacityRow
from epserve.placement.capacity import CapacityPolicy, CapacityState, FleetLoad, desired_units, parse_schedule
from epserve.placement.groups import DIRECT_SCOPE

log = logging.getLogger("epserve.capacity")
ROLES = ("prefill", "decode")


def policy_from_config(cfg) -> CapacityPolicy:
    a = cfg.autoscale
    return CapacityPolicy(schedule=parse_schedule(a.schedule), prefill_bounds=tuple(a.prefill_units),
                          decode_bounds=tuple(a.decode_units), downscale_delay_s=a.downscale_delay_s)


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=100)
class CapacityController:
    def __init__(self, cfg, model_dir: str, args, units: dict, ledger=None, scope: str = DIRECT_SCOPE):
        self.cfg, self.model_dir, self.args, self.ledger = cfg, model_dir, args, ledger
        self.scope = scope          # the units it starts name their placement groups by it (placement/groups.py)
        self.policy = policy_from_config(cfg)
        self.units = {role: dict(enumerate(units[role])) for role in ROLES}    # role -> {unit id: handle}
        self.draining: dict[str, set[int]] = {role: set() for role in ROLES}
        self.next_id = {role: len(units[role]) for role in ROLES}
        self.state = CapacityState()
        self.fake_hour: float | None = None
        self.events: list[dict] = []
        self.task = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        self._ensure_loop()

    def _ensure_loop(self) -> None:
        """Started by the first call, so also after a restart (the router reads the registry every 0.5 s)."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.autoscale.interval_s)
            try:
                await self.tick()
            except Exception as exc:
                log.warning("capacity tick failed: %r", exc)

    def set_clock(self, hour: float | None) -> None:
        """Tests and drills: pretend it is `hour` o'clock (None: the real local time)."""
        self.fake_hour = hour

    @ray.method(enable_task_events=False)
    async def registry(self) -> dict:
        """role -> list of (unit id, handle, is_draining), for the router."""
        self._ensure_loop()
        return {role: [(uid, h, uid in self.draining[role]) for uid, h in sorted(self.units[role].items())]
                for role in ROLES}

    def history(self) -> list[dict]:
        return list(self.events)

    def _hour(self) -> float:
        if self.fake_hour is not None:
            return self.fake_hour
        t = time.localtime()
        return t.tm_hour + t.tm_min / 60

    async def _load(self) -> FleetLoad:
        stats = await asyncio.gather(*[h.stats.remote() for uid, h in self.units["decode"].items()
                                       if uid not in self.draining["decode"]])
        ranks = [s for unit in stats for s in unit]
        used = sum(s.kv_blocks_used for s in ranks) / max(1, sum(s.kv_blocks_total for s in ranks))
        return FleetLoad(now_s=time.time(), decode_kv_used_fraction=used)

    async def tick(self) -> dict:
        """One policy evaluation; applies the difference in whole units."""
        async with self.lock:
            current = tuple(len(self.units[r]) - len(self.draining[r]) for r in ROLES)
            (want_p, want_d), self.state = desired_units(self.policy, await self._load(), self._hour(), current,
                                                         self.state)
            todo = []
            for role, want, have in (("prefill", want_p, current[0]), ("decode", want_d, current[1])):
                for _ in range(want - have):
                    todo.append(self._order(role))
                for _ in range(have - want):
                    await self._drain(role)
            started = await self._add(todo)
            return {"hour": self._hour(), "current": current, "desired": (want_p, want_d), "started": started}

    def _order(self, role: str) -> UnitOrder:
        uid = self.next_id[role]
        self.next_id[role] += 1
        return UnitOrder(uid, role, role, dataclasses.replace(getattr(self.cfg, role), units=1))

    async def _add(self, todo: list[UnitOrder]) -> int:
        """Start all ordered units at once; one that fails is logged and recorded, the rest serve."""
        if not todo:
            return 0
        t0 = time.time()
        ok, failed = await start_all(self.cfg, self.model_dir, self.args, todo, self.scope)
        for o, unit in ok:
            self.units[o.role][o.uid] = unit
            await self._record(o.role, o.uid, "start", time.time() - t0)
        for o, why in failed:
            self.events.append({"role": o.role, "unit": o.uid, "event": "start_failed", "why": why})
        return len(ok)

    async def _drain(self, role: str) -> None:
        candidates = [u for u in self.units[role] if u not in self.draining[role]]
        uid = max(candidates)
        self.draining[role].add(uid)
        asyncio.get_running_loop().create_task(self._finish_drain(role, uid))

    async def _finish_drain(self, role: str, uid: int) -> None:
        unit, t0 = self.units[role][uid], time.time()
        await asyncio.sleep(1.0)      # let the router see the draining flag before the last check
        while (await unit.status.remote())["in_flight"] > 0:
            await asyncio.sleep(0.2)
        await unit.shutdown.remote()
        ray.kill(unit)
        del self.units[role][uid]
        self.draining[role].discard(uid)
        await self._record(role, uid, "stop", time.time() - t0)
        hook = self.cfg.autoscale.release_hook
        if hook:
            gpus = getattr(self.cfg, role).ranks_per_unit
            subprocess.Popen(hook, shell=True, env={**os.environ, "EPSERVE_FREED_GPUS": str(gpus),
                                                    "EPSERVE_FREED_ROLE": role})

    async def _record(self, role: str, uid: int, event: str, took_s: float) -> None:
        gpus = getattr(self.cfg, role).ranks_per_unit
        self.events.append({"role": role, "unit": uid, "event": event, "took_s": round(took_s, 2)})
        log.info("%s unit %d %s (%d GPUs, %.1fs)", role, uid, event, gpus, took_s)
        if self.ledger is not None:
            row = CapacityRow(ts=time.time(), unit=f"{role}-{uid}", role=role, event=event, gpus=gpus)
            await append_durably(self.ledger, ledger_root(self.cfg), [row])

    async def shutdown(self) -> None:
        if self.task:
            self.task.cancel()
        for role in ROLES:
            for unit in self.units[role].values():
                try:
                    await unit.shutdown.remote()
                    ray.kill(unit)
                except Exception:
                    pass
