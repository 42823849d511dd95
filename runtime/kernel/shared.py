"""Coordination of several instances over one shared store (PostgreSQL).

Each instance keeps its own in-memory copy of the sessions it has touched; the log in the store is the
truth. An append names the (incarnation, length) the copy has, so it succeeds only if nobody appended
since (the commit point, one round trip); otherwise `append` catches the copy up with what it missed
(applied through the same compiled mode, published to this instance's subscribers in log order) and
the message is judged again. An accepted append proves the copy was current; a refusal or a duplicate
might come from a stale copy, so it is checked against the log once before it is answered. Every index
of a session passes through `Fanout.publish` here exactly once, under the session's lock, whether this
instance or another one appended it.

Other instances' changes arrive through the store's notification bus (`Bus`): this object is its
listener (`record_committed`, `signal_received`, `positions`).
"""
from __future__ import annotations

import logging
from typing import Callable

from macp.v1 import core_pb2

from ..storage import ENTRY_KIND_INCOMING, LogRecord, StorageError
from ..storage.base import AppendConflict, SharedStore
from ..vocabulary.errors import Kind, MacpError, StatusError
from ..vocabulary.session import CANCELLED, EXPIRED, OPEN, RESOLVED, SUSPENDED, Session
from . import access
from .commit import CommitPoint
from .coordination import Bus, Coordination
from .fanout import Event, Fanout
from .records import Outcome, Stale, record_envelope
from .recovery import Recovery, replay_record
from .table import SessionTable

log = logging.getLogger("macp_runtime.engine")

# The lifecycle event a status reached through another instance's record announces.
_EVENT_OF_STATUS = {RESOLVED: Event.RESOLVED, EXPIRED: Event.EXPIRED, CANCELLED: Event.CANCELLED,
                    SUSPENDED: Event.SUSPENDED, OPEN: Event.RESUMED}


class SharedCoordination(Coordination):
    shared = True

    def __init__(self, store: SharedStore, table: SessionTable, commit: CommitPoint, recovery: Recovery,
                 fanout: Fanout, bus: Bus | None = None):
        """bus: the store's notification bus, started once recovery is done and closed by its owner
        (None: this instance sees other instances' records only when it next touches their sessions)."""
        self.store = store
        self._table = table
        self._commit = commit
        self._recovery = recovery
        self._fanout = fanout
        self._bus = bus
        self._evicted: dict[str, int] = {}   # id -> incarnation evicted here (refresh must not load it back)
        if bus is not None:
            self.signal_relay = self._relay_signal

    # --- running a call against the latest log ---------------------------------------------------------

    def append(self, session: Session, record: LogRecord) -> None:   # type: ignore[override]
        """Only if nobody else appended since this copy was current (the commit point)."""
        try:
            index = self._commit.append_expecting(record, (session.incarnation, session.log_length))
        except AppendConflict:
            self.catch_up(session)
            raise Stale(session.session_id) from None
        session.log_length = index + 1

    def locked(self, session_id: str, session: Session | None, missing, body, *args):
        return self._run(session_id, session, missing, body, args, False)

    def locked_fresh(self, session_id: str, session: Session | None, missing, body, *args):
        return self._run(session_id, session, missing, body, args, True)

    def _run(self, session_id: str, session: Session | None, missing, body, args, fresh: bool):
        """body(session, *args) under the session's lock against the latest log (see above); `fresh`
        catches up before judging."""
        checked = False
        while True:
            if session is None or session.gone:
                session = self._table.get(session_id)
                if session is None or session.gone:
                    session = self._load(session_id)[0]
                    checked = True
                if session is None:
                    raise missing(session_id)
            with session.lock:
                if session.gone:
                    continue
                if fresh and not checked:
                    checked = True
                    self.catch_up(session)
                    if session.gone:
                        continue
                try:
                    result = body(session, *args)
                except Stale:
                    checked = True
                    continue
                except (MacpError, StatusError):
                    if checked:
                        raise
                    checked = True
                    if self.catch_up(session):
                        continue
                    raise
                if checked or not getattr(result, "duplicate", False):
                    return result
                checked = True
                if not self.catch_up(session):
                    return result

    def catch_up(self, session: Session) -> bool:
        """Under the session's lock: apply what other instances appended since this copy was current.
        True when anything changed. A newer incarnation replaces the copy (the old one is `gone`)."""
        try:
            incarnation, records, replaced = self.store.since(session.session_id, session.incarnation,
                                                              session.log_length)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        if replaced:
            fresh = self._replay(session.session_id, incarnation, records)
            self._table.drop(session, fresh)
            if fresh is not None:
                self._fanout.emit(Event.CREATED, fresh, fresh.started_at_ms)
            return True
        for record in records:
            self._apply_logged(session, record)
        return bool(records)

    def _apply_logged(self, session: Session, rec: LogRecord) -> None:
        """One record another instance appended, applied as replay applies it, then published and
        announced like a local one."""
        before = session.status
        replay_record(session, rec, strict=False)
        session.log_length += 1
        if rec.kind == ENTRY_KIND_INCOMING:
            self._fanout.publish(session, record_envelope(rec))
        if session.status != before:
            self._fanout.emit(_EVENT_OF_STATUS[session.status], session, rec.received_at_ms)

    def _replay(self, session_id: str, incarnation: int, records: list[LogRecord]) -> Session | None:
        try:
            session = self._recovery.replay_session(session_id, records)[0]
        except Exception as exc:
            log.warning("session %s could not be loaded from the shared store: %s", session_id, exc)
            return None
        session.incarnation = incarnation
        session.log_length = len(records)
        return session

    def _load(self, session_id: str) -> tuple[Session | None, bool]:
        """The session from the store into the table: (session or None when unknown, newly inserted)."""
        try:
            loaded = self.store.load(session_id)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        if loaded is None:
            return None, False
        session = self._replay(session_id, *loaded)
        if session is None:
            return None, False
        current = self._table.insert_unless_present(session, self._evicted)
        return current, current is session

    # --- SessionStart: the first append of an id wins across instances --------------------------------

    def existing_start(self, existing: Session, message_id: str, now: int) -> tuple[Outcome | None, tuple | None]:
        with existing.lock:
            if existing.gone:
                return None, None
            self.catch_up(existing)
            if existing.gone:
                return None, None
            if message_id in existing.seen:
                return Outcome(True, existing.status), None
            if self._table.evictable_now(existing, now):
                # Past its retention anywhere: the id may begin its next incarnation.
                self._table.drop(existing)
                return None, (existing.incarnation, existing.log_length)
        raise MacpError(Kind.SessionAlreadyExists, detail=f"session {existing.session_id!r} already exists")

    def append_start(self, session: Session, record: LogRecord, previous: tuple | None) -> None:
        previous = previous or (0, 0)   # (0, 0): the id was never used
        self._commit.append_expecting(record, previous)
        session.incarnation = previous[0] + 1
        session.log_length = 1

    def taken(self, session_id: str) -> None:
        if self._load(session_id)[0] is None:
            raise MacpError(Kind.StorageFailed, detail="the session id is taken but cannot be loaded")

    def reload(self, registry) -> bool:
        """The change notification from the instance that registered a name may still be on its way."""
        try:
            registry.reload()
        except Exception as exc:
            log.warning("could not reload a registry: %s", exc)
            return False
        return True

    # --- reads, sweep, eviction, recovery ----------------------------------------------------------------

    def history(self, session: Session) -> list[LogRecord]:
        try:
            return self.store.history_upto(session.session_id, session.incarnation, session.log_length)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None

    def complete_history(self, session: Session) -> list[LogRecord] | None:
        records = self.history(session)
        return records if records and records[0].message_type == "SessionStart" else None

    def before_sweep(self, now: int, emit_due: Callable[[int], None]) -> None:
        self.refresh()   # several instances: only triggers synthesize (the conditional append decides)

    def evict(self, session: Session) -> bool:
        return self._table.evict(session, self._evicted)

    def refresh(self) -> None:
        """Load the sessions other instances started, catch up those that moved on (ListSessions,
        WatchSessions and the sweep see every instance's sessions)."""
        try:
            overview = self.store.overview()
        except StorageError as exc:
            log.warning("could not list the shared sessions: %s", exc)
            return
        missing = []
        for session_id, incarnation, length in overview:
            session = self._table.get(session_id)
            if session is None:
                if self._evicted.get(session_id) != incarnation:
                    missing.append(session_id)
            elif session.incarnation != incarnation or session.log_length != length:
                with session.lock:
                    if not session.gone:
                        self.catch_up(session)
        if not missing:
            return
        try:
            loaded = self.store.load_many(missing)
        except StorageError as exc:
            log.warning("could not load shared sessions: %s", exc)
            return
        sessions = self._table.sessions
        for session_id, (incarnation, records) in loaded.items():
            session = self._replay(session_id, incarnation, records)
            if session is None:
                continue
            with self._table.lock:
                if session_id in sessions:
                    continue
                sessions[session_id] = session
                self._evicted.pop(session_id, None)
            self._fanout.emit(Event.CREATED, session, session.started_at_ms)

    def recover(self, strict: bool) -> tuple[int, int]:
        """Every session of the shared store, then follow the other instances' changes (the bus)."""
        recovered = failed = 0
        sessions = self._table.sessions
        for session_id, incarnation, records in self.store.replay_shared():
            try:
                session = self._recovery.replay_session(session_id, records)[0]
            except Exception as exc:
                failed += 1
                log.warning("session %s could not be recovered: %s", session_id, exc)
                if strict:
                    raise
                continue
            session.incarnation = incarnation
            session.log_length = len(records)
            sessions[session_id] = session
            recovered += 1
        if self._bus is not None:
            self._bus.start(self)
        return recovered, failed

    # --- the bus's listener ------------------------------------------------------------------------------

    def record_committed(self, session_id: str, incarnation: int, index: int) -> None:
        """The store says record `index` of `session_id` was committed (by any instance). Sessions
        somebody here watches are caught up now; the others when next touched."""
        session = self._table.get(session_id)
        if session is not None and session.incarnation == incarnation and session.log_length > index:
            return   # this copy has it (our own append)
        if not self._fanout.watched(session_id):
            return
        if session is None or session.gone:
            session, inserted = self._load(session_id)
            if session is not None and inserted:
                self._fanout.emit(Event.CREATED, session, session.started_at_ms)
            return
        with session.lock:
            if not session.gone:
                self.catch_up(session)

    def positions(self) -> list[tuple[str, int, int]]:
        """(session id, incarnation, length) of every session watched here (the bus catches them up
        after it lost notifications)."""
        positions = []
        for session_id in self._fanout.watched_sessions():
            session = self._table.get(session_id)
            if session is not None:
                positions.append((session_id, session.incarnation, session.log_length))
        return positions

    def signal_received(self, data: bytes) -> None:
        """An accepted Signal/Progress of another instance, for this instance's WatchSignals."""
        signals = self._fanout.signals
        if not len(signals):
            return
        try:
            item = core_pb2.WatchSignalsResponse.FromString(data)
        except Exception:
            log.warning("cluster: undecodable signal notification")
            return
        signals.publish((access.signal_subject(item.envelope), item))

    def _relay_signal(self, item) -> None:
        self._bus.publish_signal(item.SerializeToString())   # type: ignore[union-attr]
