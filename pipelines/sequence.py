"""A request as one rank sees it: tokens, pages, sampling state, and how it ends.

Small on purpose: it crosses actor boundaries when a unit restarts (prompt plus the
tokens already produced is all a new rank needs to continue it), with the handle of the
stream sink its tokens go to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from epserve.model.sampling import SamplingParams


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    eos_ids: tuple[int, ...] = ()
    pages: list[int] = field(default_factory=list)
    n_computed: int = 0            # tokens whose latents are in this rank's cache
    n_cached: int = 0              # prompt tokens that came from the KV store (billed as hits)
    finish_reason: str | None = None
    logprobs: list[dict] = field(default_factory=list)
    kv_blocks: object = None       # handed-off prompt latents: object refs or a KvTicket in flight (kv_handoff.py)
    tenant: str | None = None      # KV-store namespace; None: this request neither reads nor writes the store
    kv_group: str | None = None    # decode rank, n > 1: the choices of one request share their prompt's full KV pages
    share_kv: bool = False         # prefill role, n > 1: hand the prompt's KV off even if this choice ends at its
                                   # first token (the request's other choices decode from it)
    draft: list[int] = field(default_factory=list)   # MTP: tokens proposed to follow last_token, verified next step
    draft_q: object = None         # MTP, sampled requests: the distributions [k, V] the drafts were drawn from
    sink: object = None            # the stream sink (actor handle) its deltas go to; the rank takes it off on
                                   # arrival, so nothing per step carries it

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def last_token(self) -> int:
        """The newest token: a decode step's input."""
        return self.output_ids[-1] if self.output_ids else self.prompt_ids[-1]

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building the whole list (decode reads one token of a long context)."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:] + self.output_ids[:end - n]

    @property
    def n_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: dict | None) -> None:
        """Record a sampled token and decide whether the sequence ends here."""
        self.output_ids.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        p = self.params
        if not p.ignore_eos and token in self.eos_ids:
            self.finish_reason = "stop"
        elif token in p.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"

    def reset_for_recompute(self) -> None:
        """Forget cache state (preempted, or moved to a rebuilt unit): prompt + outputs are recomputed."""
        self.pages = []
        self.n_computed = 0
        self.kv_blocks = None
        self.draft, self.draft_q = [], None
