"""LedgerActor: batches usage and capacity rows into the Parquet ledger (fleet/ledger.py).

One per deployment. The ingress sends a RequestRow per request that reached a unit
(finished, failed or aborted) and waits until append() returns: by then the row is in
the writer's write-ahead log, so a flush, a shutdown, a SIGTERM or a kill -9 of this
actor loses no row whose response was sent. Ray restarts the actor (max_restarts=-1);
the new writer replays the dead one's log, and a call that died with it is retried
(max_task_retries=-1) and refused as a duplicate if its rows had been taken.
Rows are flushed every `flush_rows` rows or `flush_interval_s` seconds into new
immutable parts.
"""
from __future__ import annotations

import asyncio
import logging

import ray

from epserve.fleet.ledger import LedgerWriter

log = logging.getLogger("epserve.ledger")


async def append_durably(ledger, root: str, rows: list, timeout_s: float = 30.0) -> None:
    """Wait until the ledger actor has `rows` in its log; if it cannot be reached in time, write them
    as a part of this process's own under the same root (a late duplicate is read once)."""
    try:
        await asyncio.wait_for(ledger.append.remote(rows), timeout_s)
    except Exception as exc:
        log.error("ledger did not take %d row(s) (%r); writing them to %s directly", len(rows), exc, root)

        def write():
            with LedgerWriter(root, flush_rows=len(rows)) as w:
                for row in rows:
                    w.append(row)
        await asyncio.to_thread(write)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class LedgerActor:
    def __init__(self, root: str, flush_rows: int = 256, flush_interval_s: float = 10.0):
        self.writer = LedgerWriter(root, flush_rows=flush_rows, flush_interval_s=flush_interval_s)
        self.interval = flush_interval_s
        self.task = None

    def _ensure_ticker(self) -> None:
        """A quiet ledger still flushes on time; started on first use, so also after a restart."""
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.writer.flush_if_due()

    async def start(self) -> int:
        """Rows replayed from a dead writer's log when this actor started."""
        self._ensure_ticker()
        return self.writer.n_recovered

    @ray.method(enable_task_events=False)
    async def append(self, rows: list) -> int:
        """Take rows (logged before this returns); returns how many were new."""
        self._ensure_ticker()
        return sum(self.writer.append(row) for row in rows)

    async def flush(self) -> int:
        return len(self.writer.flush())

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.close()
