"""What the kernel writes and answers, shared by its parts: log records built from envelopes and by the
runtime, the state changes a record makes (resolve, resume), the outcome of a call and its errors."""
from __future__ import annotations

from typing import NamedTuple

from macp.v1 import envelope_pb2

from ..specs.hooks.context import Reject
from ..storage import ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, LogRecord
from ..vocabulary.errors import NOT_FOUND, Kind, MacpError, StatusError
from ..vocabulary.session import EXPIRED, OPEN, RESOLVED, Session

RUNTIME_SENDER = "_runtime"


class Outcome(NamedTuple):
    duplicate: bool
    state: int


class Stale(Exception):
    """A conditional append found that another instance had advanced the session (shared store).
    The session has been caught up; the caller judges the message again."""


def incoming(env, sender: str, now: int) -> LogRecord:
    return LogRecord(session_id=env.session_id, kind=ENTRY_KIND_INCOMING, message_id=env.message_id,
                     message_type=env.message_type, sender=sender, mode=env.mode, macp_version=env.macp_version,
                     timestamp_unix_ms=env.timestamp_unix_ms, received_at_ms=now, payload=env.payload)


def internal(session: Session, message_type: str, payload: bytes, now: int) -> LogRecord:
    return LogRecord(session_id=session.session_id, kind=ENTRY_KIND_INTERNAL, message_type=message_type,
                     sender=RUNTIME_SENDER, mode=session.mode, macp_version="1.0", timestamp_unix_ms=now,
                     received_at_ms=now, payload=payload)


def record_envelope(record: LogRecord):
    """A logged Incoming record as the envelope subscribers get."""
    return envelope_pb2.Envelope(
        macp_version=record.macp_version or "1.0", mode=record.mode, message_type=record.message_type,
        message_id=record.message_id, session_id=record.session_id, sender=record.sender,
        timestamp_unix_ms=record.timestamp_unix_ms or record.received_at_ms, payload=record.payload)


def resolve(session: Session, resolution: bytes, message_type: str, payload: bytes, at_ms: int) -> None:
    if message_type == "Commitment":   # the binding Commitment, for decision receipts (set before the
        session.commitment = (payload, at_ms)   # status: a reader that sees RESOLVED sees it too)
    session.resolution = resolution
    session.status = RESOLVED


def resume(session: Session, banked: int) -> bool:
    """Bank the suspended time: True when the session is OPEN again, False when the 7-day cap expired it."""
    session.accumulated_suspended_ms += banked
    if session.semantics_rev and session.suspended_at_ms is not None:   # the interval, for §12.4's deadline
        session.suspensions += ((session.suspended_at_ms, session.suspended_at_ms + banked),)
    session.suspended_at_ms = None
    if session.accumulated_suspended_ms > session.suspend_cap_ms:
        session.status = EXPIRED
        return False
    session.deadline_ms += banked
    session.status = OPEN
    return True


def not_found(session_id: str) -> StatusError:
    shown = session_id if len(session_id) <= 256 else session_id[:256] + "…"
    return StatusError(NOT_FOUND, f"Session '{shown}' not found")


def unknown_session(session_id: str) -> MacpError:
    return MacpError(Kind.UnknownSession, detail=f"session {session_id!r} not found")


def mode_error(exc: Reject) -> MacpError:
    return MacpError(Kind[exc.kind], reasons=exc.reasons, detail=exc.detail or str(exc),
                     reason=exc.detail or "; ".join(exc.reasons))
