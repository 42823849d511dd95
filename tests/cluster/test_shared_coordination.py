"""Two instances in one process over one PostgreSQL database (runtime/kernel/shared.py,
runtime/storage/postgres/bus.py): a stale copy is caught up and the message judged again, a start of a
taken id is refused, the bus wakes the instance that watches a session and carries signals."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from macp.v1 import core_pb2, envelope_pb2
from macp_runtime.kernel.engine import Engine
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.vocabulary.errors import Kind, MacpError
from macp_runtime.vocabulary.session import OPEN, RESOLVED

from tests.kernel.test_coordination import _MODES, ALICE, COORD, Clock, env, proposal, start_env
from tests.support.streamkit import RecordingSubscriber


@pytest.fixture
def pair(pg_url):
    """Two engines (two instances) over the same database, each with its own store and pool."""
    from macp_runtime.storage.postgres import PostgresStore

    engines = []
    for _ in range(2):
        store = PostgresStore(pg_url, pool_size=4)
        store.open()
        e = Engine(_MODES, PolicyRegistry(), store, clock=Clock())
        e.recover()
        engines.append(e)
    yield engines
    for e in engines:
        e.close()
        e.store.close()


def test_a_stale_copy_is_caught_up_and_the_message_judged_again(pair):
    a, b = pair
    sid = str(uuid.uuid4())
    a.start_session(start_env(sid), COORD)
    assert b.process_message(proposal(sid, "p1"), ALICE) == (False, OPEN)   # b loads the session first
    # a's copy does not have p1: its append conflicts, it catches up, judges again and appends at index 2
    assert a.process_message(proposal(sid, "p2"), ALICE) == (False, OPEN)
    assert a.lookup(sid).log_length == 3
    assert set(a.lookup(sid).state["proposals"]) == {"p1", "p2"}
    # a message b already stored is a duplicate on a as well, once a has looked at the log
    duplicate_id = str(uuid.uuid4())
    b.process_message(proposal(sid, "p3", message_id=duplicate_id), ALICE)
    assert a.process_message(proposal(sid, "p3", message_id=duplicate_id), ALICE) == (True, OPEN)


def test_a_start_of_an_id_another_instance_took_is_refused(pair):
    a, b = pair
    sid = str(uuid.uuid4())
    a.start_session(start_env(sid), COORD)
    with pytest.raises(MacpError) as err:
        b.start_session(start_env(sid), COORD)
    assert err.value.kind is Kind.SessionAlreadyExists
    assert b.peek(sid) is not None                          # loaded into b's table on the way


def test_the_bus_wakes_the_instance_that_watches_a_session(pg_url, pair):
    from macp_runtime.storage.postgres import PostgresBus

    a, b = pair
    sid = str(uuid.uuid4())
    a.start_session(start_env(sid), COORD)
    sub = RecordingSubscriber()
    b.subscribe_with_history(b.lookup(sid), sub)
    bus = PostgresBus(pg_url, b.store, b.store.documents(), {})
    bus.start(b.coordination)
    try:
        a.process_message(proposal(sid, "p1"), ALICE)
        commitment = core_pb2.CommitmentPayload(
            commitment_id="c", action="decision.selected", authority_scope="s", reason="r", mode_version="1.0.0",
            configuration_version="c", policy_version="policy.default", outcome_positive=True)
        a.process_message(env(sid, "Commitment", commitment), COORD)
        deadline = time.monotonic() + 10
        while len(sub.got) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sub.got == [(1, "Proposal"), (2, "Commitment")]   # in log order, nothing asked b
        assert b.peek(sid).status == RESOLVED
    finally:
        bus.close()


def test_signals_travel_between_instances_over_the_bus(pg_url, pair):
    from macp_runtime.storage.postgres import PostgresBus

    a, b = pair
    bus_a = PostgresBus(pg_url, a.store, a.store.documents(), {})
    bus_b = PostgresBus(pg_url, b.store, b.store.documents(), {})
    received = threading.Event()
    watch = b.signals.subscribe(lambda: received.set())
    bus_a.start(a.coordination)
    bus_b.start(b.coordination)
    try:
        item = core_pb2.WatchSignalsResponse(envelope=envelope_pb2.Envelope(
            message_type="Signal", message_id="m1", sender="alice", session_id=""))
        bus_a.publish_signal(item.SerializeToString())
        assert received.wait(10)
        subject, got = watch.get(timeout=1)
        assert got.envelope.message_id == "m1" and subject == ""
    finally:
        watch.cancel()
        bus_a.close()
        bus_b.close()
