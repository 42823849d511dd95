"""RegisterPolicy admission of the current protocol line (../shared/spec/current.md §13.2–§13.3).

v0.4.0 type-checks rule objects and ignores unknown keys (runtime/policies.py `validation_error`);
the current line refuses with `INVALID_POLICY_DEFINITION: `-prefixed texts: rules that are not JSON,
schema versions outside 1..3, the reserved `policy.std.` namespace, closed rule objects (unknown
keys, `x-` extension keys this runtime does not register), JSON types, value domains. It also
pre-registers the three governance profiles of RFC-MACP-0012 §5.2.

Which rule schema applies is decided by the descriptor's `mode`: one standards-track mode's schema,
the union of all five for `*`, none for any other mode.
"""
from __future__ import annotations

import re
from typing import Any

from ..specs.hooks.governance import DECISION_SCHEMA as DECISION_V2
from ..specs.hooks.policy_rules import (
    DEFAULT_POLICY_ID,
    BoundPolicy,
    RuleTypeError,
    _check,
    _type_name,
    format_quorum_value,
    parse_group,
)

PREFIX = "INVALID_POLICY_DEFINITION: "
SUPPORTED = (1, 2, 3)
STD_PREFIX = "policy.std."

_COMMITMENT = {"authority": "str", "designated_roles": ["str"]}
# Closed rule shapes: key -> leaf type (as policy_rules._check understands it) or nested shape.
SHAPES: dict[str, dict] = {
    "macp.mode.decision.v1": {
        "voting": {"algorithm": "str", "threshold": "num", "quorum": {"type": "str", "value": "num"},
                   "weights": ("map", "num")},
        "objection_handling": {"critical_severity_vetoes": "bool", "veto_threshold": "u32",
                               "critical_objection_action": "str"},
        "evaluation": {"minimum_confidence": "num", "required_before_voting": "bool"},
        "commitment": {**_COMMITMENT, "require_vote_quorum": "bool", "allow_decline_over_approval": "bool"},
    },
    "macp.mode.quorum.v1": {
        "threshold": {"type": "str", "value": "num"},
        "abstention": {"counts_toward_quorum": "bool", "interpretation": "str"},
        "commitment": _COMMITMENT,
    },
    "macp.mode.proposal.v1": {
        "acceptance": {"criterion": "str"},
        "counter_proposal": {"max_rounds": "u64"},
        "rejection": {"terminal_on_any_reject": "bool"},
        "commitment": _COMMITMENT,
    },
    "macp.mode.task.v1": {
        "assignment": {"allow_reassignment_on_reject": "bool"},
        "completion": {"require_output": "bool"},
        "commitment": _COMMITMENT,
    },
    "macp.mode.handoff.v1": {
        "acceptance": {"implicit_accept_timeout_ms": "u64"},
        "commitment": _COMMITMENT,
    },
}


def _union(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _union(out[key], value)
        else:
            out.setdefault(key, value)
    return out


SHAPES["*"] = {}
for _shape in list(SHAPES.values()):
    SHAPES["*"] = _union(SHAPES["*"], _shape)

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


def _shape_error(shape: dict, value: Any, where: str, top: bool = False) -> str | None:
    if not isinstance(value, dict):
        return f"invalid type: {_type_name(value)}, expected a map at {where}"
    for key, item in value.items():
        path = f"{where}.{key}"
        if top and isinstance(key, str) and _ANNOTATION.match(key):
            continue
        if key not in shape:
            if top and isinstance(key, str) and _EXTENSION.match(key):
                if key not in RULE_EXTENSIONS:
                    return f"\x00rule extension '{key}' is not registered on this runtime"
                continue
            return f"unknown field `{key}` at {path}"
        kind = shape[key]
        if isinstance(kind, dict):
            problem = _shape_error(kind, item, path)
            if problem:
                return problem
        else:
            try:
                _check(kind, item, path)
            except RuleTypeError as exc:
                return str(exc)
    return None


def _domain_error(mode: str, rules: dict) -> str | None:
    """Row 10 of §13.2, in table order, for every schema the mode selects."""
    checks_decision = mode in (DECISION, "*")
    checks_quorum = mode in ("macp.mode.quorum.v1", "*")
    checks_proposal = mode in ("macp.mode.proposal.v1", "*")
    if checks_decision:
        d = parse_group(DECISION_V2, _only(rules, DECISION_V2))
        voting = d["voting"]
        algorithm, threshold = voting["algorithm"], voting["threshold"]
        if algorithm not in ("none", "majority", "supermajority", "unanimous", "weighted", "plurality"):
            return (f"voting.algorithm '{algorithm}' is not one of: none, majority, supermajority, unanimous, "
                    f"weighted, plurality")
        if not 0.0 < threshold <= 1.0:
            return f"voting.threshold {_num(threshold)} is out of range: must be greater than 0.0 and at most 1.0"
        bad = sorted(k for k, w in voting["weights"].items() if w <= 0)
        if bad:
            return (f"voting.weights has non-positive values for: {', '.join(repr(k) for k in bad)} \u2014 every "
                    f"weight must be > 0")
        q = voting["quorum"]
        if q["type"] not in ("count", "percentage"):
            return f"voting.quorum.type '{q['type']}' is not one of: count, percentage"
        if q["value"] < 0:
            return f"voting.quorum.value {_num(q['value'])} is out of range: must be >= 0"
        supplied = "weights" in rules.get("voting", {})
        if algorithm == "weighted" and not voting["weights"]:
            return "voting.algorithm 'weighted' requires non-empty voting.weights"
        if supplied and not voting["weights"]:
            return "voting.weights must be non-empty when supplied"
        if algorithm == "supermajority" and not threshold > 0.5:
            return "voting.algorithm 'supermajority' requires voting.threshold > 0.5"
        if algorithm == "majority" and threshold < 0.5:
            return "voting.algorithm 'majority' requires voting.threshold >= 0.5"
        oh = d["objection_handling"]
        if oh["veto_threshold"] < 1:
            return f"objection_handling.veto_threshold {oh['veto_threshold']} is out of range: must be >= 1"
        if oh["critical_objection_action"] not in ("deny", "finalize_decline", "hold"):
            return (f"objection_handling.critical_objection_action '{oh['critical_objection_action']}' is not one "
                    f"of: deny, finalize_decline, hold")
        minimum = d["evaluation"]["minimum_confidence"]
        if not 0.0 <= minimum <= 1.0:
            return (f"evaluation.minimum_confidence {_num(minimum)} is out of range: must be between 0.0 and 1.0")
    if checks_quorum:
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
        interpretation = rules.get("abstention", {}).get("interpretation", "neutral")
        if interpretation not in ("neutral", "implicit_reject", "ignored"):
            return f"abstention.interpretation '{interpretation}' is not one of: neutral, implicit_reject, ignored"
    if checks_proposal:
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


def _canonical_decision(rules: dict) -> dict:
    return parse_group(DECISION_V2, _only(rules, DECISION_V2))


def admission_error(policy_id: str, mode: str, rules_text: str, schema_version: int,
                    parse_json, *, registering: bool = True) -> tuple[str | None, dict | None]:
    """(error text or None, the parsed rules). Checks 1–10 of §13.2; the duplicate check (11) is the
    registry's. `parse_json` is the registry's JSON reader (raises ValueError on invalid JSON).
    `registering=False` (a WhatIfReplay candidate, never registered, current.md §15.2 step 6) skips
    the checks of reserved ids (3, 7, 8)."""
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
        if mode == DECISION and schema_version == 1:
            try:
                same = _canonical_decision(rules) == _canonical_decision(canonical) and \
                    set(rules) <= set(DECISION_V2)
            except RuleTypeError:
                same = False
        if not same:
            return (f"{PREFIX}policy_id '{policy_id}' is reserved by RFC-MACP-0012 §2.2; a registration under it "
                    f"must be the canonical §5.2 definition verbatim"), None
    shape = SHAPES.get(mode)
    if shape is not None:
        problem = _shape_error(shape, rules, "rules", top=True)
        if problem:
            if problem.startswith("\x00"):
                return PREFIX + problem[1:], None
            return f"{PREFIX}rules do not match schema for mode '{mode}': {problem}", None
        problem = _domain_error(mode, rules)
        if problem:
            return PREFIX + problem, None
    return None, rules


# --- MACP_POLICIES_DIR (current.md §11.3, §16.2) ---------------------------------------------------

READ_ONLY = "policy registry is read-only: policies are file-loaded via MACP_POLICIES_DIR"
_MEMBERS = ("policy_id", "mode", "description", "rules", "schema_version")


def _file_descriptor(path: str) -> tuple:
    """(policy_id, mode, description, rules_text, schema_version) of one policy file; ValueError."""
    import json

    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    if not isinstance(doc, dict):
        raise ValueError("a policy file holds one JSON object")
    missing = [m for m in _MEMBERS if m not in doc]
    if missing:
        raise ValueError(f"missing member(s): {', '.join(missing)}")
    if not isinstance(doc["rules"], dict):
        raise ValueError("rules must be a JSON object")
    for m in ("policy_id", "mode", "description"):
        if not isinstance(doc[m], str):
            raise ValueError(f"{m} must be a string")
    if isinstance(doc["schema_version"], bool) or not isinstance(doc["schema_version"], int) \
            or doc["schema_version"] < 0:
        raise ValueError("schema_version must be a non-negative integer")
    return doc["policy_id"], doc["mode"], doc["description"], json.dumps(doc["rules"]), doc["schema_version"]


def load_dir(registry, directory: str) -> list[tuple[str, str | None, str]]:
    """Register every `*.json` of `directory` (file-name order) through `registry.register`.
    Returns [(file name, policy_id or None, "" or the problem)], stopping at the first problem."""
    import glob
    import os

    if not os.path.isdir(directory):
        raise OSError(f"MACP_POLICIES_DIR {directory!r} is not a readable directory")
    out = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        name = os.path.basename(path)
        try:
            policy_id, mode, description, rules, version = _file_descriptor(path)
        except (OSError, ValueError) as exc:
            out.append((name, None, f"invalid policy file {path}: {exc}"))
            return out
        error = registry.register(policy_id, mode, description, rules, version)
        if error is not None:
            out.append((name, policy_id, f"policy file {path} rejected: {error}"))
            return out
        out.append((name, policy_id, ""))
    return out


def dry_run(directory: str, profile) -> int:
    """MACP_POLICIES_DRY_RUN=1: validate every file against a scratch registry, one line per file."""
    import glob
    import os

    from .policies import PolicyRegistry

    registry = PolicyRegistry(profile=profile)
    ok = True
    try:
        paths = sorted(glob.glob(os.path.join(directory, "*.json"))) if os.path.isdir(directory) else None
    except OSError:
        paths = None
    if paths is None:
        print(f"REJECTED {directory}: not a readable directory")
        return 1
    for path in paths:
        name = os.path.basename(path)
        try:
            policy_id, mode, description, rules, version = _file_descriptor(path)
        except (OSError, ValueError) as exc:
            print(f"REJECTED {name}: {exc}")
            ok = False
            continue
        error = registry.register(policy_id, mode, description, rules, version)
        if error is None:
            print(f"OK {name} {policy_id}")
        else:
            print(f"REJECTED {name}: {error}")
            ok = False
    return 0 if ok else 1
