"""The default embedded durable store: one shared, segmented write-ahead log, compacted in the background.

Layout of the data directory::

    <data_dir>/LOCK                     flock()ed for the store's lifetime (one process per directory)
    <data_dir>/wal/00000001.log
    <data_dir>/wal/00000002.log ...
    <data_dir>/wal/00000001.log.compact a compaction's replacement before its rename (transient)

Every segment is a sequence of frames (segment.py: the frame format, one segment's files, reading, the
recovery scan)::

    magic (4 bytes) | payload length (u32 LE) | CRC32 of payload (u32 LE) | serialized LogRecord

All sessions share the log, so concurrent appends can share one fdatasync (group commit):
the first caller that finds no flush in progress becomes the leader, writes everything pending
with one write and one fdatasync, publishes the result and hands over to the next waiter.

Positions. Each indexed record gets a log sequence number (LSN), in log order (segment, then offset);
LSNs live in memory only (every open numbers the records again). A session's index is a packed
array of its LSNs, and each segment maps its LSNs to file offsets with two sorted arrays. Records are
read back with pread when asked for. Compaction swaps a segment's map in one step, so no session index
changes, and a reader that resolved its offsets before the swap keeps reading the old file: the old
segment object (and its fd) lives until that reader drops it.

Checkpoints and compaction: see compaction.py.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
import threading
import time
from array import array
from bisect import bisect_right
from functools import partial
from typing import Iterator, cast

from .base import RecoveryReport, StorageError, Store, private_dirs, starts_incarnation
from .compaction import DEFAULT_COMPACT_DEAD_RATIO, DEFAULT_COMPACT_INTERVAL_S, Compactor
from .records_pb2 import LogRecord
from .segment import (
    _HEADER,
    _STARTS,
    _TERMINAL,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD_BYTES,
    _Entry,
    _reset_kind,
    _Segment,
    _segment_name,
    _sync,
    create_segment,
    frame,
    locate,
    read_record,
    scan_segment,
    segments_on_disk,
    take_lock,
)

__all__ = [
    "DEFAULT_COMPACT_DEAD_RATIO", "DEFAULT_COMPACT_INTERVAL_S", "DEFAULT_DATA_DIR", "DEFAULT_SEGMENT_BYTES",
    "HEADER_SIZE", "MAGIC", "MAX_RECORD_BYTES", "FileLogStore", "LogRecord", "_HEADER", "frame",
]

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_DATA_DIR = ".macp-data"


def _run_callbacks(entries: list[_Entry]) -> None:
    for e in entries:
        try:
            e.done(e.index, e.error)
        except Exception:   # one bad callback must not keep the others from their answer
            log.exception("storage: a deferred append's callback failed")


class FileLogStore(Store):
    durable = True
    defers = True
    counts_syncs = True
    #: Longest wait of the deferred writer for its batch to fill (see _flush_deferred) ...
    group_wait_s = 0.010
    #: ... and the longest pause between two arrivals during that wait.
    group_gap_s = 0.001

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        compact_dead_ratio: float | None = DEFAULT_COMPACT_DEAD_RATIO,
        compact_interval_s: float = DEFAULT_COMPACT_INTERVAL_S,
        history_retention_ms: int = 0,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        if compact_dead_ratio is not None and not 0 < compact_dead_ratio <= 1:
            raise ValueError("compact_dead_ratio must lie in (0, 1], or be None (no background compaction)")
        self.data_dir = os.path.abspath(data_dir)
        self.wal_dir = os.path.join(self.data_dir, "wal")
        self.segment_bytes = segment_bytes
        self.compact_dead_ratio = compact_dead_ratio
        self.compact_interval_s = compact_interval_s
        # MACP_HISTORY_RETENTION_SECS: a terminal session's records before its checkpoint stay live this
        # long after the checkpoint, so WhatIfReplay can still read its whole history (0: not kept).
        self.history_retention_ms = history_retention_ms

        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._index: dict[str, array] = {}  # session -> LSNs of its latest incarnation; insertion = first-append order
        self._start: dict[str, int] = {}    # session -> where history() begins in its array (absent: 0)
        self._floor: dict[str, int] = {}    # session -> LSN of its latest SessionStart / terminal checkpoint
        self._ended_at: dict[str, int] = {}  # session -> time (ms) of its terminal checkpoint, with history retention
        self._keep_since = 0                # compaction: histories of sessions that ended at or after this stay
        self._segs: list[_Segment] = []     # in log order; the last one is written
        self._seg_first = array("Q")        # first LSN of each segment of _segs
        self._next_lsn = 1
        self._pending: list[_Entry] = []
        self._arrived = 0.0      # monotonic time of the latest deferred append
        self._wake_at = 1        # pending count at which a deferred append wakes the flusher
        self._flushing = False
        self._flusher: threading.Thread | None = None   # leads batches of deferred appends
        self._settling = threading.Lock()                  # deferred callbacks run one batch at a time
        self._settle_via = None   # settle_via(): deferred callbacks are handed over through it, a batch at a time
        self._failed: str | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        # Owned by the current leader (only one at a time, marked by _flushing):
        self._active: _Segment | None = None
        self._write_fd = -1
        self._write_offset = 0
        self._lock_fd = -1
        self._compactor = Compactor(self)
        #: Counters for benchmarks and tests: fdatasync calls of successful batches, records in them.
        self.sync_count = 0
        self.synced_records = 0
        #: Segments rewritten or removed by compaction, and the bytes that freed.
        self.compactions = 0
        self.compacted_bytes = 0

    # ------------------------------------------------------------------ open / recovery

    def open(self) -> RecoveryReport:
        with self._cond:
            if self._opened or self._closed:
                raise StorageError("FileLogStore.open() may be called only once")
            try:
                private_dirs(self.data_dir, self.wal_dir)
            except OSError as e:
                raise StorageError(f"cannot create data directory {self.data_dir}: {e}") from e
            self._lock_fd = take_lock(self.data_dir)
            try:
                report = self._recover()
            except BaseException:
                self._release_files()
                raise
            self._opened = True
            return report

    def _recover(self) -> RecoveryReport:
        report = RecoveryReport()
        numbers = segments_on_disk(self.wal_dir)
        if not numbers:
            try:
                os.close(create_segment(self.wal_dir, 1))
            except OSError as e:
                raise StorageError(f"cannot create the first log segment in {self.wal_dir}: {e}") from e
            numbers = [1]
        for i, number in enumerate(numbers):
            seg = _Segment(number, os.path.join(self.wal_dir, _segment_name(number)))
            self._add_segment(seg)
            for session_id, offset, reset, at_ms in scan_segment(seg, is_last=(i == len(numbers) - 1), report=report):
                lsn = self._next_lsn
                self._next_lsn += 1
                seg.lsns.append(lsn)
                seg.offsets.append(offset)
                self._index_add(session_id, lsn, reset, recovering=True, at_ms=at_ms)
        last = self._segs[-1]
        if last.lsns or os.path.getsize(last.path):
            # What earlier processes wrote is sealed (so compaction may rewrite it): appends go to a new
            # segment. A last segment still empty is used as it is.
            try:
                fd = create_segment(self.wal_dir, last.number + 1)
            except (OSError, StorageError) as e:
                raise StorageError(f"cannot start a new log segment in {self.wal_dir}: {e}") from e
            last = _Segment(last.number + 1, os.path.join(self.wal_dir, _segment_name(last.number + 1)), fd)
            self._add_segment(last)
            self._write_fd, self._write_offset = fd, 0
        else:
            try:
                self._write_fd = os.open(last.path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                raise StorageError(f"cannot open {last.path} for writing: {e}") from e
            self._write_offset = 0
        last.fd = self._write_fd
        self._active = last
        report.sessions = len(self._index)
        report.records = sum(len(a) - self._start.get(s, 0) for s, a in self._index.items())
        for line in report.problems:
            log.warning("storage recovery: %s", line)
        return report

    def _add_segment(self, seg: _Segment) -> None:
        """Called with the lock held (or during open)."""
        self._segs.append(seg)
        self._seg_first.append(self._next_lsn)

    # ------------------------------------------------------------------ the index (lock held)

    def _count_dead(self, lsns) -> None:
        segs, seg_first = self._segs, self._seg_first
        for lsn in lsns:
            segs[bisect_right(seg_first, lsn) - 1].dead += 1

    def _index_add(self, session_id: str, lsn: int, reset: int, recovering: bool = False, at_ms: int = 0) -> int:
        """Index one record; returns its index in the session's history."""
        positions = self._index.get(session_id)
        if positions is None or reset == _STARTS:
            # A SessionStart begins a new incarnation: older records of the id are no longer indexed.
            if positions is not None:
                self._count_dead(positions[self._start.get(session_id, 0):])
            elif reset == _STARTS and session_id in self._floor:   # a released id starts again
                self._count_dead((self._floor[session_id],))
            positions = self._index[session_id] = array("Q")
            self._start.pop(session_id, None)
        positions.append(lsn)
        if reset == _STARTS:
            self._floor[session_id] = lsn
            if self._ended_at:
                self._ended_at.pop(session_id, None)
        elif reset == _TERMINAL:
            self._floor[session_id] = lsn
            if self.history_retention_ms:
                self._ended_at[session_id] = at_ms or time.time_ns() // 1_000_000
            if recovering:
                # Reopened after the session became terminal: its history begins at the checkpoint.
                start = self._start.get(session_id, 0)
                self._count_dead(positions[start:-1])
                self._start[session_id] = len(positions) - 1
        return len(positions) - 1 - self._start.get(session_id, 0)

    # ------------------------------------------------------------------ append (group commit)

    def append(self, record: LogRecord) -> int:
        return self.append_many([record])[0]

    def append_many(self, records: list[LogRecord], linger: float = 0.0) -> list[int]:
        entries = []
        for record in records:
            payload = record.SerializeToString()
            if len(payload) > MAX_RECORD_BYTES:
                raise StorageError(f"record of {len(payload)} bytes exceeds the {MAX_RECORD_BYTES} byte limit")
            entries.append(_Entry(record.session_id, frame(payload), _reset_kind(record)))
        if not entries:
            return []
        last = entries[-1]
        with self._cond:
            self._check_usable()
            # Added together, so one leader takes them all into the same batch.
            self._pending.extend(entries)
            # Lingering, another caller's batch may take them along: no fdatasync of their own.
            until = time.monotonic() + linger if linger > 0 else 0.0
            while last.index is None and last.error is None:
                wait = until - time.monotonic() if until else 0.0
                if not self._flushing and wait <= 0:
                    # Leader: our entries are still pending, so the batch we take contains them.
                    self._lead_one_batch()
                else:
                    self._cond.wait(wait if wait > 0 else None)
            if last.error is not None:
                raise last.error
            return cast("list[int]", [e.index for e in entries])   # all set: `last` is, and they share its batch

    def append_deferred(self, record: LogRecord, done) -> None:
        """Queue one record without waiting: `done(index, error)` is called (from the thread that
        wrote its batch, in log order) once it is durable or failed. The commit point of callers
        that must not block (the transport's event loop). A failed deferred write leaves the store
        refusing further appends: the caller has already moved its in-memory state on, so only a
        restart (replaying what is on disk) is consistent again."""
        payload = record.SerializeToString()
        if len(payload) > MAX_RECORD_BYTES:
            raise StorageError(f"record of {len(payload)} bytes exceeds the {MAX_RECORD_BYTES} byte limit")
        entry = _Entry(record.session_id, frame(payload), _reset_kind(record), done)
        with self._cond:
            self._check_usable()
            self._pending.append(entry)
            self._arrived = time.monotonic()
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_deferred, name="wal-flusher", daemon=True)
                self._flusher.start()
            if len(self._pending) >= self._wake_at:   # while it gathers, not for every record
                self._cond.notify_all()

    def _flush_deferred(self) -> None:
        """Leads batches for deferred appends (nobody else waits for them).

        Under load it gathers before it writes (`_gather`): every fdatasync costs the server CPU
        (and a hand-over to the loop), whatever the batch holds, and this server is CPU-bound under
        load, so fewer, fuller batches answer more appends. It waits for as many records as its
        previous batch held; but when records arrived while that batch was written, more callers
        are cycling than one batch held, and it waits until the arrivals pause instead, so their
        groups merge into one batch (2 x 32 closed-loop clients: ~10 records per fdatasync became
        ~20, and the server's CPU per message fell by 7-16 %). A lone appender is never held: its
        batches hold one record, so there is nothing to wait for."""
        with self._cond:
            last, behind, waited = 0, False, False
            while not self._closed:
                if self._pending and not self._flushing:
                    if not waited and last > 1 and (behind or last > len(self._pending)):
                        self._gather(None if behind else last)
                        waited = True
                        continue   # look again: a blocking appender may have led a batch meanwhile
                    waited = False
                    last = len(self._pending)
                    self._lead_one_batch()
                    behind = bool(self._pending)
                else:
                    self._cond.wait()

    def _gather(self, want: int | None) -> None:
        """Wait (with _cond held) until `want` records are pending (None: no count), for at most
        `group_wait_s`, and only while they keep coming: a pause of `group_gap_s` without an arrival
        ends the wait. Measured (closed-loop clients, 2 x 4 and 2 x 32): waiting for the count alone,
        a longer wait fills batches under a steady stream of arrivals but holds a whole batch for
        one slow client; the pause rule lets the batch go when the arrivals stop. Only the `want`-th
        record wakes this thread: the others leave their time in `_arrived`, read when a timeout ends."""
        started = time.monotonic()
        until = started + self.group_wait_s
        goal = self._wake_at = sys.maxsize if want is None else want
        try:
            while not self._closed and len(self._pending) < goal:
                heard = max(self._arrived, started)   # the latest arrival, or the start of the wait
                left = min(until, heard + self.group_gap_s) - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)
        finally:
            self._wake_at = 1

    def _check_usable(self) -> None:
        if not self._opened:
            raise StorageError("store is not open")
        if self._closing or self._closed:
            raise StorageError("store is closed")
        if self._failed is not None:
            raise StorageError(self._failed)

    def _lead_one_batch(self) -> None:
        """Write and sync everything pending. Called and returns with _cond held.

        After one batch the leader hands over: a waiter whose record arrived meanwhile becomes
        the next leader, so no caller is kept flushing for others indefinitely.
        """
        batch = self._pending
        self._pending = []
        self._flushing = True
        failure: str | None = self._failed
        segment: _Segment | None = None
        offset = 0
        try:
            if failure is None:
                self._cond.release()
                try:
                    segment, offset, failure = self._write_batch(b"".join(e.frame for e in batch))
                finally:
                    self._cond.acquire()
            if failure is None:
                pos = offset
                lsns, offsets = segment.lsns, segment.offsets
                for e in batch:
                    lsn = self._next_lsn
                    self._next_lsn = lsn + 1
                    lsns.append(lsn)
                    offsets.append(pos)
                    e.index = self._index_add(e.session_id, lsn, e.reset)
                    pos += len(e.frame)
                self.sync_count += 1
                self.synced_records += len(batch)
            else:
                for e in batch:
                    e.error = StorageError(failure)
        except BaseException as exc:  # never leave followers waiting forever
            for e in batch:
                if e.index is None and e.error is None:
                    e.error = StorageError(f"append failed: {exc!r}")
            raise
        finally:
            self._flushing = False
            self._cond.notify_all()
            deferred = [e for e in batch if e.done is not None]
            if deferred:
                self._settle(deferred)

    def _settle(self, entries: list[_Entry]) -> None:
        """Call the deferred appends' callbacks, in log order, without holding _cond (a callback may
        read the store). Called and returns with _cond held; `_settling` keeps batches in order."""
        if any(e.error is not None for e in entries) and self._failed is None:
            failed = next(e.error for e in entries if e.error is not None)
            self._failed = f"store failed: a deferred append failed ({failed}); refusing further appends"
            log.critical("storage: %s", self._failed)
        self._settling.acquire()   # before letting go of _cond: the next batch settles after this one
        self._cond.release()
        try:
            via = self._settle_via
            if via is None:
                _run_callbacks(entries)
            else:
                try:
                    via(partial(_run_callbacks, entries))
                except RuntimeError:   # the loop it hands over to is closed: answer here
                    _run_callbacks(entries)
        finally:
            self._settling.release()
            self._cond.acquire()

    def settle_via(self, call_soon_threadsafe) -> None:
        """Hand each batch's deferred callbacks over as one `call_soon_threadsafe(fn)` (in log order:
        the receiver runs them in the order handed over) instead of running them on the writing
        thread. The transport passes its event loop's: what the callbacks wake lives there, and
        one wakeup per batch replaces a GIL hand-over per callback."""
        self._settle_via = call_soon_threadsafe

    def _write_batch(self, data: bytes) -> tuple[_Segment | None, int, str | None]:
        """Leader only, without the lock. Returns (segment, start offset, failure message or None)."""
        if self._write_offset >= self.segment_bytes and self._write_offset > 0:
            try:
                self._rotate()
            except (OSError, StorageError) as e:
                return None, 0, f"cannot start a new log segment: {e}"
        fd, segment, start = self._write_fd, self._active, self._write_offset
        try:
            view = memoryview(data)
            written = 0
            while written < len(data):
                n = os.pwrite(fd, view[written:], start + written)
                if n <= 0:
                    raise OSError(errno.EIO, "short write returned 0")
                written += n
            _sync(fd)
        except OSError as e:
            name = _segment_name(segment.number)
            message = f"log write/fdatasync failed in {name} at offset {start}: {e}"
            log.error("storage: %s; discarding the batch", message)
            try:
                os.ftruncate(fd, start)
                _sync(fd)
            except OSError as e2:
                self._failed = (
                    f"store failed: could not truncate {name} back to {start} "
                    f"after a failed write ({e2}); refusing further appends"
                )
                log.critical("storage: %s", self._failed)
            return segment, start, message
        self._write_offset = start + len(data)
        return segment, start, None

    def _rotate(self) -> None:
        number = self._active.number + 1
        fd = create_segment(self.wal_dir, number)
        seg = _Segment(number, os.path.join(self.wal_dir, _segment_name(number)), fd)
        with self._cond:
            # No LSN is handed out while we lead, so the next one is this segment's first.
            self._add_segment(seg)
        self._write_fd, self._active, self._write_offset = fd, seg, 0
        log.info("storage: started log segment %s", _segment_name(number))
        self._compactor.wake.set()   # a segment was sealed: the compactor may have work

    # ------------------------------------------------------------------ reading

    def _indexed(self, session_id: str) -> array | None:
        """The session's LSNs (None: not indexed). Called with the lock held; the store must be open."""
        if not self._opened or self._closed:
            raise StorageError("store is not open")
        return self._index.get(session_id)

    def history(self, session_id: str) -> list[LogRecord]:
        keep: list[_Segment] = []
        with self._cond:
            positions = self._indexed(session_id)
            if positions is None:
                return []
            start = self._start.get(session_id, 0)
            where = locate(self._segs, self._seg_first, positions[start:] if start else positions, keep)
            if where is None:
                raise StorageError(f"history of {session_id!r} refers to records that are no longer stored")
        return [read_record(fd, offset) for fd, offset in where]

    def full_history(self, session_id: str) -> list[LogRecord]:
        keep: list[_Segment] = []
        with self._cond:
            positions = self._indexed(session_id)
            where = None
            if positions is not None and self._start.get(session_id, 0):
                where = locate(self._segs, self._seg_first, positions, keep)
                if where is not None:
                    self._start.pop(session_id)   # shown (and kept) from now on
        if where is None:
            return self.history(session_id)
        return [read_record(fd, offset) for fd, offset in where]

    def complete_history(self, session_id: str) -> list[LogRecord] | None:
        keep: list[_Segment] = []
        with self._cond:
            positions = self._indexed(session_id)
            if positions is None:
                return None
            where = locate(self._segs, self._seg_first, positions, keep)   # None: some of them were compacted away
        if where is None:
            return None
        records = [read_record(fd, offset) for fd, offset in where]
        return records if records and starts_incarnation(records[0]) else None

    def release(self, session_id: str) -> None:
        with self._cond:
            positions = self._index.pop(session_id, None)
            start = self._start.pop(session_id, 0)
            self._ended_at.pop(session_id, None)
            if positions is not None:
                floor = self._floor.get(session_id, 0)
                self._count_dead(lsn for lsn in positions[start:] if lsn < floor)

    def replay(self) -> Iterator[tuple[str, list[LogRecord]]]:
        with self._cond:
            if not self._opened or self._closed:
                raise StorageError("store is not open")
            session_ids = list(self._index)
        for session_id in session_ids:
            yield session_id, self.history(session_id)

    # ------------------------------------------------------------------ compaction

    def start_maintenance(self) -> None:
        """Start the background compactor (no-op when compact_dead_ratio is None)."""
        self._compactor.start()

    def compact(self, min_dead_ratio: float | None = None) -> int:
        """One compaction pass over the sealed segments; returns the bytes it freed.

        A segment is examined when its estimated dead share reaches `min_dead_ratio` (default
        `compact_dead_ratio`; 0 examines every sealed segment) and rewritten when its exact dead
        share does (and it has at least one dead record)."""
        return self._compactor.compact(min_dead_ratio)

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        self._compactor.stop()
        with self._cond:
            if self._closed:
                return
            self._closing = True
            # In-flight appends drain: their callers take turns as leader until nothing is pending.
            while self._flushing or self._pending:
                self._cond.wait()
            try:
                if self._write_fd >= 0 and self._failed is None:
                    try:
                        _sync(self._write_fd)
                    except OSError as e:
                        log.error("storage: final fdatasync failed: %s", e)
            finally:
                self._release_files()
                self._closed = True
                self._cond.notify_all()   # the deferred-append flusher ends

    def _release_files(self) -> None:
        for seg in self._segs:
            if seg.fd == self._write_fd:
                seg.fd = -1
            seg.close()
        if self._write_fd >= 0:
            try:
                os.close(self._write_fd)
            except OSError:
                pass
        self._write_fd = -1
        if self._lock_fd >= 0:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = -1
