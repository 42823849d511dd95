"""The hook contract: where a hook may be used, which parameters it takes, how it reads in prose.

A hook declares itself with `@hook(...)`:

    @hook("guard", "when", "ready", field="field", op="op", value="scalar",
          text="payload field `{field}` {op} {value}")
    def field_compare(ctx, field, op, value): ...

* uses: the spec keys that may name it (USES below);
* parameters: name -> type (PARAM_TYPES below); a parameter is required unless the function gives it
  a default;
* text: a one-line description with `{param}` placeholders, filled in for docs and for the reason a
  client gets when the hook refuses (e.g. "at least 2 different senders have sent Bid").

Hooks without the decorator (most of the built-in modes' hooks, user hooks) get a signature inferred
from their Python signature: `(ctx, ...)` -> guard/effect/when/ready/policy/resolution, `(session)`
-> start/state, `(session, sender, ...)` -> role, `(raw)` -> decode; extra parameters take their type
from the annotation; the text is the docstring's first line.

`codegen` checks every use against this (`macp-runtime check`, the compiler) and `macp-runtime hooks`
prints the catalogue.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Callable

# use -> (spec key, what the hook receives and returns)
USES: dict[str, tuple[str, str]] = {
    "guard": ("transitions[].guards[].check", "(ctx) -> bool; False refuses with the guard's reject/why"),
    "effect": ("transitions[].effects[]", "(ctx) -> None; updates ctx.state after the message is durable"),
    "when": ("transitions[].to[].when", "(ctx) -> bool; picks the next phase, sees the state after the effects"),
    "ready": ("commitment.ready", "(ctx) -> bool; False refuses the Commitment as not ready"),
    "policy": ("commitment.policy", "(ctx) -> list[str]; deny reasons, [] allows"),
    "resolution": ("commitment.resolution", "(ctx) -> bytes; the session's resolution"),
    "role": ("roles.<name>", "(session, sender) -> bool"),
    "start": ("session_start.requires[]", "(session) -> bool; False refuses the SessionStart"),
    "state": ("state.initial", "(session) -> dict; the initial mode state"),
    "decode": ("payloads.<type>.decode", "(raw: bytes) -> object; raises Reject(InvalidPayload)"),
}
CTX_USES = ("guard", "effect", "when", "ready", "policy", "resolution")
CONDITION_USES = ("guard", "when", "ready")

# Comparison operators of the generic hooks -> the one they mean. Quote the symbols in YAML
# (`op: ">"`: a bare `>` starts a folded block) or use the word forms (`op: gt`).
OPERATORS = {
    ">": ">", ">=": "≥", "≥": "≥", "<": "<", "<=": "≤", "≤": "≤",
    "=": "=", "==": "=", "!=": "≠", "≠": "≠",
    "gt": ">", "ge": "≥", "lt": "<", "le": "≤", "eq": "=", "ne": "≠",
}

# type name -> description (for messages and the catalogue)
PARAM_TYPES: dict[str, str] = {
    "message": "a message type the spec declares in descriptor.message_types",
    "phase": "a phase of the spec",
    "role": "a role: initiator, participant, anyone or one of the spec's roles",
    "field": "a field of the message's payload (dots reach into nested objects: `bid.amount`)",
    "message_field": "a field of the payloads of the message type named by the hook's `message` parameter",
    "fields": "a list of payload field names",
    "str": "a string",
    "int": "an integer",
    "count": "a non-negative integer",
    "number": "a number",
    "bool": "true or false",
    "scalar": "a string, number or boolean",
    "list": "a list of strings, numbers or booleans",
    "regex": "a regular expression (Python syntax, matched against the whole value)",
    "op": "a comparison: " + ", ".join(dict.fromkeys(OPERATORS)),
}


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: str
    required: bool
    default: Any = None


@dataclasses.dataclass(frozen=True)
class Signature:
    uses: tuple[str, ...]
    params: dict[str, Param]
    text: str
    declared: bool          # True when the hook carries @hook, False when inferred


def hook(*uses: str, text: str | None = None, **param_types: str):
    """Declare where a hook may be used and the types of its parameters (see the module doc)."""
    for use in uses:
        if use not in USES:
            raise ValueError(f"unknown hook use {use!r}")
    for name, kind in param_types.items():
        if kind not in PARAM_TYPES:
            raise ValueError(f"unknown parameter type {kind!r} for {name!r}")

    def wrap(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        names = list(sig.parameters)[1 if uses and uses[0] != "role" else 2:]
        params = {}
        for n in names:
            p = sig.parameters[n]
            if n not in param_types:
                raise ValueError(f"{fn.__name__}: parameter {n!r} has no declared type")
            required = p.default is inspect.Parameter.empty
            params[n] = Param(n, param_types[n], required, None if required else p.default)
        extra = set(param_types) - set(params)
        if extra:
            raise ValueError(f"{fn.__name__}: declared parameters {sorted(extra)} are not in its signature")
        fn.__macp_hook__ = Signature(tuple(uses), params, text or _first_line(fn.__doc__), True)
        return fn

    return wrap


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n\n")[0].replace("\n", " ").strip()


_ANNOTATIONS = {"int": "int", "str": "str", "float": "number", "bool": "bool", "list": "list",
                int: "int", str: "str", float: "number", bool: "bool", list: "list"}


def signature_of(fn: Callable) -> Signature:
    """The declared signature, or one inferred from the Python signature."""
    declared = getattr(fn, "__macp_hook__", None)
    if declared is not None:
        return declared
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return Signature(tuple(USES), {}, _first_line(getattr(fn, "__doc__", "")), False)
    names = list(sig.parameters)
    first = names[0] if names else ""
    if first == "ctx":
        uses, rest = CTX_USES, names[1:]
    elif first == "session" and len(names) > 1 and names[1] == "sender":
        uses, rest = ("role",), names[2:]
    elif first == "session":
        uses, rest = ("start", "state"), names[1:]
    elif first == "raw":
        uses, rest = ("decode",), names[1:]
    else:
        uses, rest = tuple(USES), names[1:]
    params = {}
    for n in rest:
        p = sig.parameters[n]
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation
        if isinstance(ann, str):
            ann = ann.split("[")[0].strip()
        kind = _ANNOTATIONS.get(ann, "scalar" if ann is inspect.Parameter.empty else "scalar")
        required = p.default is inspect.Parameter.empty
        params[n] = Param(n, kind, required, None if required else p.default)
    return Signature(uses, params, _first_line(fn.__doc__), False)


class _Missing(dict):
    def __missing__(self, key):
        return f"`{key}`"


def describe(fn: Callable, params: dict | None = None) -> str:
    """The hook's text with its parameters filled in ("at least 2 different senders have sent Bid")."""
    sig = signature_of(fn)
    values = _Missing({k: _show(v) for k, v in (params or {}).items()})
    for name, p in sig.params.items():
        if name not in values and not p.required:
            values[name] = _show(p.default)
    try:
        return sig.text.format_map(values)
    except (ValueError, IndexError, AttributeError):
        return sig.text


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and value in OPERATORS:
        return OPERATORS[value]
    return str(value)


def check_value(kind: str, value: Any) -> str | None:
    """None when `value` fits the parameter type `kind`, else what it should be."""
    ok = True
    if kind in ("message", "phase", "role", "field", "message_field", "str"):
        ok = isinstance(value, str) and value != ""
    elif kind == "fields":
        ok = isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)
    elif kind in ("int", "count"):
        ok = isinstance(value, int) and not isinstance(value, bool) and (kind == "int" or value >= 0)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "scalar":
        ok = isinstance(value, (str, int, float, bool))
    elif kind == "list":
        ok = isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) for v in value)
    elif kind == "regex":
        if not isinstance(value, str):
            ok = False
        else:
            try:
                re.compile(value)
            except re.error as exc:
                return f"a valid regular expression ({exc})"
    elif kind == "op":
        ok = isinstance(value, str) and value in OPERATORS
    return None if ok else PARAM_TYPES[kind]
