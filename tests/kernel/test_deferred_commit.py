"""Deferred commit (the transport's commit point on the event loop): the file store appends without
waiting, settles in log order, and the engine delivers envelopes and answers only once durable."""
from __future__ import annotations

import threading

from macp.modes.decision.v1 import decision_pb2

from tests.kernel.test_checkpoints import COORD, engine_on, env, open_store, proposal, start
from macp_runtime.storage.records_pb2 import ENTRY_KIND_INCOMING, LogRecord


def _record(sid, i):
    return LogRecord(session_id=sid, kind=ENTRY_KIND_INCOMING, message_id=f"m{i}", message_type="Proposal",
                     sender="a", mode="m", macp_version="1.0", received_at_ms=i, payload=b"x")


def test_deferred_appends_settle_in_log_order_and_are_durable_when_settled(tmp_path):
    store = open_store(tmp_path / "d")
    settled, done = [], threading.Event()

    def callback(i):
        def call(index, error):
            assert error is None
            settled.append((i, index))
            assert len(store.history("s")) >= index + 1   # readable (durable) before its callback
            if len(settled) == 50:
                done.set()
        return call

    for i in range(50):
        store.append_deferred(_record("s", i), callback(i))
    assert done.wait(10)
    assert settled == [(i, i) for i in range(50)]
    store.close()
    again = open_store(tmp_path / "d")
    assert [r.message_id for r in again.history("s")] == [f"m{i}" for i in range(50)]
    again.close()


class Subscriber:
    def __init__(self):
        self.got = []

    def offer(self, index, item):
        self.got.append((index, item.envelope.message_type))
        return True

    def discard_before(self, index):
        pass


def test_a_deferring_caller_moves_on_at_once_and_delivers_once_durable(tmp_path):
    store = open_store(tmp_path / "d")
    engine = engine_on(store)
    sid = start(engine)
    sub = Subscriber()
    engine.subscribe(sid, sub)
    gate = threading.Event()
    real_write = store._write_batch

    def slow_write(data):   # hold the batch until the test lets it go
        gate.wait(10)
        return real_write(data)

    store._write_batch = slow_write
    engine.set_deferring(True)
    try:
        proposal(engine, sid)
    finally:
        engine.set_deferring(False)
    pending = engine.pending(sid)
    assert pending is not None and sub.got == []            # state moved on, nothing delivered yet
    seen = threading.Event()
    pending.when_settled(lambda error: seen.set())
    gate.set()
    assert seen.wait(10) and pending.error is None
    assert sub.got == [(1, "Proposal")] and engine.pending(sid) is None
    store._write_batch = real_write
    engine.close()
    store.close()
