"""The mode registry on the wire (runtime.md §8.3–§8.5, modes.md §9): RegisterExtMode,
UnregisterExtMode, PromoteMode, WatchModeRegistry."""
from __future__ import annotations

import logging

import grpc
from macp.v1 import core_pb2

from ..storage.base import StorageError
from ..vocabulary.session import now_ms
from .loop import Doorbell
from .status import abort, on_lag
from .watch import watch

log = logging.getLogger("macp_runtime.registry")


def _changed(observed_at: int) -> core_pb2.WatchModeRegistryResponse:
    return core_pb2.WatchModeRegistryResponse(
        change=core_pb2.RegistryChanged(registry="modes", observed_at_unix_ms=observed_at))


class RegistryHandler:
    def __init__(self, t):
        self.t = t

    async def RegisterExtMode(self, request, context):
        await self.t.admission.require_registry_manager(context)
        if not request.HasField("mode_descriptor"):
            await abort(context, self.t.engine.profile, grpc.StatusCode.INVALID_ARGUMENT, "descriptor required",
                        "INVALID_REQUEST")
        error = await self._change(context, self.t.engine.modes.register, request.mode_descriptor)
        return core_pb2.RegisterExtModeResponse(ok=error is None, error=error or "")

    async def UnregisterExtMode(self, request, context):
        await self.t.admission.require_registry_manager(context)
        error = await self._change(context, self.t.engine.modes.unregister, request.mode)
        return core_pb2.UnregisterExtModeResponse(ok=error is None, error=error or "")

    async def PromoteMode(self, request, context):
        await self.t.admission.require_registry_manager(context)
        error, final = await self._change(context, self.t.engine.modes.promote, request.mode,
                                          request.promoted_mode_name)
        if error is not None:
            return core_pb2.PromoteModeResponse(ok=False, error=error)
        return core_pb2.PromoteModeResponse(ok=True, mode=final)

    async def _change(self, context, change, *args):
        try:
            return await self.t.offload.always(change, *args)   # compiling a spec never holds up the loop
        except StorageError as exc:
            log.error("could not persist a mode registry change: %s", exc)
            await context.abort(grpc.StatusCode.INTERNAL, "storage failure: the mode registry was not changed")

    async def WatchModeRegistry(self, request, context):
        """One change notice now, then one per successful register/unregister/promote (buffer 16)."""
        t = self.t
        identity = await t.admission.require_identity(context)
        async with t.admission.streams.held(context, identity):
            bell = Doorbell(t.wakeups)
            sub = t.engine.modes.changes.subscribe(bell.ring)
            if t.engine.closing.is_set():
                sub.cancel()
                return
            async for frame in watch(bell, sub, _changed, first=[_changed(now_ms())],
                                     lagged=on_lag(context, self.t.engine.profile, "WatchModeRegistry", "changes")):
                yield frame
