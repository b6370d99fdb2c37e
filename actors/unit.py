"""UnitSupervisor: starts, watches, and restarts one unit of rank actors as a whole.

It owns the unit's placement group (placement/groups.py), starts one RankActor per bundle in
rank order, runs the rendezvous (rank 0 publishes its address), and then lets the ranks drive
their own lockstep (actors/rank.py, pipelines/lockstep.py): the supervisor is not on the step
path. It hands each request to its rank's inbox, relays the token deltas the ranks push (to
`generate` / `stream` callers), keeps the requests' produced tokens, and owns the lifecycle:
start, health, restart and resume, EPLB switch requests, shutdown.

If any rank dies or a rank's loop fails, the whole unit is torn down and rebuilt (no half-unit
keeps running), and each unfinished request is re-run on the same rank index from its prompt
plus the tokens it already produced: callers see complete, correct outputs (greedy and seeded
sampling are deterministic per token index).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import ray
import torch

from epserve.actors.rank import RankActor
from epserve.actors.rank_messages import Delivery, UnitLayout
from epserve.messages import RankStats
from epserve.pipelines.runner import RankSpec, TokenDelta
from epserve.pipelines.sequence import Sequence
from epserve.placement.devices import NOSET_ENV, check_distinct_gpus
from epserve.placement.groups import create_unit_placement, remove_unit_placement
from epserve.placement.topology import UnitShape, initial_phy2log

log = logging.getLogger("epserve.unit")


class RequestRejected(ValueError):
    """A rank refused the request (too long for its context or KV pool, bad token ids)."""


@dataclass
class Tracked:
    """The supervisor's copy of a request: enough to re-run it on a rebuilt unit."""

    seq: Sequence
    rank: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    t_submit: float = field(default_factory=time.time)
    t_first: float | None = None
    kv_blocks: list | None = None      # prefill units: object refs of the handed-off KV blocks
    draft: list | None = None          # prefill units with MTP: the first drafts, handed over with the KV


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)
class UnitSupervisor:
    def __init__(self, unit_id: int, role: str, spec: RankSpec, shape: UnitShape, cpus_per_rank: float = 0.1,
                 fp8_dispatch: bool = False, step_timeout_s: float = 300.0, n_moe_layers: int = 0):
        self.unit_id, self.role, self.spec, self.shape = unit_id, role, spec, shape
        self.cpus_per_rank, self.fp8_dispatch, self.step_timeout_s = cpus_per_rank, fp8_dispatch, step_timeout_s
        self.phy2log = initial_phy2log(n_moe_layers, shape.n_routed_experts, shape.n_slots)
        self.ranks: list = []
        self.loops: list = []
        self.pushes: list[dict] = []
        self.next_push: list[int] = []
        self.placement = None
        self.rank_info: list[dict] = []
        self.requests: dict[str, Tracked] = {}
        self.stats_cache: list[RankStats] = [RankStats(unit_id, r) for r in range(shape.n_ranks)]
        self.last: list[Delivery | None] = [None] * shape.n_ranks
        self.n_restarts = 0
        self.failures_in_a_row = 0     # rebuilds since a step last produced a token
        self.map_version = 0
        self.switch_wanted: int | None = None
        self.switched = asyncio.Event()
        self.eplb_report: dict | None = None
        self.monitor = None
        self.closing = False
        self.drive = True
        self.rebuilding = False    # between a failure and the rebuilt unit's resubmission: requests are only tracked

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self, attempts: int = 3, drive: bool = True) -> list[dict]:
        """Build the unit; drive=False leaves the ranks' loops off (benchmarks step them directly)."""
        self.drive = drive
        for attempt in range(1, attempts + 1):
            try:
                await self._build()
                break
            except Exception as exc:   # a transient cluster error must not leave half a unit behind
                await self._teardown()
                if attempt == attempts:
                    raise
                log.warning("%s unit %d start failed (%r); retrying (%d/%d)", self.role, self.unit_id, exc,
                            attempt, attempts)
                await asyncio.sleep(1.0)
        return self.rank_info

    async def _build(self) -> None:
        s = self.shape
        name = f"epserve-{self.role}-unit{self.unit_id}-gen{self.n_restarts}"
        self.placement = await asyncio.get_running_loop().run_in_executor(
            None, lambda: create_unit_placement(name, s.nodes_per_unit, s.gpus_per_node, self.cpus_per_rank))
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        self.ranks = []
        # On CUDA every rank sees all GPUs of its node and drives its own by index (peers reachable
        # over NVLink for NCCL P2P and DeepEP's IPC buffers); placement/devices.py has the cases.
        extra = {"runtime_env": {"env_vars": {NOSET_ENV: "1"}}} if self.spec.device.startswith("cuda") else {}
        for r in range(s.n_ranks):
            strategy = PlacementGroupSchedulingStrategy(self.placement.pg, placement_group_bundle_index=
                                                        self.placement.rank_bundle[r])
            layout = UnitLayout(self.unit_id, r, s.n_ranks, s.gpus_per_node, self.fp8_dispatch)
            self.ranks.append(RankActor.options(num_gpus=1, num_cpus=self.cpus_per_rank, scheduling_strategy=strategy,
                                                **extra).remote(self.spec, layout, self.phy2log))
        where = await asyncio.gather(*[rk.info.remote() for rk in self.ranks])
        check_distinct_gpus([(w["node_id"], w["gpu_ids"]) for w in where])
        master = await self.ranks[0].rendezvous_address.remote()
        timeout = min(self.step_timeout_s, 600.0)
        self.rank_info = await asyncio.gather(*[rk.setup.remote(master, timeout) for rk in self.ranks])
        self.stats_cache = [RankStats(self.unit_id, r, kv_blocks_total=info["kv_pages"])
                            for r, info in enumerate(self.rank_info)]
        self.last = [None] * s.n_ranks
        if self.drive:
            me = ray.get_runtime_context().current_actor
            self.pushes = [{} for _ in self.ranks]          # rank -> {seq: Delivery} waiting for an earlier one
            self.next_push = [0] * len(self.ranks)
            self.loops = [rk.run_loop.remote(me, [p for p in self.ranks if p is not rk], self.n_restarts)
                          for rk in self.ranks]
            self.monitor = asyncio.get_running_loop().create_task(self._watch(self.loops, self.n_restarts))
        log.info("%s unit %d up: %d ranks on %d node(s), rendezvous %s:%d", self.role, self.unit_id, s.n_ranks,
                 s.nodes_per_unit, *master)

    async def _watch(self, loops: list, generation: int) -> None:
        """A rank's loop ends only at shutdown; anything else (a dead rank, a failed step) rebuilds.
        A watcher of an older generation (its ranks were already replaced) does nothing."""
        done, _ = await asyncio.wait([asyncio.ensure_future(ref) for ref in loops], return_when=asyncio.FIRST_COMPLETED)
        if self.closing or generation != self.n_restarts:
            return
        why = "a rank's loop ended"
        for fut in done:
            exc = fut.exception()
            if exc is not None:
                why = f"{type(exc).__name__}: {str(exc)[-400:]}"
        self.failures_in_a_row += 1
        if self.failures_in_a_row >= 3:   # not a dead rank but a poisoned batch: fail it, keep serving
            for rid in [rid for rid, tr in self.requests.items() if tr.finish_reason is None]:
                self._fail(rid, f"internal error after {self.failures_in_a_row} attempts: {why}")
            self.failures_in_a_row = 0
        await self._restart(why)

    async def _teardown(self) -> None:
        for rk in self.ranks:
            ray.kill(rk, no_restart=True)
        self.ranks, self.loops = [], []
        if self.placement is not None:
            remove_unit_placement(self.placement)
            self.placement = None

    async def _restart(self, reason: str) -> None:
        self.n_restarts += 1
        self.rebuilding = True
        log.warning("%s unit %d: %s; rebuilding the whole unit (restart %d)", self.role, self.unit_id, reason,
                    self.n_restarts)
        try:
            await self._rebuild()
        finally:
            self.rebuilding = False

    async def _rebuild(self) -> None:
        await self._teardown()
        while not self.closing:
            try:
                await self._build()
                break
            except Exception as exc:  # cluster still recovering: retry, requests stay queued
                log.warning("%s unit %d rebuild failed: %r; retrying", self.role, self.unit_id, exc)
                await self._teardown()
                await asyncio.sleep(1.0)
        if self.switch_wanted is not None:    # the rebuilt ranks start from the current map
            self.switch_wanted = None
            self.switched.set()
        per_rank: dict[int, list[Sequence]] = {}
        for rid, tr in self.requests.items():
            if tr.finish_reason is None and tr.error is None:
                per_rank.setdefault(tr.rank, []).append(
                    Sequence(rid, tr.seq.prompt_ids, tr.seq.params, output_ids=list(tr.output_ids),
                             n_cached=tr.seq.n_cached, tenant=tr.seq.tenant, share_kv=tr.seq.share_kv))
        for r, seqs in per_rank.items():
            self.ranks[r].submit.remote(seqs)

    async def shutdown(self) -> None:
        self.closing = True
        if self.monitor:
            self.monitor.cancel()
        if getattr(self, "controller", None) is not None:
            ray.kill(self.controller)
        if self.loops:
            await asyncio.gather(*[rk.stop_loop.remote() for rk in self.ranks], return_exceptions=True)
            await asyncio.wait([asyncio.ensure_future(ref) for ref in self.loops], timeout=30)
        await asyncio.gather(*[rk.shutdown.remote() for rk in self.ranks], return_exceptions=True)
        await self._teardown()

    # ---- what the ranks push -----------------------------------------------------------
    @ray.method(enable_task_events=False)
    async def deliver(self, d: Delivery) -> None:
        """One rank's push (a fire-and-forget call from its loop), applied in the rank's push order:
        an async actor may run calls from one caller out of order (Ray orders only synchronous,
        single-threaded actors), and a token applied late would be dropped or misplaced. Pushes
        from an older build of the unit are stale (its requests were resubmitted) and dropped."""
        if d.generation != self.n_restarts or not self.pushes:
            return
        pending = self.pushes[d.rank]
        pending[d.seq] = d
        while self.next_push[d.rank] in pending:
            self._apply(pending.pop(self.next_push[d.rank]))
            self.next_push[d.rank] += 1

    def _apply(self, d: Delivery) -> None:
        self.last[d.rank] = d
        self.stats_cache[d.rank] = d.stats
        for rid, why in d.rejected:
            self._fail(rid, why)
        for delta in d.deltas.unpack():
            self._deliver(delta)
        if len(d.deltas):
            self.failures_in_a_row = 0
        if self.switch_wanted is not None and all(x is not None and x.map_version >= self.switch_wanted
                                                  for x in self.last):
            self.map_version = self.switch_wanted
            self.switch_wanted = None
            self.switched.set()

    def _deliver(self, d: TokenDelta) -> None:
        tr = self.requests.get(d.request_id)
        if tr is None or tr.finish_reason is not None:
            return
        if tr.t_first is None:
            tr.t_first = time.time()
        tr.output_ids.append(d.token_id)
        if d.logprob is not None:
            tr.logprobs.append(d.logprob)
        tr.finish_reason = d.finish_reason
        tr.kv_blocks = d.kv_blocks
        tr.draft = d.draft
        tr.seq.n_cached = max(tr.seq.n_cached, d.n_cached)   # billed as hits, as the rank loaded them
        tr.queue.put_nowait(d)

    def _fail(self, rid: str, why: str) -> None:
        tr = self.requests.get(rid)
        if tr is not None:
            tr.error = why
            tr.queue.put_nowait(RequestRejected(why) if not why.startswith("internal error") else RuntimeError(why))

    # ---- requests ----------------------------------------------------------------------
    def _track(self, seq: Sequence, rank: int) -> Tracked:
        if not 0 <= rank < self.shape.n_ranks:
            raise ValueError(f"rank {rank} is not in this unit (0..{self.shape.n_ranks - 1})")
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already running on this unit")
        tr = Tracked(seq, rank, output_ids=list(seq.output_ids))
        self.requests[seq.request_id] = tr
        return tr

    def _submit(self, items: list[tuple[Sequence, int]]) -> list[Tracked]:
        """Track every request first, then one inbox call per rank (a rank may answer at once)."""
        trs = [self._track(seq, rank) for seq, rank in items]
        if self.rebuilding:     # the rebuilt unit resubmits every tracked request (a rank half-built must not)
            return trs
        per_rank: dict[int, list[Sequence]] = {}
        for seq, rank in items:
            per_rank.setdefault(rank, []).append(seq)
        for r, seqs in per_rank.items():
            self.ranks[r].submit.remote(seqs)
        return trs

    async def _finish(self, tr: Tracked) -> dict:
        while tr.finish_reason is None:
            item = await tr.queue.get()
            if isinstance(item, Exception):
                self.requests.pop(tr.seq.request_id, None)
                raise item
        self.requests.pop(tr.seq.request_id, None)
        return self._result(tr)

    @staticmethod
    def _result(tr: Tracked) -> dict:
        return {"request_id": tr.seq.request_id, "token_ids": tr.output_ids, "logprobs": tr.logprobs or None,
                "finish_reason": tr.finish_reason, "n_cached": tr.seq.n_cached, "kv_blocks": tr.kv_blocks,
                "draft": tr.draft,
                "ttft_s": (tr.t_first or time.time()) - tr.t_submit, "decode_s": time.time() - (tr.t_first or 0)}

    async def generate(self, items: list[tuple[Sequence, int]]) -> list[dict | str]:
        """Run sequences to completion on the given ranks.

        A request that fails comes back as {"error": text, "rejected": bool}; rejected means the
        request itself was bad (too long, bad token ids), otherwise the unit failed it.
        """
        trs = self._submit(items)
        results = await asyncio.gather(*[self._finish(tr) for tr in trs], return_exceptions=True)
        return [{"error": str(r), "rejected": isinstance(r, RequestRejected)} if isinstance(r, Exception) else r
                for r in results]

    @ray.method(enable_task_events=False)
    async def prefill(self, seq: Sequence, rank: int) -> dict:
        """Prefill role: run the prompt, return the first token and the KV blocks' object refs."""
        return (await self.generate([(seq, rank)]))[0]

    @ray.method(enable_task_events=False)
    async def stream(self, seq: Sequence, rank: int):
        """Yield TokenDeltas as they are produced; the caller aborts on disconnect."""
        tr = self._submit([(seq, rank)])[0]
        try:
            while True:
                item = await tr.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:             # aborted
                    break
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            if tr.finish_reason is None or tr.finish_reason == "abort":
                await self.abort(seq.request_id)
            self.requests.pop(seq.request_id, None)

    @ray.method(enable_task_events=False)
    async def abort(self, request_id: str) -> bool:
        """Stop a request: its rank drops it before its next step (a step in flight finishes, its
        token is discarded); a `generate` waiting on it returns it with finish_reason "abort"."""
        tr = self.requests.pop(request_id, None)
        if tr is None:
            return False
        if self.ranks and not self.rebuilding:     # else it is simply not resubmitted
            self.ranks[tr.rank].abort.remote([request_id])
        if tr.finish_reason is None:
            tr.finish_reason = "abort"
            tr.queue.put_nowait(None)
        return True

    # ---- observation ---------------------------------------------------------------------
    @ray.method(enable_task_events=False)
    def request_ids(self) -> set[str]:
        """Requests this unit is running (the router reconciles its in-flight table with them)."""
        return set(self.requests)

    @ray.method(enable_task_events=False)
    def stats(self) -> list[RankStats]:
        return list(self.stats_cache)

    @ray.method(enable_task_events=False)
    def status(self) -> dict:
        # every rank steps together; the one that reported last has the newest counts
        head = max((x for x in self.last if x is not None), key=lambda x: x.n_steps, default=None)
        timing = [x.timing for x in self.last if x is not None]
        steps = head.n_steps if head else 0
        return {"unit": self.unit_id, "role": self.role, "steps": steps,
                "restarts": self.n_restarts, "ranks": self.rank_info, "in_flight": len(self.requests),
                "map_version": self.map_version, "eplb": self.eplb_report,
                "schedule_steps": dict(head.schedule_steps) if head else {"plain": 0, "prefill": 0, "decode": 0},
                "overlap": {"mode": self.spec.overlap, "split_pays": dict(head.split_pays) if head else {}},
                "loop_timing": timing}

    def rank_handles(self) -> list:
        return list(self.ranks)

    async def expert_counters(self, reset: bool = True) -> list[dict]:
        return await asyncio.gather(*[rk.expert_counters.remote(reset) for rk in self.ranks])

    def attach(self, controller) -> None:
        """Keep the unit's EPLB controller alive with the unit (it holds the handle)."""
        self.controller = controller

    async def rebalance_now(self) -> dict:
        """On-demand EPLB round through the attached controller."""
        return await self.controller.rebalance.remote(force=True)

    def phy2log_now(self) -> torch.Tensor:
        return self.phy2log.clone()

    async def apply_placement(self, phy2log: torch.Tensor, report: dict | None = None) -> dict:
        """Live migration: every rank stages its new slots in the background while requests keep
        running; then all switch before one step they agree on (pipelines/lockstep.py)."""
        t0 = time.time()
        version = self.map_version + 1
        await asyncio.gather(*[rk.stage_placement.remote(phy2log, version) for rk in self.ranks])
        while True:
            done = await asyncio.gather(*[rk.staging_done.remote() for rk in self.ranks])
            if all(d is not None for d in done):
                break
            await asyncio.sleep(0.02)
        self.switched.clear()
        self.switch_wanted = version
        await asyncio.gather(*[rk.request_switch.remote(version) for rk in self.ranks])
        await self.switched.wait()
        if self.map_version != version:
            raise RuntimeError(f"placement v{version} was not applied: the unit restarted meanwhile")
        self.phy2log = phy2log.clone()
        step = self.last[0].switched_at.get(version, -1)
        out = {"version": version, "switch_step": step, "staged_s": round(time.time() - t0, 3),
               "experts_loaded": sum(d["loaded"] for d in done), "slots_reused": sum(d["reused"] for d in done)}
        self.eplb_report = {**(report or {}), **out}
        log.info("%s unit %d: placement v%d live at step %d (%d expert loads, %.2fs)", self.role, self.unit_id,
                 version, step, out["experts_loaded"], out["staged_s"])
        return out

    async def rank_placements(self) -> list[dict]:
        return await asyncio.gather(*[rk.placement.remote() for rk in self.ranks])
