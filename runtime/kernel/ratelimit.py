"""Per-sender sliding-window rate limits (§9.2): one window for SessionStarts, one for messages."""
from __future__ import annotations

import collections
import threading
import time

WINDOW_S = 60.0
MAX_SENDERS = 100_000   # senders tracked at once; idle ones are dropped first


class SlidingWindow:
    """At most `limit` events per sender in any 60-second window. A refused event is not recorded."""

    def __init__(self, limit: int, max_senders: int = MAX_SENDERS):
        self.limit = limit
        self.max_senders = max_senders
        self._events: dict[str, collections.deque] = {}
        self._lock = threading.Lock()

    def allow(self, sender: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        horizon = now - WINDOW_S
        with self._lock:
            q = self._events.get(sender)
            if q is None:
                if len(self._events) >= self.max_senders:
                    self._prune(horizon)
                q = self._events[sender] = collections.deque()
            while q and q[0] < horizon:
                q.popleft()
            if len(q) >= self.limit:
                return False
            q.append(now)
            return True

    def _prune(self, horizon: float) -> None:
        """Memory stays bounded however many sender names appear: senders with nothing in the window
        go; if every tracked sender is active, the oldest-tracked half goes (they may then send
        `limit` more in this window, which a flood of distinct names could do anyway)."""
        events = self._events
        for key in [k for k, q in events.items() if not q or q[-1] < horizon]:
            del events[key]
        if len(events) >= self.max_senders:
            for key in list(events)[: len(events) // 2]:
                del events[key]

    def __len__(self) -> int:
        return len(self._events)
