"""The governance rule schema a mode declares (`policy_rules`): the rule groups a policy bound to the
mode may set, with each key's type and default. The mode's hooks parse bound policies with it, and the
policy registry checks RegisterPolicy rules against it: the spec is the only place a mode's schema is
declared, so a mode written in YAML alone brings its own.

Two forms:

* `module.NAME`: a schema of a built-in hook module (`policy_rules.DECISION_SCHEMA`,
  `governance.QUORUM_SCHEMA`, ...);
* written out: `{group: {key: [type, default], nested: {...}}}`, a type being `str`, `bool`, `num`,
  `u32`, `u64`, `[type]` (a list of it) or `[map, type]` (a mapping of any name to it). A key may also
  stand at the top level. The default must have its key's type.

Either way the result is a schema of `specs/hooks/policy_rules.py`'s form: {key: (type, default)} and
{group: {...}}.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..specs.hooks.policy_rules import RuleTypeError, check_kind
from .hooks import HOOKS_PACKAGE
from .nodes import Ctx

KINDS = ("str", "bool", "num", "u32", "u64")
_KNOWN = "str, bool, num, u32, u64, [type] (a list) or [map, type] (a mapping of name to type)"


def rule_schema(ctx: Ctx, spec: dict) -> dict | None:
    """The schema `policy_rules` names or writes out, or None without one."""
    if "policy_rules" not in spec:
        return None
    ref = spec["policy_rules"]
    if isinstance(ref, dict):
        return _group(ctx, ref, "policy_rules", spec, "policy_rules")
    mod_name, _, attr = str(ref).rpartition(".")
    try:
        schema = getattr(importlib.import_module(f"{HOOKS_PACKAGE}.{mod_name}"), attr, None) if mod_name else None
    except ImportError:
        schema = None
    if not isinstance(schema, dict):
        raise ctx.fail(spec, "policy_rules", f"unknown rule schema {ref!r} (expected e.g. policy_rules.DECISION_SCHEMA, "
                                             f"or the groups written out: {{group: {{key: [type, default]}}}})",
                       "policy_rules")
    return schema


def _group(ctx: Ctx, node: Any, path: str, parent: Any, key: Any) -> dict:
    if not isinstance(node, dict) or not node:
        raise ctx.fail(parent, path, "a rule group is a non-empty mapping of key to [type, default] or to a "
                                     "nested group", key)
    out: dict = {}
    for name, entry in node.items():
        where = f"{path}.{name}"
        if not isinstance(name, str) or not name:
            raise ctx.fail(node, where, "rule keys are non-empty strings", name)
        if isinstance(entry, dict):
            out[name] = _group(ctx, entry, where, node, name)
        elif isinstance(entry, list) and len(entry) == 2:
            kind = _kind(ctx, entry[0], where, node, name)
            try:
                default = check_kind(kind, entry[1], f"{where} (its default)")
            except RuleTypeError as exc:
                raise ctx.fail(node, where, f"the default does not have the key's type: {exc}", name) from None
            out[name] = (kind, default)
        else:
            raise ctx.fail(node, where, "must be [type, default] or a nested group (a mapping)", name)
    return out


def _kind(ctx: Ctx, value: Any, path: str, node: Any, key: Any):
    if isinstance(value, str) and value in KINDS:
        return value
    if isinstance(value, list) and len(value) == 1:
        return [_kind(ctx, value[0], path, node, key)]
    if isinstance(value, list) and len(value) == 2 and value[0] == "map":
        return ("map", _kind(ctx, value[1], path, node, key))
    raise ctx.fail(node, path, f"unknown rule type {value!r} (known: {_KNOWN})", key)
