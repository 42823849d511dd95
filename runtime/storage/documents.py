"""Small named JSON documents that must survive a restart (policy and mode registries).

Unlike session history these are rewritten whole on each change, which is rare. The file version
writes a temporary file, fsyncs it, renames it over the old one and fsyncs the directory, so a crash
leaves either the old or the new document, never a torn one.
"""
from __future__ import annotations

import json
import os
import threading

from .base import DocumentStore, StorageError, private_dirs, write_private_atomic


class MemoryDocuments(DocumentStore):
    """Documents kept in memory only (MACP_MEMORY_ONLY): nothing survives a restart."""

    durable = False

    def __init__(self):
        self._docs: dict[str, object] = {}
        self._lock = threading.Lock()

    def load(self, name: str):
        with self._lock:
            return json.loads(json.dumps(self._docs[name])) if name in self._docs else None

    def save(self, name: str, doc) -> None:
        with self._lock:
            self._docs[name] = json.loads(json.dumps(doc))


class FileDocuments(DocumentStore):
    """`<data_dir>/registry/<name>.json`, replaced atomically and durably on every save."""

    durable = True

    def __init__(self, data_dir: str):
        self.dir = os.path.join(data_dir, "registry")
        self._lock = threading.Lock()

    def _path(self, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad document name {name!r}")
        return os.path.join(self.dir, f"{name}.json")

    def load(self, name: str):
        """The stored document, or None when there is none. A damaged file raises StorageError."""
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {path}: {exc}") from None

    def save(self, name: str, doc) -> None:
        path = self._path(name)
        data = json.dumps(doc, ensure_ascii=False, sort_keys=True, indent=1).encode("utf-8")
        with self._lock:
            try:
                private_dirs(os.path.dirname(self.dir), self.dir)
                write_private_atomic(path, data)
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {exc}") from None


def open_documents(memory_only: bool, data_dir: str):
    return MemoryDocuments() if memory_only else FileDocuments(data_dir)
