"""`macp-runtime check`: compile specs and look for mistakes the compiler alone cannot see.

The compiler already refuses malformed YAML, unknown keys, unknown phases, hooks that do not exist,
payload types that do not resolve and transitions on unbound message types. On top of that the
linter follows the compiled machine from the initial phase and reports phases no message can reach,
a commitment that can never be accepted, message types no transition accepts, and phases a session
can never leave.
"""
from __future__ import annotations

import dataclasses
import glob
import os

from ..specs import SPECS_DIR
from .compiler import compile_spec
from .errors import SpecError
from .loader import LineDict, load_spec_file
from .model import CompiledMode


@dataclasses.dataclass
class Finding:
    level: str          # "error" | "warning"
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.level}: {self.path or '<root>'}: {self.message}"


def _line(node, key=None):
    if isinstance(node, LineDict):
        return node.lines.get(key, node.line) if key is not None else node.line
    return None


def reachable_phases(mode: CompiledMode) -> set[str]:
    seen = {mode.initial_phase}
    frontier = [mode.initial_phase]
    while frontier:
        phase = frontier.pop()
        for by_phase in mode.transitions.values():
            t = by_phase.get(phase)
            if t is None:
                continue
            for b in t.branches:
                if b.phase not in seen:
                    seen.add(b.phase)
                    frontier.append(b.phase)
    return seen


def lint_mode(mode: CompiledMode, file: str) -> list[Finding]:
    spec = mode.spec
    findings: list[Finding] = []
    phases_node = spec.get("phases")
    reached = reachable_phases(mode)
    for phase in mode.phases:
        if phase not in reached:
            findings.append(Finding("error", file, _line(phases_node, "names"), "phases.names",
                                    f"phase {phase!r} is unreachable from the initial phase {mode.initial_phase!r}"))
    commit = next(t for by in mode.transitions.values() for t in by.values() if t.commit)
    commit_node = spec["commitment"]
    if not (commit.sources & reached):
        findings.append(Finding("error", file, _line(commit_node, "from"), "commitment.from",
                                "the commitment can never be accepted: none of its from-phases is reachable"))
    senders = commit_node.get("senders", [])
    if not senders:
        findings.append(Finding("error", file, _line(commit_node, "senders"), "commitment.senders",
                                "the commitment can never be accepted: nobody may send it"))
    desc = spec.get("descriptor", {})
    for mtype in mode.descriptor.message_types:
        if mtype == "SessionStart":
            continue
        if mtype not in mode.payloads:
            findings.append(Finding("error", file, _line(desc, "message_types"), "descriptor.message_types",
                                    f"message type {mtype!r} has no payload binding"))
        elif mtype not in mode.transitions:
            findings.append(Finding("warning", file, _line(desc, "message_types"), "descriptor.message_types",
                                    f"message type {mtype!r} is declared but no transition accepts it"))
    for mtype in mode.payloads:
        if mtype not in mode.descriptor.message_types:
            findings.append(Finding("warning", file, _line(spec.get("payloads"), mtype), f"payloads.{mtype}",
                                    f"payload bound for {mtype!r}, which descriptor.message_types does not list"))
    terminal = {b.phase for b in commit.branches}
    for phase in sorted(reached - terminal, key=mode.phases.index):
        if not any(phase in by for by in mode.transitions.values()):
            findings.append(Finding("warning", file, _line(phases_node, "names"), "phases.names",
                                    f"phase {phase!r} has no outgoing transition: sessions there can only expire"))
    return findings


def spec_paths(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        if os.path.isdir(p):
            out.extend(sorted(glob.glob(os.path.join(p, "*.yaml")) + glob.glob(os.path.join(p, "*.yml"))))
        else:
            out.append(p)
    return out


def builtin_mode_files() -> dict[str, str]:
    """mode name -> file of the built-in specs (what the server always loads first)."""
    out = {}
    for path in spec_paths([SPECS_DIR]):
        try:
            name = load_spec_file(path).get("mode")
        except SpecError:
            continue
        if isinstance(name, str):
            out[name] = path
    return out


def lint_paths(paths: list[str]) -> tuple[list[Finding], int]:
    """Findings for every spec under `paths` (files or directories), and how many specs were read."""
    findings: list[Finding] = []
    files = spec_paths(paths)
    seen_modes: dict[str, str] = {}
    builtins = builtin_mode_files()
    for path in files:
        try:
            spec = load_spec_file(path)
            mode = compile_spec(spec, path)
        except SpecError as exc:
            for e in getattr(exc, "errors", [exc]):
                findings.append(Finding("error", e.file, e.line, e.path, e.message))
            continue
        if mode.name in seen_modes:
            findings.append(Finding("warning", path, _line(spec, "mode"), "mode",
                                    f"mode {mode.name!r} is also defined in {seen_modes[mode.name]}; the later one wins"))
        elif mode.name in builtins and not os.path.abspath(path).startswith(os.path.join(SPECS_DIR, "")):
            # (the built-in folder's own profile overlays, specs/current/, are not user overrides)
            findings.append(Finding("warning", path, _line(spec, "mode"), "mode",
                                    f"mode {mode.name!r} overrides the built-in spec {os.path.basename(builtins[mode.name])} "
                                    "when served with --specs-dir"))
        seen_modes[mode.name] = path
        findings.extend(lint_mode(mode, path))
    return findings, len(files)
