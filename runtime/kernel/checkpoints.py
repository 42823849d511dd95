"""Checkpoints: a session's whole state as one log entry, so a restart need not replay its messages.

A checkpoint is a `LogRecord` of kind ENTRY_KIND_CHECKPOINT whose payload is a `SessionSnapshot`
(proto/macp_runtime/storage/v1/records.proto). Replay restores a session from the last checkpoint
in its history and applies only the entries after it (`recovery.Recovery.replay_session`). When the
engine writes them is `CheckpointSchedule`'s business (below).

* Terminal checkpoint (`TerminalCheckpoint`): once a session is RESOLVED, CANCELLED or EXPIRED
  (however it got there: a Commitment, CancelSession, the sweep, a lazy expiry, a resume past the
  7-day cap). It is written by the `Checkpointer` thread, after the Ack: the commit point stays one
  fdatasync, and checkpoints of many sessions share one. A crash before it is written costs nothing
  but time: the next start-up replays that session's messages and writes the missing checkpoint.
  After a restart the session's history begins at it, and the file store's compaction drops the
  records before it (runtime/storage/file_log.py).
* Interval checkpoint (`Checkpoint`, MACP_CHECKPOINT_INTERVAL=N > 0, runtime.md §10.4): after an
  accepted non-terminal session message when the session's log length L >= N and L mod N == 0,
  written before the Ack (it counts in L). It only shortens replay; nothing is compacted.

Mode state is stored as JSON. An interval checkpoint is written only when the state survives JSON
exactly (tuples, non-string keys or NaN would change it), since replay goes on from it; a terminal
session's state is never judged again, so its checkpoint keeps what JSON can hold.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import zlib

from ..storage import ENTRY_KIND_CHECKPOINT, LogRecord, SessionSnapshot, StorageError, Store
from ..storage.base import CHECKPOINT, TERMINAL_CHECKPOINT, is_terminal_checkpoint
from ..storage.records_pb2 import (
    SESSION_STATUS_CANCELLED,
    SESSION_STATUS_EXPIRED,
    SESSION_STATUS_OPEN,
    SESSION_STATUS_RESOLVED,
    SESSION_STATUS_SUSPENDED,
)
from ..vocabulary.errors import MacpError
from ..vocabulary.session import CANCELLED, EXPIRED, OPEN, RESOLVED, SUSPENDED, TERMINAL, Session
from .records import RUNTIME_SENDER

log = logging.getLogger("macp_runtime.checkpoints")

_TO_SNAPSHOT = {OPEN: SESSION_STATUS_OPEN, RESOLVED: SESSION_STATUS_RESOLVED, EXPIRED: SESSION_STATUS_EXPIRED,
                SUSPENDED: SESSION_STATUS_SUSPENDED, CANCELLED: SESSION_STATUS_CANCELLED}
_FROM_SNAPSHOT = {v: k for k, v in _TO_SNAPSHOT.items()}
_warned_modes: set[str] = set()
#: Snapshots larger than this are stored deflated (SessionSnapshot.deflated): long sessions' mode state
#: and ids compress well. Small ones are not: zlib lets go of the GIL and must take it back, and in the
#: checkpointer thread under load that cost ~10% of the server's throughput for ~1 KB saved per session.
DEFLATE_ABOVE = 16 * 1024
CHECKPOINT_LINGER_S = 0.01  # a terminal checkpoint waits this long for a foreground fdatasync to share


class NotCheckpointable(ValueError):
    """The session's mode state does not survive JSON, so an interval checkpoint would change it."""


def snapshot(session: Session, *, exact: bool) -> SessionSnapshot:
    """The session as a SessionSnapshot (call under the session's lock)."""
    try:
        state = json.dumps(session.state, separators=(",", ":"), ensure_ascii=False, allow_nan=True,
                           default=None if exact else str)
        if exact and json.loads(state) != session.state:
            raise NotCheckpointable(f"the mode state of {session.mode} does not survive JSON")
    except (TypeError, ValueError) as exc:
        raise NotCheckpointable(str(exc)) from None
    compiled = session.compiled
    snap = SessionSnapshot(
        session_id=session.session_id, mode=session.mode, mode_version=session.mode_version,
        configuration_version=session.configuration_version, policy_version=session.policy_version,
        status=_TO_SNAPSHOT[session.status], started_at_unix_ms=session.started_at_ms,
        deadline_unix_ms=session.deadline_ms, ttl_ms=session.ttl_ms, initiator=session.initiator,
        participants=session.participants, intent=session.intent, context_id=session.context_id,
        extension_keys=session.extension_keys, seen_message_ids=sorted(session.seen), phase=session.phase,
        mode_state=state.encode("utf-8"), policy_definition=session.policy.to_json() if session.policy else "",
        accumulated_suspended_ms=session.accumulated_suspended_ms, entries_covered=session.log_length,
        mode_spec_digest=compiled.digest if getattr(compiled, "source_text", None) is not None else "",
        semantics_rev=session.semantics_rev, bound_max_suspend_ms=session.suspend_cap_ms,
        suspension_intervals=[t for pair in session.suspensions for t in pair])
    if session.resolution is not None:
        snap.resolution = session.resolution
    if session.suspended_at_ms is not None:
        snap.suspended_at_ms = session.suspended_at_ms
    if session.commitment is not None:
        snap.commitment_wire, snap.committed_at_ms = session.commitment
    for participant, (count, last_ms) in (session.activity or {}).items():
        snap.activity.add(participant=participant, message_count=count, last_message_at_ms=last_ms)
    return snap


def checkpoint_record(session: Session, now: int, *, terminal: bool) -> LogRecord | None:
    """The checkpoint entry of the session as it is now, or None (logged once per mode) when an
    interval checkpoint cannot represent its mode state."""
    try:
        snap = snapshot(session, exact=not terminal)
    except NotCheckpointable as exc:
        if session.mode not in _warned_modes:
            _warned_modes.add(session.mode)
            log.warning("no interval checkpoints for sessions of %s: %s", session.mode, exc)
        return None
    payload = snap.SerializeToString()
    if len(payload) > DEFLATE_ABOVE:
        payload = SessionSnapshot(deflated=zlib.compress(payload, 1)).SerializeToString()
    return LogRecord(session_id=session.session_id, kind=ENTRY_KIND_CHECKPOINT,
                     message_type=TERMINAL_CHECKPOINT if terminal else CHECKPOINT, sender=RUNTIME_SENDER,
                     mode=session.mode, macp_version="1.0", timestamp_unix_ms=now, received_at_ms=now,
                     payload=payload)


def read_snapshot(payload: bytes) -> SessionSnapshot:
    """The SessionSnapshot of a checkpoint entry's payload (inflated when it was stored deflated)."""
    snap = SessionSnapshot.FromString(payload)
    if snap.deflated:
        snap = SessionSnapshot.FromString(zlib.decompress(snap.deflated))
    return snap


class _Start:
    """What `Session.__init__` reads from a SessionStartPayload, taken from a snapshot."""

    __slots__ = ("participants", "mode_version", "configuration_version", "intent", "context_id", "ttl_ms",
                 "extensions")

    def __init__(self, snap: SessionSnapshot):
        self.participants = snap.participants
        self.mode_version = snap.mode_version
        self.configuration_version = snap.configuration_version
        self.intent = snap.intent
        self.context_id = snap.context_id
        self.ttl_ms = snap.ttl_ms
        self.extensions = None


def restore(session_id: str, record: LogRecord, compiled_for, policy_for) -> Session:
    """A Session rebuilt from a checkpoint entry. `compiled_for(mode, digest)` gives the compiled mode
    (raises when it is not registered); `policy_for(definition_json, policy_version, mode)` the bound
    policy. Raises ValueError (or a decode error) when the snapshot is not usable."""
    snap = read_snapshot(record.payload)
    if snap.session_id != session_id:
        raise ValueError(f"the checkpoint is of session {snap.session_id!r}")
    status = _FROM_SNAPSHOT.get(snap.status)
    if status is None:
        raise ValueError(f"the checkpoint has no valid status ({snap.status})")
    compiled = compiled_for(snap.mode, snap.mode_spec_digest)
    if snap.phase not in compiled.phases:
        raise ValueError(f"the checkpoint's phase {snap.phase!r} is not a phase of {compiled.name}")
    state = json.loads(snap.mode_state.decode("utf-8")) if snap.mode_state else None
    if not isinstance(state, dict):
        raise ValueError("the checkpoint's mode state is not a JSON object")
    policy = policy_for(snap.policy_definition, snap.policy_version, compiled.name)
    session = Session(session_id, compiled, snap.initiator, _Start(snap), policy, snap.started_at_unix_ms,
                      snap.deadline_unix_ms, snap.policy_version)
    session.extension_keys = tuple(snap.extension_keys)
    session.status = status
    session.phase = snap.phase
    session.state = state
    session.seen = set(snap.seen_message_ids)
    if snap.activity:
        session.activity = {a.participant: [a.message_count, a.last_message_at_ms] for a in snap.activity}
    session.resolution = snap.resolution if snap.HasField("resolution") else None
    session.suspended_at_ms = snap.suspended_at_ms if snap.HasField("suspended_at_ms") else None
    if snap.HasField("commitment_wire"):
        session.commitment = (snap.commitment_wire, snap.committed_at_ms)
    session.accumulated_suspended_ms = snap.accumulated_suspended_ms
    session.semantics_rev = snap.semantics_rev
    flat = list(snap.suspension_intervals)
    session.suspensions = tuple(zip(flat[0::2], flat[1::2]))
    if snap.bound_max_suspend_ms > 0:
        session.suspend_cap_ms = snap.bound_max_suspend_ms
    return session


class Checkpointer:
    """Writes terminal checkpoints in the background, up to BATCH sessions per durable append."""

    BATCH = 256
    #: After the first session arrives, wait this long for more: one batch, one append, fewer wakeups.
    GATHER_S = 0.05

    def __init__(self, write_batch):
        self._write_batch = write_batch       # callable(list[Session]) -> None
        self._queue: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._in_flight = 0

    def add(self, session: Session) -> None:
        with self._cond:
            if self._stopped:
                return
            self._queue.append(session)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
                self._thread.start()
            if len(self._queue) == 1 or len(self._queue) >= self.BATCH:
                self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return
                self._cond.wait_for(lambda: len(self._queue) >= self.BATCH or self._stopped, self.GATHER_S)
                batch = [self._queue.popleft() for _ in range(min(self.BATCH, len(self._queue)))]
                self._in_flight = len(batch)
            try:
                self._write_batch(batch)
            except Exception:  # the sessions stay fine in memory; a restart replays them instead
                log.exception("terminal checkpoints of %d sessions could not be written", len(batch))
            finally:
                with self._cond:
                    self._in_flight = 0
                    self._cond.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown). True when it was."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)


def has_terminal_checkpoint(records: list[LogRecord]) -> bool:
    """Whether the last checkpoint of a history is a terminal one."""
    for rec in reversed(records):
        if rec.kind == ENTRY_KIND_CHECKPOINT:
            return is_terminal_checkpoint(rec)
    return False


class CheckpointSchedule:
    """When the engine writes checkpoints: a terminal one queued for the `Checkpointer` as a session
    becomes terminal, an interval one (MACP_CHECKPOINT_INTERVAL, runtime.md §10.4) after an accepted
    non-terminal message. `enabled` only for a durable store of one instance."""

    def __init__(self, store: Store, append, clock, *, enabled: bool, interval: int = 0):
        """append(session, record): the commit point (commit.CommitPoint.append)."""
        self.store = store
        self._append = append
        self._clock = clock
        self.enabled = enabled
        # 0 = off; also off when checkpoints are, so the message path tests one number
        self.interval = interval if enabled else 0
        self._checkpointer = Checkpointer(self._write_terminal)

    def terminal(self, session: Session) -> None:
        """The session just became terminal (its lock is held): queue its terminal checkpoint."""
        if self.enabled:
            self._checkpointer.add(session)

    def after_message(self, session: Session, now: int) -> None:
        """After an accepted non-terminal message (with `interval` set): the interval checkpoint, when due."""
        n = self.interval
        length = session.log_length
        if session.status != OPEN or length < n or length % n:
            return
        record = checkpoint_record(session, now, terminal=False)
        if record is None:
            return
        try:
            self._append(session, record)
        except MacpError as exc:   # the message itself is durable and applied; replay just takes longer
            log.warning("session %s: interval checkpoint not written: %s", session.session_id, exc)

    def _write_terminal(self, sessions: list[Session]) -> None:
        """Checkpointer thread: one durable append for a batch of terminal sessions. Each session's lock
        is held from its snapshot until its checkpoint is indexed, so nothing (eviction, a new
        incarnation of the id) comes between."""
        locked: list[Session] = []
        records: list[LogRecord] = []
        now = self._clock()
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

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queued terminal checkpoints are written (tests and benchmarks)."""
        return self._checkpointer.flush(timeout)

    def close(self) -> None:
        """Write what is queued, then stop (before the store closes)."""
        self._checkpointer.close()
