"""Dispatch and combine through DeepEP (deep_ep.Buffer, V1 API as of DeepEP 567632d): the native
backend's exchange across a unit's GPUs.

Two kinds of step, chosen for the whole unit by the agreed plan (pipelines/lockstep.py), since
every rank must issue the same kernels:
  normal       (any rank prefills) get_dispatch_layout + dispatch of FP8 rows with 1x128 scales
               to each (token, destination rank) once; this rank's experts run on the pairs in the
               contiguous layout, are weighted and summed per row (kernels/layouts.py), and go back
               through the BF16 combine (an unweighted sum). Its counts reach the host inside
               dispatch (one sync), as in DeepEP.
  low latency  (a pure decode step) low_latency_dispatch (FP8 inside DeepEP) straight into the
               masked layout [E_local, R * N_max, D] with the counts on the device, the masked
               grouped GEMM, low_latency_combine (weights applied by DeepEP): fixed shapes and no
               host sync, so a decode step replays it inside a CUDA graph (`run_static`).
The split halves (launch / compute / finish) are what the overlapped schedules call
(pipelines/overlap.py): low latency passes return_recv_hook=True, so the sends are issued and the
receive waits in the hook, called only when the other micro-batch's compute has been queued: the
exchange is in flight with no SM held. DeepEP's normal kernels have no hook; they run with
async_finish on DeepEP's communication stream and the compute stream waits on their event.
Slots are DeepEP's experts: global slot s lives on rank s // slots_per_rank, as DeepEP places
expert e on rank e // num_local_experts, so redundant experts need nothing extra.
Importing this module never fails; `unsupported_reason` says why DeepEP cannot run here.
Never: picks itself (actors/rank.py does, after `self_test` against the all-to-all path).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from epserve.kernels.layouts import ll_max_tokens, masked_topk, normal_recv_pairs, reduce_pairs
from epserve.model.moe_dispatch import ExpertMap, ExpertShard, LocalDispatcher

try:
    import deep_ep
    IMPORT_ERROR = None
except Exception as exc:  # not built here, or its extension failed to load
    deep_ep = None
    IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

LL_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)   # hidden sizes DeepEP's LL kernels are built for
LL_MAX_TOPK = 11
INTRANODE_RANKS = (2, 4, 8)


def unsupported_reason(hidden: int, world: int, gpus_per_node: int, topk: int, device: str) -> str | None:
    """Why DeepEP's normal kernels cannot carry this unit (None: they can)."""
    if deep_ep is None:
        return f"deep_ep not importable ({IMPORT_ERROR})"
    if not device.startswith("cuda"):
        return "needs CUDA"
    if world < 2:
        return "a one-rank unit exchanges nothing"
    if world <= gpus_per_node and world not in INTRANODE_RANKS:
        return f"intranode DeepEP takes 2, 4 or 8 ranks, this unit has {world}"
    if hidden % 128:
        return f"FP8 dispatch needs hidden % 128 == 0, hidden is {hidden}"
    return None


def low_latency_reason(hidden: int, topk: int, max_batch: int) -> str | None:
    """Why the low-latency kernels cannot (None: they can) carry this unit's decode steps."""
    if hidden not in LL_HIDDEN:
        return f"low-latency kernels take hidden in {LL_HIDDEN}, hidden is {hidden}"
    if topk > LL_MAX_TOPK:
        return f"low-latency kernels take top-k <= {LL_MAX_TOPK}, top-k is {topk}"
    n = ll_max_tokens(max_batch)
    if (n + 1) * 2 > 1024:      # NVSHMEM_QP_DEPTH default 1024 (asserted in Buffer.low_latency_dispatch)
        return f"max_batch_size {max_batch} -> {n} tokens per rank exceeds the default QP depth (<= 511)"
    return None


def buffer_bytes(hidden: int, world: int, n_slots: int, ll_tokens: int | None) -> tuple[int, int]:
    """(num_nvl_bytes, num_rdma_bytes) for one Buffer serving both kinds (DeepEP's own size hints)."""
    hidden_bytes = hidden * 2                     # BF16 combine rows are the larger of the two
    nvl = rdma = 0
    for cfg in (deep_ep.Buffer.get_dispatch_config(world), deep_ep.Buffer.get_combine_config(world)):
        nvl = max(nvl, cfg.get_nvl_buffer_size_hint(hidden_bytes, world))
        rdma = max(rdma, cfg.get_rdma_buffer_size_hint(hidden_bytes, world))
    if ll_tokens:
        rdma = max(rdma, deep_ep.Buffer.get_low_latency_rdma_size_hint(ll_tokens, hidden, world, n_slots))
    return nvl, rdma


@dataclass
class DeepEPExchange:
    """One micro-batch's exchange of one layer between launch and finish."""

    low_latency: bool
    dtype: torch.dtype
    topk: torch.Tensor
    weights: torch.Tensor
    recv: object = None           # normal: (q, s) rows; LL: (q, s) [E_local, R*N_max, D]
    count: torch.Tensor | None = None
    recv_idx: torch.Tensor | None = None
    recv_w: torch.Tensor | None = None
    handle: object = None
    event: object = None
    hook: object = None
    out: torch.Tensor | None = None


class DeepEPDispatcher(LocalDispatcher):
    """model/ep_dispatch.py's interface over one deep_ep.Buffer per rank process."""

    needs_agreed_phase = True      # the unit's plan says which kernels a step uses (runner.step)

    def __init__(self, kb, expert_map: ExpertMap, first_moe_layer: int, rank: int, world: int,
                 gpus_per_node: int, group, hidden: int, max_batch: int, low_latency: bool):
        super().__init__(kb, expert_map, first_moe_layer)
        self.rank, self.world, self.node = rank, world, rank // gpus_per_node
        self.n_slots = expert_map.slots_per_rank * world
        self.ll_tokens = ll_max_tokens(max_batch) if low_latency else 0
        nvl, rdma = buffer_bytes(hidden, world, self.n_slots, self.ll_tokens)
        self.buffer = deep_ep.Buffer(group, nvl, rdma, low_latency_mode=low_latency,
                                     num_qps_per_rank=max(1, expert_map.slots_per_rank) if low_latency else 1,
                                     explicitly_destroy=True)
        self.hidden, self.low_latency_ok = hidden, low_latency
        self.ll_step = False          # set per step by step_mode (the unit's agreed kind)
        self.ll_dirty = True          # LL buffers must be zeroed after normal kernels ran
        if not low_latency:
            self.run_static = None    # no fixed-shape exchange: decode steps stay eager

    @contextlib.contextmanager
    def step_mode(self, low_latency: bool):
        """The kernels of one step, the same on every rank (nesting refused)."""
        assert not getattr(self, "_in_step", False), "step_mode does not nest"
        self._in_step, self.ll_step = True, low_latency and self.low_latency_ok
        if self.ll_step and self.ll_dirty:
            self.buffer.clean_low_latency_buffer(self.ll_tokens, self.hidden, self.n_slots)
            self.ll_dirty = False
        try:
            yield
        finally:
            self._in_step = False
            if not self.ll_step:
                self.ll_dirty = True
            self.ll_step = False

    # ---- whole exchanges -------------------------------------------------------------------
    def run(self, layer, x, idx, weights, shard: ExpertShard) -> torch.Tensor:
        return self.finish(self.compute(self.launch(layer, x, idx, weights), shard))

    def run_static(self, layer, x, idx, weights, shard: ExpertShard, valid: torch.Tensor) -> torch.Tensor:
        """A decode step's fixed-shape exchange (CUDA-graph safe in LL steps); padding rows go nowhere."""
        return self.finish(self.compute(self.launch(layer, x, idx, weights, valid), shard))

    # ---- the three halves -----------------------------------------------------------------
    def launch(self, layer, x, idx, weights, valid: torch.Tensor | None = None) -> DeepEPExchange:
        topk = masked_topk(self.route(layer, idx, valid), valid)
        ex = DeepEPExchange(self.ll_step, x.dtype, topk, weights.float())
        xb = x.to(torch.bfloat16)
        if ex.low_latency:
            assert x.shape[0] <= self.ll_tokens, f"{x.shape[0]} tokens exceed the LL bound {self.ll_tokens}"
            ex.recv, ex.count, ex.handle, _, ex.hook = self.buffer.low_latency_dispatch(
                xb, topk, self.ll_tokens, self.n_slots, use_fp8=True, async_finish=False, return_recv_hook=True)
            return ex
        n_rank, n_rdma, n_expert, in_rank, _ = self.buffer.get_dispatch_layout(topk, self.n_slots)
        q, s = self.kb.per_token_group_quant_fp8(xb)                       # 1x128, scales MN-major
        ex.recv, ex.recv_idx, ex.recv_w, _, ex.handle, ex.event = self.buffer.dispatch(
            (q, s), num_tokens_per_rank=n_rank, num_tokens_per_rdma_rank=n_rdma, is_token_in_rank=in_rank,
            num_tokens_per_expert=n_expert, topk_idx=topk, topk_weights=ex.weights,
            previous_event=self.buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
        return ex

    def compute(self, ex: DeepEPExchange, shard: ExpertShard) -> DeepEPExchange:
        if ex.low_latency:
            ex.hook()                                                     # the receive lands here
            q, s = ex.recv
            rows = (q, s) if getattr(self.kb, "TAKES_FP8_ROWS", False) else \
                (q.float() * s.float().repeat_interleave(128, -1)[..., :q.shape[-1]]).to(torch.bfloat16)
            y = self.kb.expert_ffn_masked(rows, shard.experts, ex.count,
                                          max(1, ex.topk.shape[0] * ex.topk.shape[1] // max(1, shard.n_slots)))
            ex.out, _, ex.hook = self.buffer.low_latency_combine(y, ex.topk, ex.weights, ex.handle,
                                                                 async_finish=False, return_recv_hook=True)
            return ex
        ex.event.current_stream_wait()
        q, s = ex.recv
        row, slot, w = normal_recv_pairs(ex.recv_idx, ex.recv_w)
        y = shard.compute(self.kb, (q[row], s[row]), slot)                  # [N*K, D] bf16
        back = reduce_pairs(y.to(torch.bfloat16), w, ex.recv_idx.shape[1])
        ex.out, _, ex.event = self.buffer.combine(back, ex.handle, previous_event=self.buffer.capture(),
                                                  async_finish=True, allocate_on_comm_stream=True)
        return ex

    def finish(self, ex: DeepEPExchange) -> torch.Tensor:
        if ex.low_latency:
            ex.hook()
        else:
            ex.event.current_stream_wait()
        return ex.out.to(ex.dtype)

    def close(self) -> None:
        self.buffer.destroy()


def self_test(deepep: DeepEPDispatcher, oracle, shard: ExpertShard, n_tokens: int, k: int,
              device: torch.device, tol: float = 2e-3) -> tuple[bool, str]:
    """DeepEP against the all-to-all dispatcher (model/ep_dispatch.py, same group, same map, FP8
    dispatch) on seeded inputs, every rank at once: one whole normal exchange, the split halves of
    two micro-batches in the overlapped order, and (if built) a low-latency decode exchange with
    padding rows. -> (passed, why). The caller agrees the verdict across ranks."""
    g = torch.Generator(device=device).manual_seed(1234 + deepep.rank)
    d = deepep.hidden
    layer = deepep.first
    worst = 0.0

    def inputs(t):
        x = torch.randn(t, d, generator=g, device=device).bfloat16()
        idx = torch.stack([torch.randperm(deepep.map.n_experts, generator=g, device=device)[:k] for _ in range(t)]) \
            if t else torch.zeros(0, k, dtype=torch.long, device=device)
        w = torch.rand(t, k, generator=g, device=device)
        return x, idx, w / w.sum(-1, keepdim=True).clamp(min=1e-6)

    def diff(a, b):
        a, b = a.double(), b.double()
        den = (a * a + b * b).sum()
        return 0.0 if float(den) == 0 else float(1 - 2 * (a * b).sum() / den)

    try:
        with deepep.step_mode(False):
            x, idx, w = inputs(n_tokens)
            worst = max(worst, diff(deepep.run(layer, x, idx, w, shard), oracle.run(layer, x, idx, w, shard)))
            (x0, i0, w0), (x1, i1, w1) = inputs(n_tokens // 2), inputs(n_tokens - n_tokens // 2)
            e0, e1 = deepep.launch(layer, x0, i0, w0), deepep.launch(layer, x1, i1, w1)
            e0 = deepep.compute(e0, shard)
            e1 = deepep.compute(e1, shard)
            got = torch.cat([deepep.finish(e0), deepep.finish(e1)])
            want = torch.cat([oracle.run(layer, x0, i0, w0, shard), oracle.run(layer, x1, i1, w1, shard)])
            worst = max(worst, diff(got, want))
        if deepep.low_latency_ok:
            with deepep.step_mode(True):
                t = min(n_tokens, deepep.ll_tokens)
                x, idx, w = inputs(t)
                valid = torch.arange(t, device=device) < max(1, t - 3)        # the last rows pad a bucket
                got = deepep.run_static(layer, x, idx, w, shard, valid)
                want = oracle.run(layer, x, idx, w, shard)
                worst = max(worst, diff(got[valid], want[valid]))
                if bool((got[~valid] != 0).any()):
                    return False, "low-latency exchange wrote padding rows"
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    ok = worst <= tol
    return ok, f"DeepEP vs all-to-all calc_diff {worst:.1e} (tolerance {tol:.0e})"
