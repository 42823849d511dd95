"""Fan-out of events to watch streams, each subscriber with its own bounded queue.

A subscriber that falls more than `capacity` events behind is cut off (its queue yields `LAGGED`)
instead of slowing the publisher or growing memory: publishing never blocks.
"""
from __future__ import annotations

import collections
import threading

LAGGED = object()   # delivered once, last, to a subscriber that fell behind
CLOSED = object()   # delivered when the broadcaster shuts down


class Subscription:
    __slots__ = ("_items", "_cond", "_capacity", "_done", "_owner", "_notify")

    def __init__(self, owner: "Broadcaster", capacity: int, notify=None):
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition(threading.Lock())
        self._capacity = capacity
        self._done = False
        self._owner = owner
        self._notify = notify   # called (from the publishing thread) after every item, for async readers

    def _offer(self, item) -> bool:
        with self._cond:
            if self._done:
                return False
            if len(self._items) >= self._capacity:
                self._items.append(LAGGED)
                self._done = True
                self._cond.notify()
                accepted = False
            else:
                self._items.append(item)
                self._cond.notify()
                accepted = True
        if self._notify is not None:
            self._notify()
        return accepted

    def _close(self) -> None:
        with self._cond:
            if self._done:
                return
            self._items.append(CLOSED)
            self._done = True
            self._cond.notify()
        if self._notify is not None:
            self._notify()

    def get(self, timeout: float | None = None):
        """Next item; None on timeout; LAGGED or CLOSED as the final item."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            if not self._items:
                return None
            return self._items.popleft()

    def drain(self) -> list:
        """Everything already queued, without waiting."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            return items

    def cancel(self) -> None:
        self._owner.unsubscribe(self)
        self._close()


class Broadcaster:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()

    def subscribe(self, notify=None) -> Subscription:
        """`notify()` (optional) is called from the publishing thread after each item is queued."""
        sub = Subscription(self, self.capacity, notify)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)

    def publish(self, item) -> None:
        if not self._subs:
            return
        with self._lock:
            subs = list(self._subs)
        for sub in subs:
            if not sub._offer(item):
                self.unsubscribe(sub)

    def close(self) -> None:
        with self._lock:
            subs = list(self._subs)
            self._subs.clear()
        for sub in subs:
            sub._close()

    def __len__(self) -> int:
        return len(self._subs)
