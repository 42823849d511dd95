"""The governance policy registry (modes.md §10): registration, lookup, listing, watching, binding.

* `register` validates in the exact order and with the exact texts of modes.md §10.3; rule objects
  are type-checked with the rule schema the target mode's spec declares (`policy_rules`, compiled by
  codegen/rule_schema.py): the registry's modes are asked, so a mode registered or loaded from a spec
  directory brings its own schema. The current line admits with policy_admission.py.
* `rules` text that is not valid JSON is silently replaced by `{}` (§10.1). "Valid" means what the
  reference's JSON parser accepts: no NaN/Infinity, no numbers out of the f64 range, no lone
  surrogates; integers beyond the 64-bit range become floats, `-0` becomes the float `-0.0`.
* Output (`rules_text`) is canonical JSON: compact, object keys sorted by code point at every level,
  non-ASCII unescaped, integers as integers, floats in shortest round-trip digits (§10.1).
* `policy.default` is built in: never registered, never removed, never stored.
* Registered policies are durable: every change is written to the "policies" document (atomic
  replace + fsync) before `register`/`unregister` return, and loaded back at construction.
* Watchers get the full sorted list after each change through a `Broadcaster` (capacity 16).
"""
from __future__ import annotations

import builtins
import functools
import json
import math
import threading
from decimal import Decimal
from typing import Any, NamedTuple

from ..codegen import load_modes
from ..specs.hooks.common import is_blank
from ..specs.hooks.policy_rules import (
    COMMITMENT_SCHEMA,
    DEFAULT_POLICY_ID,
    BoundPolicy,
    RuleTypeError,
    default_policy,
    parse_group,
)
from ..storage.base import StorageError
from ..vocabulary.broadcast import Broadcaster, Subscription
from ..vocabulary.errors import Kind, MacpError
from .documents import shared_change
from .policy_admission import admission_error, std_profiles, union_schema

DOCUMENT = "policies"
DOCUMENT_FORMAT = 1
WATCH_CAPACITY = 16
MAX_JSON_DEPTH = 127   # nesting beyond this is refused by the parser (treated like invalid JSON)

# v0.4.0 checks a `*` policy as a policy of this mode (§10.3 step 5); the current line takes the union of
# the standards-track modes' schemas (policy_admission.py). The reserved governance profiles are Decision
# policies on both lines.
DECISION_MODE = "macp.mode.decision.v1"

_I64_MIN = -(2**63)
_U64_MAX = 2**64 - 1


MAX_POLICY_ID = 256        # characters of a policy id (and of the mode it names)
MAX_DESCRIPTION = 4096     # characters of a policy description
MAX_RULES_BYTES = 65536    # the rules JSON

class PolicyView(NamedTuple):
    """What Get/List/Watch return for one policy (registered_at is always 0 on the wire)."""

    policy_id: str
    mode: str
    description: str
    rules: str           # canonical JSON text
    schema_version: int


# --- JSON in -----------------------------------------------------------------------------------

class _InvalidJson(ValueError):
    pass


def _parse_int(text: str):
    value = int(text)
    if value == 0 and text.startswith("-"):
        return -0.0
    if value > _U64_MAX or value < _I64_MIN:
        return _parse_float(text)
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _InvalidJson("number out of range")
    return value


def _reject_constant(name: str):
    raise _InvalidJson(f"{name} is not JSON")


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _check_value(value: Any, depth: int) -> None:
    if isinstance(value, str):
        if _has_surrogate(value):
            raise _InvalidJson("unpaired surrogate")
    elif isinstance(value, (dict, list)):
        if depth >= MAX_JSON_DEPTH:
            raise _InvalidJson("nested too deeply")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            if isinstance(key, str) and _has_surrogate(key):
                raise _InvalidJson("unpaired surrogate")
            _check_value(item, depth + 1)


def parse_json(text: str) -> Any:
    """A JSON value as the reference's parser reads it; raises ValueError when it is not JSON."""
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_reject_constant)
    except RecursionError:
        raise _InvalidJson("nested too deeply") from None
    _check_value(value, 0)
    return value


def parse_rules_text(text: str) -> Any:
    """§10.1: empty → {}; text that is not valid JSON → {} (silently); otherwise the parsed value."""
    if text == "":
        return {}
    try:
        return parse_json(text)
    except ValueError:
        return {}


# --- JSON out ----------------------------------------------------------------------------------

def format_float(x: float) -> str:
    """Shortest round-trip digits; positional (with `.0` when integral) for 1e-5 ≤ |x| < 1e16, else
    `<digits>e<exp>` without `+` or zero padding (0.7, 60.0, 1e-7, 1e16, 1.5e20)."""
    if x == 0:
        return "-0.0" if math.copysign(1.0, x) < 0 else "0.0"
    magnitude = abs(x)
    if 1e-5 <= magnitude < 1e16:
        text = format(Decimal(repr(x)), "f")
        return text if "." in text else text + ".0"
    sign, digit_tuple, exponent = Decimal(repr(x)).as_tuple()
    if not isinstance(exponent, int):   # "n", "N", "F": NaN or infinity, which JSON (and a policy) cannot hold
        raise ValueError(f"not a finite number: {x!r}")
    digits = "".join(map(str, digit_tuple))
    sci_exponent = exponent + len(digits) - 1          # the exponent of the first digit
    digits = digits.rstrip("0") or "0"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return ("-" if sign else "") + f"{mantissa}e{sci_exponent}"


def canonical_json(value: Any) -> str:
    """Compact JSON, keys sorted by code point at every level, non-ASCII kept, floats per §10.1."""
    parts: list[str] = []
    _emit(value, parts)
    return "".join(parts)


def _emit(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, float):
        out.append(format_float(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _emit(value[key], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _emit(item, out)
        out.append("]")
    else:
        raise TypeError(f"not a JSON value: {type(value).__name__}")


# --- validation (§10.3) ------------------------------------------------------------------------

def validation_error(policy_id: str, mode: str, rules: Any, schema_version: int, schema: dict | None) -> str | None:
    """The §10.3 error text for steps 1–8 (the duplicate check is the registry's), or None. `schema` is
    the rule schema of `mode` (None: the rules are not type-checked)."""
    if is_blank(policy_id):
        return "policy_id must not be empty"
    if policy_id == DEFAULT_POLICY_ID:
        return f"cannot register with reserved policy_id '{DEFAULT_POLICY_ID}'"
    if schema_version == 0:
        return "schema_version must be > 0"
    if not isinstance(rules, dict):
        return "rules must be a JSON object"
    parsed: dict = {}
    if schema is not None:
        try:
            parsed = parse_group(schema, rules)
        except RuleTypeError as exc:
            return f"rules do not match schema for mode '{mode}': {exc}"
    voting = parsed.get("voting")
    if isinstance(voting, dict):   # the Decision voting group's constraints, wherever a schema has it
        if voting.get("algorithm") == "weighted" and not voting.get("weights"):
            return "voting.algorithm 'weighted' requires non-empty voting.weights"
        if voting.get("algorithm") == "supermajority" and not voting.get("threshold", 0.5) > 0.5:
            return "voting.algorithm 'supermajority' requires voting.threshold > 0.5"
    try:
        commitment = parse_group(COMMITMENT_SCHEMA, rules["commitment"], "rules.commitment") \
            if "commitment" in rules else None
    except RuleTypeError:
        commitment = None   # only a group that parses is checked (extension modes are not typed)
    if commitment is not None and commitment["authority"] == "designated_role" \
            and not commitment["designated_roles"]:
        return "commitment.authority 'designated_role' requires non-empty commitment.designated_roles"
    return None


# --- the registry ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _spec_file_modes(spec_dirs: tuple[str, ...]) -> dict:
    return {m.name: m for m in load_modes(list(spec_dirs))}


class _SpecFileModes:
    """The modes of the spec files of a profile, for a registry built without a mode registry."""

    def __init__(self, profile):
        self._modes = _spec_file_modes(tuple(profile.spec_dirs()) if profile is not None else ())
        self.names = sorted(self._modes)

    def get(self, name: str):
        return self._modes.get(name)


class PolicyRegistry:
    """Policies by id. `documents` (from `storage.open_documents`) makes registrations durable;
    without it (in-process tests) the registry lives in memory only. `modes` (the mode registry:
    `get(name)` and `names`) answers which rule schema a mode's policies follow; without it, the
    profile's spec files do."""

    def __init__(self, documents=None, profile=None, modes=None):
        self._lock = threading.Lock()
        self._documents = documents
        self._modes = modes if modes is not None else _SpecFileModes(profile)
        # The current line (runtime/profile.py) admits with runtime/policy_admission.py and lists the
        # three RFC-MACP-0012 §5.2 governance profiles beside policy.default; v0.4.0 as documented above.
        self._current = profile is not None and profile.semantics_rev >= 4
        self.read_only = False   # MACP_POLICIES_DIR: Register/UnregisterPolicy refused (REGISTRY_READ_ONLY)
        self._builtin: dict[str, BoundPolicy] = {DEFAULT_POLICY_ID: default_policy()}
        if self._current:
            self._builtin.update((p.policy_id, p) for p in std_profiles())
        self._policies: dict[str, BoundPolicy] = dict(self._builtin)
        self._texts: dict[str, tuple[BoundPolicy, str]] = {}   # canonical rules text, per policy object
        self.changes = Broadcaster(WATCH_CAPACITY)
        if documents is not None:
            self._load()

    # -- persistence ------------------------------------------------------------------------------

    def _load(self) -> None:
        doc = self._documents.load(DOCUMENT)
        if doc is None:
            return
        try:
            if doc.get("format") != DOCUMENT_FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            for entry in doc["policies"]:
                policy_id = entry["policy_id"]
                if policy_id in self._builtin:
                    continue
                rules = parse_json(entry["rules"])
                if not isinstance(rules, dict):
                    raise ValueError(f"policy {policy_id!r}: rules are not an object")
                self._policies[policy_id] = BoundPolicy(policy_id, str(entry["mode"]), str(entry["description"]),
                                                        rules, int(entry["schema_version"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise StorageError(f"the stored policy registry is damaged: {exc}") from None

    def _shared_change(self):
        def reload() -> None:
            self._policies = dict(self._builtin)
            self._load()

        return shared_change(self._documents, DOCUMENT, reload)

    def reload(self) -> None:
        """Another instance changed the shared registry: read it again and tell the watchers."""
        with self._lock:
            previous = self._policies
            before = self.list()
            self._policies = dict(self._builtin)
            try:
                self._load()
            except Exception:
                self._policies = previous
                raise
            self._texts.clear()
            after = self.list()
            if after != before:
                self.changes.publish(after)

    def _save(self, policies: dict[str, BoundPolicy]) -> None:
        if self._documents is None:
            return
        entries = [{"policy_id": p.policy_id, "mode": p.mode, "description": p.description,
                    "rules": self._rules_text(p), "schema_version": p.schema_version}
                   for pid, p in sorted(policies.items()) if pid not in self._builtin]
        self._documents.save(DOCUMENT, {"format": DOCUMENT_FORMAT, "policies": entries})

    @property
    def durable(self) -> bool:
        return bool(self._documents is not None and getattr(self._documents, "durable", False))

    # -- reads ------------------------------------------------------------------------------------

    def get(self, policy_id: str) -> BoundPolicy | None:
        return self._policies.get(policy_id)

    def _rules_text(self, policy: BoundPolicy) -> str:
        cached = self._texts.get(policy.policy_id)
        if cached is not None and cached[0] is policy:
            return cached[1]
        text = canonical_json(policy.rules)
        self._texts[policy.policy_id] = (policy, text)
        return text

    def view(self, policy: BoundPolicy) -> PolicyView:
        return PolicyView(policy.policy_id, policy.mode, policy.description, self._rules_text(policy),
                          policy.schema_version)

    def describe(self, policy_id: str) -> PolicyView | None:
        policy = self._policies.get(policy_id)
        return None if policy is None else self.view(policy)

    def list(self, mode: str = "") -> list[PolicyView]:
        """Every policy (an empty filter), or those whose mode equals `mode` or is `*`; by id."""
        policies = list(self._policies.values())
        return [self.view(p) for p in sorted(policies, key=lambda p: p.policy_id)
                if not mode or p.mode == mode or p.mode == "*"]

    def watch(self, notify=None) -> tuple[builtins.list[PolicyView], Subscription]:   # `list` is a method here
        """The current list and a subscription to every later list, taken atomically."""
        with self._lock:
            return self.list(), self.changes.subscribe(notify)

    # -- changes ----------------------------------------------------------------------------------

    def register(self, policy_id: str, mode: str, description: str, rules_text: str,
                 schema_version: int) -> str | None:
        """Register a policy. Returns the §10.3 error text, or None when it was registered (and is
        durable). Raises StorageError when it could not be saved (then nothing changed)."""
        if len(policy_id) > MAX_POLICY_ID or len(mode) > MAX_POLICY_ID:
            return f"policy_id and mode must be at most {MAX_POLICY_ID} characters"
        if len(description) > MAX_DESCRIPTION or len(rules_text) > MAX_RULES_BYTES:
            return (f"description must be at most {MAX_DESCRIPTION} characters and rules at most "
                    f"{MAX_RULES_BYTES} bytes")
        if self._current:
            error, rules = self.admit(policy_id, mode, rules_text, schema_version)
        else:
            rules = parse_rules_text(rules_text)
            error = validation_error(policy_id, mode, rules, schema_version, self.rule_schema(mode))
        if error is not None:
            return error
        policy = BoundPolicy(policy_id, mode, description, rules, schema_version)
        with self._lock, self._shared_change():
            if policy_id in self._policies:
                return f"policy '{policy_id}' is already registered"
            updated = dict(self._policies)
            updated[policy_id] = policy
            self._save(updated)
            self._policies = updated
            self.changes.publish(self.list())
        return None

    def rule_schema(self, mode: str) -> dict | None:
        """The rule schema a policy for `mode` is checked against: the one the mode's spec declares; for
        `*` the Decision mode's (v0.4.0) or the union of every standards-track mode's (current)."""
        if mode == "*":
            if not self._current:
                return self.rule_schema(DECISION_MODE)
            modes = [self._modes.get(name) for name in self._modes.names]
            return union_schema(m.policy_schema for m in modes
                                if m is not None and m.standards_track and m.policy_schema is not None)
        compiled = self._modes.get(mode)
        return compiled.policy_schema if compiled is not None else None

    def admit(self, policy_id: str, mode: str, rules_text: str, schema_version: int, *,
              registering: bool = True) -> tuple[str | None, dict | None]:
        """The current line's admission (policy_admission.py): (error text or None, the parsed rules).
        `registering=False`: a WhatIfReplay candidate, never registered (no reserved-id checks)."""
        return admission_error(policy_id, mode, rules_text, schema_version, parse_json, self.rule_schema(mode),
                               self.rule_schema(DECISION_MODE), registering=registering)

    def unregister(self, policy_id: str) -> str | None:
        """Remove a policy. Returns the §10.4 error text, or None. Sessions keep their bound copy."""
        if policy_id == DEFAULT_POLICY_ID:
            return "cannot unregister the built-in default policy"
        if policy_id in self._builtin:
            return f"cannot unregister the built-in reserved policy '{policy_id}' (RFC-MACP-0012 §2.2)"
        with self._lock, self._shared_change():
            if policy_id not in self._policies:
                return f"policy '{policy_id}' not found"
            updated = dict(self._policies)
            del updated[policy_id]
            self._save(updated)
            self._policies = updated
            self._texts.pop(policy_id, None)
            self.changes.publish(self.list())
        return None

    def close(self) -> None:
        """End every watch stream (shutdown)."""
        self.changes.close()

    # -- binding (§10.5) --------------------------------------------------------------------------

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
