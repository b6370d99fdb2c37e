"""On-disk context cache: content-addressed blocks of MLA latent KV (DeepSeek's KV cache on disk).

Owns the block keys, a directory of block files under `root`, and its
capacity-bounded LRU. The ingress asks `lookup` how long a cached prefix is;
prefill ranks `load_prefix` it and `save` the new full blocks.

Must never: raise on a disk fault or a bad file (a bad block is a miss, never
wrong output; a full or unwritable disk turns writes off with one warning and
serving goes on, and writes are tried again every `write_retry_s`, so they resume once
there is room), share blocks across tenants unless a shared namespace is
configured (a shared cache leaks prompts through hit timing), or import Ray.

Keys (fleet/kv_block_format.block_keys) are chained sha256 hashes per full block,
so a key names its whole prefix: a hit on block i means blocks 0..i-1 match too.

Layout: root/ab/abcdef...(64 hex).kvb, one file per block (bytes in
fleet/kv_block_format.py), fanned out into 256 directories by key prefix. Why:
- atomic: a block appears by os.replace of a fully written temp file in the same
  directory, so readers see all of it or nothing. Two writers of one key write
  identical bytes, so whichever rename lands last is right; no lock needed.
- no index file to corrupt: the directory is the index. Each process keeps an
  in-memory view (key -> size, last use) rebuilt by scanning; a crash leaves at
  most a stray temp file, swept by a later scan.
- shared file systems (NFS, Lustre, CephFS) give atomic same-directory rename and
  per-file mtimes without cross-node locks; fan-out keeps directories small.
- LRU by mtime: a hit does os.utime, so recency lives on disk, survives restarts
  and is shared by every process; eviction removes the oldest mtime first.

Several processes (and nodes) may share a root. Each evicts on its own view, which
it refreshes by a rescan before evicting and at least every `rescan_interval_s`;
files vanishing under it (another evictor) are fine. Between scans each writer reserves
its bytes in a ledger the others read (fleet/kv_ledger.py) and makes room before it writes,
so the store stays under capacity_bytes whichever rank writes.

This process's view of the directory and the LRU eviction over it are fleet/kv_block_index.py;
this file decides when to rescan and evict. It runs past 400 lines because reads, writes and
their faults share one view and one lock; the bytes are kv_block_format's, the view kv_block_index's.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from epserve.fleet.kv_block_format import (KEY_RE, MAX_META_BYTES, SUFFIX, BlockFormatError,
                                           BlockSpec, block_keys, decode_block, encode_block,
                                           file_bytes, header_bytes, header_digest,
                                           payload_digest, write_atomic)
from epserve.fleet.kv_block_index import BlockIndex, claim_lru, scan
from epserve.fleet.kv_ledger import WriterLedger

__all__ = ["KVStore", "KVStoreStats", "block_keys"]

logger = logging.getLogger(__name__)
KEYS_RE = re.compile(r"(?:[0-9a-f]{64})*")     # many keys, joined: one regex call per prefix

# Errors that mean "this disk will not take writes": stop trying instead of failing every save.
_WRITE_FATAL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EFBIG}


@dataclass
class KVStoreStats:
    """Counters since this store object was made (per process)."""

    hits: int = 0            # load() returned a block
    misses: int = 0          # load() returned None (includes corrupt)
    corrupt: int = 0         # bad file found, counted as a miss and deleted
    evictions: int = 0
    evicted_bytes: int = 0
    bytes_read: int = 0
    blocks_written: int = 0
    bytes_written: int = 0
    write_skips: int = 0     # save() of a key already on disk
    write_errors: int = 0
    blocks_refused: int = 0  # not written: no room even after eviction (others' reservations, blocks in use)
    rescans: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class KVStore:
    """Blocks [n_layers, block_tokens, kv_dim] of `dtype` under `root`, at most ~capacity_bytes.

    block_shape: (n_layers, block_tokens, row), row = kv_lora_rank + qk_rope_head_dim + index_dim.
    index_dim: the trailing values of each row that are DeepSeek-V3.2's indexer key (0 for V3).
    shared_namespace: when set, every tenant uses it (blocks shared across tenants).
    fsync: fsync each block and its directory before counting it written.
    low_watermark: eviction goes down to this fraction of capacity_bytes.
    touch_interval_s: a hit refreshes a block's mtime (LRU recency) when it is older than this.
    write_retry_s: after a write fails for a full or unwritable disk, writes pause this long, then retry.
    """

    def __init__(self, root: str | os.PathLike, model_id: str, dtype: torch.dtype | str,
                 block_shape: tuple[int, int, int], capacity_bytes: int,
                 shared_namespace: str | None = None, *, fsync: bool = False,
                 low_watermark: float = 0.9, rescan_interval_s: float = 60.0,
                 stale_tmp_s: float = 3600.0, touch_interval_s: float = 60.0, write_retry_s: float = 10.0,
                 index_dim: int = 0):
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"kv_store dtype={dtype!r} is not a torch dtype")
            dtype = getattr(torch, dtype)
        if len(block_shape) != 3 or min(block_shape) <= 0:
            raise ValueError(f"kv_store block_shape={block_shape!r}: "
                             "want (n_layers, block_tokens, kv_dim), all > 0")
        if not 0.0 < low_watermark <= 1.0:
            raise ValueError(f"kv_store low_watermark={low_watermark}: want in (0, 1]")
        self.root = Path(root)
        self._root_str = str(self.root)
        self.spec = BlockSpec(model_id, dtype, tuple(int(d) for d in block_shape), int(index_dim))
        self.block_tokens = self.spec.shape[1]
        self.block_file_bytes = file_bytes(self.spec)
        self.capacity_bytes = int(capacity_bytes)
        self.shared_namespace = shared_namespace
        self.fsync = fsync
        self.low_watermark = low_watermark
        self.rescan_interval_s = rescan_interval_s
        self.stale_tmp_s = stale_tmp_s
        self.touch_interval_s = touch_interval_s
        self.write_retry_s = write_retry_s
        self.stats = KVStoreStats()
        self._index = BlockIndex()                     # key -> (file bytes, last use as mtime)
        self._lock = self._index.lock                  # the counters change with the view
        self._warned: set[str] = set()
        self._writes_enabled = True
        self._writes_paused_until = 0.0                 # a full or unwritable disk: no write before this
        if self.capacity_bytes < self.block_file_bytes:
            self._disable_writes(f"capacity_bytes={self.capacity_bytes} is below one block")
        else:
            # a name of our own: processes starting together must not unlink each other's probe
            probe = self.root / f".probe.{os.getpid()}.{threading.get_ident()}.tmp"
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                probe.write_bytes(b"probe")
                probe.unlink()
            except OSError as e:
                self._disable_writes(f"cannot write under {self.root}: {e}")
        self._ledger = WriterLedger(self.root, stale_s=stale_tmp_s)
        if self._writes_enabled:
            try:
                self._ledger.publish(self._lock)
            except OSError as e:
                self._disable_writes(f"cannot write its writer ledger under {self._ledger.dir}: {e}")
        self.rescan()
        self._make_room()

    # ---- keys and paths -------------------------------------------------------------
    def namespace_for(self, tenant: str) -> str:
        return tenant if self.shared_namespace is None else self.shared_namespace

    def block_keys(self, token_ids: Sequence[int], tenant: str) -> list[str]:
        """A key per full block of `token_ids`, in `tenant`'s namespace (or the shared one)."""
        return block_keys(token_ids, self.namespace_for(tenant),
                          model_id=self.spec.model_id, block_tokens=self.block_tokens)

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise ValueError(f"kv_store key={key!r}: want 64 lowercase hex characters")
        return self.root / key[:2] / (key + SUFFIX)

    @property
    def writes_enabled(self) -> bool:
        return self._writes_enabled and time.monotonic() >= self._writes_paused_until

    @property
    def total_bytes(self) -> int:
        """Bytes of blocks in this process's view of the store."""
        return self._index.total

    @property
    def n_blocks(self) -> int:
        return len(self._index)

    # ---- reads ----------------------------------------------------------------------
    def lookup(self, keys: Sequence[str]) -> int:
        """Number of leading `keys` whose block file exists (stat only; load may still miss)."""
        for n, key in enumerate(keys):
            if not self.path_for(key).is_file():
                return n
        return len(keys)

    def load(self, key: str) -> torch.Tensor | None:
        """The block [n_layers, block_tokens, kv_dim] on CPU, or None on any miss.

        A hit refreshes the file's mtime (its LRU recency) only when it is older than
        touch_interval_s: recency to the minute is enough for eviction, and a utime per hit
        would cost more than verifying a small block."""
        if not isinstance(key, str) or not KEY_RE.fullmatch(key):
            raise ValueError(f"kv_store key={key!r}: want 64 lowercase hex characters")
        path = f"{self._root_str}/{key[:2]}/{key}{SUFFIX}"     # path_for without pathlib: hits are hot
        try:
            fd = os.open(path, os.O_RDONLY)        # os-level: a buffered file object costs more than the read
            try:
                st = os.fstat(fd)
                size = st.st_size
                if size > self.block_file_bytes + MAX_META_BYTES:  # not ours: don't read it all
                    raise BlockFormatError("bad_size", f"{size} B, want {self.block_file_bytes}")
                buf = bytearray(size)
                n_read = os.readv(fd, [buf])
            finally:
                os.close(fd)
            kv = decode_block(buf if n_read == size else buf[:n_read], self.spec, key)
        except (FileNotFoundError, NotADirectoryError):  # absent (or no store dir at all)
            self._index.forget(key, gone=True)
            self.stats.misses += 1
            return None
        except BlockFormatError as e:
            self._drop_corrupt(Path(path), key, e)
            return None
        except OSError as e:  # EIO, EACCES...: a miss; the file may be fine for others
            self.stats.misses += 1
            self._warn_once(f"read:{e.errno}", f"kv_store: read failed, treating as a miss: {e}")
            return None
        last_use = st.st_mtime
        now = time.time()
        if now - last_use >= self.touch_interval_s:
            with contextlib.suppress(OSError):  # vanished or read-only: recency is best effort
                os.utime(path, (now, now))
                last_use = now
        with self._lock:
            self.stats.hits += 1
            self.stats.bytes_read += size
            self._index.add(key, size, last_use)
        return kv

    def load_prefix(self, keys: Sequence[str]) -> list[torch.Tensor]:
        """Blocks for the longest leading run of `keys` that load cleanly (views of one tensor).

        The hot path of a prefix hit: each file is read with one scatter read, its header into a
        small buffer and its payload straight into its row of one [n, *block_shape] tensor, then
        checksummed; no per-block allocation, stat or header parse (recency comes from this
        process's index, refreshed by rescans). A file that is not exactly a current
        block of this store goes through load(), which reads old versions and names faults."""
        spec, n = self.spec, len(keys)
        out = torch.empty((n, *spec.shape), dtype=spec.dtype)
        flat = memoryview(out.view(-1).view(torch.uint8).numpy())
        pb = spec.payload_bytes
        head = bytearray(header_bytes(spec))
        want_size = len(head) + spec.payload_bytes
        now, hits, n_ok = time.time(), [], 0
        extra = bytearray(1)                           # a longer file fills it: not ours, use load()
        for i, key in enumerate(keys):
            path = f"{self._root_str}/{key[:2]}/{key}{SUFFIX}"
            row = flat[i * pb:(i + 1) * pb]
            try:
                fd = os.open(path, os.O_RDONLY)
                try:
                    n_read = os.readv(fd, [head, row, extra])
                finally:
                    os.close(fd)
            except OSError:
                n_read = -1                            # absent or unreadable: load() counts and logs it
            digest = header_digest(head, spec, key) if n_read == want_size else None
            if digest is None or payload_digest(row) != digest:
                kv = self.load(key)                    # the careful path: old format, or a fault to name
                if kv is None:
                    break
                out[i].copy_(kv)
                n_ok += 1
                continue
            last_use = self._index.last_use(key)       # recency from this process's view: no stat per hit
            if now - last_use >= self.touch_interval_s:
                with contextlib.suppress(OSError):
                    os.utime(path, (now, now))
                    last_use = now
            hits.append((key, want_size, last_use))
            n_ok += 1
        with self._lock:
            for key, size, last_use in hits:
                self.stats.hits += 1
                self.stats.bytes_read += size
                self._index.add(key, size, last_use)
        return list(out[:n_ok].unbind(0))

    # ---- writes ---------------------------------------------------------------------
    def save(self, key: str, kv: torch.Tensor) -> bool:
        """Write block `kv` ([n_layers, block_tokens, kv_dim], the store's dtype, any device).

        Returns True if this call wrote the file; False if it existed already or
        writes are off. Raises ValueError only for a wrong key/shape/dtype (a caller bug).
        """
        return self.save_many([key], [kv]) == 1

    def save_many(self, keys: Sequence[str], kvs: Sequence[torch.Tensor]) -> int:
        """Write each (key, block) pair not on disk yet, making room first; returns how many
        files this call wrote. The blocks are a prefix's, in order: of a batch larger than the
        whole store only the leading blocks that fit are written (a later block is no use
        without the earlier ones)."""
        if len(keys) != len(kvs):
            raise ValueError(f"kv_store.save_many: {len(keys)} keys but {len(kvs)} blocks")
        paths = [self.path_for(k) for k in keys]
        for kv in kvs:
            if tuple(kv.shape) != self.spec.shape or kv.dtype != self.spec.dtype:
                raise ValueError(f"kv_store.save: got {tuple(kv.shape)} {kv.dtype}, "
                                 f"want {self.spec.shape} {self.spec.dtype}")
        if not self.writes_enabled:
            return 0
        todo = []
        for key, kv, path in zip(keys, kvs, paths):
            if path.is_file():  # same key = same content; refresh its recency instead
                with contextlib.suppress(OSError):
                    os.utime(path)
                self.stats.write_skips += 1
            else:
                todo.append((key, kv, path))
        todo = todo[:self.capacity_bytes // self.block_file_bytes]
        if not todo or not self._reserve(len(todo) * self.block_file_bytes):
            return 0
        own, written = self._ledger.own, 0
        try:
            for key, kv, path in todo:
                try:
                    n = write_atomic(path, encode_block(self.spec, key, kv), self.fsync)
                except OSError as e:
                    self._on_write_error(e)
                    if not self.writes_enabled:
                        break
                    continue
                with self._lock:
                    self.stats.blocks_written += 1
                    self.stats.bytes_written += n
                    self._index.add(key, n, time.time())
                    own.added += n
                    own.pending -= self.block_file_bytes
                    written += 1
                self._publish()
        finally:
            with self._lock:  # give back what was reserved and not written
                own.pending -= (len(todo) - written) * self.block_file_bytes
            self._publish()
        return written

    # ---- index and eviction ---------------------------------------------------------
    def rescan(self) -> None:
        """Rebuild the view (key -> size, mtime) from disk; sweep stale temp files. The other
        writers' ledgers are read before and after, so what changes meanwhile is counted, if twice."""
        before = self._ledger.read_others(sweep=True)
        entries, claimed = scan(self.root, self.stale_tmp_s)
        after = self._ledger.read_others(sweep=False)
        with self._lock:
            self._ledger.scan_baseline(before, after)
            self._index.replace(entries, claimed)
            self.stats.rescans += 1

    def estimated_bytes(self) -> int:
        """The store's bytes as this process knows them: its view (with what vanished from it since
        the scan, which the remover's ledger counts), its own reservation, and what the other
        writers' ledgers say they reserved, added and removed since its scan."""
        pending, net = self._ledger.others_since_scan()
        with self._lock:
            return self._index.total + self._index.extra + self._ledger.own.pending + pending + net

    def _reserve(self, need: int) -> bool:
        """Announce `need` bytes about to be written, then make room for them; False (nothing
        kept reserved) if the ledger cannot be written (an unannounced write could overrun the
        store) or there is no room even after eviction."""
        with self._lock:
            self._ledger.own.pending += need
        try:
            self._ledger.publish(self._lock)
        except OSError as e:
            with self._lock:
                self._ledger.own.pending -= need
            self._on_write_error(e)
            return False
        if self._make_room():
            return True
        with self._lock:
            self._ledger.own.pending -= need     # no room: blocks in use, or others' reservations
            self.stats.blocks_refused += need // self.block_file_bytes
        self._publish()
        return False

    def _make_room(self) -> bool:
        """If the estimate is over capacity (or the view is old), rescan; if still over, delete
        least-recently-used blocks until what this process knows is on disk, with its own
        reservation, is down to low_watermark * capacity_bytes (never for the others' reservations:
        each writer makes room for its own). -> whether the estimate fits capacity_bytes. The scan
        runs outside the store's lock; the eviction holds it, as the view changes under it."""
        if time.monotonic() - self._index.last_scan <= self.rescan_interval_s \
                and self.estimated_bytes() <= self.capacity_bytes:
            return True
        self.rescan()
        fits = self.estimated_bytes() <= self.capacity_bytes
        if fits or not self._writes_enabled:
            return fits
        pending, net = self._ledger.others_since_scan()
        with self._lock:
            target = self.low_watermark * self.capacity_bytes - self._ledger.own.pending - net
            claims = claim_lru(self._index, target, self.path_for, self._evict_failed)
            self._index.extra += sum(size for _, size, _ in claims)     # on disk until unlinked below
            self._ledger.own.removed += sum(size for _, size, _ in claims)
        if claims:
            self._publish()                      # announced before the files go (kv_block_index.claim_lru)
        kept = 0
        for _, size, claim in claims:
            try:
                os.unlink(claim)
            except FileNotFoundError:
                pass                             # swept as a crashed claim: gone all the same
            except OSError as e:
                self._evict_failed(claim, e)
                kept += size
                continue
            with self._lock:
                self._index.extra -= size
                self.stats.evictions += 1
                self.stats.evicted_bytes += size
        if kept:                                 # still on disk: not removed after all
            with self._lock:
                self._ledger.own.removed -= kept
            self._publish()
        return self.estimated_bytes() <= self.capacity_bytes

    def _publish(self) -> None:
        """Publish this process's counts after a change; a failure only costs the others a stale
        reading (they rescan when over, and a ledger left unchanged stops counting as pending)."""
        try:
            self._ledger.publish(self._lock)
        except OSError as e:
            self._warn_once(f"ledger:{e.errno}", f"kv_store: cannot update the writer ledger: {e}")

    def _evict_failed(self, path: Path, e: OSError) -> None:
        self._warn_once(f"evict:{e.errno}", f"kv_store: cannot evict {path}: {e}")

    # ---- faults ---------------------------------------------------------------------
    def _drop_corrupt(self, path: Path, key: str, err: BlockFormatError) -> None:
        # A racing writer may just have replaced the bad file with a good one; deleting
        # that costs one future miss, never a wrong block.
        with contextlib.suppress(OSError):
            os.unlink(path)
        self._index.forget(key)
        self.stats.misses += 1
        self.stats.corrupt += 1
        self._warn_once(f"corrupt:{err.reason}",
                        f"kv_store: bad block {path.name} ({err}); deleted, counted as a miss "
                        f"(further '{err.reason}' blocks logged at debug)")

    def _on_write_error(self, e: OSError) -> None:
        self.stats.write_errors += 1
        if e.errno in _WRITE_FATAL:
            if time.monotonic() >= self._writes_paused_until:
                self._warn_once(f"pause:{e.errno}", f"kv_store at {self.root}: write failed ({e}); writes are "
                                f"off for {self.write_retry_s:g}s at a time until one succeeds, reads continue")
            self._writes_paused_until = time.monotonic() + self.write_retry_s
        else:
            self._warn_once(f"write:{e.errno}", f"kv_store: write failed, block skipped: {e}")

    def _disable_writes(self, why: str) -> None:
        if self._writes_enabled:
            self._writes_enabled = False
            logger.warning("kv_store at %s: %s; writes are off, reads continue", self.root, why)

    def _warn_once(self, reason: str, msg: str) -> None:
        level = logging.DEBUG if reason in self._warned else logging.WARNING
        self._warned.add(reason)
        logger.log(level, msg)
