"""CUDA graphs of the decode step: one per batch-size bucket, captured on first use, replayed.

A decode step of V3 launches about 190 kernels per layer; eagerly the host cannot issue them as
fast as the GPU runs them (measured: 8.2 ms of host time for 0.83 ms of GPU work on the tiny
model). A graph replays the whole step with one launch. What makes the step capturable:
model/deepseek_v3.py's DecodeBatch (fixed shapes, built on the device from token, position and
block-table row), the dispatcher's masked expert path (counts on the device), the kernels'
per-step attention plan built inside the graph, and no .item()/.tolist() anywhere in between.
The sampler runs after the replay, on the device, with the step's one host transfer.

A unit's overlap schedule (pipelines/overlap.py) is captured the same way, as a graph of its own per
bucket: the step's DecodeBatch split into two halves of rows, both micro-batches' stages and their
exchanges' events in one replay.

Per step the host copies 3 x bucket int64 (token, position, row) into the graph's static input;
rows past the live ones pad the bucket (scratch row and page, valid False).
Never: captures with the reference backend (it syncs), or a dispatcher without a static path.
"""
from __future__ import annotations

import logging

import torch

from epserve.model.deepseek_v3 import DecodeBatch
from epserve.pipelines.overlap import forward_overlapped

log = logging.getLogger("epserve.cuda_graphs")

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model, kv_cache: torch.Tensor, table, page_size: int, max_batch: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.model, self.kv, self.table, self.page_size = model, kv_cache, table, page_size
        self.buckets = tuple(b for b in buckets if b < max_batch) + (max_batch,)
        dev = kv_cache.device
        self.static = torch.zeros(3, max_batch, dtype=torch.long, device=dev)
        self.host = torch.zeros(3, max_batch, dtype=torch.long, pin_memory=True)
        self.graphs: dict[tuple[int, str | None], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.n_replays = 0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _forward(self, b: int, schedule: str | None = None) -> torch.Tensor:
        s = self.static
        batch = DecodeBatch.from_rows(s[0, :b], s[1, :b], s[2, :b], self.table.tables, self.page_size,
                                      self.table.scratch_row, self.model.kb.plan_mla_decode())
        if schedule is not None:
            return forward_overlapped(self.model, batch, self.kv, schedule, static=True)
        return self.model.forward(batch, self.kv)

    def run(self, ids: list[int], positions: list[int], rows: list[int], schedule: str | None = None) -> torch.Tensor:
        """One decode step for len(ids) sequences -> logits fp32 [n, vocab] (a view of the graph's output).
        schedule: the step as that overlap schedule's micro-batches (a graph per bucket and schedule)."""
        n = len(ids)
        b = self.bucket(n)
        h = self.host
        h[0, :n], h[1, :n], h[2, :n] = torch.tensor(ids), torch.tensor(positions), torch.tensor(rows)
        h[0, n:b], h[1, n:b], h[2, n:b] = 0, 0, self.table.scratch_row
        self.static[:, :b].copy_(h[:, :b], non_blocking=True)
        if (b, schedule) not in self.graphs:
            self.graphs[b, schedule] = self._capture(b, schedule)
        graph, out = self.graphs[b, schedule]
        graph.replay()
        self.n_replays += 1
        return out[:n]

    def _capture(self, b: int, schedule: str | None = None):
        """Warm up on a side stream (JIT compiles, cached tables, autotuning happen here, outside the
        graph), then capture. The warm-up runs the real step's inputs, so its cache writes are the
        ones the replay makes again; the expert counters it bumps are restored."""
        counts = self.model.dispatcher.counts
        saved = counts.clone()
        side = torch.cuda.Stream(device=self.kv.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self._forward(b, schedule)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(b, schedule)
        self.pool = graph.pool()
        self.model.dispatcher.counts.copy_(saved)
        log.info("captured the decode step for batch bucket %d, schedule %s (%d graphs)", b, schedule or "one batch",
                 len(self.graphs) + 1)
        return graph, out

    def clear(self) -> None:
        """Forget every graph (the expert placement changed: its routing tables are new tensors)."""
        self.graphs.clear()
        self.pool = None


class VerifyGraphs:
    """MTP verify-and-draft steps of greedy batches as graphs: B x S positions (S = 1 + k) per bucket.

    What is captured is pipelines/mtp_decode.py's `verify_device` (target forward with S causal
    queries per sequence, argmax, acceptance, the MTP module, the chained drafts): the same function
    the eager path runs, so CPU tests cover what a GPU replays. Per step the host copies 5 x B*S int64
    (tokens, positions, valid, then rows and draft counts in the first B columns) into the graph's
    static input. The bytes the step may overwrite (its draft slots) are saved before the replay,
    outside the graph, so a bucket's first use (warm-up and capture run the step three times) saves
    the bytes from before the step, not the warm-up's.
    """

    def __init__(self, drafter, kv_cache: torch.Tensor, max_batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS):
        self.drafter, self.kv = drafter, kv_cache
        self.s_q = drafter.k + 1
        self.buckets = tuple(b for b in buckets if b < max_batch) + (max_batch,)
        dev = kv_cache.device
        n = max_batch * self.s_q
        self.static = torch.zeros(5, n, dtype=torch.long, device=dev)
        self.host = torch.zeros(5, n, dtype=torch.long, pin_memory=kv_cache.is_cuda)
        self.graphs: dict[tuple[int, str | None], tuple] = {}
        self.pool = None
        self.n_replays = 0

    def bucket(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n), None)

    def _inputs(self, b: int):
        s, n = self.static, b * self.s_q
        return s[0, :n], s[1, :n], s[2, :n], s[3, :b], s[4, :b]

    def stage(self, ids, pos, valid, rows, nd):
        """Copy one step's host lists into the static input (padding rows: scratch row, no drafts);
        -> (the bucket's input views, saved bytes of the draft slots [layers, B*k, L+R], the slots)."""
        n, s_q = len(rows), self.s_q
        b = self.bucket(n)
        h = self.host
        h[0, :n * s_q], h[1, :n * s_q], h[2, :n * s_q] = torch.tensor(ids), torch.tensor(pos), torch.tensor(valid)
        h[0, n * s_q:b * s_q], h[2, n * s_q:b * s_q] = 0, 0
        h[1, n * s_q:b * s_q] = torch.arange(s_q).repeat(b - n)
        h[3, :n], h[4, :n] = torch.tensor(rows), torch.tensor(nd)
        h[3, n:b], h[4, n:b] = self.drafter.e.table.scratch_row, 0
        self.static[:, :b * s_q].copy_(h[:, :b * s_q], non_blocking=True)
        inp = self._inputs(b)
        slots = self.drafter.verify_batch(*inp[:4]).slot_mapping.view(b, s_q)[:n, 1:].flatten()
        return inp, self.kv.flatten(1, 2).index_select(1, slots), slots

    def run(self, n: int, inp, schedule: str | None = None) -> tuple[torch.Tensor, ...]:
        """-> (logits [n*S, V], tokens [n, S], accepted [n], drafts [n, k]): views of the graph's outputs.
        schedule: the target forward on that overlap schedule (a graph per bucket and schedule)."""
        b = self.bucket(n)
        if (b, schedule) not in self.graphs:
            self.graphs[b, schedule] = self._capture(b, inp, schedule)
        graph, out = self.graphs[b, schedule]
        graph.replay()
        self.n_replays += 1
        logits, tokens, n_acc, drafts = out
        return logits[:n * self.s_q], tokens[:n], n_acc[:n], drafts[:n]

    def _capture(self, b: int, inp, schedule: str | None = None):
        d = self.drafter
        counts = d.e.model.dispatcher.counts
        saved = counts.clone()
        side = torch.cuda.Stream(device=self.kv.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                d.verify_device(*inp, schedule=schedule)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            logits, tokens, n_acc, drafts, _ = d.verify_device(*inp, schedule=schedule)
        self.pool = graph.pool()
        counts.copy_(saved)
        log.info("captured the MTP verify step for batch bucket %d x %d positions, schedule %s", b, self.s_q,
                 schedule or "one batch")
        return graph, (logits, tokens, n_acc, drafts)

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None
