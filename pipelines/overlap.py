"""Communication-computation overlap (issue 7): two micro-batches, two schedules; and SGLang's
single-batch overlap (issue 24), a third.

`split_two` cuts a step's batch into two micro-batches (state in, plan out). A schedule is
a plain list of stage operations over both micro-batches, the orders of DeepSeek's two
figures (SEED.md):
  prefill  per layer: ATTN(0) | SHARED(1) ATTN(1) | MLP(0) | MLP(1) | SHARED(0)
  decode   per layer: SHARED(0) ATTN-0(1) | MLP(0) | ATTN-1(1) | SHARED(1) ATTN-0(0) | MLP(1) | ATTN-1(0)
with DISPATCH (launch), MLP (wait for the dispatch, run the experts, launch the combine) and
COMBINE (wait, add into the residual) placed so each exchange flies while the other
micro-batch computes. `run_schedule` executes a list on the dispatcher's launch / compute /
finish halves (model/ep_dispatch.py, non-blocking collectives); every stage is a named
profiler range. The two schedules issue collectives in different orders, so a unit picks
one per step for all its ranks (`choose_schedule` in pipelines/overlap_tuner.py, called by the supervisor); with
`overlap: auto` an `OverlapTuner` measures whether splitting pays on this machine.

`sbo` keeps the batch whole (SGLang's single-batch overlap): per MoE layer
  ATTN-0 ATTN-1 | DISPATCH | SHARED | MLP-SBO | COMBINE
the dispatch flies under the shared expert, and MLP-SBO runs the routed experts in chunks of slots,
launching each chunk's combine as soon as its down GEMM is done, so chunk i's combine flies under
chunk i + 1's GEMMs (DeepEP signals each finished block in the real thing; a dispatcher with
`compute_sbo`, model/ep_emulate.py, holds per chunk; any other runs MLP-SBO as MLP).

A piece is (sequence index, first new token, end): a long prompt may be split across the
two micro-batches, its head in micro-batch 0, because both schedules run micro-batch 0's
ATTN-0 of a layer before micro-batch 1's ATTN-1 of it (the tail attends to the head).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from epserve.kernels.reference import add_rms_norm
from epserve.model.deepseek_v3 import Batch, DecodeBatch, MoE, Queries

SCHEDULES = ("prefill", "decode", "sbo")

@dataclass(frozen=True)
class Piece:
    seq: int
    start: int      # offset into the sequence's new tokens
    end: int


def piece_cost(ctx: int, start: int, end: int, attn_weight: float) -> float:
    """Tokens (GEMMs, dispatch volume) plus attn_weight x core-attention pairs of new tokens [start, end)."""
    n = end - start
    return n + attn_weight * n * (ctx + start + (n + 1) / 2)


def attention_weight(args) -> float:
    """FLOPs of one (query, key) pair of naive-form core attention over the FLOPs of one token's
    projections and experts in a MoE layer: how piece_cost weighs attention work against tokens."""
    a = args
    pair = a.n_heads * (a.qk_head_dim + a.v_head_dim)
    q = a.dim * a.q_lora_rank + a.q_lora_rank * a.n_heads * a.qk_head_dim if a.q_lora_rank else \
        a.dim * a.n_heads * a.qk_head_dim
    token = q + a.dim * a.kv_dim + a.n_heads * a.v_head_dim * a.dim \
        + (a.n_activated_experts + a.n_shared_experts) * 3 * a.dim * a.moe_inter_dim
    return pair / token


def split_two(seq_new: list[int], seq_ctx: list[int], attn_weight: float = 1e-3,
              allow_split: bool = True) -> tuple[list[Piece], list[Piece]]:
    """Two micro-batches of about equal cost; every new token is in exactly one piece.

    Greedy heaviest-first onto the lighter side; then, if allowed, the longest piece on the
    heavier side is cut at the token that best balances the two sides.
    """
    order = sorted(range(len(seq_new)), key=lambda i: -piece_cost(seq_ctx[i], 0, seq_new[i], attn_weight))
    sides: list[list[Piece]] = [[], []]
    cost = [0.0, 0.0]
    for i in order:
        if seq_new[i] == 0:
            continue
        side = 0 if cost[0] <= cost[1] else 1
        sides[side].append(Piece(i, 0, seq_new[i]))
        cost[side] += piece_cost(seq_ctx[i], 0, seq_new[i], attn_weight)
    heavy = 0 if cost[0] > cost[1] else 1
    if allow_split and sides[heavy]:
        big = max(sides[heavy], key=lambda p: p.end - p.start)
        cut = _balancing_cut(big, seq_ctx[big.seq], cost, heavy, attn_weight)
        if cut is not None:
            sides[heavy].remove(big)
            head, tail = Piece(big.seq, big.start, cut), Piece(big.seq, cut, big.end)
            sides[0].append(head)     # the head always runs in micro-batch 0: the tail needs its latents
            sides[1].append(tail)
    return sides[0], sides[1]


def _balancing_cut(big: Piece, ctx: int, cost: list[float], heavy: int, w: float) -> int | None:
    """Cut point k in [start + 2, end - 2] minimising |cost0 - cost1| after moving one part of `big` across:
    the tail to micro-batch 1 when micro-batch 0 is heavy, the head to micro-batch 0 otherwise."""
    base = [cost[0], cost[1]]
    base[heavy] -= piece_cost(ctx, big.start, big.end, w)
    best_k, best = None, abs(cost[0] - cost[1])
    for k in range(big.start + 2, big.end - 1):     # no 1-token piece: it would attend in the decode form
        c0 = base[0] + piece_cost(ctx, big.start, k, w)
        c1 = base[1] + piece_cost(ctx, k, big.end, w)
        if abs(c0 - c1) < best:
            best_k, best = k, abs(c0 - c1)
    return best_k


def sub_batches(batch: Batch, attn_weight: float = 1e-3, with_rows: bool = False):
    """The step's two micro-batches as Batches, and for each, (row in its logits, sequence) of
    the pieces that end a sequence (their last token's logits are the step's output).
    with_rows: also each micro-batch's token rows in the step's batch (int64 tensors)."""
    mb_pieces = split_two(batch.seq_new, batch.seq_ctx, attn_weight, allow_split=batch.max_decode_new == 1)
    starts = [0] + torch.tensor(batch.seq_new, dtype=torch.long).cumsum(0).tolist()
    out, ends, all_rows = [], [], []
    for pieces in mb_pieces:
        if not pieces:
            out.append(Batch.empty(batch.input_ids.device))
            ends.append([])
            all_rows.append(torch.zeros(0, dtype=torch.long, device=batch.input_ids.device))
            continue
        rows = torch.cat([torch.arange(starts[p.seq] + p.start, starts[p.seq] + p.end) for p in pieces])
        rows = rows.to(batch.input_ids.device)
        out.append(Batch(batch.input_ids[rows], batch.positions[rows], [p.end - p.start for p in pieces],
                         [batch.seq_ctx[p.seq] + p.start for p in pieces], batch.block_tables[[p.seq for p in pieces]],
                         batch.slot_mapping[rows], batch.force_naive, max_decode_new=batch.max_decode_new))
        ends.append([(j, p.seq) for j, p in enumerate(pieces) if p.end == batch.seq_new[p.seq]])
        all_rows.append(rows)
    return (out, ends, all_rows) if with_rows else (out, ends)


def split_decode(batch: DecodeBatch, plan_fn=None) -> list:
    """A fixed-shape decode step's two micro-batches: rows [0, h) and [h, B), h = ceil(B / 2), each a
    DecodeBatch of views into the step's tensors (so a CUDA graph of the step replays them) with a
    plan of its own (plan_fn(): the kernels' per-step attention plan). The one-batch decode path
    stays in force in each half: the absorbed queries written in place, FlashMLA's s_q, no host
    sync. Rows keep their order, so micro-batch 0's outputs are the step's first h x S rows. A
    step of one row gives that row and an empty Batch (both micro-batches still run every layer)."""
    b, s_q = batch.block_tables.shape[0], batch.n_q
    h = (b + 1) // 2
    out = []
    for lo, hi in ((0, h), (h, b)):
        if hi == lo:
            out.append(Batch.empty(batch.input_ids.device))
            continue
        t = slice(lo * s_q, hi * s_q)
        out.append(DecodeBatch(batch.input_ids[t], batch.positions[t], batch.slot_mapping[t], batch.block_tables[lo:hi],
                               batch.seq_lens[lo:hi], batch.valid[t], plan_fn() if plan_fn else None, s_q))
    return out


@dataclass(frozen=True)
class Op:
    """One stage of one micro-batch in one layer, named as in DeepSeek's figures. DISPATCH
    launches the exchange; MLP waits for it, runs the routed experts and launches the combine;
    COMBINE waits for that and adds into the residual; FFN is a dense layer's MLP; HEAD the logits."""

    stage: str      # ATTN-0 ATTN-1 FFN DISPATCH SHARED MLP MLP-SBO COMBINE HEAD
    mb: int
    layer: int = -1

    def __str__(self) -> str:
        return f"{self.stage}[{self.mb}]" + (f"@{self.layer}" if self.layer >= 0 else "")


def schedule_ops(kind: str, n_layers: int, n_dense: int) -> list[Op]:
    """The whole step's operations, in execution order (pure; the tests read it)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule {kind!r}: expected one of {SCHEDULES}")
    mbs = (0,) if kind == "sbo" else (0, 1)
    ops = [Op(s, j, i) for i in range(n_dense) for j in mbs for s in ("ATTN-0", "ATTN-1", "FFN")]
    moe = list(range(n_dense, n_layers))
    if kind == "sbo":
        for i in moe:
            ops += [Op(s, 0, i) for s in ("ATTN-0", "ATTN-1", "DISPATCH", "SHARED", "MLP-SBO", "COMBINE")]
        return ops + [Op("HEAD", 0)]
    if kind == "prefill":
        for i in moe:
            prev = i > n_dense
            ops += [Op("ATTN-0", 0, i), Op("ATTN-1", 0, i), Op("DISPATCH", 0, i)]
            ops += [Op("SHARED", 1, i - 1), Op("COMBINE", 1, i - 1)] if prev else []
            ops += [Op("ATTN-0", 1, i), Op("ATTN-1", 1, i), Op("DISPATCH", 1, i),
                    Op("MLP", 0, i), Op("MLP", 1, i), Op("SHARED", 0, i), Op("COMBINE", 0, i)]
        if moe:
            ops += [Op("HEAD", 0), Op("SHARED", 1, moe[-1]), Op("COMBINE", 1, moe[-1])]
    else:
        if moe:
            ops += [Op("ATTN-0", 0, moe[0]), Op("ATTN-1", 0, moe[0])]
        for i in moe:
            more = i + 1 < n_layers
            ops += [Op("DISPATCH", 0, i), Op("SHARED", 0, i)]
            ops += [Op("COMBINE", 1, i - 1)] if i > n_dense else []
            ops += [Op("ATTN-0", 1, i), Op("MLP", 0, i), Op("ATTN-1", 1, i), Op("DISPATCH", 1, i),
                    Op("SHARED", 1, i), Op("COMBINE", 0, i)]
            ops += [Op("ATTN-0", 0, i + 1)] if more else [Op("HEAD", 0)]
            ops += [Op("MLP", 1, i)]
            ops += [Op("ATTN-1", 0, i + 1)] if more else []
        if moe:
            ops += [Op("COMBINE", 1, moe[-1])]     # the one exchange left exposed: the pipeline drains
    return ops + ([] if moe else [Op("HEAD", 0)]) + [Op("HEAD", 1)]


@dataclass
class MicroBatch:
    """One micro-batch's state as it moves through the layers."""

    batch: Batch
    rope: tuple
    h: torch.Tensor                       # residual stream [T, D]
    q: Queries | None = None              # ATTN-0 -> ATTN-1
    x: torch.Tensor | None = None         # FFN input of the current layer (dense or MoE)
    ex: object = None                     # the exchange in flight (dispatch, then combine)
    valid: torch.Tensor | None = None     # static: bool [T] rows to route (the dispatcher's fixed-shape path)
    shared: torch.Tensor | None = None    # shared-expert output waiting for the combine
    routing: tuple | None = None          # (weights, expert ids) from the gate
    ends: list = field(default_factory=list)   # (row, sequence) of pieces that end a sequence
    h0: torch.Tensor | None = None        # the embedded input the residual stream starts from (a replay restarts here)
    head_rows: torch.Tensor | None = None  # device int64: rows of h whose logits HEAD computes (None: all)
    out_seqs: torch.Tensor | None = None   # device int64: the step's sequence of each of those logits
    logits: torch.Tensor | None = None    # HEAD: fp32 [len(ends), vocab]


def run_schedule(model, mbs: list[MicroBatch], ops: list[Op], kv_cache: torch.Tensor,
                 trace: list[str] | None = None) -> None:
    """Execute `ops` in order; each stage runs under a profiler range named after it."""
    a, blocks = model.args, model.layers
    for op in ops:
        if trace is not None:
            trace.append(str(op))
        m = mbs[op.mb]
        blk = blocks[op.layer] if op.layer >= 0 else None
        with torch.profiler.record_function(str(op)):
            if op.stage == "ATTN-0":
                m.q = blk.attn.project(model.kb.rms_norm(m.h, blk.attn_norm, a.rms_norm_eps), m.batch, m.rope,
                                       kv_cache[op.layer])
            elif op.stage == "ATTN-1":
                m.h, m.x = getattr(model.kb, "add_rms_norm", add_rms_norm)(
                    m.h, blk.attn.attend(m.q, m.batch, kv_cache[op.layer]), blk.ffn_norm, a.rms_norm_eps)
                m.q = None
                if isinstance(blk.ffn, MoE):
                    m.routing = blk.ffn.gate.forward(m.x)
            elif op.stage == "FFN":
                m.h = m.h + blk.ffn.forward(m.x)
            elif op.stage == "DISPATCH":
                w, idx = m.routing
                m.ex = blk.ffn.dispatcher.launch(op.layer, m.x, idx, w) if m.valid is None else \
                    blk.ffn.dispatcher.launch(op.layer, m.x, idx, w, m.valid)
            elif op.stage == "SHARED":
                m.shared = blk.ffn.shared.forward(m.x) if blk.ffn.shared is not None else None
            elif op.stage == "MLP":
                m.ex = blk.ffn.dispatcher.compute(m.ex, blk.ffn.experts)
            elif op.stage == "MLP-SBO":             # each chunk's combine launched after its GEMMs
                d = blk.ffn.dispatcher
                m.ex = getattr(d, "compute_sbo", d.compute)(m.ex, blk.ffn.experts)
            elif op.stage == "COMBINE":              # the same sums as MoE.forward
                y = blk.ffn.dispatcher.finish(m.ex)
                m.h = m.h + (y + m.shared if m.shared is not None else y)
                m.ex = m.shared = None
            elif op.stage == "HEAD":
                if not m.ends:
                    continue
                m.logits = model.logits(m.h if m.head_rows is None else m.h[m.head_rows])
            else:
                raise ValueError(f"unknown stage {op.stage!r}")


def prepare_overlapped(model, batch: Batch, all_tokens: bool = False, static: bool = False,
                       schedule: str = "prefill") -> tuple[list, list]:
    """The host side of an overlapped step: the two micro-batches (`sbo`: one, the whole batch)
    with their RoPE, embedded inputs, index tensors and (decode) FlashMLA plans, all made before the
    layers run, so `run_overlapped` launches device work only (a CUDA graph can capture it and
    replay it). static: the MoE layers take the dispatcher's fixed-shape path (masked layout, no
    host sync; a dispatcher whose launch takes `valid`: local, emulated, DeepEP; a DecodeBatch's
    padding rows stay unrouted). A DecodeBatch splits by rows (`split_decode`), so each micro-batch
    keeps the fixed-shape decode path; a Batch by cost (`sub_batches`).
    -> (micro-batches, each one's token rows in `batch`)."""
    dev = model.device
    fixed = isinstance(batch, DecodeBatch)
    plan_fn = getattr(model.kb, "plan_mla_decode", None)
    if fixed:        # every token row is an output row, in order
        batches = [batch] if schedule == "sbo" else split_decode(batch, plan_fn)
        rows, lo = [], 0
        for b in batches:
            rows.append(torch.arange(lo, lo + b.n_tokens, device=dev))
            lo += b.n_tokens
        ends = [list(range(b.n_tokens)) for b in batches]
    elif schedule == "sbo":
        batches, rows = [batch], [torch.arange(batch.n_tokens, device=dev)]
        ends = [[(i, i) for i, n in enumerate(batch.seq_new) if n]]
    else:
        batches, ends, rows = sub_batches(batch, attention_weight(model.args), with_rows=True)
    mbs = []
    for b, e, r in zip(batches, ends, rows):
        e = [] if all_tokens else e
        if static:
            valid = b.valid if isinstance(b, DecodeBatch) else torch.ones(b.n_tokens, dtype=torch.bool, device=dev)
        m = MicroBatch(b, model.rope(b.positions), model.embed_tokens(b.input_ids), ends=e,
                       valid=valid if static else None)
        m.h0 = m.h
        if e and fixed:
            m.head_rows, m.out_seqs = None, r
        elif e:
            m.head_rows = b.last_token_index[[r_ for r_, _ in e]].to(dev)
            m.out_seqs = torch.tensor([s_ for _, s_ in e], dtype=torch.long, device=dev)
        mbs.append(m)
    return mbs, rows


def run_overlapped(model, mbs: list, rows: list, kv_cache: torch.Tensor, n_seqs: int, schedule: str = "prefill",
                   trace: list[str] | None = None, all_tokens: bool = False) -> torch.Tensor:
    """The device side of an overlapped step over prepared micro-batches (restarting from their
    embedded inputs, so it can be replayed) -> logits fp32 [n_seqs, vocab] (a DecodeBatch's step:
    n_seqs = its token rows, one logit row each, as model.forward gives), or all_tokens: the
    final-normed hidden of every token [T, D]."""
    a = model.args
    with torch.inference_mode():
        for m in mbs:
            m.h = m.h0
        run_schedule(model, mbs, schedule_ops(schedule, a.n_layers, a.n_dense_layers), kv_cache, trace)
        if all_tokens:
            hn = torch.empty(sum(len(r) for r in rows), a.dim, dtype=model.dtype, device=model.device)
            for m, r in zip(mbs, rows):
                if len(r):
                    hn[r] = model.kb.rms_norm(m.h, model.norm, a.rms_norm_eps)
            return hn
        logits = torch.empty(n_seqs, a.vocab_size, dtype=torch.float32, device=model.device)
        for m in mbs:
            if m.ends:
                logits[m.out_seqs] = m.logits
    return logits


def forward_overlapped(model, batch: Batch, kv_cache: torch.Tensor, schedule: str = "prefill",
                       trace: list[str] | None = None, all_tokens: bool = False, static: bool = False) -> torch.Tensor:
    """model.forward's logits computed as two micro-batches in `schedule`'s order: the same math
    per token, up to the rounding of GEMMs over other row counts (~1e-6 in float32; the greedy
    tokens are the same, tested). -> logits fp32 [B, vocab]; all_tokens: the final-normed hidden
    of every token instead [T, D] (what MTP verifies and drafts from). static: see prepare_overlapped."""
    with torch.inference_mode():
        mbs, rows = prepare_overlapped(model, batch, all_tokens, static, schedule)
    n_out = batch.n_tokens if isinstance(batch, DecodeBatch) else len(batch.seq_new)
    return run_overlapped(model, mbs, rows, kv_cache, n_out, schedule, trace, all_tokens)
