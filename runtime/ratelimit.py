"""Per-sender sliding-window rate limits (§9.2): one window for SessionStarts, one for messages."""
from __future__ import annotations

import collections
import threading
import time

WINDOW_S = 60.0


class SlidingWindow:
    """At most `limit` events per sender in any 60-second window. A refused event is not recorded."""

    def __init__(self, limit: int):
        self.limit = limit
        self._events: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, sender: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        horizon = now - WINDOW_S
        with self._lock:
            q = self._events.get(sender)
            if q is None:
                q = self._events[sender] = collections.deque()
            while q and q[0] < horizon:
                q.popleft()
            if len(q) >= self.limit:
                return False
            q.append(now)
            return True
