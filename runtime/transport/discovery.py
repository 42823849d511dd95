"""Initialize, GetManifest, ListModes, ListExtModes, ListRoots and WatchRoots (runtime.md §8)."""
from __future__ import annotations

import grpc
from macp.v1 import core_pb2

from .. import __version__
from ..vocabulary.session import now_ms
from .admission import PROTOCOL_VERSION
from .loop import Doorbell
from .status import abort

RUNTIME_NAME = "macp-runtime"
RUNTIME_TITLE = "MACP Reference Runtime"
RUNTIME_DESCRIPTION = "Python MACP runtime: coordination modes declared in YAML, enforced by one session engine."
CONTENT_TYPE = "application/macp-envelope+proto"
INSTRUCTIONS = ("Authenticate every call with `authorization: Bearer <token>` and send envelopes with the unary "
                "Send RPC (StreamSession for bidirectional streams).")

class DiscoveryHandler:
    def __init__(self, t):
        self.t = t

    async def Initialize(self, request, context):
        versions = list(request.supported_protocol_versions)
        profile = self.t.engine.profile
        if not versions:
            await abort(context, profile, grpc.StatusCode.INVALID_ARGUMENT,
                        "INVALID_REQUEST: supported_protocol_versions must not be empty", "INVALID_REQUEST")
        if PROTOCOL_VERSION not in versions:
            await abort(context, profile, grpc.StatusCode.FAILED_PRECONDITION,
                        "UNSUPPORTED_PROTOCOL_VERSION: no mutually supported protocol version",
                        "UNSUPPORTED_PROTOCOL_VERSION")
        return core_pb2.InitializeResponse(
            selected_protocol_version=PROTOCOL_VERSION,
            runtime_info=core_pb2.RuntimeInfo(name=RUNTIME_NAME, title=RUNTIME_TITLE, version=profile.runtime_version,
                                              description=f"{RUNTIME_DESCRIPTION} (macp-runtime-python {__version__})"),
            capabilities=profile.capabilities(register_policy=not self.t.engine.policies.read_only),
            supported_modes=self.t.engine.modes.names,
            instructions=INSTRUCTIONS,
        )

    async def GetManifest(self, request, context):
        if request.agent_id not in ("", RUNTIME_NAME):
            await abort(context, self.t.engine.profile, grpc.StatusCode.NOT_FOUND,
                        f"Agent '{request.agent_id}' not found", "AGENT_NOT_FOUND")
        return core_pb2.GetManifestResponse(manifest=core_pb2.AgentManifest(
            agent_id=RUNTIME_NAME, title=RUNTIME_TITLE, description=RUNTIME_DESCRIPTION,
            supported_modes=self.t.engine.modes.names,
            input_content_types=[CONTENT_TYPE], output_content_types=[CONTENT_TYPE]))

    async def ListModes(self, request, context):
        return core_pb2.ListModesResponse(modes=self.t.engine.modes.standard)

    async def ListExtModes(self, request, context):
        """An unauthenticated caller gets the descriptors without a registered spec's YAML text."""
        if await self.t.admission.identity(context) is None:
            return core_pb2.ListExtModesResponse(modes=self.t.engine.modes.public_extensions)
        return core_pb2.ListExtModesResponse(modes=self.t.engine.modes.extensions)

    async def ListRoots(self, request, context):
        return core_pb2.ListRootsResponse(roots=[])

    async def WatchRoots(self, request, context):
        """One change notice, then open without further messages until the client goes."""
        t = self.t
        identity = await t.admission.require_identity(context)
        await t.admission.streams.acquire(context, identity)
        waiter = _Waiter(t.wakeups)
        t.engine.register_stream(waiter)
        try:
            yield core_pb2.WatchRootsResponse(change=core_pb2.RootsChanged(observed_at_unix_ms=now_ms()))
            while not waiter.closing:
                await waiter.bell.wait()
        finally:
            t.engine.unregister_stream(waiter)
            t.admission.streams.release(identity)


class _Waiter:
    """Something the engine can wake at shutdown."""

    def __init__(self, wakeups):
        self.bell = Doorbell(wakeups)
        self.closing = False

    def shutdown(self) -> None:
        self.closing = True
        self.bell.ring()
