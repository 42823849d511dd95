"""Fan-out: everything that watches the kernel is fed from here, after the commit point and under the
session's lock (so per session the order is the log's order).

* stream channels: per session id, the subscribers (StreamSession) that get each accepted envelope; a
  session nobody watches has no channel at all, so publishing to it is one failed dict lookup;
* `lifecycle`: CREATED / RESOLVED / EXPIRED / SUSPENDED / RESUMED / CANCELLED for WatchSessions, as
  (event, Session, observed_at_ms) with the event one of the `Event` values below;
* `signals`: accepted Signals and Progress for WatchSignals (the transport publishes those);
* observers (the browser console): told of every accepted envelope and lifecycle event; they must
  never block.
With deferred commit (commit.py) all of it waits until the record is durable, in log order.
"""
from __future__ import annotations

import enum
import threading
from typing import Callable

from ..vocabulary.broadcast import Broadcaster
from ..vocabulary.session import Session

LIFECYCLE_CAPACITY = 64     # runtime.md §8.8
SIGNAL_CAPACITY = 256       # runtime.md §6


class Event(enum.IntEnum):
    """A session's lifecycle events (the numbers are those of macp.v1 SessionLifecycleEvent.EventType,
    so the transport sends them as they are)."""

    CREATED = 1
    RESOLVED = 2
    EXPIRED = 3
    SUSPENDED = 4
    RESUMED = 5
    CANCELLED = 6


class Accepted:
    """An accepted envelope as a session's subscribers get it (`subscriber.offer(index, accepted)`).
    `wire` is the transport's cache of its encoding, so N subscribers cost one encoding."""

    __slots__ = ("envelope", "wire")

    def __init__(self, envelope):
        self.envelope = envelope
        self.wire = None


class Fanout:
    def __init__(self, find: Callable[[str], Session | None], deferred: Callable, metrics):
        """find(session_id): the session in the table, if any; deferred(session): the Pending its
        latest append waits for when the calling thread defers (commit.CommitPoint.deferred)."""
        self._find = find
        self._deferred = deferred
        self.metrics = metrics
        # session id -> subscribers (copy-on-write tuple); only ids somebody watches have an entry.
        self.channels: dict[str, tuple] = {}
        self._channel_lock = threading.Lock()
        self.lifecycle = Broadcaster(LIFECYCLE_CAPACITY)   # items: (event, Session, observed_at_ms)
        self.signals = Broadcaster(SIGNAL_CAPACITY)        # items: (subject, WatchSignalsResponse)
        self.observers: tuple = ()
        self._streams: set = set()                         # open streams, told when the engine closes
        self._streams_lock = threading.Lock()
        self.closing = threading.Event()

    # --- stream subscribers ------------------------------------------------------------------------

    def subscribe(self, session_id: str, subscriber) -> None:
        """Live envelopes of `session_id` from now on go to `subscriber.offer(index, accepted)`."""
        with self._channel_lock:
            current = self.channels.get(session_id, ())
            if subscriber not in current:
                self.channels[session_id] = current + (subscriber,)

    def unsubscribe(self, session_id: str, subscriber) -> None:
        with self._channel_lock:
            current = self.channels.get(session_id)
            if current and subscriber in current:
                rest = tuple(s for s in current if s is not subscriber)
                if rest:
                    self.channels[session_id] = rest
                else:
                    del self.channels[session_id]

    def unsubscribe_settled(self, session_id: str, subscriber) -> None:
        """Unsubscribe, then wait until no publish to the session is still offering to it (a publish
        runs under the session's lock): afterwards nothing more reaches the subscriber."""
        self.unsubscribe(session_id, subscriber)
        session = self._find(session_id)
        if session is not None:
            with session.lock:
                pass

    def watched_sessions(self) -> list[str]:
        """Ids that have stream subscribers here."""
        with self._channel_lock:
            return list(self.channels)

    def watched(self, session_id: str) -> bool:
        """Whether anything here would see a change of the session (subscribers, watches, observers)."""
        return session_id in self.channels or bool(len(self.lifecycle)) or bool(self.observers)

    # --- publishing (under the session's lock, right after the commit point) -------------------------

    def publish(self, session: Session, env) -> None:
        """The envelope just appended as the session's latest record (or, for a deferring caller,
        queued: then delivered once durable, in log order)."""
        pending = self._deferred(session)
        if pending is not None:
            pending.defer(self._deliver, session, session.log_length - 1, env)
        else:
            self._deliver(session, session.log_length - 1, env)

    def _deliver(self, session: Session, index: int, env) -> None:
        if self.observers:
            for observer in self.observers:
                observer.accepted(session, index, env)
        subscribers = self.channels.get(session.session_id)
        if not subscribers:
            return
        item = Accepted(env)   # one object for every subscriber: the transport encodes it once
        for sub in subscribers:
            if not sub.offer(index, item):
                self.unsubscribe(session.session_id, sub)

    def emit(self, event: Event, session: Session, now: int) -> None:
        pending = self._deferred(session)
        if pending is not None:
            pending.defer(self._announce, event, session, now)
        else:
            self._announce(event, session, now)

    def _announce(self, event: Event, session: Session, now: int) -> None:
        self.metrics.session_event(event)
        if self.observers:
            for observer in self.observers:
                observer.lifecycle(event, session, now)
        if len(self.lifecycle):
            self.lifecycle.publish((event, session, now))

    # --- observers and open streams --------------------------------------------------------------------

    def add_observer(self, observer) -> None:
        """`observer.accepted(session, index, env)` and `observer.lifecycle(event, session, now)` from
        now on."""
        with self._channel_lock:
            if observer not in self.observers:
                self.observers = self.observers + (observer,)

    def remove_observer(self, observer) -> None:
        with self._channel_lock:
            self.observers = tuple(o for o in self.observers if o is not observer)

    def register_stream(self, stream) -> None:
        with self._streams_lock:
            self._streams.add(stream)
        if self.closing.is_set():
            stream.shutdown()

    def unregister_stream(self, stream) -> None:
        with self._streams_lock:
            self._streams.discard(stream)

    def close(self) -> None:
        """Shutdown: end the watches; streams registered from now on are ended at once."""
        self.closing.set()
        self.lifecycle.close()
        self.signals.close()

    def end_streams(self) -> None:
        """Shutdown, after `close`: end every open stream."""
        with self._streams_lock:
            streams = list(self._streams)
        for stream in streams:
            stream.shutdown()
