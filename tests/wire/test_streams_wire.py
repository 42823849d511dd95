"""StreamSession and WatchSignals over the wire (runtime.md §6, §7).

Passive subscribers joining late (after_sequence), the exact replay/live switch-over while a sender
keeps sending, fan-out to 100 subscribers, a laggard cut off with RESOURCE_EXHAUSTED while the others
continue, and every inline and terminating error of §7.2–§7.5.
"""
from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

# v0.4.0 semantics (raw-index after_sequence, terminating pre-checks, variant-named inline codes);
# the current line is tested in tests/wire/test_streams_current.py.
from tests.support.streamkit import Collector, Duplex, ids, inline, proposal, start

MODE = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
IA = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


# --- passive subscribers ---------------------------------------------------------------------------

@pytest.mark.parametrize("after", [0, 3])
def test_late_joiner_sees_exactly_the_right_envelopes_while_a_sender_keeps_sending(stub, after):
    sid = new_session_id()
    start_env = envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice", "bob"]))
    assert send(stub, start_env).ok
    sent = [start_env.message_id]
    total = 60
    first_batch = threading.Event()

    def sender():
        for i in range(total):
            env = proposal(sid, f"p{i}")
            ack = send(stub, env)
            assert ack.ok, ack
            sent.append(env.message_id)
            if i == 9:
                first_batch.set()

    t = threading.Thread(target=sender)
    t.start()
    first_batch.wait(10)
    d = Duplex(stub, "bob").subscribe(sid, after)   # joins while the sender is still going
    got = d.recv_n(total + 1 - after, timeout=20)
    t.join()
    assert ids(got) == sent[after:]                 # replay then live: no gap, no duplicate, in order
    assert d.nothing_within(0.2)
    assert got[0].envelope.sender == ("coord" if after == 0 else "alice")
    d.close()
    assert d.wait_end() == [] and d.status() == (grpc.StatusCode.OK, "")


def test_replayed_envelopes_are_rebuilt_from_history(stub):
    sid = new_session_id()
    env = envelope(MODE, "SessionStart", sid, "", start_payload(["alice"]), timestamp_unix_ms=0)
    assert send(stub, env, as_sender="coord").ok
    d = Duplex(stub, "alice").subscribe(sid)
    got = d.recv().envelope
    d.close()
    assert got.macp_version == "1.0" and got.mode == MODE and got.message_type == "SessionStart"
    assert got.message_id == env.message_id and got.session_id == sid and got.sender == "coord"
    assert got.payload == env.payload
    assert got.timestamp_unix_ms > 0                # the receive time stands in for a zero timestamp


def test_internal_entries_count_in_after_sequence_but_are_not_emitted(stub):
    sid = start(stub)
    assert send(stub, proposal(sid, "p1")).ok                                       # index 1
    for rpc in (stub.SuspendSession, stub.ResumeSession):                           # indices 2, 3
        req = core_pb2.SuspendSessionRequest(session_id=sid) if rpc is stub.SuspendSession \
            else core_pb2.ResumeSessionRequest(session_id=sid)
        assert rpc(req, metadata=bearer("coord")).ack.ok
    last = proposal(sid, "p2")
    assert send(stub, last).ok                                                      # index 4
    everything = Duplex(stub, "alice").subscribe(sid, 0)
    assert [r.envelope.message_type for r in everything.recv_n(3)] == ["SessionStart", "Proposal", "Proposal"]
    assert everything.nothing_within(0.2)
    skip = Duplex(stub, "alice").subscribe(sid, 3)
    assert ids(skip.recv_n(1)) == [last.message_id]
    assert skip.nothing_within(0.2)
    beyond = Duplex(stub, "alice").subscribe(sid, 1_000_000)
    assert beyond.nothing_within(0.2)
    for d in (everything, skip, beyond):
        d.close()
        assert d.wait_end() == []


def test_subscribing_to_a_terminal_session_gives_history_then_silence(stub):
    sid = start(stub, participants=("alice",))
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid), metadata=bearer("coord")).ack.ok
    d = Duplex(stub, "alice").subscribe(sid)
    assert [r.envelope.message_type for r in d.recv_n(1)] == ["SessionStart"]
    assert d.nothing_within(0.3)
    d.close()
    assert d.wait_end() == [] and d.status()[0] == grpc.StatusCode.OK


def test_a_second_subscribe_replays_again(stub):
    sid = start(stub)
    d = Duplex(stub, "alice").subscribe(sid)
    assert len(d.recv_n(1)) == 1
    d.subscribe(sid, 0)
    assert [r.envelope.message_type for r in d.recv_n(1)] == ["SessionStart"]
    env = proposal(sid, "p1")
    assert send(stub, env).ok
    assert ids(d.recv_n(1)) == [env.message_id]
    assert d.nothing_within(0.2)
    d.close()


def test_observer_initiator_and_participants_may_subscribe_others_get_an_inline_error(stub):
    sid = start(stub, participants=("alice",), sender="coord")
    for who in ("coord", "alice"):
        d = Duplex(stub, who).subscribe(sid)
        assert d.recv().envelope.message_type == "SessionStart"
        d.close()
    d = Duplex(stub, "mallory").subscribe(sid)
    err = inline(d.recv())
    text = "FORBIDDEN: caller is not a declared participant or observer for this session"
    assert (err.code, err.message, err.session_id, err.message_id) == (text, text, "", "")
    # The stream stays open and unbound: it can still be used for another session.
    other = start(stub, participants=("mallory",))
    d.subscribe(other)
    assert d.recv().envelope.session_id == other
    d.close()
    assert d.wait_end() == [] and d.status()[0] == grpc.StatusCode.OK


def test_one_hundred_passive_subscribers_all_receive_every_envelope(stub):
    sid = start(stub, participants=("alice", "bob"))
    subs = [Duplex(stub, ("alice", "bob", "coord")[i % 3]).subscribe(sid) for i in range(100)]
    for d in subs:
        assert d.recv(10).envelope.message_type == "SessionStart"
    sent = []
    for i in range(30):
        env = proposal(sid, f"p{i}")
        assert send(stub, env).ok
        sent.append(env.message_id)
    for d in subs:
        assert ids(d.recv_n(30, timeout=20)) == sent
    for d in subs:
        d.close()
    for d in subs:
        assert d.wait_end() == [] and d.status()[0] == grpc.StatusCode.OK


def test_a_slow_subscriber_is_cut_off_while_the_others_continue(inprocess_factory):
    srv = inprocess_factory(env={"MACP_MEMORY_ONLY": "1"})
    stub = srv.stub()
    sid = start(stub, participants=("alice", "bob"))
    fast = Duplex(stub, "alice").subscribe(sid)
    slow = Duplex(stub, "bob").subscribe(sid)
    for d in (fast, slow):
        assert d.recv().envelope.message_type == "SessionStart"
    slow.reading.clear()
    # Large envelopes fill the slow client's transport window quickly; it reads nothing meanwhile.
    big = "x" * 60_000
    total = 500
    for i in range(total):
        env = envelope(MODE, "Proposal", sid, "alice",
                       decision_pb2.ProposalPayload(proposal_id=f"p{i}", option="o", rationale=big))
        assert send(stub, env).ok
    got_fast = fast.recv_n(total, timeout=30)
    assert [r.envelope.payload for r in got_fast][-1] == env.payload
    slow.reading.set()
    rest = slow.wait_end(timeout=30)
    code, details = slow.status()
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, details)
    assert details.startswith("StreamSession receiver fell behind by ") and details.endswith(" envelopes")
    assert int(details.split()[-2]) >= 1
    assert len(rest) < total
    # The session and the fast subscriber go on.
    env = proposal(sid, "after")
    assert send(stub, env).ok
    assert ids(fast.recv_n(1)) == [env.message_id]
    fast.close()
    assert fast.wait_end() == []


# --- the sender side ---------------------------------------------------------------------------------

def test_a_session_driven_over_one_stream_echoes_each_accepted_envelope(stub):
    sid = new_session_id()
    d = Duplex(stub, "coord")
    start_env = envelope(MODE, "SessionStart", sid, "coord", start_payload(["coord", "alice"]))
    d.send(start_env)
    assert ids(d.recv_n(1)) == [start_env.message_id]
    prop = proposal(sid, "p1", sender="coord")
    d.send(prop)
    assert ids(d.recv_n(1)) == [prop.message_id]
    d.send(prop)                                       # a duplicate yields nothing at all
    vote = envelope(MODE, "Vote", sid, "alice", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))
    assert send(stub, vote).ok                         # another sender's envelope arrives live
    assert ids(d.recv_n(1)) == [vote.message_id]
    done = envelope(MODE, "Commitment", sid, "coord", commitment())
    d.send(done)
    assert ids(d.recv_n(1)) == [done.message_id]
    d.close()
    assert d.wait_end() == [] and d.status()[0] == grpc.StatusCode.OK
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("coord")).metadata
    assert md.state == RESOLVED


def test_inline_errors_keep_the_stream_open(stub, protocol_profile):
    sid = start(stub, participants=("alice",))
    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    no_id = proposal(sid, "p1")
    no_id.message_id = ""
    cases = [
        (proposal(sid, "p1", macp_version="2.0"), "InvalidMacpVersion"),
        (envelope(MODE, "Proposal", sid, "alice", b"\xff\xff"), "InvalidPayload"),
        (envelope(MODE, "Vote", sid, "alice", decision_pb2.VotePayload(proposal_id="nope", vote="APPROVE")),
         "InvalidPayload"),
        (no_id, "InvalidEnvelope"),
    ]
    for env, code in cases:
        d.send(env)
        err = inline(d.recv())
        assert (err.code, err.message, err.session_id, err.message_id) == (code, code, sid, "")
        if protocol_profile == "v0.4.0":
            assert err.details == b""
        else:   # the Ack's details: why (issue 15)
            assert json.loads(err.details)["reason"], err
    ok = proposal(sid, "p1")
    d.send(ok)
    assert ids(d.recv_n(1)) == [ok.message_id]
    d.close()
    assert d.wait_end() == [] and d.status()[0] == grpc.StatusCode.OK


def test_inline_forbidden_from_the_mode_and_from_capabilities(stub):
    sid = start(stub, participants=("alice",))
    d = Duplex(stub, "mallory")                     # not a participant: the mode says Forbidden
    d.send(proposal(sid, "p1", sender="mallory"))
    err = inline(d.recv())
    assert (err.code, err.session_id) == ("Forbidden", sid)
    d.close()
    assert d.wait_end() == []


def test_inline_unknown_session_and_unknown_mode(stub):
    d = Duplex(stub, "alice")
    missing = new_session_id()
    d.send(proposal(missing, "p1"))
    assert inline(d.recv()).code == "UnknownSession"
    d.send(envelope("ext.nope.v1", "SessionStart", missing, "alice", start_payload(["alice"])))
    assert inline(d.recv()).code == "UnknownMode"
    d.close()
    assert d.wait_end() == []


def test_progress_on_a_stream_goes_to_watch_signals_not_to_the_session(stub):
    sid = start(stub, participants=("alice",))
    signals = Collector(stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("alice")))
    time.sleep(0.2)
    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    progress = envelope(MODE, "Progress", sid, "alice", core_pb2.ProgressPayload(progress=0.5, total=1))
    d.send(progress)
    got = signals.recv().envelope
    assert (got.message_id, got.session_id, got.sender) == (progress.message_id, sid, "alice")
    assert d.nothing_within(0.3)
    d.close()
    signals.cancel()
    again = Duplex(stub, "alice").subscribe(sid)
    assert [r.envelope.message_type for r in again.recv_n(1)] == ["SessionStart"]
    assert again.nothing_within(0.2)                 # Progress never enters history
    again.close()


def terminated(d: Duplex, code, details, frames=0):
    rest = d.wait_end()
    assert len(rest) == frames, rest
    assert d.status() == (code, details)


def test_terminating_errors(stub):
    sid = start(stub, participants=("alice",))
    other = start(stub, participants=("alice",))

    both = core_pb2.StreamSessionRequest(envelope=proposal(sid, "p1"), subscribe_session_id=sid)
    terminated(Duplex(stub, "alice").raw(both), IA,
               "StreamSessionRequest must not contain both envelope and subscribe_session_id")
    terminated(Duplex(stub, "alice").raw(core_pb2.StreamSessionRequest(after_sequence=3)), IA,
               "StreamSessionRequest must contain an envelope or subscribe_session_id")
    missing = new_session_id()
    terminated(Duplex(stub, "alice").subscribe(missing), grpc.StatusCode.NOT_FOUND, f"Session '{missing}' not found")

    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    terminated(d.subscribe(other), IA, "StreamSession may only carry envelopes for one session_id")
    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    terminated(d.send(proposal(other, "p1")), IA, "StreamSession may only carry envelopes for one session_id")
    d = Duplex(stub, "alice").send(proposal(sid, "p1"))
    d.recv_n(1)                                   # the echo of p1 (bound by its first envelope)
    terminated(d.subscribe(other), IA, "StreamSession may only carry envelopes for one session_id")

    signal = envelope("", "Signal", "", "alice", core_pb2.SignalPayload(signal_type="ping"))
    terminated(Duplex(stub, "alice").send(signal), IA, "StreamSession requires a non-empty session_id")
    progress = envelope("", "Progress", sid, "alice", core_pb2.ProgressPayload(progress=1))
    terminated(Duplex(stub, "alice").send(progress), IA, "StreamSession requires a non-empty mode")
    terminated(Duplex(stub, "alice").send(proposal(sid, "p2", sender="bob")), grpc.StatusCode.UNAUTHENTICATED,
               "Unauthenticated")
    wrong_mode = envelope("macp.mode.task.v1", "TaskRequest", sid, "alice", b"")
    terminated(Duplex(stub, "alice").send(wrong_mode), IA,
               "INVALID_ENVELOPE: envelope mode does not match the bound session mode")
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=other), metadata=bearer("coord")).ack.ok
    terminated(Duplex(stub, "alice").send(proposal(other, "p9")), IA, "SESSION_NOT_OPEN")

    terminated(Duplex(stub, "alice").send(envelope(MODE, "SessionStart", "not-a-session-id", "alice",
                                                   start_payload(["alice"]))), IA, "InvalidSessionId")
    terminated(Duplex(stub, "alice").send(envelope(MODE, "SessionStart", sid, "alice", start_payload(["alice"]))),
               grpc.StatusCode.ALREADY_EXISTS, "SessionAlreadyExists")
    huge = envelope(MODE, "Proposal", sid, "alice", b"x" * (1_048_576 + 1))
    terminated(Duplex(stub, "alice").send(huge), grpc.StatusCode.RESOURCE_EXHAUSTED, "PayloadTooLarge")


def test_a_stream_without_credentials_fails_before_any_frame(stub):
    d = Duplex(stub, None).subscribe(new_session_id())
    terminated(d, grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


def test_rate_limit_on_a_stream_terminates_it(inprocess_factory):
    srv = inprocess_factory(env={"MACP_MEMORY_ONLY": "1", "MACP_MESSAGE_LIMIT_PER_MINUTE": "2"})
    stub = srv.stub()
    sid = start(stub, participants=("alice",))
    d = Duplex(stub, "alice")
    d.subscribe(sid)                               # subscribe frames are not rate-limited
    d.recv_n(1)
    for i in range(2):
        d.send(proposal(sid, f"p{i}"))
    got = d.recv_n(2)
    assert [r.envelope.message_type for r in got] == ["Proposal", "Proposal"]
    d.send(proposal(sid, "p3"))
    terminated(d, grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimited")


# --- WatchSignals -----------------------------------------------------------------------------------

def test_watch_signals_receives_signals_and_progress_with_the_derived_sender(stub):
    w1 = Collector(stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("w1")))
    w2 = Collector(stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("w2")))
    time.sleep(0.3)
    sig = envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="heartbeat", confidence=0.5))
    assert send(stub, sig, as_sender="alice").ok
    prog = envelope("", "Progress", "", "bob", core_pb2.ProgressPayload(progress_token="t", progress=1))
    assert send(stub, prog).ok
    bad = envelope("", "Signal", "", "alice", core_pb2.SignalPayload(signal_type=" "))
    assert not send(stub, bad).ok
    for w in (w1, w2):
        a, b = w.recv(), w.recv()
        assert (a.envelope.message_id, a.envelope.sender) == (sig.message_id, "alice")
        assert (b.envelope.message_id, b.envelope.sender) == (prog.message_id, "bob")
        assert not a.sender_authenticated
        assert w.nothing_within(0.2)
        w.cancel()


def test_watches_end_when_the_server_stops(server_factory):
    srv = server_factory(env={"MACP_MEMORY_ONLY": "1"})
    channel = grpc.insecure_channel(srv.target)    # not the fixture's channel: stop() closes that one
    stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
    sid = start(stub, participants=("alice",))
    d = Duplex(stub, "alice").subscribe(sid)
    d.recv_n(1)
    w = Collector(stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("alice")))
    r = Collector(stub.WatchRoots(core_pb2.WatchRootsRequest(), metadata=bearer("alice")))
    r.recv()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 8                  # streams do not hold the shutdown for its grace period
    assert d.status() == (grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
    assert w.status()[0] == grpc.StatusCode.OK and r.ended.wait(5)
    channel.close()


def test_capabilities_on_streams(inprocess_factory):
    """Static tokens: observers may subscribe to any session; can_start_sessions and allowed_modes
    are inline Forbidden on envelope frames; subscribe frames ignore allowed_modes (§4.5)."""
    tokens = [
        {"token": "t-coord", "sender": "coord"},
        {"token": "t-alice", "sender": "alice"},
        {"token": "t-watch", "sender": "watcher", "is_observer": True, "allowed_modes": ["macp.mode.task.v1"]},
        {"token": "t-nostart", "sender": "nostart", "can_start_sessions": False},
    ]
    import json
    srv = inprocess_factory(env={"MACP_MEMORY_ONLY": "1", "MACP_AUTH_TOKENS_JSON": json.dumps(tokens)})
    stub = srv.stub()
    sid = new_session_id()
    assert send(stub, envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice"])), as_sender="t-coord").ok
    observer = Duplex(stub, "t-watch").subscribe(sid)
    assert observer.recv().envelope.message_type == "SessionStart"
    observer.send(proposal(sid, "p1", sender="watcher"))           # allowed_modes excludes decision
    err = inline(observer.recv())
    assert (err.code, err.session_id) == ("Forbidden", sid)
    observer.close()
    assert observer.wait_end() == []
    d = Duplex(stub, "t-nostart")
    d.send(envelope(MODE, "SessionStart", new_session_id(), "nostart", start_payload(["alice"])))
    assert inline(d.recv()).code == "Forbidden"
    d.close()
    assert d.wait_end() == []
    terminated(Duplex(stub, "nobody").subscribe(sid), grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


# --- in-process: the stream state machine --------------------------------------------------------------

def test_session_stream_queues_live_envelopes_without_blocking_and_counts_a_lag():
    import asyncio
    import threading

    from macp_runtime.transport import streams as rs
    from macp_runtime.transport.loop import Wakeups

    async def scenario():
        stream = rs.SessionStream(Wakeups(asyncio.get_running_loop()))
        assert stream.offer(0, "z") and not stream.live       # not subscribed (a withdrawn provisional one)
        stream.subscribed = True                              # the engine offers only to subscribed streams
        assert stream.offer(0, "a") and list(stream.live) == [(0, "a")]
        await asyncio.wait_for(stream.bell.wait(), 1)        # a ring before the wait is not lost
        stream.live.clear()
        waiting = asyncio.ensure_future(stream.bell.wait())
        await asyncio.sleep(0)
        threading.Thread(target=stream.offer, args=(1, "b")).start()   # a kernel thread wakes the loop
        await asyncio.wait_for(waiting, 2)
        assert list(stream.live) == [(1, "b")]
        stream.discard_before(5)
        assert not stream.live
        for i in range(rs.LIVE_CAPACITY + 3):
            assert stream.offer(5 + i, i)                    # never blocks; beyond 256 it only counts
        assert stream.dropped == 3
        stream.finished = True
        assert not stream.offer(9999, "late")                # a finished stream leaves the channel

    asyncio.run(scenario())
