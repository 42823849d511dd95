"""The compiled form of a mode spec: plain objects the engine executes.

Everything here is built once per mode at load time and shared by all of that mode's sessions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

BUILTIN_ROLES = ("initiator", "participant", "anyone")


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
