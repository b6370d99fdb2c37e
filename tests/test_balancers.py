"""Prefill and decode balancers: pure, table-driven, plus 1000-request simulations."""
import random

import pytest

from epserve.messages import RankRef, RankStats
from epserve.placement.decode_balancer import apply_decode_choice, pick_decode_rank, with_bookings
from epserve.placement.prefill_balancer import (
    NoRankAvailable, apply_prefill_choice, attn_work, pick_min_max, pick_prefill_rank,
)

R = RankRef


def S(unit, rank, **kw):
    return RankStats(unit=unit, rank=rank, **kw)


# ---------------------------------------------------------------- prefill

@pytest.mark.parametrize("new, cached, work", [(100, 0, 5000.0), (100, 1000, 105000.0), (0, 5000, 0.0), (1, 0, 0.5)])
def test_attn_work(new, cached, work):
    assert attn_work(new, cached) == work


PREFILL_CASES = [
    # (name, stats, new_tokens, cached_tokens, expected)
    ("all empty -> lowest (unit, rank)", [S(1, 0), S(0, 1), S(0, 0)], 100, 0, R(0, 0)),
    ("least loaded in both", [S(0, 0, pending_attn_work=1e6, pending_prefill_tokens=900),
                              S(0, 1, pending_attn_work=1e3, pending_prefill_tokens=10),
                              S(1, 0, pending_attn_work=5e5, pending_prefill_tokens=500)], 100, 0, R(0, 1)),
    ("long cached context goes where attention is light",
     [S(0, 0, pending_attn_work=1e6, pending_prefill_tokens=100),
      S(0, 1, pending_attn_work=1e3, pending_prefill_tokens=1000)], 10, 10000, R(0, 1)),
    ("attention about even -> tokens decide",
     [S(0, 0, pending_attn_work=1.2e6, pending_prefill_tokens=100),
      S(0, 1, pending_attn_work=1.0e6, pending_prefill_tokens=3000)], 100, 0, R(0, 0)),
    ("dead rank skipped", [S(0, 0, is_alive=False), S(0, 1, pending_prefill_tokens=50, pending_attn_work=9.0)],
     10, 0, R(0, 1)),
    ("draining rank skipped", [S(0, 0, is_draining=True), S(2, 3, pending_prefill_tokens=50, pending_attn_work=9.0)],
     10, 0, R(2, 3)),
    ("equal load -> fewest requests", [S(0, 0, n_running=3), S(0, 1, n_running=1, n_waiting=1), S(0, 2, n_running=5)],
     10, 0, R(0, 1)),
    ("max held elsewhere -> least loaded of the rest",
     [S(0, 0, pending_attn_work=1e9, pending_prefill_tokens=10**6),
      S(0, 1, pending_attn_work=2e3, pending_prefill_tokens=20),
      S(0, 2, pending_attn_work=1e3, pending_prefill_tokens=10)], 10, 0, R(0, 2)),
    ("zero-token request still placed", [S(0, 0, n_waiting=2), S(0, 1)], 0, 64, R(0, 1)),
]


@pytest.mark.parametrize("name, stats, new, cached, expected", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_pick_prefill_rank(name, stats, new, cached, expected):
    assert pick_prefill_rank(stats, new, cached) == expected


@pytest.mark.parametrize("stats, message", [
    ([], r"0 of 0 ranks eligible \(0 dead, 0 draining\)"),
    ([S(0, 0, is_alive=False), S(0, 1, is_draining=True), S(0, 2, is_alive=False, is_draining=True)],
     r"no prefill rank available: 0 of 3 ranks eligible \(2 dead, 1 draining\)"),
])
def test_prefill_no_rank(stats, message):
    with pytest.raises(NoRankAvailable, match=message):
        pick_prefill_rank(stats, 10, 0)
    assert issubclass(NoRankAvailable, RuntimeError)


@pytest.mark.parametrize("args, message", [((-1, 0), "new_tokens=-1"), ((5, -3), "cached_tokens=-3")])
def test_prefill_rejects_negative(args, message):
    with pytest.raises(ValueError, match=message):
        pick_prefill_rank([S(0, 0)], *args)


def test_duplicate_ranks_rejected():
    with pytest.raises(ValueError, match="more than once"):
        pick_prefill_rank([S(0, 0), S(0, 0)], 1, 0)


def test_apply_prefill_choice_books_one_request():
    stats = [S(0, 0), S(0, 1, n_waiting=1, pending_prefill_tokens=5, pending_attn_work=2.0)]
    out = apply_prefill_choice(stats, R(0, 1), 100, 50)
    assert out[0] == stats[0]
    assert (out[1].n_waiting, out[1].pending_prefill_tokens, out[1].pending_attn_work) == (2, 105, 2.0 + 100 * 100)
    assert stats[1].n_waiting == 1  # input untouched
    with pytest.raises(ValueError, match=r"RankRef\(unit=7, rank=0\) is not among the 2 prefill ranks"):
        apply_prefill_choice(stats, R(7, 0), 1, 0)


def _brute_force(before, after, cand, ties):
    """Reference for pick_min_max: recompute every rank's load for every candidate."""
    n, best = len(before), None
    for c in range(n):
        if not cand[c]:
            continue
        loads = [after[i] if i == c else before[i] for i in range(n)]
        worst = own = 0.0
        for d in range(len(before[0])):
            mean = sum(v[d] for v in loads) / n
            if mean > 0:
                worst = max(worst, max(v[d] for v in loads) / mean)
                own = max(own, loads[c][d] / mean)
        key = (worst, own, ties[c])
        best = (key, c) if best is None or key < best[0] else best
    return None if best is None else best[1]


def test_pick_min_max_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 7)
        before = [(float(rng.randint(0, 5)), float(rng.randint(0, 5))) for _ in range(n)]
        after = [(a + rng.randint(0, 3), t + rng.randint(0, 3)) for a, t in before]
        cand = [rng.random() < 0.8 for _ in range(n)]
        ties = [(rng.randint(0, 2), i) for i in range(n)]
        assert pick_min_max(before, after, cand, ties) == _brute_force(before, after, cand, ties)


def _spread(values):
    return max(values) / (sum(values) / len(values))


def test_prefill_equalises_1000_requests_vs_random():
    rng = random.Random(1)
    requests = [(rng.randint(1, 4096), rng.choice([0, 0, rng.randint(0, 16384)])) for _ in range(1000)]
    start = [S(u, r) for u in range(2) for r in range(4)]
    balanced, rand = list(start), list(start)
    for new, cached in requests:
        balanced = apply_prefill_choice(balanced, pick_prefill_rank(balanced, new, cached), new, cached)
        rand = apply_prefill_choice(rand, rng.choice(start).ref, new, cached)
    for field in ("pending_attn_work", "pending_prefill_tokens"):
        got = _spread([getattr(s, field) for s in balanced])
        baseline = _spread([getattr(s, field) for s in rand])
        assert got < 1.06, (field, got)
        assert got < baseline, (field, got, baseline)


# ---------------------------------------------------------------- decode

DECODE_CASES = [
    # (name, stats, kv_blocks_needed, expected)
    ("all empty -> lowest", [S(0, 1, kv_blocks_total=100), S(0, 0, kv_blocks_total=100)], 10, R(0, 0)),
    ("lowest KV fraction and count", [S(0, 0, kv_blocks_used=50, kv_blocks_total=100, n_running=2),
                                      S(0, 1, kv_blocks_used=10, kv_blocks_total=100, n_running=2)], 5, R(0, 1)),
    ("fraction, not absolute blocks", [S(0, 0, kv_blocks_used=60, kv_blocks_total=1000, n_running=1),
                                       S(0, 1, kv_blocks_used=30, kv_blocks_total=100, n_running=1)], 5, R(0, 0)),
    ("too few free blocks skipped", [S(0, 0, kv_blocks_used=95, kv_blocks_total=100),
                                     S(0, 1, kv_blocks_used=50, kv_blocks_total=60, n_running=9)], 8, R(0, 1)),
    ("exact fit allowed", [S(0, 0, kv_blocks_used=92, kv_blocks_total=100)], 8, R(0, 0)),
    ("dead and draining skipped", [S(0, 0, kv_blocks_total=100, is_alive=False),
                                   S(0, 1, kv_blocks_total=100, is_draining=True),
                                   S(1, 5, kv_blocks_used=90, kv_blocks_total=100, n_running=7)], 1, R(1, 5)),
    ("equal KV -> fewer requests", [S(0, 0, kv_blocks_used=10, kv_blocks_total=100, n_running=4),
                                    S(0, 1, kv_blocks_used=10, kv_blocks_total=100, n_running=3)], 1, R(0, 1)),
    ("none fits -> None", [S(0, 0, kv_blocks_used=95, kv_blocks_total=100),
                           S(0, 1, kv_blocks_total=4)], 6, None),
]


@pytest.mark.parametrize("name, stats, need, expected", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_pick_decode_rank(name, stats, need, expected):
    assert pick_decode_rank(stats, need) == expected


def test_decode_no_live_rank_raises():
    stats = [S(0, 0, kv_blocks_total=9, is_alive=False), S(0, 1, kv_blocks_total=9, is_draining=True)]
    with pytest.raises(NoRankAvailable, match=r"no decode rank available: 0 of 2 ranks eligible \(1 dead, 1 draining\)"):
        pick_decode_rank(stats, 1)
    with pytest.raises(ValueError, match="kv_blocks_needed=-2"):
        pick_decode_rank([S(0, 0, kv_blocks_total=9)], -2)


def test_apply_decode_choice():
    stats = [S(0, 0, kv_blocks_used=3, kv_blocks_total=10)]
    out = apply_decode_choice(stats, R(0, 0), 7)
    assert (out[0].kv_blocks_used, out[0].n_waiting, out[0].kv_blocks_free) == (10, 1, 0)
    with pytest.raises(ValueError, match=r"has 0 free KV blocks, fewer than the 1 needed"):
        apply_decode_choice(out, R(0, 0), 1)
    with pytest.raises(ValueError, match="not among the 1 decode ranks"):
        apply_decode_choice(stats, R(0, 1), 1)


def test_decode_never_overcommits_and_fills_up():
    rng = random.Random(2)
    stats = [S(u, r, kv_blocks_total=rng.choice([100, 150, 200])) for u in range(2) for r in range(4)]
    stats[3] = RankStats(0, 3, kv_blocks_total=500, is_draining=True)
    n_none = 0
    for _ in range(1000):
        need = rng.randint(1, 20)
        ref = pick_decode_rank(stats, need)
        live = [s for s in stats if s.is_alive and not s.is_draining]
        if ref is None:
            n_none += 1
            assert all(s.kv_blocks_free < need for s in live)
            continue
        assert ref != R(0, 3)
        stats = apply_decode_choice(stats, ref, need)
        assert all(s.kv_blocks_used <= s.kv_blocks_total for s in stats)
    assert n_none > 0  # the fleet did fill up
    assert stats[3].kv_blocks_used == 0


def test_decode_equalises_1000_requests_vs_random():
    rng = random.Random(3)
    start = [S(u, r, kv_blocks_total=4096) for u in range(2) for r in range(4)]
    balanced, rand = list(start), list(start)
    for _ in range(1000):
        need = rng.randint(1, 30)
        balanced = apply_decode_choice(balanced, pick_decode_rank(balanced, need), need)
        rand = apply_decode_choice(rand, rng.choice(start).ref, need)
    for field in ("kv_blocks_used", "n_requests"):
        got = _spread([getattr(s, field) for s in balanced])
        baseline = _spread([getattr(s, field) for s in rand])
        assert got < 1.02, (field, got)
        assert got < baseline, (field, got, baseline)


def test_bookings_keep_pages_the_ranks_do_not_report_yet():
    reported = [S(0, 0, kv_blocks_total=32, kv_blocks_used=4, n_running=1), S(0, 1, kv_blocks_total=32)]
    # rank 0 has 24 pages booked (its running request and two still in prefill), rank 1 none
    view = with_bookings(reported, {R(0, 0): (24, 3)})
    assert (view[0].kv_blocks_used, view[0].n_requests) == (24, 3)
    assert view[1] == reported[1]
    assert pick_decode_rank(view, 12) == R(0, 1)
    assert pick_decode_rank(with_bookings(reported, {R(0, 0): (24, 3), R(0, 1): (24, 2)}), 12) is None
    # a report above the bookings (requests the router does not know) wins
    assert with_bookings([S(0, 0, kv_blocks_total=32, kv_blocks_used=30)], {R(0, 0): (12, 1)})[0].kv_blocks_used == 30
