"""The gRPC servicer: converts protobuf <-> engine calls and maps errors to codes. No logic of its own
beyond the transport-level checks the spec puts before the kernel (shape, auth, rate limits)."""
from __future__ import annotations

import logging
from time import perf_counter

import grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

from . import __version__
from .auth import Identity
from .engine import Engine, Outcome
from .errors import Kind, MacpError, StatusError
from .ratelimit import SlidingWindow
from .rpc_policies import PolicyRpcs
from .rpc_registry import RegistryRpcs
from .rpc_streams import StreamRpcs, StreamSlots
from .session import OPEN, Session, now_ms
from .specs.hooks.common import is_blank

log = logging.getLogger("macp_runtime.service")

PROTOCOL_VERSION = "1.0"
RUNTIME_NAME = "macp-runtime"
RUNTIME_TITLE = "MACP Reference Runtime"
RUNTIME_DESCRIPTION = "Python MACP runtime: coordination modes declared in YAML, enforced by one session engine."
CONTENT_TYPE = "application/macp-envelope+proto"
INSTRUCTIONS = ("Authenticate every call with `authorization: Bearer <token>` and send envelopes with the unary "
                "Send RPC (StreamSession for bidirectional streams).")


class MacpService(PolicyRpcs, StreamRpcs, RegistryRpcs, core_pb2_grpc.MACPRuntimeServiceServicer):
    """RPCs not overridden here answer UNIMPLEMENTED (the generated base class does that)."""

    def __init__(self, engine: Engine, authenticator, *, max_payload_bytes: int,
                 session_start_limit: int, message_limit: int, max_streams: int = 1000):
        self.engine = engine
        self.auth = authenticator
        self.max_payload_bytes = max_payload_bytes
        self.start_window = SlidingWindow(session_start_limit)
        self.message_window = SlidingWindow(message_limit)
        self.stream_slots = StreamSlots(max_streams)

    # --- helpers ---------------------------------------------------------------------------------

    def _identity(self, context) -> Identity | None:
        return self.auth.authenticate(context.invocation_metadata())

    def _require_identity(self, context) -> Identity:
        identity = self._identity(context)
        if identity is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")
        return identity

    def _require_registry_manager(self, context) -> Identity:
        """Register/Unregister/Promote modes and Register/Unregister policies need this capability."""
        identity = self._require_identity(context)
        if not identity.can_manage_mode_registry:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
        return identity

    # --- Send (§3) -------------------------------------------------------------------------------

    def Send(self, request, context):
        if not request.HasField("envelope"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "SendRequest must contain an envelope")
        env = request.envelope
        started = perf_counter()
        metrics = self.engine.metrics
        try:
            self._check_shape(env)
            identity = self._identity(context)
            if identity is None:
                raise MacpError(Kind.Unauthenticated, detail="no valid credential")
            if env.sender and env.sender != identity.sender:
                raise MacpError(Kind.Unauthenticated, detail=f"envelope sender {env.sender!r} is not the caller")
            env.sender = identity.sender
            mtype = env.message_type
            is_start = mtype == "SessionStart"
            if is_start and not identity.can_start_sessions:
                raise MacpError(Kind.Forbidden, detail="identity may not start sessions")
            if identity.allowed_modes is not None and env.mode not in identity.allowed_modes:
                raise MacpError(Kind.Forbidden, detail=f"identity may not use mode {env.mode!r}")
            window = self.start_window if is_start else self.message_window
            if not window.allow(identity.sender):
                metrics.rate_limited("session_start" if is_start else "message")
                raise MacpError(Kind.RateLimited, detail=f"rate limit reached for {identity.sender}")
            if is_start:
                outcome = self.engine.start_session(env, identity)
            elif mtype == "Signal" or mtype == "Progress":
                outcome = self._ambient(env)
            else:
                outcome = self.engine.process_message(env, identity)
        except MacpError as exc:
            log.info("message rejected", extra={"fields": {
                "code": exc.code, "error": exc.message, "message_type": env.message_type, "mode": env.mode,
                "session_id": env.session_id, "message_id": env.message_id, "sender": env.sender,
                "detail": exc.detail}})
            metrics.send_done(env.mode, env.message_type, exc.code, perf_counter() - started)
            return core_pb2.SendResponse(ack=_error_ack(exc, env.message_id, env.session_id))
        metrics.send_done(env.mode, env.message_type, "", perf_counter() - started)
        return core_pb2.SendResponse(ack=envelope_pb2.Ack(
            ok=True, duplicate=outcome.duplicate, message_id=env.message_id, session_id=env.session_id,
            accepted_at_unix_ms=now_ms(), session_state=outcome.state))

    def _check_shape(self, env) -> None:
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
        elif mtype != "Progress":
            if not env.session_id or is_blank(env.mode):
                raise MacpError(Kind.InvalidEnvelope, detail="session_id and mode are required")
        if len(env.payload) > self.max_payload_bytes:
            raise MacpError(Kind.PayloadTooLarge, detail=f"payload of {len(env.payload)} bytes")

    def _ambient(self, env) -> Outcome:
        """Signals and Progress: validated, never part of any session's history (§6)."""
        if env.payload:
            try:
                if env.message_type == "Signal":
                    if is_blank(core_pb2.SignalPayload.FromString(env.payload).signal_type):
                        raise MacpError(Kind.InvalidPayload, detail="signal_type must not be blank")
                else:
                    core_pb2.ProgressPayload.FromString(env.payload)
            except MacpError:
                raise
            except Exception:
                raise MacpError(Kind.InvalidPayload, detail=f"{env.message_type} payload does not decode") from None
        self._publish_signal(env)
        return Outcome(False, OPEN)

    # --- sessions --------------------------------------------------------------------------------

    def GetSession(self, request, context):
        identity = self._require_identity(context)
        try:
            session = self.engine.get_session(request.session_id, identity)
        except StatusError as exc:
            context.abort(exc.code, exc.message)
        return core_pb2.GetSessionResponse(metadata=session_metadata(session))

    def CancelSession(self, request, context):
        identity = self._require_identity(context)
        try:
            outcome = self.engine.cancel_session(request.session_id, identity, request.reason)
        except StatusError as exc:
            context.abort(exc.code, exc.message)
        except MacpError as exc:
            return core_pb2.CancelSessionResponse(ack=_error_ack(exc, "", request.session_id))
        return core_pb2.CancelSessionResponse(ack=envelope_pb2.Ack(
            ok=True, session_id=request.session_id, accepted_at_unix_ms=now_ms(), session_state=outcome.state))

    # --- discovery -------------------------------------------------------------------------------

    def Initialize(self, request, context):
        versions = list(request.supported_protocol_versions)
        if not versions:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "INVALID_REQUEST: supported_protocol_versions must not be empty")
        if PROTOCOL_VERSION not in versions:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "UNSUPPORTED_PROTOCOL_VERSION: no mutually supported protocol version")
        return core_pb2.InitializeResponse(
            selected_protocol_version=PROTOCOL_VERSION,
            runtime_info=core_pb2.RuntimeInfo(name=RUNTIME_NAME, title=RUNTIME_TITLE, version="0.4.0",
                                              description=f"{RUNTIME_DESCRIPTION} (macp-runtime-python {__version__})"),
            capabilities=_CAPABILITIES,
            supported_modes=self.engine.modes.names,
            instructions=INSTRUCTIONS,
        )

    def GetManifest(self, request, context):
        if request.agent_id not in ("", RUNTIME_NAME):
            context.abort(grpc.StatusCode.NOT_FOUND, f"Agent '{request.agent_id}' not found")
        return core_pb2.GetManifestResponse(manifest=core_pb2.AgentManifest(
            agent_id=RUNTIME_NAME, title=RUNTIME_TITLE, description=RUNTIME_DESCRIPTION,
            supported_modes=self.engine.modes.names,
            input_content_types=[CONTENT_TYPE], output_content_types=[CONTENT_TYPE]))

    def ListModes(self, request, context):
        return core_pb2.ListModesResponse(modes=self.engine.modes.standard)


_CAPABILITIES = core_pb2.Capabilities(
    sessions=core_pb2.SessionsCapability(stream=True, list_sessions=True, watch_sessions=True),
    cancellation=core_pb2.CancellationCapability(cancel_session=True),
    progress=core_pb2.ProgressCapability(progress=True),
    manifest=core_pb2.ManifestCapability(get_manifest=True),
    mode_registry=core_pb2.ModeRegistryCapability(list_modes=True, list_changed=True),
    roots=core_pb2.RootsCapability(list_roots=True, list_changed=True),
    policy_registry=policy_pb2.PolicyRegistryCapability(register_policy=True, list_policies=True, list_changed=True),
    experimental=core_pb2.ExperimentalCapabilities(features={"ext_mode_lifecycle": "true"}),
)


def _error_ack(exc: MacpError, message_id: str, session_id: str) -> envelope_pb2.Ack:
    return envelope_pb2.Ack(
        ok=False, message_id=message_id, session_id=session_id, accepted_at_unix_ms=now_ms(),
        error=envelope_pb2.MACPError(code=exc.code, message=exc.message, session_id=session_id,
                                     message_id=message_id, details=exc.details))


def session_metadata(s: Session) -> core_pb2.SessionMetadata:
    activity = [core_pb2.ParticipantActivity(participant_id=p, message_count=c, last_message_at_unix_ms=t)
                for p, (c, t) in (s.activity or {}).items()]
    return core_pb2.SessionMetadata(
        session_id=s.session_id, mode=s.mode, state=s.status, started_at_unix_ms=s.started_at_ms,
        expires_at_unix_ms=s.deadline_ms, mode_version=s.mode_version,
        configuration_version=s.configuration_version, policy_version=s.policy_version,
        participants=s.participants, participant_activity=activity, initiator=s.initiator,
        context_id=s.context_id, extension_keys=list(s.extension_keys))
