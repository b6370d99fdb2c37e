"""Dispatch and combine across the ranks of a unit: real all-to-all exchanges.

Per MoE layer on every rank (ranks with no tokens still take part):
  1. route: each (token, expert) pair picks one replica slot (placement/topology.py);
  2. dispatch: pairs sorted by destination rank; counts exchanged, then the rows
     (FP8 e4m3 + 1x128 scales when fp8_dispatch, else the model dtype), each with its
     local slot id in its last 4 bytes, in one all_to_all_single;
  3. the destination computes its slots' experts on what it received (ExpertShard);
  4. combine: results go back by the reverse all_to_all in the model dtype (BF16 in
     production, float32 in exact tests); the sender weights them and sums over K.
One row per (token, expert) pair, so rows received over all ranks = tokens x top_k.
Payloads travel as raw bytes (uint8 [rows, bytes]) so any dtype crosses gloo or NCCL.
`group` is a registered process group (None: the default one) or, in an elastic unit, a
standalone backend its survivors re-formed (actors/rank_elastic.py); `_all_to_all` calls either.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.distributed as dist

from epserve.model.moe_dispatch import ExpertMap, ExpertShard, LocalDispatcher


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """[rows, ...] -> uint8 [rows, row bytes]. Flattened first: an empty or [rows, 1] tensor may be
    "contiguous" with a last stride != 1 (FP8 scales of a rank that sends nothing), which view() refuses."""
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    return t.contiguous().reshape(-1).view(torch.uint8).view(t.shape[0], row_bytes)


def _from_bytes(data: torch.Tensor, dtype: torch.dtype, cols: int) -> torch.Tensor:
    """uint8 [rows, cols * itemsize] -> dtype [rows, cols] (empty-safe)."""
    if data.shape[0] == 0:
        return torch.empty(0, cols, dtype=dtype, device=data.device)
    return data.contiguous().view(dtype).view(data.shape[0], cols)


# the standalone backends an elastic unit forms (not registered with torch.distributed)
STANDALONE = tuple(c for c in (getattr(dist, "ProcessGroupGloo", None), getattr(dist, "ProcessGroupNCCL", None)) if c)


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group,
                async_op: bool = False):
    """dist.all_to_all_single on a registered group, or the same exchange on a standalone backend
    (its alltoall_base; empty splits: equal parts) -> the Work when async_op, else None."""
    if isinstance(group, STANDALONE):
        work = group.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions())
        if async_op:
            return work
        work.wait()
        return None
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


class AllToAllDispatcher(LocalDispatcher):
    run_static = None      # counts cross ranks on the host; a fixed-shape exchange is DeepEP's low-latency mode
    def __init__(self, kb: ModuleType, expert_map: ExpertMap, first_moe_layer: int, rank: int, world: int,
                 gpus_per_node: int, fp8_dispatch: bool = False, group=None, latency_s: float = 0.0,
                 bandwidth: float = 0.0):
        super().__init__(kb, expert_map, first_moe_layer)
        self.rank, self.world, self.node = rank, world, rank // gpus_per_node
        self.fp8_dispatch, self.group = fp8_dispatch, group
        self.latency_s, self.bandwidth = latency_s, bandwidth   # injected per exchange (bytes/s; 0 = none)
        self._link_free_at = 0.0
        n_moe = expert_map.phy2log.shape[0]
        self.pairs_sent = torch.zeros(n_moe, dtype=torch.long)
        self.pairs_received = torch.zeros(n_moe, dtype=torch.long)

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        out = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
        _all_to_all(out, send.contiguous(), recv_counts, send_counts, self.group)
        return out

    def _pack(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.fp8_dispatch:
            return _as_bytes(rows)
        q, s = self.kb.per_token_group_quant_fp8(rows)
        return torch.cat([_as_bytes(q), _as_bytes(s.float())], 1)

    def _unpack(self, data: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
        if not self.fp8_dispatch:
            return _from_bytes(data, dtype, dim)
        q = _from_bytes(data[:, :dim], torch.float8_e4m3fn, dim)
        s = _from_bytes(data[:, dim:], torch.float32, (data.shape[1] - dim) // 4)
        if getattr(self.kb, "TAKES_FP8_ROWS", False):     # the expert GEMMs take the FP8 rows as they came
            return q, s
        return (q.float() * s.repeat_interleave(128, 1)[:, :dim]).to(dtype)

    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
            shard: ExpertShard) -> torch.Tensor:
        """x [T, D], idx/weights [T, K] -> [T, D]; collective: every rank of the unit must call it."""
        return self.finish(self.compute(self.launch(layer, x, idx, weights), shard))

    # The three halves of one exchange, so a schedule can compute while another is in flight
    # (pipelines/overlap.py): launch dispatch -> compute experts + launch combine -> finish.
    def launch(self, layer: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> "Exchange":
        t, k = idx.shape
        d = x.shape[1]
        spr = self.map.slots_per_rank
        slots = self.route(layer, idx).flatten()                        # [T*K]
        dest = slots // spr
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.world)
        recv_counts = torch.empty_like(send_counts)
        _all_to_all(recv_counts, send_counts, [], [], self.group)         # small, synchronous
        sc, rc = send_counts.tolist(), recv_counts.tolist()
        rows = x[order // k]                                            # pair j is token j // k
        slot_ids = (slots % spr)[order].to(torch.int32)[:, None]
        payload = torch.cat([self._pack(rows), _as_bytes(slot_ids)], 1)      # one message per row
        ex = Exchange(layer, t, k, d, x.dtype, order, sc, rc, weights)
        ex.bufs = [payload.new_empty((sum(rc), payload.shape[1]))]
        ex.works = [_all_to_all(ex.bufs[0], payload, rc, sc, self.group, async_op=True)]
        ex.ready_at = self._ready_at(payload.numel())
        return ex

    def compute(self, ex: "Exchange", shard: ExpertShard) -> "Exchange":
        self._wait(ex)
        data, slot_ids = ex.bufs[0][:, :-4], _from_bytes(ex.bufs[0][:, -4:], torch.int32, 1)[:, 0].long()
        y = shard.compute(self.kb, self._unpack(data, ex.d, ex.dtype), slot_ids)            # [sum(rc), D]
        send = _as_bytes(y.to(ex.dtype))
        ex.bufs = [send.new_empty((sum(ex.sc), send.shape[1]))]
        ex.works = [_all_to_all(ex.bufs[0], send, ex.sc, ex.rc, self.group, async_op=True)]
        ex.ready_at = self._ready_at(send.numel())
        return ex

    def finish(self, ex: "Exchange") -> torch.Tensor:
        self._wait(ex)
        back = _from_bytes(ex.bufs[0], ex.dtype, ex.d)
        m = ex.layer - self.first
        self.pairs_sent[m] += ex.t * ex.k
        self.pairs_received[m] += sum(ex.rc)
        # pair p's row came back at position j with order[j] = p: the inverse permutation (a scatter
        # of ints) lets the combine read each token's rows where they landed, no scatter of rows
        rows = torch.empty_like(ex.order)
        rows[ex.order] = torch.arange(ex.order.numel(), device=ex.order.device)
        return self.kb.combine_rows(back, ex.weights, rows)

    def _ready_at(self, n_bytes: int) -> float:
        """When the exchange may complete under the injected cost (0: none). This rank's link sends
        one exchange at a time (exchanges in flight together share the bandwidth); the latency
        is added on top of the transfer."""
        if not (self.latency_s or self.bandwidth):
            return 0.0
        start = max(time.perf_counter(), self._link_free_at)
        self._link_free_at = start + (n_bytes / self.bandwidth if self.bandwidth else 0.0)
        return self._link_free_at + self.latency_s

    def _wait(self, ex: "Exchange") -> None:
        for w in ex.works:
            w.wait()
        if ex.ready_at:
            time.sleep(max(0.0, ex.ready_at - time.perf_counter()))


@dataclass
class Exchange:
    """One micro-batch's MoE exchange of one layer, in flight between launch and finish."""

    layer: int
    t: int
    k: int
    d: int
    dtype: torch.dtype
    order: torch.Tensor
    sc: list[int]
    rc: list[int]
    weights: torch.Tensor
    bufs: list = field(default_factory=list)
    works: list = field(default_factory=list)
    ready_at: float = 0.0
