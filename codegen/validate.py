"""Every mistake of a spec file at once: structure from the JSON Schema, then cross-references.

1. Structure: `spec-schema.json` (the published schema of the YAML format, the one editors use) checks
   keys, types and shapes. Each problem becomes a `SpecError` with the line of the key and the key
   path as the user wrote it (`transitions[1].to`), unknown keys with the allowed ones and the
   nearest ("did you mean 'to'?").
2. Cross-references: phases, message types, roles and hooks named anywhere exist (with the known
   ones and a suggestion); each hook is usable where it is used (guard, effect, ready, role, ...);
   its parameters are the declared ones, none missing, each of its declared type, and parameters that
   name a message type, phase or role name one the spec declares.

`compile_spec` runs both before building anything and raises `SpecErrors` with all of them;
`macp-runtime check` prints them all.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
from typing import Any, Callable, Iterable

from ..specs.hooks.contract import PARAM_TYPES, USES, check_value, signature_of
from .errors import SpecError
from .loader import LineDict

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spec-schema.json")
BUILTIN_ROLES = ("initiator", "participant", "anyone")
MAX_LISTED = 16


class SpecErrors(SpecError):
    """Several problems in one spec file; behaves as the first one, `errors` holds them all."""

    def __init__(self, errors: list[SpecError]):
        first = errors[0]
        super().__init__(first.file, first.path, first.message, first.line)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(Exception.__str__(e) for e in self.errors)


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return json.load(fh)


@functools.lru_cache(maxsize=1)
def _validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def suggest(word: Any, known: Iterable[str], what: str = "known") -> str:
    """' (known: a, b, c; did you mean 'b'?)' — the alternatives and the nearest one."""
    known = sorted(set(str(k) for k in known))
    parts = []
    if known and len(known) <= MAX_LISTED:
        parts.append(f"{what}: {', '.join(known)}")
    elif known:
        parts.append(f"{len(known)} {what}")
    if isinstance(word, str):
        close = difflib.get_close_matches(word, known, n=1, cutoff=0.6)
        if close:
            parts.append(f"did you mean {close[0]!r}?")
    return f" ({'; '.join(parts)})" if parts else ""


def path_text(parts: Iterable) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def line_of(spec: Any, parts: list) -> int | None:
    """The line of the deepest key on `parts` (a list item's own line when it is a mapping)."""
    node, line = spec, getattr(spec, "line", None)
    for p in parts:
        if isinstance(node, LineDict) and p in node:
            line = node.lines.get(p, line)
            node = node[p]
        elif isinstance(node, list) and isinstance(p, int) and 0 <= p < len(node):
            node = node[p]
            if isinstance(node, LineDict) and node.line:
                line = node.line
        else:
            break
    return line


# --- 1. structure ----------------------------------------------------------------------------------

_TYPE_WORDS = {"string": "a string", "array": "a list", "object": "a mapping", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "empty"}


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
               (dict, "object"))   # bool first: a bool is an int too


def _json_type(value) -> str:
    return next((name for kind, name in _JSON_TYPES if isinstance(value, kind)), "null")


def _branch_types(schemas: list, root: dict) -> list[str]:
    out = []
    for s in schemas:
        s = _deref(s, root)
        t = s.get("type")
        if isinstance(t, list):
            out.extend(t)
        elif t:
            out.append(t)
        elif "oneOf" in s:
            out.extend(_branch_types(s["oneOf"], root))
    return list(dict.fromkeys(out))


def _deref(s: dict, root: dict) -> dict:
    while isinstance(s, dict) and "$ref" in s:
        s = root["$defs"][s["$ref"].rsplit("/", 1)[1]]
    return s


def _structural(error, root: dict) -> list[tuple[list, str, Any]]:
    """(path parts, message, offending key or None) for one jsonschema error, descending into oneOf."""
    path = list(error.absolute_path)
    v = error.validator
    inst = error.instance
    if v in ("oneOf", "anyOf"):
        branches = error.validator_value
        kind = _json_type(inst)
        matching = [i for i, b in enumerate(branches)
                    if kind in _branch_types([b], root) or (kind == "integer" and "number" in _branch_types([b], root))]
        if len(matching) == 1 and error.context:
            subs = [e for e in error.context if e.schema_path and e.schema_path[0] == matching[0]]
            if subs:
                out = []
                for e in subs:
                    out.extend(_structural(e, root))
                return out
        if len(matching) > 1 and error.context and kind == "object":
            # several mapping forms (payloads): judge by the keys the user wrote
            for i in matching:
                b = _deref(branches[i], root)
                if any(k in inst for k in b.get("required", [])):
                    subs = [e for e in error.context if e.schema_path and e.schema_path[0] == i]
                    out = []
                    for e in subs:
                        out.extend(_structural(e, root))
                    if out:
                        return out
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in _branch_types(branches, root))
        return [(path, f"must be {words}" if words else "has the wrong shape", None)]
    if v == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        out = []
        for key in inst:
            if key not in error.schema.get("properties", {}):
                if allowed:
                    out.append((path + [key], f"unknown key {key!r}{suggest(key, allowed, 'allowed')}", key))
                else:
                    out.append((path + [key], f"unknown key {key!r}", key))
        return out
    if v == "required":
        missing = [k for k in error.validator_value if k not in inst]
        return [(path, f"missing required key {k!r}", None) for k in missing]
    if v == "type":
        types: list[str] = (error.validator_value if isinstance(error.validator_value, list)
                            else [error.validator_value])
        return [(path, f"must be {' or '.join(_TYPE_WORDS.get(t, t) for t in types)}", None)]
    if v == "enum" and path and path[-1] == "reject":
        return [(path, f"unknown rejection {inst!r}{suggest(inst, error.validator_value)}", None)]
    if v == "enum":
        return [(path, f"{inst!r} is not allowed{suggest(inst, [str(x) for x in error.validator_value], 'allowed')}", None)]
    if v == "const":
        return [(path, f"must be {error.validator_value!r}", None)]
    if v == "minItems":
        return [(path, "must not be empty", None)]
    if v == "minLength":
        return [(path, "must not be empty", None)]
    if v == "uniqueItems":
        return [(path, "entries must be unique", None)]
    if v == "pattern":
        return [(path, f"{inst!r} is not a hook name (letters, digits, _ and dots)", None)]
    return [(path, error.message, None)]


def structural_errors(spec: dict, file: str) -> list[SpecError]:
    root = schema()
    out: list[SpecError] = []
    seen = set()
    for error in sorted(_validator().iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        for parts, message, _key in _structural(error, root):
            text = path_text(parts)
            if (text, message) in seen:
                continue
            seen.add((text, message))
            out.append(SpecError(file, text, message, line_of(spec, parts)))
    return out


# --- 2. cross-references ---------------------------------------------------------------------------

class _Refs:
    """What the spec declares, for checking the names it uses."""

    def __init__(self, spec: dict):
        desc = spec.get("descriptor") if isinstance(spec.get("descriptor"), dict) else {}
        mt = desc.get("message_types")
        self.message_types = [m for m in mt if isinstance(m, str)] if isinstance(mt, list) else []
        phases = spec.get("phases") if isinstance(spec.get("phases"), dict) else {}
        names = phases.get("names")
        self.phases = [p for p in names if isinstance(p, str)] if isinstance(names, list) else []
        roles = spec.get("roles") if isinstance(spec.get("roles"), dict) else {}
        self.roles = list(BUILTIN_ROLES) + [r for r in roles if r not in BUILTIN_ROLES]
        payloads = spec.get("payloads") if isinstance(spec.get("payloads"), dict) else {}
        self.payloads = set(payloads)
        # message type -> the field names its JSON payload describes (only payloads that describe some)
        self.json_fields: dict[str, list[str]] = {}
        for msg, ref in payloads.items():
            if isinstance(ref, dict) and ref.get("type") == "json" and isinstance(ref.get("fields"), dict) and ref["fields"]:
                self.json_fields[msg] = [str(f) for f in ref["fields"]]


def _names(value) -> list:
    if isinstance(value, str):
        return [value]
    return value if isinstance(value, list) else []


class _Checker:
    def __init__(self, spec: dict, file: str, find_hook: Callable[[str], tuple[Any, str | None]] | None):
        self.spec, self.file, self.find_hook = spec, file, find_hook
        self.refs = _Refs(spec)
        self.errors: list[SpecError] = []

    def err(self, parts: list, message: str) -> None:
        self.errors.append(SpecError(self.file, path_text(parts), message, line_of(self.spec, parts)))

    def phase(self, parts: list, name) -> None:
        if isinstance(name, str) and self.refs.phases and name not in self.refs.phases:
            self.err(parts, f"unknown phase {name!r}{suggest(name, self.refs.phases)}")

    def message(self, parts: list, name) -> bool:
        if isinstance(name, str) and self.refs.message_types and name not in self.refs.message_types:
            self.err(parts, f"message type {name!r} is not in descriptor.message_types"
                            f"{suggest(name, self.refs.message_types)}")
            return False
        return True

    def role(self, parts: list, name) -> None:
        if isinstance(name, str) and name not in self.refs.roles:
            self.err(parts, f"unknown role {name!r}{suggest(name, self.refs.roles)}")

    def field(self, parts: list, name, msg) -> None:
        """A payload field named by a hook: one the message's JSON payload describes, when it describes any."""
        known = self.refs.json_fields.get(msg) if isinstance(msg, str) else None
        if known is None or not isinstance(name, str):
            return
        top = name.split(".")[0]
        if top not in known:
            self.err(parts, f"payload field {top!r} is not among the fields payloads.{msg} describes"
                            f"{suggest(top, known)}")

    def hook(self, parts: list, ref, use: str, msg=None) -> None:
        """One hook reference used as `use` (on message type `msg`, when it judges one): exists, usable
        there, parameters complete and typed, names declared."""
        if self.find_hook is None:
            return
        name = ref.get("hook") if isinstance(ref, dict) else ref
        if not isinstance(name, str) or not name:
            return   # the schema reported it
        fn, problem = self.find_hook(name)
        where = parts + ["hook"] if isinstance(ref, dict) else parts
        if fn is None:
            self.err(where, problem or f"hook {name!r} does not exist")
            return
        sig = signature_of(fn)
        if use not in sig.uses:
            usable = ", ".join(sig.uses)
            self.err(where, f"hook {name!r} cannot be used as {use} ({USES[use][0]}); it is usable as: {usable}")
            return
        given = {k: v for k, v in ref.items() if k != "hook"} if isinstance(ref, dict) else {}
        declared = sig.params
        missing = [p for p, d in declared.items() if d.required and p not in given]
        for key, value in given.items():
            if key not in declared:
                close = difflib.get_close_matches(str(key), missing, n=1, cutoff=0.6)
                if close:   # a misspelt required parameter: one error, not two
                    missing.remove(close[0])
                self.err(parts + [key], f"hook {name!r} has no parameter {key!r}"
                                        f"{suggest(key, declared, 'parameters') if declared else ' (it takes none)'}")
                continue
            kind = declared[key].type
            wrong = check_value(kind, value)
            if wrong:
                self.err(parts + [key], f"parameter {key!r} of {name!r} must be {wrong}, not {value!r}")
            elif kind == "message":
                self.message(parts + [key], value)
            elif kind == "phase":
                self.phase(parts + [key], value)
            elif kind == "role":
                self.role(parts + [key], value)
            elif kind == "field":
                self.field(parts + [key], value, msg)
            elif kind == "fields":
                for v in value:
                    self.field(parts + [key], v, msg)
            elif kind == "message_field":
                self.field(parts + [key], value, given.get("message"))
        for p in missing:
            self.err(where if isinstance(ref, dict) else parts,
                     f"hook {name!r} needs parameter {p!r} ({PARAM_TYPES[declared[p].type]}); write "
                     f"{{hook: {name}, {', '.join(f'{m}: ...' for m in missing)}}}")

    def hooks(self, parts: list, value, use: str) -> None:
        if isinstance(value, list):
            for i, ref in enumerate(value):
                self.hook(parts + [i], ref, use)
        elif value is not None:
            self.hook(parts, value, use)

    def transition(self, parts: list, node, kind: str, senders_by_message: dict, phases_by_message: dict) -> None:
        if not isinstance(node, dict):
            return
        msg = node.get("message")
        if kind != "unlisted" and isinstance(msg, str):
            if msg == "SessionStart":
                self.err(parts + ["message"], "SessionStart is handled by the engine, not by transitions")
            elif self.message(parts + ["message"], msg) and self.refs.message_types and msg not in self.refs.payloads:
                self.err(parts + ["message"], f"message type {msg!r} has no payload binding in payloads")
        for i, p in enumerate(_names(node.get("from"))):
            self.phase(parts + ["from"], p)
            if isinstance(msg, str) and isinstance(p, str) and kind != "unlisted":
                seen = phases_by_message.setdefault(msg, {})
                if p in seen:
                    self.err(parts + ["from"], f"phase {p!r} already has a transition on {msg!r} ({seen[p]})")
                else:
                    seen[p] = path_text(parts)
        to = node.get("to")
        if isinstance(to, str):
            self.phase(parts + ["to"], to)
        elif isinstance(to, list):
            for i, b in enumerate(to):
                if not isinstance(b, dict):
                    continue
                self.phase(parts + ["to", i, "phase"], b.get("phase"))
                last = i == len(to) - 1
                if "when" in b:
                    if last:
                        self.err(parts + ["to", i, "when"],
                                 "the last branch must not have 'when' (some phase must always follow)")
                    self.hook(parts + ["to", i, "when"], b["when"], "when", msg)
                elif not last:
                    self.err(parts + ["to", i], "only the last branch may omit 'when'")
        senders = node.get("senders")
        for i, r in enumerate(_names(senders)):
            self.role(parts + ["senders"], r)
        if kind != "unlisted" and isinstance(msg, str) and senders is not None:
            names = tuple(_names(senders))
            if msg in senders_by_message and senders_by_message[msg] != names:
                self.err(parts + ["senders"], f"all transitions on {msg!r} must name the same senders "
                                              "(authorisation runs before the phase is known)")
            senders_by_message.setdefault(msg, names)
        guards = node.get("guards")
        if isinstance(guards, list):
            for i, g in enumerate(guards):
                if isinstance(g, dict) and "check" in g:
                    self.hook(parts + ["guards", i, "check"], g["check"], "guard", msg)
        self.hooks(parts + ["effects"], node.get("effects"), "effect")
        if kind == "commitment":
            for key in ("ready", "policy", "resolution"):
                if key in node:
                    self.hook(parts + [key], node[key], key, msg)

    def run(self) -> list[SpecError]:
        spec, refs = self.spec, self.refs
        desc = spec.get("descriptor")
        if isinstance(desc, dict) and isinstance(desc.get("terminal_message_types"), list):
            for i, t in enumerate(desc["terminal_message_types"]):
                if isinstance(t, str) and refs.message_types and t not in refs.message_types:
                    self.err(["descriptor", "terminal_message_types", i],
                             f"terminal message type {t!r} must also appear in message_types"
                             f"{suggest(t, refs.message_types)}")
        phases = spec.get("phases")
        initial = phases.get("initial") if isinstance(phases, dict) else None
        if isinstance(initial, str) and refs.phases and initial not in refs.phases:
            self.err(["phases", "initial"],
                     f"initial phase {initial!r} is not in phases.names{suggest(initial, refs.phases)}")
        roles = spec.get("roles")
        if isinstance(roles, dict):
            for role, ref in roles.items():
                if role in BUILTIN_ROLES:
                    self.err(["roles", role], f"{role!r} is a built-in role and cannot be redefined")
                else:
                    self.hook(["roles", role], ref, "role")
        payloads = spec.get("payloads")
        if isinstance(payloads, dict):
            for msg, ref in payloads.items():
                if isinstance(ref, dict) and "decode" in ref:
                    self.hook(["payloads", msg, "decode"], ref["decode"], "decode")
        start = spec.get("session_start")
        if isinstance(start, dict):
            self.hooks(["session_start", "requires"], start.get("requires"), "start")
        state = spec.get("state")
        if isinstance(state, dict) and "initial" in state:
            self.hook(["state", "initial"], state["initial"], "state")
        senders: dict = {}
        by_phase: dict = {}
        unlisted = spec.get("unlisted_messages")
        if isinstance(unlisted, dict):
            for i, r in enumerate(_names(unlisted.get("senders"))):
                self.role(["unlisted_messages", "senders"], r)
            if "accept" in unlisted:
                if "senders" not in unlisted:
                    self.err(["unlisted_messages", "accept"], "accepting unlisted messages needs unlisted_messages.senders")
                self.transition(["unlisted_messages", "accept"], unlisted["accept"], "unlisted", senders, by_phase)
        transitions = spec.get("transitions")
        if isinstance(transitions, list):
            for i, node in enumerate(transitions):
                self.transition(["transitions", i], node, "transition", senders, by_phase)
        self.transition(["commitment"], spec.get("commitment"), "commitment", senders, by_phase)
        return self.errors


def validate_spec(spec: dict, file: str, find_hook=None) -> list[SpecError]:
    """All structural and cross-reference problems of one loaded spec, in file order."""
    errors = structural_errors(spec, file) + _Checker(spec, file, find_hook).run()
    return sorted(errors, key=lambda e: (e.line or 0))

