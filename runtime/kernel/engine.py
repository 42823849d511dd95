"""The session kernel: knows sessions, dedup, TTLs, the commit point and error codes — no mode.

Every mode decision is delegated to the interpreter (interpreter.py) running the session's CompiledMode
(`evaluate` judges without changing anything, `apply` changes state after the record is durable). Sessions are serialised by their own
lock; the session table lock is held only for lookups and inserts, never across a disk write.

Everything that watches the kernel is fed from here, after the commit point and under the session's
lock (so per session the order is the log's order):
* stream channels: per session id, the subscribers (StreamSession) that get each accepted envelope;
  a session nobody watches has no channel at all, so publishing to it is one failed dict lookup;
* `lifecycle`: CREATED / RESOLVED / EXPIRED / SUSPENDED / RESUMED / CANCELLED for WatchSessions;
* `signals`: accepted Signals and Progress for WatchSignals (the service publishes those).
A background sweep expires overdue sessions and evicts old terminal ones (runtime.md §5.6, §5.9).
"""
from __future__ import annotations

import gc
import logging
import threading
from time import perf_counter
from typing import Callable, NamedTuple

from macp.v1 import core_pb2, envelope_pb2

from ..registries import profile as profiles
from ..registries.modes import ModeRegistry
from ..registries.policies import PolicyRegistry
from ..registries.profile import Profile
from ..specs.hooks.common import is_blank
from ..specs.hooks.context import Reject
from ..specs.hooks.policy_rules import BoundPolicy, commitment_authority_allows
from ..storage import ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, LogRecord, StorageError, Store
from ..storage.base import AppendConflict, is_terminal_checkpoint
from ..storage.records_pb2 import ENTRY_KIND_CHECKPOINT
from ..vocabulary.broadcast import Broadcaster
from ..vocabulary.errors import NOT_FOUND, PERMISSION_DENIED, Kind, MacpError, StatusError
from ..vocabulary.session import CANCELLED, EXPIRED, OPEN, RESOLVED, SUSPENDED, TERMINAL, Session, now_ms
from . import access, interpreter
from .auth import Identity
from .checkpoints import Checkpointer, checkpoint_record
from .checkpoints import restore as restore_checkpoint
from .metrics import NO_METRICS

log = logging.getLogger("macp_runtime.engine")

MAX_TTL_MS = 86_400_000
MAX_PARTICIPANTS = 1000
MAX_PARTICIPANT_NAME = 256
RUNTIME_SENDER = "_runtime"
LIFECYCLE_CAPACITY = 64     # runtime.md §8.8
SIGNAL_CAPACITY = 256       # runtime.md §6
CHECKPOINT_LINGER_S = 0.01  # a terminal checkpoint waits this long for a foreground fdatasync to share

_Event = core_pb2.SessionLifecycleEvent
CREATED, RESOLVED_EVENT, EXPIRED_EVENT = _Event.EVENT_TYPE_CREATED, _Event.EVENT_TYPE_RESOLVED, _Event.EVENT_TYPE_EXPIRED
SUSPENDED_EVENT, RESUMED_EVENT, CANCELLED_EVENT = (_Event.EVENT_TYPE_SUSPENDED, _Event.EVENT_TYPE_RESUMED,
                                                   _Event.EVENT_TYPE_CANCELLED)
EVICTABLE = frozenset({RESOLVED, EXPIRED})
DEFAULT_RETENTION_MS = 3_600_000
DEFAULT_CLOCK_SKEW_MS = 30_000
# The lifecycle event a status reached through another instance's record announces.
_EVENT_OF_STATUS = {RESOLVED: RESOLVED_EVENT, EXPIRED: EXPIRED_EVENT, CANCELLED: CANCELLED_EVENT,
                    SUSPENDED: SUSPENDED_EVENT, OPEN: RESUMED_EVENT}


class _Stale(Exception):
    """A conditional append found that another instance had advanced the session (shared store).
    The session has been caught up; the caller judges the message again."""


class Accepted:
    """An accepted envelope as a session's subscribers get it (`subscriber.offer(index, accepted)`).
    `wire` is the transport's cache of its encoding, so N subscribers cost one encoding."""

    __slots__ = ("envelope", "wire")

    def __init__(self, envelope):
        self.envelope = envelope
        self.wire = None


class Pending:
    """A record appended without waiting for its fdatasync (`Engine.deferring`): what must follow the
    commit point (fan-out, lifecycle events, the ack) waits for `settle`, which the store's writer
    calls in log order."""

    __slots__ = ("effects", "error", "settled", "waiters")

    def __init__(self):
        self.effects: list = []
        self.error = None
        self.settled = False
        self.waiters: list = []

    def defer(self, fn, *args) -> None:
        """Run fn(*args) once durable (now if it already is; never if the write failed)."""
        with _PENDING_LOCK:
            if not self.settled:
                self.effects.append((fn, args))
                return
        if self.error is None:
            fn(*args)

    def when_settled(self, callback) -> None:
        """callback(error or None), from the writer's thread, or now when already settled."""
        with _PENDING_LOCK:
            if not self.settled:
                self.waiters.append(callback)
                return
        callback(self.error)

    def settle(self, error) -> None:
        with _PENDING_LOCK:
            self.error = error
            self.settled = True
            effects, self.effects = self.effects, ()
            waiters, self.waiters = self.waiters, ()
        if error is None:
            for fn, args in effects:
                fn(*args)
        for callback in waiters:
            callback(error)


_PENDING_LOCK = threading.Lock()


class Outcome(NamedTuple):
    duplicate: bool
    state: int


class Engine:
    def __init__(self, modes: ModeRegistry, policies: PolicyRegistry, store: Store,
                 clock: Callable[[], int] = now_ms, profile: Profile | None = None):
        # The protocol profile new sessions are accepted under (runtime/profile.py); a session keeps
        # the revision it was accepted under. In-process users default to v0.4.0; the daemon's
        # default (MACP_PROTOCOL_PROFILE) is `current`.
        self.profile = profile or profiles.v040()
        self._evictable = EVICTABLE | {CANCELLED} if self.profile.evict_cancelled else EVICTABLE   # §7
        self.modes = modes
        self.policies = policies
        self.store = store
        self.clock = clock
        self._sessions: dict[str, Session] = {}
        self._table_lock = threading.Lock()
        # session id -> subscribers (copy-on-write tuple); only ids somebody watches have an entry.
        self._channels: dict[str, tuple] = {}
        self._channel_lock = threading.Lock()
        self.lifecycle = Broadcaster(LIFECYCLE_CAPACITY)   # items: (event type, Session, observed_at_ms)
        self.signals = Broadcaster(SIGNAL_CAPACITY)        # items: WatchSignalsResponse
        self._streams: set = set()                         # open streams, told when the engine closes
        self._streams_lock = threading.Lock()
        self.closing = threading.Event()
        self._sweeper: threading.Thread | None = None
        self.metrics = NO_METRICS                          # replaced by the server when metrics are on
        self.spec_archive = None                           # SpecArchive of a durable runtime
        # Several instances over one shared store (PostgreSQL): see "multi-instance" below.
        self.shared = store.shared                          # a SharedStore (storage/base.py)
        self.retention_ms = DEFAULT_RETENTION_MS
        self._evicted: dict[str, int] = {}                 # shared: id -> incarnation evicted here
        self.cluster = None                                # ClusterBus (runtime/cluster.py) when shared
        self.receipts = None                               # receipts.Receipts: keys and issuer (server.py)
        # Checkpoints (runtime/checkpoints.py): written to a durable store of one instance only.
        self.checkpoints = store.durable and not self.shared
        self.checkpoint_interval = 0                       # MACP_CHECKPOINT_INTERVAL (0 = off)
        self._checkpointer = Checkpointer(self._write_terminal_checkpoints)
        self._policy_cache: dict[str, BoundPolicy] = {}    # binding JSON -> policy, during recovery
        self._restored_from_checkpoint = False             # what the last _replay_session did
        # Read-only observers (the browser console): told of every accepted envelope and lifecycle
        # event, after the commit point and under the session's lock. They must never block.
        self.observers: tuple = ()
        # Deferred commit (see `deferring`): a thread that sets it appends without waiting.
        self.defers = store.defers and not self.shared
        self._local = threading.local()
        self._pending: dict[str, Pending] = {}             # session id -> its latest record not yet durable
        self._pending_lock = threading.Lock()
        self.clock_skew_ms = DEFAULT_CLOCK_SKEW_MS         # MACP_CLOCK_SKEW_MS

    def deadline_base(self, timestamp_ms: int, received_ms: int) -> int:
        """Where a session's TTL starts: the server's receive time, which the envelope's timestamp may
        move by at most `clock_skew_ms` (MACP_CLOCK_SKEW_MS) either way. A client clock cannot make
        a session that never expires, nor a deadline outside int64."""
        if not timestamp_ms:
            return received_ms
        skew = self.clock_skew_ms
        return min(max(timestamp_ms, received_ms - skew), received_ms + skew)

    # --- SessionStart (§5.2) ---------------------------------------------------------------------

    def start_session(self, env, identity: Identity) -> Outcome:
        session_id = env.session_id
        if not self.profile.valid_session_id(session_id):
            raise MacpError(Kind.InvalidSessionId, detail=f"session id {session_id!r} is not a UUID v4/v7 or base64url")
        try:
            compiled, start = self._check_start(env.mode, env.payload, self.profile)
        except MacpError as exc:   # shared: maybe registered through another instance a moment ago
            if not (self.shared and exc.kind is Kind.UnknownMode and self._reload_registry(self.modes)):
                raise
            compiled, start = self._check_start(env.mode, env.payload, self.profile)
        now = self.clock()
        if self.shared:
            try:
                return self._start_shared(env, identity, compiled, start, now)
            except MacpError as exc:
                if exc.kind is not Kind.UnknownPolicyVersion or not self._reload_registry(self.policies):
                    raise
                return self._start_shared(env, identity, compiled, start, now)
        while True:
            with self._table_lock:
                existing = self._sessions.get(session_id)
                if existing is None:
                    self._check_open_limit(identity)
                    session = self._new_session(session_id, compiled, identity.sender, start, now,
                                                self.deadline_base(env.timestamp_unix_ms, now) + start.ttl_ms)
                    session.lock.acquire()
                    self._sessions[session_id] = session
                    break
            # Another start of this id is in flight or done: its outcome decides ours.
            with existing.lock:
                if existing.gone:
                    continue
                if env.message_id in existing.seen:
                    return Outcome(True, existing.status)
                raise MacpError(Kind.SessionAlreadyExists, detail=f"session {session_id!r} already exists")
        record = _incoming(env, identity.sender, now)
        record.policy_binding = session.policy.to_json()
        record.semantics_rev = session.semantics_rev
        record.bound_max_suspend_ms = session.suspend_cap_ms
        try:
            record.mode_spec_digest = self.spec_archive.ensure(compiled) if self.spec_archive else ""
            self._append(session, record)
        except StorageError as exc:   # the spec text could not be archived
            with self._table_lock:
                self._sessions.pop(session_id, None)
            session.gone = True
            session.lock.release()
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        except MacpError:
            with self._table_lock:
                self._sessions.pop(session_id, None)
            session.gone = True
            session.lock.release()
            raise
        session.seen.add(env.message_id)
        try:
            self._publish(session, env)
            self._emit(CREATED, session, now)
        finally:
            session.lock.release()
        log.info("session created", extra={"fields": {"session_id": session_id, "mode": compiled.name,
                                                      "initiator": identity.sender}})
        return Outcome(False, session.status)

    def _check_start(self, mode_name: str, raw: bytes, prof: Profile):
        """The kernel's SessionStart checks under the rules of `prof` (the revision being accepted or replayed)."""
        compiled = self.modes.get(mode_name)
        if compiled is None:
            raise MacpError(Kind.UnknownMode, detail=f"mode {mode_name!r} is not registered")
        if not raw:
            raise MacpError(Kind.InvalidPayload, detail="SessionStart needs a SessionStartPayload")
        try:
            start = core_pb2.SessionStartPayload.FromString(raw)
        except Exception:
            raise MacpError(Kind.InvalidPayload, detail="SessionStart payload does not decode") from None
        if compiled.strict_start:
            if not 1 <= start.ttl_ms <= MAX_TTL_MS:
                raise MacpError(Kind.InvalidTtl, detail=f"ttl_ms {start.ttl_ms} outside 1..{MAX_TTL_MS}")
            if is_blank(start.mode_version) or is_blank(start.configuration_version):
                raise MacpError(Kind.InvalidPayload, detail="mode_version and configuration_version are required")
            participants = start.participants
            if not participants and compiled.name not in prof.empty_roster_modes:
                raise MacpError(Kind.InvalidPayload, detail="participants must not be empty")
            if len(participants) > MAX_PARTICIPANTS:
                raise MacpError(Kind.InvalidPayload, detail=f"at most {MAX_PARTICIPANTS} participants")
            trimmed = set()
            for p in participants:
                t = p.strip()
                if is_blank(p) or t in trimmed:
                    raise MacpError(Kind.InvalidPayload, detail="participants must be non-blank and unique")
                trimmed.add(t)
            if prof.honour_max_suspend_ms and start.max_suspend_ms < 0:
                raise MacpError(Kind.InvalidPayload, detail="max_suspend_ms must not be negative")
        if len(start.participants) > MAX_PARTICIPANTS or any(len(p) > MAX_PARTICIPANT_NAME for p in start.participants):
            raise MacpError(Kind.InvalidPayload, detail=f"at most {MAX_PARTICIPANTS} participants of at most "
                                                        f"{MAX_PARTICIPANT_NAME} characters each")
        if compiled.version and start.mode_version and start.mode_version != compiled.version:
            raise MacpError(Kind.InvalidEnvelope,
                            detail=f"mode_version {start.mode_version!r} differs from {compiled.version!r}")
        if not 1 <= start.ttl_ms <= MAX_TTL_MS:
            raise MacpError(Kind.InvalidTtl, detail=f"ttl_ms {start.ttl_ms} outside 1..{MAX_TTL_MS}")
        return compiled, start

    def _check_open_limit(self, identity: Identity) -> None:
        cap = identity.max_open_sessions
        if cap is None:
            return
        now = self.clock()
        count = sum(1 for s in self._sessions.values()
                    if s.initiator == identity.sender and s.status == OPEN and now <= s.deadline_ms)
        if count >= cap:
            raise MacpError(Kind.RateLimited, detail=f"{identity.sender} already has {count} open sessions")

    def _new_session(self, session_id, compiled, initiator, start, started_at, deadline,
                     bound: BoundPolicy | None = None, prof: Profile | None = None,
                     suspend_cap_ms: int = 0, effective_id: str | None = None) -> Session:
        if bound is None:
            policy, effective = self.policies.bind(start.policy_version, compiled.name)
        else:  # replay: the binding recorded at the start, whatever the registry holds today
            policy, effective = bound, effective_id or bound.policy_id
        try:
            session = Session(session_id, compiled, initiator, start, policy, started_at, deadline, effective)
            prof = prof or self.profile
            if prof.bind_descriptor_mode_version and not start.mode_version and compiled.version:
                session.mode_version = compiled.version   # current.md §5.2 (non-strict extensions only)
            session.semantics_rev = prof.semantics_rev
            session.suspend_cap_ms = suspend_cap_ms or prof.suspend_cap(start.max_suspend_ms)
            interpreter.check_start(compiled, session)
        except Reject as exc:
            raise _mode_error(exc) from None
        except Exception as exc:   # a start or initial-state hook failed: refused, nothing written
            raise MacpError(Kind.InvalidModeState, detail=f"a SessionStart hook of {compiled.name} failed: "
                                                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return session

    # --- session messages (§5.4) -----------------------------------------------------------------

    def process_message(self, env, identity: Identity) -> Outcome:
        session = self._sessions.get(env.session_id)
        if self.shared:
            return self._shared(env.session_id, session, lambda s: self._process_locked(s, env, identity),
                                _unknown_session)
        if session is None:
            raise _unknown_session(env.session_id)
        with session.lock:
            return self._process_locked(session, env, identity)

    def _process_locked(self, session: Session, env, identity: Identity) -> Outcome:
        if session.gone:
            raise _unknown_session(env.session_id)
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
            raise _mode_error(exc) from None
        self._append(session, _incoming(env, sender, now))  # the commit point
        session.seen.add(env.message_id)
        session.note_activity(sender, now)
        resolution = interpreter.apply(session, plan)
        if resolution is not None:
            _resolve(session, resolution, env.message_type, env.payload, now)
            self._terminal(session)
            log.info("session resolved", extra={"fields": {"session_id": session.session_id, "mode": session.mode,
                                                            "by": sender}})
        self._publish(session, env)
        if resolution is not None:
            self._emit(RESOLVED_EVENT, session, now)
        elif self.checkpoint_interval:
            self._interval_checkpoint(session, now)
        return Outcome(False, session.status)

    def _emit_due_synthetic(self, now: int) -> None:
        """Eager emission (current.md §12.4 SHOULD): on every sweep, each open session of a revision
        and mode with a synthesizer gets the envelopes due by now, under its lock, as a trigger would."""
        if self.shared:
            return   # several instances: only triggers synthesize (the conditional append decides)
        for session in self.sessions():
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
        self._append(session, _incoming(env, env.sender, env.timestamp_unix_ms))
        session.seen.add(env.message_id)
        interpreter.apply(session, plan)
        self._publish(session, env)

    # --- lookups and session RPCs ----------------------------------------------------------------

    def lookup(self, session_id: str) -> Session:
        """Checked lookup: lazily expires an overdue session. NOT_FOUND when unknown."""
        session = self._sessions.get(session_id)
        if self.shared:
            return self._shared(session_id, session, self._lookup_locked, _not_found, fresh=True)
        if session is None or session.gone:
            raise _not_found(session_id)
        with session.lock:
            try:
                self._lazy_expire(session, self.clock())
            except MacpError:
                log.warning("could not record the expiry of session %s", session_id)
        return session

    may_read = staticmethod(access.may_read)

    def peek(self, session_id: str) -> Session | None:
        """The session in memory under this id, if any (no expiry, no store round trip)."""
        session = self._sessions.get(session_id)
        return None if session is None or session.gone else session

    def readable_sessions(self, identity: Identity) -> list[Session]:
        """ListSessions / WatchSessions: the sessions this identity may read."""
        return access.visible(self.sessions(), identity)

    def get_session(self, session_id: str, identity: Identity) -> Session:
        session = self.lookup(session_id)
        if not self.may_read(session, identity):
            raise StatusError(PERMISSION_DENIED, "FORBIDDEN: session access denied")
        return session

    def _controlled(self, session_id: str, identity: Identity, verb: str) -> Session:
        """The prelude of Cancel/Suspend/Resume (runtime.md §5.7): checked lookup, then authority."""
        session = self.lookup(session_id)
        sender = identity.sender
        if sender != session.initiator and not commitment_authority_allows(
                session.policy, session.initiator, session.participant_set, sender):
            raise StatusError(PERMISSION_DENIED,
                              f"FORBIDDEN: only the session initiator or policy-delegated roles can {verb}")
        return session

    def _locked(self, session: Session, body):
        """body(session) under the session's lock (shared store: against its latest log, see `_shared`)."""
        if self.shared:
            return self._shared(session.session_id, session, body, _not_found)
        with session.lock:
            return body(session)

    def cancel_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        sender = identity.sender

        def cancel(session: Session) -> Outcome:
            if session.gone:
                raise _not_found(session_id)
            now = self.clock()
            if session.status == OPEN and now > session.deadline_ms:
                self._expire(session, now)
            if session.status in TERMINAL:
                return Outcome(False, session.status)
            payload = core_pb2.SessionCancelPayload(reason=reason, cancelled_by=sender).SerializeToString()
            self._append(session, _internal(session, "SessionCancel", payload, now))
            session.status = CANCELLED
            session.suspended_at_ms = None
            self._terminal(session)
            self._emit(CANCELLED_EVENT, session, now)
            log.info("session %s cancelled by %s", session_id, sender)
            return Outcome(False, session.status)

        return self._locked(self._controlled(session_id, identity, "cancel"), cancel)

    def suspend_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        def suspend(session: Session) -> Outcome:
            if session.gone:
                raise _not_found(session_id)
            now = self.clock()
            self._lazy_expire(session, now)
            if session.status != OPEN:
                raise MacpError(Kind.SessionNotOpen, detail="only an open session can be suspended")
            payload = core_pb2.SessionSuspendPayload(reason=reason, suspended_by=identity.sender)
            self._append(session, _internal(session, "SessionSuspend", payload.SerializeToString(), now))
            session.status = SUSPENDED
            session.suspended_at_ms = now
            self._emit(SUSPENDED_EVENT, session, now)
            log.info("session %s suspended by %s", session_id, identity.sender)
            return Outcome(False, session.status)

        return self._locked(self._controlled(session_id, identity, "suspend"), suspend)

    def resume_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        def resume(session: Session) -> Outcome:
            if session.gone:
                raise _not_found(session_id)
            if session.status != SUSPENDED:
                raise MacpError(Kind.SessionNotOpen, detail="only a suspended session can be resumed")
            now = self.clock()
            banked = max(0, now - session.suspended_at_ms)
            # The record's banked_ms: the suspended duration (v0.4.0), or the TTL remaining at suspend
            # (current.md §7, RFC-MACP-0001 §7.5). Replay derives the deadline from the recorded times.
            recorded = (max(0, session.deadline_ms - session.suspended_at_ms)
                        if profiles.for_rev(session.semantics_rev).resume_records_remaining_ttl else banked)
            payload = core_pb2.SessionResumePayload(reason=reason, resumed_by=identity.sender, banked_ms=recorded)
            self._append(session, _internal(session, "SessionResume", payload.SerializeToString(), now))
            if _resume(session, banked):
                self._emit(RESUMED_EVENT, session, now)
                log.info("session %s resumed by %s after %d ms", session_id, identity.sender, banked)
                return Outcome(False, session.status)
            self._terminal(session)
            self._emit(EXPIRED_EVENT, session, now)
            log.info("session %s expired: suspended for more than 7 days in total", session_id)
            raise MacpError(Kind.SessionNotOpen, detail="the session was suspended for more than 7 days in total")

        return self._locked(self._controlled(session_id, identity, "resume"), resume)

    def sessions(self) -> list[Session]:
        with self._table_lock:
            return list(self._sessions.values())

    # --- sweep and eviction (§5.6, §5.9) ---------------------------------------------------------

    def sweep(self, retention_ms: int) -> tuple[int, int]:
        """Expire OPEN sessions past their deadline, then evict RESOLVED/EXPIRED sessions that started
        more than `retention_ms` ago. Returns (expired, evicted)."""
        expired = evicted = 0
        if self.shared:
            self.refresh_sessions()
        now = self.clock()
        self._emit_due_synthetic(now)
        for session in self.sessions():
            if session.status != OPEN or now <= session.deadline_ms:
                continue
            with session.lock:
                if session.gone or session.status != OPEN or now <= session.deadline_ms:
                    continue
                try:
                    self._expire(session, now)
                    expired += 1
                except _Stale:   # another instance got there first (expired it, or a message came in time)
                    pass
                except MacpError:
                    log.warning("sweep: could not record the expiry of session %s", session.session_id)
        cutoff = now - retention_ms
        for session in self.sessions():
            if session.status in self._evictable and session.started_at_ms < cutoff and self._evict(session):
                evicted += 1
        if expired or evicted:
            log.info("sweep: %d sessions expired, %d evicted from memory", expired, evicted)
        return expired, evicted

    def _evict(self, session: Session) -> bool:
        with session.lock:
            if session.gone or session.status not in self._evictable:
                return False
            with self._table_lock:
                if self._sessions.get(session.session_id) is not session:
                    return False
                # Before the id becomes free: a new incarnation must not lose its index to this.
                self.store.release(session.session_id)
                del self._sessions[session.session_id]
                if self.shared:   # refresh_sessions must not load it back
                    self._evicted[session.session_id] = session.incarnation
            session.gone = True
        return True

    def start_sweeper(self, interval_s: float, retention_s: float) -> None:
        """Run `sweep` now and then every `interval_s` seconds until `close()`."""
        self.retention_ms = int(retention_s * 1000)
        def loop():
            while not self.closing.is_set():
                try:
                    self.sweep(int(retention_s * 1000))
                except Exception:  # the sweep must outlive one bad pass
                    log.exception("sweep failed")
                if self.closing.wait(interval_s):
                    return

        self._sweeper = threading.Thread(target=loop, name="sweeper", daemon=True)
        self._sweeper.start()

    # --- watchers ----------------------------------------------------------------------------------

    def subscribe(self, session_id: str, subscriber) -> None:
        """Live envelopes of `session_id` from now on go to `subscriber.offer(index, response)`."""
        with self._channel_lock:
            current = self._channels.get(session_id, ())
            if subscriber not in current:
                self._channels[session_id] = current + (subscriber,)

    def unsubscribe(self, session_id: str, subscriber) -> None:
        with self._channel_lock:
            current = self._channels.get(session_id)
            if current and subscriber in current:
                rest = tuple(s for s in current if s is not subscriber)
                if rest:
                    self._channels[session_id] = rest
                else:
                    del self._channels[session_id]

    def unsubscribe_settled(self, session_id: str, subscriber) -> None:
        """Unsubscribe, then wait until no publish to the session is still offering to it (a publish
        runs under the session's lock): afterwards nothing more reaches the subscriber."""
        self.unsubscribe(session_id, subscriber)
        session = self._sessions.get(session_id)
        if session is not None:
            with session.lock:
                pass

    def subscribe_with_history(self, session: Session, subscriber) -> list[LogRecord]:
        """Subscribe and snapshot the history in one step under the session lock: the subscriber then
        gets every later envelope live and none of the snapshot's (no gap, no duplicate)."""
        if self.shared:
            return self._shared(session.session_id, session,
                                lambda s: self._subscribe_shared(s, subscriber), _not_found, fresh=True)
        with session.lock:
            if session.gone:
                raise _not_found(session.session_id)
            self.subscribe(session.session_id, subscriber)
            try:
                records = self.store.history(session.session_id)
            except StorageError as exc:
                raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
            subscriber.discard_before(len(records))
            return records

    def _publish(self, session: Session, env) -> None:
        """Called under the session lock right after the envelope's record became durable (or, for a
        deferring caller, was queued: then delivered once durable, in log order)."""
        pending = self._deferred(session)
        if pending is not None:
            pending.defer(self._deliver, session, session.log_length - 1, env)
        else:
            self._deliver(session, session.log_length - 1, env)

    def _deliver(self, session: Session, index: int, env) -> None:
        if self.observers:
            for observer in self.observers:
                observer.accepted(session, index, env)
        subscribers = self._channels.get(session.session_id)
        if not subscribers:
            return
        item = Accepted(env)   # one object for every subscriber: the transport encodes it once
        for sub in subscribers:
            if not sub.offer(index, item):
                self.unsubscribe(session.session_id, sub)

    def _emit(self, event: int, session: Session, now: int) -> None:
        pending = self._deferred(session)
        if pending is not None:
            pending.defer(self._announce, event, session, now)
        else:
            self._announce(event, session, now)

    def _announce(self, event: int, session: Session, now: int) -> None:
        self.metrics.session_event(event)
        if self.observers:
            for observer in self.observers:
                observer.lifecycle(event, session, now)
        if len(self.lifecycle):
            self.lifecycle.publish((event, session, now))

    def add_observer(self, observer) -> None:
        """`observer.accepted(session, index, env)` and `observer.lifecycle(event, session, now)` from
        now on (see `observers`)."""
        with self._channel_lock:
            if observer not in self.observers:
                self.observers = self.observers + (observer,)

    def remove_observer(self, observer) -> None:
        with self._channel_lock:
            self.observers = tuple(o for o in self.observers if o is not observer)

    def find(self, session_id: str) -> Session | None:
        """The session in memory as it is, for read-only views: no expiry is recorded, nothing loaded."""
        session = self._sessions.get(session_id)
        return None if session is None or session.gone else session

    def register_stream(self, stream) -> None:
        with self._streams_lock:
            self._streams.add(stream)
        if self.closing.is_set():
            stream.shutdown()

    def unregister_stream(self, stream) -> None:
        with self._streams_lock:
            self._streams.discard(stream)

    def close(self) -> None:
        """Server shutdown: stop the sweep and end every watch and session stream."""
        self.closing.set()
        self.lifecycle.close()
        self.signals.close()
        for registry in (self.modes, self.policies):
            close = getattr(registry, "close", None)
            if close is not None:
                close()
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()
        if self._sweeper is not None:
            self._sweeper.join(5)
        self._checkpointer.close()   # what is queued is written before the store closes

    # --- storage ---------------------------------------------------------------------------------

    # --- deferred commit ----------------------------------------------------------------------------
    #
    # The transport runs the kernel on its event loop and must not wait there for an fdatasync. While
    # a thread is `deferring`, `_append` queues the record (`store.append_deferred`) and the session's
    # in-memory state moves on at once (the session lock keeps per-session order; the log keeps global
    # order); fan-out and lifecycle events wait for the record's durability (`Pending`), and so does
    # the caller's ack (`pending(session_id)`). A failed deferred write stops the store (a restart
    # replays what is durable).

    def set_deferring(self, on: bool) -> None:
        self._local.on = on

    def pending(self, session_id: str) -> Pending | None:
        """The session's latest record not yet durable (an ack about this session waits for it)."""
        pending = self._pending.get(session_id)
        return None if pending is None or pending.settled else pending

    def _deferred(self, session: Session) -> Pending | None:
        if not getattr(self._local, "on", False):
            return None
        pending = self._pending.get(session.session_id)
        return None if pending is None or pending.settled else pending

    def _append_deferred(self, session: Session, record: LogRecord) -> None:
        pending = Pending()
        session_id = session.session_id
        started = perf_counter()

        def settled(index, error):
            if error is None:
                self.metrics.append_done(perf_counter() - started)
            pending.settle(error)
            with self._pending_lock:
                if self._pending.get(session_id) is pending:
                    del self._pending[session_id]
        try:
            self.store.append_deferred(record, settled)
        except StorageError as exc:
            log.error("storage append failed for session %s: %s", session_id, exc)
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        with self._pending_lock:
            self._pending[session_id] = pending
        session.log_length += 1

    def _append(self, session: Session, record: LogRecord) -> None:
        if self.defers and getattr(self._local, "on", False):
            return self._append_deferred(session, record)
        started = perf_counter()
        try:
            if self.shared:   # only if nobody else appended since we last looked (the commit point)
                index = self.store.append(record, expect=(session.incarnation, session.log_length))
            else:
                index = self.store.append(record)
            self.metrics.append_done(perf_counter() - started)
        except AppendConflict:
            self._catch_up(session)
            raise _Stale(session.session_id) from None
        except StorageError as exc:
            log.error("storage append failed for session %s: %s", session.session_id, exc)
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        session.log_length = index + 1

    def _lazy_expire(self, session: Session, now: int) -> None:
        """OPEN past the deadline, or SUSPENDED for more than 7 days in total -> EXPIRED (§5.6)."""
        if session.status == OPEN:
            if now > session.deadline_ms:
                self._expire(session, now)
        elif session.status == SUSPENDED:
            if session.accumulated_suspended_ms + (now - session.suspended_at_ms) > session.suspend_cap_ms:
                self._expire(session, now)

    def _expire(self, session: Session, now: int) -> None:
        self._append(session, _internal(session, "TtlExpired", b"", now))
        session.status = EXPIRED
        session.suspended_at_ms = None
        self._terminal(session)
        self._emit(EXPIRED_EVENT, session, now)
        log.info("session %s expired", session.session_id)

    # --- multi-instance (shared store) ------------------------------------------------------------
    #
    # With a shared store (PostgreSQL) several instances serve the same sessions. Each instance keeps
    # its own in-memory copy of the sessions it has touched; the log in the store is the truth. An
    # append names the (incarnation, length) the copy has, so it succeeds only if nobody appended
    # since (the commit point, one round trip); otherwise `_append` catches the copy up with what it
    # missed (applied through the same compiled mode, published to this instance's subscribers in log
    # order) and the message is judged again. An accepted append proves the copy was current; a
    # refusal or a duplicate might come from a stale copy, so it is checked against the log once
    # before it is answered. Every index of a session passes through `_publish` here exactly once,
    # under the session's lock, whether this instance or another one appended it.

    def _shared(self, session_id: str, session: Session | None, body, missing, fresh: bool = False):
        """body(session) under the session's lock against the latest log (see above). `missing`
        builds the error for an id the store does not know; `fresh` catches up before judging."""
        checked = False
        while True:
            if session is None or session.gone:
                session = self._sessions.get(session_id)
                if session is None or session.gone:
                    session = self._shared_load(session_id)[0]
                    checked = True
                if session is None:
                    raise missing(session_id)
            with session.lock:
                if session.gone:
                    continue
                if fresh and not checked:
                    checked = True
                    self._catch_up(session)
                    if session.gone:
                        continue
                try:
                    result = body(session)
                except _Stale:
                    checked = True
                    continue
                except (MacpError, StatusError):
                    if checked:
                        raise
                    checked = True
                    if self._catch_up(session):
                        continue
                    raise
                if checked or not getattr(result, "duplicate", False):
                    return result
                checked = True
                if not self._catch_up(session):
                    return result

    @staticmethod
    def _reload_registry(registry) -> bool:
        """Read a shared registry again before refusing a name it lacks (the change notification
        from the instance that registered it may still be on its way). True when reloaded."""
        reload = getattr(registry, "reload", None)
        if reload is None:
            return False
        try:
            reload()
        except Exception as exc:
            log.warning("could not reload a registry: %s", exc)
            return False
        return True

    def _lookup_locked(self, session: Session) -> Session:
        try:
            self._lazy_expire(session, self.clock())
        except MacpError:
            log.warning("could not record the expiry of session %s", session.session_id)
        return session

    def _catch_up(self, session: Session) -> bool:
        """Under the session's lock: apply what other instances appended since this copy was current.
        True when anything changed. A newer incarnation replaces the copy (the old one is `gone`)."""
        try:
            incarnation, records, replaced = self.store.since(session.session_id, session.incarnation,
                                                              session.log_length)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        if replaced:
            fresh = self._replay_shared(session.session_id, incarnation, records)
            with self._table_lock:
                if self._sessions.get(session.session_id) is session:
                    if fresh is None:
                        del self._sessions[session.session_id]
                    else:
                        self._sessions[session.session_id] = fresh
            session.gone = True
            if fresh is not None:
                self._emit(CREATED, fresh, fresh.started_at_ms)
            return True
        for record in records:
            self._apply_logged(session, record)
        return bool(records)

    def _apply_logged(self, session: Session, rec: LogRecord) -> None:
        """One record another instance appended, applied as `_replay_session` applies it, then
        published and announced like a local one."""
        before = session.status
        self._replay_record(session, rec, strict=False)
        session.log_length += 1
        if rec.kind == ENTRY_KIND_INCOMING:
            self._publish(session, record_envelope(rec))
        if session.status != before:
            self._emit(_EVENT_OF_STATUS[session.status], session, rec.received_at_ms)

    def _replay_shared(self, session_id: str, incarnation: int, records: list[LogRecord]) -> Session | None:
        try:
            session = self._replay_session(session_id, records)
        except Exception as exc:
            log.warning("session %s could not be loaded from the shared store: %s", session_id, exc)
            return None
        if session is not None:
            session.incarnation = incarnation
            session.log_length = len(records)
        return session

    def _shared_load(self, session_id: str) -> tuple[Session | None, bool]:
        """The session from the store into the table: (session or None when unknown, newly inserted)."""
        try:
            loaded = self.store.load(session_id)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        if loaded is None:
            return None, False
        session = self._replay_shared(session_id, *loaded)
        if session is None:
            return None, False
        with self._table_lock:
            current = self._sessions.get(session_id)
            if current is not None and not current.gone:
                return current, False   # loaded meanwhile by another thread
            self._sessions[session_id] = session
            self._evicted.pop(session_id, None)
        return session, True

    def _start_shared(self, env, identity: Identity, compiled, start, now: int) -> Outcome:
        """SessionStart over a shared store: the first append of an id wins across instances."""
        session_id = env.session_id
        previous = (0, 0)   # the incarnation this start replaces: (0, 0) = the id was never used
        while True:
            with self._table_lock:
                existing = self._sessions.get(session_id)
                if existing is None:
                    self._check_open_limit(identity)
                    session = self._new_session(session_id, compiled, identity.sender, start, now,
                                                self.deadline_base(env.timestamp_unix_ms, now) + start.ttl_ms)
                    session.lock.acquire()
                    self._sessions[session_id] = session
            if existing is not None:
                outcome, previous = self._start_against(existing, env, now)
                if outcome is not None:
                    return outcome
                continue
            record = _incoming(env, identity.sender, now)
            record.policy_binding = session.policy.to_json()
            record.semantics_rev = session.semantics_rev
            record.bound_max_suspend_ms = session.suspend_cap_ms
            started = perf_counter()
            try:
                record.mode_spec_digest = self.spec_archive.ensure(compiled) if self.spec_archive else ""
                self.store.append(record, expect=previous)
                self.metrics.append_done(perf_counter() - started)
            except (AppendConflict, StorageError) as exc:
                with self._table_lock:
                    if self._sessions.get(session_id) is session:
                        del self._sessions[session_id]
                session.gone = True
                session.lock.release()
                if isinstance(exc, StorageError):
                    raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
                if self._shared_load(session_id)[0] is None:
                    raise MacpError(Kind.StorageFailed, detail="the session id is taken but cannot be loaded") from None
                continue
            session.incarnation = previous[0] + 1
            session.log_length = 1
            session.seen.add(env.message_id)
            try:
                self._publish(session, env)
                self._emit(CREATED, session, now)
            finally:
                session.lock.release()
            return Outcome(False, session.status)

    def _start_against(self, existing: Session, env, now: int) -> tuple[Outcome | None, tuple[int, int]]:
        """A SessionStart for an id in the table: (outcome, _) when it is decided, else (None, the
        incarnation a new start must replace)."""
        with existing.lock:
            if existing.gone:
                return None, (0, 0)
            self._catch_up(existing)
            if existing.gone:
                return None, (0, 0)
            if env.message_id in existing.seen:
                return Outcome(True, existing.status), (0, 0)
            if existing.status in self._evictable and existing.started_at_ms < now - self.retention_ms:
                # Past its retention anywhere: the id may begin its next incarnation.
                with self._table_lock:
                    if self._sessions.get(existing.session_id) is existing:
                        del self._sessions[existing.session_id]
                existing.gone = True
                return None, (existing.incarnation, existing.log_length)
        raise MacpError(Kind.SessionAlreadyExists, detail=f"session {existing.session_id!r} already exists")

    def _subscribe_shared(self, session: Session, subscriber) -> list[LogRecord]:
        """Under the lock of a caught-up session: subscribe, and read the history up to the length
        this copy has; later records reach the subscriber through `_publish` (no gap, no duplicate)."""
        self.subscribe(session.session_id, subscriber)
        try:
            records = self.store.history_upto(session.session_id, session.incarnation, session.log_length)
        except StorageError as exc:
            raise MacpError(Kind.StorageFailed, detail=str(exc)) from None
        subscriber.discard_before(len(records))
        return records

    def refresh_sessions(self) -> None:
        """Shared store: load the sessions other instances started, catch up those that moved on
        (ListSessions, WatchSessions and the sweep see every instance's sessions)."""
        if not self.shared:
            return
        try:
            overview = self.store.overview()
        except StorageError as exc:
            log.warning("could not list the shared sessions: %s", exc)
            return
        missing = []
        for session_id, incarnation, length in overview:
            session = self._sessions.get(session_id)
            if session is None:
                if self._evicted.get(session_id) != incarnation:
                    missing.append(session_id)
            elif session.incarnation != incarnation or session.log_length != length:
                with session.lock:
                    if not session.gone:
                        self._catch_up(session)
        if not missing:
            return
        try:
            loaded = self.store.load_many(missing)
        except StorageError as exc:
            log.warning("could not load shared sessions: %s", exc)
            return
        for session_id, (incarnation, records) in loaded.items():
            session = self._replay_shared(session_id, incarnation, records)
            if session is None:
                continue
            with self._table_lock:
                if session_id in self._sessions:
                    continue
                self._sessions[session_id] = session
                self._evicted.pop(session_id, None)
            self._emit(CREATED, session, session.started_at_ms)

    def remote_record(self, session_id: str, incarnation: int, index: int) -> None:
        """The store says record `index` of `session_id` was committed (by any instance). Sessions
        somebody here watches are caught up now; the others when next touched."""
        session = self._sessions.get(session_id)
        if session is not None and session.incarnation == incarnation and session.log_length > index:
            return   # this copy has it (our own append)
        if session_id not in self._channels and not len(self.lifecycle) and not self.observers:
            return
        if session is None or session.gone:
            session, inserted = self._shared_load(session_id)
            if session is not None and inserted:
                self._emit(CREATED, session, session.started_at_ms)
            return
        with session.lock:
            if not session.gone:
                self._catch_up(session)

    def watched_sessions(self) -> list[str]:
        """Ids that have stream subscribers here."""
        with self._channel_lock:
            return list(self._channels)

    def _recover_shared(self, strict: bool) -> tuple[int, int]:
        recovered = failed = 0
        for session_id, incarnation, records in self.store.replay_shared():
            try:
                session = self._replay_session(session_id, records)
            except Exception as exc:
                failed += 1
                log.warning("session %s could not be recovered: %s", session_id, exc)
                if strict:
                    raise
                continue
            if session is not None:
                session.incarnation = incarnation
                session.log_length = len(records)
                self._sessions[session_id] = session
                recovered += 1
        return recovered, failed

    # --- recovery --------------------------------------------------------------------------------

    def recover(self, strict: bool = False) -> tuple[int, int]:
        """Rebuild every stored session: from its last checkpoint when it has one, else by replaying
        its history. Returns (recovered, failed). Terminal sessions that had no terminal checkpoint
        get one written in the background; then the store may start its own maintenance."""
        if self.shared:
            return self._recover_shared(strict)
        # Recovery allocates hundreds of thousands of long-lived objects and frees none: cyclic GC
        # passes over them would cost about a third of the time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            recovered, failed, from_checkpoint, missing = self._recover_sessions(strict)
        finally:
            if collecting:
                gc.enable()
        if recovered:
            log.info("recovery: %d sessions, %d of them from a checkpoint without replaying messages; "
                     "%d terminal sessions get a checkpoint now", recovered, from_checkpoint, len(missing))
        for session in missing:
            self._checkpointer.add(session)
        self.store.start_maintenance()
        return recovered, failed

    def _recover_sessions(self, strict: bool) -> tuple[int, int, int, list[Session]]:
        recovered = failed = from_checkpoint = 0
        missing: list[Session] = []
        for session_id, records in self.store.replay():
            try:
                session = self._replay_session(session_id, records,
                                               fallback=lambda sid=session_id: self.store.full_history(sid))
            except Exception as exc:  # one bad session must not keep the others down
                failed += 1
                log.warning("session %s could not be recovered: %s", session_id, exc)
                if strict:
                    raise
                continue
            if session is not None:
                self._sessions[session_id] = session
                recovered += 1
                if self._restored_from_checkpoint:
                    from_checkpoint += 1
                if self.checkpoints and session.status in TERMINAL and (
                        not self._restored_from_checkpoint or not _has_terminal_checkpoint(records)):
                    missing.append(session)
        self._policy_cache.clear()
        return recovered, failed, from_checkpoint, missing

    def _replay_session(self, session_id: str, records: list[LogRecord], fallback=None) -> Session | None:
        """The session rebuilt from its history: restored from the last checkpoint, then the records
        after it applied. When that checkpoint cannot be restored, `fallback()` (if given) supplies
        the whole history, which is replayed from its SessionStart instead."""
        self._restored_from_checkpoint = False
        last = next((i for i in range(len(records) - 1, -1, -1) if records[i].kind == ENTRY_KIND_CHECKPOINT), None)
        if last is not None:
            try:
                session = restore_checkpoint(session_id, records[last], self._compiled_for, self._policy_for)
            except Exception as exc:
                if fallback is None:
                    raise ValueError(f"its checkpoint cannot be restored: {exc}") from None
                log.warning("session %s: its checkpoint cannot be restored (%s); replaying its messages",
                            session_id, exc)
                records = fallback()
            else:
                for rec in records[last + 1:]:
                    self._replay_record(session, rec)
                session.log_length = len(records)
                self._restored_from_checkpoint = True
                return session
        first = next((i for i, r in enumerate(records)
                      if r.kind == ENTRY_KIND_INCOMING and r.message_type == "SessionStart"), None)
        if first is None:
            raise ValueError("history has no SessionStart" + (" (and its checkpoint is unusable)" if last is not None
                                                              else ""))
        start_rec = records[first]
        compiled, start, recorded = self.start_of(start_rec)
        base = self.deadline_base(start_rec.timestamp_unix_ms, start_rec.received_at_ms)
        bound = self._bound_policy(start_rec.policy_binding) if start_rec.policy_binding else None
        session = self._new_session(session_id, compiled, start_rec.sender, start,
                                    start_rec.received_at_ms, base + start.ttl_ms, bound, recorded,
                                    start_rec.bound_max_suspend_ms)
        session.seen.add(start_rec.message_id)
        session.log_length = len(records)
        for rec in records[first + 1:]:
            self._replay_record(session, rec)
        return session

    def start_of(self, start_rec: LogRecord):
        """(compiled mode, SessionStartPayload, profile) of a logged SessionStart: the rules of the
        revision it was accepted under and of the spec it started with, not today's. Raises MacpError
        when the start is not valid (any more)."""
        recorded = profiles.for_rev(start_rec.semantics_rev)
        compiled, start = self._check_start(start_rec.mode, start_rec.payload, recorded)
        if self.spec_archive is not None:
            compiled = self.spec_archive.compiled(start_rec.mode_spec_digest, compiled)
        return compiled, start, recorded

    def scratch_session(self, start_rec: LogRecord, policy: BoundPolicy, effective_id: str) -> Session:
        """A session built from its logged SessionStart exactly as replay builds it, but bound to
        `policy` and entered nowhere (WhatIfReplay judges a candidate policy on it). Raises MacpError
        when the start is refused."""
        compiled, start, recorded = self.start_of(start_rec)
        base = self.deadline_base(start_rec.timestamp_unix_ms, start_rec.received_at_ms)
        return self._new_session(start_rec.session_id, compiled, start_rec.sender, start, start_rec.received_at_ms,
                                 base + start.ttl_ms, policy, recorded, start_rec.bound_max_suspend_ms,
                                 effective_id=effective_id)

    def complete_history(self, session: Session) -> list[LogRecord] | None:
        """The session's whole history from its SessionStart, read consistently under its lock (for
        WhatIfReplay), or None when the store no longer holds its beginning (compacted)."""
        def read(s: Session):
            if s.gone:
                raise _not_found(s.session_id)
            try:
                if self.shared:
                    records = self.store.history_upto(s.session_id, s.incarnation, s.log_length)
                    return records if records and records[0].message_type == "SessionStart" else None
                return self.store.complete_history(s.session_id)
            except StorageError as exc:
                raise MacpError(Kind.StorageFailed, detail=str(exc)) from None

        if self.shared:
            return self._shared(session.session_id, session, read, _not_found, fresh=True)
        with session.lock:
            return read(session)

    @staticmethod
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

    def _replay_record(self, session: Session, rec: LogRecord, strict: bool = True) -> None:
        """Apply one logged record: during replay (checkpoints before the last one are skipped), or a
        record another instance appended (`strict=False`: it is durable whatever this instance thinks)."""
        if rec.kind == ENTRY_KIND_INCOMING:
            if session.status == OPEN:
                try:
                    plan, runtime_written = self.judge_logged(session, rec)
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
                    _resolve(session, resolution, rec.message_type, rec.payload, rec.received_at_ms)
            session.seen.add(rec.message_id)
        elif rec.kind == ENTRY_KIND_INTERNAL:
            kind = rec.message_type
            if kind == "TtlExpired":
                session.status = EXPIRED
                session.suspended_at_ms = None
            elif kind == "SessionCancel":
                session.status = CANCELLED
                session.suspended_at_ms = None
            elif kind == "SessionSuspend" and session.status == OPEN:
                session.status = SUSPENDED
                session.suspended_at_ms = rec.received_at_ms
            elif kind == "SessionResume" and session.status == SUSPENDED:
                _resume(session, max(0, rec.received_at_ms - session.suspended_at_ms))

    def _compiled_for(self, mode: str, digest: str):
        compiled = self.modes.get(mode)
        if compiled is None:
            raise ValueError(f"mode {mode!r} is not registered")
        if self.spec_archive is not None:
            compiled = self.spec_archive.compiled(digest, compiled)
        return compiled

    def _bound_policy(self, definition: str) -> BoundPolicy:
        policy = self._policy_cache.get(definition)
        if policy is None:
            policy = self._policy_cache[definition] = BoundPolicy.from_json(definition)
        return policy

    def _policy_for(self, definition: str, policy_version: str, mode: str) -> BoundPolicy:
        if definition:
            return self._bound_policy(definition)
        return self.policies.bind(policy_version, mode)[0]

    # --- checkpoints (runtime/checkpoints.py) ------------------------------------------------------

    def _terminal(self, session: Session) -> None:
        """The session just became terminal (its lock is held): queue its terminal checkpoint."""
        if self.checkpoints:
            self._checkpointer.add(session)

    def _interval_checkpoint(self, session: Session, now: int) -> None:
        """MACP_CHECKPOINT_INTERVAL (runtime.md §10.4), after an accepted non-terminal message."""
        n = self.checkpoint_interval
        length = session.log_length
        if not self.checkpoints or session.status != OPEN or length < n or length % n:
            return
        record = checkpoint_record(session, now, terminal=False)
        if record is None:
            return
        try:
            self._append(session, record)
        except MacpError as exc:   # the message itself is durable and applied; replay just takes longer
            log.warning("session %s: interval checkpoint not written: %s", session.session_id, exc)

    def _write_terminal_checkpoints(self, sessions: list[Session]) -> None:
        """Checkpointer thread: one durable append for a batch of terminal sessions. Each session's lock
        is held from its snapshot until its checkpoint is indexed, so nothing (eviction, a new
        incarnation of the id) comes between."""
        locked: list[Session] = []
        records: list[LogRecord] = []
        now = self.clock()
        try:
            for session in sessions:
                session.lock.acquire()
                if session.gone or session.status not in TERMINAL:
                    session.lock.release()
                    continue
                try:
                    record = checkpoint_record(session, now, terminal=True)
                except Exception as exc:
                    log.warning("session %s: no terminal checkpoint: %s", session.session_id, exc)
                    record = None
                if record is None:
                    session.lock.release()
                    continue
                locked.append(session)
                records.append(record)
            if not records:
                return
            try:   # rides along with the next batch of foreground appends when one comes soon
                indices = self.store.append_many(records, linger=CHECKPOINT_LINGER_S)
            except StorageError as exc:
                log.warning("terminal checkpoints of %d sessions not written (a restart replays them): %s",
                            len(records), exc)
                return
            for session, index in zip(locked, indices):
                session.log_length = index + 1
        finally:
            for session in locked:
                session.lock.release()

    def flush_checkpoints(self, timeout: float = 10.0) -> bool:
        """Wait until the queued terminal checkpoints are written (tests and benchmarks)."""
        return self._checkpointer.flush(timeout)


def _has_terminal_checkpoint(records: list[LogRecord]) -> bool:
    for rec in reversed(records):
        if rec.kind == ENTRY_KIND_CHECKPOINT:
            return is_terminal_checkpoint(rec)
    return False


def _resolve(session: Session, resolution: bytes, message_type: str, payload: bytes, at_ms: int) -> None:
    if message_type == "Commitment":   # the binding Commitment, for decision receipts (set before the
        session.commitment = (payload, at_ms)   # status: a reader that sees RESOLVED sees it too)
    session.resolution = resolution
    session.status = RESOLVED


def _resume(session: Session, banked: int) -> bool:
    """Bank the suspended time: True when the session is OPEN again, False when the 7-day cap expired it."""
    session.accumulated_suspended_ms += banked
    if session.semantics_rev and session.suspended_at_ms is not None:   # the interval, for §12.4's deadline
        session.suspensions += ((session.suspended_at_ms, session.suspended_at_ms + banked),)
    session.suspended_at_ms = None
    if session.accumulated_suspended_ms > session.suspend_cap_ms:
        session.status = EXPIRED
        return False
    session.deadline_ms += banked
    session.status = OPEN
    return True


def _not_found(session_id: str) -> StatusError:
    shown = session_id if len(session_id) <= 256 else session_id[:256] + "…"
    return StatusError(NOT_FOUND, f"Session '{shown}' not found")


def _unknown_session(session_id: str) -> MacpError:
    return MacpError(Kind.UnknownSession, detail=f"session {session_id!r} not found")


def record_envelope(record: LogRecord):
    """A logged Incoming record as the envelope subscribers get."""
    return envelope_pb2.Envelope(
        macp_version=record.macp_version or "1.0", mode=record.mode, message_type=record.message_type,
        message_id=record.message_id, session_id=record.session_id, sender=record.sender,
        timestamp_unix_ms=record.timestamp_unix_ms or record.received_at_ms, payload=record.payload)


def _incoming(env, sender: str, now: int) -> LogRecord:
    return LogRecord(session_id=env.session_id, kind=ENTRY_KIND_INCOMING, message_id=env.message_id,
                     message_type=env.message_type, sender=sender, mode=env.mode, macp_version=env.macp_version,
                     timestamp_unix_ms=env.timestamp_unix_ms, received_at_ms=now, payload=env.payload)


def _internal(session: Session, message_type: str, payload: bytes, now: int) -> LogRecord:
    return LogRecord(session_id=session.session_id, kind=ENTRY_KIND_INTERNAL, message_type=message_type,
                     sender=RUNTIME_SENDER, mode=session.mode, macp_version="1.0", timestamp_unix_ms=now,
                     received_at_ms=now, payload=payload)


def _mode_error(exc: Reject) -> MacpError:
    return MacpError(Kind[exc.kind], reasons=exc.reasons, detail=exc.detail or str(exc),
                     reason=exc.detail or "; ".join(exc.reasons))
