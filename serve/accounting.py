"""Per-request accounting at the front door: what each admitted request computed, and its ledger row.

Contract (issue 15, "nothing lost"): every request that reached a unit gets exactly one
RequestRow, whatever its end (finished, stopped, failed after admission, aborted by a
client that went away, cut by a shutdown), with the tokens actually computed and its
finish reason. A response is sent only after its row is in the ledger's write-ahead
log (`await LedgerActor.append`), so a flush, shutdown or crash right after a response
cannot miss a billed row. If the ledger cannot be reached in time, the row is written
by this process itself as a one-row part (same root), never dropped; a duplicate from a
late-landing append is read once (fleet/ledger_read.py).

Where awaiting is impossible (the request's task is being cancelled by a disconnect:
Starlette cancels its scope, so any await in it raises again) the row is written by a
detached task; shutdown (`drain`) waits for those and writes rows for whatever is still
in flight.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from epserve.fleet.ledger import LedgerWriter, RequestRow

log = logging.getLogger("epserve.accounting")
LEDGER_TIMEOUT_S = 30.0


@dataclass
class Live:
    """One admitted request, from admission to its row."""

    rid: str
    tenant: str
    n_prompt: int
    route: object = None                # serve/router.py's Route (prefill and decode rank)
    t0: float = field(default_factory=time.time)
    t_first: float | None = None
    n_cached: int = 0                   # prompt tokens loaded from the KV store
    n_out: int = 0                      # output tokens the units produced for it
    namespace: str = ""                 # its tenant's KV-store namespace
    user: str | None = None             # the request's `user` field (the caller's end-user id), for its row


class Accounting:
    def __init__(self, ledger, ledger_root: str, model_name: str,
                 on_end: Callable[[Live], None] = lambda live: None):
        self.ledger, self.root, self.model_name, self.on_end = ledger, ledger_root, model_name, on_end
        self.live: dict[str, Live] = {}
        self._detached: set[asyncio.Task] = set()
        self._fallback: LedgerWriter | None = None
        self._fallback_lock = threading.Lock()

    def admit(self, live: Live) -> Live:
        self.live[live.rid] = live
        return live

    def row(self, live: Live, reason: str) -> RequestRow:
        now = time.time()
        first = live.t_first or now
        r = live.route
        return RequestRow(ts=now, request_id=live.rid, tenant=live.tenant, model=self.model_name,
                          prompt_tokens=live.n_prompt, cache_hit_tokens=min(live.n_cached, live.n_prompt),
                          output_tokens=live.n_out, ttft_s=first - live.t0, decode_s=now - first,
                          prefill_unit=r.prefill.unit if r else -1, prefill_rank=r.prefill.rank if r else -1,
                          decode_unit=r.decode.unit if r else -1, decode_rank=r.decode.rank if r else -1,
                          finish_reason=reason, user=live.user)

    async def finish(self, rid: str, reason: str, n_out: int | None = None) -> Live | None:
        """Write rid's row and wait until the ledger has it. Once per request: later calls do nothing.

        n_out: output tokens the client received and is billed for (default: what the units made)."""
        live = self._end(rid)
        if live is not None:
            if n_out is not None:
                live.n_out = n_out
            await self._write(self.row(live, reason))
        return live

    def finish_detached(self, rid: str, reason: str) -> None:
        """finish() from a task that is being cancelled: the write runs on as its own task."""
        live = self._end(rid)
        if live is not None:
            task = asyncio.get_running_loop().create_task(self._write(self.row(live, reason)))
            self._detached.add(task)
            task.add_done_callback(self._detached.discard)

    def _end(self, rid: str) -> Live | None:
        live = self.live.pop(rid, None)
        if live is not None:
            self.on_end(live)
        return live

    async def drain(self, reason: str = "abort") -> int:
        """Shutdown: rows for requests still in flight, then every pending write. Returns rows written."""
        rids = list(self.live)
        for rid in rids:
            self.finish_detached(rid, reason)
        if self._detached:
            await asyncio.gather(*self._detached, return_exceptions=True)
        with self._fallback_lock:
            if self._fallback is not None:
                self._fallback.close()
                self._fallback = None
        return len(rids)

    async def _write(self, row: RequestRow) -> None:
        if self.ledger is None:
            return
        try:
            await asyncio.wait_for(self.ledger.append.remote([row]), LEDGER_TIMEOUT_S)
        except Exception as exc:      # ledger gone or stuck: write it ourselves rather than lose it
            log.error("ledger did not take row %s (%r); writing it to %s directly", row.request_id, exc, self.root)
            await asyncio.to_thread(self._write_fallback, row)

    def _write_fallback(self, row: RequestRow) -> None:
        with self._fallback_lock:
            if self._fallback is None:
                self._fallback = LedgerWriter(self.root, flush_rows=1)
            self._fallback.append(row)
