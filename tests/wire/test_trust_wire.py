"""The trust boundary over the wire (issue 12): no caller sees, starves or corrupts what is not theirs.

Three agents with static tokens (alice, bob, mallory), an observer and a registry manager, against a
real server. Each test names the point of the issue it covers; the auth points (7, 9, 10) are in
test_auth_wire.py, the hook points (11) in test_hooks_wire.py.
"""
from __future__ import annotations

import json
import os
import queue
import re
import stat
import sys
import time
import urllib.request
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from tests.support import ServerProcess, bearer, envelope, free_port, new_session_id, start_payload
from tests.support.streamkit import Collector, Duplex, _Pump

DECISION = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
INT64_MAX = 2**63 - 1
TOKENS = [
    {"token": "tok-alice", "sender": "alice"},
    {"token": "tok-bob", "sender": "bob"},
    {"token": "tok-mallory", "sender": "mallory"},
    {"token": "tok-watcher", "sender": "watcher", "is_observer": True},
    {"token": "tok-admin", "sender": "admin", "can_manage_mode_registry": True},
]
ALICE, BOB, MALLORY, WATCHER, ADMIN = (bearer(f"tok-{n}") for n in ("alice", "bob", "mallory", "watcher", "admin"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    metrics_port = free_port()
    srv = ServerProcess(str(tmp_path_factory.mktemp("trust") / "data"), {
        "MACP_AUTH_TOKENS_JSON": json.dumps(TOKENS),
        "MACP_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
    }).start()
    srv.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


def send(stub, env, metadata):
    return stub.Send(core_pb2.SendRequest(envelope=env), metadata=metadata).ack


def start(stub, metadata=ALICE, participants=("alice", "bob"), **fields) -> str:
    env = envelope(DECISION, "SessionStart", new_session_id(), "", start_payload(participants), **fields)
    ack = send(stub, env, metadata)
    assert ack.ok, ack
    return env.session_id


def proposal(sid, pid="p1"):
    return envelope(DECISION, "Proposal", sid, "", decision_pb2.ProposalPayload(proposal_id=pid, option="x"))


class _Duplex(Duplex):
    """A StreamSession authenticated with a static token (streamkit.Duplex sends dev-style names)."""

    def __init__(self, stub, metadata):
        self.requests = queue.Queue()
        call = stub.StreamSession(iter(self.requests.get, None), metadata=metadata)
        _Pump.__init__(self, call)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- 1. StreamSession binds only after access is granted -------------------------------------------------

def test_a_refused_frame_never_subscribes_the_stream(stub):
    """Before: mallory's refused Proposal subscribed her stream and she received every later envelope of
    alice's session with full payloads. Now: the error frame, then nothing."""
    sid = start(stub)
    m = _Duplex(stub, MALLORY)
    m.send(proposal(sid, "m1"))
    first = m.recv()
    assert first.HasField("error"), first
    assert send(stub, proposal(sid, "secret-plan"), ALICE).ok
    assert m.nothing_within(1.0)
    m.subscribe(sid)                         # an explicit subscribe is refused as before
    assert "FORBIDDEN" in m.recv().error.code
    assert send(stub, proposal(sid, "secret-2"), ALICE).ok
    assert m.nothing_within(0.5)
    m.close()
    assert m.wait_end() == []


def test_an_accepted_frame_subscribes_a_reader(stub):
    sid = start(stub)
    b = _Duplex(stub, BOB)
    env = proposal(sid, "b1")
    b.send(env)
    echo = b.recv()
    assert echo.envelope.message_id == env.message_id      # its own accepted envelope comes back
    later = proposal(sid, "a1")
    assert send(stub, later, ALICE).ok
    assert b.recv().envelope.message_id == later.message_id
    b.close()
    b.wait_end()


# --- 2. Listing and watching follow the same rule --------------------------------------------------------

def listed(stub, metadata) -> set[str]:
    return {s.session_id for s in stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=metadata).sessions}


def test_list_sessions_shows_only_readable_sessions(stub):
    """Before: ListSessions showed mallory every session. Now: only those she may read; observers all."""
    sid = start(stub)
    assert sid in listed(stub, ALICE) and sid in listed(stub, BOB) and sid in listed(stub, WATCHER)
    assert sid not in listed(stub, MALLORY)
    paged = stub.ListSessions(core_pb2.ListSessionsRequest(page_size=1000), metadata=MALLORY).sessions
    assert sid not in {s.session_id for s in paged}


def test_watch_sessions_shows_only_readable_sessions(stub):
    before = start(stub)
    m = Collector(stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=MALLORY))
    b = Collector(stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=BOB))
    seen_by_bob = set()
    deadline = time.monotonic() + 5
    while before not in seen_by_bob and time.monotonic() < deadline:
        seen_by_bob.add(b.recv().event.session.session_id)
    assert before in seen_by_bob
    mine = start(stub, MALLORY, participants=("mallory",))
    new = start(stub)
    got = set()
    while True:
        try:
            got.add(m.recv(1.0).event.session.session_id)
        except TimeoutError:
            break
    assert mine in got and new not in got and before not in got
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if b.recv(5).event.session.session_id == new:
            break
    else:
        raise AssertionError("bob never saw the new session")
    m.cancel()
    b.cancel()


def test_signals_about_a_session_reach_only_its_readers(stub):
    """Before: every (even anonymous) watcher got every Signal and Progress. Now: one that names a session
    only reaches watchers who may read it; ambient ones reach every authenticated watcher."""
    sid = start(stub)
    m = Collector(stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=MALLORY))
    b = Collector(stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=BOB))
    time.sleep(0.3)
    about = envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="s", correlation_session_id=sid))
    assert send(stub, about, ALICE).ok
    progress = envelope(DECISION, "Progress", sid, "", core_pb2.ProgressPayload(progress=0.5, total=1))
    assert send(stub, progress, ALICE).ok
    ambient = envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="ambient"))
    assert send(stub, ambient, ALICE).ok
    assert [b.recv().envelope.message_id for _ in range(3)] == [about.message_id, progress.message_id,
                                                                ambient.message_id]
    assert m.recv().envelope.message_id == ambient.message_id
    assert m.nothing_within(0.5)
    m.cancel()
    b.cancel()


def test_signal_or_progress_about_a_session_needs_write_access(stub):
    """Before: mallory could Signal/Progress about alice's session. Now: FORBIDDEN."""
    sid = start(stub)
    about = envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="s", correlation_session_id=sid))
    ack = send(stub, about, MALLORY)
    assert not ack.ok and ack.error.code == "FORBIDDEN"
    progress = envelope(DECISION, "Progress", sid, "", core_pb2.ProgressPayload(progress=0.5, total=1))
    ack = send(stub, progress, MALLORY)
    assert not ack.ok and ack.error.code == "FORBIDDEN"
    assert send(stub, progress, BOB).ok
    ack = send(stub, envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="s", correlation_session_id=new_session_id())), MALLORY)
    assert ack.ok   # a session that does not exist: ambient


# --- 3. Every watch needs a credential -------------------------------------------------------------------

@pytest.mark.parametrize("rpc,request_", [
    ("WatchSignals", core_pb2.WatchSignalsRequest()),
    ("WatchPolicies", policy_pb2.WatchPoliciesRequest()),
    ("WatchModeRegistry", core_pb2.WatchModeRegistryRequest()),
    ("WatchRoots", core_pb2.WatchRootsRequest()),
    ("WatchSessions", core_pb2.WatchSessionsRequest()),
])
def test_every_watch_needs_a_credential(stub, rpc, request_):
    """Before: WatchSignals, WatchPolicies, WatchModeRegistry and WatchRoots served anonymous callers."""
    err = rpc_error(lambda: next(getattr(stub, rpc)(request_, timeout=5)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    err = rpc_error(lambda: next(getattr(stub, rpc)(request_, metadata=bearer("tok-nobody"), timeout=5)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED


SPEC = """\
spec_version: 1
mode: ext.secret.v1
version: 1.0.0
descriptor:
  title: Secret rules
  message_types: [SessionStart, Note, Commitment]
payloads: {Note: json, Commitment: macp.v1.CommitmentPayload}
phases: {initial: Open, names: [Open, Done]}
transitions:
  - {message: Note, from: [Open], to: Open, senders: [participant]}
commitment: {message: Commitment, from: [Open], to: Done, senders: [initiator]}
"""


def spec_descriptor(name, text=SPEC, version="1.0.0", types=("SessionStart", "Note", "Commitment")):
    return core_pb2.ModeDescriptor(mode=name, mode_version=version, message_types=list(types),
                                   schema_uris={"macp-runtime/spec-yaml": text.replace("ext.secret.v1", name)})


def test_list_ext_modes_hides_spec_text_from_anonymous_callers(stub):
    name = f"ext.secret{uuid.uuid4().hex[:6]}.v1"
    ack = stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=spec_descriptor(name)), metadata=ADMIN)
    assert ack.ok, ack
    anonymous = {m.mode: m for m in stub.ListExtModes(core_pb2.ListExtModesRequest()).modes}
    assert name in anonymous and "macp-runtime/spec-yaml" not in anonymous[name].schema_uris
    known = {m.mode: m for m in stub.ListExtModes(core_pb2.ListExtModesRequest(), metadata=BOB).modes}
    assert "Secret rules" in known[name].schema_uris["macp-runtime/spec-yaml"]


# --- 4. Streams are counted and shared fairly ----------------------------------------------------------------

def test_streams_are_counted_per_identity_and_unary_calls_keep_answering(inprocess_factory):
    """Before: WatchPolicies took no stream slot (a few hundred of them starved unary calls) and one identity
    could hold every slot. Now: every stream counts, one identity holds at most its share."""
    srv = inprocess_factory(env={"MACP_AUTH_TOKENS_JSON": json.dumps(TOKENS), "MACP_MAX_STREAMS": "4",
                                 "MACP_MAX_STREAMS_PER_IDENTITY": "2"})
    stub = srv.stub()
    held = [Collector(stub.WatchPolicies(policy_pb2.WatchPoliciesRequest(), metadata=MALLORY)) for _ in range(2)]
    for c in held:
        c.recv()
    third = Collector(stub.WatchPolicies(policy_pb2.WatchPoliciesRequest(), metadata=MALLORY))
    assert third.status()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "PER_IDENTITY" in third.status()[1]
    refused = Collector(stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=MALLORY))
    assert refused.status()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    others = [Collector(stub.WatchRoots(core_pb2.WatchRootsRequest(), metadata=BOB)) for _ in range(2)]
    for c in others:
        c.recv()
    full = Collector(stub.WatchRoots(core_pb2.WatchRootsRequest(), metadata=WATCHER))
    assert full.status()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "MACP_MAX_STREAMS=4" in full.status()[1]
    t0 = time.monotonic()
    for _ in range(20):   # unary calls keep answering while every slot is taken
        stub.ListModes(core_pb2.ListModesRequest(), timeout=2)
        start(stub)
    assert time.monotonic() - t0 < 10
    held[0].cancel()
    time.sleep(0.3)
    again = Collector(stub.WatchPolicies(policy_pb2.WatchPoliciesRequest(), metadata=MALLORY))
    assert again.recv().descriptors is not None            # a released slot can be taken again
    for c in held + others + [again]:
        c.cancel()


# --- undecodable requests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["Send", "GetSession", "ListSessions", "RegisterExtMode", "RegisterPolicy",
                                    "WatchSessions", "Initialize"])
def test_undecodable_request_bytes_answer_invalid_argument(server, method):
    """Before: INTERNAL "Exception deserializing request!". Now: INVALID_ARGUMENT."""
    channel = server.channel()
    garbage = b"\xff\xff\xff\xff\x0f"
    if method == "WatchSessions":
        call = channel.unary_stream(f"/macp.v1.MACPRuntimeService/{method}")
        err = rpc_error(lambda: next(call(garbage, metadata=ALICE)))
    else:
        call = channel.unary_unary(f"/macp.v1.MACPRuntimeService/{method}")
        err = rpc_error(lambda: call(garbage, metadata=ALICE))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())


def test_an_undecodable_stream_frame_ends_the_stream_with_invalid_argument(server):
    call = server.channel().stream_stream("/macp.v1.MACPRuntimeService/StreamSession")
    err = rpc_error(lambda: list(call(iter([b"\xff\xff\xff\xff\x0f"]), metadata=ALICE)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


# --- 5. The deadline comes from the server's clock --------------------------------------------------------

def test_deadline_comes_from_the_server_clock(stub):
    """Before: a timestamp a century ahead made a session that never expires, INT64_MAX broke GetSession,
    ListSessions and WatchSessions for everyone (UNKNOWN). Now: the timestamp moves the deadline at most
    by MACP_CLOCK_SKEW_MS (30 s)."""
    century = int(time.time() * 1000) + 100 * 365 * 86_400_000
    now = int(time.time() * 1000)
    sid = start(stub, timestamp_unix_ms=century)
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=ALICE).metadata
    assert now + 60_000 <= md.expires_at_unix_ms <= int(time.time() * 1000) + 30_000 + 60_000 + 1000
    huge = start(stub, timestamp_unix_ms=INT64_MAX)
    behind = start(stub, timestamp_unix_ms=now - 100_000)
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=behind), metadata=ALICE).metadata
    assert md.expires_at_unix_ms >= now - 30_000 + 60_000 - 1000
    assert huge in listed(stub, ALICE)
    w = Collector(stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=ALICE))
    assert w.recv().HasField("event")
    w.cancel()
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=huge), metadata=ALICE).metadata
    assert md.expires_at_unix_ms < int(time.time() * 1000) + 120_000


def test_deadline_survives_restart(server_factory):
    srv = server_factory(env={"MACP_STRICT_RECOVERY": "1"})
    stub = srv.stub()
    env = envelope(DECISION, "SessionStart", new_session_id(), "alice", start_payload(["alice", "bob"]),
                   timestamp_unix_ms=INT64_MAX)
    assert stub.Send(core_pb2.SendRequest(envelope=env), metadata=bearer("alice")).ack.ok
    srv.restart()
    stub = srv.stub()
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=env.session_id), metadata=bearer("alice")).metadata
    assert md.state == OPEN and md.expires_at_unix_ms < int(time.time() * 1000) + 120_000
    assert stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=bearer("alice")).sessions


# --- 6. Untrusted YAML is bounded -------------------------------------------------------------------------

LAUGHS = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                   [f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)])


@pytest.mark.parametrize("text,reason", [
    (SPEC + "title_bomb:\n" + "\n".join("  " + line for line in LAUGHS.splitlines()) + "\n", "expands to more than"),
    ("spec_version: 1\nmode: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    (SPEC.replace("title: Secret rules", "title: [a, b]"), "must be a string"),
    (SPEC + "? [a, b]\n: c\n", "mapping key"),
    (SPEC.replace("Note", "phase"), ""),
    (SPEC.replace("Note", "trigger"), ""),
    (SPEC.replace("version: 1.0.0", "version: {a: 1}"), "must be a string"),
], ids=["alias-bomb", "deep-nesting", "title-not-string", "list-key", "type-named-phase", "type-named-trigger",
        "version-mapping"])
def test_bad_specs_are_refused_with_a_reason(stub, text, reason):
    """Before: a 575-byte alias spec froze the server 2 s and took 275 MB; deep nesting and list keys gave
    gRPC UNKNOWN. Now: ok=false with the reason, quickly."""
    name = f"ext.bad{uuid.uuid4().hex[:6]}.v1"
    d = spec_descriptor(name, text, types=("SessionStart", "Note", "phase", "trigger", "Commitment"))
    t0 = time.monotonic()
    resp = stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=ADMIN)
    assert time.monotonic() - t0 < 2.0
    if resp.ok:   # a message type named like a machine attribute may compile; it must then run
        sid = new_session_id()
        env = envelope(name, "SessionStart", sid, "", start_payload(["alice", "bob"]))
        assert send(stub, env, ALICE).ok
        ack = send(stub, envelope(name, "phase" if "phase" in text else "trigger", sid, "", b"{}"), BOB)
        assert ack.ok or ack.error.code, ack
        return
    assert reason in resp.error, resp.error


def test_a_passthrough_descriptor_with_many_types_compiles_in_linear_time(stub):
    """Before: 40,000 message types took 16 s (quadratic). Now well under that."""
    types = [f"T{i}" for i in range(40_000)]
    d = core_pb2.ModeDescriptor(mode=f"ext.wide{uuid.uuid4().hex[:6]}.v1", mode_version="1", message_types=types)
    t0 = time.monotonic()
    resp = stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=ADMIN, timeout=60)
    took = time.monotonic() - t0
    assert resp.ok, resp.error
    assert took < 8.0, took
    t0 = time.monotonic()
    assert stub.ListModes(core_pb2.ListModesRequest()).modes          # other calls are not held up
    assert time.monotonic() - t0 < 1.0


# --- 8. Limits apply to every door --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    srv = ServerProcess(str(tmp_path_factory.mktemp("trust-limited") / "data"), {
        "MACP_AUTH_TOKENS_JSON": json.dumps(TOKENS),
        "MACP_MESSAGE_LIMIT_PER_MINUTE": "5",
    }).start()
    yield srv
    srv.kill()


def test_suspend_resume_count_against_the_rate_limit_and_reasons_are_capped(limited):
    """Before: 20 Suspend/Resume calls with 1 MiB reasons passed a 5/min limit and grew the log by 21 MB."""
    stub = limited.stub()
    sid = start(stub)
    big = "r" * (1 << 20)
    ack = stub.SuspendSession(core_pb2.SuspendSessionRequest(session_id=sid, reason=big), metadata=ALICE).ack
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE"
    ack = stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid, reason=big), metadata=ALICE).ack
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE"
    codes = []
    for i in range(8):
        rpc = stub.SuspendSession if i % 2 == 0 else stub.ResumeSession
        req = (core_pb2.SuspendSessionRequest if i % 2 == 0 else core_pb2.ResumeSessionRequest)(session_id=sid,
                                                                                              reason="r")
        ack = rpc(req, metadata=ALICE).ack
        codes.append("ok" if ack.ok else ack.error.code)
    assert codes[:5] == ["ok"] * 5 and set(codes[5:]) == {"RATE_LIMITED"}, codes   # 5 per minute
    assert "r" * 10_000 not in limited.log()


@pytest.mark.parametrize("field", ["session_id", "message_id", "mode", "message_type"])
def test_free_strings_have_a_maximum_length(stub, field):
    """Before: a 1.9 MB session id was accepted, and three of them broke ListSessions for their caller."""
    sid = new_session_id()
    env = envelope(DECISION, "SessionStart", sid, "", start_payload(["alice", "bob"]))
    setattr(env, field, ("A" * 300) if field != "session_id" else "A" * 300)
    ack = send(stub, env, ALICE)
    assert not ack.ok and ack.error.code in ("INVALID_ENVELOPE", "INVALID_SESSION_ID"), ack
    assert len(ack.SerializeToString()) < 2000
    assert stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=ALICE).sessions is not None


def test_policy_ids_and_participant_names_are_capped(stub):
    long_id = "p" * 300
    resp = stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id=long_id, mode="*", rules="{}", schema_version=1)), metadata=ADMIN)
    assert not resp.ok and "256" in resp.error
    env = envelope(DECISION, "SessionStart", new_session_id(), "", start_payload(["alice", "b" * 300]))
    ack = send(stub, env, ALICE)
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE"


def test_the_rate_limiter_memory_is_bounded():
    from macp_runtime.kernel.ratelimit import SlidingWindow
    w = SlidingWindow(5, max_senders=1000)
    for i in range(50_000):
        assert w.allow(f"sender-{i}", now=float(i) / 1000)
    assert len(w) <= 1000
    assert w.allow("a", now=100.0) and len(w) <= 1000


# --- 12. PromoteMode cannot rename into macp.mode.* ----------------------------------------------------------

def test_promote_mode_cannot_rename_into_the_reserved_namespace(inprocess_factory):
    """Before: PromoteMode renamed an extension to macp.mode.anything (RegisterExtMode refuses that name).
    Now refused under the current profile (the default); the v0.4.0 profile keeps the reference's answer."""
    stub = inprocess_factory(env={"MACP_AUTH_TOKENS_JSON": json.dumps(TOKENS),
                                  "MACP_PROTOCOL_PROFILE": "current"}).stub()
    name = f"ext.promo{uuid.uuid4().hex[:6]}.v1"
    d = core_pb2.ModeDescriptor(mode=name, mode_version="1", message_types=["Note", "Commitment"],
                                terminal_message_types=["Commitment"])
    assert stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=ADMIN).ok
    resp = stub.PromoteMode(core_pb2.PromoteModeRequest(mode=name, promoted_mode_name="macp.mode.evil.v1"),
                            metadata=ADMIN)
    assert not resp.ok and "reserved" in resp.error
    assert "macp.mode.evil.v1" not in {m.mode for m in stub.ListModes(core_pb2.ListModesRequest()).modes}
    resp = stub.PromoteMode(core_pb2.PromoteModeRequest(mode=name, promoted_mode_name=name + ".std"), metadata=ADMIN)
    assert resp.ok and resp.mode == name + ".std"


# --- 13. Logs and metrics cannot be flooded or forged ----------------------------------------------------------

def test_metric_labels_take_only_known_modes_and_types(server, stub):
    """Before: 3,000 anonymous Sends with random modes grew /metrics from 4 KB to 24 MB."""
    for i in range(300):
        env = envelope(f"ext.random{uuid.uuid4().hex}.v1", f"Type{uuid.uuid4().hex}", new_session_id(), "", b"")
        send(stub, env, [])
        send(stub, env, ALICE)
    body = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert "ext.random" not in body and "Type" not in re.sub(r"# TYPE.*", "", body)
    assert 'mode="other"' in body
    assert len(body) < 64_000


def test_logged_values_are_escaped_and_rejections_rate_limited(server, stub):
    """Before: a message_id with a newline forged a `session created … initiator=admin` line, and every
    rejected message was logged. Now: escaped, capped, and rejection lines are rate-limited."""
    time.sleep(1.5)   # earlier tests used up the rejected-line budget; it refills at 20 lines/s
    forged = "x\n2026-01-01 00:00:00,000 INFO macp_runtime.kernel.engine: session created session_id=s initiator=admin"
    env = envelope(DECISION, "Proposal", new_session_id(), "", b"", message_id=forged)
    assert not send(stub, env, ALICE).ok
    time.sleep(0.5)
    before = server.log().count("message rejected")
    t0 = time.monotonic()
    for _ in range(400):
        send(stub, envelope(DECISION, "Proposal", new_session_id(), "", b"", message_id="y" * 250), [])
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    log = server.log()
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in log.splitlines())
    assert "x\\n2026-01-01" in log
    logged = log.count("message rejected") - before
    assert logged <= 20 * (elapsed + 1) + 20, (logged, elapsed)     # 20 lines a second at most
    if elapsed < 15:
        assert "suppressed_before" in log


# --- 14. Secrets stay secret and files stay private ---------------------------------------------------------------

def test_secrets_are_masked_and_files_private(server_factory, tmp_path):
    old = os.umask(0)
    try:
        srv = server_factory(env={
            "MACP_AUTH_ISSUER": "https://issuer.test",
            "MACP_AUTH_JWKS_URL": "https://jwksuser:jwks-pass-123@127.0.0.1:9/jwks.json?access_token=qtok-456",
            "MACP_AUTH_TOKENS_JSON": json.dumps(TOKENS),
            "MACP_DATABASE_URL": "host=db user=macp password='pg secret 789'",
        })
    finally:
        os.umask(old)
    stub = srv.stub()
    start(stub)
    srv.stop()
    log = srv.log()
    for secret in ("jwks-pass-123", "qtok-456", "pg secret 789", "secret 789"):
        assert secret not in log
    data = srv.data_dir
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    for root, dirs, files in os.walk(data):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f


def opcli(*args, env=None):
    import subprocess
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "macp_runtime", *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_operator_cli_guards_its_token_and_escapes_server_strings(server, stub, tmp_path):
    # plaintext to a non-loopback target is refused before anything is sent
    proc = opcli("sessions", "list", "--target", "10.255.255.1:50051", "--token", "tok-alice")
    assert proc.returncode != 0 and "plaintext" in proc.stderr
    # the token from a file or the environment instead of argv
    token_file = tmp_path / "token"
    token_file.write_text("tok-alice\n")
    sid = start(stub)
    proc = opcli("sessions", "list", "--target", server.target, "--token-file", str(token_file))
    assert proc.returncode == 0 and sid in proc.stdout, proc.stderr
    proc = opcli("sessions", "list", "--target", server.target, env={"MACP_TOKEN": "tok-alice"})
    assert proc.returncode == 0 and sid in proc.stdout
    # control characters from the server are shown escaped
    evil = envelope("", "Signal", "", "", core_pb2.SignalPayload(signal_type="s"))
    env = envelope(DECISION, "SessionStart", new_session_id(), "", start_payload(["alice", "bob\x1b[2J"]))
    assert send(stub, env, ALICE).ok
    proc = opcli("sessions", "show", env.session_id, "--target", server.target, env={"MACP_TOKEN": "tok-alice"})
    assert proc.returncode == 0 and "\x1b" not in proc.stdout and "\\x1b" in proc.stdout, proc.stdout
    del evil
