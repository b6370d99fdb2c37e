"""RankActor: one GPU = one attention DP rank + one EP shard of a unit, driving its own steps.

A thin shell around pipelines/runner.RankEngine. It joins the unit's process group (gloo on
CPU, NCCL on CUDA, plus a gloo control group), loads only its expert slots, and then runs its
own step loop (`run_loop`), as SGLang's and DeepSeek's DP ranks do:

  inbox (requests, aborts, switch requests; filled by submit/abort/request_switch calls on the
  actor's other threads) -> one MAX of a small Vote over the control group (actors/agreement.py) -> the same Plan
  on every rank (pipelines/lockstep.py: step or park, overlap schedule, placement switch) ->
  the step -> its token deltas pushed straight to each request's stream sink (one fire-and-forget
  Delivery per sink, batched every PUSH_EVERY_S unless a delta is latency-critical) -> its stats
  and counters reported to the supervisor (a RankReport, at most every report_every(world) while it
  steps, at once on a placement switch or when its stats changed and it parks).

Each request's Sequence names its sink (actors/stream_sink.py); the rank keeps request -> sink
(actors/sink_routes.py) and never sends a delta through the supervisor. A dead sink's requests are aborted here when the
supervisor says so (`abort_sink`).

Nobody calls the rank once per step, so a step's control cost does not grow with the unit. An
idle unit parks: each rank waits on its inbox; the first request to any rank wakes its peers.

Owns the loop, its inbox, its reports and the rank's counters. Elsewhere: the KV handoff's two
ends (park and send on a prefill rank, pull on a decode rank) are actors/kv_ends.py, whose
methods the peer rank calls through the thin `join_pair` / `send_kv` / `kv_objects` entries
here; the benchmark-only driven step (`step`, `profiled_step`, `time_collective`: one call per
step, never while the loop runs) is actors/driven_step.py. Messages are in actors/rank_messages.py.
Elastic units (RankSpec.elastic): the groups are re-formable (actors/rank_groups.py) and a failed
loop hands over to actors/rank_elastic.py (`run_loop` returns {"lost": ...}; `reform`; kept
requests `resume` in `admit`). About 450 lines: the loop, plus the remote entries Ray needs on the
one actor class (inbox posts, placement staging, observation, the peers' KV-handoff calls, the
driven step, the elastic hand-overs), each a few lines; their logic lives in those modules.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time

import ray
import torch

from epserve.actors import driven_step, rank_elastic, rank_groups
from epserve.actors.agreement import max_all_reduce
from epserve.actors.driven_step import StepInput, StepOutput
from epserve.actors.inbox import Inbox
from epserve.actors.kv_ends import KvEnds
from epserve.actors.kv_transfer import PairGroups
from epserve.actors.rank_messages import RankReport, UnitLayout
from epserve.actors.rank_placement import PlacementVersions
from epserve.actors.sink_routes import SinkRoutes
from epserve.errors import EpserveError, RequestRejected
from epserve.messages import RankSpec, RankStats, TokenDelta
from epserve.model.ep_select import make_ep_dispatcher, make_one_rank_dispatcher
from epserve.model.moe_dispatch import ExpertMap
from epserve.pipelines.lockstep import LoopState, Vote, agree
from epserve.pipelines.overlap_tuner import OverlapTuner
from epserve.pipelines.rank_stats import engine_stats
from epserve.pipelines.runner import RankEngine
from epserve.pipelines.sequence import Sequence
from epserve.placement.devices import DeviceAssignmentError, local_device_index

log = logging.getLogger("epserve.rank")

PARK_POLL_S = 1.0          # a parked rank re-checks with its peers at least this often
REPORT_EVERY_S = 0.05      # stats and counters reach the supervisor at most this often while the rank steps
UNIT_REPORTS_PER_S = 400   # ... and a unit's ranks together send it at most this many a second
PUSH_EVERY_S = 0.004       # fast steps batch their deltas into one push per this much time, unless a
                           # delta is latency-critical (a first token, a finished request)


def report_every(world: int) -> float:
    """Seconds between a stepping rank's reports: 50 ms up to 20 ranks, then longer, so one
    supervisor takes at most UNIT_REPORTS_PER_S (an EP144 unit: every 0.36 s per rank, 400/s in
    all, where 50 ms would be 2,880/s). Admission does not go stale with it: the router books
    every admitted request's pages itself (serve/router.py); a report only tells it of pages freed."""
    return max(REPORT_EVERY_S, world / UNIT_REPORTS_PER_S)


@ray.remote(max_restarts=0, max_concurrency=16)
class RankActor:
    def __init__(self, spec: RankSpec, layout: UnitLayout, phy2log: torch.Tensor):
        if not torch.cuda.is_available():
            torch.set_num_threads(1)   # many ranks share few cores on a CPU test box
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        if spec.device.startswith("cuda") and torch.cuda.is_available():   # this rank's own GPU (placement/devices.py)
            index = local_device_index(self.gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES"))
            if index >= torch.cuda.device_count():
                raise DeviceAssignmentError(f"Ray assigned GPU {self.gpu_ids[0]} (cuda:{index}) but this process sees "
                                            f"{torch.cuda.device_count()} GPU(s): does the node advertise more GPUs "
                                            "than it has?")
            torch.cuda.set_device(index)
            spec = dataclasses.replace(spec, device=f"cuda:{index}")
        self.spec, self.layout, self.phy2log = spec, layout, phy2log
        self.engine: RankEngine | None = None
        self.n_steps = 0
        self.versions = PlacementVersions(layout.gpus_per_node)     # expert placement: in use, staged, asked for
        self.engine_lock = threading.RLock()         # the loop holds it while it touches the engine
        self.inbox = Inbox()                         # filled by the actor's other threads, drained by the loop
        self.stopping = False
        self.n_woken = 0                             # wakes from peers (a parked rank wakes at once, not on its poll)
        self.peers: list = []
        self.ctrl = None
        self.schedule_steps = {"plain": 0, "prefill": 0, "decode": 0}
        self.tuner = OverlapTuner()
        self.timing = {"total": 0.0, "agree": 0.0, "step": 0.0, "inbox": 0.0, "push": 0.0, "cpu_control": 0.0,
                       "steps": 0}
        self.last_stats = self.pushed_stats = RankStats(layout.unit, layout.rank)
        self.streaming: set[str] = set()
        self.routes = SinkRoutes(rank=layout.rank)       # request -> its stream sink (loop thread only)
        self.kv: KvEnds | None = None                   # the KV handoff's ends, made in setup
        self.groups = None                              # elastic: this membership's groups (actors/rank_elastic.py)
        self.abandoned: list = []                       # elastic: sends to a broken group's peers, kept alive
        self.kept: dict[str, Sequence] = {}             # elastic: requests kept through a membership change

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "rank": self.layout.rank, "gpu_ids": self.gpu_ids, "device": self.spec.device}

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 only: bind a free port on this node and publish (ip, port) to the unit."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, master: tuple[str, int] | None, timeout_s: float = 60.0) -> dict:
        """Join the unit's process groups and load this rank's weights; returns what was loaded.
        timeout_s bounds every collective: a rank whose peer died raises instead of hanging.
        master None (elastic only): a joining rank that loads first and forms its groups in `reform`."""
        lay = self.layout
        t0 = time.time()
        if master is not None:           # actors/rank_groups.py: the default group, or re-formable ones (elastic)
            form = rank_groups.form_groups if self.spec.elastic else rank_groups.init_default_groups
            self.groups = form(master, lay.rank, lay.world, self.spec.device, timeout_s)
            self.ctrl = self.groups.ctrl
        pairs = PairGroups(f"u{lay.unit}r{lay.rank}-{os.getpid()}-{id(self):x}", self.spec.device,
                           min(timeout_s, 30.0))
        self.kv = KvEnds(pairs, ray.get_runtime_context().current_actor, self.spec.kv_handoff, self.spec.device,
                         self.spec.block_tokens)

        def dispatcher(kb, args):
            em = ExpertMap(self.phy2log, args.n_routed_experts, lay.world, lay.gpus_per_node)
            if lay.world == 1:          # every slot here: no exchange (or an emulated one), the CUDA-graph decode path
                return make_one_rank_dispatcher(kb, args, em, self.spec.ep_dispatch, self.spec.ep_emulate,
                                                self.spec.device)
            mode = "all_to_all" if self.spec.elastic else self.spec.ep_dispatch   # re-formable groups only
            return make_ep_dispatcher(kb, args, em, lay.rank, lay.world, lay.gpus_per_node, lay.fp8_dispatch,
                                      self.spec.device, mode, self.spec.max_batch_size,
                                      latency_s=self.spec.latency_s, bandwidth=self.spec.bandwidth)

        self.engine = RankEngine(self.spec, dispatcher)
        d = self.engine.dispatcher
        if self.groups is not None and self.groups.data is not None:
            d.group = self.groups.data
        experts = {layer: sorted({int(e) for e in d.map.phy2log[layer - d.first, list(d.slots_for(layer))]})
                   for layer in range(self.engine.args.n_kv_layers) if self.engine.args.is_moe_layer(layer)}
        self.last_stats = self.stats_now()
        log.info("unit %d rank %d/%d ready on node %s in %.1fs (%s)", lay.unit, lay.rank, lay.world,
                 ray.get_runtime_context().get_node_id()[:8], time.time() - t0, self.engine.load_stats)
        return {**self.info(), "load": self.engine.load_stats, "experts": experts,
                "max_model_len": self.engine.max_model_len, "kv_pages": self.engine.cache.n_pages,
                "kernels": self.engine.kb.__name__.rsplit(".", 1)[-1], "cuda_graphs": self.engine.graphs is not None,
                "ep_dispatch": type(d).__name__}

    # ---- the inbox (called on the actor's other threads while the loop runs) ----------------
    def _post(self, kind: str, payload) -> None:
        if self.inbox.post(kind, payload):       # it was parked: so are its peers
            self._wake_peers()

    @ray.method(enable_task_events=False)
    def submit(self, seqs: list[Sequence]) -> None:
        self._post("add", seqs)

    @ray.method(enable_task_events=False)
    def abort(self, request_ids: list[str]) -> None:
        self._post("abort", request_ids)

    def abort_sink(self, sink_key: str) -> None:
        """Abort every request whose deltas go to this sink (it died with its ingress replica)."""
        self._post("abort_sink", sink_key)

    def request_switch(self, version: int) -> None:
        """Switch to staged placement `version` at the first step all ranks have it staged."""
        self._post("switch", version)

    def wake(self) -> None:
        self.n_woken += 1                            # lost updates only undercount; readers compare before/after
        self.inbox.wake()

    def _wake_peers(self) -> None:
        for p in self.peers:
            p.wake.remote()

    def _park(self) -> None:
        """Nothing to do on any rank: wait for this rank's inbox (or a peer's wake)."""
        if self.inbox.park(PARK_POLL_S):        # work came in after the agreement: the peers parked on it
            self._wake_peers()

    # ---- the loop ---------------------------------------------------------------------------
    def run_loop(self, supervisor, peers: list, generation: int = 0, unit_key: str = "") -> dict:
        """Drive this rank's steps until shutdown; returns its counters. Raises if a step fails
        (the supervisor rebuilds the unit); an elastic rank returns {"lost": why} instead, having
        told its peers (the supervisor re-forms the unit without a dead rank: actors/unit_elastic.py).
        Deltas go to each request's sink; reports to `supervisor`."""
        try:
            return self._loop(supervisor, peers, generation, unit_key)
        except Exception as exc:
            if not self.spec.elastic:
                raise
            return rank_elastic.leave(self, exc)

    def reform(self, master: tuple[str, int] | None, new_rank: int, world: int, phy2log: torch.Tensor,
               map_version: int = 0, timeout_s: float = 60.0) -> dict | None:
        """Elastic membership change (actors/rank_elastic.py): master None prepares (requests
        dropped, new slots loaded); then, with the new rank 0's address, forms groups and joins."""
        if master is None:
            return rank_elastic.prepare(self, new_rank, phy2log)
        return rank_elastic.reform(self, master, new_rank, world, phy2log, map_version, timeout_s)

    def _loop(self, supervisor, peers: list, generation: int, unit_key: str) -> dict:
        self.supervisor, self.peers, self.unit_key = supervisor, list(peers), unit_key
        self.generation, self.n_reports = generation, 0
        self.routes = SinkRoutes(unit_key, self.layout.rank, generation)
        every = report_every(self.layout.world)
        state = LoopState(self.spec.overlap, self.versions.version, self.tuner)
        prev_us = prev_tokens = 0
        last_push = last_report = 0.0
        dirty = False                          # stepped since the last report
        held: list[TokenDelta] = []            # deltas not pushed yet (fast steps batch them)
        self.produced = 0                      # tokens since the last report
        self.streaming.clear()                 # requests whose first token the sink already has
        while True:
            t_iter, c_iter = time.perf_counter(), time.thread_time()
            msgs = self.inbox.drain()
            self.timing["inbox"] += time.perf_counter() - t_iter
            rejected = self._apply(msgs)
            eng = self.engine
            with self.engine_lock:
                vote = Vote(int(self.stopping), int(eng.has_work), int(eng.can_prefill()), len(eng.batcher.running),
                            self.versions.ready_version(), prev_us, prev_tokens)
            t_agree, c_agree = time.perf_counter(), time.thread_time()
            plan = agree(self._all_reduce(vote), state)
            t_agree, c_agree = time.perf_counter() - t_agree, time.thread_time() - c_agree
            if plan.stop:
                break
            switched = plan.switch_to is not None
            if switched:
                rank_elastic.exit_if_testing_switch(self, generation)
                with self.engine_lock:
                    self.switch_placement(plan.switch_to)
                state.version = plan.switch_to
            if not plan.run:
                state.last, prev_us, prev_tokens = None, 0, 0
                self.last_stats = self.stats_now()
                if held or rejected:
                    self._push(held, rejected)
                    held, last_push = [], time.time()
                stale = self.last_stats != self.pushed_stats        # e.g. an abort freed pages
                if switched or stale or (dirty and (plan.park or time.time() - last_report > every)):
                    self._report()
                    last_report, dirty = time.time(), False
                if plan.park:
                    self._park()
                continue
            if self.spec.exit_before_step is not None and generation == 0:
                _test_exit_before_step(self.spec.exit_before_step, self.layout.rank, self.n_steps + 1)
            t_step, c_step = time.perf_counter(), time.thread_time()
            with self.engine_lock:
                deltas = eng.step(plan.schedule, decode_only=plan.phase != "prefill")
                self.last_stats = self.stats_now()
            t_step, c_step = time.perf_counter() - t_step, time.thread_time() - c_step
            self.n_steps += 1
            self.schedule_steps[plan.schedule or "plain"] += 1
            prev_us, prev_tokens = int(t_step * 1e6), eng.last_step_tokens
            state.last = (plan.phase, plan.schedule is not None)
            self.kv.publish(deltas)
            held += deltas
            self.produced += len(deltas)
            dirty = True
            urgent = rejected or any(d.finish_reason is not None or d.kv_blocks is not None for d in deltas) \
                or any(d.request_id not in self.streaming for d in deltas)
            now = time.time()
            if urgent or (held and now - last_push > PUSH_EVERY_S):
                self._push(held, rejected)
                self.streaming |= {d.request_id for d in held}
                self.streaming -= {d.request_id for d in held if d.finish_reason is not None}
                held, last_push = [], now
            if switched or now - last_report > every:
                self._report()
                last_report, dirty = now, False
            tm = self.timing
            tm["total"] += time.perf_counter() - t_iter
            tm["agree"] += t_agree
            tm["step"] += t_step
            tm["cpu_control"] += time.thread_time() - c_iter - c_agree - c_step   # this thread's own work
            tm["steps"] += 1
        return {"steps": self.n_steps, **self.timing}

    def _all_reduce(self, vote: Vote) -> Vote:
        """The unit's combined vote: a MAX of a few integers over the control group, by recursive
        doubling (actors/agreement.py: log2 hops in a row, where gloo's ring all-reduce has 2 (N - 1))."""
        if self.ctrl is None:
            return vote
        t = torch.tensor(vote.encode(), dtype=torch.long)
        max_all_reduce(t, self.ctrl, self.layout.rank, self.layout.world)
        return Vote.decode(t.tolist())

    def _apply(self, msgs) -> list[tuple[str, str]]:
        """Inbox messages in arrival order; -> rejected (request_id, typed error)."""
        rejected = []
        with self.engine_lock:
            if self.kept:                       # elastic: kept requests their sinks did not claim back
                rank_elastic.expire_kept(self)
            for kind, payload in msgs:
                if kind == "add":
                    rejected += self.admit(payload)
                elif kind == "abort":
                    for rid in payload:
                        self._abort_one(rid)
                elif kind == "abort_sink":      # the sink died: nobody would read these requests' tokens
                    for rid in self.routes.drop_sink(payload):
                        self._abort_one(rid)
                elif kind == "switch":
                    self.versions.ask(payload)
                elif kind == "stop":
                    self.stopping = True
        return rejected

    def _abort_one(self, rid: str) -> None:
        self.engine.abort(rid)
        self.streaming.discard(rid)
        self.routes.drop(rid)

    def admit(self, seqs: list[Sequence]) -> list[tuple[str, EpserveError]]:
        """New requests into the engine (the caller holds engine_lock), each with its handed-off
        latents where it brought some; -> rejected (request_id, the typed error)."""
        rejected = []
        for seq in seqs:
            self.routes.add(seq)               # its deltas go to its sink
            if self.kept and rank_elastic.resume(self, seq):    # elastic: still here, KV and all
                continue
            try:
                latents = self.kv.receive(seq)
                if latents is not None:
                    self.engine.add_prefilled(seq, latents)
                else:
                    self.engine.add(seq)
            except ValueError as exc:       # a bad request (the family, or a plain ValueError): tell its sink
                rejected.append((seq.request_id, exc if isinstance(exc, EpserveError) else RequestRejected(str(exc))))
        return rejected

    def switch_placement(self, version: int) -> None:
        """Switch the engine to the staged placement `version` (the caller holds engine_lock)."""
        self.versions.switch(self.engine, version, self.n_steps)

    # ---- the KV handoff's sending end, called by the decode rank (actors/kv_ends.py) ---------
    def join_pair(self, pair_id: str, host: str, port: int) -> None:
        self.kv.join(pair_id, host, port)

    def send_kv(self, pair_id: str, request_id: str) -> int:
        return self.kv.send(pair_id, request_id)

    def kv_objects(self, request_id: str) -> list | None:
        return self.kv.objects(request_id)

    def handoff_stats(self) -> dict:
        return self.kv.stats() if self.kv is not None else {}

    def _push(self, deltas: list[TokenDelta], rejected) -> None:
        """The held deltas and rejections to their sinks: one Delivery per sink (actors/sink_routes.py)."""
        t = time.perf_counter()
        self.routes.push(deltas, rejected)
        self.timing["push"] += time.perf_counter() - t

    def _report(self) -> None:
        """Stats and counters to the supervisor (admission reads them; EPLB switches wait on them)."""
        self.pushed_stats = self.last_stats
        self.supervisor.report.remote(RankReport(
            self.layout.rank, self.generation, self.n_reports, self.last_stats, self.n_steps, self.versions.version,
            dict(self.versions.switched_at), dict(self.schedule_steps), dict(self.tuner.best), dict(self.timing),
            self.produced, self.routes.n_sent))
        self.n_reports += 1
        self.produced = 0

    # ---- lifecycle, placement, observation --------------------------------------------------
    def stage_placement(self, phy2log: torch.Tensor, version: int) -> None:
        """Start loading this rank's weights for a new placement in the background."""
        self.versions.stage(self.engine, phy2log, version)

    def staging_done(self) -> dict | None:
        """None while staging runs; then what was staged (raises if staging failed)."""
        return self.versions.staged()

    def placement(self) -> dict:
        with self.engine_lock:
            return {"version": self.versions.version, "phy2log": self.engine.dispatcher.map.phy2log.clone(),
                    "switched_at": dict(self.versions.switched_at)}

    # ---- the driven step (benchmarks only; never while run_loop runs: actors/driven_step.py) --
    def step(self, inp: StepInput) -> StepOutput:
        return driven_step.run_step(self, inp)

    def profiled_step(self, inp: StepInput, trace_path: str) -> tuple[StepOutput, dict]:
        return driven_step.profiled(lambda: driven_step.run_step(self, inp), trace_path)

    def time_collective(self, n: int = 200) -> float:
        """Median ms of one agreement all-reduce (every rank calls it at once)."""
        return driven_step.time_agreement(self._all_reduce, Vote(has_work=1), n)

    def stats_now(self) -> RankStats:
        """This rank's stats as of now (the caller holds engine_lock); `stats` is the last sent."""
        return engine_stats(self.engine, self.layout.unit, self.layout.rank)

    def stats(self) -> RankStats:
        return self.last_stats

    def loop_counters(self) -> dict:
        """The loop's counters now (a report may be up to report_every old): a step is counted
        before its deltas are pushed, so a caller that has its tokens sees their steps here."""
        return {"steps": self.n_steps, "schedules": dict(self.schedule_steps), "map_version": self.versions.version,
                "woken": self.n_woken}

    def expert_counters(self, reset: bool = True) -> dict:
        """Tokens per logical expert per MoE layer [n_moe, E] and dispatch pair totals."""
        with self.engine_lock:
            d = self.engine.dispatcher
            counts = d.take_counts() if reset else d.counts.cpu().clone()
            sent = getattr(d, "pairs_sent", None)
            if sent is None:                 # one rank: every pair stays here
                sent = counts.sum(1)
                recv = sent
            else:
                recv = d.pairs_received.clone()
            return {"counts": counts, "pairs_sent": sent.clone(), "pairs_received": recv.clone()}

    def stop_loop(self) -> None:
        """Leave run_loop at the next agreement (every rank leaves at the same one)."""
        self._post("stop", None)
        self._wake_peers()

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.close()          # the KV-store writes still queued land before the process goes
        close = getattr(self.engine.dispatcher, "close", None) if self.engine is not None else None
        if close is not None:            # DeepEP's buffer is destroyed explicitly, before its group
            close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _test_exit_before_step(when: tuple[int, int], rank: int, step: int) -> None:
    """Test hook (RankSpec.exit_before_step = (rank, step), first build only): that rank's process
    exits after the unit agreed to run `step`, so its peers enter the step's exchanges without it."""
    if when == (rank, step):
        log.warning("rank %d exits before step %d (exit_before_step)", rank, step)
        os._exit(1)
