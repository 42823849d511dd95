"""What a hook receives and how it rejects.

Hook kinds (the YAML key that names them -> signature):
  state.initial        (session) -> initial mode state (JSON-compatible dict)
  session_start.check  (session) -> bool
  roles.<name>         (session, sender) -> bool
  guards[].check       (ctx) -> bool            False rejects with the guard's declared error
  effects[]            (ctx) -> None            mutates ctx.state; runs only after the record is durable
  to[].when            (ctx) -> bool            picks the next phase; sees the state after the effects
  commitment.ready     (ctx) -> bool
  commitment.policy    (ctx) -> list[str]       deny reasons; [] allows
  commitment.resolution(ctx) -> bytes
  payloads.<type>.decode (raw: bytes) -> object  raises Reject("InvalidPayload") when malformed
A guard may also raise Reject itself when it needs a different error or reasons.
"""
from __future__ import annotations


class Reject(Exception):
    """A mode refuses a message. `kind` is one of KINDS; `reasons` only matter for PolicyDenied."""

    KINDS = ("InvalidPayload", "Forbidden", "PolicyDenied", "SessionNotOpen", "InvalidModeState")

    def __init__(self, kind: str, *reasons: str, detail: str = ""):
        if kind not in self.KINDS:
            raise ValueError(f"unknown rejection kind {kind!r}")
        self.kind = kind
        self.reasons = list(reasons)
        self.detail = detail
        super().__init__(kind if not reasons else f"{kind}: {'; '.join(reasons)}")


class HookContext:
    """One message being judged by a mode.

    session: the runtime's session record; hooks read `initiator`, `participants`,
             `participant_set`, `policy` (a BoundPolicy), `mode_version`,
             `configuration_version`, `policy_version`, `state` (the mode state), `phase`.
    """

    __slots__ = ("session", "sender", "message_type", "payload", "raw", "timestamp_ms", "state")

    def __init__(self, session, sender, message_type, payload, raw, timestamp_ms):
        self.session = session
        self.sender = sender
        self.message_type = message_type
        self.payload = payload
        self.raw = raw
        self.timestamp_ms = timestamp_ms
        self.state = session.state
