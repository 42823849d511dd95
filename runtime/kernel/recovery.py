"""Recovery and replay: a session rebuilt from its logged records, the one path used by start-up
recovery, a shared store's catch-up with other instances' records (coordination) and WhatIfReplay
(`judge_logged`). Replay judges each logged envelope again through the interpreter and the session's compiled mode, at
its recorded acceptance time, under the rules of the revision the session was accepted under."""
from __future__ import annotations

import gc
import logging
from functools import partial
from typing import Callable

from ..registries import profile as profiles
from ..registries.policies import PolicyRegistry
from ..specs.hooks.context import Reject
from ..specs.hooks.policy_rules import BoundPolicy
from ..storage import ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, LogRecord, Store
from ..storage.records_pb2 import ENTRY_KIND_CHECKPOINT
from ..vocabulary.session import CANCELLED, EXPIRED, OPEN, SUSPENDED, TERMINAL, Session
from . import interpreter
from .checkpoints import CheckpointSchedule, has_terminal_checkpoint
from .checkpoints import restore as restore_checkpoint
from .records import resolve, resume
from .starts import Starts
from .table import SessionTable

log = logging.getLogger("macp_runtime.engine")


def judge_logged(session: Session, rec: LogRecord):
    """Judge a logged envelope as replay does (also WhatIfReplay): at its recorded acceptance time,
    a runtime-written record (implicit accept) recognised as such. (plan, runtime_written), or
    raises Reject; changes nothing."""
    session.accepted_at_ms = rec.received_at_ms
    reserved = profiles.RESERVED_MESSAGE_ID_PREFIXES.get((session.semantics_rev, session.mode)) \
        if session.semantics_rev else None
    session.runtime_message = runtime_written = bool(reserved and rec.message_id.startswith(reserved))
    try:
        plan = interpreter.evaluate(session.compiled, session, rec.sender, rec.message_type, rec.payload,
                                    rec.timestamp_unix_ms)
    finally:
        session.runtime_message = False
    return plan, runtime_written


def replay_record(session: Session, rec: LogRecord, strict: bool = True) -> None:
    """Apply one logged record: during replay (checkpoints before the last one are skipped), or a
    record another instance appended (`strict=False`: it is durable whatever this instance thinks)."""
    if rec.kind == ENTRY_KIND_INCOMING:
        if session.status == OPEN:
            try:
                plan, runtime_written = judge_logged(session, rec)
            except Reject as exc:
                if strict:
                    raise ValueError(f"replay of {rec.message_type} {rec.message_id!r} was refused: {exc}") from None
                log.error("session %s: %s %r from another instance does not apply here: %s",
                          session.session_id, rec.message_type, rec.message_id, exc)
                session.seen.add(rec.message_id)
                return
            if not runtime_written:
                session.note_activity(rec.sender, rec.received_at_ms)
            resolution = interpreter.apply(session, plan)
            if resolution is not None:
                resolve(session, resolution, rec.message_type, rec.payload, rec.received_at_ms)
        session.seen.add(rec.message_id)
    elif rec.kind == ENTRY_KIND_INTERNAL:
        apply_lifecycle(session, rec)


def apply_lifecycle(session: Session, rec: LogRecord) -> None:
    """A recorded lifecycle record (expiry, cancel, suspend, resume), applied where the session's state still
    allows it. Recovery replays a log in which it always does; what-if replay (whatif.py) a re-judged
    history in which the session may have ended earlier, so the record no longer applies."""
    kind = rec.message_type
    if kind == "TtlExpired" and session.status in (OPEN, SUSPENDED):
        session.status = EXPIRED
        session.suspended_at_ms = None
    elif kind == "SessionCancel" and session.status not in TERMINAL:
        session.status = CANCELLED
        session.suspended_at_ms = None
    elif kind == "SessionSuspend" and session.status == OPEN:
        session.status = SUSPENDED
        session.suspended_at_ms = rec.received_at_ms
    elif kind == "SessionResume" and session.status == SUSPENDED:
        # the deadline follows the recorded suspend and resume times
        resume(session, max(0, rec.received_at_ms - session.suspended_at_ms))


class Recovery:
    def __init__(self, store: Store, table: SessionTable, starts: Starts, policies: PolicyRegistry,
                 checkpoints: CheckpointSchedule):
        self.store = store
        self._table = table
        self._starts = starts
        self._policies = policies
        self._checkpoints = checkpoints
        self._policy_cache: dict[str, BoundPolicy] = {}    # binding JSON -> policy, during recovery

    def replay_session(self, session_id: str, records: list[LogRecord],
                       fallback: Callable[[], list[LogRecord]] | None = None) -> tuple[Session, bool]:
        """(the session rebuilt from its history, whether it came from a checkpoint): restored from the
        last checkpoint, then the records after it applied. When that checkpoint cannot be restored,
        `fallback()` (if given) supplies the whole history, which is replayed from its SessionStart
        instead. Raises (ValueError, MacpError, ...) when the history does not replay."""
        last = next((i for i in range(len(records) - 1, -1, -1) if records[i].kind == ENTRY_KIND_CHECKPOINT), None)
        if last is not None:
            try:
                session = restore_checkpoint(session_id, records[last], self._starts.compiled_for, self._policy_for)
            except Exception as exc:
                if fallback is None:
                    raise ValueError(f"its checkpoint cannot be restored: {exc}") from None
                log.warning("session %s: its checkpoint cannot be restored (%s); replaying its messages",
                            session_id, exc)
                records = fallback()
            else:
                for rec in records[last + 1:]:
                    replay_record(session, rec)
                session.log_length = len(records)
                return session, True
        first = next((i for i, r in enumerate(records)
                      if r.kind == ENTRY_KIND_INCOMING and r.message_type == "SessionStart"), None)
        if first is None:
            raise ValueError("history has no SessionStart" + (" (and its checkpoint is unusable)" if last is not None
                                                              else ""))
        start_rec = records[first]
        bound = self._bound_policy(start_rec.policy_binding) if start_rec.policy_binding else None
        session = self._starts.logged_session(start_rec, bound, session_id)
        session.seen.add(start_rec.message_id)
        session.log_length = len(records)
        for rec in records[first + 1:]:
            replay_record(session, rec)
        return session, False

    def recover(self, strict: bool) -> tuple[int, int]:
        """A store of one instance: rebuild every stored session, from its last checkpoint when it has
        one, else by replaying its history. Returns (recovered, failed). Terminal sessions that had no
        terminal checkpoint get one written in the background; then the store may start its own
        maintenance."""
        # Recovery allocates hundreds of thousands of long-lived objects and frees none: cyclic GC
        # passes over them would cost about a third of the time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            recovered, failed, from_checkpoint, missing = self._recover_sessions(strict)
        finally:
            if collecting:
                gc.enable()
            self._policy_cache.clear()
        if recovered:
            log.info("recovery: %d sessions, %d of them from a checkpoint without replaying messages; "
                     "%d terminal sessions get a checkpoint now", recovered, from_checkpoint, len(missing))
        for session in missing:
            self._checkpoints.terminal(session)
        self.store.start_maintenance()
        return recovered, failed

    def _recover_sessions(self, strict: bool) -> tuple[int, int, int, list[Session]]:
        recovered = failed = from_checkpoint = 0
        missing: list[Session] = []
        sessions = self._table.sessions
        checkpoints = self._checkpoints.enabled
        for session_id, records in self.store.replay():
            try:
                session, restored = self.replay_session(session_id, records,
                                                        fallback=partial(self.store.full_history, session_id))
            except Exception as exc:  # one bad session must not keep the others down
                failed += 1
                log.warning("session %s could not be recovered: %s", session_id, exc)
                if strict:
                    raise
                continue
            sessions[session_id] = session
            recovered += 1
            if restored:
                from_checkpoint += 1
            if checkpoints and session.status in TERMINAL and (
                    not restored or not has_terminal_checkpoint(records)):
                missing.append(session)
        return recovered, failed, from_checkpoint, missing

    def _bound_policy(self, definition: str) -> BoundPolicy:
        policy = self._policy_cache.get(definition)
        if policy is None:
            policy = self._policy_cache[definition] = BoundPolicy.from_json(definition)
        return policy

    def _policy_for(self, definition: str, policy_version: str, mode: str) -> BoundPolicy:
        if definition:
            return self._bound_policy(definition)
        return self._policies.bind(policy_version, mode)[0]
