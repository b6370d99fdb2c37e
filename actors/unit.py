"""UnitSupervisor: starts, steps, and restarts one unit of rank actors as a whole.

It owns the unit's placement group (placement/groups.py), starts one RankActor per
bundle in rank order, runs the rendezvous (rank 0 publishes its address), and drives
the lockstep: every step calls every rank at once with that rank's new requests and
aborts; a rank with no work runs an empty batch so it still joins each MoE exchange.
With no work anywhere the loop awaits an event (parks; no spinning).

If any rank dies or a step times out, the whole unit is torn down and rebuilt (no
half-unit keeps running), and each unfinished request is re-run on the same rank
index from its prompt plus the tokens it already produced: callers see complete,
correct outputs (greedy and seeded sampling are deterministic per token index).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import ray
import torch

from epserve.actors.rank import RankActor, StepInput, UnitLayout
from epserve.pipelines.overlap import OverlapTuner, choose_schedule, step_phase, tuner_record
from epserve.messages import RankStats
from epserve.pipelines.runner import RankSpec, TokenDelta
from epserve.pipelines.sequence import Sequence
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


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)
class UnitSupervisor:
    def __init__(self, unit_id: int, role: str, spec: RankSpec, shape: UnitShape, cpus_per_rank: float = 0.1,
                 fp8_dispatch: bool = False, step_timeout_s: float = 300.0, n_moe_layers: int = 0):
        self.unit_id, self.role, self.spec, self.shape = unit_id, role, spec, shape
        self.cpus_per_rank, self.fp8_dispatch, self.step_timeout_s = cpus_per_rank, fp8_dispatch, step_timeout_s
        self.phy2log = initial_phy2log(n_moe_layers, shape.n_routed_experts, shape.n_slots)
        self.ranks: list = []
        self.placement = None
        self.rank_info: list[dict] = []
        self.requests: dict[str, Tracked] = {}
        self.inbox: list[list[Sequence]] = [[] for _ in range(shape.n_ranks)]
        self.aborts: list[list[str]] = [[] for _ in range(shape.n_ranks)]
        self.busy = [False] * shape.n_ranks
        self.prefill_next = [False] * shape.n_ranks
        self.stats_cache: list[RankStats] = [RankStats(unit_id, r) for r in range(shape.n_ranks)]
        self.schedule_steps = {"plain": 0, "prefill": 0, "decode": 0}     # steps run on each schedule
        self.tuner = OverlapTuner()
        self.n_steps = self.n_restarts = 0
        self.failures_in_a_row = 0     # steps that failed since the last good one
        self.map_version, self.pending_switch = 0, None
        self.switched = asyncio.Event()
        self.eplb_report: dict | None = None
        self.wake = asyncio.Event()
        self.loop_task = None
        self.closing = False

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self, attempts: int = 3) -> list[dict]:
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
        self.loop_task = asyncio.get_running_loop().create_task(self._loop())
        return self.rank_info

    async def _build(self) -> None:
        s = self.shape
        name = f"epserve-{self.role}-unit{self.unit_id}-gen{self.n_restarts}"
        self.placement = await asyncio.get_running_loop().run_in_executor(
            None, lambda: create_unit_placement(name, s.nodes_per_unit, s.gpus_per_node, self.cpus_per_rank))
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        self.ranks = []
        for r in range(s.n_ranks):
            strategy = PlacementGroupSchedulingStrategy(self.placement.pg, placement_group_bundle_index=
                                                        self.placement.rank_bundle[r])
            layout = UnitLayout(self.unit_id, r, s.n_ranks, s.gpus_per_node, self.fp8_dispatch)
            self.ranks.append(RankActor.options(num_gpus=1, num_cpus=self.cpus_per_rank,
                                                scheduling_strategy=strategy).remote(self.spec, layout, self.phy2log))
        master = await self.ranks[0].rendezvous_address.remote()
        self.rank_info = await asyncio.gather(*[rk.setup.remote(master) for rk in self.ranks])
        self.busy = [False] * s.n_ranks
        self.prefill_next = [False] * s.n_ranks
        self.stats_cache = [RankStats(self.unit_id, r, kv_blocks_total=info["kv_pages"])
                            for r, info in enumerate(self.rank_info)]
        log.info("%s unit %d up: %d ranks on %d node(s), rendezvous %s:%d", self.role, self.unit_id, s.n_ranks,
                 s.nodes_per_unit, *master)

    async def _teardown(self) -> None:
        for rk in self.ranks:
            ray.kill(rk, no_restart=True)
        self.ranks = []
        if self.placement is not None:
            remove_unit_placement(self.placement)
            self.placement = None

    async def _restart(self, reason: str) -> None:
        self.n_restarts += 1
        log.warning("%s unit %d: %s; rebuilding the whole unit (restart %d)", self.role, self.unit_id, reason,
                    self.n_restarts)
        await self._teardown()
        while not self.closing:
            try:
                await self._build()
                break
            except Exception as exc:  # cluster still recovering: retry, requests stay queued
                log.warning("%s unit %d rebuild failed: %r; retrying", self.role, self.unit_id, exc)
                await self._teardown()
                await asyncio.sleep(1.0)
        self.inbox = [[] for _ in self.ranks]
        self.aborts = [[] for _ in self.ranks]
        for rid, tr in self.requests.items():
            if tr.finish_reason is None and tr.error is None:
                seq = Sequence(rid, tr.seq.prompt_ids, tr.seq.params, output_ids=list(tr.output_ids),
                               n_cached=tr.seq.n_cached)
                self.inbox[tr.rank].append(seq)
        self.wake.set()

    async def shutdown(self) -> None:
        self.closing = True
        self.wake.set()
        if self.loop_task:
            self.loop_task.cancel()
        if getattr(self, "controller", None) is not None:
            ray.kill(self.controller)
        await asyncio.gather(*[rk.shutdown.remote() for rk in self.ranks], return_exceptions=True)
        await self._teardown()

    # ---- the lockstep loop -----------------------------------------------------------
    def _has_work(self) -> bool:
        return any(self.busy) or any(self.inbox) or any(self.aborts) or self.pending_switch is not None

    async def _loop(self) -> None:
        while not self.closing:
            if not self._has_work():
                self.wake.clear()
                await self.wake.wait()
                continue
            switching = self.pending_switch
            phase, schedule = self._schedule()
            t0 = time.perf_counter()
            inputs = [StepInput(self.inbox[r], self.aborts[r], switching, schedule) for r in range(len(self.ranks))]
            self.inbox = [[] for _ in self.ranks]
            self.aborts = [[] for _ in self.ranks]
            try:
                outs = await asyncio.wait_for(asyncio.gather(*[rk.step.remote(i) for rk, i in
                                                               zip(self.ranks, inputs)]), self.step_timeout_s)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                why = f"step failed: {type(exc).__name__}: {str(exc)[-400:]}"
                self.failures_in_a_row += 1
                if self.failures_in_a_row >= 3:   # not a dead rank but a poisoned batch: fail it, keep serving
                    for rid in [rid for rid, tr in self.requests.items() if tr.finish_reason is None]:
                        self._fail(rid, f"internal error after {self.failures_in_a_row} attempts: {why}")
                    self.failures_in_a_row = 0
                await self._restart(why)
                continue
            self.n_steps += 1
            self.failures_in_a_row = 0
            self.schedule_steps[schedule or "plain"] += 1
            tokens = max(o.n_tokens for o in outs)
            if phase is not None and self.spec.overlap == "auto" and tokens:   # ms per token of the busiest rank
                tuner_record(self.tuner, phase, schedule is not None, (time.perf_counter() - t0) * 1e3 / tokens)
            if switching is not None:          # every rank switched before this same step
                self.map_version, self.phy2log = switching, self.staged_phy2log
                self.pending_switch = None
                self.switched.set()
            for r, out in enumerate(outs):
                self.busy[r] = out.has_work
                self.prefill_next[r] = out.prefill_next
                self.stats_cache[r] = out.stats
                for rid, why in out.rejected:
                    self._fail(rid, why)
                for d in out.deltas:
                    self._deliver(d)

    def _schedule(self) -> tuple[str | None, str | None]:
        """(phase, schedule): one overlap schedule for all ranks (they must issue their collectives
        in one order); the phase is what a split step would run, for the tuner."""
        new_prompts = any(not s.kv_blocks for box in self.inbox for s in box)   # handed-off ones come prefilled
        phase = step_phase(new_prompts or any(self.prefill_next),
                           max((s.n_running for s in self.stats_cache), default=0))
        return phase, choose_schedule(self.spec.overlap, phase, self.tuner)

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
        tr.seq.n_cached = max(tr.seq.n_cached, d.n_cached)   # billed as hits, as the rank loaded them
        tr.queue.put_nowait(d)

    def _fail(self, rid: str, why: str) -> None:
        tr = self.requests.get(rid)
        if tr is not None:
            tr.error = why
            tr.queue.put_nowait(RequestRejected(why) if not why.startswith("internal error") else RuntimeError(why))

    # ---- requests ----------------------------------------------------------------------
    def _submit(self, seq: Sequence, rank: int) -> Tracked:
        if not 0 <= rank < self.shape.n_ranks:
            raise ValueError(f"rank {rank} is not in this unit (0..{self.shape.n_ranks - 1})")
        if seq.request_id in self.requests:
            raise ValueError(f"request id {seq.request_id!r} is already running on this unit")
        tr = Tracked(seq, rank, output_ids=list(seq.output_ids))
        self.requests[seq.request_id] = tr
        self.inbox[rank].append(seq)
        self.wake.set()
        return tr

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
                "ttft_s": (tr.t_first or time.time()) - tr.t_submit, "decode_s": time.time() - (tr.t_first or 0)}

    async def generate(self, items: list[tuple[Sequence, int]]) -> list[dict | str]:
        """Run sequences to completion on the given ranks.

        A request that fails comes back as {"error": text, "rejected": bool}; rejected means the
        request itself was bad (too long, bad token ids), otherwise the unit failed it.
        """
        trs = [self._submit(seq, rank) for seq, rank in items]
        results = await asyncio.gather(*[self._finish(tr) for tr in trs], return_exceptions=True)
        return [{"error": str(r), "rejected": isinstance(r, RequestRejected)} if isinstance(r, Exception) else r
                for r in results]

    async def prefill(self, seq: Sequence, rank: int) -> dict:
        """Prefill role: run the prompt, return the first token and the KV blocks' object refs."""
        return (await self.generate([(seq, rank)]))[0]

    async def stream(self, seq: Sequence, rank: int):
        """Yield TokenDeltas as they are produced; the caller aborts on disconnect."""
        tr = self._submit(seq, rank)
        try:
            while True:
                item = await tr.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            if tr.finish_reason is None:
                await self.abort(seq.request_id)
            self.requests.pop(seq.request_id, None)

    async def abort(self, request_id: str) -> bool:
        tr = self.requests.pop(request_id, None)
        if tr is None:
            return False
        self.aborts[tr.rank].append(request_id)
        self.wake.set()
        return True

    # ---- observation ---------------------------------------------------------------------
    def stats(self) -> list[RankStats]:
        return list(self.stats_cache)

    def status(self) -> dict:
        return {"unit": self.unit_id, "role": self.role, "steps": self.n_steps, "restarts": self.n_restarts,
                "ranks": self.rank_info, "in_flight": len(self.requests), "map_version": self.map_version,
                "eplb": self.eplb_report, "schedule_steps": dict(self.schedule_steps),
                "overlap": {"mode": self.spec.overlap, "split_pays": dict(self.tuner.best)}}

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
        running; then all switch before one agreed step. Returns what was moved and when."""
        t0 = time.time()
        version = self.map_version + 1
        await asyncio.gather(*[rk.stage_placement.remote(phy2log, version) for rk in self.ranks])
        while True:
            done = await asyncio.gather(*[rk.staging_done.remote() for rk in self.ranks])
            if all(d is not None for d in done):
                break
            await asyncio.sleep(0.02)
        self.staged_phy2log = phy2log.clone()
        self.switched.clear()
        self.pending_switch = version
        self.wake.set()
        await self.switched.wait()
        out = {"version": version, "switch_step": self.n_steps - 1, "staged_s": round(time.time() - t0, 3),
               "experts_loaded": sum(d["loaded"] for d in done), "slots_reused": sum(d["reused"] for d in done)}
        self.eplb_report = {**(report or {}), **out}
        log.info("%s unit %d: placement v%d live at step %d (%d expert loads, %.2fs)", self.role, self.unit_id,
                 version, out["switch_step"], out["experts_loaded"], out["staged_s"])
        return out

    async def rank_placements(self) -> list[dict]:
        return await asyncio.gather(*[rk.placement.remote() for rk in self.ranks])
