"""StreamSession under the current profile (../shared/spec/current.md §8): accepted-envelope ordinals
for `after_sequence` (exclusive), inline frames that carry what an Ack would (registry code, the
rejected message id, details) while the stream stays open, and the few conditions that end it, each
with its macp-error-code trailer.
"""
from __future__ import annotations

import json

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, policy_pb2

from tests.support import bearer, commitment, display_name, envelope, new_session_id, send, start_payload
from tests.support.streamkit import Duplex, ids, inline, proposal, start

PROFILE = "current"
MODE = "macp.mode.decision.v1"
IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


def test_after_sequence_counts_accepted_envelopes_only_and_is_exclusive(stub):
    sid = start(stub)
    first = proposal(sid, "p1")
    assert send(stub, first).ok                                   # ordinal 2
    for rpc, req in ((stub.SuspendSession, core_pb2.SuspendSessionRequest(session_id=sid)),
                     (stub.ResumeSession, core_pb2.ResumeSessionRequest(session_id=sid))):
        assert rpc(req, metadata=bearer("coord")).ack.ok           # internal records: no ordinal
    last = proposal(sid, "p2")
    assert send(stub, last).ok                                    # ordinal 3
    everything = Duplex(stub, "alice").subscribe(sid, 0)
    assert [r.envelope.message_type for r in everything.recv_n(3)] == ["SessionStart", "Proposal", "Proposal"]
    after_start = Duplex(stub, "alice").subscribe(sid, 1)
    assert ids(after_start.recv_n(2)) == [first.message_id, last.message_id]
    after_two = Duplex(stub, "alice").subscribe(sid, 2)
    assert ids(after_two.recv_n(1)) == [last.message_id]
    beyond = Duplex(stub, "alice").subscribe(sid, 3)
    assert beyond.nothing_within(0.2)
    live = proposal(sid, "p3")
    assert send(stub, live).ok
    for d in (everything, after_start, after_two, beyond):
        assert ids(d.recv_n(1)) == [live.message_id]
        d.close()
        assert d.wait_end() == []


def test_inline_errors_carry_the_ack_fields_and_keep_the_stream_open(stub):
    sid = start(stub, participants=("alice",))
    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    cases = [
        (proposal(sid, "p1", macp_version="2.0"), "UNSUPPORTED_PROTOCOL_VERSION", "InvalidMacpVersion"),
        (envelope(MODE, "Proposal", sid, "alice", b"\xff\xff"), "INVALID_ENVELOPE", "InvalidPayload"),
        (proposal(sid, "p1", sender="bob"), "UNAUTHENTICATED", "Unauthenticated"),                 # spoofed sender
        (envelope("macp.mode.task.v1", "TaskRequest", sid, "alice", b""), "INVALID_ENVELOPE", "InvalidEnvelope"),
        (envelope(MODE, "Vote", sid, "alice", decision_pb2.VotePayload(proposal_id="p1", vote="approve")),
         "INVALID_ENVELOPE", "InvalidPayload"),                                                     # casing
    ]
    for env, code, message in cases:
        d.send(env)
        err = inline(d.recv())
        # message: the display name, then the reason (issue 15), which details carry too
        assert (err.code, display_name(err), err.session_id, err.message_id) == (code, message, sid, env.message_id)
        assert err.message.startswith(f"{message}: ") and json.loads(err.details)["reason"]
    ok = proposal(sid, "p1")
    d.send(ok)
    assert ids(d.recv_n(1)) == [ok.message_id]
    d.send(ok)                                                     # a duplicate: no frame at all
    assert d.nothing_within(0.2)
    d.close()
    assert d.wait_end() == [] and d.status()[0] == grpc.StatusCode.OK


def test_state_and_session_errors_are_inline(stub):
    sid = start(stub, participants=("alice",))
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid), metadata=bearer("coord")).ack.ok
    late = proposal(sid, "p9")
    d = Duplex(stub, "alice")
    d.send(late)
    err = inline(d.recv())
    assert (err.code, err.message_id) == ("SESSION_NOT_OPEN", late.message_id)
    missing = proposal(new_session_id(), "p1")
    d2 = Duplex(stub, "alice")
    d2.send(missing)
    assert inline(d2.recv()).code == "SESSION_NOT_FOUND"
    d3 = Duplex(stub, "alice")
    d3.send(envelope(MODE, "SessionStart", "not-a-session-id", "alice", start_payload(["alice"])))
    assert inline(d3.recv()).code == "INVALID_SESSION_ID"
    for x in (d, d2, d3):
        x.close()
        assert x.wait_end() == []


def test_policy_denied_inline_carries_the_denials(stub):
    pid = f"maj.{new_session_id()[:8]}"
    assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id=pid, mode=MODE, rules=json.dumps({"voting": {"algorithm": "majority"}}), schema_version=3)),
        metadata=bearer("admin")).ok
    sid = start(stub, participants=("alice",), policy_version=pid)
    assert send(stub, proposal(sid, "p1")).ok
    d = Duplex(stub, "coord")
    c = envelope(MODE, "Commitment", sid, "coord", commitment(policy_version=""))
    d.send(c)
    err = inline(d.recv())
    assert (err.code, err.message_id) == ("POLICY_DENIED", c.message_id)
    assert [x["code"] for x in json.loads(err.details)["denials"]] == ["no_votes"]
    d.close()
    d.wait_end()


def test_what_ends_the_stream_and_its_trailer(stub):
    sid = start(stub, participants=("alice",))
    other = start(stub, participants=("alice",))
    both = core_pb2.StreamSessionRequest(envelope=proposal(sid, "p1"), subscribe_session_id=sid)
    for d, code, details, macp in [
        (Duplex(stub, "alice").raw(both), IA,
         "StreamSessionRequest must not contain both envelope and subscribe_session_id", "INVALID_REQUEST"),
        (Duplex(stub, "alice").raw(core_pb2.StreamSessionRequest(after_sequence=3)), IA,
         "StreamSessionRequest must contain an envelope or subscribe_session_id", "INVALID_REQUEST"),
    ]:
        assert d.wait_end() == [] and d.status() == (code, details)
        assert dict(d.error.trailing_metadata() or ()).get("macp-error-code") == macp
    missing = new_session_id()
    d = Duplex(stub, "alice").subscribe(missing)
    assert d.wait_end() == [] and d.status() == (grpc.StatusCode.NOT_FOUND, f"Session '{missing}' not found")
    assert dict(d.error.trailing_metadata() or ()).get("macp-error-code") == "SESSION_NOT_FOUND"
    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    d.send(proposal(other, "p1"))
    assert d.wait_end() == [] and d.status() == (IA, "StreamSession may only carry envelopes for one session_id")
