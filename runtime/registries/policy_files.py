"""Policies from files (MACP_POLICIES_DIR, current.md §11.3, §16.2): each `*.json` of a directory is one
policy descriptor `{policy_id, mode, description, rules, schema_version}`, registered at start-up through
RegisterPolicy's admission (the registry is then read-only), or only checked (MACP_POLICIES_DRY_RUN)
against a scratch registry."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

from ..codegen import SpecError
from .modes import ModeRegistry
from .policies import PolicyRegistry

READ_ONLY = "policy registry is read-only: policies are file-loaded via MACP_POLICIES_DIR"
_MEMBERS = ("policy_id", "mode", "description", "rules", "schema_version")


def _file_descriptor(path: str) -> tuple:
    """(policy_id, mode, description, rules_text, schema_version) of one policy file; ValueError."""
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


def _register_each(registry: PolicyRegistry, paths: list[str]) -> Iterator[tuple[str, str | None, str, str]]:
    """Per file, in order: (path, policy_id or None, "" | "file" | "rejected", the problem text)."""
    for path in paths:
        try:
            policy_id, mode, description, rules, version = _file_descriptor(path)
        except (OSError, ValueError) as exc:
            yield path, None, "file", str(exc)
            continue
        error = registry.register(policy_id, mode, description, rules, version)
        yield path, policy_id, ("" if error is None else "rejected"), error or ""


def load_dir(registry: PolicyRegistry, directory: str) -> list[tuple[str, str | None, str]]:
    """Register every `*.json` of `directory` (file-name order) through `registry.register`.
    Returns [(file name, policy_id or None, "" or the problem)], stopping at the first problem."""
    if not os.path.isdir(directory):
        raise OSError(f"MACP_POLICIES_DIR {directory!r} is not a readable directory")
    out: list[tuple[str, str | None, str]] = []
    for path, policy_id, problem, text in _register_each(registry, sorted(glob.glob(os.path.join(directory, "*.json")))):
        name = os.path.basename(path)
        if problem == "file":
            out.append((name, None, f"invalid policy file {path}: {text}"))
            return out
        if problem:
            out.append((name, policy_id, f"policy file {path} rejected: {text}"))
            return out
        out.append((name, policy_id, ""))
    return out


def dry_run(directory: str, profile, spec_dirs: list[str] | None = None) -> int:
    """MACP_POLICIES_DRY_RUN=1: validate every file against a scratch registry (whose rule schemas come
    from the mode specs the server would load), one line per file; 0 when every file passes."""
    try:
        paths = sorted(glob.glob(os.path.join(directory, "*.json"))) if os.path.isdir(directory) else None
    except OSError:
        paths = None
    if paths is None:
        print(f"REJECTED {directory}: not a readable directory")
        return 1
    try:
        modes = ModeRegistry.from_spec_dirs(spec_dirs, profile)
    except SpecError as exc:
        print(f"REJECTED {directory}: the mode specs have problems (macp-runtime check shows them): {exc}")
        return 1
    registry = PolicyRegistry(profile=profile, modes=modes)
    ok = True
    for path, policy_id, problem, text in _register_each(registry, paths):
        if problem:
            print(f"REJECTED {os.path.basename(path)}: {text}")
            ok = False
        else:
            print(f"OK {os.path.basename(path)} {policy_id}")
    return 0 if ok else 1
