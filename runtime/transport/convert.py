"""Kernel objects <-> wire messages, in one place: Acks, session metadata, envelopes of history
records and of accepted messages, lifecycle events, policy descriptors, inline stream errors."""
from __future__ import annotations

from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from ..kernel.fanout import Accepted
from ..kernel.records import Outcome, record_envelope
from ..vocabulary.errors import MacpError
from ..vocabulary.session import Session, now_ms

_Event = core_pb2.SessionLifecycleEvent
_Ack = envelope_pb2.Ack
_MACPError = envelope_pb2.MACPError
_StreamResponse = core_pb2.StreamSessionResponse
_SendResponse = core_pb2.SendResponse


def ok_ack(outcome: Outcome, message_id: str, session_id: str) -> envelope_pb2.Ack:
    return _Ack(ok=True, duplicate=outcome.duplicate, message_id=message_id, session_id=session_id,
                accepted_at_unix_ms=now_ms(), session_state=outcome.state)


def send_response(outcome: Outcome, message_id: str, session_id: str) -> core_pb2.SendResponse:
    """The ok SendResponse, built in place (no Ack copied into it)."""
    out = _SendResponse()
    ack = out.ack
    ack.ok = True
    if outcome.duplicate:
        ack.duplicate = True
    ack.message_id = message_id
    ack.session_id = session_id
    ack.accepted_at_unix_ms = now_ms()
    ack.session_state = outcome.state
    return out


def error_ack(exc: MacpError, message_id: str, session_id: str, profile=None) -> envelope_pb2.Ack:
    """`profile` (runtime/profile.py) shapes the message and details (reasons, `denials` under current)."""
    if profile is not None:
        message, details = profile.error_message(exc), profile.error_details(exc)
    else:
        message, details = exc.message, exc.details
    return _Ack(ok=False, message_id=message_id, session_id=session_id, accepted_at_unix_ms=now_ms(),
                error=_MACPError(code=exc.code, message=message, session_id=session_id,
                                 message_id=message_id, details=details))


def session_metadata(s: Session) -> core_pb2.SessionMetadata:
    activity = [core_pb2.ParticipantActivity(participant_id=p, message_count=c, last_message_at_unix_ms=t)
                for p, (c, t) in (s.activity or {}).items()]
    return core_pb2.SessionMetadata(
        session_id=s.session_id, mode=s.mode, state=s.status, started_at_unix_ms=s.started_at_ms,
        expires_at_unix_ms=s.deadline_ms, mode_version=s.mode_version,
        configuration_version=s.configuration_version, policy_version=s.policy_version,
        participants=s.participants, participant_activity=activity, initiator=s.initiator,
        context_id=s.context_id, extension_keys=list(s.extension_keys))


def created_event(s: Session) -> core_pb2.WatchSessionsResponse:
    return core_pb2.WatchSessionsResponse(event=_Event(
        event_type=_Event.EVENT_TYPE_CREATED, session=session_metadata(s), observed_at_unix_ms=s.started_at_ms))


def lifecycle_response(item) -> core_pb2.WatchSessionsResponse:
    """An engine lifecycle item (event type, session, observed at) as a WatchSessions frame."""
    event, session, observed_at = item
    out = core_pb2.WatchSessionsResponse()
    out.event.event_type = event
    out.event.observed_at_unix_ms = observed_at
    if not session.gone:   # metadata as it is now; absent once the session was evicted
        out.event.session.CopyFrom(session_metadata(session))
    return out


def policy_descriptor(view) -> policy_pb2.PolicyDescriptor:
    """A registry PolicyView on the wire (`registered_at_unix_ms` is always 0)."""
    return policy_pb2.PolicyDescriptor(policy_id=view.policy_id, mode=view.mode, description=view.description,
                                       rules=view.rules, schema_version=view.schema_version)


def accepted_frame(item: Accepted) -> bytes:
    """The StreamSessionResponse of an accepted envelope, encoded once for all subscribers."""
    wire = item.wire
    if wire is None:
        out = _StreamResponse()
        out.envelope.CopyFrom(item.envelope)
        out.envelope.DiscardUnknownFields()
        wire = item.wire = out.SerializeToString()
    return wire


def history_frame(record) -> core_pb2.StreamSessionResponse:
    """A history entry as subscribers see it (runtime.md §7.2 step 6)."""
    return _StreamResponse(envelope=record_envelope(record))


def inline_error(message: str, session_id: str, details: bytes = b"") -> core_pb2.StreamSessionResponse:
    return _StreamResponse(error=_MACPError(code=message, message=message, session_id=session_id, details=details))


def inline_macp_error(exc: MacpError, session_id: str, message_id: str, profile) -> core_pb2.StreamSessionResponse:
    """current.md §8.4: an inline frame carries what the Ack's error would (registry code, display
    message, the rejected envelope's ids, the same details)."""
    ack = error_ack(exc, message_id, session_id, profile)
    return _StreamResponse(error=ack.error)


def signal_response(env, sender_authenticated: bool = False) -> core_pb2.WatchSignalsResponse:
    """Only authenticated, sender-checked envelopes are broadcast: the current profile says so."""
    item = core_pb2.WatchSignalsResponse(sender_authenticated=sender_authenticated)
    item.envelope.CopyFrom(env)
    item.envelope.DiscardUnknownFields()
    return item


def encode(message) -> bytes:
    """Response serializer of every method: pre-encoded frames (bytes) pass through unchanged."""
    return message if message.__class__ is bytes else message.SerializeToString()
