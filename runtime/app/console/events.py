"""Live events for the console: the engine's accepted envelopes and lifecycle events, and registry
changes, fanned out to server-sent-event clients on the console's asyncio loop.

The hub is an engine observer only while at least one client is connected, so an idle console costs
the engine nothing but an empty-tuple test per message. The observer side runs in whatever thread
made the change (under the session's lock): it takes a small snapshot, appends it to a deque and
wakes the loop at most once per batch. On the loop each event is turned into JSON once and queued
to every client that may read its session (the kernel's rule); a client more than CLIENT_CAPACITY
events behind gets a final `lagged` event and is closed (the page then reconnects and reloads).
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading

from ...storage import ENTRY_KIND_INCOMING
from ...vocabulary.broadcast import CLOSED, LAGGED
from ...vocabulary.session import now_ms
from .facade import EVENT_NAMES, STATE_NAMES, entry_dict, summary

log = logging.getLogger("macp_runtime.console")

CLIENT_CAPACITY = 1024
MAX_CLIENTS = 256            # event streams open at once
MAX_CLIENTS_PER_IDENTITY = 16
_END = object()


def sse(event: str, data) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Client:
    __slots__ = ("identity", "session_id", "queue", "done")

    def __init__(self, identity, session_id: str | None):
        self.identity = identity
        self.session_id = session_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def put(self, item) -> None:
        if self.done:
            return
        if self.queue.qsize() >= CLIENT_CAPACITY:
            self.done = True
            self.queue.put_nowait(sse("lagged", {"reason": f"more than {CLIENT_CAPACITY} events behind"}))
            self.queue.put_nowait(_END)
            return
        self.queue.put_nowait(item)

    def end(self, item=None) -> None:
        if not self.done:
            self.done = True
            if item is not None:
                self.queue.put_nowait(item)
            self.queue.put_nowait(_END)


class Hub:
    def __init__(self, engine, view, loop: asyncio.AbstractEventLoop):
        self.engine = engine
        self.view = view
        self.loop = loop
        self.clients: set[Client] = set()
        self._pending: collections.deque = collections.deque()
        self._scheduled = False
        self._observing = False
        self._closed = False
        self._bridges: list = []

    # --- engine side (any thread) -------------------------------------------------------------------

    def accepted(self, session, index: int, env) -> None:
        self._pending.append(("envelope", session, index, env, session.phase, session.status,
                              session.log_length, now_ms()))
        self._wake()

    def lifecycle(self, event: int, session, now: int) -> None:
        self._pending.append(("lifecycle", session, event, now, session.phase, session.status,
                              session.log_length))
        self._wake()

    def registry_changed(self, which: str) -> None:
        self._pending.append(("registry", which))
        self._wake()

    def _wake(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:   # the loop is closed: the console is stopping
                pass

    # --- loop side ----------------------------------------------------------------------------------

    def _drain(self) -> None:
        self._scheduled = False
        pending = self._pending
        while pending:
            item = pending.popleft()
            try:
                self._dispatch(item)
            except Exception:   # one odd event must not stop the others
                log.exception("console: could not dispatch an event")

    def _dispatch(self, item) -> None:
        if item[0] == "registry":
            data = sse(item[1], {"changed": item[1]})
            for client in list(self.clients):
                if client.session_id is None:
                    client.put(data)
            return
        kind, session = item[0], item[1]
        readers = [c for c in self.clients
                   if (c.session_id is None or c.session_id == session.session_id)
                   and self.view.may_read(session, c.identity)]
        if not readers:
            return
        row = summary(session)
        row["phase"], row["state"], row["version"] = item[4], STATE_NAMES.get(item[5], "?"), item[6]
        if kind == "envelope":
            index, env = item[2], item[3]
            rec_like = _EnvelopeEntry(env, item[7])
            entry = entry_dict(session.compiled, index, rec_like)
            if entry is None:   # not an envelope nor a runtime entry: nothing the pages show
                return
            entry["phase"] = item[4]
            row["last_activity_ms"] = max(row["last_activity_ms"], entry["received_at_ms"] or 0)
            data = sse("envelope", {"session": row, "entry": entry})
        else:
            event, now = item[2], item[3]
            data = sse("lifecycle", {"event": EVENT_NAMES.get(event, str(event)), "observed_at_ms": now,
                                     "session": row})
        for client in readers:
            client.put(data)

    def refusal(self, identity) -> str | None:
        """Why one more event stream for `identity` is refused (None: it is not)."""
        if len(self.clients) >= MAX_CLIENTS:
            return f"too many open event streams ({MAX_CLIENTS})"
        if sum(1 for c in self.clients if c.identity.sender == identity.sender) >= MAX_CLIENTS_PER_IDENTITY:
            return f"too many open event streams for this identity ({MAX_CLIENTS_PER_IDENTITY})"
        return None

    def attach(self, identity, session_id: str | None) -> Client:
        client = Client(identity, session_id)
        if self._closed:
            client.end()
            return client
        self.clients.add(client)
        if not self._observing:
            self._observing = True
            self.engine.add_observer(self)
        return client

    def detach(self, client: Client) -> None:
        self.clients.discard(client)
        if not self.clients and self._observing:
            self._observing = False
            self.engine.remove_observer(self)

    def start_bridges(self) -> None:
        """Registry changes (WatchModeRegistry / WatchPolicies broadcasts) reach the pages too: one
        thread per registry, asleep until a change comes."""
        for which, broadcaster in (("modes", self.engine.modes.changes), ("policies", self.engine.policies.changes)):
            sub = broadcaster.subscribe()
            thread = threading.Thread(target=self._bridge, args=(which, broadcaster, sub), daemon=True,
                                      name=f"console-{which}")
            self._bridges.append([sub, thread])
            thread.start()

    def _bridge(self, which: str, broadcaster, sub) -> None:
        while not self._closed:
            item = sub.get()
            if item is CLOSED or self._closed:
                return
            if item is LAGGED:   # changes came faster than this thread woke: subscribe again
                sub = broadcaster.subscribe()
                for pair in self._bridges:
                    if pair[1] is threading.current_thread():
                        pair[0] = sub
            self.registry_changed(which)

    def close(self) -> None:
        """Stop: every client gets `bye` and its stream ends; the observers are removed."""
        self._closed = True
        if self._observing:
            self._observing = False
            self.engine.remove_observer(self)
        for sub, _ in self._bridges:
            sub.cancel()
        for client in list(self.clients):
            client.end(sse("bye", {"reason": "the server is shutting down"}))
        self.clients.clear()


class _EnvelopeEntry:
    """An accepted envelope in the shape `entry_dict` reads from log records."""

    __slots__ = ("kind", "message_type", "message_id", "sender", "timestamp_unix_ms", "received_at_ms", "payload")

    def __init__(self, env, received_at_ms: int):
        self.kind = ENTRY_KIND_INCOMING
        self.message_type = env.message_type
        self.message_id = env.message_id
        self.sender = env.sender
        self.timestamp_unix_ms = env.timestamp_unix_ms
        self.received_at_ms = received_at_ms
        self.payload = env.payload


END = _END
