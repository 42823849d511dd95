"""The session table: the sessions this instance holds in memory, by id; the open-session limit of an
identity; eviction of old terminal sessions (runtime.md §5.9).

The table's lock is held only for lookups and inserts, never across a disk write; each session is
serialised by its own lock.
"""
from __future__ import annotations

import threading
from typing import Callable

from ..storage import Store
from ..vocabulary.errors import Kind, MacpError
from ..vocabulary.session import CANCELLED, EXPIRED, OPEN, RESOLVED, Session

EVICTABLE = frozenset({RESOLVED, EXPIRED})
DEFAULT_RETENTION_MS = 3_600_000


class SessionTable:
    def __init__(self, store: Store, clock: Callable[[], int], *, evict_cancelled: bool = False,
                 retention_ms: int = DEFAULT_RETENTION_MS):
        self.store = store
        self._clock = clock
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.get = self.sessions.get                     # unlocked lookup (a dict read is atomic)
        self.evictable = EVICTABLE | {CANCELLED} if evict_cancelled else EVICTABLE   # §7
        # RESOLVED/EXPIRED sessions that started longer ago leave memory (MACP_SESSION_RETENTION_SECS)
        self.retention_ms = retention_ms

    def find(self, session_id: str) -> Session | None:
        """The session in memory under this id, if any (no expiry, no store round trip)."""
        session = self.sessions.get(session_id)
        return None if session is None or session.gone else session

    def all(self) -> list[Session]:
        with self.lock:
            return list(self.sessions.values())

    def __len__(self) -> int:
        return len(self.sessions)

    def check_open_limit(self, initiator: str, cap: int | None) -> None:
        """Under the table lock: refuse a new session beyond the identity's `max_open_sessions`."""
        if cap is None:
            return
        now = self._clock()
        count = sum(1 for s in self.sessions.values()
                    if s.initiator == initiator and s.status == OPEN and now <= s.deadline_ms)
        if count >= cap:
            raise MacpError(Kind.RateLimited, detail=f"{initiator} already has {count} open sessions")

    def drop(self, session: Session, replacement: Session | None = None) -> None:
        """Take `session` out of the table (if it is still the one there), or put `replacement` in its
        place; it is `gone` from now on."""
        with self.lock:
            if self.sessions.get(session.session_id) is session:
                if replacement is None:
                    del self.sessions[session.session_id]
                else:
                    self.sessions[session.session_id] = replacement
        session.gone = True

    def insert_unless_present(self, session: Session, evicted: dict | None = None) -> Session:
        """Put a loaded session in unless a live one is already there; returns the one in the table."""
        with self.lock:
            current = self.sessions.get(session.session_id)
            if current is not None and not current.gone:
                return current
            self.sessions[session.session_id] = session
            if evicted is not None:
                evicted.pop(session.session_id, None)
        return session

    def evictable_now(self, session: Session, now: int) -> bool:
        """Past its retention: a terminal session that started more than `retention_ms` ago."""
        return session.status in self.evictable and session.started_at_ms < now - self.retention_ms

    def evict(self, session: Session, evicted: dict | None = None) -> bool:
        """Take an evictable session out of memory (its store index released). `evicted`, when given,
        remembers id -> incarnation, so a shared store's refresh does not load it back."""
        with session.lock:
            if session.gone or session.status not in self.evictable:
                return False
            with self.lock:
                if self.sessions.get(session.session_id) is not session:
                    return False
                # Before the id becomes free: a new incarnation must not lose its index to this.
                self.store.release(session.session_id)
                del self.sessions[session.session_id]
                if evicted is not None:
                    evicted[session.session_id] = session.incarnation
            session.gone = True
        return True
