"""The governance rule schema a mode declares (`policy_rules`): the rule groups a policy bound to the
mode may set, with each key's type and default. The mode's hooks parse bound policies with it, and the
policy registry checks RegisterPolicy rules against it (the spec is the only place a mode's schema is
declared)."""
from __future__ import annotations

import importlib

from .hooks import HOOKS_PACKAGE
from .nodes import Ctx


def rule_schema(ctx: Ctx, spec: dict) -> dict | None:
    """The schema `policy_rules` names (`module.NAME` of a built-in hook module), or None without one."""
    if "policy_rules" not in spec:
        return None
    ref = spec["policy_rules"]
    mod_name, _, attr = str(ref).rpartition(".")
    try:
        schema = getattr(importlib.import_module(f"{HOOKS_PACKAGE}.{mod_name}"), attr, None)
    except ImportError:
        schema = None
    if not isinstance(schema, dict):
        raise ctx.fail(spec, "policy_rules", f"unknown rule schema {ref!r} (expected e.g. policy_rules.DECISION_SCHEMA)",
                       "policy_rules")
    return schema
