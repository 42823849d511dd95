"""Reading spec nodes while compiling one file: the error context (file, key path, line) and the typed
readers of required and optional values, key sets, hook lists and string lists."""
from __future__ import annotations

from typing import Any

from .errors import SpecError
from .loader import LineDict


class Ctx:
    """Error context while compiling one file."""

    def __init__(self, file: str):
        self.file = file

    def fail(self, node: Any, path: str, message: str, key: Any = None) -> SpecError:
        line = None
        if isinstance(node, LineDict):
            line = node.lines.get(key, node.line) if key is not None else node.line
        return SpecError(self.file, path, message, line)



def require(ctx: Ctx, node: dict, key: str, path: str, kind, what: str):
    if key not in node:
        raise ctx.fail(node, path, f"missing required key {key!r}")
    value = node[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ctx.fail(node, f"{path}.{key}" if path else key, f"must be {what}", key)
    return value


def opt_str(ctx: Ctx, node: dict, key, path: str) -> str:
    """An optional text value: a string (numbers are taken as written), never a list or mapping."""
    value = node.get(key, "")
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ctx.fail(node, f"{path}.{key}", "must be a string", key)
    return str(value)


def scalar_str(ctx: Ctx, node: dict, key, path: str) -> str:
    if isinstance(key, bool) or not isinstance(key, (str, int, float)):
        raise ctx.fail(node, path, f"keys must be strings, got {type(key).__name__}")
    return str(key)


def unknown_keys(ctx: Ctx, node: dict, allowed: set, path: str):
    for key in node:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise ctx.fail(node, where, f"unknown key {key!r} (allowed: {', '.join(sorted(allowed))})", key)


def hook_list(ctx: Ctx, node: dict, key: str, path: str) -> list:
    """An optional list of hook references (names or {hook: ..., params})."""
    value = node.get(key, [])
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
        raise ctx.fail(node, f"{path}.{key}", "must be a list of hook names or {hook: name, ...}", key)
    return value


def str_list(ctx: Ctx, node: dict, key: str, path: str, required=True) -> list[str]:
    if key not in node:
        if required:
            raise ctx.fail(node, path, f"missing required key {key!r}")
        return []
    value = node[key]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.fail(node, f"{path}.{key}", "must be a list of strings", key)
    return value

