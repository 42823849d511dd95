"""One segment file of the log (see file_log): its frame format, writing, reading and the recovery scan.

Every segment is a sequence of frames::

    magic (4 bytes) | payload length (u32 LE) | CRC32 of payload (u32 LE) | serialized LogRecord
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import struct
import zlib
from array import array
from bisect import bisect_left, bisect_right
from typing import Iterator

from .base import RecoveryReport, StorageError, is_terminal_checkpoint, starts_incarnation
from .records_pb2 import LogRecord

log = logging.getLogger(__name__)

MAGIC = b"\xa7ML\x01"
_HEADER = struct.Struct("<4sII")  # magic, payload length, crc32(payload)
HEADER_SIZE = _HEADER.size  # 12
#: Upper bound of one serialized record; larger lengths in a header mean damage.
MAX_RECORD_BYTES = 64 * 1024 * 1024

_SEGMENT_NAME = re.compile(r"^(\d{8,})\.log$")
_COMPACT_SUFFIX = ".compact"
_READ_AHEAD = 4096  # first pread of a record; most records fit, larger ones need a second read

# What a record does to its session's index (see FileLogStore._index_add).
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


def take_lock(data_dir: str) -> int:
    """flock() <data_dir>/LOCK for the store's lifetime; returns its fd."""
    path = os.path.join(data_dir, "LOCK")
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
                f"data directory {data_dir} is in use by another process (lock held on {path})"
            ) from e
        raise StorageError(f"cannot lock {path}: {e}") from e
    return fd


def segments_on_disk(wal_dir: str) -> list[int]:
    """Segment numbers in order. Leftovers of an interrupted compaction are deleted."""
    try:
        names = os.listdir(wal_dir)
    except OSError as e:
        raise StorageError(f"cannot list {wal_dir}: {e}") from e
    numbers = []
    for name in names:
        path = os.path.join(wal_dir, name)
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


def scan_segment(seg: _Segment, *, is_last: bool, report: RecoveryReport) -> Iterator[tuple[str, int, int, int]]:
    """The valid frames of a segment as (session_id, offset, reset kind, received_at_ms); damaged regions
    are skipped and reported (an invalid tail of the last segment is truncated)."""
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
        record = _frame_at(view, pos, size)
        if record is not None:
            session_id, end, reset, at_ms = record
            yield session_id, pos, reset, at_ms
            pos = end
            continue
        # Damaged region: resynchronise on the next magic whose frame validates.
        nxt = data.find(MAGIC, pos + 1)
        while nxt != -1 and _frame_at(view, nxt, size) is None:
            nxt = data.find(MAGIC, nxt + 1)
        end = size if nxt == -1 else nxt
        lost = max(1, data.count(MAGIC, pos, end))
        report.dropped_records += lost
        report.dropped_bytes += end - pos
        owner = _damaged_owner(view, pos, end)
        hint = f", apparently of session {owner}" if owner else ""
        if nxt == -1 and is_last:
            report.problems.append(
                f"{name}: invalid tail at offset {pos} ({end - pos} bytes, ~{lost} record(s){hint}) truncated"
            )
            _truncate_tail(seg.path, pos)
        else:
            report.problems.append(
                f"{name}: damaged region at offset {pos}..{end} ({end - pos} bytes, ~{lost} record(s){hint}) skipped"
            )
        pos = end


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


def _truncate_tail(path: str, offset: int) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            _sync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise StorageError(f"cannot truncate damaged tail of {path} at {offset}: {e}") from e


def create_segment(wal_dir: str, number: int) -> int:
    """Create (or reuse an empty) segment file, fsync the directory, return an O_RDWR fd."""
    path = os.path.join(wal_dir, _segment_name(number))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_size != 0:
            raise StorageError(f"new segment {path} already exists and is not empty")
        _sync_dir(wal_dir)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_record(fd: int, offset: int) -> LogRecord:
    """The record whose frame starts at offset (checked against its CRC)."""
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


def locate(segs: list[_Segment], seg_first: array, lsns, keep: list) -> list[tuple[int, int]] | None:
    """(fd, offset) of each LSN, or None when one of them is no longer stored. `segs` are the log's
    segments in order and `seg_first` their first LSNs; called with the store lock held. `keep` collects
    the segment objects whose fds the caller reads (they stay open while referenced)."""
    out = []
    last = None
    for lsn in lsns:
        seg = segs[bisect_right(seg_first, lsn) - 1]
        offset = seg.offset_of(lsn)
        if offset is None:
            return None
        if seg is not last:
            keep.append(seg)
            last = seg
        out.append((seg.read_fd(), offset))
    return out
