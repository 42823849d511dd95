"""Several runtime instances over one PostgreSQL database (MACP_STORAGE_BACKEND=postgres).

Every test talks to real server processes on their own ports; the database comes from tests/support/pgkit.py
(a throw-away PostgreSQL started for the test session). Covered: a Decision session whose messages
alternate between instances, competing Commitments and a message id sent to two instances at once
(serialised by the database), fan-out of one instance's envelopes to another's subscribers and
watchers, shared registries, TTL expiry recorded once, kill -9 of an instance under load (no
acknowledged message lost, its clients continue on another instance) and a restart of every instance.
"""
from __future__ import annotations

import random
import threading
import time
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from tests.support import crashkit
from tests.support import ServerProcess, bearer, commitment, envelope, new_session_id, send, start_payload
from tests.support.streamkit import Collector, Duplex

MODE = "macp.mode.decision.v1"
PEOPLE = ["coordinator", "alice", "bob"]


def pg_env(url: str, **extra) -> dict:
    env = {"MACP_STORAGE_BACKEND": "postgres", "MACP_DATABASE_URL": url, "MACP_DATABASE_POOL_SIZE": "4",
           "MACP_WORKERS": "16", "MACP_MAX_STREAMS": "50"}
    env.update(extra)
    return env


def start_instances(tmp_path, url: str, n: int, **extra) -> list[ServerProcess]:
    servers = [ServerProcess(str(tmp_path / f"inst{i}"), pg_env(url, **extra)).start(wait=False) for i in range(n)]
    try:
        for srv in servers:
            srv.wait_ready()
    except BaseException:   # one that does not come up: none is left running behind the test
        for srv in servers:
            srv.kill()
        raise
    return servers


def script(session_id: str):
    """(sender, type, payload) of a whole Decision session."""
    return [("coordinator", "SessionStart", start_payload(PEOPLE)),
            ("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy")),
            ("alice", "Evaluation", decision_pb2.EvaluationPayload(proposal_id="p1", recommendation="APPROVE",
                                                                   confidence=0.9)),
            ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("coordinator", "Commitment", commitment())]


def state_of(srv: ServerProcess, session_id: str) -> int:
    return srv.stub().GetSession(core_pb2.GetSessionRequest(session_id=session_id),
                                 metadata=bearer("coordinator")).metadata.state


def db_records(url: str, session_id: str) -> list[tuple[int, int, str, str]]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT incarnation, idx, message_type, message_id FROM macp_records "
                            "WHERE session_id = %s ORDER BY incarnation, idx", (session_id,)).fetchall()


@pytest.fixture(scope="module")
def trio(postgres_server, tmp_path_factory):
    url = postgres_server.create_database()
    servers = start_instances(tmp_path_factory.mktemp("trio"), url, 3)
    yield url, servers
    for srv in servers:
        srv.kill()


def test_decision_alternating_between_instances_resolves(trio):
    url, servers = trio
    sid = new_session_id()
    for i, (sender, mtype, payload) in enumerate(script(sid)):
        ack = send(servers[i % 3].stub(), envelope(MODE, mtype, sid, sender, payload))
        assert ack.ok and not ack.duplicate, (mtype, ack)
    assert ack.session_state == envelope_pb2.SESSION_STATE_RESOLVED
    for srv in servers:
        assert state_of(srv, sid) == envelope_pb2.SESSION_STATE_RESOLVED
    assert [r[1] for r in db_records(url, sid)] == list(range(6))
    # a seventh message through an instance that last saw the session open is refused
    late = send(servers[1].stub(), envelope(MODE, "Vote", sid, "bob",
                                            decision_pb2.VotePayload(proposal_id="p1", vote="REJECT")))
    assert not late.ok and late.error.code == "SESSION_NOT_OPEN"


def test_competing_commitments_through_two_instances_one_wins(trio):
    url, servers = trio
    a, b = servers[0].stub(), servers[1].stub()
    for _ in range(8):
        sid = new_session_id()
        for i, (sender, mtype, payload) in enumerate(script(sid)[:5]):
            assert send(servers[i % 2].stub(), envelope(MODE, mtype, sid, sender, payload)).ok
        barrier = threading.Barrier(2)
        acks = {}

        def commit(name, stub, cid):
            env = envelope(MODE, "Commitment", sid, "coordinator", commitment(commitment_id=cid))
            barrier.wait()
            acks[name] = send(stub, env)

        threads = [threading.Thread(target=commit, args=("a", a, "ca")),
                   threading.Thread(target=commit, args=("b", b, "cb"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [n for n, ack in acks.items() if ack.ok]
        assert len(winners) == 1, acks
        loser = acks["b" if winners == ["a"] else "a"]
        assert loser.error.code == "SESSION_NOT_OPEN", loser
        assert [r[2] for r in db_records(url, sid)].count("Commitment") == 1


def test_same_message_id_sent_to_two_instances_is_accepted_once(trio):
    url, servers = trio
    for _ in range(8):
        sid = new_session_id()
        assert send(servers[0].stub(), envelope(MODE, "SessionStart", sid, "coordinator", start_payload(PEOPLE))).ok
        env = envelope(MODE, "Proposal", sid, "coordinator", decision_pb2.ProposalPayload(proposal_id="p1", option="x"))
        barrier = threading.Barrier(2)
        acks = []

        def go(srv):
            barrier.wait()
            acks.append(send(srv.stub(), env))

        threads = [threading.Thread(target=go, args=(srv,)) for srv in servers[1:]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(ack.ok for ack in acks), acks
        assert sorted(ack.duplicate for ack in acks) == [False, True], acks
        assert [r[3] for r in db_records(url, sid)].count(env.message_id) == 1
    # the same SessionStart (same message id) at two instances: one start, one duplicate
    sid = new_session_id()
    start = envelope(MODE, "SessionStart", sid, "coordinator", start_payload(PEOPLE))
    first, second = send(servers[1].stub(), start), send(servers[2].stub(), start)
    assert first.ok and not first.duplicate and second.ok and second.duplicate
    other = send(servers[0].stub(), envelope(MODE, "SessionStart", sid, "coordinator", start_payload(PEOPLE)))
    assert not other.ok and other.error.code == "SESSION_ALREADY_EXISTS"


def test_subscriber_on_one_instance_sees_what_the_others_accept(trio):
    url, servers = trio
    sid = new_session_id()
    steps = script(sid)
    sender, mtype, payload = steps[0]
    assert send(servers[1].stub(), envelope(MODE, mtype, sid, sender, payload)).ok
    sub = Duplex(servers[0].stub(), "alice").subscribe(sid)
    try:
        assert sub.recv().envelope.message_type == "SessionStart"
        sent = []
        proposals = [("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id=f"p{i}", option="x"))
                     for i in range(2, 30)]
        for i, (sender, mtype, payload) in enumerate(steps[1:2] + proposals + steps[2:]):
            env = envelope(MODE, mtype, sid, sender, payload)
            assert send(servers[1 + i % 2].stub(), env).ok, mtype
            sent.append(env.message_id)
        got = [r.envelope.message_id for r in sub.recv_n(len(sent), timeout=15)]
        assert got == sent                       # in order, no gap, no duplicate
        assert sub.nothing_within(0.3)
    finally:
        sub.cancel()


def test_watchers_and_registries_span_instances(trio):
    url, servers = trio
    a, b, c = (srv.stub() for srv in servers)
    sessions = Collector(a.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=bearer("coordinator")))
    registry = Collector(b.WatchModeRegistry(core_pb2.WatchModeRegistryRequest(), metadata=bearer("watcher")))
    signals = Collector(a.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("watcher")))
    try:
        assert registry.recv().change.registry == "modes"     # the initial notice
        time.sleep(0.3)
        while not sessions.nothing_within(0.2):               # the snapshot of existing sessions
            sessions.recv()
        sid = new_session_id()
        for sender, mtype, payload in script(sid):
            assert send(c, envelope(MODE, mtype, sid, sender, payload)).ok
        events = []
        deadline = time.monotonic() + 10
        while len(events) < 2 and time.monotonic() < deadline:
            item = sessions.recv(10)
            if item.event.session.session_id == sid:
                events.append(item.event.event_type)
        assert events == [core_pb2.SessionLifecycleEvent.EVENT_TYPE_CREATED,
                          core_pb2.SessionLifecycleEvent.EVENT_TYPE_RESOLVED]
        # a Signal sent to C reaches a WatchSignals subscriber on A
        signal = envelope_pb2.Envelope(macp_version="1.0", message_type="Signal", message_id=str(uuid.uuid4()),
                                       sender="alice", payload=core_pb2.SignalPayload(
                                           signal_type="heartbeat").SerializeToString())
        assert send(c, signal).ok
        assert signals.recv(10).envelope.message_id == signal.message_id
        # an extension registered on A: B's watchers hear of it, B lists it and runs its sessions
        name = f"ext.cluster{uuid.uuid4().hex[:6]}.v1"
        descriptor = core_pb2.ModeDescriptor(mode=name, mode_version="1.0.0", title="t",
                                             message_types=["SessionStart", "Note", "Commitment"],
                                             terminal_message_types=["Commitment"])
        assert a.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=descriptor),
                                 metadata=bearer("admin")).ok
        assert registry.recv(10).change.registry == "modes"
        assert name in [m.mode for m in b.ListExtModes(core_pb2.ListExtModesRequest()).modes]
        ext_sid = new_session_id()
        assert send(c, envelope(name, "SessionStart", ext_sid, "coordinator",
                                start_payload(PEOPLE, mode_version="1.0.0"))).ok
        assert send(c, envelope(name, "Note", ext_sid, "alice", b"hi")).ok
        # a policy registered on B is known to C at once
        policy = policy_pb2.PolicyDescriptor(policy_id=f"policy.cluster.{uuid.uuid4().hex[:6]}", mode="*",
                                             description="d", rules="{}", schema_version=1)
        assert b.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy),
                                metadata=bearer("admin")).ok
        # a session bound to it starts through C at once (C reloads the registry rather than refuse)
        bound_sid = new_session_id()
        assert send(c, envelope(MODE, "SessionStart", bound_sid, "coordinator",
                                start_payload(PEOPLE, policy_version=policy.policy_id))).ok
        deadline = time.monotonic() + 5   # reads follow the change notification
        while True:
            try:
                got = c.GetPolicy(policy_pb2.GetPolicyRequest(policy_id=policy.policy_id), metadata=bearer("x"))
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "C never learnt of the policy"
                time.sleep(0.05)
        assert got.policy_descriptor.policy_id == policy.policy_id
        # ListSessions on A knows a session only B and C ever saw
        listed = a.ListSessions(core_pb2.ListSessionsRequest(), metadata=bearer("coordinator")).sessions
        assert ext_sid in [s.session_id for s in listed]
    finally:
        sessions.cancel()
        registry.cancel()
        signals.cancel()


def test_ttl_expiry_is_recorded_once(postgres_server, tmp_path):
    url = postgres_server.create_database()
    servers = start_instances(tmp_path, url, 2, MACP_CLEANUP_INTERVAL_SECS="0.1")
    try:
        sids = [new_session_id() for _ in range(5)]
        for sid in sids:
            assert send(servers[0].stub(), envelope(MODE, "SessionStart", sid, "coordinator",
                                                    start_payload(PEOPLE, ttl_ms=400))).ok
            for srv in servers:   # both instances hold the session in memory and sweep it
                assert state_of(srv, sid) == envelope_pb2.SESSION_STATE_OPEN
        time.sleep(1.5)
        for sid in sids:
            for srv in servers:
                assert state_of(srv, sid) == envelope_pb2.SESSION_STATE_EXPIRED
            assert [r[2] for r in db_records(url, sid)] == ["SessionStart", "TtlExpired"]
    finally:
        for srv in servers:
            srv.kill()


def test_kill_one_instance_under_load_then_restart_everything(postgres_server, tmp_path):
    """Clients of A and B run Decision sessions; A is SIGKILLed mid-load and its clients carry on
    with the same sessions through B. No acknowledged message is lost or doubled; after every
    instance restarts, each session's state equals a replay of its stored records."""
    url = postgres_server.create_database()
    servers = start_instances(tmp_path, url, 2)
    ledger = crashkit.Ledger()
    stop = threading.Event()
    failures: list[str] = []
    switched = []

    def client(home: int):
        targets = [servers[home].target, servers[1].target]
        channel = grpc.insecure_channel(targets[0])
        stub = core_pb2_grpc_stub(channel)
        try:
            while not stop.is_set():
                sid = new_session_id()
                for sender, mtype, payload in script(sid):
                    env = envelope(MODE, mtype, sid, sender, payload)
                    while True:
                        try:
                            ack = stub.Send(core_pb2.SendRequest(envelope=env), timeout=10, metadata=bearer(sender)).ack
                            break
                        except grpc.RpcError:
                            if stop.is_set():
                                return
                            # the instance is gone: the same message (same id) to the other one
                            channel.close()
                            channel = grpc.insecure_channel(targets[1])
                            stub = core_pb2_grpc_stub(channel)
                            switched.append(sid)
                    if not ack.ok:
                        failures.append(f"{mtype} in {sid}: {ack.error.code} {ack.error.message}")
                        return
                    ledger.add(sid, crashkit.Acked(env.message_id, mtype, sender))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i % 2,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    servers[0].kill()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(20)
    assert not failures, failures[:5]
    assert switched, "no client had to move to the surviving instance"
    assert ledger.messages > 50

    from macp_runtime.storage.postgres import PostgresStore

    store = PostgresStore(url)
    store.open()
    try:
        durable = {sid: recs for sid, recs in store.replay()}
    finally:
        store.close()
    for sid, acked in ledger.acked.items():
        ids = [r.message_id for r in durable.get(sid, [])]
        assert len(ids) == len(set(ids)), f"{sid}: a message is stored twice"
        assert ids[:len(acked)] == [a.message_id for a in acked], f"{sid}: acknowledged messages lost or reordered"
        assert len(ids) - len(acked) <= 1, f"{sid}: more than one unacknowledged record"

    servers[1].kill()
    restarted = start_instances(tmp_path, url, 2)
    try:
        expected = crashkit.expected_states(durable)
        rng = random.Random(7)
        for sid, state in expected.items():
            assert state_of(restarted[rng.randrange(2)], sid) == state, sid
        # a client re-sending an acknowledged message gets duplicate=true from either instance
        sid = next(s for s, a in ledger.acked.items() if len(a) >= 2)
        again = envelope(MODE, "Proposal", sid, "coordinator", b"", message_id=ledger.acked[sid][1].message_id)
        for srv in restarted:
            ack = send(srv.stub(), again)
            assert ack.ok and ack.duplicate, ack
    finally:
        for srv in restarted:
            srv.kill()


def core_pb2_grpc_stub(channel):
    from macp.v1 import core_pb2_grpc

    return core_pb2_grpc.MACPRuntimeServiceStub(channel)
