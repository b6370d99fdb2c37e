"""Issue 26: the request field `user` in the ledger. A row carries it (or None) through the write-ahead
log and Parquet; a part written before the column existed still reads, whole, with `user` null; and
`epserve report` reads a ledger that mixes both. Over HTTP: tests/test_api_fields.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest

from epserve.fleet.ledger import REQUESTS_SCHEMA, LedgerWriter, RequestRow, rows_to_table
from epserve.fleet.ledger_read import read_ledger

T0 = datetime(2025, 2, 27, 4, 0, tzinfo=timezone.utc)


def row(i: int, **kw) -> RequestRow:
    return RequestRow(**{**dict(ts=T0 + timedelta(minutes=i), request_id=f"r{i}", tenant="t", model="m",
                                prompt_tokens=100, cache_hit_tokens=0, output_tokens=10, ttft_s=0.1, decode_s=0.5,
                                finish_reason="stop"), **kw})


def write_old_part(root, rows: list[RequestRow]) -> None:
    """A part as ledgers wrote it before the `user` column (the schema without it)."""
    old = rows_to_table(rows, REQUESTS_SCHEMA).drop_columns(["user"])
    assert "user" not in old.column_names
    (root / "requests").mkdir(parents=True, exist_ok=True)
    pq.write_table(old, root / "requests" / "part-20250227T040000000000Z-1-old00000-000001.parquet")


def test_user_round_trips_through_a_part_and_none_is_not_a_damaged_row(tmp_path):
    with LedgerWriter(tmp_path) as w:
        w.append(row(0, user="end-user-42"))
        w.append(row(1))
    led = read_ledger(tmp_path)
    assert led.requests["user"].to_pylist() == ["end-user-42", None]
    assert led.is_complete and led.null_rows == 0


def test_user_survives_the_write_ahead_log_and_old_log_lines_still_decode():
    from epserve.fleet.ledger_wal import decode_line, encode_row
    types = {"requests": RequestRow}
    assert decode_line(encode_row("requests", row(0, user="u-log")), types)[1].user == "u-log"
    line = json.loads(encode_row("requests", row(1)))
    del line["row"]["user"]                      # a line logged before the field existed
    assert decode_line(json.dumps(line).encode(), types)[1] == row(1)


def test_a_part_written_before_the_user_column_still_reads_whole(tmp_path):
    write_old_part(tmp_path, [row(0), row(1)])
    with LedgerWriter(tmp_path) as w:
        w.append(row(2, user="new"))
    led = read_ledger(tmp_path)
    assert led.requests["request_id"].to_pylist() == ["r0", "r1", "r2"]
    assert led.requests["user"].to_pylist() == [None, None, "new"]
    assert led.is_complete and not led.bad_parts and led.null_rows == 0


def test_a_null_in_a_required_column_is_still_a_damaged_row(tmp_path):
    import pyarrow as pa
    table = rows_to_table([row(0, user="a"), row(1, user="b")], REQUESTS_SCHEMA)
    i = table.schema.get_field_index("tenant")
    (tmp_path / "requests").mkdir()
    pq.write_table(table.set_column(i, "tenant", pa.array(["t", None])), tmp_path / "requests" / "part-x.parquet")
    led = read_ledger(tmp_path)
    assert led.requests["request_id"].to_pylist() == ["r0"] and led.null_rows == 1


@pytest.mark.parametrize("user", ["x" * 257, 7])
def test_a_row_refuses_a_user_that_is_too_long_or_not_a_string(user):
    with pytest.raises(ValueError, match=r"user=.* must be a str of <= 256 chars \(request r0\)"):
        row(0, user=user)


def test_epserve_report_reads_a_ledger_with_old_and_new_parts(tmp_path):
    from epserve.fleet.ledger import CapacityRow
    root = tmp_path / "ledger"
    write_old_part(root, [row(i) for i in range(3)])
    with LedgerWriter(root) as w:
        w.append(CapacityRow(ts=T0, unit="decode-0", role="decode", event="start", gpus=8))
        for i in range(3, 5):
            w.append(row(i, user=f"u{i}"))
        w.append(CapacityRow(ts=T0 + timedelta(hours=1), unit="decode-0", role="decode", event="stop", gpus=8))
    r = subprocess.run([sys.executable, "-m", "epserve", "report", "--ledger", str(root), "--json"],
                       capture_output=True, text=True, timeout=120, env=os.environ)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["input_tokens"] == 500 and rep["output_tokens"] == 50
