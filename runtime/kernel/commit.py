"""The commit point: a session's record appended to the store, durable before anything follows it.

Deferred commit: the transport runs the kernel on its event loop and must not wait there for an
fdatasync. While a thread is `deferring`, `append` queues the record (`store.append_deferred`) and the
session's in-memory state moves on at once (the session lock keeps per-session order; the log keeps
global order); fan-out and lifecycle events wait for the record's durability (`Pending`), and so does
the caller's ack (`pending(session_id)`). A failed deferred write stops the store (a restart replays
what is durable).
"""
from __future__ import annotations

import logging
import threading
from time import perf_counter

from ..storage import LogRecord, StorageError, Store
from ..vocabulary.errors import Kind, MacpError
from ..vocabulary.session import Session

log = logging.getLogger("macp_runtime.engine")

_PENDING_LOCK = threading.Lock()


class Pending:
    """A record appended without waiting for its fdatasync: what must follow the commit point (fan-out,
    lifecycle events, the ack) waits for `settle`, which the store's writer calls in log order."""

    __slots__ = ("effects", "error", "settled", "waiters")

    def __init__(self):
        self.effects: list = []
        self.error = None
        self.settled = False
        self.waiters: list = []

    def defer(self, fn, *args) -> None:
        """Run fn(*args) once durable (now if it already is; never if the write failed)."""
        with _PENDING_LOCK:
            if not self.settled:
                self.effects.append((fn, args))
                return
        if self.error is None:
            fn(*args)

    def when_settled(self, callback) -> None:
        """callback(error or None), from the writer's thread, or now when already settled."""
        with _PENDING_LOCK:
            if not self.settled:
                self.waiters.append(callback)
                return
        callback(self.error)

    def settle(self, error) -> None:
        with _PENDING_LOCK:
            self.error = error
            self.settled = True
            effects, self.effects = self.effects, ()
            waiters, self.waiters = self.waiters, ()
        if error is None:
            for fn, args in effects:
                fn(*args)
        for callback in waiters:
            callback(error)


class _Deferring(threading.local):
    on = False   # a class default: a thread that never set it reads False without a failed lookup


class CommitPoint:
    """Appends a session's records (under the session's lock) and keeps its `log_length`."""

    def __init__(self, store: Store, metrics, defers: bool):
        self.store = store
        self.metrics = metrics
        # Deferred commit: a thread that set `set_deferring(True)` appends without waiting.
        self.defers = defers
        self._local = _Deferring()
        self._pending: dict[str, Pending] = {}   # session id -> its latest record not yet durable
        self._pending_lock = threading.Lock()

    def set_deferring(self, on: bool) -> None:
        self._local.on = on

    def pending(self, session_id: str) -> Pending | None:
        """The session's latest record not yet durable (an ack about this session waits for it)."""
        pending = self._pending.get(session_id)
        return None if pending is None or pending.settled else pending

    def deferred(self, session: Session) -> Pending | None:
        """What must follow the session's latest append waits for this, when this thread defers."""
        if not self._local.on:
            return None
        pending = self._pending.get(session.session_id)
        return None if pending is None or pending.settled else pending

    def append(self, session: Session, record: LogRecord) -> None:
        """The commit point of a single writer: durable on return, or queued when this thread defers."""
        if self.defers and self._local.on:
            return self._append_deferred(session, record)
        started = perf_counter()
        try:
            index = self.store.append(record)
        except StorageError as exc:
            log.error("storage append failed for session %s: %s", session.session_id, exc)
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        self.metrics.append_done(perf_counter() - started)
        session.log_length = index + 1

    def append_expecting(self, record: LogRecord, expect: tuple[int, int]) -> int:
        """A shared store's conditional append: only if the session still has (incarnation, length)
        `expect`. Raises AppendConflict (nothing written) when another writer came first."""
        started = perf_counter()
        try:
            index = self.store.append(record, expect=expect)   # type: ignore[call-arg]
        except StorageError as exc:
            log.error("storage append failed for session %s: %s", record.session_id, exc)
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        self.metrics.append_done(perf_counter() - started)
        return index

    def _append_deferred(self, session: Session, record: LogRecord) -> None:
        pending = Pending()
        session_id = session.session_id
        started = perf_counter()

        def settled(index, error):
            if error is None:
                self.metrics.append_done(perf_counter() - started)
            pending.settle(error)
            with self._pending_lock:
                if self._pending.get(session_id) is pending:
                    del self._pending[session_id]
        try:
            self.store.append_deferred(record, settled)
        except StorageError as exc:
            log.error("storage append failed for session %s: %s", session_id, exc)
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        with self._pending_lock:
            self._pending[session_id] = pending
        session.log_length += 1
