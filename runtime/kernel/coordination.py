"""Coordination: what differs between one instance owning its store and several instances sharing one
(PostgreSQL). The engine picks one implementation at construction (`coordination_for`) and runs every
session call through it; nothing else in the kernel asks which one it has.

* `LocalCoordination` (this module): the in-memory session is the truth; a call takes the session's
  lock and runs.
* `SharedCoordination` (shared.py): the log in the store is the truth; a call runs against the latest
  log, appends are conditional and other instances' records are caught up.
"""
from __future__ import annotations

import abc
import logging
from typing import Callable, Protocol

from ..storage import LogRecord, StorageError, Store
from ..vocabulary.errors import Kind, MacpError
from ..vocabulary.session import Session
from .commit import CommitPoint
from .records import Outcome
from .recovery import Recovery
from .table import SessionTable

log = logging.getLogger("macp_runtime.engine")


class Bus(Protocol):
    """The notification bus of a shared store (storage/postgres/bus.py), as the coordination uses it."""

    def start(self, listener) -> None:
        """Deliver other instances' changes to `listener` (`record_committed`, `signal_received`,
        `positions`) from now on."""

    def publish_signal(self, data: bytes) -> None:
        """Send an encoded WatchSignalsResponse to the other instances."""

    def close(self) -> None: ...


class Coordination(abc.ABC):
    #: several instances share the store (ListSessions and the console refresh first)
    shared = False
    #: callable(WatchSignalsResponse) forwarding an accepted Signal/Progress to other instances, or None
    signal_relay: Callable | None = None

    #: append(session, record): the commit point of one session record (may raise records.Stale)
    append: Callable[[Session, LogRecord], None]

    @abc.abstractmethod
    def locked(self, session_id: str, session: Session | None, missing, body, *args):
        """body(session, *args) under the session's lock, against its latest state. `session` is the
        table's entry (or None); `missing(session_id)` builds the error for an unknown id, or for one
        that is gone by the time the lock is held (the body never sees a gone session)."""

    def locked_fresh(self, session_id: str, session: Session | None, missing, body, *args):
        """As `locked`, for reads that must see every record appended anywhere before the call."""
        return self.locked(session_id, session, missing, body, *args)

    @abc.abstractmethod
    def existing_start(self, existing: Session, message_id: str, now: int) -> tuple[Outcome | None, tuple | None]:
        """A SessionStart for an id the table holds: (outcome, None) when decided (a duplicate; raises
        SessionAlreadyExists otherwise), or (None, the incarnation and length a new start replaces)."""

    @abc.abstractmethod
    def append_start(self, session: Session, record: LogRecord, previous: tuple | None) -> None:
        """The commit point of a SessionStart (raises AppendConflict when another instance took the id)."""

    def taken(self, session_id: str) -> None:
        """After an AppendConflict of a SessionStart: load the session that took the id."""

    def reload(self, registry) -> bool:
        """Read a registry again before refusing a name it lacks. True when reloaded."""
        return False

    @abc.abstractmethod
    def history(self, session: Session) -> list[LogRecord]:
        """Under the session's lock: its history as far as this copy has applied it."""

    @abc.abstractmethod
    def complete_history(self, session: Session) -> list[LogRecord] | None:
        """Under the session's lock: its whole history from its SessionStart, or None when compacted."""

    @abc.abstractmethod
    def before_sweep(self, now: int, emit_due: Callable[[int], None]) -> None:
        """What a sweep does first. `emit_due(now)` writes the runtime's due envelopes (current.md §12.4)."""

    @abc.abstractmethod
    def evict(self, session: Session) -> bool:
        """Take an evictable session out of memory; True when it was."""

    def refresh(self) -> None:
        """Load the sessions other instances started and catch up those that moved on."""

    @abc.abstractmethod
    def recover(self, strict: bool) -> tuple[int, int]:
        """Rebuild the stored sessions at start-up: (recovered, failed)."""


class LocalCoordination(Coordination):
    """One instance owns the store: the session in memory is the truth."""

    def __init__(self, store: Store, table: SessionTable, commit: CommitPoint, recovery: Recovery):
        self.store = store
        self._table = table
        self._recovery = recovery
        self.append = commit.append   # no indirection on the message path

    def locked(self, session_id: str, session: Session | None, missing, body, *args):
        if session is None:
            raise missing(session_id)
        with session.lock:
            if session.gone:   # removed (a failed start, eviction) while we waited for its lock
                raise missing(session_id)
            return body(session, *args)

    def existing_start(self, existing: Session, message_id: str, now: int) -> tuple[Outcome | None, tuple | None]:
        with existing.lock:
            if existing.gone:   # its start failed: the id is free again
                return None, None
            if message_id in existing.seen:
                return Outcome(True, existing.status), None
        raise MacpError(Kind.SessionAlreadyExists, detail=f"session {existing.session_id!r} already exists")

    def append_start(self, session: Session, record: LogRecord, previous: tuple | None) -> None:
        self.append(session, record)

    def history(self, session: Session) -> list[LogRecord]:
        try:
            return self.store.history(session.session_id)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None

    def complete_history(self, session: Session) -> list[LogRecord] | None:
        try:
            return self.store.complete_history(session.session_id)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None

    def before_sweep(self, now: int, emit_due: Callable[[int], None]) -> None:
        emit_due(now)   # eager emission of the runtime's envelopes (current.md §12.4 SHOULD)

    def evict(self, session: Session) -> bool:
        return self._table.evict(session)

    def recover(self, strict: bool) -> tuple[int, int]:
        return self._recovery.recover(strict)
