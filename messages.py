"""The vocabulary that crosses rooms: small dataclasses that serve/, actors/, pipelines/, llm.py and the
benchmarks all speak.

What a rank is built from (RankSpec, KVStoreSpec), what it sends back (TokenDelta, packed as Deltas
inside a Delivery to a stream sink), what a stream sink answers for a request run to its end
(RequestResult: the prefill answer too), and the load and usage the balancers and callers read.
Metadata only: hidden states and KV tensors never travel in these messages (they move rank to rank
through collectives or the KV handoff; `kv_blocks` carries object refs or a ticket, not pages).
Never: imports anything of epserve (this is the ground floor every other folder stands on) or torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class KVStoreSpec:
    """What a rank (or the ingress) needs to open the shared on-disk KV store (fleet/kv_store.py)."""

    root: str
    capacity_bytes: int
    block_tokens: int = 64
    shared_namespace: str | None = None


@dataclass(frozen=True)
class RankSpec:
    """Everything a rank needs to build itself (pipelines/runner.py's RankEngine); crosses the actor boundary."""

    model_dir: str
    dtype: str = "float32"
    kernels: str = "auto"
    device: str = "cpu"
    kv_pages: int = 256
    page_size: int = 64
    max_batch_tokens: int = 16384
    max_batch_size: int = 128
    max_model_len: int | None = None
    fp8_activations: bool = False
    role: str = "both"          # both | prefill (hand the KV off after the first token) | decode
    block_tokens: int = 64
    kv_store: KVStoreSpec | None = None   # on-disk context cache shared by all ranks (None: off)
    overlap: str = "off"        # on | off | auto (measured): the unit's two-micro-batch schedules
    latency_s: float = 0.0      # injected per-exchange latency (to measure overlap on loopback)
    bandwidth: float = 0.0      # injected exchange bandwidth, bytes/s (0: unlimited)
    exit_before_step: tuple[int, int] | None = None   # tests: (rank, n): that rank's process exits after
                                # agreeing to its n-th step and before running it, in the unit's first build
    cuda_graphs: bool = True    # replay decode steps as CUDA graphs where the backend and dispatcher allow
    mtp_draft: int = 0          # MTP drafts per sequence per step (0: off; the checkpoint must carry the module)
    ep_dispatch: str = "auto"   # auto | deepep | all_to_all: a multi-rank unit's exchange (model/ep_select.py);
                                # emulated: a one-rank unit as one rank of an EP unit (model/ep_emulate.py)
    ep_emulate: dict | None = None   # emulated: the `ep_emulate:` section (ranks, top_k, experts, groups, skew, seed, hold)
    kv_handoff: str = "auto"    # auto | collective | object: prefill -> decode transport (pipelines/kv_handoff.py)
    exit_in_reform: int | None = None   # tests: the rank of this index exits inside its first re-forming
                                # (elastic: a death during the membership change itself)
    exit_in_switch: int | None = None   # tests: the rank of this index exits at its first agreed placement
                                # switch, staged and not yet switched (elastic: a death during an EPLB switch)
    elastic: bool = False       # the unit goes on without a dead rank (config `elastic`, actors/unit_elastic.py):
                                # the rank's groups are standalone backends it can re-form


@dataclass
class TokenDelta:
    """One sampled token of one request, sent back toward the caller."""

    request_id: str
    token_id: int
    logprob: dict | None
    finish_reason: str | None
    n_cached: int = 0
    kv_blocks: object = None        # prefill role: the prompt's latents for the decode rank: CPU blocks (object
                                    # handoff) or one device tensor (collective), then refs or a ticket
    draft: list | None = None       # prefill role with MTP: the first drafts, handed over with the KV


@dataclass
class Deltas:
    """A step's token deltas as columns: a few lists pickle far faster than one object per token
    (the push is on the rank's step path; the sink rebuilds the objects off it)."""

    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    n_cached: list[int] = field(default_factory=list)
    logprobs: dict[int, dict] = field(default_factory=dict)       # index -> info, only where asked
    kv_blocks: dict[int, list] = field(default_factory=dict)      # index -> object refs (prefill role)
    drafts: dict[int, list] = field(default_factory=dict)         # index -> MTP drafts handed over (prefill role)

    @classmethod
    def pack(cls, deltas: list[TokenDelta]) -> "Deltas":
        return cls([d.request_id for d in deltas], [d.token_id for d in deltas], [d.finish_reason for d in deltas],
                   [d.n_cached for d in deltas], {i: d.logprob for i, d in enumerate(deltas) if d.logprob is not None},
                   {i: d.kv_blocks for i, d in enumerate(deltas) if d.kv_blocks is not None},
                   {i: d.draft for i, d in enumerate(deltas) if d.draft})

    def unpack(self) -> list[TokenDelta]:
        return [TokenDelta(rid, tok, self.logprobs.get(i), fin, nc, self.kv_blocks.get(i), self.drafts.get(i))
                for i, (rid, tok, fin, nc) in enumerate(zip(self.request_ids, self.token_ids, self.finish_reasons,
                                                            self.n_cached))]

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass
class Delivery:
    """What a rank pushes to one stream sink (actors/stream_sink.py): that sink's requests' deltas
    and rejections since the last push. Ordered per (unit, rank, generation) by `seq`."""

    unit: str                          # the unit's key: its supervisor's actor id
    rank: int
    deltas: Deltas
    rejected: list[tuple[str, Exception]]    # (request_id, its typed error: epserve.errors, pickled as is)
    seq: int = 0                       # this rank's push counter for this sink: the sink applies pushes in order
    generation: int = 0                # the unit build that started this loop (older ones are stale)


@dataclass(frozen=True)
class RequestResult:
    """A request a stream sink ran to its end (`generate`), or to its first token (`prefill`: the
    prefill answer, whose kv_blocks and draft the decode rank's Sequence takes over).

    A request that failed has `error` set (and nothing else but request_id): its typed error from
    epserve.errors, a RequestError when the request itself was bad (too long, bad token ids), a
    UnitFailure or Unavailable when its unit failed it; callers raise it as it is.
    ttft_s: submit to first token; decode_s: first token to the end (seconds).
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "handoff" (prefill role) ...
    n_cached: int = 0                  # prompt tokens served from the KV store (billed as cache hits)
    kv_blocks: object = None           # prefill role: object refs of the KV blocks, or a KvTicket
    draft: list | None = None          # prefill role with MTP: the first drafts, handed over with the KV
    ttft_s: float = 0.0
    decode_s: float = 0.0
    error: Exception | None = None
    text: str | None = None            # generate with a tokenizer: the text, cut before the stop string that ended it


@dataclass(frozen=True)
class RankRef:
    """One DP rank of one unit: the address the balancers decide."""

    unit: int
    rank: int


# What became of the KV-store blocks a rank handed to its background writer (pipelines/kv_writer.py):
# written (a new file), skipped (the block was on disk already, or the store had paused writes after a
# disk error), dropped (the writer's queue was full or closed), failed (the write raised).
KV_WRITE_OUTCOMES = ("written", "skipped", "refused", "dropped", "failed")


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
    kv_store_write_blocks: tuple[int, ...] = ()   # per KV_WRITE_OUTCOMES, since the rank started; () no writer
    kv_store_write_bytes: tuple[int, ...] = ()    # the same in latent bytes (a block: n_layers x 64 x kv_dim)

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
