"""The session kernel: knows sessions, dedup, TTLs, the commit point and error codes — no mode.

Every mode decision is delegated to the session's CompiledMode (`evaluate` judges without changing
anything, `apply` changes state after the record is durable). Sessions are serialised by their own
lock; the session table lock is held only for lookups and inserts, never across a disk write.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, NamedTuple

from macp.v1 import core_pb2

from .auth import Identity
from .errors import Kind, MacpError, StatusError
from .ids import valid_session_id
from .modes import ModeRegistry
from .policies import PolicyRegistry
from .session import CANCELLED, EXPIRED, OPEN, RESOLVED, TERMINAL, Session, now_ms
from .specs.hooks.common import is_blank
from .specs.hooks.context import Reject
from .specs.hooks.policy_rules import BoundPolicy, commitment_authority_allows
from .storage import (ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, LogRecord, StorageError, Store)

import grpc

log = logging.getLogger("macp_runtime.engine")

MAX_TTL_MS = 86_400_000
MAX_PARTICIPANTS = 1000
RUNTIME_SENDER = "_runtime"


class Outcome(NamedTuple):
    duplicate: bool
    state: int


class Engine:
    def __init__(self, modes: ModeRegistry, policies: PolicyRegistry, store: Store,
                 clock: Callable[[], int] = now_ms):
        self.modes = modes
        self.policies = policies
        self.store = store
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._table_lock = threading.Lock()

    # --- SessionStart (§5.2) ---------------------------------------------------------------------

    def start_session(self, env, identity: Identity) -> Outcome:
        session_id = env.session_id
        if not valid_session_id(session_id):
            raise MacpError(Kind.InvalidSessionId, detail=f"session id {session_id!r} is not a UUID v4/v7 or base64url")
        compiled, start = self._check_start(env.mode, env.payload)
        now = self.clock()
        while True:
            with self._table_lock:
                existing = self._sessions.get(session_id)
                if existing is None:
                    self._check_open_limit(identity)
                    session = self._new_session(session_id, compiled, identity.sender, start, now,
                                                (env.timestamp_unix_ms or now) + start.ttl_ms)
                    session.lock.acquire()
                    self._sessions[session_id] = session
                    break
            # Another start of this id is in flight or done: its outcome decides ours.
            with existing.lock:
                if existing.gone:
                    continue
                if env.message_id in existing.seen:
                    return Outcome(True, existing.status)
                raise MacpError(Kind.SessionAlreadyExists, detail=f"session {session_id!r} already exists")
        record = _incoming(env, identity.sender, now)
        record.policy_binding = session.policy.to_json()
        try:
            self._append(session, record)
        except MacpError:
            with self._table_lock:
                self._sessions.pop(session_id, None)
            session.gone = True
            session.lock.release()
            raise
        session.seen.add(env.message_id)
        session.lock.release()
        log.debug("session %s started (%s) by %s", session_id, compiled.name, identity.sender)
        return Outcome(False, session.status)

    def _check_start(self, mode_name: str, raw: bytes):
        compiled = self.modes.get(mode_name)
        if compiled is None:
            raise MacpError(Kind.UnknownMode, detail=f"mode {mode_name!r} is not registered")
        if not raw:
            raise MacpError(Kind.InvalidPayload, detail="SessionStart needs a SessionStartPayload")
        try:
            start = core_pb2.SessionStartPayload.FromString(raw)
        except Exception:
            raise MacpError(Kind.InvalidPayload, detail="SessionStart payload does not decode") from None
        if compiled.strict_start:
            if not 1 <= start.ttl_ms <= MAX_TTL_MS:
                raise MacpError(Kind.InvalidTtl, detail=f"ttl_ms {start.ttl_ms} outside 1..{MAX_TTL_MS}")
            if is_blank(start.mode_version) or is_blank(start.configuration_version):
                raise MacpError(Kind.InvalidPayload, detail="mode_version and configuration_version are required")
            participants = start.participants
            if not participants:
                raise MacpError(Kind.InvalidPayload, detail="participants must not be empty")
            if len(participants) > MAX_PARTICIPANTS:
                raise MacpError(Kind.InvalidPayload, detail=f"at most {MAX_PARTICIPANTS} participants")
            trimmed = set()
            for p in participants:
                t = p.strip()
                if is_blank(p) or t in trimmed:
                    raise MacpError(Kind.InvalidPayload, detail="participants must be non-blank and unique")
                trimmed.add(t)
        if compiled.version and start.mode_version and start.mode_version != compiled.version:
            raise MacpError(Kind.InvalidEnvelope,
                            detail=f"mode_version {start.mode_version!r} differs from {compiled.version!r}")
        if not 1 <= start.ttl_ms <= MAX_TTL_MS:
            raise MacpError(Kind.InvalidTtl, detail=f"ttl_ms {start.ttl_ms} outside 1..{MAX_TTL_MS}")
        return compiled, start

    def _check_open_limit(self, identity: Identity) -> None:
        cap = identity.max_open_sessions
        if cap is None:
            return
        now = self.clock()
        count = sum(1 for s in self._sessions.values()
                    if s.initiator == identity.sender and s.status == OPEN and now <= s.deadline_ms)
        if count >= cap:
            raise MacpError(Kind.RateLimited, detail=f"{identity.sender} already has {count} open sessions")

    def _new_session(self, session_id, compiled, initiator, start, started_at, deadline,
                     bound: BoundPolicy | None = None) -> Session:
        if bound is None:
            policy, effective = self.policies.bind(start.policy_version, compiled.name)
        else:  # replay: the binding recorded at the start, whatever the registry holds today
            policy, effective = bound, bound.policy_id
        session = Session(session_id, compiled, initiator, start, policy, started_at, deadline, effective)
        try:
            compiled.check_start(session)
        except Reject as exc:
            raise _mode_error(exc) from None
        return session

    # --- session messages (§5.4) -----------------------------------------------------------------

    def process_message(self, env, identity: Identity) -> Outcome:
        session = self._sessions.get(env.session_id)
        if session is None:
            raise MacpError(Kind.UnknownSession, detail=f"session {env.session_id!r} not found")
        with session.lock:
            if session.gone:
                raise MacpError(Kind.UnknownSession, detail=f"session {env.session_id!r} not found")
            if env.message_id in session.seen:
                return Outcome(True, session.status)
            if env.mode != session.mode:
                raise MacpError(Kind.InvalidEnvelope, detail=f"envelope mode {env.mode!r} is not the session's")
            now = self.clock()
            if session.status == OPEN and now > session.deadline_ms:
                self._expire(session, now)
                raise MacpError(Kind.TtlExpired, detail="the session's TTL has passed")
            if session.status != OPEN:
                raise MacpError(Kind.SessionNotOpen, detail="the session is not open")
            if self.modes.get(session.mode) is None:
                raise MacpError(Kind.UnknownMode, detail=f"mode {session.mode!r} is no longer registered")
            compiled = session.compiled
            sender = identity.sender
            try:
                plan = compiled.evaluate(session, sender, env.message_type, env.payload, env.timestamp_unix_ms)
            except Reject as exc:
                raise _mode_error(exc) from None
            self._append(session, _incoming(env, sender, now))  # the commit point
            session.seen.add(env.message_id)
            session.note_activity(sender, now)
            resolution = compiled.apply(session, plan)
            if resolution is not None:
                session.resolution = resolution
                session.status = RESOLVED
                log.debug("session %s resolved (%s)", session.session_id, session.mode)
            return Outcome(False, session.status)

    # --- lookups and session RPCs ----------------------------------------------------------------

    def lookup(self, session_id: str) -> Session:
        """Checked lookup: lazily expires an overdue session. NOT_FOUND when unknown."""
        session = self._sessions.get(session_id)
        if session is None or session.gone:
            raise StatusError(grpc.StatusCode.NOT_FOUND, f"Session '{session_id}' not found")
        with session.lock:
            now = self.clock()
            if session.status == OPEN and now > session.deadline_ms:
                try:
                    self._expire(session, now)
                except MacpError:
                    log.warning("could not record the expiry of session %s", session_id)
        return session

    def get_session(self, session_id: str, identity: Identity) -> Session:
        session = self.lookup(session_id)
        if not (identity.is_observer or identity.sender == session.initiator
                or identity.sender in session.participant_set):
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN: session access denied")
        return session

    def cancel_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        session = self.lookup(session_id)
        sender = identity.sender
        if sender != session.initiator and not commitment_authority_allows(
                session.policy, session.initiator, session.participant_set, sender):
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED,
                              "FORBIDDEN: only the session initiator or policy-delegated roles can cancel")
        with session.lock:
            now = self.clock()
            if session.status == OPEN and now > session.deadline_ms:
                self._expire(session, now)
            if session.status in TERMINAL:
                return Outcome(False, session.status)
            payload = core_pb2.SessionCancelPayload(reason=reason, cancelled_by=sender).SerializeToString()
            self._append(session, _internal(session, "SessionCancel", payload, now))
            session.status = CANCELLED
            session.suspended_at_ms = None
            log.info("session %s cancelled by %s", session_id, sender)
            return Outcome(False, session.status)

    def sessions(self) -> list[Session]:
        with self._table_lock:
            return list(self._sessions.values())

    # --- storage ---------------------------------------------------------------------------------

    def _append(self, session: Session, record: LogRecord) -> None:
        try:
            self.store.append(record)
        except StorageError as exc:
            log.error("storage append failed for session %s: %s", session.session_id, exc)
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        session.log_length += 1

    def _expire(self, session: Session, now: int) -> None:
        self._append(session, _internal(session, "TtlExpired", b"", now))
        session.status = EXPIRED
        log.info("session %s expired", session.session_id)

    # --- recovery --------------------------------------------------------------------------------

    def recover(self, strict: bool = False) -> tuple[int, int]:
        """Rebuild every stored session by replaying its history. Returns (recovered, failed)."""
        recovered = failed = 0
        for session_id, records in self.store.replay():
            try:
                session = self._replay_session(session_id, records)
            except Exception as exc:  # one bad session must not keep the others down
                failed += 1
                log.warning("session %s could not be recovered: %s", session_id, exc)
                if strict:
                    raise
                continue
            if session is not None:
                self._sessions[session_id] = session
                recovered += 1
        return recovered, failed

    def _replay_session(self, session_id: str, records: list[LogRecord]) -> Session | None:
        first = next((i for i, r in enumerate(records)
                      if r.kind == ENTRY_KIND_INCOMING and r.message_type == "SessionStart"), None)
        if first is None:
            raise ValueError("history has no SessionStart")
        start_rec = records[first]
        compiled, start = self._check_start(start_rec.mode, start_rec.payload)
        base = start_rec.timestamp_unix_ms or start_rec.received_at_ms
        bound = BoundPolicy.from_json(start_rec.policy_binding) if start_rec.policy_binding else None
        session = self._new_session(session_id, compiled, start_rec.sender, start,
                                    start_rec.received_at_ms, base + start.ttl_ms, bound)
        session.seen.add(start_rec.message_id)
        session.log_length = len(records)
        for rec in records[first + 1:]:
            if rec.kind == ENTRY_KIND_INCOMING:
                if session.status == OPEN:
                    try:
                        plan = compiled.evaluate(session, rec.sender, rec.message_type, rec.payload,
                                                 rec.timestamp_unix_ms)
                    except Reject as exc:
                        raise ValueError(f"replay of {rec.message_type} {rec.message_id!r} was refused: {exc}") from None
                    session.note_activity(rec.sender, rec.received_at_ms)
                    resolution = compiled.apply(session, plan)
                    if resolution is not None:
                        session.resolution = resolution
                        session.status = RESOLVED
                session.seen.add(rec.message_id)
            elif rec.kind == ENTRY_KIND_INTERNAL:
                if rec.message_type == "TtlExpired":
                    session.status = EXPIRED
                elif rec.message_type == "SessionCancel":
                    session.status = CANCELLED
                    session.suspended_at_ms = None
        return session


def _incoming(env, sender: str, now: int) -> LogRecord:
    return LogRecord(session_id=env.session_id, kind=ENTRY_KIND_INCOMING, message_id=env.message_id,
                     message_type=env.message_type, sender=sender, mode=env.mode, macp_version=env.macp_version,
                     timestamp_unix_ms=env.timestamp_unix_ms, received_at_ms=now, payload=env.payload)


def _internal(session: Session, message_type: str, payload: bytes, now: int) -> LogRecord:
    return LogRecord(session_id=session.session_id, kind=ENTRY_KIND_INTERNAL, message_type=message_type,
                     sender=RUNTIME_SENDER, mode=session.mode, macp_version="1.0", timestamp_unix_ms=now,
                     received_at_ms=now, payload=payload)


def _mode_error(exc: Reject) -> MacpError:
    return MacpError(Kind[exc.kind], reasons=exc.reasons, detail=exc.detail or str(exc))
