"""What every call passes before the kernel sees it (runtime.md §4, §9): the caller's identity,
the envelope's shape, length caps and payload size, start/mode permissions, the per-sender rate
limits (Cancel/Suspend/Resume included), and the open-stream slots (total and per identity). The
decisions themselves live in runtime/access.py; this turns them into MacpErrors and statuses."""
from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from ..kernel import access
from ..kernel.jwks import Pending
from ..kernel.ratelimit import SlidingWindow
from ..specs.hooks.common import is_blank
from ..vocabulary.errors import Kind, MacpError
from ..vocabulary.identity import Identity
from ..vocabulary.logs import RateLimitedLog
from .status import abort

PROTOCOL_VERSION = "1.0"


class Admission:
    def __init__(self, authenticator, *, max_payload_bytes: int, session_start_limit: int, message_limit: int,
                 max_streams: int, metrics, profile=None, max_streams_per_identity: int | None = None,
                 limits: access.Limits | None = None):
        self.auth = authenticator
        self.profile = profile   # the protocol profile (runtime/profile.py): trailers of refusals
        self.max_payload_bytes = max_payload_bytes
        self.start_window = SlidingWindow(session_start_limit)
        self.message_window = SlidingWindow(message_limit)
        self.streams = StreamSlots(max_streams, max_streams_per_identity)
        self.metrics = metrics   # () -> the engine's metrics (replaced once metrics are on)
        self.limits = limits or access.Limits()
        # rejected messages are logged at most 20 lines a second (anonymous traffic cannot flood the log)
        self.rejected_log = RateLimitedLog(logging.getLogger("macp_runtime.service"))

    # --- identity --------------------------------------------------------------------------------

    async def identity(self, context) -> Identity | None:
        metadata = context.invocation_metadata() or ()
        result = self.auth.authenticate_nowait(metadata)
        if isinstance(result, Pending):   # this call started a JWKS fetch: wait for it off the loop
            await asyncio.get_running_loop().run_in_executor(None, result.wait)
            result = self.auth.authenticate_nowait(metadata)
            if isinstance(result, Pending):
                return None
        return result

    async def require_identity(self, context) -> Identity:
        identity = await self.identity(context)
        if identity is None:
            await abort(context, self.profile, grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", "UNAUTHENTICATED")
        return identity

    async def require_registry_manager(self, context) -> Identity:
        """Register/Unregister/Promote modes and Register/Unregister policies need this capability."""
        identity = await self.require_identity(context)
        if not identity.can_manage_mode_registry:
            await abort(context, self.profile, grpc.StatusCode.PERMISSION_DENIED, "Forbidden", "FORBIDDEN")
        return identity

    # --- envelopes -------------------------------------------------------------------------------

    def check_shape(self, env) -> None:
        self.limits.check_envelope(env)
        if env.macp_version != PROTOCOL_VERSION:
            raise MacpError(Kind.InvalidMacpVersion, detail=f"macp_version {env.macp_version!r} is not 1.0")
        if not env.message_type or not env.message_id:
            raise MacpError(Kind.InvalidEnvelope, detail="message_type and message_id are required")
        mtype = env.message_type
        if mtype == "Signal":
            if env.session_id or not is_blank(env.mode):
                raise MacpError(Kind.InvalidEnvelope, detail="a Signal carries no session_id and no mode")
        elif mtype == "Progress" and not env.session_id:
            if not is_blank(env.mode):
                raise MacpError(Kind.InvalidEnvelope, detail="an ambient Progress carries no mode")
        elif mtype == "Progress" and self.profile is not None and self.profile.progress_shape_strict:
            if is_blank(env.mode):   # current.md §4.1: session-scoped needs both
                raise MacpError(Kind.InvalidEnvelope, detail="a session-scoped Progress needs a mode")
        elif mtype != "Progress":
            if not env.session_id or is_blank(env.mode):
                raise MacpError(Kind.InvalidEnvelope, detail="session_id and mode are required")
        if len(env.payload) > self.max_payload_bytes:
            raise MacpError(Kind.PayloadTooLarge, detail=f"payload of {len(env.payload)} bytes")

    @staticmethod
    def may_send(identity: Identity, env, is_start: bool) -> bool:
        """Start permission and the identity's allowed modes."""
        if is_start and not identity.can_start_sessions:
            return False
        return identity.allowed_modes is None or env.mode in identity.allowed_modes

    def rate_allows(self, identity: Identity, is_start: bool) -> bool:
        window = self.start_window if is_start else self.message_window
        if window.allow(identity.sender):
            return True
        self.metrics().rate_limited("session_start" if is_start else "message")
        return False

    def admit_send(self, env, identity: Identity | None) -> bool:
        """Send (§3): everything before the kernel, as MacpErrors (Ack codes). True for a SessionStart."""
        self.check_shape(env)
        if identity is None:
            raise MacpError(Kind.Unauthenticated, detail="no valid credential")
        if env.sender and env.sender != identity.sender:
            raise MacpError(Kind.Unauthenticated, detail=f"envelope sender {env.sender!r} is not the caller")
        env.sender = identity.sender
        is_start = env.message_type == "SessionStart"
        if is_start and not identity.can_start_sessions:
            raise MacpError(Kind.Forbidden, detail="identity may not start sessions")
        if identity.allowed_modes is not None and env.mode not in identity.allowed_modes:
            raise MacpError(Kind.Forbidden, detail=f"identity may not use mode {env.mode!r}")
        if not self.rate_allows(identity, is_start):
            raise MacpError(Kind.RateLimited, detail=f"rate limit reached for {identity.sender}")
        return is_start


    def admit_control(self, identity: Identity, reason: str) -> None:
        """Cancel/Suspend/Resume: the reason is capped and the call counts against the message window."""
        self.limits.check_reason(reason)
        if not self.rate_allows(identity, False):
            raise MacpError(Kind.RateLimited, detail=f"rate limit reached for {identity.sender}")


class StreamSlots:
    """Open streams (StreamSession and every Watch*) against MACP_MAX_STREAMS and, per identity,
    MACP_MAX_STREAMS_PER_IDENTITY (access.StreamAccountant decides). Acquire after authentication."""

    def __init__(self, limit: int, per_identity: int | None = None):
        self.limit = limit
        self.accountant = access.StreamAccountant(limit, per_identity)

    async def acquire(self, context, identity: Identity) -> None:
        refused = self.accountant.acquire(identity.sender)
        if refused is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)

    def release(self, identity: Identity) -> None:
        self.accountant.release(identity.sender)

    @contextlib.asynccontextmanager
    async def held(self, context, identity: Identity):
        """One stream's slot for as long as the block runs, released however the stream ends."""
        await self.acquire(context, identity)
        try:
            yield
        finally:
            self.release(identity)

    def __len__(self) -> int:
        return len(self.accountant)
