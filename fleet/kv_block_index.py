"""This process's view of an on-disk KV block directory, and the LRU eviction that keeps it small.

The directory is the index (fleet/kv_store.py says why): `scan` lists root/ab/<key>.kvb as
key -> (file bytes, mtime) and sweeps temp files a crashed writer left; a BlockIndex holds that
view between scans, updated by this process's hits and writes; `claim_lru` claims the least
recently used files (oldest mtime first) for eviction until the view's total is under a target. Files that
vanish under a scan or an eviction (another process evicted them) are skipped, never an error.
Never: reads or writes block contents, or imports torch.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Callable

from epserve.fleet.kv_block_format import KEY_RE, SUFFIX

CLAIM = ".evicting"     # <key>.evicting: a block one process has claimed for eviction, about to go


class BlockIndex:
    """key -> (file bytes, last use as an mtime), their byte total, and when it was last rebuilt
    from a scan (time.monotonic()). Every change holds `lock` (the store shares it)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.entries: dict[str, tuple[int, float]] = {}
        self.total = 0
        self.extra = 0            # bytes the estimate holds that the view has no block for (see replace, forget)
        self.last_scan = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: str, size: int, last_use: float) -> None:
        with self.lock:
            old = self.entries.get(key)
            self.total += size - (old[0] if old else 0)
            self.entries[key] = (size, last_use)

    def forget(self, key: str, gone: bool = False) -> None:
        """Drop key from the view; gone: another process deleted it, and that writer's ledger
        counts the bytes as removed (fleet/kv_ledger.py), so they move to `extra`, not off the
        store's estimate twice."""
        with self.lock:
            old = self.entries.pop(key, None)
            if old:
                self.total -= old[0]
                self.extra += old[0] if gone else 0

    def last_use(self, key: str) -> float:
        """The key's recency in this view (0.0: unknown here)."""
        seen = self.entries.get(key)
        return seen[1] if seen else 0.0

    def replace(self, entries: dict[str, tuple[int, float]], claimed: int = 0) -> None:
        """Take a fresh scan's view; claimed: bytes of files being evicted at the scan (on disk still,
        and their evictor's ledger will count them as removed)."""
        with self.lock:
            self.entries = entries
            self.total = sum(size for size, _ in entries.values())
            self.extra = claimed
            self.last_scan = time.monotonic()


def scan(root: Path, stale_tmp_s: float) -> tuple[dict[str, tuple[int, float]], int]:
    """(key -> (size, mtime) of every block file under root, bytes of files claimed for eviction)
    (a missing or unreadable root: none); deletes *.tmp files, and claims, older than stale_tmp_s
    on the way (left by a crashed process; a claim's age is its ctime, which the rename set)."""
    index: dict[str, tuple[int, float]] = {}
    claimed = 0
    now = time.time()
    try:
        subdirs = [d for d in os.scandir(root) if len(d.name) == 2 and d.is_dir()]
    except OSError:
        subdirs = []  # missing or unreadable root: an empty store
    for sub in subdirs:
        with contextlib.suppress(OSError):
            for entry in os.scandir(sub.path):
                with contextlib.suppress(OSError):  # vanished mid-scan
                    name = entry.name
                    if name.endswith(SUFFIX) and KEY_RE.fullmatch(name[:-len(SUFFIX)]):
                        st = entry.stat()
                        index[name[:-len(SUFFIX)]] = (st.st_size, st.st_mtime)
                    elif name.endswith(CLAIM):
                        st = entry.stat()
                        if now - st.st_ctime > stale_tmp_s:
                            os.unlink(entry.path)
                        else:
                            claimed += st.st_size
                    elif (name.endswith(".tmp")
                          and now - entry.stat().st_mtime > stale_tmp_s):
                        os.unlink(entry.path)  # left by a crashed writer
    return index, claimed


def claim_lru(index: BlockIndex, target_bytes: float, path_for: Callable[[str], Path],
              on_error: Callable[[Path, OSError], None]) -> list[tuple[str, int, Path]]:
    """Claim blocks for eviction, least recently used first, until index.total + index.extra <=
    target_bytes: each is renamed to <key>.evicting (atomic, so exactly one process claims a block)
    and leaves the view; -> (key, bytes, claimed path) of each. The caller announces them as removed
    in its ledger, then deletes them: a scan meanwhile still counts a claimed file, so no reader
    subtracts it twice. A block used since the scan (newer mtime on disk) is kept; one already gone
    is forgotten as gone; one that cannot be renamed goes to on_error and stays."""
    claims = []
    with index.lock:
        for key, (size, mtime) in sorted(index.entries.items(), key=lambda kv: kv[1][1]):
            if index.total + index.extra <= target_bytes:   # a block found gone was no room made here
                break
            path = path_for(key)
            claim = path.with_name(key + CLAIM)
            try:
                if os.stat(path).st_mtime > mtime:  # another process used it since the scan
                    continue
                os.rename(path, claim)
            except FileNotFoundError:
                index.forget(key, gone=True)   # another process evicted it first
                continue
            except OSError as e:
                on_error(path, e)
                continue
            index.forget(key)
            claims.append((key, size, claim))
    return claims
