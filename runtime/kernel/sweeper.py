"""The sweep (runtime.md §5.6, §5.9): a background pass that expires overdue OPEN sessions and evicts
terminal ones past their retention from memory; its first pass runs at start-up."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from ..vocabulary.errors import MacpError
from ..vocabulary.session import OPEN, Session
from .coordination import Coordination
from .records import Stale
from .table import SessionTable

log = logging.getLogger("macp_runtime.engine")


class Sweeper:
    def __init__(self, table: SessionTable, coordination: Coordination, clock: Callable[[], int],
                 expire: Callable[[Session, int], None], emit_due: Callable[[int], None], closing: threading.Event):
        """expire(session, now): record the expiry of an overdue session (its lock held); emit_due(now):
        the runtime's envelopes due by now (current.md §12.4); closing: set when the engine closes."""
        self._table = table
        self._coordination = coordination
        self._clock = clock
        self._expire = expire
        self._emit_due = emit_due
        self._closing = closing
        self._thread: threading.Thread | None = None

    def sweep(self, retention_ms: int) -> tuple[int, int]:
        """Expire OPEN sessions past their deadline, then evict RESOLVED/EXPIRED sessions that started
        more than `retention_ms` ago. Returns (expired, evicted)."""
        expired = evicted = 0
        coordination = self._coordination
        now = self._clock()
        coordination.before_sweep(now, self._emit_due)
        for session in self._table.all():
            if session.status != OPEN or now <= session.deadline_ms:
                continue
            with session.lock:
                if session.gone or session.status != OPEN or now <= session.deadline_ms:
                    continue
                try:
                    self._expire(session, now)
                    expired += 1
                except Stale:   # another instance got there first (expired it, or a message came in time)
                    pass
                except MacpError:
                    log.warning("sweep: could not record the expiry of session %s", session.session_id)
        cutoff = now - retention_ms
        evictable = self._table.evictable
        for session in self._table.all():
            if session.status in evictable and session.started_at_ms < cutoff and coordination.evict(session):
                evicted += 1
        if expired or evicted:
            log.info("sweep: %d sessions expired, %d evicted from memory", expired, evicted)
        return expired, evicted

    def start(self, interval_s: float) -> None:
        """Run `sweep` now and then every `interval_s` seconds until the engine closes."""
        table = self._table

        def loop():
            while not self._closing.is_set():
                try:
                    self.sweep(table.retention_ms)
                except Exception:  # the sweep must outlive one bad pass
                    log.exception("sweep failed")
                if self._closing.wait(interval_s):
                    return

        self._thread = threading.Thread(target=loop, name="sweeper", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
