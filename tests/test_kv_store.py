"""fleet/kv_store.py: keys, round trips, misses on bad files, LRU across restarts, faults."""
import contextlib
import errno
import logging
import multiprocessing as mp
import os
import time

import pytest
import torch

from epserve.fleet import kv_store
from epserve.fleet.kv_store import KVStore

SHAPE = (2, 64, 8)  # n_layers, block_tokens, kv_dim
BIG = 1 << 30


def make_store(root, capacity=BIG, dtype=torch.float32, model_id="tiny-v3", shape=SHAPE, **kw):
    return KVStore(root, model_id, dtype, shape, capacity, **kw)


def block(i, dtype=torch.float32, shape=SHAPE):
    g = torch.Generator().manual_seed(i)
    return torch.randn(shape, generator=g).to(dtype)


def keys_for(store, n_blocks, tenant="tenant-a", seed=0):
    tokens = [(seed * 7919 + t) % 50000 for t in range(n_blocks * store.block_tokens)]
    return store.block_keys(tokens, tenant)


def files(root, pattern="*.kvb"):
    return sorted(root.rglob(pattern))


def warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- keys ---------------------------------------------------------------------------
def test_keys_chain_over_full_blocks_only(tmp_path):
    store = make_store(tmp_path)
    tokens = list(range(200))  # 3 full blocks + 8 tokens
    keys = store.block_keys(tokens, "t")
    assert len(keys) == 3 and all(len(k) == 64 and int(k, 16) >= 0 for k in keys)
    assert store.block_keys(tokens[:128], "t") == keys[:2]  # same prefix, same keys
    assert store.block_keys(tokens[:63], "t") == []  # partial block: no key
    early = tokens.copy()
    early[5] += 1  # block 0 differs -> every later key differs
    assert all(a != b for a, b in zip(store.block_keys(early, "t"), keys))
    late = tokens.copy()
    late[130] += 1  # only block 2 differs
    late_keys = store.block_keys(late, "t")
    assert late_keys[:2] == keys[:2] and late_keys[2] != keys[2]
    other_model = make_store(tmp_path / "o", model_id="other")
    assert not set(other_model.block_keys(tokens, "t")) & set(keys)


def test_namespaces_isolate_tenants_unless_shared(tmp_path):
    store = make_store(tmp_path)
    tokens = list(range(256))
    a, b = store.block_keys(tokens, "tenant-a"), store.block_keys(tokens, "tenant-b")
    assert not set(a) & set(b)
    store.save_many(a, [block(i) for i in range(len(a))])
    assert store.lookup(a) == 4 and store.lookup(b) == 0
    shared = make_store(tmp_path / "s", shared_namespace="public")
    assert shared.block_keys(tokens, "tenant-a") == shared.block_keys(tokens, "tenant-b")


# ---- reads and writes ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    store = make_store(tmp_path, dtype=dtype)
    (key,) = keys_for(store, 1)
    kv = block(3, dtype)
    assert store.save(key, kv)
    got = KVStore(tmp_path, "tiny-v3", str(dtype).removeprefix("torch."), SHAPE, BIG).load(key)
    assert got.dtype == dtype and tuple(got.shape) == SHAPE
    assert torch.equal(got.view(torch.uint8), kv.view(torch.uint8))


def test_lookup_and_load_prefix_stop_at_first_gap(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(store, 5)
    for i in (0, 1, 3):
        store.save(keys[i], block(i))
    assert store.lookup(keys) == 2 and store.lookup([]) == 0
    assert store.lookup(keys[2:]) == 0 and store.lookup(keys[3:]) == 1
    got = store.load_prefix(keys)
    assert len(got) == 2 and torch.equal(got[1], block(1))
    assert store.stats.hits == 2 and store.stats.misses == 1


def test_save_skips_existing_key_and_validates(tmp_path):
    store = make_store(tmp_path)
    (key,) = keys_for(store, 1)
    assert store.save(key, block(0)) and not store.save(key, block(0))
    assert store.stats.write_skips == 1 and store.stats.blocks_written == 1
    assert store.stats.bytes_written == store.block_file_bytes == store.total_bytes
    with pytest.raises(ValueError, match="want"):
        store.save(key, torch.zeros(2, 64, 9))
    with pytest.raises(ValueError, match="hex"):
        store.load("not-a-key")
    with pytest.raises(ValueError, match="keys but"):
        store.save_many([key], [])


# ---- bad files are misses -----------------------------------------------------------
def _flip_payload_byte(path, **_):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(bytes(data))


def _foreign(**overrides):
    def write(path, tmp_path, key):
        spec = dict(model_id="tiny-v3", dtype=torch.float32, shape=SHAPE) | overrides
        other = make_store(tmp_path / "other", **spec)
        other.save(key, block(0, spec["dtype"], spec["shape"]))
        os.replace(other.path_for(key), path)
    return write


CORRUPTIONS = {
    "flip_payload_byte": _flip_payload_byte,
    "truncate": lambda path, **_: path.write_bytes(path.read_bytes()[:-100]),
    "zero_length": lambda path, **_: path.write_bytes(b""),
    "garbage": lambda path, **_: path.write_bytes(os.urandom(3000)),
    "bad_magic": lambda path, **_: path.write_bytes(b"XXXX" + path.read_bytes()[4:]),
    "bad_version": lambda path, **_: path.write_bytes(b"EPKV\x09" + path.read_bytes()[5:]),
    "other_model": _foreign(model_id="another-model"),
    "other_dtype": _foreign(dtype=torch.bfloat16),
    "other_shape": _foreign(shape=(3, 64, 8)),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_file_is_a_counted_miss_and_removed(tmp_path, case, caplog):
    store = make_store(tmp_path / "kv")
    keys = keys_for(store, 2)
    store.save_many(keys, [block(0), block(1)])
    path = store.path_for(keys[0])
    CORRUPTIONS[case](path=path, tmp_path=tmp_path, key=keys[0])
    with caplog.at_level(logging.WARNING):
        assert store.load(keys[0]) is None
        assert store.load_prefix(keys) == []
    assert not path.exists() and store.lookup(keys) == 0
    assert store.stats.corrupt == 1 and store.stats.misses == 2 and store.stats.hits == 0
    assert len(warnings(caplog)) == 1 and "bad block" in caplog.text
    assert store.total_bytes == store.block_file_bytes  # only keys[1] left in the view


def test_same_fault_is_logged_once(tmp_path, caplog):
    store = make_store(tmp_path)
    keys = keys_for(store, 3)
    store.save_many(keys, [block(i) for i in range(3)])
    for key in keys:
        _flip_payload_byte(store.path_for(key))
    with caplog.at_level(logging.WARNING):
        assert [store.load(k) for k in keys] == [None] * 3
    assert store.stats.corrupt == 3 and len(warnings(caplog)) == 1 and "checksum" in caplog.text


def test_file_deleted_between_lookup_and_load_is_a_plain_miss(tmp_path):
    store = make_store(tmp_path)
    (key,) = keys_for(store, 1)
    store.save(key, block(0))
    assert store.lookup([key]) == 1
    store.path_for(key).unlink()
    assert store.load(key) is None
    assert store.stats.misses == 1 and store.stats.corrupt == 0 and store.total_bytes == 0


# ---- format versions -------------------------------------------------------------------
def _write_v1(store, key, kv):
    """A block as epserve wrote it before format 2: the same layout with a sha256 payload digest."""
    import hashlib
    import json
    import struct
    import sys
    payload = kv.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    meta = json.dumps({"model_id": store.spec.model_id, "dtype": "float32", "shape": list(store.spec.shape),
                       "byteorder": sys.byteorder, "key": key, "payload_bytes": len(payload),
                       "sha256": hashlib.sha256(payload).hexdigest()}, separators=(",", ":")).encode()
    meta += b" " * (-(12 + len(meta)) % 64)
    path = store.path_for(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<4sHHI", b"EPKV", 1, 0, len(meta)) + meta + payload)
    return path


def test_new_blocks_carry_an_xxh3_checksum_not_sha256(tmp_path):
    store = make_store(tmp_path)
    (key,) = keys_for(store, 1)
    store.save(key, block(0))
    head = store.path_for(key).read_bytes()[:400]
    assert head[4:6] == (3).to_bytes(2, "little") and b'"xxh3_128":"' in head and b"sha256" not in head


def test_a_version_1_block_is_still_verified_with_sha256(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(store, 2)
    _write_v1(store, keys[0], block(0))
    assert torch.equal(store.load(keys[0]), block(0)) and store.stats.hits == 1
    _flip_payload_byte(_write_v1(store, keys[1], block(1)))        # a corrupted old block: a miss, never used
    assert store.load(keys[1]) is None and store.stats.corrupt == 1


def test_load_prefix_reads_mixed_versions_and_stops_at_a_corrupt_block(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(store, 4)
    store.save_many([keys[0], keys[2], keys[3]], [block(0), block(2), block(3)])
    _write_v1(store, keys[1], block(1))                            # an old block inside a chain
    got = store.load_prefix(keys)
    assert [torch.equal(g, block(i)) for i, g in enumerate(got)] == [True] * 4 and store.stats.hits == 4
    _flip_payload_byte(store.path_for(keys[2]))
    got = store.load_prefix(keys)
    assert len(got) == 2 and store.stats.corrupt == 1 and not store.path_for(keys[2]).exists()
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.load_prefix(["../../etc/passwd"])


# ---- LRU -----------------------------------------------------------------------------
def _age(store, keys, start=1000.0):
    """Give keys[i] mtime now - start + i: keys[0] oldest, distinct, all in the past."""
    t0 = time.time() - start
    for i, key in enumerate(keys):
        os.utime(store.path_for(key), (t0 + i, t0 + i))


def test_eviction_bounds_bytes_and_keeps_recently_used(tmp_path):
    probe = make_store(tmp_path / "probe")
    size = probe.block_file_bytes
    store = make_store(tmp_path / "kv", capacity=int(5.5 * size))
    keys = keys_for(store, 7)
    store.save_many(keys[:5], [block(i) for i in range(5)])
    _age(store, keys[:5])
    assert store.load(keys[0]) is not None  # a hit makes block 0 the most recent
    store.save_many(keys[5:], [block(5), block(6)])  # 5 + 2 reserved > 5.5: evict to <= 4.95 with the 2
    on_disk = {p.name[:-4] for p in files(tmp_path / "kv")}
    assert on_disk == {keys[0], keys[4], keys[5], keys[6]}  # 1, 2 and 3 were oldest
    assert store.stats.evictions == 3 and store.total_bytes == 4 * size <= store.capacity_bytes


def test_lru_recency_survives_reopening(tmp_path):
    store = make_store(tmp_path)
    keys = keys_for(store, 5)
    store.save_many(keys, [block(i) for i in range(5)])
    _age(store, keys)
    assert store.load(keys[1]) is not None
    del store
    size = make_store(tmp_path / "probe").block_file_bytes
    reopened = make_store(tmp_path, capacity=int(2.5 * size))  # evicts at open, to <= 2.25 blocks
    assert {p.name[:-4] for p in files(tmp_path)} == {keys[1], keys[4]}
    assert reopened.n_blocks == 2 and reopened.total_bytes == 2 * size
    assert torch.equal(reopened.load(keys[1]), block(1))


def test_eviction_tolerates_files_vanishing(tmp_path, monkeypatch):
    store = make_store(tmp_path, capacity=int(3.5 * make_store(tmp_path / "p").block_file_bytes))
    keys = keys_for(store, 4)
    store.save_many(keys[:3], [block(i) for i in range(3)])
    for key in keys[:3]:  # another process evicted these; our view is stale
        store.path_for(key).unlink()
    monkeypatch.setattr(store, "rescan", lambda: None)
    # no error; the vanished bytes stay in the estimate until a scan (their remover's ledger counts them)
    assert not store.save(keys[3], block(3)) and store.stats.evictions == 0
    assert store.total_bytes == 0 and files(tmp_path) == []
    monkeypatch.undo()
    assert store.save(keys[3], block(3)) and files(tmp_path) == [store.path_for(keys[3])]


def test_stale_temp_files_are_swept(tmp_path):
    (tmp_path / "ab").mkdir()
    old, new = tmp_path / "ab" / ".x.kvb.1.2.tmp", tmp_path / "ab" / ".y.kvb.1.2.tmp"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    os.utime(old, (time.time() - 7200,) * 2)
    make_store(tmp_path)
    assert not old.exists() and new.exists()


# ---- concurrency ---------------------------------------------------------------------
def _writer(root, first, n, barrier, capacity):
    store = make_store(root, capacity=capacity, rescan_interval_s=0.0)
    keys = keys_for(store, 24)
    barrier.wait()
    for i in range(first, first + n):
        store.save(keys[i], block(i))
    assert store.writes_enabled and store.stats.write_errors == 0


def test_two_processes_writing_overlapping_keys(tmp_path):
    ctx = mp.get_context("spawn")
    size = make_store(tmp_path / "probe").block_file_bytes
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_writer, args=(tmp_path / "kv", first, 16, barrier, 12 * size))
             for first in (0, 8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert files(tmp_path / "kv", "*.tmp") == []
    store = make_store(tmp_path / "kv", capacity=12 * size)  # evicts at open if a race overshot
    keys = keys_for(store, 24)
    present = [i for i, k in enumerate(keys) if store.path_for(k).exists()]
    assert len(present) >= 8 and store.total_bytes <= 12 * size
    for i in present:
        assert torch.equal(store.load(keys[i]), block(i))
    assert store.stats.corrupt == 0 and len(files(tmp_path / "kv")) == len(present)


def _disk_bytes(root):
    """Bytes of the blocks under root; one deleted while this runs (another writer evicting) counts 0."""
    total = 0
    for f in root.rglob("*.kvb"):
        with contextlib.suppress(FileNotFoundError):
            total += f.stat().st_size
    return total


def test_stores_sharing_a_root_stay_under_capacity_between_rescans(tmp_path):
    """Two ranks' stores on one directory, neither rescanning on its own for a minute: each one's
    writes reach the other through the writer ledger, so the disk never holds more than capacity."""
    size = make_store(tmp_path / "probe").block_file_bytes
    a, b = (make_store(tmp_path / "kv", capacity=6 * size) for _ in range(2))
    keys = keys_for(a, 16)
    for i, key in enumerate(keys):
        assert (a if i % 2 else b).save(key, block(i))
        assert _disk_bytes(tmp_path / "kv") <= 6 * size, f"over capacity after block {i}"
    assert a.stats.evictions + b.stats.evictions == 16 - len(files(tmp_path / "kv"))
    ledger = (tmp_path / "kv" / ".writers" / a._ledger.name).read_text().split()
    assert [int(v) for v in ledger] == [0, 8 * size, a.stats.evicted_bytes]


def test_a_reservation_counts_for_the_others_until_its_writer_goes_quiet(tmp_path):
    """A foreign writer's ledger (the file format is the contract between processes): its pending
    bytes count while it is live, not once it has been silent for PENDING_TTL_S (it died mid-write),
    and a ledger silent for stale_tmp_s is swept at the next scan."""
    from epserve.fleet.kv_ledger import PENDING_TTL_S
    store = make_store(tmp_path, capacity=4 * make_store(tmp_path / "probe").block_file_bytes)
    size = store.block_file_bytes
    keys = keys_for(store, 3)
    store.save_many(keys[:2], [block(0), block(1)])
    other = tmp_path / ".writers" / "host.1.dead"
    other.write_text(f"{4 * size} 0 0\n")                        # it is about to fill the store
    assert store.estimated_bytes() == 6 * size
    assert not store.save(keys[2], block(2)) and store.stats.blocks_refused == 1
    assert store.lookup(keys) == 2 and store.stats.evictions == 0   # no eviction for another's reservation
    (tmp_path / ".writers" / "host.2.foreign").write_text("-5 0 0\n")   # not a ledger of ours: ignored
    os.utime(other, (time.time() - PENDING_TTL_S - 1,) * 2)
    assert store.estimated_bytes() == 2 * size and store.save(keys[2], block(2))
    os.utime(other, (time.time() - 7200,) * 2)
    store.rescan()
    assert not other.exists() and (tmp_path / ".writers" / store._ledger.name).exists()


def test_a_block_another_writer_evicted_is_not_subtracted_twice(tmp_path):
    """B evicts two of A's blocks (its ledger counts them as removed); A then misses them on load. A's
    view forgets them, but its estimate keeps them until its next scan, so its writes that follow
    never take the disk over capacity."""
    size = make_store(tmp_path / "probe").block_file_bytes
    a, b = (make_store(tmp_path / "kv", capacity=10 * size) for _ in range(2))
    keys = keys_for(a, 30)
    a.save_many(keys[:9], [block(i) for i in range(9)])
    _age(a, keys[:9])
    b.save_many(keys[9:11], [block(i) for i in (9, 10)])
    assert b.stats.evictions == 2
    assert sum(a.load(k) is None for k in keys[:9]) == 2
    for i in range(11, 30):
        a.save(keys[i], block(i))
        assert _disk_bytes(tmp_path / "kv") <= 10 * size, f"over capacity after block {i}"


def test_an_idle_writer_publishes_under_a_new_name_with_fresh_counts(tmp_path):
    """Others may sweep a ledger silent for stale_tmp_s; a writer silent for half that starts a new one,
    so a reader that never saw the old one does not count all of its bytes as new."""
    store = make_store(tmp_path)
    keys = keys_for(store, 2)
    store.save(keys[0], block(0))
    first = store._ledger.name
    store._ledger._published -= store.stale_tmp_s / 2 + 1
    store.save(keys[1], block(1))
    size = store.block_file_bytes
    assert store._ledger.name != first
    assert (tmp_path / ".writers" / store._ledger.name).read_text().split() == ["0", str(size), "0"]


def test_an_unwritable_ledger_directory_turns_writes_off_at_start(tmp_path, caplog):
    (tmp_path / ".writers").write_text("a file where the ledger directory goes")
    with caplog.at_level(logging.WARNING):
        store = make_store(tmp_path)
    assert not store.writes_enabled and "writer ledger" in caplog.text
    assert store.save(keys_for(store, 1)[0], block(0)) is False


def test_a_batch_larger_than_the_store_keeps_its_leading_blocks(tmp_path):
    size = make_store(tmp_path / "probe").block_file_bytes
    store = make_store(tmp_path / "kv", capacity=int(3.5 * size))
    keys = keys_for(store, 5)
    assert store.save_many(keys, [block(i) for i in range(5)]) == 3
    assert store.lookup(keys) == 3 and _disk_bytes(tmp_path / "kv") == 3 * size


def _contending_writer(root, wid, capacity, n_batches, barrier):
    """Batches of 1-3 new blocks and loads of earlier ones (some evicted by the other writer). Each
    batch holds a shared lock on root/../pause, so the parent can look at the directory between batches."""
    import fcntl
    import random
    store = make_store(root, capacity=capacity)
    rng, written = random.Random(wid), []
    barrier.wait()
    with open(root.parent / "pause", "a") as pause:
        for _ in range(n_batches):
            keys = keys_for(store, rng.randint(1, 3), seed=rng.randrange(1 << 30))
            fcntl.flock(pause, fcntl.LOCK_SH)
            store.save_many(keys, [block(0)] * len(keys))
            fcntl.flock(pause, fcntl.LOCK_UN)
            written += keys
            for key in rng.sample(written, min(3, len(written))):
                store.load(key)
            time.sleep(0.001)
    assert store.stats.evictions > 0 and store.stats.blocks_written > 0


def test_writers_in_several_processes_never_take_the_disk_over_capacity(tmp_path):
    """Two processes write and read one small store at once, each evicting the other's blocks (their
    batches run concurrently); between batches (an exclusive lock: a walk of the directory while a
    batch runs could count a deleted file and its replacement both) it never holds more than capacity."""
    import fcntl
    ctx = mp.get_context("spawn")
    size = make_store(tmp_path / "probe").block_file_bytes
    capacity, root = 20 * size, tmp_path / "kv"
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_contending_writer, args=(root, w, capacity, 150, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    barrier.wait(60)
    seen = []
    with open(tmp_path / "pause", "a") as pause:
        while any(p.is_alive() for p in procs):
            fcntl.flock(pause, fcntl.LOCK_EX)
            seen.append(_disk_bytes(root))
            fcntl.flock(pause, fcntl.LOCK_UN)
            time.sleep(0.002)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(seen) >= 10 and max(seen) <= capacity, (len(seen), max(seen), capacity)


# ---- faults ---------------------------------------------------------------------------
def test_unwritable_root_disables_writes_without_raising(tmp_path, caplog):
    (tmp_path / "afile").write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        store = make_store(tmp_path / "afile" / "kv")
        (key,) = keys_for(store, 1)
        assert not store.writes_enabled
        assert store.save(key, block(0)) is False
        assert store.load(key) is None and store.lookup([key]) == 0
    assert len(warnings(caplog)) == 1 and "writes are off" in caplog.text


def test_disk_full_turns_writes_off_once_and_reads_continue(tmp_path, monkeypatch, caplog):
    store = make_store(tmp_path, write_retry_s=0.3)
    keys = keys_for(store, 3)
    assert store.save(keys[0], block(0))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_store, "write_atomic", disk_full)
    with caplog.at_level(logging.WARNING):
        assert store.save(keys[1], block(1)) is False
        assert store.save_many(keys[1:], [block(1), block(2)]) == 0
    assert not store.writes_enabled and store.stats.write_errors == 1
    assert len(warnings(caplog)) == 1 and "No space left" in caplog.text
    assert torch.equal(store.load(keys[0]), block(0)) and store.lookup(keys) == 1
    monkeypatch.undo()                                   # the disk has room again: writes resume on their own
    time.sleep(0.35)
    assert store.writes_enabled and store.save(keys[1], block(1)) and store.lookup(keys) == 2


def test_v32_rows_carry_index_dim_and_latent_only_blocks_are_a_miss_for_them(tmp_path):
    """Format 3 names the indexer-key part of each row: a V3.2 store reads its own blocks, refuses a
    version 1 block (latents only) as `no_index_keys`, and a V3 store of the same row width refuses its."""
    from epserve.fleet.kv_block_format import BlockFormatError, decode_block
    v32 = make_store(tmp_path / "a", index_dim=4)
    keys = keys_for(v32, 2)
    v32.save(keys[0], block(0))
    assert torch.equal(v32.load(keys[0]), block(0)) and b'"index_dim":4' in v32.path_for(keys[0]).read_bytes()[:400]
    old = _write_v1(v32, keys[1], block(1))
    with pytest.raises(BlockFormatError, match="no_index_keys"):
        decode_block(bytearray(old.read_bytes()), v32.spec, keys[1])
    assert v32.load(keys[1]) is None and v32.stats.corrupt == 1
    v3 = make_store(tmp_path / "a")
    with pytest.raises(BlockFormatError, match="foreign_index_dim"):
        decode_block(bytearray(v32.path_for(keys[0]).read_bytes()), v3.spec, keys[0])
