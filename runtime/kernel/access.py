"""Who may see what, and how much of the server one caller may hold: the trust boundary's decisions,
kept out of the transport so every transport (and every handler) asks the same functions.

* reading a session (GetSession, StreamSession, ListSessions, WatchSessions, WatchSignals items that
  name a session): its initiator, a declared participant, or an observer identity;
* writing to it outside its mode (a Signal or Progress that names it): its initiator or a declared
  participant (anyone when the session declares no participants, as a passthrough mode allows);
* stream slots: every server-streaming and bidirectional call holds one slot of MACP_MAX_STREAMS and
  one of its identity's MACP_MAX_STREAMS_PER_IDENTITY;
* length caps on every free string a request carries (MACP_MAX_NAME_LENGTH, MACP_MAX_REASON_BYTES).

Nothing here imports grpc.
"""
from __future__ import annotations

import threading

from ..vocabulary.errors import Kind, MacpError

DEFAULT_MAX_NAME_LENGTH = 256       # ids, modes, message types, senders, policy ids (characters)
DEFAULT_MAX_REASON_BYTES = 4096     # Cancel/Suspend/Resume reasons (UTF-8 bytes)


def may_read(session, identity) -> bool:
    """GetSession, StreamSession and the listings (runtime.md §4.5)."""
    return (identity.is_observer or identity.sender == session.initiator
            or identity.sender in session.participant_set)


def may_write(session, identity) -> bool:
    """A Signal or Progress that names the session: the initiator or a declared participant."""
    return (identity.sender == session.initiator or identity.sender in session.participant_set
            or not session.participants)


def visible(sessions, identity) -> list:
    """The sessions of `sessions` the identity may read (all of them for an observer)."""
    if identity.is_observer:
        return list(sessions)
    sender = identity.sender
    return [s for s in sessions if sender == s.initiator or sender in s.participant_set]


class StreamAccountant:
    """Open streams, counted in total (`limit`) and per identity (`per_identity`).

    `acquire(key)` returns None when a slot was taken (release it with `release(key)`), else the
    reason it was refused. Unary calls never take a slot, so they keep answering when all are held.
    """

    def __init__(self, limit: int, per_identity: int | None = None):
        self.limit = limit
        self.per_identity = per_identity if per_identity else max(1, limit // 2)
        self._open = 0
        self._by_identity: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> str | None:
        with self._lock:
            if self._open >= self.limit:
                return f"too many open streams (MACP_MAX_STREAMS={self.limit})"
            held = self._by_identity.get(key, 0)
            if held >= self.per_identity:
                return f"too many open streams for this identity (MACP_MAX_STREAMS_PER_IDENTITY={self.per_identity})"
            self._open += 1
            self._by_identity[key] = held + 1
            return None

    def release(self, key: str) -> None:
        with self._lock:
            self._open -= 1
            held = self._by_identity.get(key, 0) - 1
            if held > 0:
                self._by_identity[key] = held
            else:
                self._by_identity.pop(key, None)

    def held_by(self, key: str) -> int:
        return self._by_identity.get(key, 0)

    def __len__(self) -> int:
        return self._open


class Limits:
    """Length caps on request strings. `check_envelope` raises MacpError(InvalidEnvelope)."""

    __slots__ = ("name", "reason_bytes")

    def __init__(self, name: int = DEFAULT_MAX_NAME_LENGTH, reason_bytes: int = DEFAULT_MAX_REASON_BYTES):
        self.name = name
        self.reason_bytes = reason_bytes

    def check_envelope(self, env) -> None:
        n = self.name
        for field in ("session_id", "message_id", "mode", "message_type", "sender"):
            value = getattr(env, field)
            if len(value) > n:
                raise MacpError(Kind.InvalidEnvelope, detail=f"{field} is longer than {n} characters")

    def name_ok(self, value: str) -> bool:
        return len(value) <= self.name

    def check_names(self, **values: str) -> None:
        """Every value at most `name` characters; raises ValueError naming the first that is not."""
        for field, value in values.items():
            if len(value) > self.name:
                raise ValueError(f"{field} is longer than {self.name} characters")

    def check_reason(self, reason: str) -> None:
        if len(reason) > self.reason_bytes or len(reason.encode("utf-8", "surrogatepass")) > self.reason_bytes:
            raise MacpError(Kind.InvalidEnvelope, detail=f"reason is longer than {self.reason_bytes} bytes")


def signal_subject(env, payload=None) -> str:
    """The session a Signal or Progress is about: its session_id, else a Signal's
    correlation_session_id ("" when it names none). `payload` is the decoded SignalPayload if known."""
    if env.session_id:
        return env.session_id
    if env.message_type == "Signal":
        if payload is None and env.payload:
            from macp.v1 import core_pb2
            try:
                payload = core_pb2.SignalPayload.FromString(env.payload)
            except Exception:
                return ""
        return payload.correlation_session_id if payload is not None else ""
    return ""


def may_watch_signal(subject: str, lookup, identity) -> bool:
    """A WatchSignals item: ambient ones reach every authenticated watcher; one that names a session
    only watchers who may read it (`lookup(id)` -> session or None; an unknown session: observers)."""
    if not subject or identity.is_observer:
        return True
    session = lookup(subject)
    return session is not None and may_read(session, identity)
