"""The notification bus between runtime instances that share one PostgreSQL database.

Each instance keeps one extra connection that LISTENs; PostgreSQL delivers a NOTIFY at commit, to
every listener, in commit order:

* `macp_log` "session_id incarnation index": sent for every record inserted (store.py queues them).
  The notification only wakes the instance: its listener then reads the log itself
  (`record_committed` -> catch-up by index), so order and completeness come from the log, not from the
  notifications. Sessions nobody watches there are not read at all (they catch up when next touched).
* `macp_registry` "name origin": a registry document changed; other instances reload it (policies,
  modes, receipt keys) and tell their watchers.
* `macp_signals` "origin base64": Signals and Progress are in no history, so they travel in the
  notification itself (8000 bytes at most; larger ones stay on their instance).

If the listening connection drops, the bus reconnects and catches up every watched session
(`positions`) and all registries, since notifications sent meanwhile are lost. A periodic pass does
the same as a safety net.

The listener (the kernel's shared-store coordination) is given to `start`; it has
`record_committed(session_id, incarnation, index)`, `signal_received(data: bytes)` and
`positions() -> [(session_id, incarnation, length)]`. The bus knows nothing else of the kernel.
"""
from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Callable

from .store import LOG_CHANNEL, REGISTRY_CHANNEL, PostgresDocuments, PostgresStore

log = logging.getLogger("macp_runtime.cluster")

SIGNAL_CHANNEL = "macp_signals"
MAX_NOTIFY_BYTES = 7900          # PostgreSQL's payload limit is 8000 bytes
RESYNC_EVERY_S = 30.0
RECONNECT_DELAY_S = 0.5


class PostgresBus:
    def __init__(self, url: str, store: PostgresStore, documents: PostgresDocuments,
                 reloaders: dict[str, Callable[[], None]]):
        """documents: this instance's registry documents (their `origin` names this instance in
        notifications); reloaders: document name -> callable that reloads that registry from the store."""
        self.url = url
        self.store = store
        self.origin = documents.origin
        self.reloaders = reloaders
        self._listener = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.notifications = 0

    def start(self, listener, timeout: float = 10.0) -> None:
        """Listen, delivering other instances' changes to `listener` (see the module's text)."""
        self._listener = listener
        self._thread = threading.Thread(target=self._run, name="cluster-listen", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            log.warning("cluster: not listening yet after %.0f s; going on (it keeps trying)", timeout)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    # --- outgoing ------------------------------------------------------------------------------

    def publish_signal(self, data: bytes) -> None:
        """Send an encoded WatchSignalsResponse to the other instances' WatchSignals subscribers."""
        payload = self.origin + " " + base64.b64encode(data).decode()
        if len(payload) > MAX_NOTIFY_BYTES:
            log.debug("cluster: signal of %d bytes not forwarded (NOTIFY limit)", len(payload))
            return
        try:
            self.store.notify(SIGNAL_CHANNEL, payload)
        except Exception as exc:
            log.warning("cluster: could not forward a signal: %s", exc)

    # --- incoming ------------------------------------------------------------------------------

    def _run(self) -> None:
        import psycopg

        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    for channel in (LOG_CHANNEL, REGISTRY_CHANNEL, SIGNAL_CHANNEL):
                        conn.execute(f"LISTEN {channel}")
                    if self._ready.is_set():   # a reconnect: whatever was sent meanwhile is lost
                        self._resync()
                    self._ready.set()
                    log.info("cluster: listening for other instances' changes")
                    self._listen(conn)
            except Exception as exc:
                if self._stop.is_set():
                    return
                log.warning("cluster: listening connection lost (%s); reconnecting", exc)
                self._stop.wait(RECONNECT_DELAY_S)

    def _listen(self, conn) -> None:
        last_resync = time.monotonic()
        while not self._stop.is_set():
            batch = list(conn.notifies(timeout=1.0, stop_after=1))
            if batch:   # take everything else already there, so one read serves many records
                batch.extend(conn.notifies(timeout=0.001, stop_after=1000))
                self._dispatch(batch)
            if time.monotonic() - last_resync > RESYNC_EVERY_S:
                last_resync = time.monotonic()
                self._resync(registries=False)

    def _dispatch(self, batch) -> None:
        self.notifications += len(batch)
        records: dict[str, tuple[int, int]] = {}
        registries: set[str] = set()
        for note in batch:
            if note.channel == LOG_CHANNEL:
                session_id, incarnation, index = note.payload.split(" ")
                key = (int(incarnation), int(index))
                if key > records.get(session_id, (0, -1)):
                    records[session_id] = key
            elif note.channel == REGISTRY_CHANNEL:
                name, _, origin = note.payload.partition(" ")
                if origin != self.origin:
                    registries.add(name)
            elif note.channel == SIGNAL_CHANNEL:
                origin, _, data = note.payload.partition(" ")
                if origin != self.origin:
                    self._signal(data)
        for name in registries:
            self._reload(name)
        for session_id, (incarnation, index) in records.items():
            self._committed(session_id, incarnation, index)

    def _committed(self, session_id: str, incarnation: int, index: int) -> None:
        try:
            self._listener.record_committed(session_id, incarnation, index)
        except Exception as exc:   # one session's trouble must not stop the others' fan-out
            log.warning("cluster: could not catch up session %s: %s", session_id, exc)

    def _signal(self, data: str) -> None:
        try:
            raw = base64.b64decode(data)
        except Exception:
            log.warning("cluster: undecodable signal notification")
            return
        try:
            self._listener.signal_received(raw)
        except Exception as exc:
            log.warning("cluster: could not deliver a signal: %s", exc)

    def _reload(self, name: str) -> None:
        reload = self.reloaders.get(name)
        if reload is None:
            return
        try:
            reload()
            log.info("cluster: registry %r changed on another instance; reloaded", name)
        except Exception as exc:
            log.warning("cluster: could not reload registry %r: %s", name, exc)

    def _resync(self, registries: bool = True) -> None:
        if registries:
            for name in self.reloaders:
                self._reload(name)
        for session_id, incarnation, length in self._listener.positions():
            self._committed(session_id, incarnation, length)
