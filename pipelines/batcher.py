"""Per-rank admission: waiting and running sequences, token budget, KV pages, preemption.

A plain state machine with no model and no Ray: `schedule()` decides what the next
forward step computes; the runner executes it. Policy (nano-vllm's): prefill waiting
sequences first while their prompts fit the token budget and the free pages;
otherwise one decode token for every running sequence. When a decode step runs out
of pages, the newest running sequence is preempted and recomputed later.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from epserve.config import check_context
from epserve.errors import RequestTooLarge
from epserve.model.kv_cache import PagedKVCache
from epserve.pipelines.sequence import Sequence


@dataclass
class Step:
    """What one forward step computes: sequences and how many new tokens each feeds."""

    seqs: list[Sequence]
    n_new: list[int]
    is_prefill: bool

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Batcher:
    def __init__(self, cache: PagedKVCache, max_batch_tokens: int, max_batch_size: int, max_model_len: int,
                 extra_tokens: int = 0):
        self.cache = cache
        # positions past a sequence's last token a step may write (MTP: its drafts and the chained
        # module's look-ahead, 2k - 1); their pages are reserved before the step, trimmed after it
        self.extra_tokens = extra_tokens
        self.max_batch_tokens, self.max_batch_size, self.max_model_len = max_batch_tokens, max_batch_size, max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.kv_groups: dict[str, tuple[list[int], set[int]]] = {}   # group -> (shared full pages, members)

    @property
    def n_requests(self) -> int:
        return len(self.waiting) + len(self.running)

    def check_fits(self, n_prompt: int, max_tokens: int) -> None:
        """ContextTooLong past the model's context, RequestTooLarge past this rank's whole KV pool."""
        check_context(n_prompt, self.max_model_len, max_tokens)
        total = n_prompt + max_tokens
        need = self.cache.pages_for(total + self.extra_tokens)      # + the drafts' look-ahead (MTP)
        if need > self.cache.n_pages:
            raise RequestTooLarge(f"{total} tokens need {need} KV pages; this rank has {self.cache.n_pages}")

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_ids), seq.params.max_tokens - len(seq.output_ids))
        self.waiting.append(seq)

    def add_with_prefix(self, seq: Sequence, latents) -> bool:
        """Queue a prompt whose first latents.shape[1] tokens came from the KV store.

        Pages for the whole prompt are taken now and the cached part written in; the
        rest is computed when the sequence is scheduled. False: no pages now (the caller
        queues it uncached instead).
        """
        self.check_fits(len(seq.prompt_ids), seq.params.max_tokens - len(seq.output_ids))
        if not self._place(seq, latents):
            return False
        self.waiting.append(seq)
        return True

    def add_prefilled(self, seq: Sequence, latents) -> bool:
        """Admit a sequence whose first len(latents) tokens were computed elsewhere (KV handoff).

        Writes the latents into fresh pages and starts decoding at once. Returns False (and
        queues the sequence for recompute instead) when this rank has no pages for it now.
        """
        self.check_fits(len(seq.prompt_ids), seq.params.max_tokens - len(seq.output_ids))
        if len(self.running) >= self.max_batch_size or not self._place(seq, latents):
            seq.reset_for_recompute()
            self.waiting.append(seq)
            return False
        self.running.append(seq)
        return True

    def _place(self, seq: Sequence, latents) -> bool:
        """Pages for the whole sequence with its first latents.shape[1] tokens written in (False: no room).

        Sequences of one kv_group (the n choices of one request) hold the same prompt KV: the
        group's full pages are shared (each member only reads them; it writes from its own
        position on, which lies past them), and only the rest is allocated and written per member.
        """
        page, n_lat = self.cache.page_size, latents.shape[1]
        group = self.kv_groups.get(seq.kv_group) if seq.kv_group else None
        shared = group[0][: n_lat // page] if group else []
        need = self.cache.pages_for(seq.n_tokens + 1) - len(shared)
        if need > self.cache.n_free:
            return False
        self.cache.retain(shared)
        seq.pages = shared + self.cache.allocate(need)
        self.cache.write_tokens(seq.pages, len(shared) * page, latents[:, len(shared) * page:])
        seq.n_computed = n_lat
        if seq.kv_group:
            if group is None:                       # the group holds its full pages while a member lives
                full = seq.pages[: n_lat // page]
                self.cache.retain(full)
                group = self.kv_groups[seq.kv_group] = (full, set())
            group[1].add(id(seq))
        return True

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self.release(seq)                    # a cached prefix holds pages while it waits
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                self.release(seq)
                return seq
        return None

    def release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        self.cache.free(seq.pages)
        seq.pages = []
        group = self.kv_groups.get(seq.kv_group) if seq.kv_group else None
        if group is not None and id(seq) in group[1]:
            group[1].discard(id(seq))
            if not group[1]:                        # the last member left: the shared pages go back
                self.cache.free(group[0])
                del self.kv_groups[seq.kv_group]

    def schedule(self, allow_prefill: bool = True) -> Step:
        step = self._schedule_prefill() if allow_prefill else Step([], [], is_prefill=True)
        return step if not step.is_empty else self._schedule_decode()

    def can_prefill(self) -> bool:
        """Whether the next schedule() would run a prefill step (its first admission check)."""
        if not self.waiting or len(self.running) >= self.max_batch_size:
            return False
        seq = self.waiting[0]
        return self.cache.pages_for(seq.n_tokens + max(1, self.extra_tokens)) - len(seq.pages) <= self.cache.n_free

    def _schedule_prefill(self) -> Step:
        seqs, n_new, budget = [], [], self.max_batch_tokens
        while self.waiting and len(self.running) + len(seqs) < self.max_batch_size:
            seq = self.waiting[0]
            todo = seq.n_tokens - seq.n_computed
            need = self.cache.pages_for(seq.n_tokens + max(1, self.extra_tokens)) - len(seq.pages)
            if (todo > budget and seqs) or need > self.cache.n_free:
                break
            self.waiting.popleft()
            seq.pages += self.cache.allocate(need)
            seqs.append(seq)
            n_new.append(todo)
            budget -= todo
        self.running += seqs
        return Step(seqs, n_new, is_prefill=True)

    def _schedule_decode(self) -> Step:
        for seq in list(self.running):
            while self.cache.pages_for(seq.n_tokens + self.extra_tokens) > len(seq.pages):
                if self.cache.n_free:
                    seq.pages += self.cache.allocate(1)
                else:
                    victim = self.running[-1]
                    self.preempt(victim)
                    if victim is seq:
                        break
        return Step(list(self.running), [1] * len(self.running), is_prefill=False)

    def trim(self, seq: Sequence) -> int:
        """Return pages past the sequence's computed tokens (reserved for drafts a step rejected): it
        then holds what it would hold had it never drafted. -> pages kept."""
        keep = max(self.cache.pages_for(seq.n_computed), 1)
        if len(seq.pages) > keep:
            self.cache.free(seq.pages[keep:])
            del seq.pages[keep:]
        return len(seq.pages)

    def preempt(self, seq: Sequence) -> None:
        self.release(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)

    def finish(self, seqs: list[Sequence]) -> list[Sequence]:
        """Release pages of sequences that ended in the last step; returns them."""
        done = [s for s in seqs if s.is_finished]
        for s in done:
            self.release(s)
        return done
