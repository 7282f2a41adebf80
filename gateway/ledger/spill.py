"""Spill files: ledger batches kept on local disk while the database cannot take them.

A spill file holds whole batches, oldest first, one JSON line per record:
``{"batch": "<batch id>", "record": {<column>: <value>, ...}}``. A batch keeps the id it was
given when first written, so writing it again is recognised (see `postgres.py`).

Each process spills into its own file, `ledger-spill-<random>.jsonl` under its state folder,
and holds an exclusive `flock` on it while it runs; a file nobody holds is an orphan, left by
a process that stopped (or crashed) with records not yet written, and is adopted by the next
process that looks. Every function here does blocking file I/O: run it off the event loop.
"""

from __future__ import annotations

import fcntl
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from gateway.ledger import columns
from gateway.ledger.records import LedgerRecord

logger = logging.getLogger("gateway.ledger")

PATTERN = "ledger-spill-*.jsonl"


@dataclass(frozen=True, slots=True)
class Batch:
    """Records written in one transaction, under an id that makes writing them idempotent."""

    id: uuid.UUID
    records: tuple[LedgerRecord, ...]


def new_batch(records: Sequence[LedgerRecord]) -> Batch:
    return Batch(uuid.uuid4(), tuple(records))


class SpillFile:
    """One spill file, opened and locked by this process (see the module docstring).

    `count` is the number of records in it, kept by the owner on the event loop's thread
    (`append` runs on another and leaves it alone). `append` writes whole batches and fsyncs before
    it returns; a write that fails is cut off again, so the file never keeps half a batch
    that is also still held in memory.
    """

    def __init__(self, path: Path, fd: int, count: int) -> None:
        self.path = path
        self._fd = fd
        self.count = count
        self._size = os.fstat(fd).st_size
        self._torn = False  # the end may hold a partial line we could not cut off

    @classmethod
    def create(cls, folder: Path) -> SpillFile:
        """A new, empty spill file of this process's own."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"ledger-spill-{uuid.uuid4().hex}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _sync_folder(folder)
        return cls(path, fd, 0)

    @classmethod
    def adopt(cls, path: Path) -> SpillFile | None:
        """Lock an orphan spill file; None if another process holds it or it is gone."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # removed by its adopter between our open and our lock: nothing left to adopt
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                raise FileNotFoundError(path)
        except OSError:
            os.close(fd)
            return None
        return cls(path, fd, sum(len(b.records) for b in read_batches(path)))

    def append(self, batches: Sequence[Batch]) -> None:
        """Write `batches` at the end and fsync; on failure the file is as before."""
        lines = [_line(b.id, r) for b in batches for r in b.records]
        data = b"\n".join(lines) + b"\n"
        if self._torn:
            data = b"\n" + data  # keep a torn line of an earlier failure apart from ours
        try:
            if os.write(self._fd, data) != len(data):  # a full disk may take part of it
                raise OSError(f"short write to {self.path}")
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._torn = True
            raise
        self._size += len(data)
        self._torn = False

    def remove(self) -> None:
        """Delete the file (all its batches are written) and release it."""
        self.path.unlink(missing_ok=True)
        _sync_folder(self.path.parent)
        self.close()

    def close(self) -> None:
        """Release the lock and the descriptor; the file stays for the next process."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(batch_id: uuid.UUID, record: LedgerRecord) -> bytes:
    values = dict(zip(columns.NAMES, columns.postgres_row(record), strict=True))
    return orjson.dumps({"batch": batch_id.hex, "record": values})


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def orphans(folder: Path, own: Path | None) -> list[SpillFile]:
    """Spill files under `folder` no running process holds, now locked by this one, oldest
    first (by modification time)."""
    if not folder.is_dir():
        return []
    paths = [p for p in folder.glob(PATTERN) if p != own]
    found = [spill for p in sorted(paths, key=_mtime) if (spill := SpillFile.adopt(p))]
    return found


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def read_batches(path: Path) -> list[Batch]:
    """The batches in a spill file, in file order. A line that is not a whole record (torn
    by a crash mid-write, or damaged) is skipped with a log line; it never raises for bad
    content."""
    batches: list[Batch] = []
    current: list[LedgerRecord] = []
    current_id: uuid.UUID | None = None
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            parsed = _parse(line)
            if parsed is None:
                if line.strip():
                    logger.warning(
                        "ledger spill file %s: line %d is not a whole record (torn by a crash?);"
                        " skipped",
                        path,
                        number,
                    )
                continue
            batch_id, record = parsed
            if batch_id != current_id and current_id is not None:
                batches.append(Batch(current_id, tuple(current)))
                current = []
            current_id = batch_id
            current.append(record)
    if current_id is not None:
        batches.append(Batch(current_id, tuple(current)))
    return batches


def _parse(line: bytes) -> tuple[uuid.UUID, LedgerRecord] | None:
    if not line.endswith(b"\n"):
        return None  # the last line of a write cut short
    try:
        obj = orjson.loads(line)
        return uuid.UUID(hex=obj["batch"]), columns.from_mapping(obj["record"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
