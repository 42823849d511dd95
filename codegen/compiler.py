"""Check a loaded spec and compile it into one shared `transitions` machine plus hook tables.

`compile_spec` is called once per mode when the runtime starts (or when a mode is registered); it
returns a `CompiledMode` (codegen/model.py): data only. Sessions never construct machines: each session
only holds its current phase and mode state, and the kernel's interpreter (runtime/kernel/interpreter.py)
runs the compiled mode's tables against it.

Beside this module: nodes.py reads spec nodes, hooks.py resolves hook references, payloads.py binds
payload decoders, rule_schema.py reads the governance rule schema (`policy_rules`).
"""
from __future__ import annotations

import gc
import glob
import logging
import os
from typing import Any, Callable

from macp.v1 import core_pb2
from transitions import Machine

from ..specs import SPECS_DIR
from ..specs.hooks.context import Reject
from .errors import SpecError
from .hooks import HookResolver, hook_label, hook_text
from .loader import LineDict, load_spec_file
from .model import BUILTIN_ROLES, UNLISTED_EVENT, Branch, CompiledMode, Guard, Transition
from .nodes import Ctx, hook_list, opt_str, require, scalar_str, str_list, unknown_keys
from .payloads import payload_bindings
from .rule_schema import rule_schema
from .validate import SpecErrors, validate_spec

# transitions logs every state entry/exit at INFO; at thousands of messages a second that is most of
# the per-message cost and says nothing the runtime's own logs do not.
logging.getLogger("transitions").setLevel(logging.WARNING)
TOP_KEYS = {
    "spec_version", "mode", "version", "standards_track", "strict_start", "descriptor", "hooks",
    "payloads", "roles", "session_start", "state", "phases", "unlisted_messages", "transitions", "commitment",
    "list_position", "policy_rules",
}
REQUIRED_TOP = ("spec_version", "mode", "version", "descriptor", "phases", "transitions", "commitment")
DESCRIPTOR_KEYS = {
    "title", "description", "determinism_class", "participant_model", "message_types",
    "terminal_message_types", "schema_uris",
}
TRANSITION_KEYS = {"message", "from", "to", "senders", "guards", "effects"}
COMMITMENT_KEYS = TRANSITION_KEYS | {"ready", "policy", "resolution"}
GUARD_KEYS = {"check", "reject", "why"}
UNLISTED_KEYS = {"from", "to", "guards", "effects"}


def compile_spec(spec: LineDict, file: str = "<spec>", overrides: dict | None = None, *,
                 validate: bool = True) -> CompiledMode:
    """Validate `spec` (as returned by the loader) and build its CompiledMode. Raises SpecError only:
    whatever else a spec provokes (a message type that collides with a machine attribute, a value of
    an unexpected type, nesting too deep) is reported as a SpecError too."""
    # A large spec allocates many long-lived objects and frees none: cyclic GC passes over them would
    # make the compile time grow faster than the spec.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _compile_spec(spec, file, overrides, validate)
    except SpecError:
        raise
    except RecursionError:
        raise SpecError(file, "", "the spec is nested too deeply") from None
    except Exception as exc:
        raise SpecError(file, "", f"the spec cannot be compiled: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        if collecting:
            gc.enable()


def _compile_spec(spec: LineDict, file: str, overrides: dict | None, validate: bool = True) -> CompiledMode:
    ctx = Ctx(file)
    if not isinstance(spec, dict):
        raise ctx.fail(None, "", "a mode spec must be a mapping")
    # Every problem of the file at once (schema + cross-references); the checks below stay as a backstop.
    spec_dir = os.path.dirname(os.path.abspath(file)) if os.path.exists(file) else SPECS_DIR
    problems: list[SpecError] = []
    resolver = None
    try:
        resolver = HookResolver(ctx, spec_dir, spec.get("hooks") if isinstance(spec.get("hooks"), str) else None)
    except SpecError as exc:
        problems.append(SpecError(exc.file, exc.path, exc.message,
                                  exc.line or (spec.lines.get("hooks") if isinstance(spec, LineDict) else None)))
    if validate:   # a spec generated from a template the runtime ships (passthrough) skips the schema pass
        problems += validate_spec(spec, file, resolver.find if resolver is not None else None)
    if problems:
        raise SpecErrors(problems)
    for key in REQUIRED_TOP:
        if key not in spec:
            raise ctx.fail(spec, "", f"missing required key {key!r}")
    unknown_keys(ctx, spec, TOP_KEYS, "")
    if spec["spec_version"] != 1:
        raise ctx.fail(spec, "spec_version", "only spec_version 1 is understood", "spec_version")
    name = require(ctx, spec, "mode", "", str, "a string")
    if not isinstance(spec["version"], (str, int, float)) or isinstance(spec["version"], bool):
        raise ctx.fail(spec, "version", "must be a string", "version")
    version = str(spec["version"])
    overrides = overrides or {}
    if overrides.get("mode"):
        name = overrides["mode"]
    standards_track = bool(spec.get("standards_track", False))
    list_position = spec.get("list_position", 1000)
    if not isinstance(list_position, int) or isinstance(list_position, bool):
        raise ctx.fail(spec, "list_position", "must be an integer", "list_position")
    strict_start = bool(spec.get("strict_start", True))
    if spec.get("hooks") is not None and not isinstance(spec["hooks"], str):
        raise ctx.fail(spec, "hooks", "must be a hook module name or a .py path", "hooks")
    hooks = resolver

    # descriptor
    desc_node = require(ctx, spec, "descriptor", "", dict, "a mapping")
    unknown_keys(ctx, desc_node, DESCRIPTOR_KEYS, "descriptor")
    message_types = str_list(ctx, desc_node, "message_types", "descriptor")
    terminal_types = str_list(ctx, desc_node, "terminal_message_types", "descriptor", required=False)
    declared_types = frozenset(message_types)   # membership tests stay O(1) for specs with many types
    for t in terminal_types:
        if t not in declared_types:
            raise ctx.fail(desc_node, "descriptor.terminal_message_types",
                           f"terminal message type {t!r} must also appear in message_types", "terminal_message_types")
    schema_uris = desc_node.get("schema_uris", {}) or {}
    if not isinstance(schema_uris, dict):
        raise ctx.fail(desc_node, "descriptor.schema_uris", "must be a mapping", "schema_uris")
    descriptor = core_pb2.ModeDescriptor(
        mode=name, mode_version=version,
        title=opt_str(ctx, desc_node, "title", "descriptor"),
        description=opt_str(ctx, desc_node, "description", "descriptor"),
        determinism_class=opt_str(ctx, desc_node, "determinism_class", "descriptor"),
        participant_model=opt_str(ctx, desc_node, "participant_model", "descriptor"),
        message_types=message_types, terminal_message_types=terminal_types,
        schema_uris={scalar_str(ctx, schema_uris, k, "descriptor.schema_uris"): opt_str(ctx, schema_uris, k,
                                                                                         "descriptor.schema_uris")
                     for k in schema_uris},
    )

    # phases
    phases_node = require(ctx, spec, "phases", "", dict, "a mapping")
    unknown_keys(ctx, phases_node, {"initial", "names"}, "phases")
    phase_names = str_list(ctx, phases_node, "names", "phases")
    if len(set(phase_names)) != len(phase_names):
        raise ctx.fail(phases_node, "phases.names", "phase names must be unique", "names")
    initial = require(ctx, phases_node, "initial", "phases", str, "a phase name")
    if initial not in phase_names:
        raise ctx.fail(phases_node, "phases.initial", f"initial phase {initial!r} is not in phases.names", "initial")

    # roles
    roles_node = spec.get("roles", {}) or {}
    if not isinstance(roles_node, dict):
        raise ctx.fail(spec, "roles", "must be a mapping of role name to hook", "roles")
    role_fns: dict[str, Callable[[Any, str], bool]] = {
        "initiator": lambda s, sender: sender == s.initiator,
        "participant": lambda s, sender: sender in s.participant_set,
        "anyone": lambda s, sender: True,
    }
    for role, hook_name in roles_node.items():
        if role in BUILTIN_ROLES:
            raise ctx.fail(roles_node, f"roles.{role}", f"{role!r} is a built-in role and cannot be redefined", role)
        role_fns[role] = hooks.get(roles_node, f"roles.{role}", hook_name, role)

    def senders_of(node, path) -> tuple:
        names = str_list(ctx, node, "senders", path)
        for r in names:
            if r not in role_fns:
                raise ctx.fail(node, f"{path}.senders", f"unknown role {r!r} (known: {', '.join(sorted(role_fns))})",
                               "senders")
        return tuple(role_fns[r] for r in names), tuple(names)

    payloads = payload_bindings(ctx, hooks, spec)

    # session start and state
    start_node = spec.get("session_start", {}) or {}
    unknown_keys(ctx, start_node, {"requires"}, "session_start")
    start_checks = tuple(hooks.get(start_node, "session_start.requires", h, "requires")
                         for h in hook_list(ctx, start_node, "requires", "session_start"))
    state_node = spec.get("state", {}) or {}
    unknown_keys(ctx, state_node, {"initial"}, "state")
    initial_state = (hooks.get(state_node, "state.initial", state_node["initial"], "initial")
                     if "initial" in state_node else (lambda session: {}))

    # The governance rule schema the mode reads (RegisterPolicy checks rules against it; hooks parse it).
    policy_schema = rule_schema(ctx, spec)

    unlisted = spec.get("unlisted_messages", {}) or {}
    unknown_keys(ctx, unlisted, {"senders", "accept"}, "unlisted_messages")
    unlisted_senders = senders_of(unlisted, "unlisted_messages")[0] if "senders" in unlisted else ()
    if "accept" in unlisted and "senders" not in unlisted:
        raise ctx.fail(unlisted, "unlisted_messages.accept", "accepting unlisted messages needs unlisted_messages.senders",
                       "accept")

    # transitions
    machine = Machine(model=None, states=list(phase_names), initial=initial, auto_transitions=False,
                      send_event=True, model_attribute="phase", ignore_invalid_triggers=False)
    transitions: dict[str, dict[str, Transition]] = {}
    senders: dict[str, tuple] = {}
    sender_names: dict[str, tuple] = {}
    nodes = spec["transitions"]
    if not isinstance(nodes, list):
        raise ctx.fail(spec, "transitions", "must be a list", "transitions")
    entries = [(f"transitions[{i}]", node, False) for i, node in enumerate(nodes)]
    entries.append(("commitment", spec["commitment"], True))
    if "accept" in unlisted:
        entries.append(("unlisted_messages.accept", unlisted["accept"], None))
    unlisted_transitions = None
    for path, node, is_commit in entries:
        if not isinstance(node, dict):
            raise ctx.fail(spec, path, "must be a mapping")
        if is_commit is None:   # unlisted_messages.accept: any message type no transition names, raw payload
            unknown_keys(ctx, node, UNLISTED_KEYS, path)
            sources = str_list(ctx, node, "from", path)
            for p in sources:
                if p not in phase_names:
                    raise ctx.fail(node, f"{path}.from", f"unknown phase {p!r}", "from")
            t = _transition(ctx, hooks, node, path, UNLISTED_EVENT, sources, phase_names, False)
            unlisted_transitions = {p: t for p in sources}
            _add_machine_transitions(machine, t)
            continue
        unknown_keys(ctx, node, COMMITMENT_KEYS if is_commit else TRANSITION_KEYS, path)
        msg = require(ctx, node, "message", path, str, "a message type")
        if msg == "SessionStart":
            raise ctx.fail(node, f"{path}.message", "SessionStart is handled by the engine, not by transitions", "message")
        if msg not in declared_types:
            raise ctx.fail(node, f"{path}.message", f"message type {msg!r} is not in descriptor.message_types", "message")
        if msg not in payloads:
            raise ctx.fail(node, f"{path}.message", f"message type {msg!r} has no payload binding in payloads", "message")
        sources = str_list(ctx, node, "from", path)
        for p in sources:
            if p not in phase_names:
                raise ctx.fail(node, f"{path}.from", f"unknown phase {p!r}", "from")
        fns, names = senders_of(node, path)
        if msg in sender_names and sender_names[msg] != names:
            raise ctx.fail(node, f"{path}.senders",
                           f"all transitions on {msg!r} must name the same senders (authorisation runs before the phase is known)",
                           "senders")
        senders[msg], sender_names[msg] = fns, names
        t = _transition(ctx, hooks, node, path, msg, sources, phase_names, is_commit)
        if is_commit:
            for key in ("ready", "policy", "resolution"):
                if key in node:
                    setattr(t, key, hooks.get(node, f"{path}.{key}", node[key], key))
                    setattr(t, f"{key}_name", hook_label(node[key]))
        by_phase = transitions.setdefault(msg, {})
        for p in sources:
            if p in by_phase:
                raise ctx.fail(node, f"{path}.from", f"phase {p!r} already has a transition on {msg!r}", "from")
            by_phase[p] = t
        _add_machine_transitions(machine, t)

    return CompiledMode(
        name=name, version=version, descriptor=descriptor, standards_track=standards_track,
        list_position=list_position, strict_start=strict_start, source=file, machine=machine, initial_phase=initial,
        phases=tuple(phase_names), transitions=transitions, roles=senders, unlisted_senders=unlisted_senders,
        payloads=payloads, start_checks=start_checks, initial_state=initial_state, spec=spec,
        policy_schema=policy_schema, unlisted_transitions=unlisted_transitions,
    )


def _transition(ctx: Ctx, hooks: HookResolver, node: dict, path: str, msg: str, sources, phase_names,
                is_commit: bool) -> Transition:
    """The guards, effects and branches of one transition node."""
    branches = _branches(ctx, hooks, node, path, phase_names)
    guards = []
    for gi, g in enumerate(node.get("guards", []) or []):
        gpath = f"{path}.guards[{gi}]"
        if not isinstance(g, dict):
            raise ctx.fail(node, gpath, "a guard must be a mapping with check/reject/why", "guards")
        unknown_keys(ctx, g, GUARD_KEYS, gpath)
        kind = g.get("reject", "InvalidPayload")
        if kind not in Reject.KINDS:
            raise ctx.fail(g, f"{gpath}.reject", f"unknown rejection {kind!r} (known: {', '.join(Reject.KINDS)})",
                           "reject")
        check = hooks.get(g, f"{gpath}.check", g.get("check"), "check")
        guards.append(Guard(check, kind, opt_str(ctx, g, "why", gpath) or hook_text(check), hook_label(g.get("check"))))
    effect_refs = hook_list(ctx, node, "effects", path)
    effects = tuple(hooks.get(node, f"{path}.effects", e, "effects") for e in effect_refs)
    effect_names = [hook_label(e) for e in effect_refs]
    return Transition(message=msg, sources=frozenset(sources), branches=branches, guards=tuple(guards),
                      effects=effects, effect_names=tuple(effect_names), commit=is_commit)


def _add_machine_transitions(machine: Machine, t: Transition) -> None:
    for b in t.branches:
        cond = [] if b.when is None else [_condition(b.when)]
        machine.add_transition(t.message, sorted(t.sources), b.phase, conditions=cond)


def _condition(fn):
    return lambda event_data: fn(event_data.args[0])


def _branches(ctx: Ctx, hooks: HookResolver, node: dict, path: str, phase_names) -> tuple[Branch, ...]:
    if "to" not in node:
        raise ctx.fail(node, path, "missing required key 'to'")
    to = node["to"]
    if isinstance(to, str):
        to = [{"phase": to}]
    if not isinstance(to, list) or not to:
        raise ctx.fail(node, f"{path}.to", "must be a phase name or a list of {phase, when} branches", "to")
    branches = []
    for i, b in enumerate(to):
        bpath = f"{path}.to[{i}]"
        if not isinstance(b, dict) or "phase" not in b:
            raise ctx.fail(node, bpath, "a branch must be a mapping with 'phase' (and 'when' except for the last)", "to")
        unknown_keys(ctx, b, {"phase", "when"}, bpath)
        if b["phase"] not in phase_names:
            raise ctx.fail(b, f"{bpath}.phase", f"unknown phase {b['phase']!r}", "phase")
        when = hooks.get(b, f"{bpath}.when", b["when"], "when") if "when" in b else None
        is_last = i == len(to) - 1
        if when is None and not is_last:
            raise ctx.fail(b, bpath, "only the last branch may omit 'when'")
        if when is not None and is_last:
            raise ctx.fail(b, bpath, "the last branch must not have 'when' (some phase must always follow)")
        branches.append(Branch(b["phase"], when, hook_label(b["when"]) if "when" in b else None))
    return tuple(branches)


def load_modes(directories: list[str] | None = None) -> list[CompiledMode]:
    """Compile every `*.yaml` spec of the built-in folder, then of each extra directory, in name order.

    Raises SpecErrors with the problems of every file (not only the first file's first one)."""
    dirs = [SPECS_DIR] + list(directories or [])
    modes = []
    problems: list[SpecError] = []
    for d in dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.yaml"))):
            try:
                modes.append(compile_spec(load_spec_file(path), path))
            except SpecError as exc:
                problems.extend(getattr(exc, "errors", [exc]))
    if problems:
        raise SpecErrors(problems)
    return modes
