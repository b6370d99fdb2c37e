"""Every writer's running byte count in a shared KV block directory, so one rank's eviction
decision sees the other ranks' writes without rescanning the directory.

Why: each process evicts on its own view of the directory (fleet/kv_block_index.py), rebuilt
by a scan that costs a stat per block, so it runs at most every `rescan_interval_s`. Between
scans another rank's writes were invisible, and a store shared by the ranks of a unit ran over
its capacity by what they wrote meanwhile. Now each writer keeps root/.writers/<id>, three
integers `pending added removed`: the bytes it has reserved and not yet written, and the bytes
it has added to and removed from the store in all. A reader counts, for every other writer,
pending + what it added and removed since the reader's last scan (the ledgers are read before
and after the scan, so a block added or removed meanwhile is counted twice, never missed); and
a writer reserves before it checks, so of two writers racing for the last room the second sees
the first. A block this process finds gone that it had seen (another writer evicted it) stays in
its estimate until the next scan: that writer's ledger already counts it as removed. Reading
the ledgers costs one small read per writing rank, not per block. A removal is announced the
same way round: the evictor claims each block by renaming it to <key>.evicting (scans still count
it), announces the bytes, then deletes it (fleet/kv_block_index.py claim_lru).

A ledger is published by atomic rename, like the blocks, so no lock is needed on a shared file
system. One not updated for PENDING_TTL_S counts no pending bytes (its writer died mid-write),
and one not updated for `stale_s` is deleted (its writer is gone; one that was only idle for
stale_s / 2 publishes under a new name with fresh counts). Ages are this host's clock against
the file's mtime: the nodes sharing a store need clocks in step to within seconds (NTP does).
Never: reads block contents, or imports torch.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from epserve.fleet.kv_block_format import write_atomic

LEDGER_DIR = ".writers"
PENDING_TTL_S = 60.0   # a live writer republishes after every block: one silent this long died mid-write


@dataclass
class Counts:
    pending: int = 0     # reserved, not yet written or given back
    added: int = 0       # block bytes this writer put in the store, under this ledger name
    removed: int = 0     # block bytes this writer deleted from the store, under this ledger name


class WriterLedger:
    """This process's ledger under root, and its reading of the others' since its last scan."""

    def __init__(self, root: Path, stale_s: float):
        self.dir = root / LEDGER_DIR
        self.stale_s = stale_s
        self.own = Counts()
        self.at_scan: dict[str, Counts] = {}   # the others' baselines at the last scan (scan_baseline)
        self._new_name()

    def _new_name(self) -> None:
        self.name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        self.own.added = self.own.removed = 0
        self._published = time.time()

    def publish(self, lock) -> None:
        """Write this process's counts, read under `lock` (raises OSError: the caller decides what a
        fault means). After stale_s / 2 without one, under a new name with fresh counts: the old
        ledger may be swept by then, and a reader that never saw it would count all its bytes as new."""
        with lock:
            if time.time() - self._published > self.stale_s / 2:
                self._new_name()
            c = Counts(self.own.pending, self.own.added, self.own.removed)
        write_atomic(self.dir / self.name, [f"{c.pending} {c.added} {c.removed}\n".encode()], False)
        self._published = time.time()

    def scan_baseline(self, before: dict[str, Counts], after: dict[str, Counts]) -> None:
        """Take the others' ledgers read right before (`before`) and right after (`after`) a scan of
        the blocks as the baseline: `added` from before (a block added during the scan is counted
        twice, never missed), `removed` from after (a block removed during it, likewise)."""
        self.at_scan = {name: Counts(0, before[name].added if name in before else 0,
                                     after[name].removed if name in after else before[name].removed)
                        for name in before.keys() | after.keys()}

    def others_since_scan(self) -> tuple[int, int]:
        """(bytes the other writers have reserved, bytes they added less removed since the baseline)."""
        pending = net = 0
        for name, now in self.read_others(sweep=False).items():
            then = self.at_scan.get(name, Counts())
            pending += now.pending
            net += (now.added - then.added) - (now.removed - then.removed)
        return pending, net

    def read_others(self, sweep: bool) -> dict[str, Counts]:
        """The other writers' counts (pending zeroed where silent for PENDING_TTL_S; a file that is
        not three non-negative integers is no ledger of ours and is skipped); sweep: also delete
        the ledgers and temp files of writers silent for stale_s."""
        out: dict[str, Counts] = {}
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return out                       # no writer has published yet
        wall = time.time()
        for e in entries:
            if e.name == self.name:
                continue
            with contextlib.suppress(OSError, ValueError):   # vanished, or not a ledger
                age = wall - e.stat().st_mtime
                if sweep and age > self.stale_s:
                    os.unlink(e.path)
                    continue
                if e.name.endswith(".tmp"):
                    continue
                pending, added, removed = (int(v) for v in Path(e.path).read_text().split())
                if min(pending, added, removed) >= 0:
                    out[e.name] = Counts(pending if age <= PENDING_TTL_S else 0, added, removed)
        return out
