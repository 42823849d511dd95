"""A non-durable store that keeps every record in process memory (tests, `--memory-only`)."""
from __future__ import annotations

import threading
from typing import Iterator

from .base import RecoveryReport, StorageError, Store, starts_incarnation
from .records_pb2 import LogRecord


class MemoryStore(Store):
    """Records per session in a dict; nothing survives the process."""

    durable = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Insertion order of the dict is the sessions' first-append order.
        self._sessions: dict[str, list[LogRecord]] = {}
        self._opened = False
        self._closed = False

    def _check_usable(self) -> None:
        if not self._opened:
            raise StorageError("store is not open")
        if self._closed:
            raise StorageError("store is closed")

    def open(self) -> RecoveryReport:
        with self._lock:
            if self._closed:
                raise StorageError("store is closed")
            self._opened = True
            return RecoveryReport(
                sessions=len(self._sessions),
                records=sum(len(v) for v in self._sessions.values()),
            )

    def replay(self) -> Iterator[tuple[str, list[LogRecord]]]:
        with self._lock:
            self._check_usable()
            snapshot = [(sid, [_copy(r) for r in recs]) for sid, recs in self._sessions.items()]
        yield from snapshot

    def append(self, record: LogRecord) -> int:
        stored = _copy(record)  # the caller may keep mutating its own message
        with self._lock:
            self._check_usable()
            if starts_incarnation(stored):
                # A new incarnation of the id replaces the previous one (nothing survives anyway).
                self._sessions[stored.session_id] = [stored]
                return 0
            history = self._sessions.setdefault(stored.session_id, [])
            history.append(stored)
            return len(history) - 1

    def history(self, session_id: str) -> list[LogRecord]:
        with self._lock:
            self._check_usable()
            return [_copy(r) for r in self._sessions.get(session_id, ())]

    def release(self, session_id: str) -> None:
        with self._lock:
            self._sessions.pop(session_id, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True


def _copy(record: LogRecord) -> LogRecord:
    out = LogRecord()
    out.CopyFrom(record)
    return out
