"""The ledger's write-ahead log: rows a writer has accepted but not yet flushed into a part.

Why: a row is accepted (and its response sent) long before the batch it belongs to
becomes a Parquet part, so a kill -9, an OOM or a SIGTERM of the ledger's process
must not lose it. Each accepted row is one JSON line appended (os.write, O_APPEND) to
`root/wal/<writer token>-<batch seq>.jsonl`; the kernel keeps it across the death of
the process (fsync=True also across a power loss). When the batch is flushed its
parts are named `...-<token>-<seq>.parquet` and the log file moves to
`root/wal/flushed/` as the batch's second copy: a part damaged later (truncated, bit
rot) is read back from it (fleet/ledger_read.py), so a flushed row is not lost with
one file. The copy costs about 350 bytes a row next to the part's ~60.

Recovery (a new writer on the same root, e.g. the restarted ledger actor): every log
file no live writer holds is replayed, per table, into a part of the same
`<token>-<seq>` name unless that part already exists, then removed. Replaying is
therefore idempotent: a crash between a flush and the removal of its log, or during
recovery itself, never writes a row twice. Liveness is an exclusive flock held by the
writer for the life of its log file (created under a temp name, locked, then renamed,
so no reader ever sees it unlocked). A torn last line (a kill mid-write) is a row
whose append never returned: it is dropped with a warning.

No Ray, no threads. Never reads or writes a part's rows itself: the writer passes a
function that writes one table's rows as the named part.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

WAL_DIR = "wal"
FLUSHED_DIR = "flushed"          # under WAL_DIR: logs of flushed batches, the copies of their parts


def encode_row(table: str, row) -> bytes:
    fields = dataclasses.asdict(row)
    fields["ts"] = row.ts.isoformat()
    return json.dumps({"table": table, "row": fields}, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes, row_types: dict[str, type]):
    """(table, row) from one log line; raises ValueError/KeyError/TypeError on a bad line."""
    rec = json.loads(line)
    fields = dict(rec["row"])
    fields["ts"] = datetime.fromisoformat(fields["ts"])
    return rec["table"], row_types[rec["table"]](**fields)


class WriteAheadLog:
    """One writer's log of the batch it is buffering (at most one file open at a time)."""

    def __init__(self, root: Path, token: str, fsync: bool = False):
        self.folder, self.token, self.fsync = root / WAL_DIR, token, fsync
        self.fd: int | None = None
        self.path: Path | None = None

    def append(self, seq: int, data: bytes) -> None:
        """Add one encoded row to batch `seq`'s log (opened and locked on its first row)."""
        if self.fd is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            final = self.folder / f"{self.token}-{seq:06d}.jsonl"
            tmp = self.folder / f".{final.name}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.replace(tmp, final)
            self.fd, self.path = fd, final
        os.write(self.fd, data)
        if self.fsync:
            os.fsync(self.fd)

    def retire(self) -> None:
        """The batch is in parts now: its log becomes their copy."""
        if self.fd is not None:
            keep(self.path)
            os.close(self.fd)
            self.fd, self.path = None, None


def keep(path: Path) -> None:
    """Move a flushed batch's log to wal/flushed/ (same name): the copy of that batch's parts."""
    dest = path.parent / FLUSHED_DIR
    dest.mkdir(exist_ok=True)
    os.replace(path, dest / path.name)


def flushed_rows(root: Path, token: str, seq: int, table: str, row_types: dict[str, type]) -> list | None:
    """The rows of `table` in the kept log of batch (token, seq); None if there is no copy."""
    path = root / WAL_DIR / FLUSHED_DIR / f"{token}-{seq:06d}.jsonl"
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError:
        return None
    rows = []
    for line in lines:
        try:
            t, row = decode_line(line, row_types)
        except (ValueError, KeyError, TypeError):
            continue                                      # a torn last line: that append never returned
        if t == table:
            rows.append(row)
    return rows


def recover(root: Path, row_types: dict[str, type], part_exists: Callable[[str, str, int], bool],
            write_part: Callable[[str, list, str, int], None]) -> list:
    """Replay every log file no live writer holds; returns the rows found (for de-duplication).

    part_exists(table, token, seq) / write_part(table, rows, token, seq) are the writer's.
    """
    folder = root / WAL_DIR
    found = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        token, _, seq_s = path.stem.rpartition("-")
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue                                      # another recoverer took it
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                                  # a live writer's batch
            if not path.exists():
                continue                                  # recovered while we waited for the lock
            with open(path, "rb") as f:
                lines = f.read().split(b"\n")
            by_table: dict[str, list] = {}
            for i, line in enumerate(lines):
                if not line:
                    continue
                try:
                    table, row = decode_line(line, row_types)
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ledger: dropping unreadable line %d of %s (%s: %s)", i + 1, path.name,
                                type(exc).__name__, exc)
                    continue
                by_table.setdefault(table, []).append(row)
            for table, rows in by_table.items():
                found += rows
                if not part_exists(table, token, int(seq_s)):
                    write_part(table, rows, token, int(seq_s))
            log.info("ledger: recovered %d row(s) from %s", sum(map(len, by_table.values())), path.name)
            with contextlib.suppress(FileNotFoundError):
                keep(path)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return found
