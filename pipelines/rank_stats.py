"""What one rank's engine tells admission: its RankStats now (messages.py has the fields' meaning).

Pure: reads the engine's batcher, paged cache, KV-store loads in flight, KV-store writer counters and
MTP drafter; no Ray, no clock. actors/rank.py calls it after every step and sends the result in its reports.
"""
from __future__ import annotations

from epserve.messages import RankStats
from epserve.placement.prefill_balancer import attn_work


def engine_stats(engine, unit: int, rank: int) -> RankStats:
    """`engine` is a pipelines/runner.RankEngine. Pending work counts the waiting requests and
    those whose cached prefix is still loading; MTP counters are zero without a drafter."""
    b, cache = engine.batcher, engine.cache
    pending = list(b.waiting) + [s for s, _ in engine.loading]
    return RankStats(
        unit=unit, rank=rank, n_running=len(b.running), n_waiting=len(pending),
        pending_prefill_tokens=sum(s.n_tokens - s.n_computed for s in pending),
        pending_attn_work=float(sum(attn_work(s.n_tokens - s.n_computed, s.n_computed) for s in pending)),
        kv_blocks_used=cache.n_used, kv_blocks_total=cache.n_pages, **_mtp_stats(engine.drafter),
        **_kv_write_stats(engine.prefix_cache))


def _kv_write_stats(prefix_cache) -> dict:
    if prefix_cache is None or prefix_cache.writer is None:
        return {}
    blocks, n_bytes = prefix_cache.writer.outcomes()
    return {"kv_store_write_blocks": blocks, "kv_store_write_bytes": n_bytes}


def _mtp_stats(drafter) -> dict:
    if drafter is None:
        return {}
    c = drafter.counters
    return {"mtp_proposed": c.proposed, "mtp_accepted": c.accepted, "mtp_sequence_steps": c.sequence_steps,
            "mtp_emitted": c.emitted}
