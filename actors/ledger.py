"""LedgerActor: batches usage and capacity rows into the Parquet ledger (fleet/ledger.py).

One per deployment. The ingress sends a RequestRow per finished request and the
deployment a CapacityRow per unit start/stop; rows are flushed every `flush_rows`
rows or `flush_interval_s` seconds into new immutable files, so a crash loses at
most the unflushed batch.
"""
from __future__ import annotations

import asyncio

import ray

from epserve.fleet.ledger import LedgerWriter


@ray.remote(num_cpus=0, max_restarts=0)
class LedgerActor:
    def __init__(self, root: str, flush_rows: int = 256, flush_interval_s: float = 10.0):
        self.writer = LedgerWriter(root, flush_rows=flush_rows, flush_interval_s=flush_interval_s)
        self.interval = flush_interval_s
        self.task = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.writer.flush_if_due()

    def append(self, rows: list) -> None:
        for row in rows:
            self.writer.append(row)

    def flush(self) -> int:
        return len(self.writer.flush())

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.close()
