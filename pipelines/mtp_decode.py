"""MTP decoding on one rank: the first draft after a prefill, then verify-and-draft decode steps.

Each decode step verifies the previous step's drafts and proposes the next:
  1. prepare: every sequence feeds S = 1 + k positions: its last token and its k drafts (fewer for a
     sequence that has none yet or cannot draft: the rest are padding rows, valid False);
  2. target: one forward over the B x S positions (MLA decode with S causal queries per sequence over
     the paged cache; model/deepseek_v3.py DecodeBatch n_q = S), logits and final-normed hidden of all;
  3. accept: model/speculative.py's rule on the device (greedy rows: the argmax comparison);
  4. draft: the MTP module over the same B x S positions, fed each position's emitted token; the draft
     is read at each sequence's last accepted position (k > 1: the module again, chained);
  5. one host transfer (tokens, accepted counts, drafts); then the rollback: every cache slot a
     rejected (or past-the-end) position wrote gets its bytes from before the step back, and pages
     the step reserved past the accepted tokens return to the pool.
Every rank runs the MTP forward(s) in every step, empty ones included: each is a MoE exchange of the unit.
Sequences that ask for logprobs, penalties, logit bias or a grammar decode one token a step
(their logits go through model/sampling.py's `sample`) beside the drafting ones.
Never: decides pages (pipelines/batcher.py) or acceptance (model/speculative.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from epserve.model.deepseek_v3 import Batch, DecodeBatch
from epserve.model.sampling import sample
from epserve.model.speculative import SamplingRows, accept_drafts, draw, greedy_accept, target_probs
from epserve.pipelines.sequence import Sequence


def can_draft(seq: Sequence) -> bool:
    """Whether a sequence decodes with drafts (the rule covers the plain sampler's knobs only)."""
    p = seq.params       # seeded sampling keeps its stateless per-token draws (model/sampling.py): no drafts
    return (p.logprobs is None and not p.has_penalties and not p.logit_bias and p.grammar is None
            and (p.seed is None or p.is_greedy))


@dataclass
class MTPCounters:
    """Totals since start: /metrics' acceptance rate (accepted / proposed) and tokens per step."""

    verify_steps: int = 0
    sequence_steps: int = 0     # (sequence, verify step) pairs
    proposed: int = 0           # drafts verified
    accepted: int = 0
    emitted: int = 0            # tokens the verify steps produced

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["acceptance_rate"] = self.accepted / self.proposed if self.proposed else 0.0
        d["tokens_per_step"] = self.emitted / self.sequence_steps if self.sequence_steps else 0.0
        return d


class MTPDrafter:
    def __init__(self, engine, k: int, graphs=None):
        self.e, self.k = engine, k
        self.counters = MTPCounters()
        self.graphs = graphs        # pipelines/cuda_graphs.py VerifyGraphs: greedy verify steps replayed

    # ---- proposing ---------------------------------------------------------------------------
    def _propose(self, logits: torch.Tensor, rows: SamplingRows | None):
        """logits [B, V] of the MTP module -> (draft tokens [B], q [B, V] or None for all-greedy)."""
        if rows is None:
            return logits.argmax(-1), None
        q = target_probs(logits, rows)
        return draw(q, torch.rand(q.shape[0], device=q.device)), q

    def _chain(self, first: torch.Tensor, q1, m: torch.Tensor, pos: torch.Tensor,
               rows: SamplingRows | None, batch_for) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [B, k] (and q [B, k, V]): the first, then k - 1 more by feeding the module its own
        output hidden m [B, D] and draft at positions pos + 1, pos + 2 ... (batch_for builds the step)."""
        drafts, qs = [first], [q1]
        for depth in range(1, self.k):
            b = batch_for(drafts[-1], pos + depth)
            logits, m = self.e.model.mtp.forward(self.e.model, b, m, self.e.cache.kv)
            d, q = self._propose(logits, rows)
            drafts.append(d)
            qs.append(q)
        return torch.stack(drafts, 1), (torch.stack(qs, 1) if q1 is not None else None)

    def _rows(self, seqs: list[Sequence]) -> SamplingRows | None:
        hot = [s for s in seqs if not s.params.is_greedy]
        return SamplingRows.of([s.params for s in seqs], self.e.args.vocab_size, self.e.device) if hot else None

    def after_prefill(self, batch: Batch, hn: torch.Tensor, seqs: list[Sequence], first: list[int]) -> None:
        """The module over the prefill's positions (input: each next token; the last one the sampled
        first token), its latents written at the same slots; sets seq.draft (and draft_q)."""
        e = self.e
        dev = e.device
        last = batch.last_token_index.to(dev) if batch.seq_new else torch.zeros(0, dtype=torch.long, device=dev)
        shifted = torch.roll(batch.input_ids, -1)
        if len(last):
            shifted[last] = torch.tensor(first, dtype=torch.long, device=dev)
        logits, m = e.model.mtp.forward(e.model, replace(batch, input_ids=shifted), hn, e.cache.kv, all_logits=False)
        rows = self._rows(seqs)
        d1, q1 = self._propose(logits, rows)
        pos = batch.positions[last] if len(last) else batch.positions[:0]

        def batch_for(tokens, positions):
            return _one_token_batch(e, seqs, tokens, positions)
        drafts, q = self._chain(d1, q1, m[last], pos + 1, rows, batch_for)
        self._keep_drafts(seqs, drafts.tolist(), q)

    def _keep_drafts(self, seqs, drafts: list[list[int]], q) -> None:
        for i, (s, d) in enumerate(zip(seqs, drafts)):
            ok = can_draft(s) and not s.is_finished
            s.draft = d if ok else []
            s.draft_q = q[i] if ok and q is not None and not s.params.is_greedy else None

    def empty_step(self) -> None:
        """No sequences: still run every MTP exchange of the step (lockstep)."""
        e = self.e
        b = Batch.empty(e.device)
        m = torch.zeros(0, e.args.dim, dtype=e.dtype, device=e.device)
        for _ in range(self.k):
            _, m = e.model.mtp.forward(e.model, b, m, e.cache.kv)

    # ---- verifying ---------------------------------------------------------------------------
    def decode(self, seqs: list[Sequence], schedule: str | None, graphs_ok: bool = True):
        """One verify-and-draft step -> ([(seq, emitted tokens, their logprob infos)], the undo record
        for `rollback`). graphs_ok False: a DeepEP unit's normal-kernel step (runner.decode's rule), which
        the verify graphs, captured with low-latency kernels, must not replay."""
        e, k = self.e, self.k
        s_q, b = k + 1, len(seqs)
        dev = e.device
        rows = e.table.rows_for(seqs)
        ids, pos, valid, nd = [], [], [], []
        for s in seqs:
            d = s.draft[:k] if can_draft(s) else []
            n = s.n_computed
            ids += [s.last_token] + d + [0] * (k - len(d))
            pos += range(n, n + s_q)
            valid += [1] * (1 + len(d)) + [0] * (k - len(d))
            nd.append(len(d))
        srows = self._rows(seqs)
        graphs = self.graphs if srows is None and graphs_ok else None
        if graphs is not None and graphs.bucket(b) is not None:
            inp, saved, draft_slots = graphs.stage(ids, pos, valid, rows, nd)
            logits, tokens, n_acc, new_drafts = graphs.run(b, inp, schedule)
            new_q = None
        else:
            t = torch.tensor([ids, pos, valid, rows + [0] * (b * k), nd + [0] * (b * k)],
                             dtype=torch.long).to(dev, non_blocking=True)
            inp = (t[0], t[1], t[2], t[3, :b], t[4, :b])
            batch = self.verify_batch(*inp[:4])
            draft_slots = batch.slot_mapping.view(b, s_q)[:, 1:].flatten()
            saved = e.cache.kv.flatten(1, 2).index_select(1, draft_slots)        # [layers, B*k, L+R]
            qs = None if srows is None else [s.draft_q if s.draft else None for s in seqs]
            logits, tokens, n_acc, new_drafts, new_q = self.verify_device(*inp, srows, qs, schedule)
        plain = [i for i, s in enumerate(seqs) if not can_draft(s)]
        plain_tok, plain_info = {}, {}
        if plain:      # their one token through the full sampler (penalties, bias, grammar, logprobs)
            ps = [seqs[i] for i in plain]
            adjust = e.sampler_state.prepare(ps)
            toks, infos = sample(logits.view(b, s_q, -1)[plain, 0], [s.params for s in ps],
                                 [len(s.output_ids) for s in ps], adjust)
            plain_tok, plain_info = dict(zip(plain, toks)), dict(zip(plain, infos))
        host = torch.cat([tokens.flatten(), n_acc, new_drafts.flatten()]).tolist()     # the one host transfer
        tok_h, acc_h, dr_h = host[:b * s_q], host[b * s_q: b * s_q + b], host[b * s_q + b:]
        out = []
        for i, s in enumerate(seqs):
            if i in plain_tok:
                emitted, infos = [plain_tok[i]], [plain_info[i]]
            else:
                emitted = tok_h[i * s_q: i * s_q + acc_h[i] + 1]
                infos = [None] * len(emitted)
            out.append((s, emitted, infos))
        self._count(nd, acc_h, plain_tok)
        self._keep_drafts(seqs, [dr_h[i * k:(i + 1) * k] for i in range(b)], new_q)
        return out, (saved, draft_slots, s_q)

    def verify_batch(self, ids: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                     rows: torch.Tensor) -> DecodeBatch:
        """The target's step: B sequences x S positions on the rank's persistent block table."""
        e = self.e
        return DecodeBatch.from_rows(ids, pos, rows, e.table.tables, e.cache.page_size, e.table.scratch_row,
                                     e.kb.plan_mla_decode(), n_q=self.k + 1, valid=valid.bool())

    def verify_device(self, ids, pos, valid, rows, n_draft, srows: SamplingRows | None = None, qs=None,
                      schedule: str | None = None):
        """Steps 2-4 on the device, no host sync (for greedy batches, what a CUDA graph captures):
        ids / pos / valid [B*S], rows / n_draft [B] -> (target logits [B*S, V], emitted tokens [B, S],
        accepted [B], next drafts [B, k], their q [B, k, V] or None)."""
        batch = self.verify_batch(ids, pos, valid, rows)
        logits, hn = self._target(batch, schedule)
        return self.accept_and_draft(batch, rows, logits, hn, n_draft, srows, qs)

    def accept_and_draft(self, batch: DecodeBatch, rows: torch.Tensor, logits: torch.Tensor, hn: torch.Tensor,
                         n_draft: torch.Tensor, srows: SamplingRows | None = None, qs=None,
                         forced: torch.Tensor | None = None):
        """Steps 3-4 after the target forward (logits [B*S, V], final-normed hidden hn [B*S, D]; rows
        [B] the sequences' table rows) -> as verify_device. forced: benchmarks only
        (bench/step_mtp_ep.py), bool [B, k] acceptance decided by the caller in place of the rule,
        greedy rows only: random weights never accept a draft, so the benchmark forces a stated rate
        to time the step a trained model would run."""
        e, k = self.e, self.k
        s_q, b = k + 1, n_draft.shape[0]
        dev = logits.device
        drafts_in = batch.input_ids.view(b, s_q)[:, 1:]
        if srows is None:
            target = logits.argmax(-1).view(b, s_q)
            n_acc, tokens = greedy_accept(target, drafts_in, n_draft), target
            if forced is not None:
                n_acc = (forced & (torch.arange(k, device=dev)[None, :] < n_draft[:, None])).int().cumprod(1).sum(1)
        else:
            p = target_probs(logits, srows.repeat(s_q)).view(b, s_q, -1)
            onehot = torch.zeros(b, k, p.shape[-1], device=dev).scatter_(2, drafts_in[..., None], 1.0)
            # a draft without its q (greedy rows, handed-over drafts) is a deterministic proposal: q one-hot
            q = torch.stack([qs[i] if qs[i] is not None else onehot[i] for i in range(b)])
            q = torch.where((srows.temperature == 0)[:, None, None], onehot, q)
            tokens, n_acc = accept_drafts(p, q, drafts_in, n_draft, torch.rand(b, k, device=dev),
                                          torch.rand(b, s_q, device=dev))
        # the module over the same positions, fed the emitted tokens; drafts read at the last accepted one
        mb = replace(batch, input_ids=tokens.flatten(),
                     valid=batch.valid & (torch.arange(s_q, device=dev)[None, :] <= n_acc[:, None]).flatten())
        mlog, m = e.model.mtp.forward(e.model, mb, hn, e.cache.kv)
        sel = torch.arange(b, device=dev) * s_q + n_acc
        d1, q1 = self._propose(mlog[sel], srows)

        def batch_for(tok, positions):
            return DecodeBatch.from_rows(tok, positions, rows, e.table.tables, e.cache.page_size,
                                         e.table.scratch_row, e.kb.plan_mla_decode())
        new_drafts, new_q = self._chain(d1, q1, m[sel], batch.positions[sel] + 1, srows, batch_for)
        return logits, tokens, n_acc, new_drafts, new_q

    def _target(self, batch: DecodeBatch, schedule: str | None):
        """The target forward: one batch, or the unit's overlap schedule over the DecodeBatch's two
        halves of rows (pipelines/overlap.py split_decode: S causal queries per row, as one batch)."""
        e = self.e
        if schedule is None:
            return e.model.forward(batch, e.cache.kv, with_hidden=True)
        from epserve.pipelines.overlap import forward_overlapped
        hn = forward_overlapped(e.model, batch, e.cache.kv, schedule, all_tokens=True, static=e.static_moe)
        return e.model.head_logits(hn), hn

    def rollback(self, undo, used: list[int]) -> None:
        """Put back the bytes of every draft slot past each sequence's `used` tokens (the rejected
        drafts, and accepted ones past a stop): the cache is then as if those positions were never fed."""
        saved, slots, s_q = undo
        j = torch.arange(1, s_q)
        restore = (j[None, :] >= torch.tensor(used)[:, None]).flatten()   # position n + j was not fed: undo it
        idx = restore.nonzero()[:, 0]
        if len(idx):
            idx = idx.to(slots.device)
            self.e.cache.kv.flatten(1, 2).index_copy_(1, slots[idx], saved[:, idx])

    def _count(self, nd, acc, plain) -> None:
        c = self.counters
        c.verify_steps += 1
        for i, n in enumerate(nd):
            if i in plain:
                continue
            c.sequence_steps += 1
            c.proposed += n
            c.accepted += acc[i]
            c.emitted += acc[i] + 1


def _one_token_batch(e, seqs: list[Sequence], tokens: torch.Tensor, positions: torch.Tensor) -> Batch:
    """One new token per sequence at `positions` over its own pages (the chained draft after a prefill)."""
    if not seqs:
        return Batch.empty(e.device)
    pos = positions.tolist()
    width = max(len(s.pages) for s in seqs)
    tables = torch.tensor([s.pages + [0] * (width - len(s.pages)) for s in seqs], dtype=torch.long)
    slots = [e.cache.slots(s.pages, p, p + 1)[0] for s, p in zip(seqs, pos)]
    return Batch(tokens, positions, [1] * len(seqs), pos, tables.to(e.device),
                 torch.tensor(slots, dtype=torch.long, device=e.device), plan=e.kb.plan_mla_decode())
