"""RankActor: one GPU = one attention DP rank + one EP shard of a unit.

A thin shell around pipelines/runner.RankEngine: it joins the unit's process group
(gloo on CPU, NCCL on CUDA), loads only its expert slots, and runs one step per
call from the unit supervisor. Every rank of a unit is called for every step
(lockstep), with the step's new requests and aborts in the call itself.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import ray
import torch

from epserve.messages import RankStats
from epserve.model.ep_dispatch import AllToAllDispatcher
from epserve.model.moe_dispatch import ExpertMap
from epserve.pipelines.expert_migration import stage, switch
from epserve.pipelines.kv_handoff import join_blocks
from epserve.pipelines.runner import RankEngine, RankSpec, TokenDelta
from epserve.placement.prefill_balancer import attn_work
from epserve.pipelines.sequence import Sequence

log = logging.getLogger("epserve.rank")


@dataclass
class StepInput:
    """What the supervisor tells a rank before a step: the agreement of the lockstep."""

    new: list[Sequence] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    switch_map: int | None = None      # switch to staged placement version N before this step
    schedule: str | None = None        # overlap schedule of this step, the same on every rank


@dataclass
class StepOutput:
    deltas: list[TokenDelta]
    stats: RankStats
    has_work: bool
    rejected: list[tuple[str, str]] = field(default_factory=list)   # (request_id, reason)
    map_version: int = 0
    n_tokens: int = 0               # tokens this rank computed in the step
    prefill_next: bool = False      # its next step would prefill (the unit's overlap schedule)


@dataclass(frozen=True)
class UnitLayout:
    unit: int
    rank: int
    world: int
    gpus_per_node: int
    fp8_dispatch: bool = False


@ray.remote(max_restarts=0, max_concurrency=1)
class RankActor:
    def __init__(self, spec: RankSpec, layout: UnitLayout, phy2log: torch.Tensor):
        if not torch.cuda.is_available():
            torch.set_num_threads(1)   # many ranks share few cores on a CPU test box
        self.spec, self.layout, self.phy2log = spec, layout, phy2log
        self.engine: RankEngine | None = None
        self.map_version, self.n_steps, self.switched_at = 0, 0, {}
        self.staging: concurrent.futures.Future | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stage")

    def info(self) -> dict:
        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "rank": self.layout.rank}

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0 only: bind a free port on this node and publish (ip, port) to the unit."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(self, master: tuple[str, int], timeout_s: float = 60.0) -> dict:
        """Join the unit's process group and load this rank's weights; returns what was loaded."""
        lay = self.layout
        use_cuda = torch.cuda.is_available() and self.spec.device.startswith("cuda")
        if master[0].startswith("127."):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        t0 = time.time()
        torch.distributed.init_process_group(
            "nccl" if use_cuda else "gloo", init_method=f"tcp://{master[0]}:{master[1]}",
            rank=lay.rank, world_size=lay.world, timeout=timedelta(seconds=timeout_s))

        def dispatcher(kb, args):
            em = ExpertMap(self.phy2log, args.n_routed_experts, lay.world, lay.gpus_per_node)
            return AllToAllDispatcher(kb, em, args.n_dense_layers, lay.rank, lay.world, lay.gpus_per_node,
                                      lay.fp8_dispatch, latency_s=self.spec.latency_s,
                                      bandwidth=self.spec.bandwidth)

        self.engine = RankEngine(self.spec, dispatcher)
        d = self.engine.dispatcher
        experts = {layer: sorted({int(e) for e in d.map.phy2log[layer - d.first, list(d.slots_for(layer))]})
                   for layer in range(self.engine.args.n_layers) if self.engine.args.is_moe_layer(layer)}
        log.info("unit %d rank %d/%d ready on node %s in %.1fs (%s)", lay.unit, lay.rank, lay.world,
                 ray.get_runtime_context().get_node_id()[:8], time.time() - t0, self.engine.load_stats)
        return {**self.info(), "load": self.engine.load_stats, "experts": experts,
                "max_model_len": self.engine.max_model_len, "kv_pages": self.engine.cache.n_pages}

    def stage_placement(self, phy2log: torch.Tensor, version: int) -> None:
        """Start loading this rank's weights for a new placement in the background."""
        self.staging = self.pool.submit(stage, self.engine, phy2log)
        self.staging.version = version

    def staging_done(self) -> dict | None:
        """None while staging runs; then what was staged (raises if staging failed)."""
        if self.staging is None or not self.staging.done():
            return None
        st = self.staging.result()
        return {"version": self.staging.version, "loaded": st.n_loaded, "reused": st.n_reused}

    def placement(self) -> dict:
        return {"version": self.map_version, "phy2log": self.engine.dispatcher.map.phy2log.clone(),
                "switched_at": dict(self.switched_at)}

    def step(self, inp: StepInput) -> StepOutput:
        eng = self.engine
        rejected = []
        if inp.switch_map is not None:
            switch(eng, self.staging.result(), self.layout.gpus_per_node)
            self.map_version, self.staging = inp.switch_map, None
            self.switched_at[self.map_version] = self.n_steps
        self.n_steps += 1
        for rid in inp.aborts:
            eng.abort(rid)
        for seq in inp.new:
            try:
                latents = self._receive_kv(seq)
                if latents is not None:
                    eng.add_prefilled(seq, latents)
                else:
                    eng.add(seq)
            except ValueError as exc:       # InvalidRequest / RequestTooLarge: tell the caller, keep going
                rejected.append((seq.request_id, str(exc)))
        deltas = eng.step(inp.schedule)
        for d in deltas:                    # prefill role: publish the handed-off blocks, rank to rank
            if d.kv_blocks is not None:
                d.kv_blocks = [ray.put(b) for b in d.kv_blocks]
        return StepOutput(deltas, self.stats(), eng.has_work, rejected, self.map_version, eng.last_step_tokens,
                          eng.can_prefill())

    def profiled_step(self, inp: StepInput, trace_path: str) -> tuple[StepOutput, dict]:
        """One step under the PyTorch profiler; writes a Chrome trace (chrome://tracing, Perfetto)
        and returns the step's output with the milliseconds spent in each schedule stage
        (host time; on CUDA the launches are asynchronous, so the GPU time is given too)."""
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts) as prof:
            out = self.step(inp)
        prof.export_chrome_trace(trace_path)
        stages: dict[str, float] = {}          # host ms per stage; on CUDA also "<stage> gpu": kernel ms
        for ev in prof.key_averages():
            if "[" in ev.key and ev.key.split("[")[0].isupper():       # schedule ops: "MLP[0]@3"
                name = ev.key.split("[")[0]
                stages[name] = stages.get(name, 0.0) + ev.cpu_time_total / 1e3
                if torch.cuda.is_available():
                    stages[f"{name} gpu"] = stages.get(f"{name} gpu", 0.0) + ev.device_time_total / 1e3
        return out, stages

    @staticmethod
    def _receive_kv(seq: Sequence):
        """Fetch handed-off blocks straight from the prefill rank's object store; None -> recompute."""
        refs, seq.kv_blocks = seq.kv_blocks, None
        if not refs:
            return None
        try:
            return join_blocks(ray.get(refs, timeout=60))
        except Exception as exc:           # the prefill rank died or the objects were lost
            log.warning("KV handoff for %s lost (%r); recomputing its prompt here", seq.request_id, exc)
            seq.reset_for_recompute()
            return None

    def stats(self) -> RankStats:
        b, cache = self.engine.batcher, self.engine.cache
        pending = list(b.waiting) + [s for s, _ in self.engine.loading]
        return RankStats(
            unit=self.layout.unit, rank=self.layout.rank, n_running=len(b.running), n_waiting=len(pending),
            pending_prefill_tokens=sum(s.n_tokens - s.n_computed for s in pending),
            pending_attn_work=float(sum(attn_work(s.n_tokens - s.n_computed, s.n_computed) for s in pending)),
            kv_blocks_used=cache.n_used, kv_blocks_total=cache.n_pages)

    def expert_counters(self, reset: bool = True) -> dict:
        """Tokens per logical expert per MoE layer [n_moe, E] and dispatch pair totals."""
        d = self.engine.dispatcher
        counts = d.take_counts() if reset else d.counts.cpu().clone()
        return {"counts": counts, "pairs_sent": d.pairs_sent.clone(), "pairs_received": d.pairs_received.clone()}

    def shutdown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
