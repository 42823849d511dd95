"""Keeps every mode spec text a session started under, so a restart replays each session with the
rules it started with even if its spec file changed in the meantime.

A SessionStart record carries the digest of its mode's spec (`LogRecord.mode_spec_digest`). The first
time a digest is used, its YAML text is written durably to the registry documents (before the
SessionStart is acknowledged). On replay, a session whose digest differs from the spec loaded today
is compiled from the archived text instead (compiled once per digest). Hook code is not archived:
hooks are part of the runtime release; the YAML (phases, senders, guards, commit condition) is.
"""
from __future__ import annotations

import logging
import threading

from ..codegen import CompiledMode, compile_spec, load_spec_text

log = logging.getLogger("macp_runtime.spec_archive")


class SpecArchive:
    def __init__(self, documents):
        self.documents = documents
        self._known: set[str] = set()
        self._compiled: dict[str, CompiledMode] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _name(digest: str) -> str:
        return f"spec-{digest}"

    def archived(self, mode: CompiledMode) -> bool:
        """True when `ensure(mode)` has nothing to write (a set lookup: the transport asks on the loop)."""
        return mode.source_text is None or mode.digest in self._known

    def ensure(self, mode: CompiledMode) -> str:
        """Archive `mode`'s spec text if this digest was never archived. Returns the digest to record."""
        digest = mode.digest
        if digest in self._known or mode.source_text is None:
            return digest if mode.source_text is not None else ""
        with self._lock:
            if digest not in self._known:
                if self.documents.load(self._name(digest)) is None:
                    self.documents.save(self._name(digest), {"mode": mode.name, "file": mode.source,
                                                             "text": mode.source_text})
                self._known.add(digest)
                self._compiled.setdefault(digest, mode)
        return digest

    def compiled(self, digest: str, current: CompiledMode) -> CompiledMode:
        """The mode a replayed session must run: `current` when the digest matches, else the archived one."""
        if not digest or digest == current.digest:
            return current
        mode = self._compiled.get(digest)
        if mode is not None:
            return mode
        doc = self.documents.load(self._name(digest))
        if doc is None:
            log.warning("spec %s of mode %s is not archived; replaying with today's spec", digest[:12], current.name)
            return current
        mode = compile_spec(load_spec_text(doc["text"], doc.get("file") or "<archived spec>"),
                            doc.get("file") or "<archived spec>")
        log.info("replaying sessions of %s started under an earlier spec (%s)", current.name, digest[:12])
        self._compiled[digest] = mode
        return mode
