"""Governance policy rules (RFC-MACP-0012 as v0.4.0 implements it): typed parsing with defaults.

A rule schema is a nested dict of group -> key -> (type, default). Parsing checks JSON types only
(enum values and ranges are not validated); a missing key takes its default, `null` or a wrong type
is an error. Modes re-parse the whole rule object for their own schema and fall back to all
defaults when that fails.
"""
from __future__ import annotations

import json
from typing import Any

U32_MAX = 2**32 - 1
U64_MAX = 2**64 - 1


class RuleTypeError(ValueError):
    pass


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, (int, float)):
        return f"number `{value}`" if isinstance(value, int) else f"floating point `{value}`"
    if isinstance(value, str):
        return f'string "{value}"'
    if isinstance(value, list):
        return "sequence"
    return "map"


def check_kind(kind: Any, value: Any, where: str) -> Any:
    """`value` checked against a rule type (str, bool, num, u32, u64, [type], ("map", type) or a nested
    schema); num values come back as floats. Raises RuleTypeError."""
    if kind == "str":
        if not isinstance(value, str):
            raise RuleTypeError(f"invalid type: {_type_name(value)}, expected a string at {where}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise RuleTypeError(f"invalid type: {_type_name(value)}, expected a boolean at {where}")
        return value
    if kind == "num":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RuleTypeError(f"invalid type: {_type_name(value)}, expected f64 at {where}")
        return float(value)
    if kind in ("u32", "u64"):
        limit = U32_MAX if kind == "u32" else U64_MAX
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > limit:
            raise RuleTypeError(f"invalid type: {_type_name(value)}, expected {kind} at {where}")
        return value
    if isinstance(kind, list):
        if not isinstance(value, list):
            raise RuleTypeError(f"invalid type: {_type_name(value)}, expected a sequence at {where}")
        return [check_kind(kind[0], item, where) for item in value]
    if isinstance(kind, tuple) and kind[0] == "map":
        if not isinstance(value, dict):
            raise RuleTypeError(f"invalid type: {_type_name(value)}, expected a map at {where}")
        return {k: check_kind(kind[1], v, where) for k, v in value.items()}
    if isinstance(kind, dict):
        return parse_group(kind, value, where)
    raise AssertionError(kind)


def parse_group(schema: dict, value: Any, where: str = "rules") -> dict:
    """Parse `value` against `schema` ({key: (type, default)} or {key: nested schema})."""
    if not isinstance(value, dict):
        raise RuleTypeError(f"invalid type: {_type_name(value)}, expected a map at {where}")
    out = {}
    for key, spec in schema.items():
        path = f"{where}.{key}"
        if isinstance(spec, dict):
            out[key] = parse_group(spec, value[key], path) if key in value else parse_group(spec, {}, path)
        else:
            kind, default = spec
            out[key] = check_kind(kind, value[key], path) if key in value else default
    return out


COMMITMENT_SCHEMA: dict[str, Any] = {
    "authority": ("str", "initiator_only"),
    "designated_roles": (["str"], []),
    "require_vote_quorum": ("bool", False),
}

DECISION_SCHEMA: dict[str, Any] = {
    "voting": {
        "algorithm": ("str", "none"),
        "threshold": ("num", 0.5),
        "quorum": {"type": ("str", "count"), "value": ("num", 0.0)},
        "weights": (("map", "num"), {}),
    },
    "objection_handling": {
        "critical_severity_vetoes": ("bool", False),
        "veto_threshold": ("u32", 1),
    },
    "evaluation": {
        "required_before_voting": ("bool", False),
        "minimum_confidence": ("num", 0.0),
    },
    "commitment": COMMITMENT_SCHEMA,
}


PROPOSAL_SCHEMA: dict[str, Any] = {
    "acceptance": {"criterion": ("str", "all_parties")},
    "counter_proposal": {"max_rounds": ("u64", 0)},
    "rejection": {"terminal_on_any_reject": ("bool", False)},
    "commitment": COMMITMENT_SCHEMA,
}

TASK_SCHEMA: dict[str, Any] = {
    "assignment": {"allow_reassignment_on_reject": ("bool", False)},
    "completion": {"require_output": ("bool", False)},
    "commitment": COMMITMENT_SCHEMA,
}

HANDOFF_SCHEMA: dict[str, Any] = {
    "acceptance": {"implicit_accept_timeout_ms": ("u64", 0)},
    "commitment": COMMITMENT_SCHEMA,
}

# JSON key is `type` (a `threshold_type` key is unknown and ignored).
QUORUM_SCHEMA: dict[str, Any] = {
    "threshold": {"type": ("str", "n_of_m"), "value": ("num", 0.0)},
    "abstention": {"counts_toward_quorum": ("bool", False), "interpretation": ("str", "neutral")},
    "commitment": COMMITMENT_SCHEMA,
}


class BoundPolicy:
    """A policy copied onto a session at SessionStart; immutable for the session's life.

    Parsed rule groups are cached per schema, so each session pays for parsing at most once per
    mode-specific read rather than on every message.
    """

    __slots__ = ("policy_id", "mode", "description", "rules", "schema_version", "_parsed", "_json")

    def __init__(self, policy_id: str, mode: str, description: str, rules: dict, schema_version: int):
        self.policy_id = policy_id
        self.mode = mode
        self.description = description
        self.rules = rules
        self.schema_version = schema_version
        self._parsed: dict[int | tuple[str, int], dict] = {}   # by id(schema); ("strict", id) in governance
        self._json: str | None = None

    def parsed(self, schema: dict) -> dict:
        """The whole rule object parsed for `schema`, or all defaults when it does not parse."""
        key = id(schema)
        cached = self._parsed.get(key)
        if cached is None:
            try:
                cached = parse_group(schema, self.rules)
            except RuleTypeError:
                cached = parse_group(schema, {})
            self._parsed[key] = cached
        return cached

    def to_json(self) -> str:
        """The binding as recorded in the SessionStart log entry (computed once per policy)."""
        if self._json is None:
            self._json = self._dump()
        return self._json

    def _dump(self) -> str:
        return json.dumps({"policy_id": self.policy_id, "mode": self.mode, "description": self.description,
                           "rules": self.rules, "schema_version": self.schema_version},
                          separators=(",", ":"), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BoundPolicy":
        d = json.loads(text)
        return cls(d["policy_id"], d["mode"], d["description"], d["rules"], int(d["schema_version"]))

    def commitment(self) -> dict:
        """The `commitment` group alone (the authority lookup parses nothing else)."""
        key = id(COMMITMENT_SCHEMA)
        cached = self._parsed.get(key)
        if cached is None:
            try:
                cached = parse_group(COMMITMENT_SCHEMA, self.rules.get("commitment", {}), "rules.commitment")
            except RuleTypeError:
                cached = parse_group(COMMITMENT_SCHEMA, {})
            self._parsed[key] = cached
        return cached


def commitment_authority_allows(policy: BoundPolicy | None, initiator: str, participants, sender: str) -> bool:
    """§1.2: who may commit (and, for the session RPCs, cancel/suspend/resume)."""
    if policy is None:
        return sender == initiator
    rule = policy.commitment()
    authority = rule["authority"]
    if authority == "any_participant":
        return sender == initiator or sender in participants
    if authority == "designated_role":
        return sender in rule["designated_roles"]
    return sender == initiator


DEFAULT_POLICY_ID = "policy.default"
DEFAULT_POLICY_DESCRIPTION = (
    "Default policy \u2014 mode built-in rules apply with no additional governance constraints"
)
DEFAULT_POLICY_RULES = {
    "commitment": {"authority": "initiator_only", "designated_roles": [], "require_vote_quorum": False},
    "evaluation": {"minimum_confidence": 0.0, "required_before_voting": False},
    "objection_handling": {"critical_severity_vetoes": False, "veto_threshold": 1},
    "voting": {"algorithm": "none", "quorum": {"type": "count", "value": 0}},
}


def default_policy() -> BoundPolicy:
    return BoundPolicy(DEFAULT_POLICY_ID, "*", DEFAULT_POLICY_DESCRIPTION, DEFAULT_POLICY_RULES, 1)


def unsupported_schema_reasons(policy: BoundPolicy | None) -> list[str]:
    """Every commitment evaluator first refuses schema versions other than 1."""
    if policy is not None and policy.schema_version != 1:
        return [f"unsupported policy schema version: {policy.schema_version} (supported: 1)"]
    return []


def format_quorum_value(value: float) -> str:
    """Shortest round-trip digits, positional, no trailing `.0` (60 -> 60, 0.5 -> 0.5)."""
    from decimal import Decimal

    text = format(Decimal(repr(float(value))), "f")
    if text.endswith(".0"):
        text = text[:-2]
    return text


def quorum_met(kind: str, value: float, voters: int, participants: int) -> bool:
    if kind == "percentage":
        if participants == 0:
            return value <= 0
        return voters / participants * 100 >= value
    return voters >= value


def evaluation_shortfall(rule: dict, evaluations) -> tuple[str, str] | None:
    """The Decision `evaluation` group unmet by the session's evaluations (REVIEW ones are
    informational): (the reason, its deny code), or None."""
    if not rule["required_before_voting"]:
        return None
    qualifying = [e for e in evaluations if e["recommendation"] != "REVIEW"]
    minimum = rule["minimum_confidence"]
    if minimum > 0:
        if not any(e["confidence"] >= minimum for e in qualifying):
            return (f"no qualifying evaluation meets minimum confidence threshold: {minimum:.2f}",
                    "confidence_below_minimum")
    elif not qualifying:
        return ("evaluations required before voting but none provided (REVIEW evaluations are informational only)",
                "evaluation_required")
    return None


def rules_for(policy: BoundPolicy | None, schema: dict) -> dict:
    """A mode's view of the bound policy: its rule object parsed for `schema` (defaults without a policy)."""
    if policy is None:
        return parse_group(schema, {})
    return policy.parsed(schema)
