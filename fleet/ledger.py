"""The ledger: every finished request and every unit start/stop, appended to Parquet.

Layout under `root`: `requests/` and `capacity/`, each a folder of immutable
part files `part-<utc time>-<pid>-<writer>-<seq>.parquet`, and `wal/`, the
write-ahead log of rows accepted but not yet in a part (fleet/ledger_wal.py). A
row is in the log before append() returns, so killing the writer's process loses
nothing: the next writer on the root replays the log. A flush writes one new
part per table with rows: to a hidden temp name in the same folder, fsync, then
os.replace, so a crash never damages an earlier part. Rows carry an identity
(request id; unit, event and time for capacity) and a writer accepts each once,
so a retried append (the ledger actor restarted mid-call) is not a second row.

Owns the schemas, row validation and writing; reading is fleet/ledger_read.py;
statistics are fleet/report.py. No Ray, no threads: time-based flushing happens
inside append(), against a clock passed in.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from epserve.fleet.ledger_wal import WriteAheadLog, encode_row, recover

log = logging.getLogger(__name__)

TS = pa.timestamp("us", tz="UTC")
REQUESTS_SCHEMA = pa.schema([
    ("ts", TS), ("request_id", pa.string()), ("tenant", pa.string()), ("model", pa.string()),
    ("prompt_tokens", pa.int64()), ("cache_hit_tokens", pa.int64()), ("output_tokens", pa.int64()),
    ("ttft_s", pa.float64()), ("decode_s", pa.float64()),
    ("prefill_unit", pa.int32()), ("prefill_rank", pa.int32()),
    ("decode_unit", pa.int32()), ("decode_rank", pa.int32()),
    ("finish_reason", pa.string()), ("user", pa.string()),
])
OPTIONAL_COLUMNS = ("user",)   # added later: null in older parts (ledger_read.py), and a null is not damage
MAX_USER_CHARS = 256           # the request field `user` (serve/openai_models.py refuses longer)
CAPACITY_SCHEMA = pa.schema([
    ("ts", TS), ("unit", pa.string()), ("role", pa.string()), ("event", pa.string()), ("gpus", pa.int32()),
])
ROLES = ("prefill", "decode")
EVENTS = ("start", "stop")


def to_utc(ts: datetime | float, name: str = "ts") -> datetime:
    """An aware UTC datetime from an aware datetime or POSIX seconds; naive datetimes are refused."""
    if isinstance(ts, datetime):
        if ts.tzinfo is None:
            raise ValueError(f"{name}={ts!r} is naive; give a timezone (e.g. timezone.utc)")
        return ts.astimezone(timezone.utc)
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        return datetime.fromtimestamp(ts, timezone.utc)
    raise ValueError(f"{name}={ts!r} must be an aware datetime or POSIX seconds")


@dataclass(frozen=True, kw_only=True)
class RequestRow:
    """One finished request. ts: finish time (aware datetime or POSIX seconds; kept as a UTC
    datetime). *_s: seconds. Units/ranks: -1 when the request never reached that phase.
    user: the request's `user` field (an end-user id, for abuse monitoring) or None; billing follows tenant."""

    ts: datetime | float
    request_id: str
    tenant: str
    model: str
    prompt_tokens: int
    cache_hit_tokens: int
    output_tokens: int
    ttft_s: float
    decode_s: float
    prefill_unit: int = -1
    prefill_rank: int = -1
    decode_unit: int = -1
    decode_rank: int = -1
    finish_reason: str
    user: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "ts", to_utc(self.ts))
        if self.user is not None and not (isinstance(self.user, str) and len(self.user) <= MAX_USER_CHARS):
            raise ValueError(f"user={self.user!r:.40} must be a str of <= {MAX_USER_CHARS} chars "
                             f"(request {self.request_id})")
        for name in ("prompt_tokens", "cache_hit_tokens", "output_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0 (request {self.request_id})")
        if self.cache_hit_tokens > self.prompt_tokens:
            raise ValueError(
                f"cache_hit_tokens={self.cache_hit_tokens} exceeds prompt_tokens={self.prompt_tokens} "
                f"(request {self.request_id})"
            )
        for name in ("ttft_s", "decode_s"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(
                    f"{name}={getattr(self, name)} must be finite and >= 0 (request {self.request_id})"
                )
        for name in ("prefill_unit", "prefill_rank", "decode_unit", "decode_rank"):
            if not -1 <= getattr(self, name) < 2**31:
                raise ValueError(f"{name}={getattr(self, name)} must be >= -1 (request {self.request_id})")


@dataclass(frozen=True, kw_only=True)
class CapacityRow:
    """One unit starting or stopping. unit: a stable name, e.g. 'decode-3'. gpus: the unit's GPUs."""

    ts: datetime | float
    unit: str
    role: str
    event: str
    gpus: int

    def __post_init__(self):
        object.__setattr__(self, "ts", to_utc(self.ts))
        if self.role not in ROLES:
            raise ValueError(f"role={self.role!r} must be one of {ROLES} (unit {self.unit})")
        if self.event not in EVENTS:
            raise ValueError(f"event={self.event!r} must be one of {EVENTS} (unit {self.unit})")
        if not 0 < self.gpus < 2**31:
            raise ValueError(f"gpus={self.gpus} must be >= 1 (unit {self.unit})")


_TABLES = {RequestRow: ("requests", REQUESTS_SCHEMA), CapacityRow: ("capacity", CAPACITY_SCHEMA)}
_ROW_TYPES = {folder: kind for kind, (folder, _) in _TABLES.items()}
SEEN_IDS = 200_000     # row identities a writer remembers to refuse a retried append


def row_id(row: RequestRow | CapacityRow) -> str:
    """A row's identity: the same request (or unit event) must never be counted twice."""
    if isinstance(row, RequestRow):
        return "r:" + row.request_id
    return f"c:{row.unit}|{row.event}|{row.ts.isoformat()}"


def rows_to_table(rows: list[RequestRow] | list[CapacityRow], schema: pa.Schema) -> pa.Table:
    """A table in `schema` from rows of one kind (column order follows the schema)."""
    cols = {f.name: [getattr(r, f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)


def _stage_part(folder: Path, table: pa.Table, name: str) -> tuple[Path, Path]:
    """Write table to a hidden temp file in folder and fsync it; returns (temp, final path)."""
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / name, folder / f".{name}.tmp"
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, final


def _commit_part(tmp: Path, final: Path) -> Path:
    """Rename a staged part into place and fsync its folder (the rename itself durable)."""
    os.replace(tmp, final)
    try:  # not every file system allows opening a folder
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return final


class LedgerWriter:
    """Buffers rows and writes them as new Parquet parts.

    append() logs the row (write-ahead) and flushes when flush_rows rows are
    buffered (both tables together) or when the oldest buffered row is
    flush_interval_s old by `clock` (POSIX seconds; time.time by default).
    close() flushes what is left; use it, or the writer as a context manager, on
    shutdown. A new writer first replays the logs of writers that died.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        flush_rows: int = 1000,
        flush_interval_s: float = 10.0,
        clock: Callable[[], float] = time.time,
        fsync_log: bool = False,
    ):
        if flush_rows < 1:
            raise ValueError(f"flush_rows={flush_rows} must be >= 1")
        if not flush_interval_s >= 0:
            raise ValueError(f"flush_interval_s={flush_interval_s} must be >= 0")
        self.root, self.clock = Path(root), clock
        self.flush_rows, self.flush_interval_s = flush_rows, flush_interval_s
        self._buffers: dict[type, list] = {kind: [] for kind in _TABLES}
        self._oldest_s: float | None = None
        self._seq = 1
        self._token = uuid.uuid4().hex[:8]
        self._log = WriteAheadLog(self.root, self._token, fsync_log)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.is_closed = False
        self.n_recovered = 0
        for row in recover(self.root, _ROW_TYPES, self._part_exists, self._write_rows):
            self._remember(row_id(row))
            self.n_recovered += 1

    @property
    def n_buffered(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def append(self, row: RequestRow | CapacityRow) -> bool:
        """Log and buffer one row; flush if the batch is full or its oldest row is due.

        Returns False (and keeps nothing) for a row whose identity this writer already took."""
        if self.is_closed:
            raise RuntimeError(f"ledger writer for {self.root} is closed")
        if type(row) not in _TABLES:
            raise TypeError(f"ledger rows are RequestRow or CapacityRow, not {type(row).__name__}")
        rid = row_id(row)
        if rid in self._seen:
            return False
        self._log.append(self._seq, encode_row(_TABLES[type(row)][0], row))
        self._remember(rid)
        if self._oldest_s is None:
            self._oldest_s = self.clock()
        self._buffers[type(row)].append(row)
        if self.n_buffered >= self.flush_rows:
            self.flush()
        else:
            self.flush_if_due()
        return True

    def _remember(self, rid: str) -> None:
        self._seen[rid] = None
        if len(self._seen) > SEEN_IDS:
            self._seen.popitem(last=False)

    def flush_if_due(self) -> list[Path]:
        """Flush when the oldest buffered row is flush_interval_s old; a quiet writer's owner
        (e.g. the ledger actor) may call this on a timer so late rows do not wait for traffic."""
        if self._oldest_s is not None and self.clock() - self._oldest_s >= self.flush_interval_s:
            return self.flush()
        return []

    def flush(self) -> list[Path]:
        """Write each table's buffered rows as one new part of this batch; returns the parts written.

        All or nothing: every part is staged (written, fsynced) before any is renamed into place,
        so on an I/O error nothing is visible, every row stays buffered and logged, and the next
        flush retries the whole batch under the same names.
        """
        staged = []
        try:
            for kind, (folder, _) in _TABLES.items():
                if self._buffers[kind]:
                    staged.append(self._stage_rows(folder, self._buffers[kind], self._token, self._seq))
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        written = [_commit_part(tmp, final) for tmp, final in staged]
        self._buffers = {kind: [] for kind in _TABLES}
        if self._log.fd is not None:
            self._log.retire()
            self._seq += 1
        self._oldest_s = None
        return written

    def _part_exists(self, folder: str, token: str, seq: int) -> bool:
        return any((self.root / folder).glob(f"part-*-{token}-{seq:06d}.parquet"))

    def _stage_rows(self, folder: str, rows: list, token: str, seq: int) -> tuple[Path, Path]:
        stamp = datetime.fromtimestamp(self.clock(), timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"part-{stamp}-{os.getpid()}-{token}-{seq:06d}.parquet"
        return _stage_part(self.root / folder, rows_to_table(rows, _TABLES[_ROW_TYPES[folder]][1]), name)

    def _write_rows(self, folder: str, rows: list, token: str, seq: int) -> Path:
        """Recovery's writer: one table's rows of a dead writer's batch, under that batch's name."""
        return _commit_part(*self._stage_rows(folder, rows, token, seq))

    def close(self) -> None:
        """Flush and refuse further rows. Idempotent."""
        if not self.is_closed:
            self.flush()
            self.is_closed = True

    def __enter__(self) -> LedgerWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CAPACITY_SCHEMA", "MAX_USER_CHARS", "OPTIONAL_COLUMNS", "REQUESTS_SCHEMA", "CapacityRow", "LedgerWriter",
           "RequestRow", "row_id", "rows_to_table", "to_utc"]
