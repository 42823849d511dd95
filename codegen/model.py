"""The compiled form of a mode spec: plain objects the kernel's interpreter (runtime/kernel/interpreter.py)
runs against a session.

Everything here is built once per mode at load time and shared by all of that mode's sessions; none of
it holds session data or runs on its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Callable

from macp.v1 import core_pb2
from transitions import Machine

BUILTIN_ROLES = ("initiator", "participant", "anyone")
# The machine event of `unlisted_messages.accept` (not a message type: message types are looked up first).
UNLISTED_EVENT = "<unlisted>"


@dataclasses.dataclass(frozen=True)
class Guard:
    check: Callable[[Any], bool]
    reject: str          # Reject kind used when the check returns False
    why: str             # human text: docs, logs
    name: str


@dataclasses.dataclass(frozen=True)
class Branch:
    phase: str
    when: Callable[[Any], bool] | None
    when_name: str | None


@dataclasses.dataclass
class Transition:
    message: str
    sources: frozenset[str]
    branches: tuple[Branch, ...]
    guards: tuple[Guard, ...]
    effects: tuple[Callable[[Any], None], ...]
    effect_names: tuple[str, ...]
    commit: bool = False
    ready: Callable[[Any], bool] | None = None
    ready_name: str | None = None
    policy: Callable[[Any], list] | None = None
    policy_name: str | None = None
    resolution: Callable[[Any], bytes] | None = None
    resolution_name: str | None = None


@dataclasses.dataclass(frozen=True)
class PayloadBinding:
    """How the bytes of one message type become the object hooks see."""

    message_type: str
    type_name: str                     # protobuf full name, or "hook:<name>"
    decode: Callable[[bytes], Any]


class CompiledMode:
    """One mode, ready to run: its descriptor, phases, the shared `transitions` machine (docs and checks;
    sessions are never its models) and the hook tables the interpreter runs. Shared by every session of
    the mode; holds no session data."""

    def __init__(self, *, name, version, descriptor, standards_track, list_position, strict_start, source, machine,
                 initial_phase, phases, transitions, roles, unlisted_senders, payloads, start_checks,
                 initial_state, spec, policy_schema=None, unlisted_transitions=None):
        self.name: str = name
        self.version: str = version
        self.descriptor: core_pb2.ModeDescriptor = descriptor
        self.standards_track: bool = standards_track
        self.list_position: int = list_position   # ListModes order of the standards-track modes
        self.strict_start: bool = strict_start
        self.source: str = source
        self.machine: Machine = machine
        self.initial_phase: str = initial_phase
        self.phases: tuple[str, ...] = phases
        # message type -> {phase -> Transition}; authorisation is per message type.
        self.transitions: dict[str, dict[str, Transition]] = transitions
        self.senders: dict[str, tuple[Callable[[Any, str], bool], ...]] = roles
        self.unlisted_senders = unlisted_senders
        # {phase -> Transition} for message types the spec does not list (`unlisted_messages.accept`),
        # or None when such types are refused; their payload is the raw bytes.
        self.unlisted_transitions: dict[str, Transition] | None = unlisted_transitions
        self.payloads: dict[str, PayloadBinding] = payloads
        self.start_checks = start_checks
        self.initial_state = initial_state
        self.spec: dict = spec
        self.policy_schema: dict | None = policy_schema   # rule groups a bound policy may set
        # Identifies the spec text a session starts under (runtime/spec_archive.py keeps old ones).
        source = getattr(spec, "source", None)
        self.source_text: str | None = source
        self.digest: str = hashlib.sha256(
            (source if source is not None else json.dumps(spec, sort_keys=True, default=str)).encode()).hexdigest()

