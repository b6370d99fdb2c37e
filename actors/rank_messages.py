"""What crosses between a rank actor and its unit's supervisor or stream sinks (small dataclasses, no tensors).

UnitLayout says where a rank sits in its unit; Delivery is a rank's push to one stream sink
(the token deltas of that sink's requests, as columns); RankReport is a rank's state for its
supervisor (stats and counters, at a bounded rate). The benchmarks' driven step has its own
messages (actors/driven_step.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from epserve.messages import RankStats
from epserve.pipelines.runner import TokenDelta


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


@dataclass
class RankReport:
    """What a rank tells its supervisor (lifecycle, admission stats, placement switches), at most
    every report_every(world) while it steps (actors/rank.py) and at once on a switch or before it parks."""

    rank: int
    generation: int
    seq: int                           # report counter: the supervisor keeps the newest
    stats: RankStats
    n_steps: int
    map_version: int
    switched_at: dict[int, int]
    schedule_steps: dict[str, int]
    split_pays: dict[str, bool]
    timing: dict[str, float]           # seconds summed over the loop's steps: total, agree, step, inbox, push
    n_tokens: int = 0                  # tokens produced since the last report (a rebuild loop resets on any)
    n_pushes: int = 0                  # pushes to sinks so far in this loop (all sinks)


@dataclass(frozen=True)
class UnitLayout:
    unit: int
    rank: int
    world: int
    gpus_per_node: int
    fp8_dispatch: bool = False
