"""SinkRoutes: a rank's table of where each request's tokens go, and the push that sends them.

Each Sequence arrives naming its stream sink (actors/stream_sink.py); the rank keeps request
-> sink here and, at each push, groups the held deltas and rejections by sink and sends one
Delivery per sink, numbered per sink (so each sink applies a rank's pushes in order). A request
leaves the table when it finishes, is rejected, or is aborted; a dead sink's requests are listed
for the rank to abort. Used on the rank's loop thread only. Never: steps, reports stats (the
supervisor's RankReport is the rank's), or sends anything to the supervisor.
"""
from __future__ import annotations

from epserve.messages import Deltas, Delivery, TokenDelta
from epserve.pipelines.sequence import Sequence


class SinkRoutes:
    def __init__(self, unit_key: str = "", rank: int = 0, generation: int = 0):
        self.unit_key, self.rank, self.generation = unit_key, rank, generation
        self.sink_of: dict[str, str] = {}          # request id -> its sink's key
        self.sinks: dict[str, object] = {}         # sink key -> handle
        self.n_pushes: dict[str, int] = {}         # sink key -> Deliveries sent (the next one's seq)

    def add(self, seq: Sequence) -> None:
        """Note the request's sink and take the handle off the Sequence (nothing per step carries it)."""
        if seq.sink is None:                        # a driven step's request (benchmarks): pushed nowhere
            return
        key = seq.sink._actor_id.hex()
        self.sinks.setdefault(key, seq.sink)
        self.sink_of[seq.request_id] = key
        seq.sink = None

    def drop(self, request_id: str) -> None:
        self.sink_of.pop(request_id, None)

    def drop_sink(self, key: str) -> list[str]:
        """Forget a dead sink -> the requests that were going to it (the rank aborts them)."""
        rids = [rid for rid, k in self.sink_of.items() if k == key]
        for rid in rids:
            del self.sink_of[rid]
        self.sinks.pop(key, None)
        return rids

    def push(self, deltas: list[TokenDelta], rejected: list[tuple[str, Exception]]) -> int:
        """One fire-and-forget Delivery per sink with anything to say -> how many were sent.
        Deltas of a request no longer in the table (aborted meanwhile) go nowhere."""
        per: dict[str, tuple[list, list]] = {}
        for d in deltas:
            key = self.sink_of.get(d.request_id)
            if key is not None:
                per.setdefault(key, ([], []))[0].append(d)
                if d.finish_reason is not None:
                    del self.sink_of[d.request_id]
        for rid, why in rejected:
            key = self.sink_of.pop(rid, None)
            if key is not None:
                per.setdefault(key, ([], []))[1].append((rid, why))
        sent = 0
        for key, (ds, rj) in per.items():
            sink = self.sinks.get(key)
            if sink is None:
                continue
            n = self.n_pushes.get(key, 0)
            sink.deliver.remote(Delivery(self.unit_key, self.rank, Deltas.pack(ds), rj, n, self.generation))
            self.n_pushes[key] = n + 1
            sent += 1
        return sent

    @property
    def n_sent(self) -> int:
        return sum(self.n_pushes.values())
