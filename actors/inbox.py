"""A rank's inbox: what the actor's other threads hand its step loop, and where an idle loop parks.

Posts (requests, aborts, switch requests, stop) come from remote calls on the actor's other
threads; the loop drains them once per step, in arrival order. A loop with nothing to do on any
rank of its unit parks on the inbox until a post or a peer's wake arrives (or `timeout_s`
passes: it then re-checks with its peers). A post to a parked inbox returns True: the poster
then wakes the unit's other ranks, which are parked too.

Plain threading; no Ray and no engine. Never blocks a poster beyond its short lock.
"""
from __future__ import annotations

import threading


class Inbox:
    """Messages as (kind, payload) pairs, in arrival order; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: list[tuple[str, object]] = []
        self._event = threading.Event()          # set: a post or a wake since the last drain
        self._parked = False

    def post(self, kind: str, payload) -> bool:
        """Append one message and wake the loop; -> True when the loop was parked (wake its peers)."""
        with self._lock:
            self._items.append((kind, payload))
            self._event.set()
            was_parked, self._parked = self._parked, False
        return was_parked

    def wake(self) -> None:
        """End a park without a message (a peer got work)."""
        self._event.set()

    def drain(self) -> list[tuple[str, object]]:
        """Every message posted since the last drain, oldest first."""
        with self._lock:
            msgs, self._items = self._items, []
            self._event.clear()
        return msgs

    def park(self, timeout_s: float) -> bool:
        """Wait for a post or a wake, at most timeout_s. -> True, at once, when messages came in
        after the last drain (the unit agreed to park on stale news: wake the peers); else False
        after the wait."""
        with self._lock:
            if self._items:
                return True
            self._parked = True
        self._event.wait(timeout_s)
        with self._lock:
            self._parked = False
        return False
