"""The policy RPCs (runtime.md §8.9, modes.md §10.3–§10.4)."""
from __future__ import annotations

import logging

import grpc
from macp.v1 import policy_pb2

from ..storage.base import StorageError
from ..vocabulary.session import now_ms
from .convert import policy_descriptor
from .loop import Doorbell
from .status import abort, on_lag
from .watch import watch

log = logging.getLogger("macp_runtime.policies")


def _listing(views) -> policy_pb2.WatchPoliciesResponse:
    return policy_pb2.WatchPoliciesResponse(descriptors=[policy_descriptor(v) for v in views],
                                            observed_at_unix_ms=now_ms())


class PolicyHandler:
    def __init__(self, t):
        self.t = t

    async def _refuse_if_read_only(self, context) -> None:
        """current.md §11.3: before authentication."""
        if self.t.engine.policies.read_only:
            from ..registries.policy_files import READ_ONLY
            await abort(context, self.t.engine.profile, grpc.StatusCode.FAILED_PRECONDITION, READ_ONLY,
                        "REGISTRY_READ_ONLY")

    async def RegisterPolicy(self, request, context):
        t = self.t
        await self._refuse_if_read_only(context)
        await t.admission.require_registry_manager(context)
        if not request.HasField("policy_descriptor"):
            await abort(context, self.t.engine.profile, grpc.StatusCode.INVALID_ARGUMENT, "descriptor required",
                        "INVALID_REQUEST")
        d = request.policy_descriptor
        try:
            error = await t.offload(t.engine.policies.register, d.policy_id, d.mode, d.description, d.rules,
                                    d.schema_version)
        except StorageError as exc:
            log.error("could not persist policy %r: %s", d.policy_id, exc)
            await context.abort(grpc.StatusCode.INTERNAL, "storage failure: the policy was not registered")
        if error is not None:
            return policy_pb2.RegisterPolicyResponse(ok=False, error=error)
        log.info("policy %r registered for mode %r", d.policy_id, d.mode)
        return policy_pb2.RegisterPolicyResponse(ok=True)

    async def UnregisterPolicy(self, request, context):
        t = self.t
        await self._refuse_if_read_only(context)
        await t.admission.require_registry_manager(context)
        try:
            error = await t.offload(t.engine.policies.unregister, request.policy_id)
        except StorageError as exc:
            log.error("could not persist the removal of policy %r: %s", request.policy_id, exc)
            await context.abort(grpc.StatusCode.INTERNAL, "storage failure: the policy was not unregistered")
        if error is not None:
            return policy_pb2.UnregisterPolicyResponse(ok=False, error=error)
        log.info("policy %r unregistered", request.policy_id)
        return policy_pb2.UnregisterPolicyResponse(ok=True)

    async def GetPolicy(self, request, context):
        await self.t.admission.require_identity(context)
        view = self.t.engine.policies.describe(request.policy_id)
        if view is None:
            await abort(context, self.t.engine.profile, grpc.StatusCode.NOT_FOUND,
                        f"Policy '{request.policy_id}' not found", "UNKNOWN_POLICY_VERSION")
        return policy_pb2.GetPolicyResponse(policy_descriptor=policy_descriptor(view))

    async def ListPolicies(self, request, context):
        await self.t.admission.require_identity(context)
        views = self.t.engine.policies.list(request.mode)
        return policy_pb2.ListPoliciesResponse(descriptors=[policy_descriptor(v) for v in views])

    async def WatchPolicies(self, request, context):
        """The full sorted list now, then after every change; ends OK when the subscriber lags."""
        t = self.t
        identity = await t.admission.require_identity(context)
        async with t.admission.streams.held(context, identity):
            bell = Doorbell(t.wakeups)
            initial, sub = t.engine.policies.watch(bell.ring)
            async for frame in watch(bell, sub, _listing, first=[_listing(initial)],
                                     lagged=on_lag(context, t.engine.profile, "WatchPolicies", "changes")):
                yield frame
