"""What the sampler needs to remember per request on this rank: produced-token counts (penalties)
and grammar matchers (constrained decoding); `prepare` turns them into one step's LogitAdjust.

Rebuilt, never shipped: a request that arrives here (new, handed off, or resubmitted after a unit
restart with the tokens it already produced) gets its counts from its token ids and a fresh
matcher that replays its produced tokens, so its state is the same on any rank.

Off the critical path: after a step samples, `advance` queues one job on a background thread that
feeds each constrained request its token and computes its next mask (llguidance releases the GIL),
while the rank runs its next forward; the next `prepare` waits for that job, so a step pays only
for what the forward did not hide. Requests with no penalty, bias or grammar cost nothing: a
step where none has any builds no LogitAdjust.
Never: samples, or changes a Sequence (the runner does).
"""
from __future__ import annotations

import concurrent.futures
import logging

import torch

from epserve.model.grammar import GrammarCache, load_lltokenizer
from epserve.model.logit_adjust import LogitAdjust
from epserve.model.tokenizer import tokenizer_json
from epserve.pipelines.sequence import Sequence

log = logging.getLogger("epserve.sampler_state")


class Rows:
    """A growing pool of tensor rows, one per request id."""

    def __init__(self, width: int, dtype, device, n: int = 8):
        self.data = torch.zeros(n, width, dtype=dtype, device=device)
        self.of: dict[str, int] = {}
        self.free = list(range(n - 1, -1, -1))

    def take(self, rid: str) -> tuple[int, bool]:
        """(row, is_new) for rid; a new row is zeroed."""
        if rid in self.of:
            return self.of[rid], False
        if not self.free:
            n = self.data.shape[0]
            self.data = torch.cat([self.data, torch.zeros_like(self.data)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        row = self.free.pop()
        self.data[row].zero_()
        self.of[rid] = row
        return row, True

    def release(self, rid: str) -> None:
        row = self.of.pop(rid, None)
        if row is not None:
            self.free.append(row)


class SamplerState:
    def __init__(self, model_dir: str, n_vocab: int, eos_ids: tuple[int, ...], device):
        self.model_dir, self.n_vocab, self.eos_ids, self.device = model_dir, n_vocab, eos_ids, device
        self.counts: Rows | None = None         # [R, V] int32 produced-token counts, penalised requests
        self.in_prompt: Rows | None = None      # [R, V] bool prompt tokens (repetition penalty)
        self.bits: Rows | None = None           # [R, ceil(V / 32)] int32 next-token masks, host memory
        self.matchers: dict[str, object] = {}
        self.grammar_on: dict[str, bool] = {}   # requests whose grammar waits for grammar_after: started yet?
        self._grammars: GrammarCache | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.pending: concurrent.futures.Future | None = None

    @property
    def grammars(self) -> GrammarCache:
        if self._grammars is None:
            text = tokenizer_json(self.model_dir)
            self._grammars = GrammarCache(load_lltokenizer(text, self.n_vocab, self.eos_ids))
        return self._grammars

    def _wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    # ---- per request ----------------------------------------------------------------------
    def _penalty_row(self, seq: Sequence) -> int:
        if self.counts is None:
            self.counts = Rows(self.n_vocab, torch.int32, self.device)
            self.in_prompt = Rows(self.n_vocab, torch.bool, self.device)
        row, new = self.counts.take(seq.request_id)
        self.in_prompt.take(seq.request_id)
        if new:                                  # rebuilt from the token ids: the same on any rank
            dev = self.device
            if seq.output_ids:
                out = torch.tensor(seq.output_ids, dtype=torch.long, device=dev)
                self.counts.data[row].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
            self.in_prompt.data[row, torch.tensor(seq.prompt_ids, dtype=torch.long, device=dev)] = True
        return row

    def _constrained_now(self, seq: Sequence) -> bool:
        """Whether seq's grammar applies to its next token: always, or (grammar_after, a reasoning
        model's </think>) once that token is among its outputs; looked up once per request, then
        kept current by advance()."""
        after = seq.params.grammar_after
        if after is None:
            return True
        on = self.grammar_on.get(seq.request_id)
        if on is None:
            on = self.grammar_on[seq.request_id] = after in seq.output_ids
        return on

    def _mask_row(self, seq: Sequence) -> int:
        import llguidance.torch as lt
        if self.bits is None:
            self.bits = Rows((self.n_vocab + 31) // 32, torch.int32, "cpu")
        row, new = self.bits.take(seq.request_id)
        if new:                                  # a fresh matcher replays what the request produced
            m = self.grammars.matcher(seq.params.grammar)
            out = list(seq.output_ids)
            if seq.params.grammar_after is not None:     # ... after the token its grammar starts behind
                out = out[out.index(seq.params.grammar_after) + 1:]
            if out and not m.consume_tokens(out):
                log.warning("%s: its produced tokens do not replay in its grammar: %s", seq.request_id,
                            m.get_error())
            self.matchers[seq.request_id] = m
            lt.fill_next_token_bitmask(m, self.bits.data, row)
        return row

    def release(self, request_id: str) -> None:
        """Forget a finished or aborted request (after the background job that may use its row)."""
        self._wait()
        for rows in (self.counts, self.in_prompt, self.bits):
            if rows is not None:
                rows.release(request_id)
        self.matchers.pop(request_id, None)
        self.grammar_on.pop(request_id, None)

    # ---- per step ---------------------------------------------------------------------------
    def prepare(self, seqs: list[Sequence]) -> LogitAdjust | None:
        """The step's LogitAdjust for `seqs` (the batch's rows, in order), or None if no row needs one."""
        self._wait()
        pen = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        bias = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        masked = [i for i, s in enumerate(seqs) if s.params.grammar is not None and self._constrained_now(s)]
        if not (pen or bias or masked):
            return None
        dev, adj = self.device, LogitAdjust()
        if pen:
            rows = torch.tensor([self._penalty_row(seqs[i]) for i in pen], dtype=torch.long, device=dev)
            p = [seqs[i].params for i in pen]
            adj.pen_rows = torch.tensor(pen, dtype=torch.long, device=dev)
            adj.counts, adj.in_prompt = self.counts.data[rows], self.in_prompt.data[rows]
            adj.presence = torch.tensor([x.presence_penalty for x in p], device=dev)
            adj.frequency = torch.tensor([x.frequency_penalty for x in p], device=dev)
            adj.repetition = torch.tensor([x.repetition_penalty for x in p], device=dev)
        if bias:
            pairs = [(i, t, b) for i in bias for t, b in seqs[i].params.logit_bias if t < self.n_vocab]
            r, t, b = zip(*pairs) if pairs else ((), (), ())
            adj.bias_rows = torch.tensor(r, dtype=torch.long, device=dev)
            adj.bias_ids = torch.tensor(t, dtype=torch.long, device=dev)
            adj.bias_values = torch.tensor(b, dtype=torch.float32, device=dev)
        if masked:
            rows = torch.tensor([self._mask_row(seqs[i]) for i in masked], dtype=torch.long)
            adj.mask_rows = torch.tensor(masked, dtype=torch.long, device=dev)
            adj.mask_bits = self.bits.data[rows].to(dev, non_blocking=True)
        return adj

    def advance(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """After a step sampled `tokens` for `seqs`: count them, and feed the matchers and compute
        their next masks in the background (the next `prepare` waits for it)."""
        pen = [(self.counts.of[s.request_id], t) for s, t in zip(seqs, tokens)
               if s.params.has_penalties and self.counts is not None and s.request_id in self.counts.of]
        if pen:
            rows, toks = zip(*pen)
            idx = (torch.tensor(rows, dtype=torch.long, device=self.device),
                   torch.tensor(toks, dtype=torch.long, device=self.device))
            self.counts.data.index_put_(idx, torch.ones(len(rows), dtype=torch.int32, device=self.device),
                                        accumulate=True)
        for s, t in zip(seqs, tokens):
            if s.params.grammar_after == t:      # its grammar applies from the next token on
                self.grammar_on[s.request_id] = True
            if s.is_finished:
                self.release(s.request_id)
        work = [(self.matchers[s.request_id], self.bits.of[s.request_id], t, s.request_id)
                for s, t in zip(seqs, tokens) if s.request_id in self.matchers]
        if work:
            self.pending = self.pool.submit(self._feed, work, self.bits.data)

    @staticmethod
    def _feed(work, bits: torch.Tensor) -> None:
        import llguidance.torch as lt
        for m, row, tok, rid in work:
            if not m.consume_token(tok):
                log.warning("%s: token %d is outside its grammar: %s", rid, tok, m.get_error())
            lt.fill_next_token_bitmask(m, bits, row)
