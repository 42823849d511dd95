"""Initialize, GetManifest, ListModes, ListExtModes, ListRoots and WatchRoots (runtime.md §8)."""
from __future__ import annotations

import grpc
from macp.v1 import core_pb2, policy_pb2

from .. import __version__
from ..session import now_ms
from .admission import PROTOCOL_VERSION
from .loop import Doorbell

RUNTIME_NAME = "macp-runtime"
RUNTIME_TITLE = "MACP Reference Runtime"
RUNTIME_DESCRIPTION = "Python MACP runtime: coordination modes declared in YAML, enforced by one session engine."
CONTENT_TYPE = "application/macp-envelope+proto"
INSTRUCTIONS = ("Authenticate every call with `authorization: Bearer <token>` and send envelopes with the unary "
                "Send RPC (StreamSession for bidirectional streams).")

CAPABILITIES = core_pb2.Capabilities(
    sessions=core_pb2.SessionsCapability(stream=True, list_sessions=True, watch_sessions=True),
    cancellation=core_pb2.CancellationCapability(cancel_session=True),
    progress=core_pb2.ProgressCapability(progress=True),
    manifest=core_pb2.ManifestCapability(get_manifest=True),
    mode_registry=core_pb2.ModeRegistryCapability(list_modes=True, list_changed=True),
    roots=core_pb2.RootsCapability(list_roots=True, list_changed=True),
    policy_registry=policy_pb2.PolicyRegistryCapability(register_policy=True, list_policies=True, list_changed=True),
    experimental=core_pb2.ExperimentalCapabilities(features={"ext_mode_lifecycle": "true"}),
)


class DiscoveryHandler:
    def __init__(self, t):
        self.t = t

    async def Initialize(self, request, context):
        versions = list(request.supported_protocol_versions)
        if not versions:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "INVALID_REQUEST: supported_protocol_versions must not be empty")
        if PROTOCOL_VERSION not in versions:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "UNSUPPORTED_PROTOCOL_VERSION: no mutually supported protocol version")
        return core_pb2.InitializeResponse(
            selected_protocol_version=PROTOCOL_VERSION,
            runtime_info=core_pb2.RuntimeInfo(name=RUNTIME_NAME, title=RUNTIME_TITLE, version="0.4.0",
                                              description=f"{RUNTIME_DESCRIPTION} (macp-runtime-python {__version__})"),
            capabilities=CAPABILITIES,
            supported_modes=self.t.engine.modes.names,
            instructions=INSTRUCTIONS,
        )

    async def GetManifest(self, request, context):
        if request.agent_id not in ("", RUNTIME_NAME):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"Agent '{request.agent_id}' not found")
        return core_pb2.GetManifestResponse(manifest=core_pb2.AgentManifest(
            agent_id=RUNTIME_NAME, title=RUNTIME_TITLE, description=RUNTIME_DESCRIPTION,
            supported_modes=self.t.engine.modes.names,
            input_content_types=[CONTENT_TYPE], output_content_types=[CONTENT_TYPE]))

    async def ListModes(self, request, context):
        return core_pb2.ListModesResponse(modes=self.t.engine.modes.standard)

    async def ListExtModes(self, request, context):
        return core_pb2.ListExtModesResponse(modes=self.t.engine.modes.extensions)

    async def ListRoots(self, request, context):
        return core_pb2.ListRootsResponse(roots=[])

    async def WatchRoots(self, request, context):
        """One change notice, then open without further messages until the client goes."""
        t = self.t
        await t.admission.streams.acquire(context)
        waiter = _Waiter(t.wakeups)
        t.engine.register_stream(waiter)
        try:
            yield core_pb2.WatchRootsResponse(change=core_pb2.RootsChanged(observed_at_unix_ms=now_ms()))
            while not waiter.closing:
                await waiter.bell.wait()
        finally:
            t.engine.unregister_stream(waiter)
            t.admission.streams.release()


class _Waiter:
    """Something the engine can wake at shutdown."""

    def __init__(self, wakeups):
        self.bell = Doorbell(wakeups)
        self.closing = False

    def shutdown(self) -> None:
        self.closing = True
        self.bell.ring()
