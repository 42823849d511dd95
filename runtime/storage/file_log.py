"""The default embedded durable store: one shared, segmented write-ahead log.

Layout of the data directory::

    <data_dir>/LOCK            flock()ed for the store's lifetime (one process per directory)
    <data_dir>/wal/00000001.log
    <data_dir>/wal/00000002.log ...

Every segment is a sequence of frames::

    magic (4 bytes) | payload length (u32 LE) | CRC32 of payload (u32 LE) | serialized LogRecord

All sessions share the log, so concurrent appends can share one fdatasync (group commit):
the first caller that finds no flush in progress becomes the leader, writes everything pending
with one write and one fdatasync, publishes the result and hands over to the next waiter.
Per session, the store keeps only a packed array of (segment << 40 | offset) positions; records
are read back from disk with pread when asked for.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import threading
import zlib
from array import array
from typing import Iterator

from .base import RecoveryReport, StorageError, Store, starts_incarnation
from .records_pb2 import LogRecord

log = logging.getLogger(__name__)

MAGIC = b"\xa7ML\x01"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
HEADER_SIZE = _HEADER.size  # 12
#: Upper bound of one serialized record; larger lengths in a header mean damage.
MAX_RECORD_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
DEFAULT_DATA_DIR = ".macp-data"

_SEG_SHIFT = 40
_OFFSET_MASK = (1 << _SEG_SHIFT) - 1
_MAX_SEGMENT_NO = (1 << (64 - _SEG_SHIFT)) - 1
_SEGMENT_NAME = re.compile(r"^(\d{8,})\.log$")
_READ_AHEAD = 4096  # first pread of a record; most records fit, larger ones need a second read


def _segment_name(number: int) -> str:
    return f"{number:08d}.log"


def _sync(fd: int) -> None:
    # Looked up at call time (tests replace os.fdatasync); platforms without it use fsync.
    getattr(os, "fdatasync", os.fsync)(fd)


def frame(payload: bytes) -> bytes:
    """The on-disk frame of one serialized record."""
    return _HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


class _Entry:
    """One append waiting for its batch to be written (lives only until the append returns)."""

    __slots__ = ("session_id", "frame", "starts", "index", "error")

    def __init__(self, session_id: str, data: bytes, starts: bool) -> None:
        self.session_id = session_id
        self.frame = data
        self.starts = starts
        self.index: int | None = None
        self.error: StorageError | None = None


class FileLogStore(Store):
    durable = True

    def __init__(
        self,
        data_dir: str = DEFAULT_DATA_DIR,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError("segment_bytes must be positive")
        self.data_dir = os.path.abspath(data_dir)
        self.wal_dir = os.path.join(self.data_dir, "wal")
        self.segment_bytes = segment_bytes

        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._index: dict[str, array] = {}  # insertion order = first-append order
        self._pending: list[_Entry] = []
        self._flushing = False
        self._failed: str | None = None
        self._opened = False
        self._closing = False
        self._closed = False
        self._fds: dict[int, int] = {}  # segment number -> fd used for reading
        # Owned by the current leader (only one at a time, marked by _flushing):
        self._segment = 0
        self._write_fd = -1
        self._write_offset = 0
        self._lock_fd = -1
        #: Counters for benchmarks and tests: fdatasync calls of successful batches, records in them.
        self.sync_count = 0
        self.synced_records = 0

    # ------------------------------------------------------------------ open / recovery

    def open(self) -> RecoveryReport:
        with self._cond:
            if self._opened or self._closed:
                raise StorageError("FileLogStore.open() may be called only once")
            try:
                os.makedirs(self.wal_dir, exist_ok=True)
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
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
        try:
            names = os.listdir(self.wal_dir)
        except OSError as e:
            raise StorageError(f"cannot list {self.wal_dir}: {e}") from e
        numbers = []
        for name in names:
            m = _SEGMENT_NAME.match(name)
            if m and os.path.isfile(os.path.join(self.wal_dir, name)):
                numbers.append(int(m.group(1)))
        return sorted(numbers)

    def _recover(self) -> RecoveryReport:
        report = RecoveryReport()
        segments = self._segments_on_disk()
        if not segments:
            try:
                os.close(self._create_segment(1))
            except OSError as e:
                raise StorageError(f"cannot create the first log segment in {self.wal_dir}: {e}") from e
            segments = [1]
        for i, seg in enumerate(segments):
            self._scan_segment(seg, is_last=(i == len(segments) - 1), report=report)
        last = segments[-1]
        path = os.path.join(self.wal_dir, _segment_name(last))
        try:
            self._write_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            self._write_offset = os.fstat(self._write_fd).st_size
        except OSError as e:
            raise StorageError(f"cannot open {path} for writing: {e}") from e
        self._segment = last
        self._fds[last] = self._write_fd
        report.sessions = len(self._index)
        report.records = sum(len(a) for a in self._index.values())
        for line in report.problems:
            log.warning("storage recovery: %s", line)
        return report

    def _scan_segment(self, seg: int, *, is_last: bool, report: RecoveryReport) -> None:
        if seg > _MAX_SEGMENT_NO:
            raise StorageError(f"segment number {seg} too large")
        name = _segment_name(seg)
        path = os.path.join(self.wal_dir, name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise StorageError(f"cannot read {path}: {e}") from e
        view = memoryview(data)
        size = len(data)
        pos = 0
        while pos < size:
            record = self._frame_at(view, pos, size)
            if record is not None:
                session_id, end, starts = record
                self._index_add(session_id, seg, pos, starts)
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
            if nxt == -1 and is_last:
                report.problems.append(
                    f"{name}: invalid tail at offset {pos} ({end - pos} bytes, ~{lost} record(s)) truncated"
                )
                self._truncate_tail(path, pos)
            else:
                report.problems.append(
                    f"{name}: damaged region at offset {pos}..{end} ({end - pos} bytes, ~{lost} record(s)) skipped"
                )
            pos = end

    @staticmethod
    def _frame_at(view: memoryview, pos: int, size: int) -> tuple[str, int, bool] | None:
        """(session_id, end offset, starts an incarnation) of a valid frame at pos, else None."""
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
        return rec.session_id, end, starts_incarnation(rec)

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
        if number > _MAX_SEGMENT_NO:
            raise StorageError("segment numbers exhausted")
        path = os.path.join(self.wal_dir, _segment_name(number))
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if os.fstat(fd).st_size != 0:
                raise StorageError(f"new segment {path} already exists and is not empty")
            dfd = os.open(self.wal_dir, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _index_add(self, session_id: str, seg: int, offset: int, starts: bool = False) -> int:
        positions = self._index.get(session_id)
        if positions is None or starts:
            # A SessionStart begins a new incarnation: older records of the id are no longer indexed.
            positions = self._index[session_id] = array("Q")
        positions.append((seg << _SEG_SHIFT) | offset)
        return len(positions) - 1

    # ------------------------------------------------------------------ append (group commit)

    def append(self, record: LogRecord) -> int:
        payload = record.SerializeToString()
        if len(payload) > MAX_RECORD_BYTES:
            raise StorageError(f"record of {len(payload)} bytes exceeds the {MAX_RECORD_BYTES} byte limit")
        entry = _Entry(record.session_id, frame(payload), starts_incarnation(record))
        with self._cond:
            self._check_usable()
            self._pending.append(entry)
            while entry.index is None and entry.error is None:
                if not self._flushing:
                    # Leader: our entry is still pending, so the batch we take contains it.
                    self._lead_one_batch()
                else:
                    self._cond.wait()
            if entry.error is not None:
                raise entry.error
            return entry.index

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
        segment = offset = 0
        try:
            if failure is None:
                self._cond.release()
                try:
                    segment, offset, failure = self._write_batch(b"".join(e.frame for e in batch))
                finally:
                    self._cond.acquire()
            if failure is None:
                pos = offset
                for e in batch:
                    e.index = self._index_add(e.session_id, segment, pos, e.starts)
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

    def _write_batch(self, data: bytes) -> tuple[int, int, str | None]:
        """Leader only, without the lock. Returns (segment, start offset, failure message or None)."""
        if self._write_offset >= self.segment_bytes and self._write_offset > 0:
            try:
                self._rotate()
            except (OSError, StorageError) as e:
                return 0, 0, f"cannot start a new log segment: {e}"
        fd, segment, start = self._write_fd, self._segment, self._write_offset
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
            message = f"log write/fdatasync failed in {_segment_name(segment)} at offset {start}: {e}"
            log.error("storage: %s; discarding the batch", message)
            try:
                os.ftruncate(fd, start)
                _sync(fd)
            except OSError as e2:
                self._failed = (
                    f"store failed: could not truncate {_segment_name(segment)} back to {start} "
                    f"after a failed write ({e2}); refusing further appends"
                )
                log.critical("storage: %s", self._failed)
            return segment, start, message
        self._write_offset = start + len(data)
        return segment, start, None

    def _rotate(self) -> None:
        number = self._segment + 1
        fd = self._create_segment(number)
        with self._cond:
            self._fds[number] = fd
        self._write_fd, self._segment, self._write_offset = fd, number, 0
        log.info("storage: started log segment %s", _segment_name(number))

    # ------------------------------------------------------------------ reading

    def history(self, session_id: str) -> list[LogRecord]:
        with self._cond:
            if not self._opened or self._closed:
                raise StorageError("store is not open")
            positions = self._index.get(session_id)
            positions = array("Q", positions) if positions is not None else array("Q")
        return [self._read_at(p) for p in positions]

    def release(self, session_id: str) -> None:
        with self._cond:
            self._index.pop(session_id, None)

    def replay(self) -> Iterator[tuple[str, list[LogRecord]]]:
        with self._cond:
            if not self._opened or self._closed:
                raise StorageError("store is not open")
            session_ids = list(self._index)
        for session_id in session_ids:
            yield session_id, self.history(session_id)

    def _fd_for(self, segment: int) -> int:
        with self._cond:
            fd = self._fds.get(segment)
            if fd is None:
                path = os.path.join(self.wal_dir, _segment_name(segment))
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise StorageError(f"cannot open {path}: {e}") from e
                self._fds[segment] = fd
            return fd

    def _read_at(self, packed: int) -> LogRecord:
        segment, offset = packed >> _SEG_SHIFT, packed & _OFFSET_MASK
        fd = self._fd_for(segment)
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
            raise StorageError(f"cannot read record at {_segment_name(segment)}:{offset}: {e}") from e

    # ------------------------------------------------------------------ close

    def close(self) -> None:
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

    def _release_files(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        if self._write_fd >= 0 and self._write_fd not in self._fds.values():
            try:
                os.close(self._write_fd)
            except OSError:
                pass
        self._fds.clear()
        self._write_fd = -1
        if self._lock_fd >= 0:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = -1
