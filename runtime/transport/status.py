"""The one table from MACP error kinds to gRPC statuses (runtime.md §12). Nothing below the transport
imports grpc: the kernel raises MacpError(kind) / StatusError(name) and only this module names codes."""
from __future__ import annotations

from typing import NoReturn

import grpc

from ..vocabulary.errors import NOT_FOUND, PERMISSION_DENIED, Kind, MacpError, StatusError

_C = grpc.StatusCode

# The status a MacpError becomes where the protocol reports it as a status instead of an Ack (e.g. a
# terminal StreamSession error, a failed subscribe).
KIND_STATUS: dict[Kind, grpc.StatusCode] = {
    Kind.InvalidMacpVersion: _C.FAILED_PRECONDITION,
    Kind.InvalidEnvelope: _C.FAILED_PRECONDITION,
    Kind.InvalidPayload: _C.FAILED_PRECONDITION,
    Kind.InvalidTtl: _C.FAILED_PRECONDITION,
    Kind.InvalidModeState: _C.FAILED_PRECONDITION,
    Kind.SessionAlreadyExists: _C.ALREADY_EXISTS,
    Kind.UnknownSession: _C.FAILED_PRECONDITION,
    Kind.SessionNotOpen: _C.FAILED_PRECONDITION,
    Kind.TtlExpired: _C.FAILED_PRECONDITION,
    Kind.UnknownMode: _C.FAILED_PRECONDITION,
    Kind.Forbidden: _C.PERMISSION_DENIED,
    Kind.Unauthenticated: _C.UNAUTHENTICATED,
    Kind.PayloadTooLarge: _C.RESOURCE_EXHAUSTED,
    Kind.RateLimited: _C.RESOURCE_EXHAUSTED,
    Kind.StorageFailed: _C.INTERNAL,
    Kind.InvalidSessionId: _C.INVALID_ARGUMENT,
    Kind.UnknownPolicyVersion: _C.FAILED_PRECONDITION,
    Kind.PolicyDenied: _C.FAILED_PRECONDITION,
    Kind.InvalidPolicyDefinition: _C.INVALID_ARGUMENT,
}
_missing = [k.name for k in Kind if k not in KIND_STATUS]
if _missing:   # a new error kind needs its status here; fail at import, not on the wire
    raise RuntimeError(f"transport/status.py: no gRPC status for {', '.join(_missing)}")

# StatusError names (runtime/errors.py) -> status
STATUS_OF: dict[str, grpc.StatusCode] = {
    NOT_FOUND: _C.NOT_FOUND,
    PERMISSION_DENIED: _C.PERMISSION_DENIED,
}


def error_status(exc: MacpError) -> tuple[grpc.StatusCode, str]:
    """A MacpError as (status, details)."""
    return KIND_STATUS[exc.kind], exc.status_message


def status_of(exc: StatusError) -> grpc.StatusCode:
    return STATUS_OF[exc.code]


async def abort(context, profile, status: grpc.StatusCode, message: str, macp_code: str | None = None,
                details: bytes = b"") -> NoReturn:
    """End the call with `status`; under the `current` profile with the macp-error-code trailer
    (and macp-error-details-bin when there are details), current.md §3.2. Never returns: grpc.aio's
    `abort` raises."""
    trailers = profile.trailers(macp_code, details) if profile is not None else ()
    await context.abort(status, message, trailing_metadata=trailers)
    raise AssertionError("grpc.aio's ServicerContext.abort returned")   # documented to raise, always


def on_lag(context, profile, stream_name: str, what: str):
    """The `lagged` callback of a watch: None (ends OK) unless the profile makes lag an error."""
    if profile is None or not profile.lag_is_error:
        return None

    async def lagged() -> None:
        await abort(context, profile, grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{stream_name} receiver fell behind by 1 {what}", "STREAM_LAGGED")
    return lagged


async def abort_status_error(context, profile, exc: StatusError) -> NoReturn:
    await abort(context, profile, status_of(exc), exc.message, exc.macp_code)
