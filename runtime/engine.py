"""The session kernel: knows sessions, dedup, TTLs, the commit point and error codes — no mode.

Every mode decision is delegated to the session's CompiledMode (`evaluate` judges without changing
anything, `apply` changes state after the record is durable). Sessions are serialised by their own
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

import logging
import threading
from time import perf_counter
from typing import Callable, NamedTuple

from macp.v1 import core_pb2

from .auth import Identity
from .broadcast import Broadcaster
from .errors import Kind, MacpError, StatusError
from .ids import valid_session_id
from .metrics import NO_METRICS
from .modes import ModeRegistry
from .policies import PolicyRegistry
from .session import (CANCELLED, EXPIRED, MAX_SUSPEND_MS, OPEN, RESOLVED, SUSPENDED, TERMINAL, Session,
                      now_ms)
from .specs.hooks.common import is_blank
from .specs.hooks.context import Reject
from .specs.hooks.policy_rules import BoundPolicy, commitment_authority_allows
from .storage import (ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, LogRecord, StorageError, Store)

import grpc

log = logging.getLogger("macp_runtime.engine")

MAX_TTL_MS = 86_400_000
MAX_PARTICIPANTS = 1000
RUNTIME_SENDER = "_runtime"
LIFECYCLE_CAPACITY = 64     # runtime.md §8.8
SIGNAL_CAPACITY = 256       # runtime.md §6

_Event = core_pb2.SessionLifecycleEvent
CREATED, RESOLVED_EVENT, EXPIRED_EVENT = _Event.EVENT_TYPE_CREATED, _Event.EVENT_TYPE_RESOLVED, _Event.EVENT_TYPE_EXPIRED
SUSPENDED_EVENT, RESUMED_EVENT, CANCELLED_EVENT = (_Event.EVENT_TYPE_SUSPENDED, _Event.EVENT_TYPE_RESUMED,
                                                   _Event.EVENT_TYPE_CANCELLED)
EVICTABLE = frozenset({RESOLVED, EXPIRED})


class Outcome(NamedTuple):
    duplicate: bool
    state: int


class Engine:
    def __init__(self, modes: ModeRegistry, policies: PolicyRegistry, store: Store,
                 clock: Callable[[], int] = now_ms):
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

    # --- SessionStart (§5.2) ---------------------------------------------------------------------

    def start_session(self, env, identity: Identity) -> Outcome:
        session_id = env.session_id
        if not valid_session_id(session_id):
            raise MacpError(Kind.InvalidSessionId, detail=f"session id {session_id!r} is not a UUID v4/v7 or base64url")
        compiled, start = self._check_start(env.mode, env.payload)
        now = self.clock()
        while True:
            with self._table_lock:
                existing = self._sessions.get(session_id)
                if existing is None:
                    self._check_open_limit(identity)
                    session = self._new_session(session_id, compiled, identity.sender, start, now,
                                                (env.timestamp_unix_ms or now) + start.ttl_ms)
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
        log.debug("session %s started (%s) by %s", session_id, compiled.name, identity.sender)
        return Outcome(False, session.status)

    def _check_start(self, mode_name: str, raw: bytes):
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
            if not participants:
                raise MacpError(Kind.InvalidPayload, detail="participants must not be empty")
            if len(participants) > MAX_PARTICIPANTS:
                raise MacpError(Kind.InvalidPayload, detail=f"at most {MAX_PARTICIPANTS} participants")
            trimmed = set()
            for p in participants:
                t = p.strip()
                if is_blank(p) or t in trimmed:
                    raise MacpError(Kind.InvalidPayload, detail="participants must be non-blank and unique")
                trimmed.add(t)
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
                     bound: BoundPolicy | None = None) -> Session:
        if bound is None:
            policy, effective = self.policies.bind(start.policy_version, compiled.name)
        else:  # replay: the binding recorded at the start, whatever the registry holds today
            policy, effective = bound, bound.policy_id
        session = Session(session_id, compiled, initiator, start, policy, started_at, deadline, effective)
        try:
            compiled.check_start(session)
        except Reject as exc:
            raise _mode_error(exc) from None
        return session

    # --- session messages (§5.4) -----------------------------------------------------------------

    def process_message(self, env, identity: Identity) -> Outcome:
        session = self._sessions.get(env.session_id)
        if session is None:
            raise MacpError(Kind.UnknownSession, detail=f"session {env.session_id!r} not found")
        with session.lock:
            if session.gone:
                raise MacpError(Kind.UnknownSession, detail=f"session {env.session_id!r} not found")
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
            compiled = session.compiled
            sender = identity.sender
            try:
                plan = compiled.evaluate(session, sender, env.message_type, env.payload, env.timestamp_unix_ms)
            except Reject as exc:
                raise _mode_error(exc) from None
            self._append(session, _incoming(env, sender, now))  # the commit point
            session.seen.add(env.message_id)
            session.note_activity(sender, now)
            resolution = compiled.apply(session, plan)
            if resolution is not None:
                session.resolution = resolution
                session.status = RESOLVED
                log.debug("session %s resolved (%s)", session.session_id, session.mode)
            self._publish(session, env)
            if resolution is not None:
                self._emit(RESOLVED_EVENT, session, now)
            return Outcome(False, session.status)

    # --- lookups and session RPCs ----------------------------------------------------------------

    def lookup(self, session_id: str) -> Session:
        """Checked lookup: lazily expires an overdue session. NOT_FOUND when unknown."""
        session = self._sessions.get(session_id)
        if session is None or session.gone:
            raise _not_found(session_id)
        with session.lock:
            try:
                self._lazy_expire(session, self.clock())
            except MacpError:
                log.warning("could not record the expiry of session %s", session_id)
        return session

    @staticmethod
    def may_read(session: Session, identity: Identity) -> bool:
        """GetSession and StreamSession subscribe (runtime.md §4.5)."""
        return (identity.is_observer or identity.sender == session.initiator
                or identity.sender in session.participant_set)

    def get_session(self, session_id: str, identity: Identity) -> Session:
        session = self.lookup(session_id)
        if not self.may_read(session, identity):
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN: session access denied")
        return session

    def _controlled(self, session_id: str, identity: Identity, verb: str) -> Session:
        """The prelude of Cancel/Suspend/Resume (runtime.md §5.7): checked lookup, then authority."""
        session = self.lookup(session_id)
        sender = identity.sender
        if sender != session.initiator and not commitment_authority_allows(
                session.policy, session.initiator, session.participant_set, sender):
            raise StatusError(grpc.StatusCode.PERMISSION_DENIED,
                              f"FORBIDDEN: only the session initiator or policy-delegated roles can {verb}")
        return session

    def cancel_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        session = self._controlled(session_id, identity, "cancel")
        sender = identity.sender
        with session.lock:
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
            self._emit(CANCELLED_EVENT, session, now)
            log.info("session %s cancelled by %s", session_id, sender)
            return Outcome(False, session.status)

    def suspend_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        session = self._controlled(session_id, identity, "suspend")
        with session.lock:
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

    def resume_session(self, session_id: str, identity: Identity, reason: str) -> Outcome:
        session = self._controlled(session_id, identity, "resume")
        with session.lock:
            if session.gone:
                raise _not_found(session_id)
            if session.status != SUSPENDED:
                raise MacpError(Kind.SessionNotOpen, detail="only a suspended session can be resumed")
            now = self.clock()
            banked = max(0, now - session.suspended_at_ms)
            payload = core_pb2.SessionResumePayload(reason=reason, resumed_by=identity.sender, banked_ms=banked)
            self._append(session, _internal(session, "SessionResume", payload.SerializeToString(), now))
            if _resume(session, banked):
                self._emit(RESUMED_EVENT, session, now)
                log.info("session %s resumed by %s after %d ms", session_id, identity.sender, banked)
                return Outcome(False, session.status)
            self._emit(EXPIRED_EVENT, session, now)
            log.info("session %s expired: suspended for more than 7 days in total", session_id)
            raise MacpError(Kind.SessionNotOpen, detail="the session was suspended for more than 7 days in total")

    def sessions(self) -> list[Session]:
        with self._table_lock:
            return list(self._sessions.values())

    # --- sweep and eviction (§5.6, §5.9) ---------------------------------------------------------

    def sweep(self, retention_ms: int) -> tuple[int, int]:
        """Expire OPEN sessions past their deadline, then evict RESOLVED/EXPIRED sessions that started
        more than `retention_ms` ago. Returns (expired, evicted)."""
        expired = evicted = 0
        now = self.clock()
        for session in self.sessions():
            if session.status != OPEN or now <= session.deadline_ms:
                continue
            with session.lock:
                if session.gone or session.status != OPEN or now <= session.deadline_ms:
                    continue
                try:
                    self._expire(session, now)
                    expired += 1
                except MacpError:
                    log.warning("sweep: could not record the expiry of session %s", session.session_id)
        cutoff = now - retention_ms
        for session in self.sessions():
            if session.status in EVICTABLE and session.started_at_ms < cutoff and self._evict(session):
                evicted += 1
        if expired or evicted:
            log.info("sweep: %d sessions expired, %d evicted from memory", expired, evicted)
        return expired, evicted

    def _evict(self, session: Session) -> bool:
        with session.lock:
            if session.gone or session.status not in EVICTABLE:
                return False
            with self._table_lock:
                if self._sessions.get(session.session_id) is not session:
                    return False
                # Before the id becomes free: a new incarnation must not lose its index to this.
                self.store.release(session.session_id)
                del self._sessions[session.session_id]
            session.gone = True
        return True

    def start_sweeper(self, interval_s: float, retention_s: float) -> None:
        """Run `sweep` now and then every `interval_s` seconds until `close()`."""
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

    def subscribe_with_history(self, session: Session, subscriber) -> list[LogRecord]:
        """Subscribe and snapshot the history in one step under the session lock: the subscriber then
        gets every later envelope live and none of the snapshot's (no gap, no duplicate)."""
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
        """Called under the session lock right after the envelope's record became durable."""
        subscribers = self._channels.get(session.session_id)
        if not subscribers:
            return
        item = core_pb2.StreamSessionResponse()
        item.envelope.CopyFrom(env)
        item.envelope.DiscardUnknownFields()
        index = session.log_length - 1
        for sub in subscribers:
            if not sub.offer(index, item):
                self.unsubscribe(session.session_id, sub)

    def _emit(self, event: int, session: Session, now: int) -> None:
        self.metrics.session_event(event)
        if len(self.lifecycle):
            self.lifecycle.publish((event, session, now))

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

    # --- storage ---------------------------------------------------------------------------------

    def _append(self, session: Session, record: LogRecord) -> None:
        started = perf_counter()
        try:
            index = self.store.append(record)
            self.metrics.append_done(perf_counter() - started)
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
            if session.accumulated_suspended_ms + (now - session.suspended_at_ms) > MAX_SUSPEND_MS:
                self._expire(session, now)

    def _expire(self, session: Session, now: int) -> None:
        self._append(session, _internal(session, "TtlExpired", b"", now))
        session.status = EXPIRED
        session.suspended_at_ms = None
        self._emit(EXPIRED_EVENT, session, now)
        log.info("session %s expired", session.session_id)

    # --- recovery --------------------------------------------------------------------------------

    def recover(self, strict: bool = False) -> tuple[int, int]:
        """Rebuild every stored session by replaying its history. Returns (recovered, failed)."""
        recovered = failed = 0
        for session_id, records in self.store.replay():
            try:
                session = self._replay_session(session_id, records)
            except Exception as exc:  # one bad session must not keep the others down
                failed += 1
                log.warning("session %s could not be recovered: %s", session_id, exc)
                if strict:
                    raise
                continue
            if session is not None:
                self._sessions[session_id] = session
                recovered += 1
        return recovered, failed

    def _replay_session(self, session_id: str, records: list[LogRecord]) -> Session | None:
        first = next((i for i, r in enumerate(records)
                      if r.kind == ENTRY_KIND_INCOMING and r.message_type == "SessionStart"), None)
        if first is None:
            raise ValueError("history has no SessionStart")
        start_rec = records[first]
        compiled, start = self._check_start(start_rec.mode, start_rec.payload)
        if self.spec_archive is not None:   # the rules the session started with, not today's
            compiled = self.spec_archive.compiled(start_rec.mode_spec_digest, compiled)
        base = start_rec.timestamp_unix_ms or start_rec.received_at_ms
        bound = BoundPolicy.from_json(start_rec.policy_binding) if start_rec.policy_binding else None
        session = self._new_session(session_id, compiled, start_rec.sender, start,
                                    start_rec.received_at_ms, base + start.ttl_ms, bound)
        session.seen.add(start_rec.message_id)
        session.log_length = len(records)
        for rec in records[first + 1:]:
            if rec.kind == ENTRY_KIND_INCOMING:
                if session.status == OPEN:
                    try:
                        plan = compiled.evaluate(session, rec.sender, rec.message_type, rec.payload,
                                                 rec.timestamp_unix_ms)
                    except Reject as exc:
                        raise ValueError(f"replay of {rec.message_type} {rec.message_id!r} was refused: {exc}") from None
                    session.note_activity(rec.sender, rec.received_at_ms)
                    resolution = compiled.apply(session, plan)
                    if resolution is not None:
                        session.resolution = resolution
                        session.status = RESOLVED
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
        return session


def _resume(session: Session, banked: int) -> bool:
    """Bank the suspended time: True when the session is OPEN again, False when the 7-day cap expired it."""
    session.accumulated_suspended_ms += banked
    session.suspended_at_ms = None
    if session.accumulated_suspended_ms > MAX_SUSPEND_MS:
        session.status = EXPIRED
        return False
    session.deadline_ms += banked
    session.status = OPEN
    return True


def _not_found(session_id: str) -> StatusError:
    return StatusError(grpc.StatusCode.NOT_FOUND, f"Session '{session_id}' not found")


def _incoming(env, sender: str, now: int) -> LogRecord:
    return LogRecord(session_id=env.session_id, kind=ENTRY_KIND_INCOMING, message_id=env.message_id,
                     message_type=env.message_type, sender=sender, mode=env.mode, macp_version=env.macp_version,
                     timestamp_unix_ms=env.timestamp_unix_ms, received_at_ms=now, payload=env.payload)


def _internal(session: Session, message_type: str, payload: bytes, now: int) -> LogRecord:
    return LogRecord(session_id=session.session_id, kind=ENTRY_KIND_INTERNAL, message_type=message_type,
                     sender=RUNTIME_SENDER, mode=session.mode, macp_version="1.0", timestamp_unix_ms=now,
                     received_at_ms=now, payload=payload)


def _mode_error(exc: Reject) -> MacpError:
    return MacpError(Kind[exc.kind], reasons=exc.reasons, detail=exc.detail or str(exc))
