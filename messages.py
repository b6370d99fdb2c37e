"""Small dataclasses that cross actor boundaries.

Metadata only: hidden states and KV tensors never travel in these messages
(they move rank to rank through collectives or the KV handoff).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankRef:
    """One DP rank of one unit: the address the balancers decide."""

    unit: int
    rank: int


@dataclass(frozen=True)
class RankStats:
    """Live load of one DP rank, as reported by the rank and read by the balancers.

    pending_prefill_tokens: uncached input tokens queued or running (dispatch send volume).
    pending_attn_work: sum over queued prompts of new_tokens * (cached + new_tokens / 2),
        i.e. core-attention pairs still to compute; cached tokens cost none themselves.
    kv_blocks_used / kv_blocks_total: 64-token pages of the rank's paged latent cache.
    """

    unit: int
    rank: int
    n_running: int = 0
    n_waiting: int = 0
    pending_prefill_tokens: int = 0
    pending_attn_work: float = 0.0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    is_alive: bool = True
    is_draining: bool = False
    mtp_proposed: int = 0          # MTP drafts verified since the rank started (0 with MTP off)
    mtp_accepted: int = 0
    mtp_sequence_steps: int = 0    # (sequence, verify step) pairs; emitted / this = tokens per step
    mtp_emitted: int = 0

    @property
    def ref(self) -> RankRef:
        return RankRef(self.unit, self.rank)

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used

    @property
    def n_requests(self) -> int:
        return self.n_running + self.n_waiting


@dataclass
class Usage:
    """Token counts of one request, with DeepSeek's API names."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_cache_hit_tokens: int = 0
    reasoning_tokens: int | None = None     # reasoning models: completion tokens up to and including </think>

    @property
    def prompt_cache_miss_tokens(self) -> int:
        return self.prompt_tokens - self.prompt_cache_hit_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        out = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_cache_hit_tokens": self.prompt_cache_hit_tokens,
            "prompt_cache_miss_tokens": self.prompt_cache_miss_tokens,
        }
        if self.reasoning_tokens is not None:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


@dataclass
class RequestOutput:
    """What LLM.generate returns per prompt."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str | None = None
    logprobs: list[dict] | None = None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
