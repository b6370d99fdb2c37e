"""Every writer's running byte count in a shared KV block directory, so one rank's eviction
decision sees the other ranks' writes without rescanning the directory.

Why: each process evicts on its own view of the directory (fleet/kv_block_index.py), rebuilt
by a scan that costs a stat per block, so it runs at most every `rescan_interval_s`. Between
scans another rank's writes were invisible, and a store shared by the ranks of a unit ran over
its capacity by what they wrote meanwhile. Now each writer keeps root/.writers/<id>, three
integers `pending added removed`: the bytes it has reserved and not yet written, and the bytes
it has added to and removed from the store in all. A reader counts, for every other writer,
pending + what it added and removed since the reader's last scan. The snapshot is taken before
the scan, so a block landing in between is counted twice (a rescan too many), never missed; and
a writer reserves before it checks, so of two writers racing for the last room the second sees
the first. Reading the ledgers costs one small read per writing rank, not per block.

A ledger is published by atomic rename, like the blocks, so no lock is needed on a shared file
system. One not updated for PENDING_TTL_S counts no pending bytes (its writer died mid-write),
and one not updated for `stale_s` is deleted (its writer is gone; one that was only idle writes
it again, and readers then see all its bytes once, which costs them a rescan).
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
    added: int = 0       # block bytes this writer put in the store, in all
    removed: int = 0     # block bytes this writer deleted from the store, in all


class WriterLedger:
    """This process's ledger under root, and its reading of the others' since its last scan."""

    def __init__(self, root: Path, stale_s: float):
        self.dir = root / LEDGER_DIR
        self.name = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
        self.stale_s = stale_s
        self.own = Counts()
        self.at_scan: dict[str, Counts] = {}   # the others' counts read right before the last scan

    def publish(self) -> None:
        """Write this process's counts (raises OSError: the caller decides what a fault means)."""
        c = self.own
        write_atomic(self.dir / self.name, [f"{c.pending} {c.added} {c.removed}\n".encode()], False)

    def others_since_scan(self) -> int:
        """Bytes the other writers have reserved, or added less removed, since at_scan was read."""
        total = 0
        for name, now in self.read_others(sweep=False).items():
            then = self.at_scan.get(name, Counts())
            total += now.pending + (now.added - then.added) - (now.removed - then.removed)
        return total

    def read_others(self, sweep: bool) -> dict[str, Counts]:
        """The other writers' counts (pending zeroed where silent for PENDING_TTL_S); sweep: also
        delete the ledgers and temp files of writers silent for stale_s. Read one right before a scan
        and keep it as at_scan."""
        out: dict[str, Counts] = {}
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return out                       # no writer has published yet
        wall = time.time()
        for e in entries:
            if e.name == self.name:
                continue
            with contextlib.suppress(OSError, ValueError):   # vanished, or torn by a foreign tool
                age = wall - e.stat().st_mtime
                if sweep and age > self.stale_s:
                    os.unlink(e.path)
                    continue
                if e.name.endswith(".tmp"):
                    continue
                pending, added, removed = (int(v) for v in Path(e.path).read_text().split())
                out[e.name] = Counts(pending if age <= PENDING_TTL_S else 0, added, removed)
        return out
