"""Session history storage: the `Store` interface and its implementations.

`open_store()` picks the implementation once at start-up; the engine only sees `Store` (a `SharedStore`
when several instances share it) and registries see a `DocumentStore`.
"""
from __future__ import annotations

from .base import DocumentStore, RecoveryReport, SharedStore, StorageError, Store
from .file_log import DEFAULT_DATA_DIR, FileLogStore
from .memory import MemoryStore
from .records_pb2 import (
    ENTRY_KIND_CHECKPOINT,
    ENTRY_KIND_INCOMING,
    ENTRY_KIND_INTERNAL,
    ENTRY_KIND_UNSPECIFIED,
    EntryKind,
    LogRecord,
    SessionSnapshot,
    SessionStatus,
)

__all__ = [
    "Store",
    "SharedStore",
    "DocumentStore",
    "StorageError",
    "RecoveryReport",
    "LogRecord",
    "SessionSnapshot",
    "SessionStatus",
    "EntryKind",
    "ENTRY_KIND_UNSPECIFIED",
    "ENTRY_KIND_INCOMING",
    "ENTRY_KIND_INTERNAL",
    "ENTRY_KIND_CHECKPOINT",
    "MemoryStore",
    "FileLogStore",
    "DEFAULT_DATA_DIR",
    "open_store",
]


def open_store(memory_only: bool, data_dir: str = DEFAULT_DATA_DIR, backend: str = "file",
               database_url: str | None = None, **opts) -> Store:
    """Build the configured store. Does not call `open()`; the caller does, and logs its report.

    memory_only: a `MemoryStore` (nothing survives a restart; `data_dir` and opts are ignored).
    backend "postgres": a `PostgresStore` on `database_url` shared with other instances (opts:
    pool_size). Otherwise a `FileLogStore` in `data_dir`; opts go to its constructor (e.g. segment_bytes).
    """
    if memory_only:
        return MemoryStore()
    if backend == "postgres":
        from .postgres.store import PostgresStore  # imports the driver only when it is used

        return PostgresStore(database_url or "", **opts)
    return FileLogStore(data_dir, **opts)
