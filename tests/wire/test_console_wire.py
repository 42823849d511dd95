"""The console's JSON API and event stream against a real server, sessions driven over gRPC."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.request

import pytest
from macp.v1 import envelope_pb2

from tests.support import ROOT, free_port
from tests.support.consolekit import DECISION, DecisionSession, EventStream, console_server, get, wait_console

STATIC_TOKENS = [
    {"token": "tok-coordinator", "sender": "coordinator"},
    {"token": "tok-alice", "sender": "alice"},
    {"token": "tok-bob", "sender": "bob"},
    {"token": "tok-mallory", "sender": "mallory"},
    {"token": "tok-ops", "sender": "ops", "is_observer": True, "can_start_sessions": False},
]


@pytest.fixture
def dev(inprocess_factory):
    return console_server(inprocess_factory)


@pytest.fixture
def dev_process(server_factory):
    return console_server(server_factory)


@pytest.fixture
def static(inprocess_factory):
    return console_server(inprocess_factory, env={"MACP_AUTH_TOKENS_JSON": json.dumps(STATIC_TOKENS)})


def _static_send(srv):
    """gRPC sends with static tokens: the sender name maps to its token."""
    stub = srv.stub()

    class Stub:
        def Send(self, request, metadata=None, **kw):
            who = dict(metadata)["authorization"].split(" ", 1)[1]
            return stub.Send(request, metadata=[("authorization", f"Bearer tok-{who}")], **kw)
    return Stub()


def test_every_api_answer_needs_a_credential(static):
    for path in ("/api/whoami", "/api/sessions", "/api/sessions/x", "/api/events", "/api/modes",
                 "/api/modes/macp.mode.decision.v1", "/api/policies", "/api/sessions/x/envelopes/0"):
        status, body, headers = get(static.console, path)
        assert status == 401, path
        assert headers["WWW-Authenticate"] == "Bearer"
        assert "unauthenticated" in body["error"]
        status, _, _ = get(static.console, path, token="not-a-token")   # the static resolver refuses it
        assert status == 401, path
    status, body, _ = get(static.console, "/api/whoami", token="tok-ops")
    assert (status, body) == (200, {"sender": "ops", "is_observer": True})


def test_the_page_and_its_assets_are_served_without_credentials_and_without_external_urls(dev):
    status, html, headers = get(dev.console, "/", raw=True)
    assert status == 200 and b"<title>MACP console</title>" in html
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for asset in ("/static/console.js", "/static/console.css"):
        status, body, _ = get(dev.console, asset, raw=True)
        assert status == 200 and len(body) > 1000
        assert b"http://" not in body and b"https://" not in body   # nothing fetched from elsewhere
    assert b"https://" not in html and b"http://" not in html


def test_read_only_no_other_method_is_routed(dev):
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        req = urllib.request.Request(dev.console + "/api/sessions", method=method, data=b"{}",
                                     headers={"Authorization": "Bearer alice"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 405


def test_each_identity_sees_exactly_the_sessions_it_may_read(static):
    stub = _static_send(static)
    mine = DecisionSession(stub)
    mine.start()
    other = DecisionSession(stub, initiator="mallory", participants=("mallory",))
    other.start()

    def visible(token):
        status, body, _ = get(static.console, "/api/sessions", token=token)
        assert status == 200
        return {s["session_id"] for s in body["sessions"]}

    assert mine.sid in visible("tok-alice") and other.sid not in visible("tok-alice")      # participant
    assert mine.sid in visible("tok-coordinator") and other.sid not in visible("tok-coordinator")  # initiator
    assert other.sid in visible("tok-mallory") and mine.sid not in visible("tok-mallory")
    assert {mine.sid, other.sid} <= visible("tok-ops")                                     # observer
    # A session the identity may not read answers as an unknown one: nothing tells it exists.
    assert get(static.console, f"/api/sessions/{other.sid}", token="tok-alice")[0] == 404
    assert get(static.console, "/api/sessions/no-such-session", token="tok-alice")[0] == 404
    assert get(static.console, f"/api/sessions/{other.sid}/envelopes/0", token="tok-alice")[0] == 404
    assert get(static.console, f"/api/sessions/{other.sid}", token="tok-ops")[0] == 200
    # filters
    status, body, _ = get(static.console, "/api/sessions?state=RESOLVED", token="tok-ops")
    assert not {mine.sid, other.sid} & {s["session_id"] for s in body["sessions"]}
    status, body, _ = get(static.console, f"/api/sessions?state=open&mode={DECISION}", token="tok-ops")
    assert {mine.sid, other.sid} <= {s["session_id"] for s in body["sessions"]}


def test_session_detail_phase_path_history_resolution(dev):
    s = DecisionSession(dev.stub())
    s.start()
    s.propose()
    s.evaluate()
    status, body, _ = get(dev.console, f"/api/sessions/{s.sid}", token="alice")
    assert status == 200
    assert (body["state"], body["phase"], body["initiator"]) == ("OPEN", "Evaluation", "coordinator")
    assert body["resolution"] is None and body["ttl_ms"] == 600_000
    assert [e["phase"] for e in body["history"]] == ["Proposal", "Evaluation", "Evaluation"]
    assert body["graph"]["phases"] == ["Proposal", "Evaluation", "Voting", "Committed"]
    assert 'data-phase="Voting"' in body["diagram"] and body["diagram"].startswith("<svg")
    s.vote("alice")
    s.vote("bob")
    s.commit()
    status, body, _ = get(dev.console, f"/api/sessions/{s.sid}", token="bob")
    assert (body["state"], body["phase"]) == ("RESOLVED", "Committed")
    history = body["history"]
    assert [e["message_type"] for e in history] == ["SessionStart", "Proposal", "Evaluation", "Vote", "Vote",
                                                     "Commitment"]
    assert [e["phase"] for e in history] == ["Proposal", "Evaluation", "Evaluation", "Voting", "Voting", "Committed"]
    start, proposal, evaluation = history[0], history[1], history[2]
    assert start["payload_type"] == "macp.v1.SessionStartPayload"
    assert start["payload"]["participants"] == ["coordinator", "alice", "bob"]
    assert proposal["payload_type"] == "macp.modes.decision.v1.ProposalPayload"
    assert proposal["payload"]["option"] == "deploy v2"
    assert evaluation["payload"]["recommendation"] == "APPROVE" and evaluation["sender"] == "alice"
    assert body["resolution"]["type"] == "macp.v1.CommitmentPayload"
    assert body["resolution"]["value"]["action"] == "deployment.approved"
    assert {a["participant"]: a["count"] for a in body["activity"]} == {"coordinator": 2, "alice": 2, "bob": 1}


def test_refused_messages_are_not_history(dev):
    from tests.support import envelope, send
    from macp.modes.decision.v1 import decision_pb2

    s = DecisionSession(dev.stub())
    s.start()
    ack = send(dev.stub(), envelope(DECISION, "Vote", s.sid, "alice",
                                    decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")))
    assert not ack.ok
    ack = send(dev.stub(), envelope(DECISION, "Proposal", s.sid, "mallory",
                                    decision_pb2.ProposalPayload(proposal_id="p1", option="x")))
    assert not ack.ok
    body = get(dev.console, f"/api/sessions/{s.sid}", token="coordinator")[1]
    assert [e["message_type"] for e in body["history"]] == ["SessionStart"]


def test_raw_envelope_json_and_protobuf(dev):
    s = DecisionSession(dev.stub())
    s.start()
    s.propose()
    status, body, _ = get(dev.console, f"/api/sessions/{s.sid}/envelopes/1", token="alice")
    assert status == 200
    env = body["envelope"]
    assert (env["message_type"], env["sender"], env["session_id"]) == ("Proposal", "coordinator", s.sid)
    raw = base64.b64decode(body["envelope_proto_base64"])
    status, proto, headers = get(dev.console, f"/api/sessions/{s.sid}/envelopes/1?format=proto", token="alice",
                                 raw=True)
    assert status == 200 and proto == raw and headers["Content-Type"] == "application/x-protobuf"
    decoded = envelope_pb2.Envelope.FromString(proto)
    assert decoded.message_id == env["message_id"] and decoded.payload
    assert get(dev.console, f"/api/sessions/{s.sid}/envelopes/7", token="alice")[0] == 404
    assert get(dev.console, f"/api/sessions/{s.sid}/envelopes/x", token="alice")[0] == 404


def test_events_stream_lifecycle_and_envelopes_only_to_readers(static):
    stub = _static_send(static)
    alice = EventStream(static.console_port, "tok-alice")
    mallory = EventStream(static.console_port, "tok-mallory")
    ops = EventStream(static.console_port, "tok-ops")
    one = EventStream(static.console_port, "tok-alice", "?session=none-such")
    try:
        for stream in (alice, mallory, ops, one):
            assert stream.status == 200
            assert stream.next({"ready"})[0] == "ready"
        s = DecisionSession(stub)
        s.start()
        s.propose()
        event, data = alice.next({"envelope"})
        assert data["entry"]["message_type"] == "SessionStart" and data["session"]["session_id"] == s.sid
        assert data["entry"]["payload"]["participants"] == ["coordinator", "alice", "bob"]
        event, data = alice.next({"lifecycle"})
        assert data["event"] == "CREATED" and data["session"]["state"] == "OPEN"
        event, data = alice.next({"envelope"})
        assert data["entry"]["message_type"] == "Proposal" and data["session"]["phase"] == "Evaluation"
        assert data["entry"]["phase"] == "Evaluation" and data["entry"]["index"] == 1
        assert ops.next({"envelope"})[1]["session"]["session_id"] == s.sid
        s.evaluate()
        s.vote("alice")
        s.vote("bob")
        s.commit()
        kinds = []
        while True:
            event, data = alice.next({"envelope", "lifecycle"})
            kinds.append((event, data.get("event") or data["entry"]["message_type"], data["session"]["phase"]))
            if event == "lifecycle":
                break
        assert kinds == [("envelope", "Evaluation", "Evaluation"), ("envelope", "Vote", "Voting"),
                         ("envelope", "Vote", "Voting"), ("envelope", "Commitment", "Committed"),
                         ("lifecycle", "RESOLVED", "Committed")]
        # mallory's stream saw nothing of it; a stream filtered to another session neither
        mine = DecisionSession(stub, initiator="mallory", participants=("mallory",))
        mine.start()
        event, data = mallory.next({"envelope", "lifecycle"})
        assert data["session"]["session_id"] == mine.sid
        with pytest.raises(Exception):
            one.next({"envelope", "lifecycle"}, timeout=0.5)
    finally:
        for stream in (alice, mallory, ops, one):
            stream.close()


def test_events_need_a_credential(dev):
    stream = EventStream(dev.console_port, "")
    try:
        assert stream.status == 401
    finally:
        stream.close()


def test_modes_and_policies(dev):
    status, body, _ = get(dev.console, "/api/modes", token="alice")
    names = [m["name"] for m in body["modes"]]
    assert names[:5] == ["macp.mode.decision.v1", "macp.mode.proposal.v1", "macp.mode.task.v1",
                         "macp.mode.handoff.v1", "macp.mode.quorum.v1"]
    status, doc, _ = get(dev.console, "/api/modes/macp.mode.decision.v1", token="alice")
    assert status == 200
    # the same content as `macp-runtime docs`: its sections, its tables, the diagram as SVG
    for text in ("Who may send what, when", "Checks, in order", "Error codes a client can get",
                 "<table>", "<svg", 'data-phase="Evaluation"'):
        assert text in doc["html"], text
    assert "```mermaid" not in doc["html"] and "&lt;!--" not in doc["html"]
    assert {"from": "Evaluation", "to": "Voting", "label": "Vote"} in doc["graph"]["edges"]
    assert [e["n"] for e in doc["legend"]] == list(range(1, len(doc["graph"]["edges"]) + 1))
    for m in names:
        status, doc, _ = get(dev.console, f"/api/modes/{m}", token="alice")
        assert status == 200 and "<svg" in doc["diagram"], m
    assert get(dev.console, "/api/modes/nope", token="alice")[0] == 404
    status, body, _ = get(dev.console, "/api/policies", token="alice")
    default = next(p for p in body["policies"] if p["policy_id"] == "policy.default")
    assert default["mode"] == "*" and "commitment" in default["rules"]


def test_policy_registration_reaches_the_policies_stream(dev):
    from macp.v1 import policy_pb2

    from tests.support import bearer

    stream = EventStream(dev.console_port, "alice")
    try:
        stream.next({"ready"})
        ack = dev.stub().RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
            policy_id="policy.console-test", mode=DECISION, description="t", rules="{}", schema_version=1)),
            metadata=bearer("admin"))
        assert ack.ok, ack.error
        assert stream.next({"policies"})[1] == {"changed": "policies"}
        body = get(dev.console, "/api/policies", token="alice")[1]
        assert "policy.console-test" in {p["policy_id"] for p in body["policies"]}
    finally:
        stream.close()


def test_console_is_off_by_default_and_a_bad_address_stops_start_up(server_factory):
    srv = server_factory()
    assert "console:" not in srv.log()
    for bad in ("localhost:80", "127.0.0.1", "nonsense"):
        proc = subprocess.run([sys.executable, "-m", "macp_runtime", "serve", "--allow-insecure", "--memory-only",
                               "--bind", f"127.0.0.1:{free_port()}", "--console-addr", bad],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 1
        assert "MACP_CONSOLE_ADDR must be an IP address and port" in proc.stderr


def test_console_address_in_use_stops_start_up(server_factory):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "macp_runtime", "serve", "--allow-insecure", "--memory-only",
                               "--bind", f"127.0.0.1:{free_port()}", "--console-addr", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1
    assert "cannot serve the console" in proc.stderr


def test_shutdown_ends_event_streams_and_exits_zero(dev_process):
    dev = dev_process   # a real process: the exit status is part of the point
    stream = EventStream(dev.console_port, "alice")
    try:
        stream.next({"ready"})
        assert dev.stop() == 0
        event, data = stream.next({"bye"}, timeout=10)
        assert event in ("bye", "closed")
    finally:
        stream.close()


def test_console_of_one_instance_follows_sessions_driven_through_another(tmp_path, pg_url):
    """Several instances over PostgreSQL: the console of instance B shows, live, a session whose every
    message went through instance A."""
    from tests.support import ServerProcess

    port = free_port()
    env = {"MACP_STORAGE_BACKEND": "postgres", "MACP_DATABASE_URL": pg_url, "MACP_DATABASE_POOL_SIZE": "4",
           "MACP_WORKERS": "8"}
    a = ServerProcess(str(tmp_path / "a"), env).start()
    b = ServerProcess(str(tmp_path / "b"), {**env, "MACP_CONSOLE_ADDR": f"127.0.0.1:{port}"}).start()
    try:
        wait_console(b, port)
        stream = EventStream(port, "alice")
        try:
            stream.next({"ready"})
            s = DecisionSession(a.stub())
            s.start()
            s.propose()
            s.evaluate()
            s.vote("alice")
            s.vote("bob")
            s.commit()
            seen = []
            while True:
                event, data = stream.next({"envelope", "lifecycle"}, timeout=40)
                assert data["session"]["session_id"] == s.sid
                seen.append(data.get("event") or data["entry"]["message_type"])
                if seen[-1] == "RESOLVED":
                    break
            # B learns of the session by loading it (CREATED, its records so far applied at once), then
            # follows every later record as an envelope event, in log order, to the resolution
            assert seen[0] == "CREATED" and seen[-2:] == ["Commitment", "RESOLVED"], seen
            envelopes = seen[1:-1]
            full = ["SessionStart", "Proposal", "Evaluation", "Vote", "Vote", "Commitment"]
            assert envelopes == full[len(full) - len(envelopes):], seen
        finally:
            stream.close()
        body = get(f"http://127.0.0.1:{port}", f"/api/sessions/{s.sid}", token="bob")[1]
        assert (body["state"], body["phase"], len(body["history"])) == ("RESOLVED", "Committed", 6)
    finally:
        a.kill()
        b.kill()


def test_suspension_resume_and_cancel_show_as_runtime_entries_and_lifecycle_events(dev):
    from macp.v1 import core_pb2

    from tests.support import bearer

    stub = dev.stub()
    stream = EventStream(dev.console_port, "bob")
    try:
        stream.next({"ready"})
        s = DecisionSession(stub)
        s.start()
        s.propose()
        ack = stub.SuspendSession(core_pb2.SuspendSessionRequest(session_id=s.sid, reason="lunch"),
                                  metadata=bearer("coordinator")).ack
        assert ack.ok
        assert stream.next({"lifecycle"})[1]["event"] == "CREATED"
        event, data = stream.next({"lifecycle"})
        assert (data["event"], data["session"]["state"]) == ("SUSPENDED", "SUSPENDED")
        body = get(dev.console, f"/api/sessions/{s.sid}", token="bob")[1]
        assert body["state"] == "SUSPENDED" and body["suspended_at_ms"] > 0 and body["phase"] == "Evaluation"
        entry = body["history"][-1]
        assert (entry["kind"], entry["message_type"], entry["sender"]) == ("runtime", "SessionSuspend", "_runtime")
        assert entry["payload_type"] == "macp.v1.SessionSuspendPayload" and entry["payload"]["reason"] == "lunch"
        assert stub.ResumeSession(core_pb2.ResumeSessionRequest(session_id=s.sid, reason="back"),
                                  metadata=bearer("coordinator")).ack.ok
        assert stream.next({"lifecycle"})[1]["event"] == "RESUMED"
        assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=s.sid, reason="no longer needed"),
                                  metadata=bearer("coordinator")).ack.ok
        event, data = stream.next({"lifecycle"})
        assert (data["event"], data["session"]["state"]) == ("CANCELLED", "CANCELLED")
        body = get(dev.console, f"/api/sessions/{s.sid}", token="bob")[1]
        assert [e["message_type"] for e in body["history"] if e["kind"] == "runtime"] == [
            "SessionSuspend", "SessionResume", "SessionCancel"]
        assert body["resolution"] is None and body["suspended_at_ms"] is None
    finally:
        stream.close()


def test_jwt_bearer_through_the_same_resolvers_as_grpc(server_factory):
    import time

    import jwt

    secret = b"console-test-secret-of-32-bytes!"
    jwks = json.dumps({"keys": [{"kty": "oct", "k": base64.b64encode(secret).decode()}]})
    srv = console_server(server_factory, env={"MACP_AUTH_ISSUER": "https://issuer.test",
                                              "MACP_AUTH_JWKS_JSON": jwks})

    def token(sub, **claims):
        body = {"iss": "https://issuer.test", "aud": "macp-runtime", "sub": sub, "exp": int(time.time()) + 300,
                **claims}
        return jwt.encode(body, secret, algorithm="HS256")

    status, body, _ = get(srv.console, "/api/whoami", token=token("alice"))
    assert (status, body) == (200, {"sender": "alice", "is_observer": False})
    status, body, _ = get(srv.console, "/api/whoami", token=token("ops", macp_scopes={"is_observer": True}))
    assert (status, body["is_observer"]) == (200, True)
    assert get(srv.console, "/api/whoami", token=token("alice", exp=int(time.time()) - 3600))[0] == 401
    forged = jwt.encode({"iss": "https://issuer.test", "aud": "macp-runtime", "sub": "alice",
                         "exp": int(time.time()) + 300}, b"another-secret-another-secret-!!", algorithm="HS256")
    assert get(srv.console, "/api/sessions", token=forged)[0] == 401
    assert get(srv.console, "/api/sessions", token="alice")[0] == 401   # no dev mode once JWT is configured


def test_event_streams_per_identity_are_capped(dev):
    from macp_runtime.app.console.events import MAX_CLIENTS_PER_IDENTITY

    streams = [EventStream(dev.console_port, "alice") for _ in range(MAX_CLIENTS_PER_IDENTITY)]
    try:
        for stream in streams:
            assert stream.status == 200
            stream.next({"ready"})
        extra = EventStream(dev.console_port, "alice")
        assert extra.status == 429
        extra.close()
        other = EventStream(dev.console_port, "bob")      # another identity still gets one
        assert other.status == 200
        other.close()
    finally:
        for stream in streams:
            stream.close()
    import time

    deadline = time.monotonic() + 5     # a closed stream is detached as soon as the client goes
    while True:
        again = EventStream(dev.console_port, "alice")
        status = again.status
        again.close()
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200
