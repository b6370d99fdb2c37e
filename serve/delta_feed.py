"""⑥ DeltaFeed: an ingress replica's stream sink and the one streaming call that brings its deltas.

Each replica starts one StreamSink (actors/stream_sink.py; owned by the replica, so it dies with
it, and the units then abort its requests). The ranks push the tokens of this replica's
requests straight to that sink, in batches; the sink hands them on through ONE long-lived
streaming call (`feed`) that yields lists of (request_id, item), and this class demultiplexes
them into one asyncio queue per request. A token costs no Ray call of its own on this path:
a decode step's deltas for every stream of a rank travel in one push, then in one yield.

Never: decides routes (serve/router.py) or shapes responses (serve/responses.py).
"""
from __future__ import annotations

import asyncio
import logging
import uuid

from epserve.actors.stream_sink import StreamSink
from epserve.errors import UnitLost
from epserve.messages import RequestResult

log = logging.getLogger("epserve.feed")


class DeltaFeed:
    def __init__(self):
        from epserve.actors.cluster import control_options
        self._options = control_options()
        self.sink = self._start_sink()
        self.queues: dict[str, asyncio.Queue] = {}
        self.task: asyncio.Task | None = None

    def _start_sink(self):
        # named so that `epserve bench delta_path` can read its counters; owned by this replica
        return StreamSink.options(name=f"epserve-sink-{uuid.uuid4().hex[:12]}", **self._options).remote()

    def _ensure(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._pump(self.sink))

    async def _pump(self, sink) -> None:
        try:
            async for ref in sink.feed.options(num_returns="streaming").remote():
                for rid, item in await ref:
                    q = self.queues.get(rid)
                    if q is not None:           # else its consumer left (and aborted it)
                        q.put_nowait(item)
        except Exception as exc:                # the sink died: fail what it carried, start another
            log.warning("stream sink lost (%r); failing %d stream(s) and starting a new sink", exc, len(self.queues))
            if self.sink is sink:
                self.sink = self._start_sink()
            for q in self.queues.values():
                q.put_nowait(UnitLost(f"the stream sink carrying this request is gone ({type(exc).__name__}); retry"))

    async def prefill(self, unit, seq, rank: int) -> RequestResult:
        """The prefill role's whole answer (first token, KV block refs) in one call."""
        return await self.sink.prefill.remote(unit, seq, rank)

    async def stream(self, unit, seq, rank: int):
        """Yield the request's TokenDeltas until it finishes; raise what failed it; abort it on the
        units if the consumer leaves first."""
        self._ensure()
        rid, sink = seq.request_id, self.sink
        q: asyncio.Queue = asyncio.Queue()
        self.queues[rid] = q
        finished = False
        try:
            await sink.open_stream.remote(unit, seq, rank)
            while True:
                item = await q.get()
                if isinstance(item, Exception):
                    finished = True             # the sink has forgotten it already
                    raise item
                if item is None:                # aborted
                    finished = True
                    return
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self.queues.pop(rid, None)
            if not finished:
                sink.abort.remote(unit, rid)

    def abort(self, unit, request_id: str) -> None:
        self.sink.abort.remote(unit, request_id)

    async def stats(self) -> dict:
        return await self.sink.stats.remote()
