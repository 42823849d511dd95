"""The session lifecycle over the wire (runtime.md §5.6–§5.9, §8.7–§8.8): ListSessions (+ paging),
WatchSessions, TTL expiry (lazy and by the background sweep), SuspendSession/ResumeSession, eviction
of old terminal sessions and reuse of their ids, and restarts.

Servers with a short sweep period use `server_factory`; the rest share the module's server.
"""
from __future__ import annotations

import time

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload, display_name

# Shared by both protocol profiles: every test runs against a v0.4.0 and a current server.
PROFILES = ("v0.4.0", "current")
from tests.support.streamkit import Collector, Duplex

MODE = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
EXPIRED = envelope_pb2.SESSION_STATE_EXPIRED
SUSPENDED = envelope_pb2.SESSION_STATE_SUSPENDED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
E = core_pb2.SessionLifecycleEvent
FAST_SWEEP = {"MACP_CLEANUP_INTERVAL_SECS": "0.1"}


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


def start(stub, participants=("alice", "bob"), sender="coord", session_id=None, **fields) -> str:
    sid = session_id or new_session_id()
    ack = send(stub, envelope(MODE, "SessionStart", sid, sender, start_payload(participants, **fields)))
    assert ack.ok, ack
    return sid


def resolve(stub, sid):
    for env in (envelope(MODE, "Proposal", sid, "alice", decision_pb2.ProposalPayload(proposal_id="p1", option="o")),
                envelope(MODE, "Vote", sid, "bob", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
                envelope(MODE, "Commitment", sid, "coord", commitment())):
        ack = send(stub, env)
        assert ack.ok, ack
    assert ack.session_state == RESOLVED


def get(stub, sid, who="coord") -> core_pb2.SessionMetadata:
    return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer(who)).metadata


def listed(stub, **request) -> dict[str, core_pb2.SessionMetadata]:
    resp = stub.ListSessions(core_pb2.ListSessionsRequest(**request), metadata=bearer("coord"))
    return {m.session_id: m for m in resp.sessions}


def suspend(stub, sid, who="coord", reason="pause"):
    return stub.SuspendSession(core_pb2.SuspendSessionRequest(session_id=sid, reason=reason), metadata=bearer(who)).ack


def resume(stub, sid, who="coord", reason="go"):
    return stub.ResumeSession(core_pb2.ResumeSessionRequest(session_id=sid, reason=reason), metadata=bearer(who)).ack


def watch(stub, who="coord") -> Collector:
    return Collector(stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=bearer(who)))


def events_for(w: Collector, sid: str, n: int, timeout: float = 10.0) -> list:
    """The next n lifecycle events of session `sid` (others are skipped)."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        item = w.recv(max(0.01, deadline - time.monotonic()))
        assert item is not None and hasattr(item, "event"), item
        if item.event.session.session_id == sid:
            out.append(item.event)
    return out


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


# --- ListSessions ------------------------------------------------------------------------------------

def test_list_sessions_returns_every_session_in_memory_in_any_state(stub):
    open_ = start(stub)
    done = start(stub)
    resolve(stub, done)
    gone = start(stub)
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=gone), metadata=bearer("coord")).ack.ok
    resp = stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=bearer("coord"))
    assert resp.next_page_token == ""
    states = {m.session_id: m.state for m in resp.sessions}
    assert (states[open_], states[done], states[gone]) == (OPEN, RESOLVED, CANCELLED)
    assert listed(stub)[open_] == get(stub, open_)
    err = rpc_error(stub.ListSessions, core_pb2.ListSessionsRequest())
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


def test_list_sessions_pages_through_everything_exactly_once(stub):
    for _ in range(5):
        start(stub)
    everything = set(listed(stub))
    seen, token, pages = [], "", 0
    while True:
        resp = stub.ListSessions(core_pb2.ListSessionsRequest(page_size=2, page_token=token), metadata=bearer("coord"))
        assert len(resp.sessions) <= 2
        seen.extend(m.session_id for m in resp.sessions)
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) and set(seen) >= everything
    assert pages >= 3
    err = rpc_error(stub.ListSessions, core_pb2.ListSessionsRequest(page_size=2, page_token="!!"), metadata=bearer("coord"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    err = rpc_error(stub.ListSessions, core_pb2.ListSessionsRequest(page_size=-1), metadata=bearer("coord"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- WatchSessions -------------------------------------------------------------------------------------

def test_watch_sessions_starts_with_created_for_each_session_then_live_events(stub):
    before = start(stub)
    md = get(stub, before)
    w = watch(stub)
    initial = events_for(w, before, 1)[0]
    assert initial.event_type == E.EVENT_TYPE_CREATED
    assert initial.observed_at_unix_ms == md.started_at_unix_ms and initial.session == md
    sid = start(stub)
    created = events_for(w, sid, 1)[0]
    assert created.event_type == E.EVENT_TYPE_CREATED and created.observed_at_unix_ms >= md.started_at_unix_ms
    resolve(stub, sid)
    resolved = events_for(w, sid, 1)[0]
    assert resolved.event_type == E.EVENT_TYPE_RESOLVED and resolved.session.state == RESOLVED
    other = start(stub)
    assert suspend(stub, other).ok and resume(stub, other).ok
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=other), metadata=bearer("coord")).ack.ok
    kinds = [e.event_type for e in events_for(w, other, 4)]
    assert kinds == [E.EVENT_TYPE_CREATED, E.EVENT_TYPE_SUSPENDED, E.EVENT_TYPE_RESUMED, E.EVENT_TYPE_CANCELLED]
    # Nothing for rejected messages or repeated cancels.
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=other), metadata=bearer("coord")).ack.ok
    assert not send(stub, envelope(MODE, "Vote", before, "alice", b"\xff")).ok
    assert w.nothing_within(0.3)
    w.cancel()
    err = rpc_error(lambda: next(stub.WatchSessions(core_pb2.WatchSessionsRequest())))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


# --- TTL -----------------------------------------------------------------------------------------------

def test_a_200ms_ttl_expires_lazily_on_lookup(stub):
    sid = start(stub, ttl_ms=200)
    w = watch(stub)
    events_for(w, sid, 1)
    time.sleep(0.35)
    assert listed(stub)[sid].state == OPEN           # ListSessions never expires lazily
    assert get(stub, sid).state == EXPIRED           # GetSession does
    expired = events_for(w, sid, 1)[0]
    assert expired.event_type == E.EVENT_TYPE_EXPIRED and expired.session.state == EXPIRED
    ack = send(stub, envelope(MODE, "Proposal", sid, "alice", decision_pb2.ProposalPayload(proposal_id="p", option="o")))
    assert (ack.ok, ack.error.code) == (False, "SESSION_NOT_OPEN")
    w.cancel()


def test_the_background_sweep_expires_a_200ms_ttl_without_any_lookup(inprocess_factory):
    srv = inprocess_factory(env={"MACP_MEMORY_ONLY": "1", **FAST_SWEEP})
    stub = srv.stub()
    w = watch(stub)
    sid = start(stub, ttl_ms=200)
    assert events_for(w, sid, 1)[0].event_type == E.EVENT_TYPE_CREATED
    expired = events_for(w, sid, 1, timeout=5)[0]
    assert expired.event_type == E.EVENT_TYPE_EXPIRED
    assert listed(stub)[sid].state == EXPIRED
    # The sweep wrote the TtlExpired entry: a late subscriber still sees only the SessionStart.
    d = Duplex(stub, "alice").subscribe(sid)
    assert [r.envelope.message_type for r in d.recv_n(1)] == ["SessionStart"]
    assert d.nothing_within(0.2)
    d.close()
    w.cancel()


def test_bad_sweep_settings_fall_back_to_the_defaults(server_factory):
    srv = server_factory(env={"MACP_MEMORY_ONLY": "1", "MACP_CLEANUP_INTERVAL_SECS": "soon",
                              "MACP_SESSION_RETENTION_SECS": "0"})
    assert "MACP_CLEANUP_INTERVAL_SECS='soon' is not a positive number of seconds; using the default 60" in srv.log()
    assert "MACP_SESSION_RETENTION_SECS='0' is not a positive number of seconds; using the default 3600" in srv.log()


# --- Suspend / Resume ----------------------------------------------------------------------------------

def test_suspend_and_resume(stub):
    sid = start(stub, ttl_ms=60_000)
    before = get(stub, sid).expires_at_unix_ms
    ack = suspend(stub, sid)
    assert (ack.ok, ack.session_state, ack.session_id, ack.message_id) == (True, SUSPENDED, sid, "")
    assert get(stub, sid).state == SUSPENDED
    prop = envelope(MODE, "Proposal", sid, "alice", decision_pb2.ProposalPayload(proposal_id="p1", option="o"))
    ack = send(stub, prop)
    assert (ack.ok, ack.error.code, display_name(ack.error)) == (False, "SESSION_NOT_OPEN", "SessionNotOpen")
    again = suspend(stub, sid)
    assert (again.ok, again.error.code, again.session_state, again.error.session_id) == (
        False, "SESSION_NOT_OPEN", 0, sid)
    time.sleep(0.3)
    ack = resume(stub, sid)
    assert (ack.ok, ack.session_state) == (True, OPEN)
    after = get(stub, sid).expires_at_unix_ms
    assert after - before >= 300                    # the deadline moved by the time spent suspended
    assert send(stub, prop).ok                      # the id was not consumed by the refusal
    ack = resume(stub, sid)
    assert (ack.ok, ack.error.code) == (False, "SESSION_NOT_OPEN")


def test_suspend_resume_authority_and_lookup(stub):
    sid = start(stub)
    for rpc, verb in ((stub.SuspendSession, "suspend"), (stub.ResumeSession, "resume")):
        req = (core_pb2.SuspendSessionRequest if verb == "suspend" else core_pb2.ResumeSessionRequest)(session_id=sid)
        err = rpc_error(rpc, req, metadata=bearer("alice"))
        assert (err.code(), err.details()) == (
            grpc.StatusCode.PERMISSION_DENIED,
            f"FORBIDDEN: only the session initiator or policy-delegated roles can {verb}")
        missing = new_session_id()
        req.session_id = missing
        err = rpc_error(rpc, req, metadata=bearer("coord"))
        assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"Session '{missing}' not found")
        err = rpc_error(rpc, req)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    done = start(stub)
    resolve(stub, done)
    ack = suspend(stub, done)
    assert (ack.ok, ack.error.code) == (False, "SESSION_NOT_OPEN")


def test_a_suspended_session_does_not_expire_on_its_deadline_and_cancel_clears_it(inprocess_factory):
    srv = inprocess_factory(env={"MACP_MEMORY_ONLY": "1", **FAST_SWEEP})
    stub = srv.stub()
    sid = start(stub, ttl_ms=300)
    assert suspend(stub, sid).ok
    time.sleep(0.6)                                 # past the original deadline, several sweeps later
    assert get(stub, sid).state == SUSPENDED
    assert resume(stub, sid).ok
    assert get(stub, sid).state == OPEN             # the deadline moved by ~600 ms
    assert suspend(stub, sid).ok
    ack = stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid), metadata=bearer("coord")).ack
    assert (ack.ok, ack.session_state) == (True, CANCELLED)


def test_suspension_survives_a_restart(server_factory):
    srv = server_factory()
    stub = srv.stub()
    sid = start(stub, ttl_ms=60_000)
    resumed = start(stub, ttl_ms=60_000)
    assert suspend(stub, sid).ok
    assert suspend(stub, resumed).ok
    time.sleep(0.2)
    assert resume(stub, resumed).ok
    want = {s: (get(stub, s).state, get(stub, s).expires_at_unix_ms) for s in (sid, resumed)}
    srv.kill()
    srv.start()
    stub = srv.stub()
    got = {s: (get(stub, s).state, get(stub, s).expires_at_unix_ms) for s in (sid, resumed)}
    assert got[sid][0] == SUSPENDED and got[resumed][0] == OPEN
    # Replay rebuilds deadlines from receive times: the same within the clock's resolution.
    assert abs(got[resumed][1] - want[resumed][1]) < 50
    assert resume(stub, sid).ok
    assert get(stub, sid).state == OPEN


# --- Retention and eviction -------------------------------------------------------------------------

def test_old_terminal_sessions_are_evicted_and_their_ids_can_start_again(server_factory):
    srv = server_factory(env={**FAST_SWEEP, "MACP_SESSION_RETENTION_SECS": "0.3"})
    stub = srv.stub()
    done = start(stub)
    resolve(stub, done)
    cancelled = start(stub)
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=cancelled), metadata=bearer("coord")).ack.ok
    live = start(stub)
    deadline = time.monotonic() + 5
    while done in listed(stub) and time.monotonic() < deadline:
        time.sleep(0.05)
    sessions = listed(stub)
    assert done not in sessions                          # RESOLVED and older than the retention: gone
    assert cancelled in sessions and live in sessions    # CANCELLED and OPEN sessions stay
    err = rpc_error(stub.GetSession, core_pb2.GetSessionRequest(session_id=done), metadata=bearer("coord"))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"Session '{done}' not found")
    ack = send(stub, envelope(MODE, "Proposal", done, "alice", decision_pb2.ProposalPayload(proposal_id="p", option="o")))
    assert ack.error.code == "SESSION_NOT_FOUND"
    # The id starts again; its history is the new incarnation's only.
    again = envelope(MODE, "SessionStart", done, "coord", start_payload(["alice", "bob"]))
    assert send(stub, again).ok
    assert get(stub, done).state == OPEN
    d = Duplex(stub, "alice").subscribe(done)
    assert [r.envelope.message_id for r in d.recv_n(1)] == [again.message_id]
    assert d.nothing_within(0.2)
    d.close()
    # After a restart the latest incarnation is the one that comes back.
    srv.kill()
    srv.start()
    stub = srv.stub()
    md = get(stub, done)
    assert md.state == OPEN
    resolve(stub, done)


def test_an_evicted_session_comes_back_after_a_restart(server_factory):
    srv = server_factory(env={**FAST_SWEEP, "MACP_SESSION_RETENTION_SECS": "0.3"})
    stub = srv.stub()
    done = start(stub)
    resolve(stub, done)
    deadline = time.monotonic() + 5
    while done in listed(stub) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done not in listed(stub)
    srv.kill()
    srv.start()
    # Its records stayed on disk, so it is replayed; the first sweep then evicts it again (§5.9).
    recovered = [line for line in srv.log().splitlines() if "sessions from" in line]
    assert "recovered 1 sessions" in recovered[-1]
    deadline = time.monotonic() + 5
    while done in listed(srv.stub()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert done not in listed(srv.stub())
