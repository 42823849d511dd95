"""The mode registry and roots on the wire, mixed into `MacpService` (runtime.md §8.3–§8.5,
modes.md §9): ListExtModes, RegisterExtMode, UnregisterExtMode, PromoteMode, WatchModeRegistry,
ListRoots, WatchRoots.

The mixin expects of its host class: `self.engine.modes` (a ModeRegistry), `self.stream_slots`,
`self._watch(...)` (from StreamRpcs) and `self._require_registry_manager(context)`.
"""
from __future__ import annotations

import logging
import threading

import grpc
from macp.v1 import core_pb2

from .session import now_ms
from .storage.base import StorageError

log = logging.getLogger("macp_runtime.registry")

WATCH_POLL_S = 1.0


def _changed(observed_at: int) -> core_pb2.WatchModeRegistryResponse:
    return core_pb2.WatchModeRegistryResponse(
        change=core_pb2.RegistryChanged(registry="modes", observed_at_unix_ms=observed_at))


class _Waiter:
    """Something the engine can wake at shutdown."""

    def __init__(self):
        self.event = threading.Event()

    def shutdown(self) -> None:
        self.event.set()


class RegistryRpcs:
    def ListExtModes(self, request, context):
        return core_pb2.ListExtModesResponse(modes=self.engine.modes.extensions)

    def RegisterExtMode(self, request, context):
        self._require_registry_manager(context)
        if not request.HasField("mode_descriptor"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "descriptor required")
        error = self._registry_change(context, self.engine.modes.register, request.mode_descriptor)
        return core_pb2.RegisterExtModeResponse(ok=error is None, error=error or "")

    def UnregisterExtMode(self, request, context):
        self._require_registry_manager(context)
        error = self._registry_change(context, self.engine.modes.unregister, request.mode)
        return core_pb2.UnregisterExtModeResponse(ok=error is None, error=error or "")

    def PromoteMode(self, request, context):
        self._require_registry_manager(context)
        error, final = self._registry_change(context, self.engine.modes.promote, request.mode,
                                             request.promoted_mode_name)
        if error is not None:
            return core_pb2.PromoteModeResponse(ok=False, error=error)
        return core_pb2.PromoteModeResponse(ok=True, mode=final)

    def _registry_change(self, context, change, *args):
        try:
            return change(*args)
        except StorageError as exc:
            log.error("could not persist a mode registry change: %s", exc)
            context.abort(grpc.StatusCode.INTERNAL, "storage failure: the mode registry was not changed")

    def WatchModeRegistry(self, request, context):
        """One change notice now, then one per successful register/unregister/promote (buffer 16)."""
        with self.stream_slots.hold(context):
            sub = self.engine.modes.changes.subscribe()
            yield from self._watch(context, sub, _changed, first=[_changed(now_ms())])

    def ListRoots(self, request, context):
        return core_pb2.ListRootsResponse(roots=[])

    def WatchRoots(self, request, context):
        """One change notice, then open without further messages until the client goes."""
        with self.stream_slots.hold(context):
            waiter = _Waiter()
            context.add_callback(waiter.shutdown)
            self.engine.register_stream(waiter)
            try:
                yield core_pb2.WatchRootsResponse(change=core_pb2.RootsChanged(observed_at_unix_ms=now_ms()))
                while not waiter.event.wait(WATCH_POLL_S):
                    if not context.is_active():
                        return
            finally:
                self.engine.unregister_stream(waiter)
