"""This process's view of an on-disk KV block directory, and the LRU eviction that keeps it small.

The directory is the index (fleet/kv_store.py says why): `scan` lists root/ab/<key>.kvb as
key -> (file bytes, mtime) and sweeps temp files a crashed writer left; a BlockIndex holds that
view between scans, updated by this process's hits and writes; `evict_lru` deletes the least
recently used files (oldest mtime first) until the view's total is under a target. Files that
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


class BlockIndex:
    """key -> (file bytes, last use as an mtime), their byte total, and when it was last rebuilt
    from a scan (time.monotonic()). Every change holds `lock` (the store shares it)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.entries: dict[str, tuple[int, float]] = {}
        self.total = 0
        self.last_scan = 0.0

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, key: str, size: int, last_use: float) -> None:
        with self.lock:
            old = self.entries.get(key)
            self.total += size - (old[0] if old else 0)
            self.entries[key] = (size, last_use)

    def forget(self, key: str) -> None:
        with self.lock:
            old = self.entries.pop(key, None)
            if old:
                self.total -= old[0]

    def last_use(self, key: str) -> float:
        """The key's recency in this view (0.0: unknown here)."""
        seen = self.entries.get(key)
        return seen[1] if seen else 0.0

    def replace(self, entries: dict[str, tuple[int, float]]) -> None:
        """Take a fresh scan's view."""
        with self.lock:
            self.entries = entries
            self.total = sum(size for size, _ in entries.values())
            self.last_scan = time.monotonic()


def scan(root: Path, stale_tmp_s: float) -> dict[str, tuple[int, float]]:
    """key -> (size, mtime) of every block file under root (a missing or unreadable root: none);
    deletes *.tmp files older than stale_tmp_s on the way."""
    index: dict[str, tuple[int, float]] = {}
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
                    elif (name.endswith(".tmp")
                          and now - entry.stat().st_mtime > stale_tmp_s):
                        os.unlink(entry.path)  # left by a crashed writer
    return index


def evict_lru(index: BlockIndex, target_bytes: float, path_for: Callable[[str], Path],
              on_error: Callable[[Path, OSError], None]) -> list[tuple[str, int]]:
    """Delete blocks, least recently used first, until index.total <= target_bytes; -> the
    (key, bytes) this call deleted. A block used since the scan (newer mtime on disk) is kept; one
    already gone is forgotten; one that cannot be deleted goes to on_error and stays."""
    evicted = []
    with index.lock:
        for key, (size, mtime) in sorted(index.entries.items(), key=lambda kv: kv[1][1]):
            if index.total <= target_bytes:
                break
            path = path_for(key)
            try:
                if os.stat(path).st_mtime > mtime:  # another process used it since the scan
                    continue
                os.unlink(path)
                evicted.append((key, size))
            except FileNotFoundError:
                pass  # another process evicted it first
            except OSError as e:
                on_error(path, e)
                continue
            index.forget(key)
    return evicted
