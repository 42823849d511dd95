"""Compile a mode registered at run time (RegisterExtMode) from the passthrough template (modes.md §8).

`compile_passthrough(descriptor)` is the stable entry point for the mode registry: it takes the
`macp.v1.ModeDescriptor` exactly as registered and returns a `CompiledMode` that the engine runs like
any other. RegisterExtMode's own validation (modes.md §9.3: blank name, reserved namespace, no
message types, blank mode_version, terminal types, duplicates) is the caller's job; this function
only needs a descriptor with a `mode` name.

What the compiled mode does (all of it declared in `specs/templates/passthrough.yaml` and
`specs/hooks/passthrough.py`):

* SessionStart is not strict: a decodable payload with a TTL in range and a mode_version equal to
  the descriptor's (or empty); participants may be empty or repeated. The mode state starts empty.
* allowed types = the descriptor's `message_types` without `SessionStart`. An empty list (the
  descriptor named only SessionStart) means every message type is accepted.
* `Commitment`: only the initiator (even when not a participant; the policy's authority is ignored);
  the Commitment contract (modes.md §1.3) is checked; the session resolves with
  `{"action":…,"commitment_id":…}` and the mode state is kept. A Commitment that is not allowed is
  still refused to everyone else with FORBIDDEN, and to the initiator with INVALID_ENVELOPE.
* any other allowed type: from anyone while the participant list is empty, else from declared
  participants (FORBIDDEN otherwise); always accepted; the mode state becomes its raw payload.
* a type that is not allowed: FORBIDDEN for non-members, INVALID_ENVELOPE for members.
* no readiness conditions and no policy evaluation (a policy is still bound at SessionStart).

The returned mode's `descriptor` is a copy of the registered one (so listings return it exactly as
registered); `standards_track` is False and `strict_start` False. To promote it (PromoteMode), the
registry sets `standards_track = True` and `strict_start = True` on the returned object (or compiles
again and sets them); its behaviour is otherwise unchanged.
"""
from __future__ import annotations

import copy
import functools
import os

from macp.v1 import core_pb2

from ..specs import SPECS_DIR
from .compiler import compile_spec
from .loader import load_spec_file
from .model import CompiledMode

TEMPLATE = os.path.join(SPECS_DIR, "templates", "passthrough.yaml")
COMMITMENT = "Commitment"
TEMPLATE_KEYS = ("each_message_type", "every_message_type")


@functools.lru_cache(maxsize=1)
def _template():
    return load_spec_file(TEMPLATE)


def allowed_message_types(descriptor: core_pb2.ModeDescriptor) -> list[str]:
    """The descriptor's message types minus every `SessionStart`, without repeats, in order."""
    seen: dict[str, None] = {}
    for message_type in descriptor.message_types:
        if message_type != "SessionStart":
            seen.setdefault(message_type, None)
    return list(seen)


def compile_passthrough(descriptor: core_pb2.ModeDescriptor) -> CompiledMode:
    """Instantiate the passthrough template for `descriptor` and compile it (see the module doc)."""
    spec = copy.deepcopy(_template())
    allowed = allowed_message_types(descriptor)
    each = spec.pop("each_message_type")
    every = spec.pop("every_message_type")

    spec["mode"] = descriptor.mode
    spec["version"] = descriptor.mode_version
    spec["descriptor"]["message_types"] = ["SessionStart", *allowed, *([] if COMMITMENT in allowed else [COMMITMENT])]
    transitions = []
    for message_type in allowed:
        if message_type == COMMITMENT:
            continue
        node = dict(each)   # the compiler only reads the template's nested values: share them
        node["message"] = message_type
        transitions.append(node)
        spec["payloads"][message_type] = "opaque"
    spec["transitions"] = transitions
    if not allowed:
        spec["unlisted_messages"]["accept"] = every
    elif COMMITMENT not in allowed:
        spec["commitment"]["from"] = []

    # The template is the runtime's own (tests validate it); only message type names come from the
    # caller, so the schema pass (linear but slow: 45 s for 40,000 types) is skipped.
    compiled = compile_spec(spec, f"{TEMPLATE} (for {descriptor.mode!r})", validate=False)
    registered = core_pb2.ModeDescriptor()
    registered.CopyFrom(descriptor)
    compiled.descriptor = registered
    return compiled
