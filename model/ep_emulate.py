"""An emulated EP rank (`ep_dispatch: emulated`): one GPU doing the work one rank of an EP unit of
`ranks` GPUs does, behind the launch / compute / finish seam of model/ep_dispatch.py.

What the rank is. A one-rank unit holding every expert slot of the checkpoint (as LocalDispatcher),
so its own (token, expert) rows are computed exactly and its tokens stay checkable. Per MoE layer
and exchange of T tokens it also receives the rows an EP rank of size N receives from its N - 1
peers, which are computed (they cost what real rows cost) and discarded:
  - every rank sends T x top_k rows (peers send as many tokens as this rank: a lockstep unit's
    ranks carry similar batches), so the unit routes N x T x top_k rows;
  - per-expert loads come from placement/loads.py (`skew`, one draw per MoE layer, seeded) over
    `experts` logical experts, placed on N x S slots (S = this rank's slots) by epserve's own EPLB
    (placement/eplb.py, groups of `groups` experts, nodes of 8 GPUs);
  - this rank is the unit's busiest rank in that layer (a lockstep unit waits for its busiest
    rank), so its slot j receives R_j = N x T x top_k x load(j) / total load rows; `EPShare` also
    reports max / mean rank load. Uniform loads give R = T x top_k: EP144 at 128 requests (S = 2,
    v3-ep144-rank) receives 1,024 rows, EP32 at 16,384 tokens (S = 9, v3-ep32-rank) 131,072.
  Slot j computes max(R_j, own_j) rows: its own rows (routed by the real gate, own_j <= T) plus
  R_j - own_j synthetic ones (when R_j >= T, exactly R_j). Sizes are known on the host from T
  alone, so nothing syncs and the fixed-shape path (`run_static`) replays in a CUDA graph.
Skew: `lognormal` (lognormal(0, 1) per expert, max/mean ~9 over 256 experts; after EPLB with 32
redundant slots the busiest EP144 rank carries ~1.33x the mean, EP32 ~1.00x). No per-expert load
figures of V3 serving are published that we could cite, so the kind is a stated assumption and a
key (`equal` for balanced loads, `zipf` or `hot_expert` for harsher ones).

Exchange time. Each dispatch and combine holds for the time DeepEP V1 publishes across nodes,
deepseek-ai/DeepEP docs/legacy.md at 0297fc801788b14b338a46554faca28d419e518a ("Performance"):
  low-latency kernels, H800 + CX7 400 Gb/s RDMA, 128 tokens/batch, hidden 7168, top-8, FP8
  dispatch, BF16 combine (EP: dispatch us / GB/s, combine us / GB/s):
    8: 77/98, 114/127;  16: 118/63, 195/74;  32: 155/48, 273/53;  64: 173/43, 314/46;
    128: 192/39, 369/39;  256: 194/39, 360/40
  normal kernels, internode (4096 tokens/batch), dispatch / combine bottleneck GB/s:
    16: 43/43;  32: 58/57;  64: 51/50
The published latency is that batch's bytes over the published bandwidth (dispatch EP8:
128 x 8 rows x (7168 + 224 scale bytes) = 7.57 MB / 98 GB/s = 77 us), so the model is
t = bytes / B(N), with bytes = max(rows sent, rows received) x row bytes (FP8 row + 1x128 fp32
scales for dispatch, BF16 row for combine: the busier direction bounds the rank) and B(N) linear
in log2 N between published sizes, clamped at the ends (EP144: 39 GB/s dispatch, 39.1 combine).
Exchanges of <= 256 tokens use the low-latency figures (DeepEP's LL bound), larger ones the normal,
which send a token once per destination node (at most 4: V3's node-limited routing), so their
rows count min(4, nodes) / top_k. Worked: EP144 decode, 128 tokens, lognormal: the busiest rank
receives 1,353 rows: dispatch 256 us, combine 495 us per layer (one batch); EP32 prefill, 16,384
tokens: ~131.9K rows x 4/8: dispatch 8.4 ms, combine 16.6 ms per layer. The table has one point per
EP size and no separate fixed latency, so two micro-batches' exchanges cost what one batch's does.
How it holds: on CUDA, launch records an event on the compute stream; a side stream waits on it,
spins `torch.cuda._sleep` (one thread block, cycles from the SM clock measured once) and records
a done-event; the next half makes the compute stream wait on it. DeepEP's low-latency hook mode
holds no SM while data flies, so one spinning block takes at most what it takes; what the schedule
fails to hide shows up as exposed step time. Exchanges in flight together queue on the one side
stream (one NIC). Events and streams are captured by CUDA graphs as fork / join. On CPU the hold
is a no-op (tests check tokens, not time).
SBO (`compute_sbo`, pipelines/overlap.py's single-batch schedule): on the fixed-shape path the
slots run in up to SBO_CHUNKS chunks, and each chunk's share of the combine (its rows over all rows)
is held as soon as its GEMMs are queued, so chunk i's combine flies under chunk i + 1's GEMMs, as
SGLang overlaps DeepEP's combine with the down GEMM through its per-block signals; the receiver's
reduction runs once, after the last chunk, so the answer is compute()'s exactly. The contiguous
path (prefill, eager) runs as one chunk. Over 300 lines: one noun (the emulated rank) with its
seam's four entry points; the pure exchange model above it is 80 lines of figures and citations.
Never: exchanges data, or counts synthetic rows as expert load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from epserve.errors import ConfigError
from epserve.kernels.layouts import empty_mn_major_scales
from epserve.model.moe_dispatch import MASKED_ROWS_ALIGN, ExpertMap, ExpertShard, LocalDispatcher
from epserve.placement import eplb
from epserve.placement.loads import KINDS, synthetic_loads

LL_EP = (8, 16, 32, 64, 128, 256)
LL_DISPATCH_GBPS = (98, 63, 48, 43, 39, 39)
LL_COMBINE_GBPS = (127, 74, 53, 46, 39, 40)
NORMAL_EP = (16, 32, 64)
NORMAL_DISPATCH_GBPS = (43, 58, 51)
NORMAL_COMBINE_GBPS = (43, 57, 50)
LL_MAX_TOKENS = 256            # DeepEP: num_max_dispatch_tokens_per_rank should stay below 256
GPUS_PER_NODE = 8
NODE_LIMIT = 4                 # V3 routes a token to experts on at most 4 nodes
SBO_CHUNKS = 4                 # chunks of slots in compute_sbo (EP144 decode: 2 slots -> 2 chunks)
KEYS = {"ranks": 144, "top_k": 8, "experts": 256, "groups": 8, "skew": "lognormal", "seed": 0, "hold": True}


class EmulationError(ConfigError):
    """An `ep_emulate` value this checkpoint or EPLB cannot take (the message names it)."""


def gbps(kind: str, phase: str, n_ranks: int) -> float:
    """DeepEP's published bandwidth (GB/s) for `kind` (ll | normal) `phase` (dispatch | combine) at
    n_ranks, linear in log2(n_ranks) between published sizes, clamped outside them."""
    sizes, table = (LL_EP, LL_DISPATCH_GBPS if phase == "dispatch" else LL_COMBINE_GBPS) if kind == "ll" else \
        (NORMAL_EP, NORMAL_DISPATCH_GBPS if phase == "dispatch" else NORMAL_COMBINE_GBPS)
    return float(np.interp(math.log2(n_ranks), np.log2(sizes), table))


def exchange_us(phase: str, n_ranks: int, dim: int, tokens: int, rows_sent: int, rows_received: int,
                top_k: int = 8) -> float:
    """Microseconds one dispatch or combine of `tokens` tokens holds on an EP rank of n_ranks.
    rows_*: (token, expert) rows. Low-latency kernels send each row; normal kernels send a token once
    per destination node (NVLink forwards it inside the node), at most NODE_LIMIT nodes (V3's
    node-limited routing), so their rows scale by min(NODE_LIMIT, nodes) / top_k."""
    kind = "ll" if tokens <= LL_MAX_TOKENS else "normal"
    row_bytes = dim + dim // 128 * 4 if phase == "dispatch" else 2 * dim
    per_node = 1.0 if kind == "ll" else min(NODE_LIMIT, max(1, n_ranks // GPUS_PER_NODE)) / top_k
    return max(rows_sent, rows_received) * per_node * row_bytes / (gbps(kind, phase, n_ranks) * 1e3)


@dataclass(frozen=True)
class EPShare:
    """The busiest rank's share of the unit's routed rows per MoE layer after EPLB.

    frac [n_moe, S] float64: slot j of this rank receives frac[m, j] x N x T x top_k rows in MoE
    layer m; imbalance [n_moe]: max / mean rank load."""

    ranks: int
    top_k: int
    frac: np.ndarray
    imbalance: np.ndarray

    def rows(self, m: int, tokens: int) -> list[int]:
        """Rows each local slot receives in MoE layer m when every rank sends `tokens` tokens."""
        return [int(round(f * self.ranks * tokens * self.top_k)) for f in self.frac[m]]


def ep_share(n_moe: int, slots: int, ranks: int, top_k: int, experts: int, groups: int, skew: str,
             seed: int) -> EPShare:
    """Draw loads [n_moe, experts] of kind `skew`, place ranks x slots replicas with EPLB, and
    keep each layer's busiest rank (pure; seeded)."""
    if skew not in KINDS:
        raise EmulationError(f"ep_emulate.skew: {skew!r} is not one of {', '.join(KINDS)}")
    if ranks * slots < experts:
        raise EmulationError(f"ep_emulate: {ranks} ranks x {slots} slots per rank hold fewer than "
                             f"ep_emulate.experts={experts} experts")
    if experts % groups:
        raise EmulationError(f"ep_emulate.groups: {groups} must divide ep_emulate.experts={experts}")
    nodes = ranks // GPUS_PER_NODE if ranks % GPUS_PER_NODE == 0 else 1
    w = synthetic_loads(skew, np.random.default_rng(seed), n_moe, experts, groups)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))       # an idle layer: placed as uniform
    phy2log, _, logcnt = eplb.rebalance_experts(w, ranks * slots, groups, nodes, ranks)
    slot_load = (w.gather(1, phy2log) / logcnt.gather(1, phy2log)).numpy()    # [n_moe, N * S]
    per_rank = slot_load.reshape(n_moe, ranks, slots)
    rank_load = per_rank.sum(2)
    busiest = rank_load.argmax(1)
    total = rank_load.sum(1, keepdims=True)
    frac = per_rank[np.arange(n_moe), busiest] / total
    return EPShare(ranks, top_k, frac, rank_load.max(1) / rank_load.mean(1))


class Hold:
    """Holds exchanges on a side CUDA stream for a stated time (no-op on CPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cycles_per_us = 0.0
        if self.cuda:
            self.side = torch.cuda.Stream(device=device)
            self.cycles_per_us = _sm_cycles_per_us(device)

    def start(self, us: float):
        """-> the done-event of a hold of `us` that starts when the compute stream's queued work
        so far is done (None on CPU or for 0 us)."""
        if not self.cuda or us <= 0:
            return None
        cur = torch.cuda.current_stream()
        go = torch.cuda.Event()
        go.record(cur)
        self.side.wait_event(go)
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(max(1, int(us * self.cycles_per_us)))
            done = torch.cuda.Event()
            done.record(self.side)
        return done

    @staticmethod
    def wait(done) -> None:
        if done is not None:
            torch.cuda.current_stream().wait_event(done)


def _sm_cycles_per_us(device: torch.device, cycles: int = 20_000_000) -> float:
    """The SM clock as _sleep sees it: one timed sleep of `cycles` (once per dispatcher)."""
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles // 10)                  # warm the clock up first
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        return cycles / (a.elapsed_time(b) * 1e3)


@dataclass
class EmulatedExchange:
    """One micro-batch's exchange of one layer between launch and finish."""

    layer: int
    x: torch.Tensor
    idx: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor | None
    done: object = None           # the hold's done-event (dispatch, then combine)
    out: torch.Tensor | None = None


class EmulatedDispatcher(LocalDispatcher):
    """LocalDispatcher's answer, plus the peers' rows and the exchange time of an EP rank of N."""

    def __init__(self, kb, expert_map: ExpertMap, first_moe_layer: int, dim: int, ep_emulate: dict,
                 device: torch.device):
        super().__init__(kb, expert_map, first_moe_layer)
        unknown = sorted(set(ep_emulate) - set(KEYS))
        if unknown:
            raise EmulationError(f"ep_emulate.{unknown[0]}: unknown key (known: {', '.join(KEYS)})")
        o = {**KEYS, **ep_emulate}
        for key in ("ranks", "top_k", "experts", "groups"):
            if not isinstance(o[key], int) or o[key] < (2 if key == "ranks" else 1):
                raise EmulationError(f"ep_emulate.{key}: must be an integer >= {2 if key == 'ranks' else 1}, "
                                     f"got {o[key]!r}")
        self.opts, self.dim = o, dim
        n_moe = expert_map.phy2log.shape[0]
        self.share = ep_share(n_moe, expert_map.slots_per_rank, o["ranks"], o["top_k"], o["experts"], o["groups"],
                              o["skew"], o["seed"])
        self.hold = Hold(device)
        self.hold_scale = 1.0 if o["hold"] else 0.0     # 0: the same work with no exchange time (bench baseline)
        # rows computed per slot per MoE layer, real + peers' (on the device; a CUDA graph's warm-up adds too)
        self.received = torch.zeros(n_moe, expert_map.slots_per_rank, dtype=torch.long)
        self.held_us = [0.0, 0.0]                       # (dispatch, combine) us queued since the last reset
        self._frac: dict = {}                           # device -> share.frac there
        self._rows_cache: dict = {}                     # (layer, tokens, device) -> _rows_dev's tensor
        self._slot_views: dict = {}                     # (id(experts), first, end) -> ExpertWeights view

    def rows_for(self, layer: int, tokens: int) -> list[int]:
        """R_j: rows slot j receives in `layer` for an exchange of `tokens` tokens per rank."""
        return self.share.rows(layer - self.first, tokens)

    def _start_hold(self, phase: str, layer: int, tokens: int, part: float = 1.0):
        """part: the share of the exchange's rows this hold carries (an SBO chunk's)."""
        recv = sum(self.rows_for(layer, tokens))
        us = exchange_us(phase, self.share.ranks, self.dim, tokens, tokens * self.share.top_k, recv,
                         self.share.top_k) * self.hold_scale * part
        self.held_us[phase == "combine"] += us
        return self.hold.start(us)

    # ---- the split interface (pipelines/overlap.py) -------------------------------------
    def launch(self, layer, x, idx, weights, valid: torch.Tensor | None = None) -> EmulatedExchange:
        ex = EmulatedExchange(layer, x, idx, weights, valid)
        ex.done = self._start_hold("dispatch", layer, x.shape[0])
        return ex

    def compute(self, ex: EmulatedExchange, shard: ExpertShard) -> EmulatedExchange:
        Hold.wait(ex.done)                                           # the peers' rows have landed
        if ex.valid is None:
            ex.out = self._contiguous(ex.layer, ex.x, ex.idx, ex.weights, shard)
        else:
            ex.out = self._masked(ex.layer, ex.x, ex.idx, ex.weights, shard, ex.valid)
        ex.done = self._start_hold("combine", ex.layer, ex.x.shape[0])
        return ex

    def compute_sbo(self, ex: EmulatedExchange, shard: ExpertShard) -> EmulatedExchange:
        """compute() with each chunk's combine launched after its GEMMs (module docstring, SBO);
        ex.done is the last chunk's hold (the holds queue on one side stream)."""
        if ex.valid is None:
            return self.compute(ex, shard)
        Hold.wait(ex.done)
        ex.out = self._masked(ex.layer, ex.x, ex.idx, ex.weights, shard, ex.valid, sbo=ex)
        return ex

    def finish(self, ex: EmulatedExchange) -> torch.Tensor:
        Hold.wait(ex.done)
        return ex.out

    def run(self, layer, x, idx, weights, shard: ExpertShard) -> torch.Tensor:
        return self.finish(self.compute(self.launch(layer, x, idx, weights), shard))

    def run_static(self, layer, x, idx, weights, shard: ExpertShard, valid: torch.Tensor) -> torch.Tensor:
        """A decode step's fixed-shape exchange (CUDA-graph safe); padding rows route nowhere."""
        return self.finish(self.compute(self.launch(layer, x, idx, weights, valid), shard))

    # ---- the experts on own + peers' rows -------------------------------------------------
    def _rows_dev(self, layer: int, tokens: int, dev: torch.device, keep: bool = False) -> torch.Tensor:
        """rows_for() computed on the device (int64 [S]) in the same float64 order, so no host data
        is copied inside a step (a copy would sync, and a graph capture refuses it). keep: the fixed-shape
        decode path's (a few bucket sizes) are kept; prefill's many token counts are not."""
        key = (layer, tokens, dev)
        if key in self._rows_cache:
            return self._rows_cache[key]
        if self._frac.get(dev) is None:
            self._frac[dev] = torch.from_numpy(self.share.frac).to(dev)
        s = self.share
        rows = torch.round(self._frac[dev][layer - self.first] * s.ranks * tokens * s.top_k).long()
        # kept once computed eagerly (a graph's warm-up does), so a replay has no kernels for it; never
        # while capturing: a capture records kernels without running them, the tensor would hold nothing
        if keep and (dev.type != "cuda" or not torch.cuda.is_current_stream_capturing()):
            self._rows_cache[key] = rows
        return rows

    def _fp8_rows(self, x: torch.Tensor, shard: ExpertShard) -> bool:
        """Rows land as FP8 where the experts quantise their input to 1x128 FP8 anyway (the same values);
        else an FP8 round trip would change the rank's own rows, which must stay the local answer."""
        ex = shard.experts
        return getattr(self.kb, "TAKES_FP8_ROWS", False) and x.is_cuda and ex.is_fp8 and ex.act_quant

    def _count(self, layer: int, per_slot: torch.Tensor) -> None:
        if self.received.device != per_slot.device:
            self.received = self.received.to(per_slot.device)
        self.received[layer - self.first] += per_slot.long()

    def _contiguous(self, layer, x, idx, weights, shard) -> torch.Tensor:
        """Own T x K rows, then each slot's peer rows (copies of token 0: the values do not matter,
        their outputs are dropped); the first own_j of slot j's R_j candidates are dropped (-1) so
        slot j computes max(R_j, own_j) rows with no host sync. -> [T, D] as LocalDispatcher.run."""
        t, k = idx.shape
        dev = x.device
        local = (self.route(layer, idx) - self.rank * self.map.slots_per_rank).flatten()     # [T*K]
        n_peer = sum(self.rows_for(layer, t))
        rows = self._rows_dev(layer, t, dev)
        end = rows.cumsum(0)
        i = torch.arange(n_peer, device=dev)
        peer_slot = torch.searchsorted(end, i, right=True)                   # candidate i's slot
        own = torch.zeros_like(rows).scatter_add_(0, local, torch.ones_like(local))   # (bincount syncs on CUDA)
        keep = i - (end - rows)[peer_slot] >= own[peer_slot]
        peer_slot = torch.where(keep, peer_slot, -1)
        self._count(layer, torch.maximum(own, rows))
        src = torch.cat([torch.arange(t * k, device=dev) // k, torch.zeros(n_peer, dtype=torch.long, device=dev)])
        if self._fp8_rows(x, shard):
            # DeepEP quantises on the sender (its T tokens, once) and the rows land as FP8 + scales, so
            # the rank gathers FP8 rows: not bf16 rows it would then quantise again, row by received row
            q, s = self.kb.per_token_group_quant_fp8(x)
            rows_in = (q.view(torch.uint8)[src].view(q.dtype), s[src])
        else:
            rows_in = x[src]
        y = shard.compute(self.kb, rows_in, torch.cat([local, peer_slot]))
        return self.kb.combine_rows(y[:t * k], weights)

    def _masked(self, layer, x, idx, weights, shard, valid, sbo: EmulatedExchange | None = None) -> torch.Tensor:
        """LocalDispatcher.run_static with each slot's row count raised to R_j (rows past a slot's
        own ones read token 0 and are computed, never read back). -> [T, D]. sbo: run the slots in
        chunks, starting each chunk's combine hold into sbo.done after its GEMMs."""
        t, k = idx.shape
        d = x.shape[1]
        if t == 0:        # an empty micro-batch: peers send as many tokens as this rank, so no rows land
            return x.new_zeros(0, d)
        rows_j = self.rows_for(layer, t)
        per_group = -(-max(t, *rows_j) // MASKED_ROWS_ALIGN) * MASKED_ROWS_ALIGN
        if self.received.device != x.device:
            self.received = self.received.to(x.device)
        src, pair_row, masked_m = self.masked_rows(layer, idx, valid, shard.n_slots, per_group,
                                                   self._rows_dev(layer, t, x.device, keep=True),
                                                   self.received[layer - self.first])
        if not self._fp8_rows(x, shard):
            buf = x[src].view(shard.n_slots, per_group, d)
        else:   # the rows land as FP8 + scales in the experts' layout: one kernel where the backend has it
            buf = getattr(self.kb, "quant_rows_fp8", lambda *_: None)(x, src, shard.n_slots)
            if buf is None:     # the same codes: quantised once on the sender, then gathered (as _contiguous)
                q, sc = self.kb.per_token_group_quant_fp8(x)
                buf_s = empty_mn_major_scales((shard.n_slots, per_group, sc.shape[-1]), x.device)
                buf_s.copy_(sc[src].view(shard.n_slots, per_group, -1))
                buf = (q.view(torch.uint8)[src].view(q.dtype).view(shard.n_slots, per_group, d), buf_s)
        expected = max(1, sum(rows_j) // max(1, shard.n_slots))
        if sbo is None:
            y = self.kb.expert_ffn_masked(buf, shard.experts, masked_m, expected)
        else:
            parts, n = [], shard.n_slots
            bounds = [n * c // min(n, SBO_CHUNKS) for c in range(min(n, SBO_CHUNKS) + 1)]
            for lo, hi in zip(bounds, bounds[1:]):
                part = tuple(b[lo:hi] for b in buf) if isinstance(buf, tuple) else buf[lo:hi]
                parts.append(self.kb.expert_ffn_masked(part, self._slots(shard.experts, lo, hi),
                                                       masked_m[lo:hi], expected))
                sbo.done = self._start_hold("combine", layer, t, sum(rows_j[lo:hi]) / max(1, sum(rows_j)))
            y = torch.cat(parts)
        return self.kb.combine_rows(y.view(-1, d), weights, pair_row)

    def _slots(self, ex, lo: int, hi: int):
        """Slots [lo, hi) of ExpertWeights ex as one (views: live EPLB's in-place copies show)."""
        key = (id(ex), lo, hi)
        if key not in self._slot_views:
            cut = lambda w: None if w is None else w[lo:hi]       # noqa: E731
            self._slot_views[key] = type(ex)(ex.w13[lo:hi], ex.w2[lo:hi], cut(ex.s13), cut(ex.s2), ex.act_quant)
        return self._slot_views[key]

    def take_held_us(self) -> tuple[float, float]:
        """(dispatch, combine) microseconds of holds queued since the last call; resets."""
        out, self.held_us = tuple(self.held_us), [0.0, 0.0]
        return out
