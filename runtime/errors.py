"""Every error a client can get, raised as MacpError(kind) and mapped to the wire in one table."""
from __future__ import annotations

import enum
import json

import grpc


class Kind(enum.Enum):
    # name = (Ack error.code, gRPC status when converted to a status). Several kinds share a code, so
    # values are made unique by the enum machinery below (Enum would otherwise alias them).
    InvalidMacpVersion = ("UNSUPPORTED_PROTOCOL_VERSION", grpc.StatusCode.FAILED_PRECONDITION)
    InvalidEnvelope = ("INVALID_ENVELOPE", grpc.StatusCode.FAILED_PRECONDITION)
    InvalidPayload = ("INVALID_ENVELOPE", grpc.StatusCode.FAILED_PRECONDITION)
    InvalidTtl = ("INVALID_ENVELOPE", grpc.StatusCode.FAILED_PRECONDITION)
    InvalidModeState = ("INVALID_ENVELOPE", grpc.StatusCode.FAILED_PRECONDITION)
    SessionAlreadyExists = ("SESSION_ALREADY_EXISTS", grpc.StatusCode.ALREADY_EXISTS)
    UnknownSession = ("SESSION_NOT_FOUND", grpc.StatusCode.FAILED_PRECONDITION)
    SessionNotOpen = ("SESSION_NOT_OPEN", grpc.StatusCode.FAILED_PRECONDITION)
    TtlExpired = ("SESSION_NOT_OPEN", grpc.StatusCode.FAILED_PRECONDITION)
    UnknownMode = ("MODE_NOT_SUPPORTED", grpc.StatusCode.FAILED_PRECONDITION)
    Forbidden = ("FORBIDDEN", grpc.StatusCode.PERMISSION_DENIED)
    Unauthenticated = ("UNAUTHENTICATED", grpc.StatusCode.UNAUTHENTICATED)
    PayloadTooLarge = ("PAYLOAD_TOO_LARGE", grpc.StatusCode.RESOURCE_EXHAUSTED)
    RateLimited = ("RATE_LIMITED", grpc.StatusCode.RESOURCE_EXHAUSTED)
    StorageFailed = ("INTERNAL_ERROR", grpc.StatusCode.INTERNAL)
    InvalidSessionId = ("INVALID_SESSION_ID", grpc.StatusCode.INVALID_ARGUMENT)
    UnknownPolicyVersion = ("UNKNOWN_POLICY_VERSION", grpc.StatusCode.FAILED_PRECONDITION)
    PolicyDenied = ("POLICY_DENIED", grpc.StatusCode.FAILED_PRECONDITION)
    InvalidPolicyDefinition = ("INVALID_POLICY_DEFINITION", grpc.StatusCode.INVALID_ARGUMENT)

    def __new__(cls, code: str, status: grpc.StatusCode):
        member = object.__new__(cls)
        member._value_ = (len(cls.__members__), code, status)
        member.code = code
        member.status = status
        return member


class MacpError(Exception):
    """A refusal with a wire code. `detail` is for logs only; the wire carries the display name."""

    __slots__ = ("kind", "reasons", "detail")

    def __init__(self, kind: Kind, reasons: list[str] | None = None, detail: str = ""):
        self.kind = kind
        self.reasons = reasons or []
        self.detail = detail
        super().__init__(f"{kind.name}: {detail}" if detail else kind.name)

    @property
    def code(self) -> str:
        return self.kind.code

    @property
    def message(self) -> str:
        """The display name, as the reference puts it in MACPError.message."""
        return self.kind.name

    @property
    def status_message(self) -> str:
        if self.kind is Kind.PolicyDenied and self.reasons:
            return "PolicyDenied: " + "; ".join(self.reasons)
        return self.kind.name

    @property
    def details(self) -> bytes:
        if self.kind is Kind.PolicyDenied:
            return json.dumps({"reasons": self.reasons}, separators=(",", ":"), ensure_ascii=False).encode()
        return b""


class StatusError(Exception):
    """A refusal that RPCs other than Send report as a gRPC status (e.g. NOT_FOUND on GetSession)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message
        super().__init__(f"{code.name}: {message}")
