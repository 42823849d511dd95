"""RegisterPolicy admission of the current protocol line (../shared/spec/current.md §13.2–§13.3).

v0.4.0 type-checks rule objects and ignores unknown keys (runtime/policies.py `validation_error`);
the current line refuses with `INVALID_POLICY_DEFINITION: `-prefixed texts: rules that are not JSON,
schema versions outside 1..3, the reserved `policy.std.` namespace, closed rule objects (unknown
keys, `x-` extension keys this runtime does not register), JSON types, value domains. It also
pre-registers the three governance profiles of RFC-MACP-0012 §5.2.

Which rule schema applies is the policy registry's answer for the descriptor's `mode`: the schema the
mode's spec declares (`policy_rules`), the union of the standards-track modes' schemas for `*`, none for
a mode without one. The schema is closed at every level; the value domains below are those of the rule
groups the built-in modes define (`voting`, `objection_handling`, `evaluation`, `threshold`,
`abstention`, `acceptance.criterion`, `commitment`), checked wherever a schema has such a group.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

from ..specs.hooks.policy_rules import (
    DEFAULT_POLICY_ID,
    BoundPolicy,
    RuleTypeError,
    _type_name,
    check_kind,
    format_quorum_value,
    parse_group,
)

PREFIX = "INVALID_POLICY_DEFINITION: "
SUPPORTED = (1, 2, 3)
STD_PREFIX = "policy.std."


def _union(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _union(out[key], value)
        else:
            out.setdefault(key, value)
    return out


def union_schema(schemas: Iterable[dict]) -> dict:
    """The schema of a `*` policy: a key is known where any of `schemas` defines it (the first one's
    type and default win)."""
    out: dict = {}
    for schema in schemas:
        out = _union(out, schema)
    return out


_ANNOTATION = re.compile(r"[_$]")
_EXTENSION = re.compile(r"x-[a-z0-9]+(\.[a-z0-9-]+)+\Z")
RULE_EXTENSIONS: frozenset = frozenset()   # registered rule extensions (Initialize rule_extensions): none

# RFC-MACP-0012 §5.2: the three reserved governance profiles (Decision, schema_version 1).
STD_PROFILES = {
    "policy.std.majority": ("Simple majority \u2014 at least half of the decisive votes approve", {
        "commitment": {"require_vote_quorum": True},
        "voting": {"algorithm": "majority", "quorum": {"type": "count", "value": 1}, "threshold": 0.5}}),
    "policy.std.supermajority": ("Two-thirds supermajority with a minimum of two voters", {
        "commitment": {"require_vote_quorum": True},
        "voting": {"algorithm": "supermajority", "quorum": {"type": "count", "value": 2},
                   "threshold": 0.6666666666666666}}),
    "policy.std.unanimous": ("Unanimous \u2014 every declared participant approves and no reject is cast", {
        "commitment": {"require_vote_quorum": True},
        "voting": {"algorithm": "unanimous", "quorum": {"type": "count", "value": 1}}}),
}
DECISION = "macp.mode.decision.v1"


def std_profiles() -> list[BoundPolicy]:
    return [BoundPolicy(pid, DECISION, desc, rules, 1) for pid, (desc, rules) in STD_PROFILES.items()]


def _num(x) -> str:
    return format_quorum_value(x) if isinstance(x, float) else str(x)


def _shape_error(schema: dict, value: Any, where: str, top: bool = False) -> str | None:
    """The first key of `value` the schema does not know, or of the wrong JSON type; None."""
    if not isinstance(value, dict):
        return f"invalid type: {_type_name(value)}, expected a map at {where}"
    for key, item in value.items():
        path = f"{where}.{key}"
        if top and isinstance(key, str) and _ANNOTATION.match(key):
            continue
        if key not in schema:
            if top and isinstance(key, str) and _EXTENSION.match(key):
                if key not in RULE_EXTENSIONS:
                    return f"\x00rule extension '{key}' is not registered on this runtime"
                continue
            return f"unknown field `{key}` at {path}"
        kind = schema[key]
        if isinstance(kind, dict):
            problem = _shape_error(kind, item, path)
            if problem:
                return problem
        else:
            try:
                check_kind(kind[0], item, path)
            except RuleTypeError as exc:
                return str(exc)
    return None


def _domain_error(schema: dict, rules: dict) -> str | None:
    """Row 10 of §13.2, in table order, for every rule group of `schema` that has value domains."""
    if isinstance(schema.get("voting"), dict):
        voting = parse_group(schema["voting"], rules.get("voting", {}), "rules.voting")
        algorithm, threshold = voting.get("algorithm", "none"), voting.get("threshold", 0.5)
        weights = voting.get("weights", {})
        if algorithm not in ("none", "majority", "supermajority", "unanimous", "weighted", "plurality"):
            return (f"voting.algorithm '{algorithm}' is not one of: none, majority, supermajority, unanimous, "
                    f"weighted, plurality")
        if not 0.0 < threshold <= 1.0:
            return f"voting.threshold {_num(threshold)} is out of range: must be greater than 0.0 and at most 1.0"
        bad = sorted(k for k, w in weights.items() if w <= 0)
        if bad:
            return (f"voting.weights has non-positive values for: {', '.join(repr(k) for k in bad)} \u2014 every "
                    f"weight must be > 0")
        q = voting.get("quorum", {"type": "count", "value": 0.0})
        if q["type"] not in ("count", "percentage"):
            return f"voting.quorum.type '{q['type']}' is not one of: count, percentage"
        if q["value"] < 0:
            return f"voting.quorum.value {_num(q['value'])} is out of range: must be >= 0"
        supplied = "weights" in rules.get("voting", {})
        if algorithm == "weighted" and not weights:
            return "voting.algorithm 'weighted' requires non-empty voting.weights"
        if supplied and not weights:
            return "voting.weights must be non-empty when supplied"
        if algorithm == "supermajority" and not threshold > 0.5:
            return "voting.algorithm 'supermajority' requires voting.threshold > 0.5"
        if algorithm == "majority" and threshold < 0.5:
            return "voting.algorithm 'majority' requires voting.threshold >= 0.5"
    if isinstance(schema.get("objection_handling"), dict):
        oh = parse_group(schema["objection_handling"], rules.get("objection_handling", {}),
                         "rules.objection_handling")
        if oh.get("veto_threshold", 1) < 1:
            return f"objection_handling.veto_threshold {oh['veto_threshold']} is out of range: must be >= 1"
        action = oh.get("critical_objection_action", "deny")
        if action not in ("deny", "finalize_decline", "hold"):
            return (f"objection_handling.critical_objection_action '{action}' is not one "
                    f"of: deny, finalize_decline, hold")
    if isinstance(schema.get("evaluation"), dict):
        minimum = parse_group(schema["evaluation"], rules.get("evaluation", {}),
                              "rules.evaluation").get("minimum_confidence", 0.0)
        if not 0.0 <= minimum <= 1.0:
            return (f"evaluation.minimum_confidence {_num(minimum)} is out of range: must be between 0.0 and 1.0")
    if isinstance(schema.get("threshold"), dict):
        t = rules.get("threshold", {})
        kind = t.get("type", "n_of_m")
        if kind not in ("n_of_m", "percentage"):
            return f"threshold.type '{kind}' is not one of: n_of_m, percentage"
        if "value" in t:
            value = t["value"]
            if value != int(value):
                return f"threshold.value {_num(value)} must be an integer"
            if kind == "percentage" and value > 100:
                return (f"threshold.value {_num(value)} is out of range: must be <= 100 when threshold.type is "
                        f"'percentage'")
            if value <= 0:
                return (f"threshold.value {_num(value)} is out of range: must be greater than 0 "
                        f"(RFC-MACP-0011 §5 rule 2)")
    if isinstance(schema.get("abstention"), dict):
        interpretation = rules.get("abstention", {}).get("interpretation", "neutral")
        if interpretation not in ("neutral", "implicit_reject", "ignored"):
            return f"abstention.interpretation '{interpretation}' is not one of: neutral, implicit_reject, ignored"
    if "criterion" in (schema.get("acceptance") or {}):
        criterion = rules.get("acceptance", {}).get("criterion", "all_parties")
        if criterion not in ("all_parties", "counterparty", "initiator"):
            return f"acceptance.criterion '{criterion}' is not one of: all_parties, counterparty, initiator"
    commitment = rules.get("commitment", {})
    authority = commitment.get("authority", "initiator_only")
    if authority not in ("initiator_only", "any_participant", "designated_role"):
        return f"commitment.authority '{authority}' is not one of: initiator_only, any_participant, designated_role"
    if authority == "designated_role" and not commitment.get("designated_roles"):
        return "commitment.authority 'designated_role' requires non-empty commitment.designated_roles"
    return None


def _only(rules: dict, schema: dict) -> dict:
    """The part of `rules` a schema knows (a `*` policy also carries other modes' groups)."""
    return {k: v for k, v in rules.items() if k in schema}


def _canonical(rules: dict, schema: dict) -> dict:
    return parse_group(schema, _only(rules, schema))


def admission_error(policy_id: str, mode: str, rules_text: str, schema_version: int, parse_json,
                    schema: dict | None, decision_schema: dict | None, *,
                    registering: bool = True) -> tuple[str | None, dict | None]:
    """(error text or None, the parsed rules). Checks 1–10 of §13.2; the duplicate check (11) is the
    registry's. `parse_json` is the registry's JSON reader (raises ValueError on invalid JSON);
    `schema` the rule schema of `mode` (None: any object); `decision_schema` the Decision mode's, which
    the reserved governance profiles are compared under. `registering=False` (a WhatIfReplay candidate,
    never registered, current.md §15.2 step 6) skips the checks of reserved ids (3, 7, 8)."""
    rules: Any = {}
    if rules_text != "":
        try:
            rules = parse_json(rules_text)
        except ValueError as exc:
            return f"{PREFIX}rules is not valid JSON: {exc}", None
    if not policy_id.strip():
        return f"{PREFIX}policy_id must not be empty", None
    if registering and policy_id == DEFAULT_POLICY_ID:
        return f"{PREFIX}cannot register with reserved policy_id '{DEFAULT_POLICY_ID}'", None
    if schema_version == 0:
        return f"{PREFIX}schema_version must be > 0", None
    if schema_version not in SUPPORTED:
        return f"{PREFIX}unsupported schema_version {schema_version} (supported: 1, 2, 3)", None
    if not isinstance(rules, dict):
        return f"{PREFIX}rules must be a JSON object", None
    if registering and policy_id.startswith(STD_PREFIX):
        if policy_id not in STD_PROFILES:
            return (f"{PREFIX}policy_id '{policy_id}' is in the reserved 'policy.std.' namespace but is not a "
                    f"governance profile assigned by RFC-MACP-0012 §5.2"), None
        canonical = STD_PROFILES[policy_id][1]
        same = False
        if mode == DECISION and schema_version == 1 and decision_schema is not None:
            try:
                same = _canonical(rules, decision_schema) == _canonical(canonical, decision_schema) and \
                    set(rules) <= set(decision_schema)
            except RuleTypeError:
                same = False
        if not same:
            return (f"{PREFIX}policy_id '{policy_id}' is reserved by RFC-MACP-0012 §2.2; a registration under it "
                    f"must be the canonical §5.2 definition verbatim"), None
    if schema is not None:
        problem = _shape_error(schema, rules, "rules", top=True)
        if problem:
            if problem.startswith("\x00"):
                return PREFIX + problem[1:], None
            return f"{PREFIX}rules do not match schema for mode '{mode}': {problem}", None
        problem = _domain_error(schema, rules)
        if problem:
            return PREFIX + problem, None
    return None, rules
