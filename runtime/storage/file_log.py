"""The default embedded durable store: one shared, segmented write-ahead log, compacted in the background.

Layout of the data directory::

    <data_dir>/LOCK                     flock()ed for the store's lifetime (one process per directory)
    <data_dir>/wal/00000001.log
    <data_dir>/wal/00000002.log ...
    <data_dir>/wal/00000001.log.compact a compaction's replacement before its rename (transient)

Every segment is a sequence of frames::

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

Checkpoints and compaction. A terminal checkpoint (`base.is_terminal_checkpoint`) stands for its
session's whole history. A record is *live* while it is at or after its session's *floor* — the
latest SessionStart of the id, or the latest terminal checkpoint after it — or while `history()`
still shows it (a session that became terminal in this process keeps showing its envelopes until it
is released or the store is reopened; after a reopen its history begins at the checkpoint). Other
records (older incarnations, envelopes covered by a terminal checkpoint) are dead.

Each segment keeps an estimate of its dead records: counted when the recovery scan passes a terminal
checkpoint or a new incarnation, and when a session is released. A background thread, started by
`start_maintenance()` (after the engine's recovery, which may still fall back to records before a
checkpoint), wakes when a segment is sealed, every `compact_interval_s` and once at start, and rewrites
each sealed segment whose estimated dead share reaches `compact_dead_ratio`, after computing liveness
exactly: the live frames are copied verbatim to `<segment>.compact`, which is fsynced, renamed over the
segment, and the directory fsynced; a segment with nothing live is unlinked. A crash at any point
leaves the old or the new file, both of which replay to the same sessions; a leftover `.compact` file
is deleted at open. Appends never wait for compaction: it only takes the store lock for short steps.
Only sealed segments are compacted: a segment is sealed when it reaches `segment_bytes`, and every
open seals what earlier processes wrote (appends go to a new segment; an empty last one is reused).
Segments are never merged, so a compacted segment stays a (smaller) file of its own.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from array import array
from bisect import bisect_left, bisect_right
from typing import Iterator, cast

from .base import RecoveryReport, StorageError, Store, is_terminal_checkpoint, private_dirs, starts_incarnation
from .records_pb2 import LogRecord

log = logging.getLogger(__name__)

MAGIC = b"\xa7ML\x01"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
HEADER_SIZE = _HEADER.size  # 12
#: Upper bound of one serialized record; larger lengths in a header mean damage.
MAX_RECORD_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_DATA_DIR = ".macp-data"
#: A sealed segment is rewritten once at least this share of its records is dead.
DEFAULT_COMPACT_DEAD_RATIO = 0.5
#: How often the compactor looks at the estimates even when no segment was sealed.
DEFAULT_COMPACT_INTERVAL_S = 60.0

_SEGMENT_NAME = re.compile(r"^(\d{8,})\.log$")
_COMPACT_SUFFIX = ".compact"
_READ_AHEAD = 4096  # first pread of a record; most records fit, larger ones need a second read
_LIVENESS_CHUNK = 2048  # records judged per hold of the store lock during compaction

# What a record does to its session's index (see _index_add).
_PLAIN, _STARTS, _TERMINAL = 0, 1, 2


def _segment_name(number: int) -> str:
    return f"{number:08d}.log"


def _sync(fd: int) -> None:
    # Looked up at call time (tests replace os.fdatasync); platforms without it use fsync.
    getattr(os, "fdatasync", os.fsync)(fd)


def _sync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def frame(payload: bytes) -> bytes:
    """The on-disk frame of one serialized record."""
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _reset_kind(record: LogRecord) -> int:
    if starts_incarnation(record):
        return _STARTS
    if is_terminal_checkpoint(record):
        return _TERMINAL
    return _PLAIN


def _session_id_of(payload) -> str:
    """The session id of a serialized LogRecord (field 1 comes first when present)."""
    if len(payload) >= 2 and payload[0] == 0x0A:
        length, shift, i = 0, 0, 1
        while i < len(payload) and i < 6:
            b = payload[i]
            length |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                if i + length <= len(payload):
                    return bytes(payload[i:i + length]).decode("utf-8")
                break
            shift += 7
    return LogRecord.FromString(bytes(payload)).session_id


class _Entry:
    """One append waiting for its batch to be written (lives only until the append returns)."""

    __slots__ = ("session_id", "frame", "reset", "index", "error", "done")

    def __init__(self, session_id: str, data: bytes, reset: int, done=None) -> None:
        self.session_id = session_id
        self.frame = data
        self.reset = reset
        self.index: int | None = None
        self.error: StorageError | None = None
        self.done = done   # append_deferred: called with (index, error) once the batch is settled


class _Segment:
    """One segment file: where its records lie (LSN -> offset) and a read fd, opened when first needed."""

    __slots__ = ("number", "path", "fd", "lsns", "offsets", "dead", "retired", "recheck_at_ms", "__weakref__")

    def __init__(self, number: int, path: str, fd: int = -1) -> None:
        self.number = number
        self.path = path
        self.fd = fd
        self.lsns = array("Q")       # ascending
        self.offsets = array("Q")    # offsets[i] is where the record lsns[i] starts
        self.dead = 0                # estimated dead records: the compaction trigger
        self.retired = False         # replaced by a compaction (or unlinked): never reopen by path
        self.recheck_at_ms = 0       # history kept for replays until then (history_retention_ms): look again

    def offset_of(self, lsn: int) -> int | None:
        i = bisect_left(self.lsns, lsn)
        if i < len(self.lsns) and self.lsns[i] == lsn:
            return self.offsets[i]
        return None

    def read_fd(self) -> int:
        """Called with the store lock held."""
        if self.fd < 0:
            if self.retired:
                raise StorageError(f"{os.path.basename(self.path)} was compacted away")
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise StorageError(f"cannot open {self.path}: {e}") from e
        return self.fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()


class FileLogStore(Store):
    durable = True
    defers = True
    counts_syncs = True

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
        self._flushing = False
        self._flusher: threading.Thread | None = None   # leads batches of deferred appends
        self._settling = threading.Lock()                  # deferred callbacks run one batch at a time
        self._failed: str | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        # Owned by the current leader (only one at a time, marked by _flushing):
        self._active: _Segment | None = None
        self._write_fd = -1
        self._write_offset = 0
        self._lock_fd = -1
        # Compaction:
        self._maint_thread: threading.Thread | None = None
        self._maint_wake = threading.Event()
        self._stopping = False
        self._compact_lock = threading.Lock()   # one compaction at a time (thread or compact())
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
            self._take_lock()
            try:
                report = self._recover()
            except BaseException:
                self._release_files()
                raise
            self._opened = True
            return report

    def _take_lock(self) -> None:
        path = os.path.join(self.data_dir, "LOCK")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StorageError(f"cannot open lock file {path}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(
                    f"data directory {self.data_dir} is in use by another process (lock held on {path})"
                ) from e
            raise StorageError(f"cannot lock {path}: {e}") from e
        self._lock_fd = fd

    def _segments_on_disk(self) -> list[int]:
        """Segment numbers in order. Leftovers of an interrupted compaction are deleted."""
        try:
            names = os.listdir(self.wal_dir)
        except OSError as e:
            raise StorageError(f"cannot list {self.wal_dir}: {e}") from e
        numbers = []
        for name in names:
            path = os.path.join(self.wal_dir, name)
            if name.endswith(_COMPACT_SUFFIX) and _SEGMENT_NAME.match(name[: -len(_COMPACT_SUFFIX)]):
                try:
                    os.unlink(path)
                except OSError as e:
                    raise StorageError(f"cannot remove {path}: {e}") from e
                log.info("storage: removed %s, left by an interrupted compaction (its segment is intact)", name)
                continue
            m = _SEGMENT_NAME.match(name)
            if m and os.path.isfile(path):
                numbers.append(int(m.group(1)))
        return sorted(numbers)

    def _recover(self) -> RecoveryReport:
        report = RecoveryReport()
        numbers = self._segments_on_disk()
        if not numbers:
            try:
                os.close(self._create_segment(1))
            except OSError as e:
                raise StorageError(f"cannot create the first log segment in {self.wal_dir}: {e}") from e
            numbers = [1]
        for i, number in enumerate(numbers):
            seg = _Segment(number, os.path.join(self.wal_dir, _segment_name(number)))
            self._add_segment(seg)
            self._scan_segment(seg, is_last=(i == len(numbers) - 1), report=report)
        last = self._segs[-1]
        if last.lsns or os.path.getsize(last.path):
            # What earlier processes wrote is sealed (so compaction may rewrite it): appends go to a new
            # segment. A last segment still empty is used as it is.
            try:
                fd = self._create_segment(last.number + 1)
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

    def _scan_segment(self, seg: _Segment, *, is_last: bool, report: RecoveryReport) -> None:
        name = os.path.basename(seg.path)
        try:
            with open(seg.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise StorageError(f"cannot read {seg.path}: {e}") from e
        view = memoryview(data)
        size = len(data)
        pos = 0
        while pos < size:
            record = self._frame_at(view, pos, size)
            if record is not None:
                session_id, end, reset, at_ms = record
                lsn = self._next_lsn
                self._next_lsn += 1
                seg.lsns.append(lsn)
                seg.offsets.append(pos)
                self._index_add(session_id, lsn, reset, recovering=True, at_ms=at_ms)
                pos = end
                continue
            # Damaged region: resynchronise on the next magic whose frame validates.
            nxt = data.find(MAGIC, pos + 1)
            while nxt != -1 and self._frame_at(view, nxt, size) is None:
                nxt = data.find(MAGIC, nxt + 1)
            end = size if nxt == -1 else nxt
            lost = max(1, data.count(MAGIC, pos, end))
            report.dropped_records += lost
            report.dropped_bytes += end - pos
            owner = self._damaged_owner(view, pos, end)
            hint = f", apparently of session {owner}" if owner else ""
            if nxt == -1 and is_last:
                report.problems.append(
                    f"{name}: invalid tail at offset {pos} ({end - pos} bytes, ~{lost} record(s){hint}) truncated"
                )
                self._truncate_tail(seg.path, pos)
            else:
                report.problems.append(
                    f"{name}: damaged region at offset {pos}..{end} ({end - pos} bytes, ~{lost} record(s){hint}) skipped"
                )
            pos = end

    @staticmethod
    def _damaged_owner(view: memoryview, pos: int, end: int) -> str | None:
        """Best effort, for the report: the session id a damaged frame starts with, when its header and
        the beginning of its payload still look right."""
        if pos + HEADER_SIZE + 2 > end:
            return None
        magic, length, _ = _HEADER.unpack_from(view, pos)
        if magic != MAGIC:
            return None
        try:
            owner = _session_id_of(view[pos + HEADER_SIZE : min(end, pos + HEADER_SIZE + length)])
        except Exception:
            return None
        return owner if owner and len(owner) <= 128 and owner.isprintable() and " " not in owner else None

    @staticmethod
    def _frame_at(view: memoryview, pos: int, size: int) -> tuple[str, int, int, int] | None:
        """(session_id, end offset, reset kind, received_at_ms) of a valid frame at pos, else None."""
        if pos + HEADER_SIZE > size:
            return None
        magic, length, crc = _HEADER.unpack_from(view, pos)
        if magic != MAGIC or length > MAX_RECORD_BYTES:
            return None
        end = pos + HEADER_SIZE + length
        if end > size:
            return None
        payload = view[pos + HEADER_SIZE : end]
        if zlib.crc32(payload) != crc:
            return None
        try:
            rec = LogRecord.FromString(payload)
        except Exception:  # DecodeError, or anything the parser dislikes
            return None
        return rec.session_id, end, _reset_kind(rec), rec.received_at_ms

    def _truncate_tail(self, path: str, offset: int) -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, offset)
                _sync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StorageError(f"cannot truncate damaged tail of {path} at {offset}: {e}") from e

    def _create_segment(self, number: int) -> int:
        """Create (or reuse an empty) segment file, fsync the directory, return an O_RDWR fd."""
        path = os.path.join(self.wal_dir, _segment_name(number))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size != 0:
                raise StorageError(f"new segment {path} already exists and is not empty")
            _sync_dir(self.wal_dir)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # ------------------------------------------------------------------ the index (lock held)

    def _segment_of(self, lsn: int) -> _Segment:
        return self._segs[bisect_right(self._seg_first, lsn) - 1]

    def _count_dead(self, lsns) -> None:
        for lsn in lsns:
            self._segment_of(lsn).dead += 1

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

    def _live_from(self, session_id: str) -> int:
        """Records of the session with a smaller LSN are dead."""
        floor = self._floor.get(session_id, 0)
        positions = self._index.get(session_id)
        if positions:
            ended = self._ended_at.get(session_id) if self._ended_at else None
            if ended is not None and ended >= self._keep_since:
                return positions[0]   # within MACP_HISTORY_RETENTION_SECS: the whole history stays
            first = positions[self._start.get(session_id, 0)]
            if first < floor:
                return first
        return floor

    def _locate(self, lsns, keep: list) -> list[tuple[int, int]] | None:
        """(fd, offset) of each LSN, or None when one of them is no longer stored. `keep` collects the
        segment objects whose fds the caller reads (they stay open while referenced)."""
        out = []
        last = None
        for lsn in lsns:
            seg = self._segment_of(lsn)
            offset = seg.offset_of(lsn)
            if offset is None:
                return None
            if seg is not last:
                keep.append(seg)
                last = seg
            out.append((seg.read_fd(), offset))
        return out

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
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_deferred, name="wal-flusher", daemon=True)
                self._flusher.start()
            self._cond.notify_all()

    def _flush_deferred(self) -> None:
        """Leads batches for deferred appends (nobody else waits for them)."""
        with self._cond:
            while not self._closed:
                if self._pending and not self._flushing:
                    self._lead_one_batch()
                else:
                    self._cond.wait()

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
            for e in entries:
                try:
                    e.done(e.index, e.error)
                except Exception:   # one bad callback must not keep the others from their answer
                    log.exception("storage: a deferred append's callback failed")
        finally:
            self._settling.release()
            self._cond.acquire()

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
        fd = self._create_segment(number)
        seg = _Segment(number, os.path.join(self.wal_dir, _segment_name(number)), fd)
        with self._cond:
            # No LSN is handed out while we lead, so the next one is this segment's first.
            self._add_segment(seg)
        self._write_fd, self._active, self._write_offset = fd, seg, 0
        log.info("storage: started log segment %s", _segment_name(number))
        self._maint_wake.set()   # a segment was sealed: the compactor may have work

    # ------------------------------------------------------------------ reading

    def history(self, session_id: str) -> list[LogRecord]:
        keep: list[_Segment] = []
        with self._cond:
            if not self._opened or self._closed:
                raise StorageError("store is not open")
            positions = self._index.get(session_id)
            if positions is None:
                return []
            start = self._start.get(session_id, 0)
            where = self._locate(positions[start:] if start else positions, keep)
            if where is None:
                raise StorageError(f"history of {session_id!r} refers to records that are no longer stored")
        return [self._read(fd, offset) for fd, offset in where]

    def full_history(self, session_id: str) -> list[LogRecord]:
        keep: list[_Segment] = []
        with self._cond:
            if not self._opened or self._closed:
                raise StorageError("store is not open")
            positions = self._index.get(session_id)
            where = None
            if positions is not None and self._start.get(session_id, 0):
                where = self._locate(positions, keep)
                if where is not None:
                    self._start.pop(session_id)   # shown (and kept) from now on
        if where is None:
            return self.history(session_id)
        return [self._read(fd, offset) for fd, offset in where]

    def complete_history(self, session_id: str) -> list[LogRecord] | None:
        keep: list[_Segment] = []
        with self._cond:
            if not self._opened or self._closed:
                raise StorageError("store is not open")
            positions = self._index.get(session_id)
            if positions is None:
                return None
            where = self._locate(positions, keep)   # None: some of them were compacted away
        if where is None:
            return None
        records = [self._read(fd, offset) for fd, offset in where]
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

    @staticmethod
    def _read(fd: int, offset: int) -> LogRecord:
        try:
            head = os.pread(fd, _READ_AHEAD, offset)
            if len(head) < HEADER_SIZE:
                raise StorageError("short read")
            magic, length, crc = _HEADER.unpack_from(head, 0)
            if magic != MAGIC:
                raise StorageError("bad magic")
            payload = head[HEADER_SIZE : HEADER_SIZE + length]
            if len(payload) < length:
                payload += os.pread(fd, length - len(payload), offset + len(head))
            if len(payload) != length or zlib.crc32(payload) != crc:
                raise StorageError("short read or checksum mismatch")
            return LogRecord.FromString(payload)
        except (OSError, StorageError, ValueError) as e:
            raise StorageError(f"cannot read record at offset {offset}: {e}") from e

    # ------------------------------------------------------------------ compaction

    def start_maintenance(self) -> None:
        """Start the background compactor (no-op when compact_dead_ratio is None)."""
        with self._cond:
            if (not self._opened or self._closing or self._closed or self._maint_thread is not None
                    or self.compact_dead_ratio is None):
                return
            self._maint_thread = threading.Thread(target=self._maintain, name="wal-compactor", daemon=True)
        self._maint_wake.set()   # one pass right away: a reopen usually leaves much to drop
        self._maint_thread.start()

    def _maintain(self) -> None:
        while not self._stopping:
            self._maint_wake.wait(self.compact_interval_s)
            self._maint_wake.clear()
            if self._stopping:
                return
            try:
                self.compact()
            except Exception:  # the next pass may do better; appends are unaffected
                log.exception("storage: compaction pass failed")

    def compact(self, min_dead_ratio: float | None = None) -> int:
        """One compaction pass over the sealed segments; returns the bytes it freed.

        A segment is examined when its estimated dead share reaches `min_dead_ratio` (default
        `compact_dead_ratio`; 0 examines every sealed segment) and rewritten when its exact dead
        share does (and it has at least one dead record)."""
        ratio = self.compact_dead_ratio if min_dead_ratio is None else min_dead_ratio
        if ratio is None:
            ratio = DEFAULT_COMPACT_DEAD_RATIO
        with self._compact_lock:
            with self._cond:
                if not self._opened or self._closed:
                    raise StorageError("store is not open")
                now = time.time_ns() // 1_000_000
                self._keep_since = now - self.history_retention_ms
                candidates = [s for s in self._segs[:-1]
                              if not s.retired and s.lsns and (s.dead >= ratio * len(s.lsns)
                                                               or 0 < s.recheck_at_ms <= now)]
            freed = 0
            for seg in candidates:
                if self._stopping:
                    break
                freed += self._compact_segment(seg, ratio)
            return freed

    def _compact_segment(self, seg: _Segment, ratio: float) -> int:
        with self._cond:
            if seg.retired or seg is self._segs[-1]:
                return 0
            lsns, offsets = array("Q", seg.lsns), array("Q", seg.offsets)
        name = os.path.basename(seg.path)
        try:
            with open(seg.path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.warning("storage: cannot read %s for compaction: %s", name, e)
            return 0
        view = memoryview(data)
        ends, sessions = [], []
        for off in offsets:
            magic, length, _ = _HEADER.unpack_from(view, off)
            if magic != MAGIC:
                log.warning("storage: %s changed under the compactor (offset %d); left alone", name, off)
                return 0
            end = off + HEADER_SIZE + length
            ends.append(end)
            sessions.append(_session_id_of(view[off + HEADER_SIZE : end]))
        keep: list[int] = []
        n = len(offsets)
        retain = self.history_retention_ms
        recheck = 0   # when the histories kept here for replays stop being kept
        for base in range(0, n, _LIVENESS_CHUNK):   # short holds of the lock: appends go on meanwhile
            with self._cond:
                live_from = self._live_from
                ended_at, floor = self._ended_at, self._floor
                for i in range(base, min(n, base + _LIVENESS_CHUNK)):
                    sid = sessions[i]
                    if lsns[i] >= live_from(sid):
                        keep.append(i)
                        if retain and lsns[i] < floor.get(sid, 0) and sid in ended_at:
                            recheck = max(recheck, ended_at[sid] + retain)
            if self._stopping:
                return 0
        dead = n - len(keep)
        if dead == 0 or dead < ratio * n:
            with self._cond:
                seg.dead = dead   # exact now: examined again once more records die (or at recheck_at_ms)
                seg.recheck_at_ms = recheck
            return 0
        tmp = seg.path + _COMPACT_SUFFIX
        fd = -1
        try:
            if keep:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                new_offsets = array("Q")
                chunks, pos = [], 0
                for i in keep:
                    new_offsets.append(pos)
                    chunks.append(view[offsets[i] : ends[i]])
                    pos += ends[i] - offsets[i]
                out = memoryview(b"".join(chunks))
                written = 0
                while written < len(out):
                    written += os.pwrite(fd, out[written:], written)
                os.fsync(fd)
                if self._stopping:
                    raise InterruptedError("store closing")
                os.replace(tmp, seg.path)
            else:
                os.unlink(seg.path)
            _sync_dir(self.wal_dir)
        except (OSError, InterruptedError) as e:
            if fd >= 0:
                os.close(fd)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if not isinstance(e, InterruptedError):
                log.warning("storage: compaction of %s failed, segment left as it was: %s", name, e)
            return 0
        new = _Segment(seg.number, seg.path, fd)
        new.recheck_at_ms = recheck
        new.lsns = array("Q", (lsns[i] for i in keep))
        if keep:
            new.offsets = new_offsets
        else:
            new.retired = True   # nothing left to read; the file is gone
        with self._cond:
            self._segs[self._segs.index(seg)] = new
            seg.retired = True   # readers holding it keep its fd until they drop it
            self.compactions += 1
            self.compacted_bytes += len(data) - (pos if keep else 0)
        freed = len(data) - (pos if keep else 0)
        log.info("storage: compacted %s: kept %d of %d records, %d -> %d bytes%s", name, len(keep), n,
                 len(data), pos if keep else 0, "" if keep else " (segment removed)")
        return freed

    # ------------------------------------------------------------------ close

    def close(self) -> None:
        self._stopping = True
        self._maint_wake.set()
        thread = self._maint_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
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
