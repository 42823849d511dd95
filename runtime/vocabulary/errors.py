"""Every error a client can get, raised as MacpError(kind) (an Ack error code) or StatusError (a refusal
of a non-Send RPC). Transport-free: the transport maps kinds to gRPC statuses in one table
(runtime/transport/status.py)."""
from __future__ import annotations

import enum
import json


class Kind(enum.Enum):
    # name = Ack error.code. Several kinds share a code, so values are made unique by the enum
    # machinery below (Enum would otherwise alias them).
    InvalidMacpVersion = "UNSUPPORTED_PROTOCOL_VERSION"
    InvalidEnvelope = "INVALID_ENVELOPE"
    InvalidPayload = "INVALID_ENVELOPE"
    InvalidTtl = "INVALID_ENVELOPE"
    InvalidModeState = "INVALID_ENVELOPE"
    SessionAlreadyExists = "SESSION_ALREADY_EXISTS"
    UnknownSession = "SESSION_NOT_FOUND"
    SessionNotOpen = "SESSION_NOT_OPEN"
    TtlExpired = "SESSION_NOT_OPEN"
    UnknownMode = "MODE_NOT_SUPPORTED"
    Forbidden = "FORBIDDEN"
    Unauthenticated = "UNAUTHENTICATED"
    PayloadTooLarge = "PAYLOAD_TOO_LARGE"
    RateLimited = "RATE_LIMITED"
    StorageFailed = "INTERNAL_ERROR"
    InvalidSessionId = "INVALID_SESSION_ID"
    UnknownPolicyVersion = "UNKNOWN_POLICY_VERSION"
    PolicyDenied = "POLICY_DENIED"
    InvalidPolicyDefinition = "INVALID_POLICY_DEFINITION"

    def __new__(cls, code: str):
        member = object.__new__(cls)
        member._value_ = (len(cls.__members__), code)
        member.code = code
        return member


class MacpError(Exception):
    """A refusal with a wire code.

    `detail` is for logs. `reason` is the human explanation the client gets (issue 15): a Send Ack's
    `error.message` is `<display name>: <reason>` and its `error.details` carries `{"reason": ...}`, so a
    client that reads only `code` sees nothing new while one that shows the message learns why.
    The reason defaults to `detail`; storage failures keep theirs to the log (paths, driver text).
    """

    __slots__ = ("kind", "reasons", "detail", "reason")

    def __init__(self, kind: Kind, reasons: list[str] | None = None, detail: str = "", reason: str | None = None):
        self.kind = kind
        self.reasons = reasons or []
        self.detail = detail
        if reason is None:
            reason = "" if kind in _LOG_ONLY else (detail or "; ".join(self.reasons))
        self.reason = reason
        super().__init__(f"{kind.name}: {detail}" if detail else kind.name)

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def display_name(self) -> str:
        """The reference's display name (v0.4.0 puts exactly this in MACPError.message)."""
        return self.kind.name

    @property
    def message(self) -> str:
        """`Ack.error.message`: the display name, then the reason when there is one."""
        return f"{self.kind.name}: {self.reason}" if self.reason else self.kind.name

    @property
    def status_message(self) -> str:
        if self.kind is Kind.PolicyDenied and self.reasons:
            return "PolicyDenied: " + "; ".join(self.reasons)
        return self.kind.name

    @property
    def details(self) -> bytes:
        """`error.details` JSON: `reasons` for PolicyDenied (as v0.4.0), `reason` whenever there is one."""
        body: dict = {}
        if self.kind is Kind.PolicyDenied:
            body["reasons"] = self.reasons
        if self.reason:
            body["reason"] = self.reason
        if not body:
            return b""
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# Kinds whose detail is operator information only (it may name files or database errors).
_LOG_ONLY = frozenset({Kind.StorageFailed})


NOT_FOUND = "NOT_FOUND"
PERMISSION_DENIED = "PERMISSION_DENIED"
# The registry code a status refusal carries when its raiser names none (current.md §3.2).
_MACP_CODE_OF_STATUS = {NOT_FOUND: "SESSION_NOT_FOUND", PERMISSION_DENIED: "FORBIDDEN"}


class StatusError(Exception):
    """A refusal that RPCs other than Send report as a status (e.g. NOT_FOUND on GetSession).
    `code` is one of the names above; the transport turns it into the gRPC status of that name.
    `macp_code` is the registry code of the macp-error-code trailer (current profile)."""

    def __init__(self, code: str, message: str, macp_code: str | None = None):
        self.code = code
        self.message = message
        self.macp_code = macp_code or _MACP_CODE_OF_STATUS.get(code)
        super().__init__(f"{code}: {message}")
