"""KV-store writes off the step loop (pipelines/kv_writer.py through RankEngine): a request finishes
while its blocks are still queued; the next request on the rank waits for them on the loader thread
and hits; a failing write is counted and logged and loses no request; the queue is bounded; close
writes what is queued."""
from __future__ import annotations

import logging
import threading

import torch

from conftest import prompts_of
from epserve.fleet.kv_store import KVStore
from epserve.messages import KVStoreSpec
from epserve.model.sampling import SamplingParams
from epserve.pipelines.kv_writer import BlockWriter
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


def _engine(tiny_dir, tmp_path):
    return make_local_engine(tiny_dir, kv_pages=64, kv_store=KVStoreSpec(str(tmp_path / "kv"), 1 << 30))


def _run(engine, seq):
    engine.add(seq)
    while engine.has_work:
        engine.step()


def _gate_writes(store, monkeypatch, fail: bool = False) -> threading.Event:
    """The store's writes wait for the returned event (and then raise, if fail)."""
    gate, real = threading.Event(), store.save_many

    def slow(keys, blocks):
        gate.wait(60)
        if fail:
            raise RuntimeError("disk on fire")
        return real(keys, blocks)
    monkeypatch.setattr(store, "save_many", slow)
    return gate


def test_a_prefix_written_in_the_background_is_hit_by_the_next_request(tiny_dir, tmp_path, monkeypatch):
    engine = _engine(tiny_dir, tmp_path)
    pc = engine.prefix_cache
    gate = _gate_writes(pc.store, monkeypatch)
    prompt = prompts_of([200], seed=8)[0]
    cold = Sequence("cold", prompt, GREEDY, tenant="t")
    _run(engine, cold)                                   # finishes while its write waits on the gate
    assert len(cold.output_ids) == 5 and pc.writer.stats["submitted"] >= 1
    assert pc.store.lookup(pc.store.block_keys(prompt, "t")) == 0       # nothing on disk yet
    warm = Sequence("warm", prompt, GREEDY, tenant="t")
    engine.add(warm)
    for _ in range(3):
        engine.step()
    assert not warm.output_ids                           # its load waits for this rank's queued write
    gate.set()
    while engine.has_work:
        engine.step()
    assert warm.n_cached == 192 and warm.output_ids == cold.output_ids    # 3 full blocks of 200 tokens
    assert pc.writer.stats["blocks_written"] >= 3 and pc.writer.stats["errors"] == 0
    engine.close()


def test_a_failed_write_loses_no_request(tiny_dir, tmp_path, monkeypatch, caplog):
    engine = _engine(tiny_dir, tmp_path)
    pc = engine.prefix_cache
    gate = _gate_writes(pc.store, monkeypatch, fail=True)
    gate.set()
    prompt = prompts_of([200], seed=9)[0]
    first, second = Sequence("a", prompt, GREEDY, tenant="t"), Sequence("b", prompt, GREEDY, tenant="t")
    with caplog.at_level(logging.WARNING, logger="epserve.pipelines.kv_writer"):
        _run(engine, first)
        _run(engine, second)
        assert pc.writer.flush(30)
    assert first.output_ids == second.output_ids and len(first.output_ids) == 5
    assert second.n_cached == 0                          # the write failed: a miss, the same tokens
    assert pc.writer.stats["errors"] >= 1 and pc.writer.stats["blocks_written"] == 0
    assert "disk on fire" in caplog.text
    engine.close()


def test_the_queue_is_bounded_and_close_writes_what_is_queued(tmp_path, monkeypatch):
    store = KVStore(tmp_path / "kv", "m", torch.float32, (2, 4, 8), 1 << 30)
    block_bytes = 2 * 4 * 8 * 4
    gate = _gate_writes(store, monkeypatch)
    w = BlockWriter(store, max_bytes=3 * block_bytes)
    keys = [store.block_keys(list(range(i, i + 8)), "t") for i in range(3)]      # 2 blocks per save
    blocks = [torch.randn(2, 4, 8) for _ in range(2)]
    assert w.submit(keys[0], blocks)                     # taken by the thread, waiting on the gate
    assert not w.submit(keys[1], blocks)                 # 4 blocks would be in flight: over the bound
    assert w.stats["dropped"] == 1
    assert not w.wait_for(keys[0], timeout=0.05)         # still queued
    gate.set()
    assert w.flush(30) and w.wait_for(keys[0], timeout=0)
    assert w.submit(keys[2], blocks)                     # room again once the first is written
    w.close()                                            # writes the queued save before it returns
    assert store.lookup(keys[0]) == 2 and store.lookup(keys[1]) == 0 and store.lookup(keys[2]) == 2
    assert w.stats["blocks_written"] == 4
    assert not w.submit(keys[1], blocks) and w.stats["dropped"] >= 2     # closed: dropped, counted


def test_every_submitted_block_ends_in_one_outcome_with_its_bytes(tmp_path, monkeypatch):
    """written / skipped (on disk already) / refused (no room: another writer reserved the store) /
    dropped (over the bound) / failed (the write raised), as RankStats carries them to /metrics
    (tests/test_api_fields.py)."""
    from epserve.messages import KV_WRITE_OUTCOMES
    store = KVStore(tmp_path / "kv", "m", torch.float32, (2, 4, 8), 1 << 30)
    block_bytes = 2 * 4 * 8 * 4
    w = BlockWriter(store, max_bytes=2 * block_bytes)
    keys = [store.block_keys(list(range(i, i + 8)), "t") for i in range(3)]      # 2 blocks per save
    blocks = [torch.randn(2, 4, 8) for _ in range(2)]
    assert w.submit(keys[0], blocks) and w.flush(30)                           # 2 written
    assert w.submit(keys[0], blocks) and w.flush(30)                           # 2 skipped: on disk
    other = tmp_path / "kv" / ".writers" / "host.9.other"
    other.write_text(f"{1 << 30} 0 0\n")                                       # another writer reserved it all
    assert w.submit(keys[2], blocks) and w.flush(30)                           # 2 refused: no room
    other.unlink()
    gate = _gate_writes(store, monkeypatch, fail=True)
    assert w.submit(keys[1], blocks)                                           # fails once the gate opens
    assert not w.submit(keys[2], blocks)                                       # 2 dropped: over the bound
    gate.set()
    assert w.flush(30)
    n_blocks, n_bytes = w.outcomes()
    assert dict(zip(KV_WRITE_OUTCOMES, n_blocks)) == {"written": 2, "skipped": 2, "refused": 2, "dropped": 2,
                                                      "failed": 2}
    assert n_bytes == tuple(n * block_bytes for n in n_blocks)
    w.close()
