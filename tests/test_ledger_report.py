"""Parquet ledger (round trip, batching, crash safety, validation) and the seed's report."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest

from epserve.fleet.ledger import (
    CAPACITY_SCHEMA, REQUESTS_SCHEMA, CapacityRow, LedgerWriter, RequestRow, rows_to_table,
)
from epserve.fleet.ledger_read import read_ledger
from epserve.fleet.report import (
    Pricing, build_report, cost_usd, format_report, margin, plot_report, revenue_usd, unit_runs,
)

T0 = datetime(2025, 2, 27, 4, 0, tzinfo=timezone.utc)  # 12:00 Beijing, the seed's day


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def req(i=0, ts=None, prompt=100, hit=40, out=10, decode_s=0.5, **kw):
    base = dict(ts=ts or at(1), request_id=f"r{i}", tenant="t", model="m", prompt_tokens=prompt,
                cache_hit_tokens=hit, output_tokens=out, ttft_s=0.1, decode_s=decode_s,
                prefill_unit=0, prefill_rank=i % 4, decode_unit=1, decode_rank=i % 8, finish_reason="stop")
    return RequestRow(**(base | kw))


def cap(unit, event, hours, gpus=8, role="decode"):
    return CapacityRow(ts=at(hours), unit=unit, role=role, event=event, gpus=gpus)


class FakeClock:
    def __init__(self, t=T0.timestamp()):
        self.t = t

    def __call__(self):
        return self.t


# ---------------------------------------------------------------- ledger

def test_rows_match_schemas():
    assert [f.name for f in dataclasses.fields(RequestRow)] == REQUESTS_SCHEMA.names
    assert [f.name for f in dataclasses.fields(CapacityRow)] == CAPACITY_SCHEMA.names


def test_round_trip(tmp_path):
    rows = [req(i, ts=at(i / 10), prompt=100 + i) for i in range(5)]
    caps = [cap("decode-0", "start", 0.0), cap("decode-0", "stop", 2.0)]
    with LedgerWriter(tmp_path, clock=FakeClock()) as w:
        for r in rows + caps:
            w.append(r)
    requests, capacity = read_ledger(tmp_path)
    assert requests.schema == REQUESTS_SCHEMA and capacity.schema == CAPACITY_SCHEMA
    assert requests.to_pylist() == [dataclasses.asdict(r) for r in rows]
    assert capacity.to_pylist() == [dataclasses.asdict(r) for r in caps]
    assert requests["ts"].type == pa.timestamp("us", tz="UTC")


def test_flush_by_rows_and_by_time(tmp_path):
    clock = FakeClock()
    w = LedgerWriter(tmp_path, flush_rows=3, flush_interval_s=60.0, clock=clock)
    parts = lambda: sorted((tmp_path / "requests").glob("part-*.parquet"))  # noqa: E731
    w.append(req(0))
    w.append(req(1))
    assert parts() == [] and w.n_buffered == 2
    w.append(req(2))  # third row: batch full
    assert len(parts()) == 1 and w.n_buffered == 0
    w.append(req(3))
    clock.t += 59.0
    w.append(req(4))
    assert len(parts()) == 1
    clock.t += 1.0
    w.append(req(5))  # oldest buffered row is now 60 s old
    assert len(parts()) == 2 and w.n_buffered == 0
    w.append(req(6))
    clock.t += 30.0
    assert w.flush_if_due() == [] and w.n_buffered == 1
    clock.t += 30.0
    assert len(w.flush_if_due()) == 1 and w.n_buffered == 0  # a quiet writer flushes on its owner's timer
    w.append(req(7))
    w.close()
    assert len(parts()) == 4 and read_ledger(tmp_path).requests.num_rows == 8
    assert not list((tmp_path / "requests").glob(".*"))  # no temp files left behind
    with pytest.raises(RuntimeError, match="closed"):
        w.append(req(8))


def test_crash_leftovers_are_named_not_hidden(tmp_path):
    with LedgerWriter(tmp_path, clock=FakeClock()) as w:
        for i in range(4):
            w.append(req(i))
    folder = tmp_path / "requests"
    good = next(folder.glob("part-*.parquet"))
    # a kill -9 mid-flush leaves a temp file; a copy by other tools may leave a torn part
    (folder / f".{good.name[:-8]}-999.parquet.tmp").write_bytes(good.read_bytes()[:100])
    (folder / "part-torn.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "part-garbage.parquet").write_bytes(b"not parquet at all")
    led = read_ledger(tmp_path)
    assert led.requests.num_rows == 4 and not led.is_complete and led.n_parts == 3
    assert sorted(p.path.rsplit("/", 1)[1] for p in led.bad_parts) == ["part-garbage.parquet", "part-torn.parquet"]
    assert all(p.rows is None and p.reason for p in led.bad_parts)          # temp files are not parts


def test_rows_with_nulls_are_counted_and_left_out(tmp_path):
    import pyarrow.parquet as pq
    table = rows_to_table([req(0), req(1)], REQUESTS_SCHEMA)
    col = table.schema.get_field_index("output_tokens")
    (tmp_path / "requests").mkdir()
    pq.write_table(table.set_column(col, "output_tokens", pa.array([5, None], pa.int64())),
                   tmp_path / "requests" / "part-nulls.parquet")
    led = read_ledger(tmp_path)
    assert led.requests["request_id"].to_pylist() == ["r0"] and led.null_rows == 1 and led.skipped_rows == 1


def test_kill_9_loses_nothing_once_a_writer_reopens_the_ledger(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from epserve.fleet.ledger import LedgerWriter, RequestRow
        w = LedgerWriter({str(tmp_path)!r}, flush_rows=10, flush_interval_s=1e9)
        for i in range(25):
            w.append(RequestRow(ts=1.74e9 + i, request_id=str(i), tenant="t", model="m", prompt_tokens=5,
                                cache_hit_tokens=0, output_tokens=1, ttft_s=0.1, decode_s=0.1, finish_reason="stop"))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert read_ledger(tmp_path).requests["request_id"].to_pylist() == [str(i) for i in range(20)]
    w = LedgerWriter(tmp_path)                          # e.g. the restarted ledger actor: replays the log
    assert w.n_recovered == 5 and not w.append(req(0, request_id="22"))   # a retried append of a logged row
    w.close()
    LedgerWriter(tmp_path).close()                      # nothing left to replay: no second copy
    led = read_ledger(tmp_path)
    assert led.requests["request_id"].to_pylist() == [str(i) for i in range(25)] and led.duplicate_rows == 0
    assert not list((tmp_path / "wal").glob("*.jsonl"))     # only the flushed batches' copies are left


def test_a_truncated_part_is_read_from_its_batch_log_and_nothing_is_lost(tmp_path):
    """A flushed part damaged later (the chaos suite truncates one) is named, and its rows come back
    from the batch's kept log; a part with no copy still counts as left out."""
    with LedgerWriter(tmp_path, flush_rows=3) as w:
        for i in range(7):
            w.append(req(i))
    parts = sorted((tmp_path / "requests").glob("*.parquet"))
    assert len(parts) == 3
    os.truncate(parts[0], parts[0].stat().st_size // 2)
    led = read_ledger(tmp_path)
    assert sorted(led.requests["request_id"].to_pylist()) == [f"r{i}" for i in range(7)]
    assert led.is_complete and len(led.bad_parts) == 1 and led.bad_parts[0].restored == 3
    assert "3 rows restored" in led.format() and led.to_dict()["restored_rows"] == 3
    for copy in (tmp_path / "wal" / "flushed").glob("*.jsonl"):
        copy.unlink()
    led = read_ledger(tmp_path)
    assert not led.is_complete and led.requests.num_rows == 4 and led.lost_parts == led.bad_parts


def test_a_crash_between_flush_and_log_removal_writes_no_row_twice(tmp_path):
    w = LedgerWriter(tmp_path, flush_rows=100)
    for i in range(3):
        w.append(req(i))
    log = next((tmp_path / "wal").glob("*.jsonl"))
    kept = log.read_bytes()
    w.flush()                                           # the part is written and the log removed ...
    log.write_bytes(kept)                               # ... but say the process died before the removal
    recovered = LedgerWriter(tmp_path)
    assert recovered.n_recovered == 3 and len(list((tmp_path / "requests").glob("*.parquet"))) == 1
    assert read_ledger(tmp_path).requests.num_rows == 3


def test_a_row_in_two_parts_is_read_once_and_counted_as_a_duplicate(tmp_path):
    for _ in range(2):                                  # two writers that both took r0 (a retry across a restart)
        with LedgerWriter(tmp_path, clock=FakeClock()) as w:
            w.append(req(0))
            w.append(cap("decode-0", "start", 0.0))
    led = read_ledger(tmp_path)
    assert led.requests.num_rows == 1 and led.capacity.num_rows == 1 and led.duplicate_rows == 2
    assert led.is_complete


def test_read_window(tmp_path):
    with LedgerWriter(tmp_path, clock=FakeClock()) as w:
        for h in (0.5, 1.5, 2.5):
            w.append(req(int(h * 10), ts=at(h)))
        w.append(cap("d", "start", -5.0))
        w.append(cap("d", "stop", 3.0))
    requests, capacity = read_ledger(tmp_path, start=at(1), end=at(2.5))
    assert requests["request_id"].to_pylist() == ["r15"]
    assert capacity["event"].to_pylist() == ["start"]  # earlier start kept, the stop at/after end dropped
    with pytest.raises(ValueError, match="start=.* is naive"):
        read_ledger(tmp_path, start=datetime(2025, 1, 1))
    assert read_ledger(tmp_path / "missing").requests.num_rows == 0


@pytest.mark.parametrize("make, message", [
    (lambda: req(prompt=-1, hit=0), r"prompt_tokens=-1 must be >= 0 \(request r0\)"),
    (lambda: req(out=-5), r"output_tokens=-5"),
    (lambda: req(prompt=10, hit=11), r"cache_hit_tokens=11 exceeds prompt_tokens=10"),
    (lambda: req(decode_s=float("nan")), r"decode_s=nan"),
    (lambda: req(decode_rank=-2), r"decode_rank=-2 must be >= -1"),
    (lambda: req(ts=datetime(2025, 1, 1)), r"ts=.* is naive"),
    (lambda: cap("u", "pause", 0.0), r"event='pause' must be one of \('start', 'stop'\) \(unit u\)"),
    (lambda: cap("u", "start", 0.0, role="train"), r"role='train' must be one of \('prefill', 'decode'\)"),
    (lambda: cap("u", "start", 0.0, gpus=0), r"gpus=0 must be >= 1"),
])
def test_row_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_rows_accept_posix_seconds(tmp_path):
    row = req(ts=T0.timestamp())
    assert row.ts == T0
    with pytest.raises(TypeError, match="not dict"):
        LedgerWriter(tmp_path).append({"ts": 0})


# ---------------------------------------------------------------- report

# SEED "Day and night" staircase in (hours after 12:00 Beijing, prefill units of 4 nodes, decode units of 18).
STAIRCASE = [(0, 29, 9), (12, 23, 7), (13.25, 20, 6), (14, 17, 5), (14.75, 14, 4), (15, 11, 3), (15.5, 8, 2),
             (18.5, 11, 3), (19, 14, 4), (19.5, 20, 6), (20, 23, 7), (20.5, 29, 9)]


def staircase_rows():
    """Start/stop events for the staircase; the day-shape units start an hour before the window."""
    rows, running = [], {"prefill": 0, "decode": 0}
    for hours, n_prefill, n_decode in STAIRCASE:
        for role, want, gpus in (("prefill", n_prefill, 32), ("decode", n_decode, 144)):
            t = hours - 1 if hours == 0 else hours
            for i in range(want, running[role]):
                rows.append(CapacityRow(ts=at(t), unit=f"{role}-{i}", role=role, event="stop", gpus=gpus))
            for i in range(running[role], want):
                rows.append(CapacityRow(ts=at(t), unit=f"{role}-{i}", role=role, event="start", gpus=gpus))
            running[role] = want
    return rows


def test_pricing_arithmetic_matches_seed():
    p = Pricing()
    assert cost_usd(226.75 * 8 * 24, p) == pytest.approx(87_072)
    revenue = revenue_usd(342e9, 608e9 - 342e9, 168e9, p)
    assert revenue == pytest.approx(562_027, rel=2e-4)
    assert margin(revenue, 87_072) == pytest.approx(5.45, abs=0.01)
    assert margin(1.0, 0.0) is None


def test_report_reproduces_seed_day(tmp_path):
    requests = rows_to_table(
        [req(i, ts=at(i * 3 + 1), prompt=76_000_000_000, hit=42_750_000_000, out=21_000_000_000, decode_s=1e9)
         for i in range(8)], REQUESTS_SCHEMA)
    capacity = rows_to_table(staircase_rows(), CAPACITY_SCHEMA)
    r = build_report(requests, capacity, Pricing(), start=at(0), end=at(24))
    assert (r.input_tokens, r.cache_hit_tokens, r.output_tokens) == (608e9, 342e9, 168e9)
    assert r.cache_hit_rate == pytest.approx(0.5625)
    assert r.gpu_hours == pytest.approx(226.75 * 8 * 24)
    assert (r.avg_nodes, r.peak_nodes) == (pytest.approx(226.75), 278.0)
    assert r.cost_usd == pytest.approx(87_072)
    assert r.revenue_usd == pytest.approx(562_027, rel=2e-4)
    assert r.margin == pytest.approx(5.45, abs=0.01)
    assert r.prefill_input_tps_per_node == pytest.approx(73_700, abs=50)  # seed: ≈ 73.7 k
    assert r.decode_output_tps_per_node == pytest.approx(14_800, abs=50)  # seed: ≈ 14.8 k
    text = format_report(r)
    assert "$87,072" in text and "226.75 average, 278.00 peak" in text and "545" in text
    assert json.loads(json.dumps(r.to_dict()))["cost_usd"] == pytest.approx(87_072)


@pytest.mark.parametrize("events, window, gpu_hours", [
    ([("a", "start", 1), ("a", "stop", 3)], (0, 10), 2 * 8),
    ([("a", "start", -5), ("a", "stop", 3)], (0, 10), 3 * 8),        # started before the window
    ([("a", "start", 4)], (0, 10), 6 * 8),                            # never stopped
    ([("a", "start", -5)], (0, 10), 10 * 8),                          # both
    ([("a", "start", 11), ("a", "stop", 12)], (0, 10), 0),            # after the window
    ([("a", "stop", 2)], (0, 10), 2 * 8),                             # start predates the ledger
    ([("a", "start", 1), ("a", "start", 2), ("a", "stop", 4)], (0, 10), 3 * 8),  # restart, lost stop
    ([("a", "start", 0), ("a", "stop", 5), ("a", "start", 5), ("b", "start", 9)], (0, 10), 10 * 8 + 8),
])
def test_gpu_hours_integration_with_clipping(events, window, gpu_hours):
    capacity = rows_to_table([cap(u, e, h) for u, e, h in events], CAPACITY_SCHEMA)
    empty = REQUESTS_SCHEMA.empty_table()
    r = build_report(empty, capacity, Pricing(gpu_hour_usd=1.0), start=at(window[0]), end=at(window[1]))
    assert r.gpu_hours == pytest.approx(gpu_hours) and r.cost_usd == pytest.approx(gpu_hours)
    assert r.n_requests == 0 and r.avg_output_speed_tps is None and r.margin in (None, -1.0)


def test_unit_runs_report_roles():
    capacity = rows_to_table([cap("p", "start", 0, 32, "prefill"), cap("d", "start", 1, 144)], CAPACITY_SCHEMA)
    runs = unit_runs(capacity, int(at(0).timestamp() * 1e6), int(at(2).timestamp() * 1e6))
    assert sorted((u, r, g) for u, r, g, _, _ in runs) == [("d", "decode", 144), ("p", "prefill", 32)]


def test_speed_and_kv_length_per_output_token():
    rows = [req(0, prompt=10, hit=0, out=3, decode_s=1.0),     # KV lengths 10, 11, 12; 3 tok/s
            req(1, prompt=100, hit=0, out=1, decode_s=0.25),   # KV length 100; 4 tok/s
            req(2, prompt=50, hit=0, out=0, decode_s=0.0)]     # no output: no speed, no KV length
    r = build_report(rows_to_table(rows, REQUESTS_SCHEMA), CAPACITY_SCHEMA.empty_table(), start=at(0), end=at(2))
    assert r.avg_output_speed_tps == pytest.approx(3.5)
    assert r.avg_kv_len_per_output_token == pytest.approx((10 + 11 + 12 + 100) / 4)
    assert r.prefill_input_tps_per_node is None and r.gpu_hours == 0


def test_report_window_filters_requests():
    rows = [req(0, ts=at(0.5)), req(1, ts=at(1.5)), req(2, ts=at(2.0))]
    r = build_report(rows_to_table(rows, REQUESTS_SCHEMA), CAPACITY_SCHEMA.empty_table(), start=at(1), end=at(2))
    assert r.n_requests == 1
    with pytest.raises(ValueError, match="is before start"):
        build_report(rows_to_table(rows, REQUESTS_SCHEMA), CAPACITY_SCHEMA.empty_table(), start=at(2), end=at(1))


def test_plot_report_writes_png(tmp_path):
    requests = rows_to_table([req(i, ts=at(i / 4)) for i in range(96)], REQUESTS_SCHEMA)
    capacity = rows_to_table(staircase_rows(), CAPACITY_SCHEMA)
    path = plot_report(requests, capacity, tmp_path / "out" / "day.png", pricing=Pricing(), start=at(0), end=at(24))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    bare = plot_report(REQUESTS_SCHEMA.empty_table(), CAPACITY_SCHEMA.empty_table(), tmp_path / "empty.png")
    assert bare.stat().st_size > 0


def test_a_failed_flush_shows_nothing_and_the_retry_writes_every_row_once(tmp_path):
    w = LedgerWriter(tmp_path, flush_rows=100)
    w.append(req(0))
    w.append(cap("decode-0", "start", 0.0))
    (tmp_path / "capacity").write_text("a file where the capacity folder should be")   # a real I/O fault
    with pytest.raises(OSError):
        w.flush()
    assert not list((tmp_path / "requests").glob("*.parquet")) and w.n_buffered == 2   # all or nothing
    w.append(req(1))                                    # rows keep coming while the disk is bad
    (tmp_path / "capacity").unlink()
    w.close()
    led = read_ledger(tmp_path)
    assert sorted(led.requests["request_id"].to_pylist()) == ["r0", "r1"] and led.capacity.num_rows == 1
    assert led.duplicate_rows == 0 and led.is_complete
