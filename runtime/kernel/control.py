"""A session's lifecycle outside its mode: the checked lookup (lazy expiry), expiry, and the control
RPCs CancelSession, SuspendSession and ResumeSession (runtime.md §5.6, §5.7)."""
from __future__ import annotations

import logging
from typing import Callable

from macp.v1 import core_pb2

from ..registries import profile as profiles
from ..specs.hooks.policy_rules import commitment_authority_allows
from ..vocabulary.errors import PERMISSION_DENIED, Kind, MacpError, StatusError
from ..vocabulary.identity import Identity
from ..vocabulary.session import OPEN, SUSPENDED, TERMINAL, Session
from . import access
from .checkpoints import CheckpointSchedule
from .coordination import Coordination
from .fanout import Event, Fanout
from .records import Outcome, internal, not_found
from .recovery import apply_lifecycle
from .table import SessionTable

log = logging.getLogger("macp_runtime.engine")


class Control:
    def __init__(self, table: SessionTable, coordination: Coordination, fanout: Fanout,
                 checkpoints: CheckpointSchedule, clock: Callable[[], int]):
        self._table = table
        self._coordination = coordination
        self._append = coordination.append
        self._fanout = fanout
        self._checkpoints = checkpoints
        self._clock = clock

    # --- expiry (§5.6) -----------------------------------------------------------------------------

    def expire(self, session: Session, now: int) -> None:
        """Under the session's lock: record its expiry and announce it."""
        self._record(session, "TtlExpired", b"", now)
        self._checkpoints.terminal(session)
        self._fanout.emit(Event.EXPIRED, session, now)
        log.info("session %s expired", session.session_id)

    def _record(self, session: Session, message_type: str, payload: bytes, now: int) -> None:
        """A lifecycle record through the commit point, then the state change replay makes of the same record."""
        rec = internal(session, message_type, payload, now)
        self._append(session, rec)
        apply_lifecycle(session, rec)

    def lazy_expire(self, session: Session, now: int) -> None:
        """OPEN past the deadline, or SUSPENDED for more than 7 days in total -> EXPIRED (§5.6)."""
        if session.status == OPEN:
            if now > session.deadline_ms:
                self.expire(session, now)
        elif session.status == SUSPENDED:
            if session.accumulated_suspended_ms + (now - session.suspended_at_ms) > session.suspend_cap_ms:
                self.expire(session, now)

    # --- lookups -------------------------------------------------------------------------------------

    def lookup(self, session_id: str) -> Session:
        """Checked lookup: lazily expires an overdue session. NOT_FOUND when unknown."""
        return self._coordination.locked_fresh(session_id, self._table.get(session_id), not_found,
                                               self._lookup_locked)

    def _lookup_locked(self, session: Session) -> Session:
        try:
            self.lazy_expire(session, self._clock())
        except MacpError:
            log.warning("could not record the expiry of session %s", session.session_id)
        return session

    def get_session(self, session_id: str, identity: Identity) -> Session:
        session = self.lookup(session_id)
        if not access.may_read(session, identity):
            raise StatusError(PERMISSION_DENIED, "FORBIDDEN: session access denied")
        return session

    # --- CancelSession, SuspendSession, ResumeSession (§5.7) ----------------------------------------------

    def _control(self, session_id: str, identity: Identity, verb: str, body, *args):
        """Checked lookup, then the caller's authority, then body(session, *args) under the lock."""
        session = self.lookup(session_id)
        sender = identity.sender
        if sender != session.initiator and not commitment_authority_allows(
                session.policy, session.initiator, session.participant_set, sender):
            raise StatusError(PERMISSION_DENIED,
                              f"FORBIDDEN: only the session initiator or policy-delegated roles can {verb}")
        return self._coordination.locked(session_id, session, not_found, body, identity.sender, *args)

    def cancel_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        return self._control(session_id, identity, "cancel", self._cancel, reason)

    def suspend_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        return self._control(session_id, identity, "suspend", self._suspend, reason)

    def resume_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        return self._control(session_id, identity, "resume", self._resume, reason)

    def _cancel(self, session: Session, sender: str, reason: str) -> Outcome:
        now = self._clock()
        if session.status == OPEN and now > session.deadline_ms:
            self.expire(session, now)
        if session.status in TERMINAL:
            return Outcome(False, session.status)
        payload = core_pb2.SessionCancelPayload(reason=reason, cancelled_by=sender).SerializeToString()
        self._record(session, "SessionCancel", payload, now)
        self._checkpoints.terminal(session)
        self._fanout.emit(Event.CANCELLED, session, now)
        log.info("session %s cancelled by %s", session.session_id, sender)
        return Outcome(False, session.status)

    def _suspend(self, session: Session, sender: str, reason: str) -> Outcome:
        now = self._clock()
        self.lazy_expire(session, now)
        if session.status != OPEN:
            raise MacpError(Kind.SessionNotOpen, detail="only an open session can be suspended")
        payload = core_pb2.SessionSuspendPayload(reason=reason, suspended_by=sender)
        self._record(session, "SessionSuspend", payload.SerializeToString(), now)
        self._fanout.emit(Event.SUSPENDED, session, now)
        log.info("session %s suspended by %s", session.session_id, sender)
        return Outcome(False, session.status)

    def _resume(self, session: Session, sender: str, reason: str) -> Outcome:
        if session.status != SUSPENDED:
            raise MacpError(Kind.SessionNotOpen, detail="only a suspended session can be resumed")
        now = self._clock()
        banked = max(0, now - session.suspended_at_ms)
        # The record's banked_ms: the suspended duration (v0.4.0), or the TTL remaining at suspend
        # (current.md §7, RFC-MACP-0001 §7.5). Replay derives the deadline from the recorded times.
        recorded = (max(0, session.deadline_ms - session.suspended_at_ms)
                    if profiles.for_rev(session.semantics_rev).resume_records_remaining_ttl else banked)
        payload = core_pb2.SessionResumePayload(reason=reason, resumed_by=sender, banked_ms=recorded)
        self._record(session, "SessionResume", payload.SerializeToString(), now)
        if session.status == OPEN:
            self._fanout.emit(Event.RESUMED, session, now)
            log.info("session %s resumed by %s after %d ms", session.session_id, sender, banked)
            return Outcome(False, session.status)
        self._checkpoints.terminal(session)
        self._fanout.emit(Event.EXPIRED, session, now)
        log.info("session %s expired: suspended for more than 7 days in total", session.session_id)
        raise MacpError(Kind.SessionNotOpen, detail="the session was suspended for more than 7 days in total")
