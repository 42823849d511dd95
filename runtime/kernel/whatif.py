"""WhatIfReplay (current.md §15; RFC-MACP-0012 §8.1): a session's recorded history judged again under
a candidate governance policy, beside the same history judged under the policy it was bound to.

Both replays run the session's accepted envelopes, in log order, through the compiled mode the
session started with (the interpreter's `evaluate` judges, `apply` changes a scratch Session) — the same
code that judged them live, so this is a replay, not a second implementation of the rules. They use
the recorded senders and clocks, apply the recorded lifecycle records (suspend, resume, cancel, TTL
expiry) where they stand, and touch nothing: no store, no registry, no broadcast, no metrics; the real
session is only read.

Kernel-side (no grpc): errors are `WhatIfError(code, message)` for the transport to map.
"""
from __future__ import annotations

import dataclasses
import json

from macp.v1 import policy_pb2

from ..specs.hooks.context import Reject
from ..specs.hooks.policy_rules import BoundPolicy
from ..storage import ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL
from ..storage.base import is_terminal_checkpoint
from ..vocabulary.errors import MacpError
from ..vocabulary.session import EXPIRED, OPEN, RESOLVED, Session
from . import interpreter
from .checkpoints import read_snapshot
from .records import mode_error
from .recovery import apply_lifecycle

Kinds = policy_pb2.WhatIfEntryOutcome
APPLIED, NOT_OPEN, REFUSED, NO_SESSION = Kinds.KIND_APPLIED, Kinds.KIND_NOT_OPEN, Kinds.KIND_REFUSED, Kinds.KIND_NO_SESSION
UNSPECIFIED_STATE = 0
PREFIX = "INVALID_POLICY_DEFINITION: "


class WhatIfError(Exception):
    """A refused WhatIfReplay: `code` is the registry code, `message` the status text."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


# --- candidate admission (§15.2 step 6) --------------------------------------------------------------

def admit_candidate(candidate, session_mode: str, policies) -> BoundPolicy:
    """The candidate descriptor checked like a registration (RegisterPolicy's admission of the
    current line) without the id-level checks — reserved and taken ids do not apply to a descriptor
    that is never registered — then bound like a SessionStart would bind it. Raises
    WhatIfError(INVALID_POLICY_DEFINITION)."""
    error, rules = policies.admit(candidate.policy_id, candidate.mode, candidate.rules, candidate.schema_version,
                                  registering=False)
    if error is not None:
        raise _invalid(error)
    if candidate.mode != "*" and candidate.mode != session_mode:
        raise _invalid(f"candidate policy mode '{candidate.mode}' does not match session mode '{session_mode}'")
    return BoundPolicy(candidate.policy_id, candidate.mode, candidate.description, rules, candidate.schema_version)


def _invalid(text: str) -> WhatIfError:
    return WhatIfError("INVALID_POLICY_DEFINITION", text if text.startswith(PREFIX) else PREFIX + text)


# --- the replay (§15.3) ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Outcome:
    kind: int
    state: int
    error_code: str = ""
    details: bytes = b""

    def key(self):
        return self.kind, self.state, self.error_code, self.details

    def proto(self) -> policy_pb2.WhatIfEntryOutcome:
        return policy_pb2.WhatIfEntryOutcome(kind=self.kind, state=self.state, error_code=self.error_code,
                                             details=self.details)


@dataclasses.dataclass
class _Final:
    state: int = UNSPECIFIED_STATE
    resolution: bytes = b""
    index: int = 0
    message_id: str = ""
    message_type: str = ""

    def proto(self) -> policy_pb2.WhatIfOutcome:
        return policy_pb2.WhatIfOutcome(state=self.state, resolution=self.resolution,
                                        resolved_by_history_index=self.index, resolved_by_message_id=self.message_id,
                                        resolved_by_message_type=self.message_type)


def _refused(exc: MacpError, state: int, profile) -> _Outcome:
    """The code and details the Ack would carry (POLICY_DENIED details shaped as this process's Acks)."""
    details = profile.error_details(exc)
    return _Outcome(REFUSED, state, exc.code, details)


def _replay(engine, records, policy: BoundPolicy, recorded_id: str) -> tuple[list[_Outcome], _Final]:
    """One side-effect-free replay: an outcome per accepted envelope, and the final outcome."""
    outcomes: list[_Outcome] = []
    final = _Final()
    start_rec = records[0]
    session: Session | None = None
    try:
        session = engine.scratch_session(start_rec, policy, recorded_id)
    except MacpError as exc:
        outcomes.append(_refused(exc, UNSPECIFIED_STATE, engine.profile))
        session = None
    else:
        session.seen.add(start_rec.message_id)
        outcomes.append(_Outcome(APPLIED, session.status))
    for rec in records[1:]:
        if rec.kind == ENTRY_KIND_INCOMING:
            index = len(outcomes)
            if session is None:
                outcomes.append(_Outcome(NO_SESSION, UNSPECIFIED_STATE))
                continue
            if session.status == OPEN and rec.received_at_ms > session.deadline_ms:
                session.status = EXPIRED   # the kernel would have expired it on this arrival
            if session.status != OPEN:
                outcomes.append(_Outcome(NOT_OPEN, session.status))
                continue
            if rec.message_id in session.seen:   # cannot happen in a recorded history; judged as the kernel would
                outcomes.append(_Outcome(APPLIED, session.status))
                continue
            try:   # as the kernel's replay judges it (recorded time, runtime-written implicit accepts)
                plan, runtime_written = engine.judge_logged(session, rec)
            except Reject as exc:
                outcomes.append(_refused(mode_error(exc), session.status, engine.profile))   # as the engine's Ack
                continue
            session.seen.add(rec.message_id)
            if not runtime_written:
                session.note_activity(rec.sender, rec.received_at_ms)
            resolution = interpreter.apply(session, plan)
            if resolution is not None:
                session.resolution = resolution
                session.status = RESOLVED
                final = _Final(RESOLVED, resolution, index, rec.message_id, rec.message_type)
            outcomes.append(_Outcome(APPLIED, session.status))
        elif rec.kind == ENTRY_KIND_INTERNAL and session is not None:
            apply_lifecycle(session, rec)
    if session is not None:
        final.state = session.status
        if session.status != RESOLVED:
            final = _Final(session.status)
    return outcomes, final


def compacted_base(engine, session_id: str) -> int:
    """How many leading accepted envelopes the store no longer holds (§8.2): those its first record,
    a terminal checkpoint, stands for."""
    try:
        records = engine.store.history(session_id)
    except Exception:
        return 0
    if records and is_terminal_checkpoint(records[0]):
        try:
            return len(read_snapshot(records[0].payload).seen_message_ids)
        except Exception:
            return 0
    return 0


def what_if(engine, session: Session, candidate) -> policy_pb2.WhatIfReplayResponse:
    """§15.2 steps 6–7 and §15.3 for a session the caller may read (steps 1–5 are the transport's)."""
    bound = admit_candidate(candidate, session.mode, engine.policies)
    records = engine.complete_history(session)
    if records is None:
        base = compacted_base(engine, session.session_id)
        raise WhatIfError("HISTORY_UNAVAILABLE",
                          f"HISTORY_UNAVAILABLE: session history before ordinal {base} was compacted; "
                          "WhatIfReplay needs the complete accepted history")
    recorded_policy = session.policy
    recorded_id = session.policy_version
    if recorded_policy is None:   # cannot happen for a bound session; judged under the registry's copy
        recorded_policy = engine.policies.bind(recorded_id, session.mode)[0]
    recorded, recorded_final = _replay(engine, records, recorded_policy, recorded_id)
    trial, trial_final = _replay(engine, records, bound, recorded_id)
    response = policy_pb2.WhatIfReplayResponse(candidate_policy_id=candidate.policy_id,
                                               recorded_policy_id=recorded_id,
                                               recorded=recorded_final.proto(), candidate=trial_final.proto())
    incoming = [r for r in records if r.kind == ENTRY_KIND_INCOMING]
    for index, (rec, mine, theirs) in enumerate(zip(incoming, recorded, trial)):
        response.entries.add(history_index=index, message_id=rec.message_id, message_type=rec.message_type,
                             recorded=mine.proto(), candidate=theirs.proto())
        if not response.HasField("first_divergence") and mine.key() != theirs.key():
            response.first_divergence = index
        if theirs.kind == REFUSED and theirs.error_code == "POLICY_DENIED":
            response.denials.add(history_index=index, message_id=rec.message_id, details=theirs.details)
    return response


def describe(response: policy_pb2.WhatIfReplayResponse) -> dict:
    """A JSON-friendly summary (the operator CLI's --json output)."""
    def outcome(o):
        return {"state": _state(o.state), "resolved_by_history_index": o.resolved_by_history_index,
                "resolved_by_message_id": o.resolved_by_message_id,
                "resolved_by_message_type": o.resolved_by_message_type}

    def entry_outcome(o):
        out = {"kind": Kinds.Kind.Name(o.kind).removeprefix("KIND_"), "state": _state(o.state)}
        if o.error_code:
            out["error_code"] = o.error_code
        if o.details:
            out["details"] = _details(o.details)
        return out

    return {
        "candidate_policy_id": response.candidate_policy_id,
        "recorded_policy_id": response.recorded_policy_id,
        "recorded": outcome(response.recorded),
        "candidate": outcome(response.candidate),
        "first_divergence": response.first_divergence if response.HasField("first_divergence") else None,
        "denials": [{"history_index": d.history_index, "message_id": d.message_id, "details": _details(d.details)}
                    for d in response.denials],
        "entries": [{"history_index": e.history_index, "message_id": e.message_id, "message_type": e.message_type,
                     "recorded": entry_outcome(e.recorded), "candidate": entry_outcome(e.candidate)}
                    for e in response.entries],
    }


def _state(state: int) -> str:
    from macp.v1 import envelope_pb2

    return envelope_pb2.SessionState.Name(state).removeprefix("SESSION_STATE_")


def _details(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
