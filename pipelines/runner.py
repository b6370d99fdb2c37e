"""One rank's engine: the model, its paged cache, its batcher, and the step.

`step()` reads on one screen: schedule -> prepare -> forward -> sample -> postprocess.
An empty step still runs the forward (every MoE layer joins the unit's exchange).
Never: imports Ray. actors/rank.py wraps this in an actor; llm.py may run it in-process.
"""
from __future__ import annotations

import concurrent.futures
import logging

import torch

from epserve import kernels
from epserve.config import context_len
from epserve.messages import RankSpec, TokenDelta
from epserve.model.checkpoint import LoadOptions, TensorIndex, load_weights, read_config
from epserve.model.deepseek_v3 import Batch, DecodeBatch, ModelArgs, Transformer
from epserve.model.kv_cache import PagedKVCache
from epserve.model.mtp import build_mtp
from epserve.model.sampling import InvalidRequest, sample
from epserve.pipelines.batcher import Batcher, Step
from epserve.pipelines.block_table import BlockTable
from epserve.pipelines.cuda_graphs import DecodeGraphs, VerifyGraphs
from epserve.pipelines.kv_handoff import export_blocks, export_latents
from epserve.pipelines.mtp_decode import MTPDrafter, can_draft
from epserve.pipelines.overlap import forward_overlapped
from epserve.pipelines.kv_writer import BlockWriter
from epserve.pipelines.prefix_cache import PrefixCache, open_store
from epserve.pipelines.sampler_state import SamplerState
from epserve.pipelines.sequence import Sequence

log = logging.getLogger("epserve.runner")


def reference_name() -> str:
    return kernels.reference.__name__

# the config's dtype names -> the torch dtypes a rank computes in
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class RankEngine:
    def __init__(self, spec: RankSpec, dispatcher_factory, index: TensorIndex | None = None):
        self.spec = spec
        self.args: ModelArgs = read_config(spec.model_dir, spec.mtp_draft)   # with its MTP layer when drafting
        self.device = torch.device(spec.device)
        self.kb = kernels.get_backend(spec.kernels, self.device)
        self.dtype = DTYPES[spec.dtype]
        self.dispatcher = dispatcher_factory(self.kb, self.args)
        mtp = build_mtp(self.args, self.kb, self.dispatcher) if self.args.n_mtp_layers else None
        self.model = Transformer(self.args, self.kb, self.dispatcher, self.dtype, self.device, mtp)
        self.load_stats = load_weights(self.model, spec.model_dir, LoadOptions(self.dtype, spec.fp8_activations),
                                       index)
        self.cache = PagedKVCache(self.args.n_kv_layers, spec.kv_pages, spec.page_size, self.args.cache_dim,
                                  self.dtype, self.device)
        max_len = context_len(spec.max_model_len, self.args.max_position_embeddings)
        extra = 2 * spec.mtp_draft - 1 if spec.mtp_draft else 0
        self.batcher = Batcher(self.cache, spec.max_batch_tokens, spec.max_batch_size, max_len, extra)
        self.table = BlockTable(spec.max_batch_size, self.cache.pages_for(max_len + 1 + extra), self.cache.scratch_page,
                                self.device)
        self.drafter = MTPDrafter(self, spec.mtp_draft) if spec.mtp_draft else None
        self.dispatcher.counts = self.dispatcher.counts.to(self.device)
        self.graphs = DecodeGraphs(self.model, self.cache.kv, self.table, spec.page_size, spec.max_batch_size) \
            if self.graphs_supported() and not self.drafter else None
        if self.drafter is not None and self.graphs_supported():
            self.drafter.graphs = VerifyGraphs(self.drafter, self.cache.kv, spec.max_batch_size)
        self.last_step_tokens = 0
        store = open_store(spec.kv_store, spec.model_dir, self.args.n_kv_layers, self.args.cache_dim, self.dtype,
                           fp8_activations=spec.fp8_activations, mtp=bool(spec.mtp_draft),
                           index_dim=self.args.index_head_dim) if spec.kv_store else None
        # new blocks are written by a background thread, off the step that produced them
        self.prefix_cache = PrefixCache(store, BlockWriter(store)) if store is not None else None
        # Cached prefixes are read and verified off the step loop, so a long one does not stall
        # the unit's lockstep; the sequence joins the batcher when its load is done.
        self.loader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kv-load") \
            if self.prefix_cache else None
        self.loading: list[tuple[Sequence, concurrent.futures.Future]] = []
        self.sampler_state = SamplerState(spec.model_dir, self.args.vocab_size, self.args.eos_token_ids, self.device)

    def close(self) -> None:
        """Shutdown: the KV-store writes still queued are written."""
        if self.prefix_cache is not None:
            self.prefix_cache.close()

    def graphs_supported(self) -> bool:
        """CUDA graphs need CUDA, a backend that never syncs the host (not reference), and a
        dispatcher with a fixed-shape path (a one-rank unit; across ranks that is DeepEP's
        low-latency mode, not built yet)."""
        weight_only_fp8 = self.args.fp8_block is not None and not self.spec.fp8_activations   # experts take a host loop
        return (self.spec.cuda_graphs and self.device.type == "cuda" and self.kb.__name__ != reference_name()
                and getattr(self.dispatcher, "run_static", None) is not None and not weight_only_fp8)

    def on_placement_switched(self) -> None:
        """A new expert map: its routing tables are new tensors, so captured graphs are stale."""
        if self.graphs is not None:
            self.graphs.clear()
        if self.drafter is not None and self.drafter.graphs is not None:
            self.drafter.graphs.clear()

    @property
    def max_model_len(self) -> int:
        return self.batcher.max_model_len

    def validate_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InvalidRequest("prompt: must contain at least one token", "prompt")
        bad = [t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool)
               or not 0 <= t < self.args.vocab_size]
        if bad:
            raise InvalidRequest(f"prompt: token id {bad[0]!r} is outside the vocabulary [0, {self.args.vocab_size})",
                                 "prompt")

    def _admit_checks(self, seq: Sequence) -> None:
        self.validate_prompt(seq.prompt_ids)
        if not seq.eos_ids:
            seq.eos_ids = self.args.eos_token_ids

    def add(self, seq: Sequence) -> None:
        self._admit_checks(seq)
        if self.prefix_cache is None or not self.prefix_cache.may_hit(seq):
            self.batcher.add(seq)
            return
        self.batcher.check_fits(len(seq.prompt_ids), seq.params.max_tokens - len(seq.output_ids))
        self.loading.append((seq, self.loader.submit(self.prefix_cache.load_prefix, seq)))

    def _admit_loaded(self) -> None:
        """Queue the sequences whose cached prefix has been read (or failed: then a miss)."""
        still = []
        for seq, fut in self.loading:
            if not fut.done():
                still.append((seq, fut))
                continue
            try:
                cached = fut.result()
            except Exception as exc:             # the store already drops what it cannot read
                log.warning("KV-store load for %s failed (%r); computing the whole prompt", seq.request_id, exc)
                cached = None
            if cached is not None and self.batcher.add_with_prefix(seq, cached.to(self.device)):
                seq.n_cached = cached.shape[1]
            else:
                self.batcher.add(seq)
        self.loading = still

    def can_prefill(self) -> bool:
        return self.batcher.can_prefill() or any(f.done() for _, f in self.loading)

    def add_prefilled(self, seq: Sequence, latents: torch.Tensor) -> bool:
        """latents: the first n_tokens - 1 tokens' KV; or the whole prompt's for a choice of an n > 1 request
        that has produced nothing yet (it recomputes its last prompt token to sample its own first token)."""
        self._admit_checks(seq)
        if not seq.output_ids and latents.shape[1] == seq.n_tokens:
            latents = latents[:, :-1]
        if latents.shape[1] != seq.n_tokens - 1 or latents.shape[0] != self.args.n_kv_layers:
            raise ValueError(f"handed-off KV has shape {tuple(latents.shape)}; expected "
                             f"[{self.args.n_kv_layers}, {seq.n_tokens - 1}, {self.args.cache_dim}]")
        return self.batcher.add_prefilled(seq, latents.to(self.device))

    def abort(self, request_id: str) -> bool:
        self.sampler_state.release(request_id)
        for i, (seq, _) in enumerate(self.loading):
            if seq.request_id == request_id:
                del self.loading[i]          # its load finishes unused; it holds no pages yet
                return True
        return self.batcher.abort(request_id) is not None

    @property
    def has_work(self) -> bool:
        return self.batcher.n_requests > 0 or bool(self.loading)

    def step(self, schedule: str | None = None, decode_only: bool = False) -> list[TokenDelta]:
        """schedule: the unit's overlap schedule for this step (pipelines/overlap.py), None: one batch.
        decode_only: the unit agreed that no rank prefills in this step; a dispatcher whose kernels
        differ by kind of step (DeepEP: low-latency for decode) then holds back prefill here too,
        so every rank of the unit issues the same kernels."""
        if self.loading:
            if not self.batcher.n_requests:    # only loads pending: give them a moment rather than spin
                concurrent.futures.wait([f for _, f in self.loading], timeout=0.002,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            self._admit_loaded()
        agreed_phase = getattr(self.dispatcher, "needs_agreed_phase", False)
        low_latency = decode_only and agreed_phase
        step = self.batcher.schedule(allow_prefill=not low_latency)
        with self.dispatcher.step_mode(low_latency):
            if self.drafter is not None:
                return self.step_mtp(step, schedule, graphs_ok=low_latency or not agreed_phase)
            if not step.is_prefill and not step.is_empty:
                logits = self.decode(step, graphs_ok=low_latency or not agreed_phase, schedule=schedule)
            else:
                batch = self.prepare(step)
                self.last_step_tokens = batch.n_tokens
                if schedule is not None:
                    logits = forward_overlapped(self.model, batch, self.cache.kv, schedule)
                else:
                    logits = self.model.forward(batch, self.cache.kv)
        return self.postprocess(step, logits)

    def step_mtp(self, step: Step, schedule: str | None, graphs_ok: bool = True) -> list[TokenDelta]:
        """A step with the MTP module (pipelines/mtp_decode.py): verify-and-draft for decode steps;
        prefill steps sample the first token, then draft from the prompt."""
        if not step.is_prefill and not step.is_empty:
            self.last_step_tokens = len(step.seqs) * (1 + self.drafter.k)
            out, undo = self.drafter.decode(step.seqs, schedule, graphs_ok)
            return self.postprocess_verified(step, out, undo)
        batch = self.prepare(step)
        self.last_step_tokens = batch.n_tokens
        if schedule is not None:
            hn = forward_overlapped(self.model, batch, self.cache.kv, schedule, all_tokens=True)
            logits = self.model.head_logits(hn[batch.last_token_index] if batch.seq_new else hn[:0])
        else:
            logits, hn = self.model.forward(batch, self.cache.kv, with_hidden=True)
        if step.is_empty:
            self.drafter.empty_step()
            return []
        return self.postprocess(step, logits, lambda tokens: self.drafter.after_prefill(batch, hn, step.seqs, tokens))

    def postprocess_verified(self, step: Step, out, undo) -> list[TokenDelta]:
        """Append each sequence's emitted tokens up to a stop, roll back what was not used, trim pages."""
        deltas, used, plain, plain_tok = [], [], [], []
        for seq, emitted, infos in out:
            n = 0
            for tok, info in zip(emitted, infos):
                seq.n_computed += 1          # the position that produced tok was fed its input
                seq.append(tok, info)
                n += 1
                deltas.append(TokenDelta(seq.request_id, tok, info, seq.finish_reason, seq.n_cached))
                if seq.is_finished:
                    break
            used.append(n)
            if not can_draft(seq):
                plain.append(seq)
                plain_tok.append(emitted[0])
        self.drafter.rollback(undo, used)
        if plain:
            self.sampler_state.advance(plain, plain_tok)
        for seq in step.seqs:
            if seq.is_finished:
                seq.draft = []
                self._save_blocks(seq, None)
            else:
                self.table.truncate(seq, self.batcher.trim(seq))
        self.batcher.finish(step.seqs)
        return deltas

    def decode(self, step: Step, graphs_ok: bool = True, schedule: str | None = None) -> "torch.Tensor":
        """A pure decode step: (token, position, table row) per sequence, then one graph replay
        (or the same DecodeBatch forward eagerly; graphs_ok False: a DeepEP unit's normal-kernel step,
        whose exchange the graphs, captured with low-latency kernels, do not hold). schedule: the unit's
        overlap schedule, run on the DecodeBatch's two halves (pipelines/overlap.py split_decode), in
        a graph of its own. -> logits fp32 [B, vocab]."""
        seqs = step.seqs
        ids = [s.last_token for s in seqs]
        pos = [s.n_computed for s in seqs]
        rows = self.table.rows_for(seqs)
        self.last_step_tokens = len(seqs)
        if graphs_ok and self.graphs is not None and self.graphs.bucket(len(seqs)) is not None:
            return self.graphs.run(ids, pos, rows, schedule)
        dev = self.device
        t = torch.tensor([ids, pos, rows], dtype=torch.long).to(dev, non_blocking=True)
        batch = DecodeBatch.from_rows(t[0], t[1], t[2], self.table.tables, self.cache.page_size,
                                      self.table.scratch_row, self.kb.plan_mla_decode())
        if schedule is not None:
            return forward_overlapped(self.model, batch, self.cache.kv, schedule, static=self.static_moe)
        return self.model.forward(batch, self.cache.kv)

    @property
    def static_moe(self) -> bool:
        """The dispatcher has a fixed-shape MoE path (MoE.forward's test): overlapped decode takes it too."""
        return getattr(self.dispatcher, "run_static", None) is not None

    def prepare(self, step: Step) -> Batch:
        if step.is_empty:
            return Batch.empty(self.device)
        ids, pos, slots = [], [], []
        for seq, n in zip(step.seqs, step.n_new):
            start = seq.n_computed
            ids += seq.token_slice(start, start + n)
            pos += range(start, start + n)
            slots += self.cache.slots(seq.pages, start, start + n)
        width = max(len(s.pages) for s in step.seqs)
        tables = torch.tensor([s.pages + [0] * (width - len(s.pages)) for s in step.seqs], dtype=torch.long)
        return Batch(torch.tensor(ids, dtype=torch.long, device=self.device),
                     torch.tensor(pos, dtype=torch.long, device=self.device),
                     list(step.n_new), [s.n_computed for s in step.seqs], tables.to(self.device),
                     torch.tensor(slots, dtype=torch.long, device=self.device), plan=self.kb.plan_mla_decode())

    def postprocess(self, step: Step, logits: torch.Tensor, after_sample=None) -> list[TokenDelta]:
        """after_sample(tokens): runs once the step's tokens are drawn, before any KV leaves the rank
        (the MTP module drafts from the prompt there)."""
        if step.is_empty:
            return []
        adjust = self.sampler_state.prepare(step.seqs)
        tokens, infos = sample(logits, [s.params for s in step.seqs], [len(s.output_ids) for s in step.seqs], adjust)
        if after_sample is not None:
            after_sample(tokens)
        deltas = []
        for seq, n, tok, info in zip(step.seqs, step.n_new, tokens, infos):
            seq.n_computed += n
            seq.append(tok, info)
            delta = TokenDelta(seq.request_id, tok, info, seq.finish_reason, seq.n_cached)
            if self.spec.role == "prefill" and (not seq.is_finished or seq.share_kv):
                # n > 1 (share_kv): every choice pulls the same latents, so they go by the object store
                delta.kv_blocks = export_blocks(self.cache, seq, self.spec.block_tokens) \
                    if self.spec.kv_handoff == "object" or seq.share_kv else export_latents(self.cache, seq)
                delta.draft = list(seq.draft) or None
                if not seq.is_finished:
                    seq.finish_reason = delta.finish_reason = "handoff"
            self._save_blocks(seq, delta.kv_blocks if isinstance(delta.kv_blocks, list) else None)
            deltas.append(delta)
        self.sampler_state.advance(step.seqs, tokens)
        self.batcher.finish(step.seqs)
        return deltas

    def _save_blocks(self, seq: Sequence, exported: list | None) -> None:
        """Prompt blocks after the first token (not on decode ranks: prefill wrote them); all full
        blocks when a sequence ends here, so the next turn of a chat hits. `exported`: the
        handoff's blocks, reused so the prompt's latents leave the cache once."""
        pc, bt = self.prefix_cache, self.spec.block_tokens
        if pc is None:
            return
        if len(seq.output_ids) == 1 and self.spec.role != "decode":
            pc.save(seq, self.cache, len(seq.prompt_ids), skip_blocks=seq.n_cached // bt, blocks=exported)
        if seq.is_finished and self.spec.role != "prefill":
            pc.save(seq, self.cache, seq.n_computed, skip_blocks=len(seq.prompt_ids) // bt)
