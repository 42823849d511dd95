"""Deferred commit (the transport's commit point on the event loop): the file store appends without
waiting, settles in log order, and the engine delivers envelopes and answers only once durable."""
from __future__ import annotations

import threading
import time

from macp.modes.decision.v1 import decision_pb2

from tests.kernel.test_checkpoints import COORD, engine_on, env, open_store, proposal, start
from macp_runtime.storage.records_pb2 import ENTRY_KIND_INCOMING, LogRecord
from tests.support.streamkit import RecordingSubscriber


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


def test_settle_via_hands_each_batch_over_once_in_log_order(tmp_path):
    """With settle_via (the transport passes its loop's call_soon_threadsafe), the writer runs no
    callback itself: each group commit is handed over as one call, and running those calls in the
    order received answers every append in log order."""
    store = open_store(tmp_path / "d")
    handed, writer_threads = [], set()
    store.settle_via(lambda fn: (writer_threads.add(threading.get_ident()), handed.append(fn)))
    settled = []
    gate = threading.Event()
    real_write = store._write_batch

    def held(data):   # the first batch waits, so the appends made meanwhile form the second one
        gate.wait(10)
        return real_write(data)

    store._write_batch = held
    store.append_deferred(_record("s", 0), lambda index, error: settled.append((0, index, error)))
    for i in range(1, 20):
        store.append_deferred(_record("s", i), lambda index, error, i=i: settled.append((i, index, error)))
    gate.set()
    deadline = threading.Event()
    while store.synced_records < 20 and not deadline.wait(0.01):
        pass
    assert store.synced_records == 20 and settled == []   # durable, but nothing answered on the writer
    assert len(handed) == store.sync_count < 20            # one hand-over per group commit
    assert threading.get_ident() not in writer_threads
    for fn in handed:
        fn()
    assert settled == [(i, i, None) for i in range(20)]
    store._write_batch = real_write
    store.close()


class _Appends:
    """append(i) queues record i of session "s" (append_deferred); events[i] is set once it is durable."""

    def __init__(self, store):
        self.store = store
        self.events: dict[int, threading.Event] = {}

    @classmethod
    def on_new_store(cls, path, *, wait: float, gap: float) -> _Appends:
        store = open_store(path)
        store.group_wait_s, store.group_gap_s = wait, gap
        return cls(store)

    def __call__(self, i: int) -> None:
        done = self.events[i] = threading.Event()
        self.store.append_deferred(_record("s", i), lambda index, error: done.set())

    def batch_of_three_after(self, first: int, meanwhile: tuple[int, ...] = ()) -> None:
        """Record `first` is held at its write while the next three queue behind it: the writer's
        last batch then holds three. The records `meanwhile` arrive while those three are written."""
        store, gates = self.store, []
        real_write = store._write_batch

        def held(data):
            gate = threading.Event()
            gates.append(gate)
            gate.wait(10)
            return real_write(data)

        def writing(batches: int) -> None:   # until that many batches have reached the write
            while len(gates) < batches:
                time.sleep(0.005)

        store._write_batch = held
        self(first)                                 # its batch is held at the write ...
        writing(1)
        for i in range(first + 1, first + 4):       # ... so these three queue behind it
            self(i)
        gates[0].set()
        writing(2)
        for i in meanwhile:
            self(i)
        store._write_batch = real_write
        gates[1].set()
        assert self.events[first + 3].wait(5)


def test_the_deferred_writer_waits_briefly_for_a_batch_like_its_last_and_never_for_a_lone_appender(tmp_path):
    # long, so the test can see the wait (the default is 10 ms), and no pause cuts it short here
    append = _Appends.on_new_store(tmp_path / "d", wait=2.0, gap=2.0)
    store, events = append.store, append.events
    for i in range(3):   # one at a time: every batch holds one record, nothing to wait for
        started = time.monotonic()
        append(i)
        assert events[i].wait(5) and time.monotonic() - started < 1.5
    append.batch_of_three_after(3)
    syncs = store.sync_count
    append(7)                                   # alone, after a batch of three: the writer waits ...
    time.sleep(0.3)
    assert not events[7].is_set()
    append(8)
    append(9)                                   # ... until the batch is as full as the last one
    assert events[9].wait(5) and events[7].is_set()
    assert store.sync_count == syncs + 1        # 7, 8 and 9 shared one fdatasync
    started = time.monotonic()
    append(10)                                  # nobody follows: it goes after group_wait_s
    assert events[10].wait(10) and time.monotonic() - started >= 1.5
    assert [r.message_id for r in store.history("s")] == [f"m{i}" for i in range(11)]
    store.close()


def test_the_deferred_writer_stops_waiting_when_arrivals_pause(tmp_path):
    append = _Appends.on_new_store(tmp_path / "d", wait=30.0, gap=0.5)
    store, events = append.store, append.events
    append.batch_of_three_after(0)
    syncs = store.sync_count
    started = time.monotonic()
    append(4)                                   # the writer waits for two more ...
    time.sleep(0.2)
    append(5)                                   # ... one comes: the pause starts again
    assert not events[4].wait(0.2)              # 0.4 s in: 5 came 0.2 s ago, so still waiting
    assert events[5].wait(10)                   # nothing more: the batch goes after the pause
    waited = time.monotonic() - started
    assert events[4].is_set() and 0.6 <= waited < 10
    assert store.sync_count == syncs + 1        # 4 and 5 shared one fdatasync
    assert [r.message_id for r in store.history("s")] == [f"m{i}" for i in range(6)]
    store.close()


def test_arrivals_during_a_write_make_the_writer_wait_for_a_pause_not_for_the_count(tmp_path):
    """A record that arrives while a batch is written shows more callers cycling than that batch
    held: the writer then gathers until the arrivals pause, so their groups share one fdatasync."""
    append = _Appends.on_new_store(tmp_path / "d", wait=30.0, gap=1.0)
    store, events = append.store, append.events
    append.batch_of_three_after(0, meanwhile=(4,))   # 4 arrives while 1, 2 and 3 are written
    syncs = store.sync_count
    for i in (5, 6):
        time.sleep(0.2)
        append(i)                                   # 4, 5, 6: as many as the last batch held ...
    assert not events[4].wait(0.3)                  # ... yet the writer waits on
    append(7)
    assert events[7].wait(10)                       # nothing more: the batch goes after the pause
    assert all(events[i].is_set() for i in (4, 5, 6))
    assert store.sync_count == syncs + 1            # 4 to 7 shared one fdatasync
    assert [r.message_id for r in store.history("s")] == [f"m{i}" for i in range(8)]
    store.close()


def test_the_deferred_writer_waits_no_longer_than_group_wait(tmp_path):
    append = _Appends.on_new_store(tmp_path / "d", wait=0.6, gap=30.0)
    append.batch_of_three_after(0)
    started = time.monotonic()
    append(4)                                   # alone after a batch of three, and nobody follows
    assert append.events[4].wait(10)
    assert 0.5 <= time.monotonic() - started < 10
    append.store.close()


def test_a_deferring_caller_moves_on_at_once_and_delivers_once_durable(tmp_path):
    store = open_store(tmp_path / "d")
    engine = engine_on(store)
    sid = start(engine)
    sub = RecordingSubscriber()
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
