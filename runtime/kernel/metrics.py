"""Prometheus metrics (prometheus-client), served on MACP_METRICS_ADDR when it is set.

When metrics are off every hook is a no-op method of `NO_METRICS`, so the hot path pays one call.
Counts that can be read from state (open sessions, stream subscribers, fsyncs) are collected at
scrape time rather than maintained per message.
"""
from __future__ import annotations

import time

from macp.v1 import core_pb2

from ..vocabulary.session import OPEN

_Event = core_pb2.SessionLifecycleEvent
EVENT_OUTCOMES = {
    _Event.EVENT_TYPE_CREATED: "created", _Event.EVENT_TYPE_RESOLVED: "resolved",
    _Event.EVENT_TYPE_EXPIRED: "expired", _Event.EVENT_TYPE_CANCELLED: "cancelled",
    _Event.EVENT_TYPE_SUSPENDED: "suspended", _Event.EVENT_TYPE_RESUMED: "resumed",
}

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
APPEND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


OTHER = "other"                 # the label of every mode or message type the runtime does not know
AMBIENT_TYPES = frozenset({"SessionStart", "Signal", "Progress"})


class NoMetrics:
    enabled = False

    def send_done(self, mode: str, message_type: str, code: str, seconds: float | None) -> None:
        pass

    def rate_limited(self, bucket: str) -> None:
        pass

    def session_event(self, event: int) -> None:
        pass

    def append_done(self, seconds: float) -> None:
        pass


NO_METRICS = NoMetrics()


class Metrics(NoMetrics):
    enabled = True

    def __init__(self, modes, store):
        """modes: the mode registry (labels take only its modes and message types); store: for the
        fsync counters of a durable store. The engine's gauges follow once `watch(engine)` is called."""
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self._modes = modes
        self.registry = r = CollectorRegistry()
        self._accepted = Counter("macp_messages_accepted_total", "Envelopes accepted by Send (duplicates included)",
                                 ["mode", "message_type"], registry=r)
        self._rejected = Counter("macp_messages_rejected_total", "Envelopes refused by Send, by error code",
                                 ["mode", "code"], registry=r)
        self._latency = Histogram("macp_send_duration_seconds", "Time to answer a Send", buckets=LATENCY_BUCKETS,
                                  registry=r)
        self._limited = Counter("macp_rate_limited_total", "Sends refused by a rate limit", ["bucket"], registry=r)
        self._sessions = Counter("macp_sessions_total", "Session lifecycle events", ["event"], registry=r)
        self._append = Histogram("macp_storage_append_duration_seconds",
                                 "Time to make one history record durable (group commit included)",
                                 buckets=APPEND_BUCKETS, registry=r)
        if store.counts_syncs:
            r.register(_StoreCollector(store))
        for event in EVENT_OUTCOMES.values():
            self._sessions.labels(event)
        self._accepted_children: dict = {}
        self._rejected_children: dict = {}

    def watch(self, engine) -> None:
        """The gauges read from the engine at scrape time (sessions, stream subscribers, watches)."""
        from prometheus_client import Gauge

        r = self.registry
        open_sessions = Gauge("macp_sessions_open", "Sessions currently OPEN in memory", registry=r)
        open_sessions.set_function(lambda: sum(1 for s in engine.sessions() if s.status == OPEN))
        in_memory = Gauge("macp_sessions_in_memory", "Sessions held in memory, any state", registry=r)
        in_memory.set_function(lambda: len(engine.sessions()))
        subscribers = Gauge("macp_stream_subscribers", "Open passive/active StreamSession subscriptions", registry=r)
        subscribers.set_function(lambda: sum(len(v) for v in list(engine.fanout.channels.values())))
        watchers = Gauge("macp_watch_subscribers", "Open WatchSessions and WatchSignals streams", ["stream"],
                         registry=r)
        watchers.labels("sessions").set_function(lambda: len(engine.lifecycle))
        watchers.labels("signals").set_function(lambda: len(engine.signals))

    def send_done(self, mode: str, message_type: str, code: str, seconds: float | None) -> None:
        """One envelope answered; `seconds` is the Send latency (None for stream frames).

        Labels take only registered modes and the message types they declare: anything else a client
        writes counts under OTHER, so /metrics cannot be grown by inventing names."""
        if seconds is not None:
            self._latency.observe(seconds)
        if code:
            child = self._rejected_children.get((mode, code))
            if child is None:
                mode = self._known_mode(mode)
                child = self._rejected_children.get((mode, code))
                if child is None:
                    child = self._rejected_children[(mode, code)] = self._rejected.labels(mode, code)
        else:
            child = self._accepted_children.get((mode, message_type))
            if child is None:
                mode, message_type = self._known_type(mode, message_type)
                child = self._accepted_children.get((mode, message_type))
                if child is None:
                    child = self._accepted_children[(mode, message_type)] = self._accepted.labels(mode, message_type)
        child.inc()

    def _known_mode(self, mode: str) -> str:
        return mode if mode == "" or self._modes.get(mode) is not None else OTHER

    def _known_type(self, mode: str, message_type: str) -> tuple[str, str]:
        compiled = self._modes.get(mode) if mode else None
        if compiled is None:
            mode = OTHER if mode else ""
            return mode, message_type if message_type in AMBIENT_TYPES else OTHER
        if message_type in AMBIENT_TYPES or message_type in compiled.descriptor.message_types:
            return mode, message_type
        return mode, OTHER

    def rate_limited(self, bucket: str) -> None:
        self._limited.labels(bucket).inc()

    def session_event(self, event: int) -> None:
        name = EVENT_OUTCOMES.get(event)
        if name:
            self._sessions.labels(name).inc()

    def append_done(self, seconds: float) -> None:
        self._append.observe(seconds)

    def serve(self, addr: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = addr.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=self.registry)


class _StoreCollector:
    """fdatasync counts kept by the durable store, read at scrape time (rate() gives fsyncs/s)."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        yield CounterMetricFamily("macp_storage_fsyncs", "fdatasync calls of the durable log",
                                  value=self.store.sync_count)
        yield CounterMetricFamily("macp_storage_synced_records", "Records made durable by those fdatasyncs",
                                  value=self.store.synced_records)


def clock() -> float:
    return time.perf_counter()
