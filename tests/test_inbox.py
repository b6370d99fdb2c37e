"""actors/inbox.py: a rank's inbox keeps arrival order, tells a poster when the loop was parked
(so the peers get woken), and a park ends at once on news that came after the last drain."""
from __future__ import annotations

import threading

from epserve.actors.inbox import Inbox


def test_drain_returns_posts_in_arrival_order_once():
    box = Inbox()
    for i, kind in enumerate(("add", "abort", "switch")):
        assert box.post(kind, i) is False              # the loop was not parked
    assert box.drain() == [("add", 0), ("abort", 1), ("switch", 2)]
    assert box.drain() == []


def test_a_park_on_undrained_news_returns_at_once_and_marks_nothing_parked():
    box = Inbox()
    box.post("add", "r1")
    assert box.park(timeout_s=600) is True             # would block for 10 minutes if it waited
    assert box.post("abort", "r1") is False


def test_a_post_ends_a_park_and_tells_the_poster_it_was_parked():
    box = Inbox()
    ends = []

    def loop():                                        # as the rank's loop: drain what came, park again
        while box.park(timeout_s=600):
            box.drain()
        ends.append("woken")

    t = threading.Thread(target=loop)
    t.start()
    while not box.post("add", "r2"):                   # until a post finds the loop parked
        t.join(0.001)
    t.join()
    assert ends == ["woken"] and box.drain() == [("add", "r2")]


def test_a_wake_ends_a_park_without_a_message():
    box = Inbox()
    done = []
    t = threading.Thread(target=lambda: done.append(box.park(timeout_s=600)))
    t.start()
    while t.is_alive():
        box.wake()
        t.join(0.01)
    assert done == [False] and box.drain() == []
