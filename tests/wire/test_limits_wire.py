"""Limits over the wire: per-sender sliding-window rate limits and fairness under a flood.

Spec: runtime.md §3 (rate limiting is step 6, after shape, auth and allowed_modes), §9.2 (two windows
per derived sender; what is counted and what is not), §9.1 (payload size; tested in
test_sessions_wire.py). The fairness tests have no timing assertion tighter than several seconds.
"""
from __future__ import annotations

import json
import queue
import threading
import time
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, start_payload

MODE = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
START_LIMIT = 3
MESSAGE_LIMIT = 5


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    from tests.support import ServerProcess
    srv = ServerProcess(str(tmp_path_factory.mktemp("limits") / "data"), {
        "MACP_SESSION_START_LIMIT_PER_MINUTE": str(START_LIMIT),
        "MACP_MESSAGE_LIMIT_PER_MINUTE": str(MESSAGE_LIMIT),
        "MACP_AUTH_TOKENS_JSON": json.dumps(
            [{"token": f"tok-{name}", "sender": name} for name in
             ("alice", "bob", "s1", "s2", "s3", "s4", "m1", "m2", "m3", "m4", "m5",
              "c1", "c2", "c3", "c4", "c5", "c6")]
            + [{"token": "tok-decider", "sender": "decider", "allowed_modes": [MODE]}]),
    }).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def stub(limited):
    return limited.stub()


def tok(name):
    return bearer(f"tok-{name}")


def send(stub, env, who):
    return stub.Send(core_pb2.SendRequest(envelope=env), metadata=tok(who)).ack


def start_env(participants=("alice", "bob"), session_id=None):
    return envelope(MODE, "SessionStart", session_id or new_session_id(), "", start_payload(participants))


def proposal(sid, proposal_id="p1", message_id=None):
    return envelope(MODE, "Proposal", sid, "", decision_pb2.ProposalPayload(proposal_id=proposal_id, option="o"),
                    message_id=message_id)


def is_rate_limited(ack) -> bool:
    if not ack.ok and ack.error.code == "RATE_LIMITED":
        assert ack.error.message == "RateLimited"
        assert ack.session_state == envelope_pb2.SESSION_STATE_UNSPECIFIED
        return True
    return False


def metadata(stub, sid, who="bob"):
    return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=tok(who)).metadata


# --- SessionStart bucket -----------------------------------------------------------------------------

def test_session_starts_are_limited_per_sender(stub):
    for _ in range(START_LIMIT):
        ack = send(stub, start_env(), "s1")
        assert ack.ok, ack
    env = start_env()
    assert is_rate_limited(send(stub, env, "s1"))
    # nothing was created for the refused start
    err = pytest.raises(grpc.RpcError, stub.GetSession, core_pb2.GetSessionRequest(session_id=env.session_id),
                        metadata=tok("s1")).value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # another sender has its own window; messages have their own bucket
    assert send(stub, start_env(), "s2").ok
    sid = send_start_as_coord(stub, "c1", participants=("s1", "bob"))
    assert send(stub, proposal(sid), "s1").ok


def send_start_as_coord(stub, coord, participants=("alice", "bob")) -> str:
    """Each test starts its sessions as its own initiator, so start windows do not interfere."""
    env = start_env(participants)
    ack = send(stub, env, coord)
    assert ack.ok, ack
    return env.session_id


def test_rejected_and_duplicate_starts_count(stub):
    bad = start_env(session_id="not a valid id")
    assert send(stub, bad, "s3").error.code == "INVALID_SESSION_ID"      # kernel reject: counted
    good = start_env()
    assert send(stub, good, "s3").ok                                      # counted
    dup = send(stub, good, "s3")
    assert dup.ok and dup.duplicate                                       # duplicate: counted
    assert is_rate_limited(send(stub, start_env(), "s3"))


def test_checks_before_the_limiter_do_not_count(stub):
    # shape rejections (before auth), auth failures and allowed_modes refusals spend nothing
    for _ in range(START_LIMIT + 2):
        env = start_env()
        env.macp_version = "2.0"
        assert send(stub, env, "s4").error.code == "UNSUPPORTED_PROTOCOL_VERSION"
        assert stub.Send(core_pb2.SendRequest(envelope=start_env()), metadata=bearer("tok-nobody")).ack.error.code \
            == "UNAUTHENTICATED"
        other_mode = envelope("macp.mode.task.v1", "SessionStart", new_session_id(), "",
                              start_payload(["decider", "bob"]))
        assert send(stub, other_mode, "decider").error.code == "FORBIDDEN"
    for _ in range(START_LIMIT):
        assert send(stub, start_env(), "s4").ok
    assert is_rate_limited(send(stub, start_env(), "s4"))
    for _ in range(START_LIMIT):
        assert send(stub, start_env(("decider", "bob")), "decider").ok
    assert is_rate_limited(send(stub, start_env(), "decider"))


# --- message bucket ----------------------------------------------------------------------------------

def test_messages_duplicates_rejects_signals_and_progress_all_count(stub):
    sid = send_start_as_coord(stub, "c2", participants=("m1", "bob"))
    p1 = proposal(sid)
    assert send(stub, p1, "m1").ok                                          # 1 accepted
    dup = send(stub, p1, "m1")
    assert dup.ok and dup.duplicate                                         # 2 duplicate
    bad_vote = envelope(MODE, "Vote", sid, "", decision_pb2.VotePayload(proposal_id="p1", vote="yes"))
    assert send(stub, bad_vote, "m1").error.code == "INVALID_ENVELOPE"      # 3 kernel reject
    assert send(stub, envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="x")), "m1").ok  # 4
    assert send(stub, envelope("", "Progress", "", "", core_pb2.ProgressPayload(progress=0.5)), "m1").ok  # 5
    before = metadata(stub, sid)
    late = proposal(sid, "p2")
    assert is_rate_limited(send(stub, late, "m1"))
    assert metadata(stub, sid) == before                                    # refused: nothing changed
    # the refused message left no trace: once the window allows again it would be new, not a duplicate
    assert send(stub, proposal(sid, "p3"), "bob").ok                        # bob is unaffected


def test_reads_and_session_control_are_not_counted(stub):
    sid = send_start_as_coord(stub, "c3", participants=("m2", "bob"))
    for _ in range(MESSAGE_LIMIT * 2):
        metadata(stub, sid, "m2")
        stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), metadata=tok("m2"))
        stub.ListModes(core_pb2.ListModesRequest(), metadata=tok("m2"))
    for i in range(MESSAGE_LIMIT):
        assert send(stub, proposal(sid, f"p{i}"), "m2").ok
    assert is_rate_limited(send(stub, proposal(sid, "one-too-many"), "m2"))


def test_cancel_is_counted(stub):
    # issue 12 point 8: control RPCs count against the message window (they used to be unlimited)
    env = start_env(("m3", "bob"))
    assert send(stub, env, "m3").ok
    for i in range(MESSAGE_LIMIT):
        assert send(stub, proposal(env.session_id, f"p{i}"), "m3").ok
    assert is_rate_limited(send(stub, proposal(env.session_id, "x"), "m3"))
    ack = stub.CancelSession(core_pb2.CancelSessionRequest(session_id=env.session_id), metadata=tok("m3")).ack
    assert not ack.ok and ack.error.code == "RATE_LIMITED"
    # the initiator's partner is not held up by m3's window
    assert stub.GetSession(core_pb2.GetSessionRequest(session_id=env.session_id),
                           metadata=tok("bob")).metadata.state == envelope_pb2.SESSION_STATE_OPEN


def test_subscribe_frames_are_not_counted(stub):
    sid = send_start_as_coord(stub, "c4", participants=("m4", "bob"))
    requests = queue.Queue()
    for _ in range(MESSAGE_LIMIT * 2):
        requests.put(core_pb2.StreamSessionRequest(subscribe_session_id=sid))
    requests.put(None)
    try:
        responses = list(stub.StreamSession(iter(requests.get, None), metadata=tok("m4"), timeout=10))
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip("StreamSession is not implemented yet")
        raise
    assert all(not r.HasField("error") for r in responses), responses
    for i in range(MESSAGE_LIMIT):
        assert send(stub, proposal(sid, f"p{i}"), "m4").ok
    assert is_rate_limited(send(stub, proposal(sid, "x"), "m4"))


def test_stream_envelope_frames_are_counted(stub):
    sid = send_start_as_coord(stub, "c5", participants=("m5", "bob"))
    frames = [core_pb2.StreamSessionRequest(envelope=proposal(sid, f"p{i}")) for i in range(MESSAGE_LIMIT + 1)]
    call = stub.StreamSession(iter(frames), metadata=tok("m5"), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    if info.value.code() == grpc.StatusCode.UNIMPLEMENTED:
        pytest.skip("StreamSession is not implemented yet")
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimited")


# --- fairness: a flood from one sender does not starve the others ---------------------------------------

def decision_session(stub, auth) -> float:
    """A complete Decision session by coordinator/alice/bob; returns its wall time."""
    t0 = time.monotonic()
    sid = new_session_id()

    def go(who, mtype, payload, state=OPEN):
        env = envelope(MODE, mtype, sid, who, payload)
        ack = stub.Send(core_pb2.SendRequest(envelope=env), metadata=auth(who), timeout=30).ack
        assert ack.ok and ack.session_state == state, (mtype, ack)

    go("coordinator", "SessionStart", start_payload(["coordinator", "alice", "bob"]))
    go("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="ship"))
    go("alice", "Evaluation", decision_pb2.EvaluationPayload(proposal_id="p1", recommendation="APPROVE",
                                                             confidence=0.9))
    go("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))
    go("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))
    go("coordinator", "Commitment", commitment(action="deployment.approved"), RESOLVED)
    return time.monotonic() - t0


@pytest.mark.parametrize("flood_limited", [False, True], ids=["flood-within-limits", "flood-rate-limited"])
def test_flood_from_one_sender_does_not_starve_another(server_factory, flood_limited):
    env = {"MACP_MESSAGE_LIMIT_PER_MINUTE": "200"} if flood_limited else {}
    srv = server_factory(env=env)
    stub = srv.stub()
    flood_sid = new_session_id()
    ack = stub.Send(core_pb2.SendRequest(envelope=envelope(MODE, "SessionStart", flood_sid, "flooder",
                                                           start_payload(["flooder", "x"]))),
                    metadata=bearer("flooder")).ack
    assert ack.ok, ack

    stop = threading.Event()
    counts = {"ok": 0, "limited": 0, "other": 0}
    lock = threading.Lock()

    def hammer(n):
        # every thread has its own channel, so the flood is not serialised by one HTTP/2 connection
        with grpc.insecure_channel(srv.target) as ch:
            from macp.v1 import core_pb2_grpc
            s = core_pb2_grpc.MACPRuntimeServiceStub(ch)
            i = 0
            while not stop.is_set():
                i += 1
                env = envelope(MODE, "Proposal", flood_sid, "flooder",
                               decision_pb2.ProposalPayload(proposal_id=f"t{n}-{i}", option="o"))
                a = s.Send(core_pb2.SendRequest(envelope=env), metadata=bearer("flooder"), timeout=30).ack
                key = "ok" if a.ok else "limited" if a.error.code == "RATE_LIMITED" else "other"
                with lock:
                    counts[key] += 1

    threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)                          # the flood is in full swing
        before = sum(counts.values())
        elapsed = [decision_session(stub, bearer) for _ in range(3)]
        during = sum(counts.values()) - before
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    print(f"victim sessions {[round(e, 3) for e in elapsed]} s; flood {counts}, {during} during")
    assert max(elapsed) < 15.0, (elapsed, counts)
    assert sum(counts.values()) > 100 and during > 0, counts    # the flood really ran, also meanwhile
    assert counts["other"] == 0, counts
    if flood_limited:
        assert counts["limited"] > 0 and counts["ok"] == 200, counts
    # the server is healthy afterwards
    assert stub.GetSession(core_pb2.GetSessionRequest(session_id=flood_sid), metadata=bearer("flooder")).metadata.state \
        == OPEN
