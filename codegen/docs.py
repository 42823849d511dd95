"""Mode documentation generated from the compiled specs: one Markdown page per mode and an index.

Everything on a page comes from the spec and the objects it names (protobuf descriptors for payload
fields, hook docstrings for checks, the rule schema for policy keys), so the pages cannot drift from
what the runtime enforces. Diagrams are Mermaid (rendered by common code hosts); with Graphviz's
`dot` on the PATH, `svg=True` also writes an SVG per mode.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess

import jinja2
from google.protobuf.descriptor import FieldDescriptor

from ..specs import SPECS_DIR
from .hooks import hook_text
from .model import CompiledMode
from .payloads import message_class

TEMPLATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates")

BUILTIN_ROLE_TEXT = {
    "initiator": "the sender of the accepted SessionStart",
    "participant": "a sender listed in SessionStartPayload.participants (exact match)",
    "anyone": "any authenticated sender",
}

# Errors the engine itself can return for any session message, before the mode is consulted.
ENGINE_ERRORS = [
    ("UNSUPPORTED_PROTOCOL_VERSION", "macp_version is not \"1.0\""),
    ("INVALID_ENVELOPE", "envelope shape (empty message_id/type, missing session_id or mode), envelope mode differs from the session's"),
    ("PAYLOAD_TOO_LARGE", "payload larger than MACP_MAX_PAYLOAD_BYTES"),
    ("UNAUTHENTICATED", "no valid credential, or envelope sender differs from the authenticated sender"),
    ("RATE_LIMITED", "the sender's sliding-window limit is reached"),
    ("SESSION_NOT_FOUND", "no such session"),
    ("SESSION_NOT_OPEN", "the session is resolved, expired, cancelled or suspended (message `TtlExpired` when this message found it past its deadline)"),
    ("MODE_NOT_SUPPORTED", "the session's mode was unregistered"),
    ("INTERNAL_ERROR", "the message could not be made durable (nothing changed; it may be retried)"),
]
START_ERRORS = [
    ("INVALID_SESSION_ID", "session id is not a lowercase UUID v4/v7 or base64url of 22+ characters"),
    ("MODE_NOT_SUPPORTED", "mode not registered"),
    ("INVALID_ENVELOPE", "payload empty or not a SessionStartPayload; TTL outside 1..86400000 ms; mode_version differs; strict-start field rules; the mode's start requirements"),
    ("SESSION_ALREADY_EXISTS", "the id is taken (the same message_id again is a duplicate, not an error)"),
    ("UNKNOWN_POLICY_VERSION", "policy_version names no registered policy"),
    ("INVALID_POLICY_DEFINITION", "the policy is bound to another mode"),
    ("RATE_LIMITED", "the sender's start limit or max_open_sessions is reached"),
]
REJECT_CODES = {
    "InvalidPayload": "INVALID_ENVELOPE",
    "InvalidModeState": "INVALID_ENVELOPE",
    "Forbidden": "FORBIDDEN",
    "PolicyDenied": "POLICY_DENIED",
    "SessionNotOpen": "SESSION_NOT_OPEN",
}

_TYPE_NAMES = {v: k[5:].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}


def _doc(fn) -> str:
    """What a hook checks, with its parameters filled in (its declared text, else its docstring)."""
    text = hook_text(fn) if fn is not None else ""
    if not text:
        text = (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")
    return text.rstrip(".")


REPO_ROOT = os.path.dirname(SPECS_DIR)


def spec_path(source: str) -> str:
    """Where the spec lives, as a reader finds it: relative to the repository when inside it."""
    full = os.path.abspath(source)
    for base in (REPO_ROOT, os.getcwd()):
        rel = os.path.relpath(full, base)
        if not rel.startswith(".."):
            return rel.replace(os.sep, "/")
    return full


PAYLOAD_TEXT = {
    "json": "A UTF-8 JSON object (any keys; the mode's checks say which ones matter).",
    "opaque": "Opaque bytes, not interpreted by the runtime.",
}


def _fields(type_name: str) -> list[dict]:
    if type_name.startswith("hook:") or type_name in PAYLOAD_TEXT:
        return []
    cls = message_class(type_name)
    out = []
    for f in cls.DESCRIPTOR.fields:
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            kind = f.message_type.full_name
            if f.message_type.GetOptions().map_entry:
                k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                kind = f"map<{_TYPE_NAMES[k.type]}, {_TYPE_NAMES[v.type]}>"
        elif f.type == FieldDescriptor.TYPE_ENUM:
            kind = f.enum_type.full_name
        else:
            kind = _TYPE_NAMES[f.type]
        repeated = getattr(f, "is_repeated", None)
        repeated = f.label == FieldDescriptor.LABEL_REPEATED if repeated is None else repeated
        if repeated and not kind.startswith("map<"):
            kind = f"repeated {kind}"
        out.append({"number": f.number, "name": f.name, "type": kind})
    return out


def _schema_rows(schema: dict, prefix: str = "") -> list[dict]:
    rows = []
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, dict):
            rows.extend(_schema_rows(spec, path + "."))
        else:
            kind, default = spec
            if isinstance(kind, list):
                kind = f"array of {kind[0]}"
            elif isinstance(kind, tuple):
                kind = f"object of {kind[1]}"
            rows.append({"key": path, "type": {"str": "string", "num": "number", "bool": "boolean"}.get(kind, kind),
                         "default": default})
    return rows


def mode_context(mode: CompiledMode) -> dict:
    spec = mode.spec
    raw_transitions = list(spec.get("transitions", [])) + [spec["commitment"]]
    roles = [{"name": r, "text": BUILTIN_ROLE_TEXT[r]} for r in ("initiator", "participant", "anyone")]
    for name, ref in (spec.get("roles") or {}).items():
        roles.append({"name": name, "text": _doc(_resolve_role(mode, name)) or f"hook `{ref}`"})
    rows: list[dict] = []
    errors: dict[str, list[str]] = {}
    for node in raw_transitions:
        msg = node["message"]
        t = next(t for t in mode.transitions[msg].values() if sorted(t.sources) == sorted(
            [node["from"]] if isinstance(node["from"], str) else node["from"]))
        checks: list[dict] = [
            {"why": g.why or _doc(g.check) or g.name, "code": REJECT_CODES[g.reject], "hook": g.name}
            for g in t.guards]
        if t.commit:
            if t.ready is not None:
                checks.append({"why": _doc(t.ready) or "the session is ready for a Commitment",
                               "code": "INVALID_ENVELOPE", "hook": t.ready_name})
            if t.policy is not None:
                checks.append({"why": _doc(t.policy) or "the bound policy's evaluator allows it",
                               "code": "POLICY_DENIED", "hook": t.policy_name})
        for c in checks:
            errors.setdefault(c["code"], []).append(f"{msg}: {c['why']}")
        senders = node.get("senders", [])
        rows.append({
            "message": msg, "from": sorted(t.sources, key=mode.phases.index),
            "to": [{"phase": b.phase, "when": b.when_name, "when_text": _doc(b.when) if b.when else ""}
                   for b in t.branches],
            "senders": [senders] if isinstance(senders, str) else senders, "checks": checks,
            "effects": [{"name": n, "text": _doc(f)} for n, f in zip(t.effect_names, t.effects)],
            "commit": t.commit,
            "ready": t.ready_name, "policy": t.policy_name, "resolution": t.resolution_name,
            "resolution_text": (_doc(t.resolution) if t.resolution else "the Commitment payload").rstrip("."),
        })
    unlisted = (spec.get("unlisted_messages") or {}).get("senders", [])
    payloads = []
    for m, b in mode.payloads.items():
        node = (spec.get("payloads") or {}).get(m)
        described = node if isinstance(node, dict) and "type" in node else {}
        json_fields = [{"name": n, "type": (d or {}).get("type", "any"), "required": bool((d or {}).get("required")),
                        "description": (d or {}).get("description", "")}
                       for n, d in (described.get("fields") or {}).items()]
        payloads.append({"message": m, "type": b.type_name, "fields": _fields(b.type_name), "json_fields": json_fields,
                         "description": described.get("description", ""),
                         "decoder": PAYLOAD_TEXT.get(b.type_name) or (_doc(b.decode) if b.type_name.startswith("hook:") else "")})
    start_checks = [{"name": getattr(c, "__name__", "check"), "text": _doc(c)} for c in mode.start_checks]
    return {
        "mode": mode, "d": mode.descriptor, "spec_file": spec_path(mode.source),
        "roles": roles, "rows": rows, "payloads": payloads, "start_checks": start_checks,
        "unlisted": unlisted, "phases": mode.phases, "initial": mode.initial_phase,
        "policy_rows": _schema_rows(mode.policy_schema) if mode.policy_schema else [],
        "mode_errors": sorted(errors.items()),
        "engine_errors": ENGINE_ERRORS, "start_errors": START_ERRORS,
        "mermaid": mermaid(mode),
    }


def _resolve_role(mode: CompiledMode, name: str):
    for msg, fns in mode.senders.items():
        names = None
        for node in list(mode.spec.get("transitions", [])) + [mode.spec["commitment"]]:
            if node["message"] == msg:
                names = node.get("senders", [])
                break
        if names and name in names:
            return fns[names.index(name)]
    return None


_MERMAID_ESCAPES = {"#": "#35;", ";": "#59;"}


def mermaid_label(text: str) -> str:
    """A transition label Mermaid reads as text: `;` would end the statement, `#` start an entity code."""
    return re.sub(r"[#;]", lambda m: _MERMAID_ESCAPES[m.group()], text)


def edges(mode: CompiledMode) -> list[tuple[str, str, str]]:
    """(from, to, label) per (from, to) pair of the compiled machine; the label lists its message types."""
    grouped: dict[tuple[str, str], dict[str | None, list[str]]] = {}
    seen = set()
    for by_phase in mode.transitions.values():
        for t in by_phase.values():
            if id(t) in seen:
                continue
            seen.add(id(t))
            for src in sorted(t.sources, key=mode.phases.index):
                for b in t.branches:
                    grouped.setdefault((src, b.phase), {}).setdefault(b.when_name, []).append(t.message)
    return [(src, dst, "; ".join(", ".join(msgs) + (f" [{when}]" if when else "") for when, msgs in by_when.items()))
            for (src, dst), by_when in grouped.items()]


def terminal_phases(mode: CompiledMode) -> list[str]:
    terminal = {b.phase for by in mode.transitions.values() for t in by.values() if t.commit for b in t.branches}
    return sorted(terminal, key=mode.phases.index)


def mermaid(mode: CompiledMode) -> str:
    """A Mermaid state diagram: one edge per (from, to) pair, labelled with its message types."""
    lines = ["stateDiagram-v2", f"    [*] --> {mode.initial_phase}"]
    for src, dst, label in edges(mode):
        lines.append(f"    {src} --> {dst} : {mermaid_label(label)}")
    for phase in terminal_phases(mode):
        lines.append(f"    {phase} --> [*]")
    return "\n".join(lines)


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), keep_trailing_newline=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["code"] = lambda v: f"`{v}`"
    env.filters["cell"] = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    return env


def page_name(mode: CompiledMode) -> str:
    return mode.name.replace("/", "_") + ".md"


def render(modes: list[CompiledMode]) -> dict[str, str]:
    """File name -> Markdown text for every mode page and the index."""
    env = _env()
    pages = {}
    ordered = sorted(modes, key=lambda m: (not m.standards_track, m.list_position, m.name))
    for mode in ordered:
        pages[page_name(mode)] = env.get_template("mode.md.j2").render(**mode_context(mode))
    pages["index.md"] = env.get_template("index.md.j2").render(
        modes=[{"mode": m, "d": m.descriptor, "page": page_name(m)} for m in ordered])
    return pages


class GraphvizMissing(RuntimeError):
    pass


def write(modes: list[CompiledMode], out_dir: str, svg: bool = False, reference_dir: str | None = None) -> list[str]:
    """Write the mode pages (and SVG diagrams when asked: Graphviz `dot` must be on the PATH, else
    GraphvizMissing before anything is written) and, with `reference_dir`, the format reference
    (spec-format.md, hooks.md, spec-schema.json). Returns the paths written."""
    if svg and not shutil.which("dot"):
        raise GraphvizMissing("--svg needs Graphviz: the `dot` program is not on the PATH "
                              "(install the graphviz package, or leave out --svg)")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    files = dict(render(modes))
    for name, text in files.items():
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        written.append(path)
    if reference_dir is not None:
        os.makedirs(reference_dir, exist_ok=True)
        for name, text in render_reference().items():
            path = os.path.join(reference_dir, name)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
            written.append(path)
    if svg:
        for mode in modes:
            path = os.path.join(out_dir, page_name(mode)[:-3] + ".svg")
            subprocess.run(["dot", "-Tsvg", "-o", path], input=graphviz(mode).encode(), check=True)
            written.append(path)
    return written


def graphviz(mode: CompiledMode) -> str:
    def q(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"')

    lines = ["digraph mode {", "  rankdir=LR;", '  node [shape=box, style=rounded];',
             '  start [shape=point];', f'  start -> "{q(mode.initial_phase)}";']
    for src, dst, label in edges(mode):
        lines.append(f'  "{q(src)}" -> "{q(dst)}" [label="{q(label)}"];')
    for phase in terminal_phases(mode):
        lines.append(f'  "{q(phase)}" [peripheries=2];')
    lines.append("}")
    return "\n".join(lines)


# --- the format reference: every key of the spec schema, and the hook catalogue ---------------------

def _schema_rows_of(node: dict, root: dict, path: str, rows: list, depth: int = 0) -> None:
    """One row per key of the schema, depth first, following $refs (each definition once per path)."""
    def deref(n):
        while isinstance(n, dict) and "$ref" in n:
            n = root["$defs"][n["$ref"].rsplit("/", 1)[1]]
        return n

    node = deref(node)
    props = node.get("properties") or {}
    required = set(node.get("required") or [])
    for key, sub in props.items():
        desc = sub.get("description") or deref(sub).get("description", "")
        full = deref(sub)
        rows.append({"key": f"{path}{key}", "type": _schema_type(sub, root), "required": key in required,
                     "default": full.get("default", sub.get("default")), "description": desc})
        if depth < 4:
            if full.get("properties"):
                _schema_rows_of(full, root, f"{path}{key}.", rows, depth + 1)
            items = deref(full.get("items") or {})
            if full.get("type") == "array" and items.get("properties"):
                _schema_rows_of(items, root, f"{path}{key}[].", rows, depth + 1)
            for alt in full.get("oneOf") or []:
                alt = deref(alt)
                if alt.get("type") == "array" and deref(alt.get("items") or {}).get("properties"):
                    _schema_rows_of(deref(alt["items"]), root, f"{path}{key}[].", rows, depth + 1)
            extra = full.get("additionalProperties")
            if isinstance(extra, dict) and deref(extra).get("properties"):
                _schema_rows_of(deref(extra), root, f"{path}{key}.<name>.", rows, depth + 1)
            elif isinstance(extra, dict):
                for alt in deref(extra).get("oneOf") or []:
                    if deref(alt).get("properties"):
                        _schema_rows_of(deref(alt), root, f"{path}{key}.<name>.", rows, depth + 1)


_REF_TYPES = {"hookRef": "hook", "hookRefs": "hook or list of hooks", "names": "name or list of names"}


def _schema_type(node: dict, root: dict) -> str:
    ref = node.get("$ref", "").rsplit("/", 1)[-1]
    if ref in _REF_TYPES:
        return _REF_TYPES[ref]
    if ref:
        return _schema_type(root["$defs"][ref], root)
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    if "oneOf" in node:
        parts = []
        for alt in node["oneOf"]:
            while "$ref" in alt:
                name = alt["$ref"].rsplit("/", 1)[1]
                alt = root["$defs"][name]
                if name in ("hookRef",):
                    parts.append("hook")
                    break
            else:
                parts.append(_schema_type(alt, root))
        return " or ".join(dict.fromkeys(parts))
    t = node.get("type")
    if isinstance(t, list):
        return " or ".join(t)
    if t == "array":
        return "list"
    if t == "object":
        extra = node.get("additionalProperties")
        return "mapping" if extra in (None, False) else "mapping of name → value"
    if t is None and "hook" in (node.get("description") or "").lower():
        return "hook"
    return t or "any"


def render_reference() -> dict[str, str]:
    """spec-format.md (every key), hooks.md (the catalogue), spec-schema.json (the published schema)."""
    from ..specs.hooks.contract import OPERATORS, PARAM_TYPES, USES
    from .catalogue import GENERAL_MODULES, all_modules, catalogue, example
    from .validate import schema

    root = schema()
    rows: list = []
    _schema_rows_of(root, root, "", rows)
    env = _env()
    general = catalogue(list(GENERAL_MODULES))
    mode_modules = [m for m in all_modules() if m not in GENERAL_MODULES]
    for entry in general:
        entry["example"] = example(entry)
        entry["reads"] = re.sub(r"\{(\w+)\}", r"<\1>", entry["text"])
    return {
        "spec-format.md": env.get_template("spec-format.md.j2").render(rows=rows, schema=root),
        "hooks.md": env.get_template("hooks.md.j2").render(
            hooks=general, uses=USES, param_types=PARAM_TYPES, operators=sorted(set(OPERATORS)),
            mode_modules=mode_modules),
        "spec-schema.json": json.dumps(root, indent=2, ensure_ascii=False) + "\n",
    }
