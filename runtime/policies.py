"""The policy registry and binding a policy to a session at SessionStart (§10.5)."""
from __future__ import annotations

import threading

from .errors import Kind, MacpError
from .specs.hooks.policy_rules import DEFAULT_POLICY_ID, BoundPolicy, default_policy


class PolicyRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._policies: dict[str, BoundPolicy] = {DEFAULT_POLICY_ID: default_policy()}

    def get(self, policy_id: str) -> BoundPolicy | None:
        return self._policies.get(policy_id)

    def bind(self, policy_version: str, mode: str) -> tuple[BoundPolicy, str]:
        """The policy a new session of `mode` binds to, and the effective policy id it records."""
        effective = policy_version or DEFAULT_POLICY_ID
        policy = self._policies.get(effective)
        if policy is None:
            raise MacpError(Kind.UnknownPolicyVersion, detail=f"policy {effective!r} is not registered")
        if policy.mode != "*" and policy.mode != mode:
            raise MacpError(Kind.InvalidPolicyDefinition,
                            detail=f"policy {effective!r} is for mode {policy.mode!r}, not {mode!r}")
        return policy, effective
