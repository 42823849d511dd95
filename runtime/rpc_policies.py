"""The policy RPCs (runtime.md §8.9, modes.md §10.3–§10.4), mixed into `MacpService`.

The mixin expects of its host class: `self.engine.policies` (a PolicyRegistry),
`self._require_identity(context)` and `self._require_registry_manager(context)`.
"""
from __future__ import annotations

import logging

import grpc
from macp.v1 import policy_pb2

from .broadcast import CLOSED, LAGGED
from .session import now_ms
from .storage.base import StorageError

log = logging.getLogger("macp_runtime.policies")

WATCH_POLL_S = 1.0   # how often a quiet watch stream re-checks that its client is still there


def policy_descriptor(view) -> policy_pb2.PolicyDescriptor:
    """A registry PolicyView on the wire (`registered_at_unix_ms` is always 0)."""
    return policy_pb2.PolicyDescriptor(policy_id=view.policy_id, mode=view.mode, description=view.description,
                                       rules=view.rules, schema_version=view.schema_version)


class PolicyRpcs:
    def RegisterPolicy(self, request, context):
        self._require_registry_manager(context)
        if not request.HasField("policy_descriptor"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "descriptor required")
        d = request.policy_descriptor
        try:
            error = self.engine.policies.register(d.policy_id, d.mode, d.description, d.rules, d.schema_version)
        except StorageError as exc:
            log.error("could not persist policy %r: %s", d.policy_id, exc)
            context.abort(grpc.StatusCode.INTERNAL, "storage failure: the policy was not registered")
        if error is not None:
            return policy_pb2.RegisterPolicyResponse(ok=False, error=error)
        log.info("policy %r registered for mode %r", d.policy_id, d.mode)
        return policy_pb2.RegisterPolicyResponse(ok=True)

    def UnregisterPolicy(self, request, context):
        self._require_registry_manager(context)
        try:
            error = self.engine.policies.unregister(request.policy_id)
        except StorageError as exc:
            log.error("could not persist the removal of policy %r: %s", request.policy_id, exc)
            context.abort(grpc.StatusCode.INTERNAL, "storage failure: the policy was not unregistered")
        if error is not None:
            return policy_pb2.UnregisterPolicyResponse(ok=False, error=error)
        log.info("policy %r unregistered", request.policy_id)
        return policy_pb2.UnregisterPolicyResponse(ok=True)

    def GetPolicy(self, request, context):
        self._require_identity(context)
        view = self.engine.policies.describe(request.policy_id)
        if view is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Policy '{request.policy_id}' not found")
        return policy_pb2.GetPolicyResponse(policy_descriptor=policy_descriptor(view))

    def ListPolicies(self, request, context):
        self._require_identity(context)
        views = self.engine.policies.list(request.mode)
        return policy_pb2.ListPoliciesResponse(descriptors=[policy_descriptor(v) for v in views])

    def WatchPolicies(self, request, context):
        """The full sorted list now, then after every change; ends OK when the subscriber lags."""
        initial, sub = self.engine.policies.watch()
        context.add_callback(sub.cancel)   # a cancelled or finished call wakes the loop below
        try:
            yield policy_pb2.WatchPoliciesResponse(descriptors=[policy_descriptor(v) for v in initial],
                                                   observed_at_unix_ms=now_ms())
            while context.is_active():
                item = sub.get(WATCH_POLL_S)
                if item is None:
                    continue
                if item is LAGGED or item is CLOSED:
                    return
                yield policy_pb2.WatchPoliciesResponse(descriptors=[policy_descriptor(v) for v in item],
                                                       observed_at_unix_ms=now_ms())
        finally:
            sub.cancel()
