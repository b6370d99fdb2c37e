"""Reading the ledger: every readable part, and an account of everything that was not read.

A report must never drop data silently. A part that cannot be read (torn, foreign, a
column of another type) is named with its reason and the rows its footer declares (None
when even the footer is gone); rows with a null in a column are counted and left out (a column
added later, OPTIONAL_COLUMNS, is null in older parts: that is "not recorded", and the row stays); a
row whose identity was already read (a retried append) is counted once and the repeat
is counted as a duplicate. An unreadable part whose batch log was kept
(fleet/ledger_wal.py: `wal/flushed/<token>-<seq>.jsonl`) is read from that copy instead:
still named, with the rows restored, and nothing is left out. `epserve report` prints all
of it and fails unless told to accept the skips (--skip-bad-parts).

Reads files, computes no statistics (fleet/report.py). No Ray.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from epserve.fleet.ledger import (_ROW_TYPES, CAPACITY_SCHEMA, OPTIONAL_COLUMNS, REQUESTS_SCHEMA, TS, rows_to_table,
                                  to_utc)
from epserve.fleet.ledger_wal import flushed_rows


@dataclass(frozen=True)
class BadPart:
    path: str
    reason: str             # "ArrowInvalid: ..." (first line, at most 200 characters)
    rows: int | None        # rows the part's footer declares; None when the footer is unreadable
    restored: int | None = None   # rows read from the batch's kept log instead (None: no copy)


@dataclass(frozen=True)
class LedgerRead:
    """(requests, capacity) tables, each sorted by ts, and what reading them left out."""

    requests: pa.Table
    capacity: pa.Table
    bad_parts: tuple[BadPart, ...] = ()
    null_rows: int = 0          # rows of readable parts with a null in some column
    duplicate_rows: int = 0     # repeats of a row already read (same request id / unit event)
    n_parts: int = 0            # part files found

    def __iter__(self):         # `requests, capacity = read_ledger(root)`
        return iter((self.requests, self.capacity))

    @property
    def skipped_rows(self) -> int:
        """Rows known to be left out: declared by unreadable parts, plus rows with nulls."""
        return sum(p.rows or 0 for p in self.lost_parts) + self.null_rows

    @property
    def lost_parts(self) -> tuple[BadPart, ...]:
        """Unreadable parts with no copy to restore them from."""
        return tuple(p for p in self.bad_parts if p.restored is None)

    @property
    def is_complete(self) -> bool:
        return not self.lost_parts and not self.null_rows

    def to_dict(self) -> dict:
        return {"parts": self.n_parts, "unreadable_parts": len(self.bad_parts),
                "bad_parts": [p.__dict__ for p in self.bad_parts], "skipped_rows": self.skipped_rows,
                "restored_rows": sum(p.restored or 0 for p in self.bad_parts),
                "parts_with_unknown_rows": sum(p.rows is None for p in self.lost_parts),
                "null_rows": self.null_rows, "duplicate_rows": self.duplicate_rows}

    def format(self) -> str:
        """Lines for the text report: counts, then each unreadable part with its reason."""
        unknown = sum(p.rows is None for p in self.lost_parts)
        rows = f"{self.skipped_rows:,}" + (f" + the rows of {unknown} part(s) whose footer is unreadable"
                                           if unknown else "")
        lines = [f"ledger parts read: {self.n_parts - len(self.bad_parts)} of {self.n_parts}; "
                 f"unreadable: {len(self.bad_parts)}; skipped rows: {rows}; "
                 f"duplicate rows counted once: {self.duplicate_rows:,}"]
        lines += [f"  unreadable part {p.path} ({p.rows if p.rows is not None else 'unknown'} rows): {p.reason}"
                  + (f"; {p.restored} rows restored from its batch log" if p.restored is not None else "")
                  for p in self.bad_parts]
        return "\n".join(lines)


@dataclass
class _Folder:
    table: pa.Table
    bad: list[BadPart] = field(default_factory=list)
    null_rows: int = 0
    n_parts: int = 0


def _reason(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def _declared_rows(path: Path) -> int | None:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:
        return None


def _from_copy(root: Path, path: Path, schema: pa.Schema) -> pa.Table | None:
    """An unreadable part's rows from its batch's kept log (`part-...-<token>-<seq>.parquet`), or None."""
    _, token, seq = path.stem.rsplit("-", 2) if path.stem.count("-") >= 2 else ("", "", "")
    if not seq.isdigit():
        return None
    rows = flushed_rows(root, token, int(seq), path.parent.name, _ROW_TYPES)
    return None if rows is None else rows_to_table(rows, schema)


def _read_part(path: Path, schema: pa.Schema) -> pa.Table:
    """One part in `schema`; a column of OPTIONAL_COLUMNS that the part predates reads as nulls."""
    table = pq.read_table(path)
    for name in OPTIONAL_COLUMNS:
        if name in schema.names and name not in table.column_names:
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    return table.select(schema.names).cast(schema)


def _read_folder(folder: Path, schema: pa.Schema) -> _Folder:
    parts, bad, n_null = [], [], 0
    paths = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []
    for path in paths:
        try:
            table = _read_part(path, schema)
        except Exception as exc:      # torn, foreign, a column of another type: named, never hidden
            table = _from_copy(folder.parent, path, schema)
            bad.append(BadPart(str(path), _reason(exc), _declared_rows(path),
                               None if table is None else table.num_rows))
            if table is None:
                continue
        if table.num_rows:
            has_null = functools.reduce(pc.or_, [pc.is_null(table[c]) for c in schema.names
                                                 if c not in OPTIONAL_COLUMNS])
            n = pc.sum(has_null).as_py() or 0
            if n:
                n_null += n
                table = table.filter(pc.invert(has_null))
        parts.append(table)
    table = pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()
    return _Folder(table, bad, n_null, len(paths))


def _first_of_each(table: pa.Table, ids: list) -> tuple[pa.Table, int]:
    """Keep the first row of each identity (parts are read in name order: oldest first)."""
    seen, keep = set(), []
    for i in ids:
        keep.append(i not in seen)
        seen.add(i)
    n_dup = len(keep) - sum(keep)
    return (table.filter(pa.array(keep, pa.bool_())) if n_dup else table), n_dup


def read_ledger(root: str | os.PathLike, start: datetime | None = None, end: datetime | None = None) -> LedgerRead:
    """The ledger at root. requests: rows with start <= ts < end. capacity: rows with ts < end,
    including those before start (the report needs earlier starts to know which units were
    running at `start`). start/end must be aware datetimes (or None: unbounded)."""
    start = None if start is None else to_utc(start, "start")
    end = None if end is None else to_utc(end, "end")
    root = Path(root)
    req, cap = _read_folder(root / "requests", REQUESTS_SCHEMA), _read_folder(root / "capacity", CAPACITY_SCHEMA)
    requests, dup_r = _first_of_each(req.table, req.table["request_id"].to_pylist())
    ids = zip(*(cap.table[c].to_pylist() for c in ("unit", "event", "ts")))
    capacity, dup_c = _first_of_each(cap.table, list(ids))
    if start is not None:
        requests = requests.filter(pc.greater_equal(requests["ts"], pa.scalar(start, TS)))
    if end is not None:
        requests = requests.filter(pc.less(requests["ts"], pa.scalar(end, TS)))
        capacity = capacity.filter(pc.less(capacity["ts"], pa.scalar(end, TS)))
    return LedgerRead(requests.sort_by("ts"), capacity.sort_by("ts"), tuple(req.bad + cap.bad),
                      req.null_rows + cap.null_rows, dup_r + dup_c, req.n_parts + cap.n_parts)
