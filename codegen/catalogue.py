"""The hook catalogue: every built-in hook with where it may be used, its parameters and its text.

Printed by `macp-runtime hooks`, rendered into docs/hooks.md by the docs generator; both read the
hooks' declared signatures (specs/hooks/contract.py), so the catalogue cannot drift from the code.
"""
from __future__ import annotations

import importlib

from ..specs.hooks.contract import PARAM_TYPES, USES, signature_of
from .hooks import HOOKS_PACKAGE, hook_module_names, module_hooks

# The modules a YAML-only spec uses; the others belong to one built-in mode each.
GENERAL_MODULES = ("generic", "common")


def catalogue(modules: list[str] | None = None) -> list[dict]:
    """[{module, name, ref, uses, params: [{name, type, required, default, meaning}], text, doc}]"""
    names = modules or list(GENERAL_MODULES)
    out = []
    for mod_name in names:
        module = importlib.import_module(f"{HOOKS_PACKAGE}.{mod_name}")
        for name in module_hooks(module):
            fn = getattr(module, name)
            sig = signature_of(fn)
            out.append({
                "module": mod_name, "name": name, "ref": f"{mod_name}.{name}", "uses": list(sig.uses),
                "declared": sig.declared,
                "params": [{"name": p.name, "type": p.type, "required": p.required, "default": p.default,
                            "meaning": PARAM_TYPES.get(p.type, "")} for p in sig.params.values()],
                "text": sig.text, "doc": " ".join((fn.__doc__ or "").split()),
            })
    return out


def all_modules() -> list[str]:
    return hook_module_names()


def example(entry: dict) -> str:
    """How a spec names the hook: `generic.first_from_sender` or `{hook: ..., count: <count>}`."""
    if not entry["params"]:
        return entry["ref"]
    params = ", ".join(f"{p['name']}: <{p['type']}>" for p in entry["params"] if p["required"])
    optional = [p["name"] for p in entry["params"] if not p["required"]]
    tail = f"  # optional: {', '.join(optional)}" if optional else ""
    return f"{{hook: {entry['ref']}{', ' + params if params else ''}}}{tail}"


def format_text(entries: list[dict]) -> str:
    lines: list[str] = []
    module = None
    for e in entries:
        if e["module"] != module:
            module = e["module"]
            if lines:
                lines.append("")
            lines.append(f"== {module}")
        lines.append(f"{e['ref']}  [{', '.join(e['uses'])}]")
        lines.append(f"    {e['text'] or e['doc'] or '(no description)'}")
        for p in e["params"]:
            req = "required" if p["required"] else f"optional, default {p['default']!r}"
            lines.append(f"    {p['name']}: {p['type']} ({req}) — {p['meaning']}")
        lines.append(f"    use: {example(e)}")
    lines.append("")
    lines.append("uses: " + "; ".join(f"{u} = {key}" for u, (key, _) in USES.items()))
    return "\n".join(lines)
