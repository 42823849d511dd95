"""The storage contracts: `Store` (session histories, every backend), `SharedStore` (histories several
instances append to) and `DocumentStore` (registry documents).

The kernel talks only to these interfaces and reads a backend's capabilities from the attributes they
declare (`durable`, `shared`, `defers`), never by probing; which store sits behind them (memory, the
embedded file log, PostgreSQL) is chosen once at start-up.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import os
from typing import Any, Callable, ContextManager, Iterator

from .records_pb2 import ENTRY_KIND_CHECKPOINT, ENTRY_KIND_INCOMING, LogRecord

#: `message_type` of a checkpoint entry written while the session is open (MACP_CHECKPOINT_INTERVAL).
CHECKPOINT = "Checkpoint"
#: `message_type` of the checkpoint written once a session is terminal (see `is_terminal_checkpoint`).
TERMINAL_CHECKPOINT = "TerminalCheckpoint"


class StorageError(Exception):
    """A record could not be made durable. The caller must not acknowledge it."""


class AppendConflict(Exception):
    """A shared store (`Store.shared`) refused a conditional append: another writer advanced the
    session since the caller last read it. Nothing was written; read what was missed and judge again."""


@dataclasses.dataclass
class RecoveryReport:
    """What `open()` found on disk, for the start-up log line."""

    sessions: int = 0
    records: int = 0
    dropped_records: int = 0
    dropped_bytes: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def starts_incarnation(record: LogRecord) -> bool:
    """True for the record that begins a session: an Incoming `SessionStart`.

    A session id can be used again once its session was evicted from memory (runtime.md §5.9), so
    one id may own several *incarnations* in a store. Each begins with its own SessionStart record;
    `history()` and `replay()` return only the records of the latest incarnation, and `append()`
    counts indices from that SessionStart (index 0). Older incarnations stay on disk, unread (the file
    store's compaction drops them).
    """
    return record.kind == ENTRY_KIND_INCOMING and record.message_type == "SessionStart"


def is_terminal_checkpoint(record: LogRecord) -> bool:
    """True for the checkpoint of a terminal session. It stands for everything before it: after a
    restart a durable store's `history()` and `replay()` begin at the session's last such entry (the
    envelopes before it are no longer shown, as the reference runtime), and a store may drop them."""
    return record.kind == ENTRY_KIND_CHECKPOINT and record.message_type == TERMINAL_CHECKPOINT


class Store(abc.ABC):
    """Session histories. See `starts_incarnation` for how a reused session id is handled."""

    #: True when `append` returns only after the record is on stable storage.
    durable: bool = False
    #: True when other runtime instances append to the same sessions (storage/postgres.py): the engine
    #: then appends conditionally (`append(record, expect=...)`) and catches up on AppendConflict. A
    #: store that sets it is a `SharedStore` and implements the methods declared there.
    shared: bool = False
    #: True when `append_deferred` is implemented: the kernel may queue a record and be told once it is
    #: durable (the file log's group commit) instead of waiting in `append`.
    defers: bool = False
    #: True when the store counts its group commits in `sync_count` / `synced_records` (the file log),
    #: which the metrics endpoint then exports.
    counts_syncs: bool = False

    @abc.abstractmethod
    def open(self) -> RecoveryReport:
        """Prepare the store and index what it already holds. Called once before any other call."""

    @abc.abstractmethod
    def replay(self) -> Iterator[tuple[str, list[LogRecord]]]:
        """Every stored session with its records in append order, sessions in first-append order."""

    @abc.abstractmethod
    def append(self, record: LogRecord) -> int:
        """Append one record to its session's history and return its 0-based index there.

        Returns only once the record is durable (for a durable store). Raises StorageError when it is
        not; in that case the record must not appear in any later history or replay.
        Safe to call from many threads at once; records of one session keep their call order.
        """

    def append_deferred(self, record: LogRecord, done: Callable[[int | None, BaseException | None], None]) -> None:
        """Queue one record; `done(index, None)` once it is durable, `done(None, error)` when it can no
        longer become durable. Only stores with `defers = True` implement it."""
        raise NotImplementedError(f"{type(self).__name__} does not defer appends")

    def settle_via(self, call_soon_threadsafe: Callable[[Callable[[], None]], object]) -> None:
        """Stores with `defers`: hand `append_deferred` callbacks over through `call_soon_threadsafe(fn)`,
        one call per group commit, in log order, instead of calling them on the writing thread."""

    def append_many(self, records: list[LogRecord], linger: float = 0.0) -> list[int]:
        """Append several records (e.g. checkpoints of several sessions); their indices, in order.

        A durable store may make them durable together; all or none of them are appended. `linger`
        (seconds) lets it wait that long for other appends to share one sync with (background work)."""
        return [self.append(record) for record in records]

    @abc.abstractmethod
    def history(self, session_id: str) -> list[LogRecord]:
        """The session's records in append order ([] when unknown)."""

    def full_history(self, session_id: str) -> list[LogRecord]:
        """Recovery's fallback when a session's last terminal checkpoint cannot be restored: the
        records before it too, when the store still has all of them (else the same as `history()`).
        From then on `history()` shows them as well."""
        return self.history(session_id)

    def complete_history(self, session_id: str) -> list[LogRecord] | None:
        """The latest incarnation's records from its SessionStart on, checkpoints included, or None when
        the store no longer holds its beginning (compaction). Read-only: unlike `full_history` it
        changes nothing about what `history()` shows or what compaction keeps."""
        records = self.history(session_id)
        return records if records and starts_incarnation(records[0]) else None

    def start_maintenance(self) -> None:
        """Recovery is over: background work (e.g. compaction of the file log) may begin."""

    def release(self, session_id: str) -> None:
        """The runtime evicted the session from memory: drop what the store keeps in memory for it.

        Durable records stay where they are (a durable store shows them again after the next
        `open()`); `history()` of a released id is [] until a new incarnation is appended.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release files. Further calls are errors."""


class SharedStore(Store):
    """A store several runtime instances append to at once (MACP_STORAGE_BACKEND=postgres). Besides the
    `Store` methods, the kernel's multi-instance path (engine catch-up, recovery, eviction, checkpoints of
    the history it keeps) uses exactly these."""

    durable = True
    shared = True

    @abc.abstractmethod
    def append(self, record: LogRecord, expect: tuple[int, int] | None = None) -> int:  # type: ignore[override]
        """`Store.append`, conditional when `expect` = (incarnation, length) is given: raises
        AppendConflict when another instance has appended to the session since then."""

    @abc.abstractmethod
    def load(self, session_id: str) -> tuple[int, list[LogRecord]] | None:
        """The session's latest incarnation and its records, or None when the store has none."""

    @abc.abstractmethod
    def since(self, session_id: str, incarnation: int, length: int) -> tuple[int, list[LogRecord], bool]:
        """What other instances appended after (incarnation, length): (incarnation, new records, replaced),
        replaced = True when a newer incarnation superseded the one asked about (records then start it)."""

    @abc.abstractmethod
    def history_upto(self, session_id: str, incarnation: int, length: int) -> list[LogRecord]:
        """The first `length` records of that incarnation (what this instance has applied)."""

    @abc.abstractmethod
    def overview(self) -> list[tuple[str, int, int]]:
        """(session id, incarnation, length) of every stored session, for catch-up after a gap."""

    @abc.abstractmethod
    def load_many(self, session_ids: list[str]) -> dict[str, tuple[int, list[LogRecord]]]:
        """`load` for several sessions in one round trip (ids the store lacks are absent)."""

    @abc.abstractmethod
    def replay_shared(self) -> Iterator[tuple[str, int, list[LogRecord]]]:
        """Recovery: every stored session as (id, incarnation, records)."""

    @abc.abstractmethod
    def documents(self) -> DocumentStore:
        """The registry documents kept beside the sessions, shared by every instance."""


class DocumentStore(abc.ABC):
    """Small named JSON documents rewritten whole (policy, mode and receipt-key registries, spec archive)."""

    #: True when `save` returns only after the document is on stable storage.
    durable: bool = False
    #: True when other runtime instances read and write the same documents.
    shared: bool = False

    @abc.abstractmethod
    def load(self, name: str) -> Any:
        """The stored document, or None when there is none. A damaged document raises StorageError."""

    @abc.abstractmethod
    def save(self, name: str, doc: Any) -> None:
        """Replace the document (all or nothing)."""

    def locked(self, name: str) -> ContextManager[Any]:
        """A context in which this name's load-modify-save is exclusive across every instance that shares
        the documents; a no-op where only one process writes them."""
        return contextlib.nullcontext()


def private_dirs(*paths: str) -> None:
    """Create each directory (parents too) if needed and make it 0700, whatever the umask: the data
    directory holds every session's messages. Files in it are created 0600."""
    for path in paths:
        os.makedirs(path, mode=0o700, exist_ok=True)
        if os.stat(path).st_mode & 0o777 != 0o700:
            os.chmod(path, 0o700)


def write_private_atomic(path: str, data: bytes) -> None:
    """Replace `path` with `data` durably and privately: a 0600 temporary file (whatever the umask or a
    leftover file said), fsynced, renamed over the target, then the directory fsynced. Raises OSError."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
