"""The in-memory record of one session. Slotted: a runtime holds hundreds of thousands of them."""
from __future__ import annotations

import threading
import time

from macp.v1 import envelope_pb2

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
EXPIRED = envelope_pb2.SESSION_STATE_EXPIRED
SUSPENDED = envelope_pb2.SESSION_STATE_SUSPENDED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
TERMINAL = frozenset({RESOLVED, EXPIRED, CANCELLED})

MAX_SUSPEND_MS = 604_800_000
SMALL_GROUP = 16


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Session:
    __slots__ = (
        "session_id", "mode", "compiled", "status", "phase", "state",
        "initiator", "participants", "participant_set", "mode_version", "configuration_version",
        "policy_version", "policy", "intent", "context_id", "extension_keys", "ttl_ms",
        "started_at_ms", "deadline_ms", "seen", "activity", "resolution",
        "suspended_at_ms", "accumulated_suspended_ms", "lock", "gone", "log_length", "incarnation",
        "semantics_rev", "suspend_cap_ms", "accepted_at_ms", "runtime_message", "suspensions",
        "commitment",
    )

    def __init__(self, session_id: str, compiled, initiator: str, start_payload, policy, started_at_ms: int,
                 deadline_ms: int, effective_policy_version: str):
        self.session_id = session_id
        self.mode = compiled.name
        # The compiled mode the session started with: later spec changes never alter its rules.
        self.compiled = compiled
        self.status = OPEN
        self.phase = compiled.initial_phase
        self.initiator = initiator
        self.participants = tuple(start_payload.participants)
        # Membership tests: a small tuple is as fast as a set and a third of its size.
        self.participant_set = (self.participants if len(self.participants) <= SMALL_GROUP
                                else frozenset(self.participants))
        self.mode_version = start_payload.mode_version
        self.configuration_version = start_payload.configuration_version
        self.policy_version = effective_policy_version
        self.policy = policy
        self.intent = start_payload.intent
        self.context_id = start_payload.context_id
        self.extension_keys = tuple(start_payload.extensions.keys()) if start_payload.extensions else ()
        self.ttl_ms = start_payload.ttl_ms
        self.started_at_ms = started_at_ms
        self.deadline_ms = deadline_ms
        self.seen: set[str] = set()
        self.activity: dict[str, list] | None = None   # sender -> [count, last_ms]; created lazily
        self.resolution: bytes | None = None
        # The binding Commitment once one resolved the session: (payload bytes as accepted, acceptance
        # time in ms). What a decision receipt is built from (runtime/receipts.py).
        self.commitment: tuple[bytes, int] | None = None
        self.suspended_at_ms: int | None = None
        self.accumulated_suspended_ms = 0
        self.lock = threading.Lock()
        self.gone = False          # set when a SessionStart failed to become durable
        self.log_length = 0
        self.incarnation = 0       # a shared store's incarnation number of this session id (1, 2, …)
        # The protocol revision the session was accepted under (runtime/profile.py) and the suspension
        # cap bound at its start: both recorded with the SessionStart, never re-read from the process.
        self.semantics_rev = 0
        self.suspend_cap_ms = MAX_SUSPEND_MS
        # While a message is judged: the server time it is being accepted at, and whether the runtime
        # itself wrote it (a synthesized implicit accept, current.md §12.4). Hooks may read both.
        self.accepted_at_ms = 0
        self.runtime_message = False
        self.suspensions: tuple = ()   # completed (suspended_at, resumed_at) pairs, current line only
        self.state = compiled.initial_state(self)

    def note_activity(self, sender: str, at_ms: int) -> None:
        if self.activity is None:
            self.activity = {}
        entry = self.activity.get(sender)
        if entry is None:
            self.activity[sender] = [1, at_ms]
        else:
            entry[0] += 1
            entry[1] = at_ms
