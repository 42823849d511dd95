"""Kernel behaviour over the wire, independent of any mode's rules.

Spec: runtime.md §3 (Send check order), §4.2 (credentials), §5.1 (session ids), §5.2 (SessionStart),
§5.4 (dedup, TTL), §5.7 (CancelSession), §8 (Initialize, GetManifest, ListModes), §1.2 (unimplemented
RPCs). The Decision mode is used wherever a concrete mode is needed.
"""
from __future__ import annotations

import secrets
import time
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

MODE = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
EXPIRED = envelope_pb2.SESSION_STATE_EXPIRED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


def start_env(session_id=None, sender="coord", participants=("alice", "bob"), payload=None, **start_fields):
    if payload is None:
        payload = start_payload(participants, **start_fields)
    return envelope(MODE, "SessionStart", session_id or new_session_id(), sender, payload)


def start(stub, participants=("alice", "bob"), sender="coord", **start_fields) -> str:
    env = start_env(sender=sender, participants=participants, **start_fields)
    ack = send(stub, env)
    assert ack.ok and ack.session_state == OPEN, ack
    return env.session_id


def proposal_env(sid, sender="alice", proposal_id="p1", **fields):
    return envelope(MODE, "Proposal", sid, sender,
                    decision_pb2.ProposalPayload(proposal_id=proposal_id, option="opt"), **fields)


def raw_send(stub, env, metadata=()):
    return stub.Send(core_pb2.SendRequest(envelope=env), metadata=list(metadata)).ack


def get_session(stub, sid, who="coord"):
    return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer(who)).metadata


def assert_rejected(ack, env, code, message):
    assert not ack.ok, ack
    assert not ack.duplicate
    assert ack.session_state == envelope_pb2.SESSION_STATE_UNSPECIFIED
    assert (ack.error.code, ack.error.message) == (code, message), ack
    assert ack.message_id == env.message_id and ack.error.message_id == env.message_id
    assert ack.session_id == env.session_id and ack.error.session_id == env.session_id
    assert ack.error.details == b""


def assert_duplicate(ack, env, state):
    assert ack.ok and ack.duplicate, ack
    assert ack.session_state == state
    assert ack.message_id == env.message_id and ack.session_id == env.session_id
    assert not ack.HasField("error")


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


# --- session ids (§5.1) ------------------------------------------------------------------------

def _uuid_with_version(version: int) -> str:
    u = uuid.uuid4().hex
    h = u[:12] + format(version, "x") + u[13:]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


BAD_SESSION_IDS = {
    "uppercase-uuid": lambda: str(uuid.uuid4()).upper(),
    "uuid-v1": lambda: str(uuid.uuid1()),
    "uuid-v3": lambda: _uuid_with_version(3),
    "uuid-v5": lambda: _uuid_with_version(5),
    "nil": lambda: "00000000-0000-0000-0000-000000000000",
    "braces": lambda: "{" + str(uuid.uuid4()) + "}",
    "urn": lambda: "urn:uuid:" + str(uuid.uuid4()),
    "base64url-21": lambda: secrets.token_urlsafe(16)[:21],
    # 36 bytes with a hyphen is judged as a UUID only (no fall-through to base64url)
    "36-with-hyphen": lambda: secrets.token_hex(17) + "-a",
    "whitespace": lambda: " " * 30,
    "dots": lambda: "session.with.dots.0123456789",
    "short": lambda: "abc",
}


@pytest.mark.parametrize("kind", sorted(BAD_SESSION_IDS))
def test_invalid_session_ids(stub, kind):
    env = start_env(BAD_SESSION_IDS[kind]())
    assert_rejected(send(stub, env), env, "INVALID_SESSION_ID", "InvalidSessionId")


GOOD_SESSION_IDS = {
    "uuid-v4": lambda: str(uuid.uuid4()),
    "uuid-v7": lambda: _uuid_with_version(7),
    "base64url-22": lambda: secrets.token_urlsafe(16),
    "hex-32": lambda: uuid.uuid4().hex,
    "base64url-long": lambda: secrets.token_urlsafe(90),
    "uppercase-hex-32": lambda: uuid.uuid4().hex.upper(),
}


@pytest.mark.parametrize("kind", sorted(GOOD_SESSION_IDS))
def test_valid_session_ids(stub, kind):
    sid = GOOD_SESSION_IDS[kind]()
    env = start_env(sid)
    ack = send(stub, env)
    assert ack.ok and ack.session_state == OPEN, ack
    assert get_session(stub, sid).session_id == sid


def test_session_id_is_checked_before_the_mode(stub):
    env = envelope("no.such.mode", "SessionStart", "bad id", "coord", b"")
    assert_rejected(send(stub, env), env, "INVALID_SESSION_ID", "InvalidSessionId")


# --- SessionStart validation (§5.2) ------------------------------------------------------------

def test_unknown_mode(stub):
    env = envelope("macp.mode.nope.v1", "SessionStart", new_session_id(), "coord", start_payload(["alice"]))
    assert_rejected(send(stub, env), env, "MODE_NOT_SUPPORTED", "UnknownMode")
    # mode names are exact
    env = envelope(MODE.upper(), "SessionStart", new_session_id(), "coord", start_payload(["alice"]))
    assert_rejected(send(stub, env), env, "MODE_NOT_SUPPORTED", "UnknownMode")


@pytest.mark.parametrize("payload", [b"", b"\xff\xff\xff", b"\x0a\x05ab"], ids=["empty", "garbage", "truncated"])
def test_undecodable_start_payload(stub, payload):
    env = start_env(payload=payload)
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidPayload")


@pytest.mark.parametrize("ttl", [0, -1, -60_000, 86_400_001, 2**62])
def test_ttl_out_of_range(stub, ttl):
    env = start_env(ttl_ms=ttl)
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidTtl")


@pytest.mark.parametrize("ttl", [1, 86_400_000])
def test_ttl_bounds_accepted(stub, ttl):
    ack = send(stub, start_env(ttl_ms=ttl))
    assert ack.ok, ack


def test_ttl_is_checked_before_the_other_fields(stub):
    env = start_env(ttl_ms=0, participants=[], mode_version="")
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidTtl")


@pytest.mark.parametrize("fields", [
    {"mode_version": ""}, {"mode_version": "  "}, {"configuration_version": ""}, {"configuration_version": "\t"},
    {"participants": []}, {"participants": ["alice", ""]}, {"participants": ["alice", "  "]},
    {"participants": ["alice", " alice"]}, {"participants": ["bob\n", "bob"]},
    {"participants": [f"agent-{i}" for i in range(1001)]},
], ids=["mv-empty", "mv-blank", "cv-empty", "cv-blank", "no-participants", "empty-participant",
        "blank-participant", "dup-after-trim", "dup-after-trim-2", "1001-participants"])
def test_strict_start_fields(stub, fields):
    env = start_env(**fields)
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidPayload")


def test_participants_stored_untrimmed_and_1000_allowed(stub):
    sid = start(stub, participants=[" alice", "bob "])
    assert list(get_session(stub, sid).participants) == [" alice", "bob "]
    many = [f"agent-{i}" for i in range(1000)]
    sid = start(stub, participants=many)
    assert list(get_session(stub, sid).participants) == many


@pytest.mark.parametrize("mode_version", ["2.0.0", "1.0", "1.0.0 "])
def test_mode_version_must_match_descriptor(stub, mode_version):
    env = start_env(mode_version=mode_version)
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidEnvelope")


def test_unknown_policy_version(stub):
    env = start_env(policy_version="policy.nope")
    assert_rejected(send(stub, env), env, "UNKNOWN_POLICY_VERSION", "UnknownPolicyVersion")
    env = start_env(policy_version=" policy.default")
    assert_rejected(send(stub, env), env, "UNKNOWN_POLICY_VERSION", "UnknownPolicyVersion")


def test_repeated_session_start(stub):
    env = start_env()
    assert send(stub, env).ok
    # same id, same message_id: a duplicate, whatever the sender or payload
    assert_duplicate(send(stub, env), env, OPEN)
    again = envelope(MODE, "SessionStart", env.session_id, "zed", start_payload(["x"]), message_id=env.message_id)
    assert_duplicate(send(stub, again), again, OPEN)
    # same id, new message_id
    other = start_env(env.session_id)
    assert_rejected(send(stub, other), other, "SESSION_ALREADY_EXISTS", "SessionAlreadyExists")
    assert get_session(stub, env.session_id).initiator == "coord"


def test_duplicate_start_still_validates_payload_first(stub):
    env = start_env()
    assert send(stub, env).ok
    bad = envelope(MODE, "SessionStart", env.session_id, "coord", start_payload(["a"], ttl_ms=0),
                   message_id=env.message_id)
    assert_rejected(send(stub, bad), bad, "INVALID_ENVELOPE", "InvalidTtl")


# --- envelope shape (§3 step 2) ----------------------------------------------------------------

def test_unsupported_protocol_version_is_checked_before_everything(stub):
    env = envelope("", "", "", "mallory", b"x" * (MiB + 1), message_id="placeholder", macp_version="2.0")
    env.message_id = ""
    ack = raw_send(stub, env)  # no credential either
    assert_rejected(ack, env, "UNSUPPORTED_PROTOCOL_VERSION", "InvalidMacpVersion")
    for version in ("", "1", "1.0.0", " 1.0"):
        env = start_env(None)
        env.macp_version = version
        assert_rejected(send(stub, env), env, "UNSUPPORTED_PROTOCOL_VERSION", "InvalidMacpVersion")


@pytest.mark.parametrize("field,value", [("message_id", ""), ("message_type", ""), ("mode", ""), ("mode", "  "),
                                         ("session_id", "")])
def test_shape_violations(stub, field, value):
    env = start_env()
    setattr(env, field, value)
    assert_rejected(raw_send(stub, env), env, "INVALID_ENVELOPE", "InvalidEnvelope")  # before auth


def test_shape_check_precedes_session_id_check(stub):
    env = envelope("", "SessionStart", "freeze-check-2", "coord", start_payload(["a"]))
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidEnvelope")


def test_whitespace_message_id_is_accepted(stub):
    env = start_env()
    env.message_id = " "
    assert send(stub, env).ok


def test_signal_shape(stub):
    with_session = envelope("", "Signal", new_session_id(), "alice", b"")
    assert_rejected(send(stub, with_session), with_session, "INVALID_ENVELOPE", "InvalidEnvelope")
    with_mode = envelope(MODE, "Signal", "", "alice", b"")
    assert_rejected(send(stub, with_mode), with_mode, "INVALID_ENVELOPE", "InvalidEnvelope")
    ok = envelope("", "Signal", "", "alice", core_pb2.SignalPayload(signal_type="heartbeat"))
    ack = send(stub, ok)
    assert ack.ok and not ack.duplicate and ack.session_state == OPEN and ack.session_id == "", ack


def test_payload_too_large_is_checked_before_auth(stub):
    env = start_env(payload=b"\x00" * (MiB + 1))
    assert_rejected(raw_send(stub, env), env, "PAYLOAD_TOO_LARGE", "PayloadTooLarge")
    env = proposal_env(new_session_id())
    env.payload = b"\x00" * (2_000_000)
    assert_rejected(send(stub, env), env, "PAYLOAD_TOO_LARGE", "PayloadTooLarge")


def test_payload_of_exactly_the_limit_passes_the_size_check(stub):
    env = start_env(payload=b"\x00" * MiB)
    # past the size check, the next check is authentication
    assert_rejected(raw_send(stub, env), env, "UNAUTHENTICATED", "Unauthenticated")


def test_missing_envelope_is_a_status(stub):
    err = rpc_error(stub.Send, core_pb2.SendRequest(), metadata=bearer("alice"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "SendRequest must contain an envelope"


# --- authentication (§3 steps 3–4, §4.2) -------------------------------------------------------

@pytest.mark.parametrize("metadata", [
    [], [("authorization", "bearer coord")], [("authorization", "Bearer")], [("authorization", "Bearer ")],
    [("authorization", "Basic coord")], [("authorization", "BEARER coord")], [("x-macp-agent-id", "coord")],
    [("authorization", "Bearer  coord")],
], ids=["none", "lowercase", "no-token", "empty-token", "basic", "uppercase", "agent-id", "double-space"])
def test_unauthenticated(stub, metadata):
    env = start_env()
    assert_rejected(raw_send(stub, env, metadata), env, "UNAUTHENTICATED", "Unauthenticated")


def test_x_macp_token_works(stub):
    env = start_env(sender="coord")
    ack = raw_send(stub, env, [("x-macp-token", "coord")])
    assert ack.ok, ack
    assert get_session(stub, env.session_id).initiator == "coord"


def test_authorization_wins_over_x_macp_token(stub):
    env = start_env(sender="")
    ack = raw_send(stub, env, [("x-macp-token", "bob"), ("authorization", "Bearer alice")])
    assert ack.ok, ack
    assert get_session(stub, env.session_id, "alice").initiator == "alice"


def test_unusable_authorization_falls_back_to_x_macp_token(stub):
    env = start_env(sender="")
    ack = raw_send(stub, env, [("authorization", "Basic xyz"), ("x-macp-token", "bob")])
    assert ack.ok, ack
    assert get_session(stub, env.session_id, "bob").initiator == "bob"


def test_sender_spoofing(stub):
    env = start_env(sender="bob")
    assert_rejected(send(stub, env, as_sender="alice"), env, "UNAUTHENTICATED", "Unauthenticated")
    sid = start(stub, participants=["alice", "bob"])
    # the payload is never examined for a spoofed envelope
    spoof = envelope(MODE, "Proposal", sid, "mallory", bytes([1, 2, 3]))
    assert_rejected(send(stub, spoof, as_sender="alice"), spoof, "UNAUTHENTICATED", "Unauthenticated")


def test_empty_sender_is_filled_with_the_authenticated_one(stub):
    env = start_env(sender="")
    ack = send(stub, env, as_sender="carol")
    assert ack.ok, ack
    sid = env.session_id
    p = proposal_env(sid, sender="")
    assert send(stub, p, as_sender="alice").ok
    md = get_session(stub, sid, "carol")
    assert md.initiator == "carol"
    assert [(a.participant_id, a.message_count) for a in md.participant_activity] == [("alice", 1)]


# --- session-scoped messages (§5.4) ------------------------------------------------------------

def test_message_to_unknown_session(stub):
    env = proposal_env(new_session_id())
    assert_rejected(send(stub, env), env, "SESSION_NOT_FOUND", "UnknownSession")
    env = proposal_env(" ")  # not format-checked outside SessionStart
    assert_rejected(send(stub, env), env, "SESSION_NOT_FOUND", "UnknownSession")


def test_mode_mismatch(stub):
    sid = start(stub)
    env = envelope("macp.mode.task.v1", "Proposal", sid, "alice",
                   decision_pb2.ProposalPayload(proposal_id="p1", option="x"))
    assert_rejected(send(stub, env), env, "INVALID_ENVELOPE", "InvalidEnvelope")


def test_dedup_returns_current_state_for_any_sender(stub):
    sid = start(stub)
    p = proposal_env(sid)
    assert send(stub, p).ok
    assert_duplicate(send(stub, p), p, OPEN)
    # same id from another sender, another type, even another mode: still the duplicate
    other = envelope("macp.mode.other.v1", "Vote", sid, "mallory", b"\xff", message_id=p.message_id)
    assert_duplicate(send(stub, other), other, OPEN)
    c = envelope(MODE, "Commitment", sid, "coord", commitment(action="deployment.approved"))
    assert send(stub, c).session_state == RESOLVED
    # after the session resolved: still duplicates, with the terminal state
    assert_duplicate(send(stub, p), p, RESOLVED)
    assert_duplicate(send(stub, c), c, RESOLVED)
    assert_duplicate(send(stub, other), other, RESOLVED)
    counts = {a.participant_id: a.message_count for a in get_session(stub, sid).participant_activity}
    assert counts == {"alice": 1, "coord": 1}  # duplicates are not counted


def test_dedup_is_per_session(stub):
    a, b = start(stub), start(stub)
    mid = str(uuid.uuid4())
    assert send(stub, proposal_env(a, message_id=mid)).ok
    ack = send(stub, proposal_env(b, message_id=mid))
    assert ack.ok and not ack.duplicate


def test_ttl_expiry(stub):
    by_message = start(stub, ttl_ms=300)
    by_lookup = start(stub, ttl_ms=300)
    md = get_session(stub, by_message)  # (no state check here: a loaded machine may already be past 300 ms)
    assert md.expires_at_unix_ms - md.started_at_unix_ms <= 300
    time.sleep(0.5)
    env = proposal_env(by_message)
    assert_rejected(send(stub, env), env, "SESSION_NOT_OPEN", "TtlExpired")
    assert get_session(stub, by_message).state == EXPIRED
    env = proposal_env(by_message)
    assert_rejected(send(stub, env), env, "SESSION_NOT_OPEN", "SessionNotOpen")
    # GetSession expires lazily too
    assert get_session(stub, by_lookup, "alice").state == EXPIRED


def test_deadline_uses_the_start_envelope_timestamp(stub):
    env = start_env(ttl_ms=60_000)
    env.timestamp_unix_ms = int(time.time() * 1000) - 10_000
    assert send(stub, env).ok
    assert get_session(stub, env.session_id).expires_at_unix_ms == env.timestamp_unix_ms + 60_000
    # an old timestamp gives a session that is already past its deadline
    old = start_env(ttl_ms=1000)
    old.timestamp_unix_ms = int(time.time() * 1000) - 5000
    assert send(stub, old).ok
    p = proposal_env(old.session_id)
    assert_rejected(send(stub, p), p, "SESSION_NOT_OPEN", "TtlExpired")
    # timestamp 0: the server clock is the base
    zero = start_env(ttl_ms=60_000)
    zero.timestamp_unix_ms = 0
    before = int(time.time() * 1000)
    assert send(stub, zero).ok
    md = get_session(stub, zero.session_id)
    assert before + 60_000 <= md.expires_at_unix_ms <= int(time.time() * 1000) + 60_000


# --- GetSession (§8.6) -------------------------------------------------------------------------

def test_get_session_access(stub):
    sid = start(stub, participants=["alice", "bob"])
    for who in ("coord", "alice", "bob"):
        assert get_session(stub, sid, who).session_id == sid
    err = rpc_error(get_session, stub, sid, "outsider")
    assert (err.code(), err.details()) == (grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN: session access denied")
    err = rpc_error(stub.GetSession, core_pb2.GetSessionRequest(session_id=sid))
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")
    unknown = new_session_id()
    err = rpc_error(get_session, stub, unknown)
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"Session '{unknown}' not found")


# --- CancelSession (§5.7) ----------------------------------------------------------------------

def cancel(stub, sid, who, reason="stop"):
    return stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid, reason=reason),
                              metadata=bearer(who) if who else []).ack


def test_cancel_session(stub):
    sid = start(stub, participants=["alice", "bob"])
    p = proposal_env(sid)
    assert send(stub, p).ok
    for who in ("alice", "outsider"):
        err = rpc_error(cancel, stub, sid, who)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == "FORBIDDEN: only the session initiator or policy-delegated roles can cancel"
    err = rpc_error(cancel, stub, sid, None)
    assert (err.code(), err.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")

    ack = cancel(stub, sid, "coord")
    assert ack.ok and not ack.duplicate and ack.session_state == CANCELLED, ack
    assert ack.message_id == "" and ack.session_id == sid and not ack.HasField("error")
    assert get_session(stub, sid).state == CANCELLED

    again = cancel(stub, sid, "coord")
    assert again.ok and again.session_state == CANCELLED, again

    env = proposal_env(sid, proposal_id="p2")
    assert_rejected(send(stub, env), env, "SESSION_NOT_OPEN", "SessionNotOpen")
    assert_duplicate(send(stub, p), p, CANCELLED)


def test_cancel_unknown_and_terminal_sessions(stub):
    unknown = new_session_id()
    err = rpc_error(cancel, stub, unknown, "coord")
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, f"Session '{unknown}' not found")
    sid = start(stub)
    assert send(stub, proposal_env(sid)).ok
    assert send(stub, envelope(MODE, "Commitment", sid, "coord",
                               commitment(action="deployment.approved"))).session_state == RESOLVED
    ack = cancel(stub, sid, "coord")
    assert ack.ok and ack.session_state == RESOLVED, ack  # terminal state kept, nothing written
    assert get_session(stub, sid).state == RESOLVED


# --- discovery RPCs (§8.1–§8.3) ----------------------------------------------------------------

def test_initialize_errors(stub):
    err = rpc_error(stub.Initialize, core_pb2.InitializeRequest())
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "INVALID_REQUEST: supported_protocol_versions must not be empty"
    err = rpc_error(stub.Initialize, core_pb2.InitializeRequest(supported_protocol_versions=["2.0", "1.0.0", " 1.0"]))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == "UNSUPPORTED_PROTOCOL_VERSION: no mutually supported protocol version"


def test_initialize_response(stub):
    resp = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["2.0", "1.0"],
                                                      client_info=core_pb2.ClientInfo(name="t")))
    assert resp.selected_protocol_version == "1.0"
    info = resp.runtime_info
    assert (info.name, info.title, info.version, info.website_url) == (
        "macp-runtime", "MACP Reference Runtime", "0.4.0", "")
    assert info.description
    expected = core_pb2.Capabilities(
        sessions=core_pb2.SessionsCapability(stream=True, list_sessions=True, watch_sessions=True),
        cancellation=core_pb2.CancellationCapability(cancel_session=True),
        progress=core_pb2.ProgressCapability(progress=True),
        manifest=core_pb2.ManifestCapability(get_manifest=True),
        mode_registry=core_pb2.ModeRegistryCapability(list_modes=True, list_changed=True),
        roots=core_pb2.RootsCapability(list_roots=True, list_changed=True),
        policy_registry=policy_pb2.PolicyRegistryCapability(register_policy=True, list_policies=True,
                                                            list_changed=True),
        experimental=core_pb2.ExperimentalCapabilities(features={"ext_mode_lifecycle": "true"}),
    )
    assert resp.capabilities == expected
    assert not resp.capabilities.HasField("decision_receipt")
    modes = list(resp.supported_modes)
    assert MODE in modes
    assert modes == sorted(modes)
    assert resp.instructions


def test_get_manifest(stub):
    err = rpc_error(stub.GetManifest, core_pb2.GetManifestRequest(agent_id="demo-agent"))
    assert (err.code(), err.details()) == (grpc.StatusCode.NOT_FOUND, "Agent 'demo-agent' not found")
    init = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]))
    for agent_id in ("", "macp-runtime"):
        m = stub.GetManifest(core_pb2.GetManifestRequest(agent_id=agent_id)).manifest
        assert m.agent_id == "macp-runtime"
        assert m.title == "MACP Reference Runtime"
        assert m.description
        assert list(m.supported_modes) == list(init.supported_modes)
        assert list(m.input_content_types) == ["application/macp-envelope+proto"]
        assert list(m.output_content_types) == ["application/macp-envelope+proto"]
        assert dict(m.metadata) == {} and list(m.transport_endpoints) == []


def test_list_modes_decision_descriptor(stub):
    modes = stub.ListModes(core_pb2.ListModesRequest()).modes
    expected = core_pb2.ModeDescriptor(
        mode=MODE, mode_version="1.0.0", title="Decision Mode",
        description="Structured decision making with proposals, evaluations, objections, votes, "
                    "and a terminal Commitment.",
        determinism_class="semantic-deterministic", participant_model="declared",
        message_types=["SessionStart", "Proposal", "Evaluation", "Objection", "Vote", "Commitment"],
        terminal_message_types=["Commitment"],
        schema_uris={"protobuf": "buf.build/multiagentcoordinationprotocol/macp"},
    )
    assert modes[0] == expected
    assert "ext.multi_round.v1" not in [m.mode for m in modes]  # extensions are listed elsewhere


@pytest.mark.parametrize("rpc,request_type", [
    ("WhatIfReplay", policy_pb2.WhatIfReplayRequest),
    ("GetDecisionReceipt", core_pb2.GetDecisionReceiptRequest),
    ("GetReceiptKeys", core_pb2.GetReceiptKeysRequest),
])
def test_rpcs_outside_v040_are_unimplemented(stub, rpc, request_type):
    err = rpc_error(getattr(stub, rpc), request_type(), metadata=bearer("alice"))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
