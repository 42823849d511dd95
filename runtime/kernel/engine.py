"""The session kernel: knows sessions, dedup, TTLs, the commit point and error codes — no mode.

`Engine` is the facade the transport, the console, what-if replay and receipts call. It builds its
parts once, each with what it uses passed in, and runs a session message itself:

    starts.py        SessionStart's checks, new and replayed Session objects
    table.py         the session table: lookup, open-session limit, eviction
    commit.py        the commit point: append (deferred or not), Pending
    coordination.py  one instance (LocalCoordination) or several over a shared store (shared.py):
                     chosen here, once; every session call runs through it
    fanout.py        subscribers, observers, lifecycle events and signals
    control.py       checked lookup, expiry, Cancel/Suspend/Resume
    recovery.py      replay of logged records: recovery, shared catch-up, WhatIfReplay
    checkpoints.py   checkpoints and when they are written
    sweeper.py       the background expiry and eviction pass

Every mode decision is delegated to the interpreter (interpreter.py) running the session's CompiledMode
(`evaluate` judges without changing anything, `apply` swaps the judged state in after the record is
durable). Sessions are serialised by
their own lock; the session table lock is held only for lookups and inserts, never across a disk write.
"""
from __future__ import annotations

import logging
from typing import Callable

from ..registries import profile as profiles
from ..registries.modes import ModeRegistry
from ..registries.policies import PolicyRegistry
from ..registries.profile import Profile
from ..specs.hooks.context import Reject
from ..storage import LogRecord, StorageError, Store
from ..storage.base import AppendConflict
from ..vocabulary.errors import Kind, MacpError
from ..vocabulary.identity import Identity
from ..vocabulary.session import OPEN, Session, now_ms
from . import access, interpreter
from .checkpoints import CheckpointSchedule
from .commit import CommitPoint
from .control import Control
from .coordination import Bus, Coordination, LocalCoordination
from .fanout import Event, Fanout
from .metrics import NO_METRICS
from .records import Outcome, incoming, mode_error, not_found, resolve, unknown_session
from .recovery import Recovery, judge_logged
from .shared import SharedCoordination
from .starts import DEFAULT_CLOCK_SKEW_MS, Starts
from .sweeper import Sweeper
from .table import DEFAULT_RETENTION_MS, SessionTable

log = logging.getLogger("macp_runtime.engine")


class Engine:
    def __init__(self, modes: ModeRegistry, policies: PolicyRegistry, store: Store,
                 clock: Callable[[], int] = now_ms, profile: Profile | None = None, *,
                 metrics=NO_METRICS, spec_archive=None, receipts=None, bus: Bus | None = None,
                 checkpoint_interval: int = 0, clock_skew_ms: int = DEFAULT_CLOCK_SKEW_MS,
                 retention_ms: int = DEFAULT_RETENTION_MS):
        """profile: the protocol profile new sessions are accepted under (a session keeps the revision
        it was accepted under); in-process users default to v0.4.0, the daemon to `current`.
        metrics: kernel/metrics.py (NO_METRICS: off); spec_archive: SpecArchive of a durable runtime;
        receipts: receipts.Receipts (keys and issuer); bus: a shared store's notification bus;
        checkpoint_interval: MACP_CHECKPOINT_INTERVAL (0 = off); clock_skew_ms: MACP_CLOCK_SKEW_MS;
        retention_ms: MACP_SESSION_RETENTION_SECS in ms (also `start_sweeper`'s)."""
        self.profile = profile = profile or profiles.v040()
        self.modes = modes
        self.policies = policies
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.receipts = receipts
        self.spec_archive = spec_archive   # read by the transport: archives a new mode's spec off the loop
        shared = store.shared
        self.commit = commit = CommitPoint(store, metrics, defers=store.defers and not shared)
        self.table = table = SessionTable(store, clock, evict_cancelled=profile.evict_cancelled,
                                          retention_ms=retention_ms)
        self.fanout = fanout = Fanout(table.get, commit.deferred, metrics)
        # Checkpoints (checkpoints.py): written to a durable store of one instance only.
        self.checkpoints = CheckpointSchedule(store, commit.append, clock, enabled=store.durable and not shared,
                                              interval=checkpoint_interval)
        self.starts = starts = Starts(modes, policies, profile, spec_archive, clock_skew_ms)
        self.recovery = recovery = Recovery(store, table, starts, policies, self.checkpoints)
        self.coordination: Coordination = (
            SharedCoordination(store, table, commit, recovery, fanout, bus) if shared  # type: ignore[arg-type]
            else LocalCoordination(store, table, commit, recovery))
        self.control = control = Control(table, self.coordination, fanout, self.checkpoints, clock)
        self._sweeper = Sweeper(table, self.coordination, clock, control.expire, self._emit_due_synthetic,
                                fanout.closing)
        self._append = self.coordination.append
        self._publish = fanout.publish
        self._emit = fanout.emit
        self._expire = control.expire
        self._get = table.get

        # The facade: what the callers use, bound once (no indirection on the way).
        self.shared = shared
        self.signal_relay = self.coordination.signal_relay   # None, or forwards a Signal to other instances
        self.defers = commit.defers
        self.set_deferring, self.pending = commit.set_deferring, commit.pending
        self.lookup, self.get_session = control.lookup, control.get_session
        self.cancel_session, self.suspend_session = control.cancel_session, control.suspend_session
        self.resume_session = control.resume_session
        self.lifecycle, self.signals, self.closing = fanout.lifecycle, fanout.signals, fanout.closing
        self.subscribe, self.unsubscribe = fanout.subscribe, fanout.unsubscribe
        self.unsubscribe_settled = fanout.unsubscribe_settled
        self.add_observer, self.remove_observer = fanout.add_observer, fanout.remove_observer
        self.register_stream, self.unregister_stream = fanout.register_stream, fanout.unregister_stream
        self.sessions = table.all
        self.peek = self.find = table.find     # the session in memory as it is: no expiry, nothing loaded
        self.refresh_sessions = self.coordination.refresh
        self.sweep = self._sweeper.sweep
        self.flush_checkpoints = self.checkpoints.flush
        self.scratch_session, self.start_of = starts.scratch_session, starts.start_of

    may_read = staticmethod(access.may_read)
    judge_logged = staticmethod(judge_logged)

    @property
    def observers(self) -> tuple:
        return self.fanout.observers

    # --- SessionStart (§5.2) ---------------------------------------------------------------------

    def start_session(self, env, identity: Identity) -> Outcome:
        session_id = env.session_id
        if not self.profile.valid_session_id(session_id):
            raise MacpError(Kind.InvalidSessionId, detail=f"session id {session_id!r} is not a UUID v4/v7 or base64url")
        coordination, starts = self.coordination, self.starts
        try:
            compiled, start = starts.check(env.mode, env.payload, self.profile)
        except MacpError as exc:   # shared: maybe registered through another instance a moment ago
            if exc.kind is not Kind.UnknownMode or not coordination.reload(self.modes):
                raise
            compiled, start = starts.check(env.mode, env.payload, self.profile)
        now = self.clock()
        try:
            return self._start(env, identity, compiled, start, now)
        except MacpError as exc:   # shared: a policy registered through another instance a moment ago
            if exc.kind is not Kind.UnknownPolicyVersion or not coordination.reload(self.policies):
                raise
            return self._start(env, identity, compiled, start, now)

    def _start(self, env, identity: Identity, compiled, start, now: int) -> Outcome:
        """The first append of an id wins (across instances too: see the coordination's append_start)."""
        session_id = env.session_id
        table, coordination = self.table, self.coordination
        previous = None   # the incarnation and length this start replaces (shared store)
        while True:
            with table.lock:
                existing = table.get(session_id)
                if existing is None:
                    table.check_open_limit(identity.sender, identity.max_open_sessions)
                    deadline = self.starts.deadline_base(env.timestamp_unix_ms, now) + start.ttl_ms
                    session = self.starts.new_session(session_id, compiled, identity.sender, start, now, deadline)
                    session.lock.acquire()
                    table.sessions[session_id] = session
            if existing is not None:
                # Another start of this id is in flight or done: its outcome decides ours.
                outcome, previous = coordination.existing_start(existing, env.message_id, now)
                if outcome is not None:
                    return outcome
                continue
            record = incoming(env, identity.sender, now)
            record.policy_binding = session.policy.to_json()
            record.semantics_rev = session.semantics_rev
            record.bound_max_suspend_ms = session.suspend_cap_ms
            try:
                archive = self.starts.spec_archive
                record.mode_spec_digest = archive.ensure(compiled) if archive is not None else ""
                coordination.append_start(session, record, previous)
            except AppendConflict:   # another instance started this id first
                table.drop(session)
                session.lock.release()
                coordination.taken(session_id)
                continue
            except StorageError as exc:   # the spec text could not be archived
                table.drop(session)
                session.lock.release()
                raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
            except MacpError:
                table.drop(session)
                session.lock.release()
                raise
            session.seen.add(env.message_id)
            try:
                self._publish(session, env)
                self._emit(Event.CREATED, session, now)
            finally:
                session.lock.release()
            log.info("session created", extra={"fields": {"session_id": session_id, "mode": compiled.name,
                                                          "initiator": identity.sender}})
            return Outcome(False, session.status)

    # --- session messages (§5.4) -----------------------------------------------------------------

    def process_message(self, env, identity: Identity) -> Outcome:
        return self.coordination.locked(env.session_id, self._get(env.session_id), unknown_session,
                                        self._process_locked, env, identity)

    def _process_locked(self, session: Session, env, identity: Identity) -> Outcome:
        if env.message_id in session.seen:
            return Outcome(True, session.status)
        if env.mode != session.mode:
            raise MacpError(Kind.InvalidEnvelope, detail=f"envelope mode {env.mode!r} is not the session's")
        now = self.clock()
        if session.status == OPEN and now > session.deadline_ms:
            self._expire(session, now)
            raise MacpError(Kind.TtlExpired, detail="the session's TTL has passed")
        if session.status != OPEN:
            raise MacpError(Kind.SessionNotOpen, detail="the session is not open")
        if self.modes.get(session.mode) is None:
            raise MacpError(Kind.UnknownMode, detail=f"mode {session.mode!r} is no longer registered")
        if session.semantics_rev:
            reserved = profiles.RESERVED_MESSAGE_ID_PREFIXES.get((session.semantics_rev, session.mode))
            if reserved is not None and env.message_id.startswith(reserved):
                raise MacpError(Kind.InvalidEnvelope, detail=f"message ids starting {reserved!r} are the runtime's")
            synthesize = profiles.synthesizer(session.semantics_rev, session.mode)
            if synthesize is not None and interpreter.may_send(session.compiled, session, identity.sender,
                                                               env.message_type):
                # after the trigger's authorisation, before its validation (current.md §12.4)
                for synthetic in synthesize(session, now):
                    if synthetic.message_id not in session.seen:
                        self._accept_synthetic(session, synthetic)
        compiled = session.compiled
        sender = identity.sender
        session.accepted_at_ms = now
        try:
            plan = interpreter.evaluate(compiled, session, sender, env.message_type, env.payload, env.timestamp_unix_ms)
        except Reject as exc:
            raise mode_error(exc) from None
        self._append(session, incoming(env, sender, now))  # the commit point
        session.seen.add(env.message_id)
        session.note_activity(sender, now)
        resolution = interpreter.apply(session, plan)
        if resolution is not None:
            resolve(session, resolution, env.message_type, env.payload, now)
            self.checkpoints.terminal(session)
            log.info("session resolved", extra={"fields": {"session_id": session.session_id, "mode": session.mode,
                                                            "by": sender}})
        self._publish(session, env)
        if resolution is not None:
            self._emit(Event.RESOLVED, session, now)
        elif self.checkpoints.interval:
            self.checkpoints.after_message(session, now)
        return Outcome(False, session.status)

    def _emit_due_synthetic(self, now: int) -> None:
        """Eager emission (current.md §12.4 SHOULD, one instance only: see LocalCoordination.before_sweep):
        each open session of a revision and mode with a synthesizer gets the envelopes due by now, under
        its lock, as a trigger would."""
        for session in self.table.all():
            if not session.semantics_rev or session.status != OPEN or now > session.deadline_ms:
                continue
            synthesize = profiles.synthesizer(session.semantics_rev, session.mode)
            if synthesize is None:
                continue
            with session.lock:
                if session.gone or session.status != OPEN:
                    continue
                try:
                    for synthetic in synthesize(session, now):
                        if synthetic.message_id not in session.seen:
                            self._accept_synthetic(session, synthetic)
                except MacpError as exc:
                    log.warning("sweep: could not record a runtime envelope of session %s: %s",
                                session.session_id, exc)

    def _accept_synthetic(self, session: Session, env) -> None:
        """An envelope the runtime writes itself (an implicit handoff accept, current.md §12.4): judged
        by the mode as any envelope, recorded at its own timestamp, published; no participant activity."""
        session.runtime_message = True
        session.accepted_at_ms = env.timestamp_unix_ms
        try:
            plan = interpreter.evaluate(session.compiled, session, env.sender, env.message_type, env.payload,
                                        env.timestamp_unix_ms)
        except Reject as exc:
            log.error("session %s: the runtime's %s %r was refused: %s", session.session_id, env.message_type,
                      env.message_id, exc)
            return
        finally:
            session.runtime_message = False
        self._append(session, incoming(env, env.sender, env.timestamp_unix_ms))
        session.seen.add(env.message_id)
        interpreter.apply(session, plan)
        self._publish(session, env)

    # --- reads ---------------------------------------------------------------------------------------

    def readable_sessions(self, identity: Identity) -> list[Session]:
        """ListSessions / WatchSessions: the sessions this identity may read."""
        return access.visible(self.table.all(), identity)

    def subscribe_with_history(self, session: Session, subscriber) -> list[LogRecord]:
        """Subscribe and snapshot the history in one step under the session lock: the subscriber then
        gets every later envelope live and none of the snapshot's (no gap, no duplicate)."""
        return self.coordination.locked_fresh(session.session_id, session, not_found, self._subscribe_locked,
                                              subscriber)

    def _subscribe_locked(self, session: Session, subscriber) -> list[LogRecord]:
        self.fanout.subscribe(session.session_id, subscriber)
        records = self.coordination.history(session)
        subscriber.discard_before(len(records))
        return records

    def complete_history(self, session: Session) -> list[LogRecord] | None:
        """The session's whole history from its SessionStart, read consistently under its lock (for
        WhatIfReplay), or None when the store no longer holds its beginning (compacted)."""
        return self.coordination.locked_fresh(session.session_id, session, not_found, self._complete_locked)

    def _complete_locked(self, session: Session) -> list[LogRecord] | None:
        return self.coordination.complete_history(session)

    # --- start-up and shutdown -------------------------------------------------------------------------

    def recover(self, strict: bool = False) -> tuple[int, int]:
        """Rebuild every stored session (recovery.py; a shared store: coordination then follows the
        other instances). Returns (recovered, failed)."""
        return self.coordination.recover(strict)

    def start_sweeper(self, interval_s: float, retention_s: float) -> None:
        """Run `sweep` now and then every `interval_s` seconds until `close()`."""
        self.table.retention_ms = int(retention_s * 1000)
        self._sweeper.start(interval_s)

    def close(self) -> None:
        """Server shutdown: stop the sweep and end every watch and session stream."""
        self.fanout.close()
        for registry in (self.modes, self.policies):
            close = getattr(registry, "close", None)
            if close is not None:
                close()
        self.fanout.end_streams()
        self._sweeper.join(5)
        self.checkpoints.close()   # what is queued is written before the store closes
