"""The engine's coordination, in-process (runtime/kernel/coordination.py, shared.py): the engine picks
one implementation from its store and both behave alike for a single instance (the shared one on a fresh
PostgreSQL database, skipped without one). Also: the kernel's lifecycle events are the wire's numbers,
and the commit point's Pending holds fan-out until the record is durable. Several instances:
tests/cluster/test_shared_coordination.py."""
from __future__ import annotations

import uuid

import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2
from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.commit import Pending
from macp_runtime.kernel.coordination import LocalCoordination
from macp_runtime.kernel.engine import Engine
from macp_runtime.kernel.fanout import Event
from macp_runtime.kernel.shared import SharedCoordination
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.storage import MemoryStore
from macp_runtime.vocabulary.errors import Kind, MacpError, StatusError
from macp_runtime.vocabulary.session import CANCELLED, EXPIRED, OPEN
from tests.support.streamkit import RecordingSubscriber

MODE = "macp.mode.decision.v1"
T0 = 1_700_000_000_000
_MODES = ModeRegistry.from_spec_dirs()
COORD, ALICE, BOB = Identity("coord"), Identity("alice"), Identity("bob")


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def env(sid, mtype, payload, message_id=None):
    return envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=mtype,
                                 message_id=message_id or str(uuid.uuid4()), session_id=sid, sender="",
                                 timestamp_unix_ms=T0, payload=payload.SerializeToString())


def start_env(sid, ttl=60_000, message_id=None):
    return env(sid, "SessionStart", core_pb2.SessionStartPayload(
        participants=["alice", "bob"], mode_version="1.0.0", configuration_version="c", ttl_ms=ttl), message_id)


def proposal(sid, pid="p1", message_id=None):
    return env(sid, "Proposal", decision_pb2.ProposalPayload(proposal_id=pid, option="o"), message_id)


@pytest.fixture(params=["local", "shared"])
def engine(request):
    """An engine over a memory store (local) or a fresh PostgreSQL database (shared)."""
    clock = Clock()
    if request.param == "local":
        store = MemoryStore()
    else:
        from macp_runtime.storage.postgres import PostgresStore

        store = PostgresStore(request.getfixturevalue("pg_url"), pool_size=4)
    store.open()
    engine = Engine(_MODES, PolicyRegistry(), store, clock=clock)
    engine.recover()
    yield engine
    engine.close()
    store.close()


def test_the_engine_chooses_its_coordination_from_the_store(engine):
    expected = SharedCoordination if engine.store.shared else LocalCoordination
    assert type(engine.coordination) is expected
    assert engine.shared is engine.store.shared
    assert engine.signal_relay is None   # no bus given: nothing is forwarded


def test_both_coordinations_answer_a_single_instance_alike(engine):
    sid = str(uuid.uuid4())
    first = start_env(sid)
    assert engine.start_session(first, COORD) == (False, OPEN)
    assert engine.start_session(first, COORD) == (True, OPEN)            # the same message: a duplicate
    with pytest.raises(MacpError) as err:
        engine.start_session(start_env(sid), COORD)                       # another start of the id
    assert err.value.kind is Kind.SessionAlreadyExists

    sub = RecordingSubscriber()
    history = engine.subscribe_with_history(engine.lookup(sid), sub)
    assert [r.message_type for r in history] == ["SessionStart"]
    message = proposal(sid)
    assert engine.process_message(message, ALICE) == (False, OPEN)
    assert engine.process_message(message, ALICE) == (True, OPEN)
    assert sub.got == [(1, "Proposal")]                                   # published once, at its index
    with pytest.raises(MacpError) as err:
        engine.process_message(proposal(str(uuid.uuid4())), ALICE)
    assert err.value.kind is Kind.UnknownSession
    with pytest.raises(StatusError):
        engine.lookup(str(uuid.uuid4()))

    complete = engine.complete_history(engine.lookup(sid))
    assert [r.message_type for r in complete] == ["SessionStart", "Proposal"]
    assert engine.cancel_session(sid, COORD, "done") == (False, CANCELLED)
    assert engine.lookup(sid).status == CANCELLED


def test_both_coordinations_expire_and_evict_in_the_sweep(engine):
    sid = str(uuid.uuid4())
    engine.start_session(start_env(sid, ttl=1_000), COORD)
    events = engine.lifecycle.subscribe()
    engine.clock.now += 2_000
    assert engine.sweep(3_600_000) == (1, 0)
    assert engine.lookup(sid).status == EXPIRED
    assert events.get(timeout=1)[0] == Event.EXPIRED
    engine.clock.now += 3_600_001
    assert engine.sweep(3_600_000) == (0, 1)
    assert engine.peek(sid) is None


def test_lifecycle_events_are_the_wire_numbers():
    wire = core_pb2.SessionLifecycleEvent
    for event in Event:
        assert event == getattr(wire, f"EVENT_TYPE_{event.name}")
    out = core_pb2.WatchSessionsResponse()
    out.event.event_type = Event.RESUMED
    assert out.event.event_type == wire.EVENT_TYPE_RESUMED


def test_pending_runs_what_follows_the_commit_only_once_durable():
    pending, ran, settled = Pending(), [], []
    pending.defer(ran.append, "fan-out")
    pending.when_settled(settled.append)
    assert ran == [] and settled == []
    pending.settle(None)
    assert ran == ["fan-out"] and settled == [None]
    pending.defer(ran.append, "late")          # already durable: runs at once
    assert ran == ["fan-out", "late"]
    failed = Pending()
    failed.defer(ran.append, "never")
    failed.settle(OSError("disk"))
    assert "never" not in ran
