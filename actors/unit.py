"""UnitSupervisor: starts, watches, and restarts one unit of rank actors as a whole.

It owns the unit's placement group (placement/groups.py), starts one RankActor per bundle in
rank order, runs the rendezvous (rank 0 publishes its address), and then lets the ranks drive
their own lockstep (actors/rank.py, pipelines/lockstep.py): the supervisor is not on the step
path, and not on the token path either. Requests and their deltas belong to stream sinks
(actors/stream_sink.py): a sink submits straight to a rank's inbox and each rank pushes the
deltas straight to the request's sink. The supervisor keeps lifecycle only: start, health
(rank reports: stats for admission, counters), restart and resume, EPLB switch requests, drain
(`status()["in_flight"]` and `request_ids()` ask the attached sinks), shutdown. It must never
relay a token delta.

Sinks attach (`attach_sink`: the build's generation and rank handles). If any rank dies or a
rank's loop fails, the whole unit is torn down and rebuilt (no half-unit keeps running): every
sink hears `unit_down` (it holds new submissions) and then `unit_up`, and re-runs each
unfinished request on the same rank index from its prompt plus the tokens it already produced:
callers see complete, correct outputs (greedy and seeded sampling are deterministic per token
index). A sink that dies (its ingress replica died) has its requests aborted on the ranks.
An elastic unit (config `elastic: true`) goes on without a dead rank instead: its survivors
re-form, keep their requests, take the dead rank's, and a replacement joins
(actors/unit_elastic.py); the rebuild above stays the fallback. Over 300 lines: the lifecycle
above and the remote entries sinks, controllers and benches call, each a few lines.

`generate` / `prefill` / `stream` / `abort` stay for direct callers (llm.py, tests, benches):
they forward to the supervisor's own default sink, created on first use.
"""
from __future__ import annotations

import asyncio
import logging
import time

import ray
import torch

from epserve.actors import unit_elastic
from epserve.actors.rank import RankActor
from epserve.actors.rank_messages import RankReport, UnitLayout
from epserve.actors.stream_sink import StreamSink
from epserve.errors import UnitFailed
from epserve.messages import RankSpec, RankStats, RequestResult
from epserve.pipelines.sequence import Sequence
from epserve.placement.devices import NOSET_ENV, check_distinct_gpus
from epserve.placement.groups import DIRECT_SCOPE, create_unit_placement, group_name, remove_unit_placement
from epserve.placement.topology import UnitShape, initial_phy2log

log = logging.getLogger("epserve.unit")


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)
class UnitSupervisor:
    def __init__(self, unit_id: int, role: str, spec: RankSpec, shape: UnitShape, cpus_per_rank: float = 0.1,
                 fp8_dispatch: bool = False, step_timeout_s: float = 300.0, n_moe_layers: int = 0,
                 grow_back: bool = True, scope: str = DIRECT_SCOPE):
        self.unit_id, self.role, self.spec, self.shape = unit_id, role, spec, shape
        self.scope = scope             # whose units these are: names its placement groups (placement/groups.py)
        self.cpus_per_rank, self.fp8_dispatch, self.step_timeout_s = cpus_per_rank, fp8_dispatch, step_timeout_s
        self.phy2log = initial_phy2log(n_moe_layers, shape.n_routed_experts, shape.n_slots)
        self.ranks: list = []
        self.loops: list = []
        self.placement = None
        self.rank_info: list[dict] = []
        self.key = ray.get_runtime_context().get_actor_id()      # sinks and ranks name the unit by it
        self.sinks: dict[str, object] = {}                       # attached stream sinks: key -> handle
        self.sink_watches: dict[str, asyncio.Task] = {}
        self.default_sink = None
        self.stats_cache: list[RankStats] = [RankStats(unit_id, r) for r in range(shape.n_ranks)]
        self.last: list[RankReport | None] = [None] * shape.n_ranks
        self.n_restarts = 0
        self.failures_in_a_row = 0     # rebuilds since a step last produced a token
        self.map_version = 0
        self.switch_wanted: int | None = None
        self.switched = asyncio.Event()
        self.eplb_report: dict | None = None
        self.monitor = None
        self.closing = False
        self.drive = True
        self.is_up = False         # built and its loops running: sinks may submit
        self.bundle_of: list[int] = []     # rank -> its bundle (elastic: survivors keep theirs)
        self.elastic_events: list[dict] = []   # membership changes (actors/unit_elastic.py)
        self.grow_back = grow_back         # elastic: start a replacement for a dead rank (False: stay shrunk)
        self.growing: asyncio.Task | None = None
        self.freed_bundles: list[int] = []    # elastic: bundles of dead ranks waiting for a replacement

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
        if self.is_up:       # a sink that attached while the unit started waits for this
            await self._tell_sinks(lambda sk: sk.unit_up.remote(self.key, self.n_restarts, list(self.ranks)))
        return self.rank_info

    async def _build(self) -> None:
        s = self.shape
        # named by scope and this supervisor's id: if this actor is hard-killed, the group outlives it,
        # and the scope's next owner (serve/units.py) finds and removes it by that name
        name = group_name(self.scope, self.key, f"{self.role}-unit{self.unit_id}-gen{self.n_restarts}")
        self.placement = await asyncio.get_running_loop().run_in_executor(
            None, lambda: create_unit_placement(name, s.nodes_per_unit, s.gpus_per_node, self.cpus_per_rank))
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        self.ranks = []
        # On CUDA every rank sees all GPUs of its node and drives its own by index (peers reachable
        # over NVLink for NCCL P2P and DeepEP's IPC buffers); placement/devices.py has the cases.
        extra = self.rank_options()
        self.bundle_of = [self.placement.rank_bundle[r] for r in range(s.n_ranks)]
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
            self._start_loops()
        log.info("%s unit %d up: %d ranks on %d node(s), rendezvous %s:%d", self.role, self.unit_id, s.n_ranks,
                 s.nodes_per_unit, *master)

    def rank_options(self) -> dict:
        """Ray options of every rank actor beside its bundle: on CUDA every rank sees all GPUs of
        its node and drives its own by index (placement/devices.py)."""
        return {"runtime_env": {"env_vars": {NOSET_ENV: "1"}}} if self.spec.device.startswith("cuda") else {}

    def _start_loops(self) -> None:
        """Every rank's loop under the current generation, and a watch on them; the unit is up."""
        me = ray.get_runtime_context().current_actor
        self.loops = [rk.run_loop.remote(me, [p for p in self.ranks if p is not rk], self.n_restarts, self.key)
                      for rk in self.ranks]
        self.monitor = asyncio.get_running_loop().create_task(self._watch(self.loops, self.n_restarts))
        self.is_up = True

    async def _watch(self, loops: list, generation: int) -> None:
        """A rank's loop ends only at shutdown; anything else (a dead rank, a failed step) rebuilds.
        A watcher of an older generation (its ranks were already replaced) does nothing."""
        done, _ = await asyncio.wait([asyncio.ensure_future(ref) for ref in loops], return_when=asyncio.FIRST_COMPLETED)
        if self.closing or generation != self.n_restarts:
            return
        if self.spec.elastic and await unit_elastic.survive(self, loops, generation):
            return                  # the survivors went on without the dead rank(s)
        why = "a rank's loop ended"
        for fut in done:
            exc = fut.exception()
            if exc is not None:
                why = f"{type(exc).__name__}: {str(exc)[-400:]}"
        self.failures_in_a_row += 1
        fail = None
        if self.failures_in_a_row >= 3:   # not a dead rank but a poisoned batch: fail it, keep serving
            fail = UnitFailed(f"the unit failed this batch {self.failures_in_a_row} times in a row: {why}")
            self.failures_in_a_row = 0
        await self._restart(why, fail)

    async def _teardown(self) -> None:
        self.is_up = False
        for rk in self.ranks:
            ray.kill(rk, no_restart=True)
        self.ranks, self.loops = [], []
        if self.placement is not None:
            remove_unit_placement(self.placement)
            self.placement = None

    async def _restart(self, reason: str, fail: UnitFailed | None = None) -> None:
        self.n_restarts += 1
        self.is_up = False
        log.warning("%s unit %d: %s; rebuilding the whole unit (restart %d)", self.role, self.unit_id, reason,
                    self.n_restarts)
        # every sink holds new submissions (and fails the poisoned batch) before the old ranks go
        await self._tell_sinks(lambda sk: sk.unit_down.remote(self.key, self.n_restarts, fail))
        await self._rebuild()
        if not self.closing:
            n = await self._tell_sinks(lambda sk: sk.unit_up.remote(self.key, self.n_restarts, list(self.ranks)))
            log.info("%s unit %d rebuilt; sinks resubmitted %d request(s)", self.role, self.unit_id, sum(n))

    async def _tell_sinks(self, call) -> list:
        """Call every attached sink and wait (a dead or stuck one is skipped: its watch handles it)."""
        refs = [call(sk) for sk in list(self.sinks.values())]
        got = await asyncio.gather(*[asyncio.wait_for(asyncio.ensure_future(r), 30) for r in refs],
                                   return_exceptions=True)
        return [g for g in got if not isinstance(g, BaseException)]

    async def _rebuild(self) -> None:
        self.freed_bundles = []            # the rebuild fills every bundle
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

    async def shutdown(self) -> None:
        self.closing = True
        if self.monitor:
            self.monitor.cancel()
        if self.growing:
            self.growing.cancel()
        for t in list(self.sink_watches.values()):
            t.cancel()
        if getattr(self, "controller", None) is not None:
            ray.kill(self.controller)
        if self.loops:
            await asyncio.gather(*[rk.stop_loop.remote() for rk in self.ranks], return_exceptions=True)
            await asyncio.wait([asyncio.ensure_future(ref) for ref in self.loops], timeout=30)
        await asyncio.gather(*[rk.shutdown.remote() for rk in self.ranks], return_exceptions=True)
        await self._teardown()

    # ---- what the ranks report -----------------------------------------------------------
    @ray.method(enable_task_events=False)
    async def report(self, r: RankReport) -> None:
        """A rank's stats and counters (fire-and-forget from its loop, at a bounded rate). The
        newest report of the current build wins; an older build's are stale."""
        if r.generation != self.n_restarts:
            return
        if r.n_tokens:
            self.failures_in_a_row = 0
        prev = self.last[r.rank]
        if prev is not None and prev.seq > r.seq:      # overtaken by a newer one (async actor)
            return
        self.last[r.rank] = r
        self.stats_cache[r.rank] = r.stats
        if self.switch_wanted is not None and all(x is not None and x.map_version >= self.switch_wanted
                                                  for x in self.last):
            self.map_version = self.switch_wanted
            self.switch_wanted = None
            self.switched.set()

    # ---- stream sinks ------------------------------------------------------------------------
    async def attach_sink(self, sink) -> tuple[int, list, bool]:
        """Register a sink for rebuild notices and watch it -> (generation, rank handles, is_up).
        While the unit is rebuilding the sink holds its submissions until `unit_up`."""
        key = sink._actor_id.hex()
        if key not in self.sinks:
            self.sinks[key] = sink
            self.sink_watches[key] = asyncio.get_running_loop().create_task(self._watch_sink(key, sink))
        return self.n_restarts, list(self.ranks) if self.is_up else [None] * self.shape.n_ranks, self.is_up

    @ray.method(enable_task_events=False)
    async def watch(self) -> None:
        """Never returns: a sink's pending call fails when this supervisor (and so its unit) dies."""
        await asyncio.Event().wait()

    async def _watch_sink(self, key: str, sink) -> None:
        """The sink's `watch` never returns: when it fails the sink died (its owner did); abort its
        requests on the ranks, which know which requests go to it."""
        try:
            await sink.watch.remote()
        except asyncio.CancelledError:
            raise
        except Exception:
            pass
        self.sinks.pop(key, None)
        self.sink_watches.pop(key, None)
        if self.closing:
            return
        log.info("%s unit %d: a stream sink died; aborting its requests", self.role, self.unit_id)
        for rk in self.ranks:
            rk.abort_sink.remote(key)

    async def _sink(self):
        if self.default_sink is None:
            from epserve.actors.cluster import control_options
            self.default_sink = StreamSink.options(**control_options()).remote()
        return self.default_sink

    # ---- requests: forwarded to the default sink (the supervisor relays no delta) -------------
    async def generate(self, items: list[tuple[Sequence, int]]) -> list[RequestResult]:
        """Run sequences to completion on the given ranks (StreamSink.generate), each ending at its
        first stop string (the checkpoint's tokenizer reads the text)."""
        me = ray.get_runtime_context().current_actor
        return await (await self._sink()).generate.remote(me, items, self.spec.model_dir)

    @ray.method(enable_task_events=False)
    async def prefill(self, seq: Sequence, rank: int) -> RequestResult:
        """Prefill role: run the prompt, return the first token and the KV blocks' object refs."""
        me = ray.get_runtime_context().current_actor
        return (await (await self._sink()).generate.remote(me, [(seq, rank)]))[0]

    @ray.method(enable_task_events=False)
    async def stream(self, seq: Sequence, rank: int):
        """StreamSink.stream through the default sink, for direct callers; the serving path streams
        from its own sink (serve/generation.py) and never through here."""
        me = ray.get_runtime_context().current_actor
        gen = (await self._sink()).stream.options(num_returns="streaming").remote(me, seq, rank)
        async for ref in gen:
            yield await ref

    @ray.method(enable_task_events=False)
    async def abort(self, request_id: str) -> bool:
        """Abort a request submitted through this supervisor's `generate` / `prefill` / `stream`."""
        if self.default_sink is None:
            return False
        return await self.default_sink.abort.remote(ray.get_runtime_context().current_actor, request_id)

    # ---- observation ---------------------------------------------------------------------
    async def _sink_requests(self) -> set[str]:
        got = await self._tell_sinks(lambda sk: sk.request_ids.remote(self.key))
        return set().union(*got) if got else set()

    @ray.method(enable_task_events=False)
    async def request_ids(self) -> set[str]:
        """Requests this unit is running, as its sinks track them (the router reconciles its
        in-flight table with them)."""
        return await self._sink_requests()

    @ray.method(enable_task_events=False)
    def stats(self) -> list[RankStats]:
        return list(self.stats_cache)

    @ray.method(enable_task_events=False)
    async def status(self) -> dict:
        # every rank steps together; the one that reported last has the newest counts
        head = max((x for x in self.last if x is not None), key=lambda x: x.n_steps, default=None)
        timing = [x.timing for x in self.last if x is not None]
        steps = head.n_steps if head else 0
        return {"unit": self.unit_id, "role": self.role, "steps": steps,
                "restarts": self.n_restarts, "ranks": self.rank_info, "n_ranks": len(self.ranks),
                "elastic": list(self.elastic_events),
                "in_flight": len(await self._sink_requests()), "sinks": len(self.sinks),
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
        n_slots = len(self.ranks) * self.shape.slots_per_rank     # elastic: the members' slots only
        if phy2log.shape[1] != n_slots:
            raise ValueError(f"the placement has {phy2log.shape[1]} slots; the unit runs on {len(self.ranks)} ranks "
                             f"({n_slots} slots): a rank died or joined since it was made")
        t0, generation = time.time(), self.n_restarts
        version = self.map_version + 1
        ranks = list(self.ranks)
        await asyncio.gather(*[rk.stage_placement.remote(phy2log, version) for rk in ranks])
        while True:
            if generation != self.n_restarts:       # the members changed (or rebuilt): their staging is gone
                raise RuntimeError(f"placement v{version} was not applied: the unit changed while it was staged")
            done = await asyncio.gather(*[rk.staging_done.remote() for rk in ranks])
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
