"""The two protocol profiles over the wire: what differs at the runtime level (../shared/spec/current.md),
the setting itself, and that a session keeps the revision it was accepted under across a restart into
the other profile (§1.2: replay applies the recorded revision, never the process profile).
"""
from __future__ import annotations

import json
import secrets
import time
import uuid

import grpc
import pytest
from macp.v1 import core_pb2, envelope_pb2
from macp.modes.decision.v1 import decision_pb2
from macp.modes.handoff.v1 import handoff_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
DECISION = "macp.mode.decision.v1"
HANDOFF = "macp.mode.handoff.v1"
CURRENT = {"MACP_PROTOCOL_PROFILE": "current"}
V040 = {"MACP_PROTOCOL_PROFILE": "v0.4.0"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from tests.support import ServerProcess

    pair = {name: ServerProcess(str(tmp_path_factory.mktemp(name) / "data"), {"MACP_PROTOCOL_PROFILE": name}).start()
            for name in ("current", "v0.4.0")}
    yield pair
    for srv in pair.values():
        srv.kill()


def stub_of(servers, name):
    return servers[name].stub()


def start(stub, mode=DECISION, participants=("alice", "bob"), sid=None, sender="coord", **fields):
    sid = sid or new_session_id()
    return sid, send(stub, envelope(mode, "SessionStart", sid, sender, start_payload(participants, **fields)))


def trailer(err: grpc.RpcError, key: str):
    return dict(err.trailing_metadata() or ()).get(key)


# --- the setting ---------------------------------------------------------------------------------

def test_unknown_profile_aborts_startup(server_factory):
    srv = server_factory(env={"MACP_PROTOCOL_PROFILE": "v9"}, start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert "MACP_PROTOCOL_PROFILE must be one of current, v0.4.0" in srv.log()


def test_the_flag_selects_the_profile(server_factory):
    srv = server_factory(env={"MACP_PROTOCOL_PROFILE": "current"}, args=["--protocol-profile", "v0.4.0"])
    init = srv.stub().Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]))
    assert init.runtime_info.version == "0.4.0"


# --- Initialize, trailers, details ----------------------------------------------------------------

def test_initialize_per_profile(servers):
    req = core_pb2.InitializeRequest(supported_protocol_versions=["1.0"])
    old = stub_of(servers, "v0.4.0").Initialize(req)
    new = stub_of(servers, "current").Initialize(req)
    assert (old.runtime_info.version, new.runtime_info.version) == ("0.4.0", "0.9.0")
    assert old.capabilities.roots.list_changed and not new.capabilities.roots.list_changed
    # receipts and what-if replay: served and advertised under current only (tests/wire/test_receipts_wire.py)
    assert not old.capabilities.HasField("decision_receipt")
    assert not old.capabilities.policy_registry.what_if_replay
    assert new.capabilities.decision_receipt.get_decision_receipt and new.capabilities.decision_receipt.signed
    assert new.capabilities.policy_registry.what_if_replay
    assert old.capabilities.experimental == new.capabilities.experimental


@pytest.mark.parametrize("profile,expected", [("current", "SESSION_NOT_FOUND"), ("v0.4.0", None)])
def test_macp_error_code_trailer(servers, profile, expected):
    stub = stub_of(servers, profile)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetSession(core_pb2.GetSessionRequest(session_id=str(uuid.uuid4())), metadata=bearer("alice"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert trailer(info.value, "macp-error-code") == expected
    with pytest.raises(grpc.RpcError) as info:
        stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=[]))
    assert trailer(info.value, "macp-error-code") == ("INVALID_REQUEST" if expected else None)
    with pytest.raises(grpc.RpcError) as info:
        stub.GetManifest(core_pb2.GetManifestRequest(agent_id="nobody"))
    assert trailer(info.value, "macp-error-code") == ("AGENT_NOT_FOUND" if expected else None)
    with pytest.raises(grpc.RpcError) as info:
        stub.Send(core_pb2.SendRequest(), metadata=bearer("alice"))
    assert trailer(info.value, "macp-error-code") == ("INVALID_REQUEST" if expected else None)


def test_policy_denied_details_per_profile(servers):
    for profile in ("current", "v0.4.0"):
        stub = stub_of(servers, profile)
        pid = f"maj.{profile}.{uuid.uuid4().hex[:6]}"
        from macp.v1 import policy_pb2
        assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
            policy_id=pid, mode=DECISION, rules=json.dumps({"voting": {"algorithm": "majority"}}),
            schema_version=1)), metadata=bearer("admin")).ok
        sid, ack = start(stub, participants=("alice", "bob"), policy_version=pid)
        assert ack.ok
        assert send(stub, envelope(DECISION, "Proposal", sid, "alice", decision_pb2.ProposalPayload(
            proposal_id="p1", option="x"))).ok
        assert send(stub, envelope(DECISION, "Vote", sid, "bob", decision_pb2.VotePayload(
            proposal_id="p1", vote="REJECT"))).ok
        ack = send(stub, envelope(DECISION, "Commitment", sid, "coord", commitment(policy_version=pid)))
        assert ack.error.code == "POLICY_DENIED"
        details = json.loads(ack.error.details)
        assert details["reasons"] == ["majority vote failed: 0.0% approve, need >= 50.0%"]
        if profile == "current":
            assert details["denials"] == [{"code": "threshold_not_met", "message": details["reasons"][0]}]
        else:
            assert set(details) == {"reasons"}


# --- session ids, SessionStart ---------------------------------------------------------------------

def test_session_ids_per_profile(servers):
    not_a_uuid_36 = secrets.token_hex(17) + "-g"          # 36 chars with a hyphen, not UUID-shaped
    upper_uuid = str(uuid.uuid4()).upper()
    long_b64 = "a" * 129
    cases = [(not_a_uuid_36, True, False), (upper_uuid, False, False), (long_b64, False, True),
             ("b" * 128, True, True)]
    for sid, current_ok, v040_ok in cases:
        assert start(stub_of(servers, "current"), sid=sid)[1].ok is current_ok, sid
        assert start(stub_of(servers, "v0.4.0"), sid=sid)[1].ok is v040_ok, sid


def test_decision_with_no_participants_is_accepted_and_inert(servers):
    stub = stub_of(servers, "current")
    sid, ack = start(stub, participants=())
    assert ack.ok
    assert send(stub, envelope(DECISION, "Proposal", sid, "coord", decision_pb2.ProposalPayload(
        proposal_id="p1", option="x"))).error.code == "FORBIDDEN"
    assert start(stub, mode="macp.mode.task.v1", participants=())[1].error.code == "INVALID_ENVELOPE"
    assert start(stub_of(servers, "v0.4.0"), participants=())[1].error.code == "INVALID_ENVELOPE"


def test_negative_max_suspend_ms_is_refused_under_current_only(servers):
    assert start(stub_of(servers, "current"), max_suspend_ms=-1)[1].error.code == "INVALID_ENVELOPE"
    assert start(stub_of(servers, "v0.4.0"), max_suspend_ms=-1)[1].ok


def test_implicit_accept_ids_are_reserved_in_handoff_sessions(servers):
    stub = stub_of(servers, "current")
    sid, ack = start(stub, mode=HANDOFF, participants=("coord", "alice"))
    assert ack.ok
    offer = envelope(HANDOFF, "HandoffOffer", sid, "coord", handoff_pb2.HandoffOfferPayload(
        handoff_id="h1", target_participant="alice"), message_id="implicit-accept:h1")
    assert send(stub, offer).error.code == "INVALID_ENVELOPE"
    offer.message_id = "Implicit-Accept:h1"                          # case-sensitive: an ordinary id
    assert send(stub, offer).ok
    accept = envelope(HANDOFF, "HandoffAccept", sid, "alice", handoff_pb2.HandoffAcceptPayload(
        handoff_id="h1", accepted_by="alice", implicit=True))
    assert send(stub, accept).error.code == "INVALID_ENVELOPE"       # only the runtime accepts implicitly


# --- replay by recorded revision ------------------------------------------------------------------

def test_sessions_keep_their_revision_across_a_restart_into_the_other_profile(server_factory):
    srv = server_factory(env=CURRENT)
    stub = srv.stub()
    sid_new, ack = start(stub, participants=("alice",), policy_version="", max_suspend_ms=120_000)
    assert ack.ok
    assert send(stub, envelope(DECISION, "Proposal", sid_new, "alice", decision_pb2.ProposalPayload(
        proposal_id="p1", option="x"))).ok
    srv.stop()
    srv.extra_env = V040
    srv.start()
    stub = srv.stub()
    assert stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"])).runtime_info.version \
        == "0.4.0"
    # started under current: its rules stay the current line's (lower-case vote refused, empty echo accepted)
    assert send(stub, envelope(DECISION, "Vote", sid_new, "alice", decision_pb2.VotePayload(
        proposal_id="p1", vote="approve"))).error.code == "INVALID_ENVELOPE"
    sid_old, ack = start(stub, participants=("alice",), policy_version="")
    assert ack.ok
    assert send(stub, envelope(DECISION, "Proposal", sid_old, "alice", decision_pb2.ProposalPayload(
        proposal_id="p1", option="x"))).ok
    done = send(stub, envelope(DECISION, "Commitment", sid_new, "coord", commitment(policy_version="")))
    assert done.ok and done.session_state == RESOLVED
    # a v0.4.0 session keeps v0.4.0 rules after a restart into current
    srv.stop()
    srv.extra_env = CURRENT
    srv.start()
    stub = srv.stub()
    assert send(stub, envelope(DECISION, "Vote", sid_old, "alice", decision_pb2.VotePayload(
        proposal_id="p1", vote="approve"))).ok                      # case-free under v0.4.0
    refused = send(stub, envelope(DECISION, "Commitment", sid_old, "coord", commitment(policy_version="")))
    assert refused.error.code == "INVALID_ENVELOPE"                  # v0.4.0: the echo must name policy.default
    assert send(stub, envelope(DECISION, "Commitment", sid_old, "coord", commitment())).ok


# --- watches: authentication, sender attribution, lag ---------------------------------------------

def test_watch_signals_needs_a_caller_and_attributes_the_sender(servers):
    stub = stub_of(servers, "current")
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.WatchSignals(core_pb2.WatchSignalsRequest(), timeout=5)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert trailer(info.value, "macp-error-code") == "UNAUTHENTICATED"
    for profile, flag in (("current", True), ("v0.4.0", False)):
        stub = stub_of(servers, profile)
        call = stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("watcher"), timeout=10)
        signal = envelope("", "Signal", "", "alice", core_pb2.SignalPayload(signal_type="ping"))
        import threading
        import time as _time

        def later():
            _time.sleep(0.5)
            send(stub, signal)
        threading.Thread(target=later, daemon=True).start()
        frame = next(iter(call))
        assert frame.envelope.message_id == signal.message_id
        assert frame.sender_authenticated is flag
        call.cancel()


@pytest.mark.parametrize("profile", ["current", "v0.4.0"])
def test_a_lagging_signal_watcher(inprocess_factory, profile):
    srv = inprocess_factory(env={"MACP_PROTOCOL_PROFILE": profile, "MACP_MEMORY_ONLY": "1"})
    stub = srv.stub()
    call = stub.WatchSignals(core_pb2.WatchSignalsRequest(), metadata=bearer("watcher"), timeout=60)
    first = envelope("", "Signal", "", "alice", core_pb2.SignalPayload(signal_type="ping"))
    import threading
    import time as _time

    def first_later():
        _time.sleep(0.5)
        send(stub, first)
    threading.Thread(target=first_later, daemon=True).start()
    frames = iter(call)
    assert next(frames).envelope.message_id == first.message_id   # subscribed; now read nothing
    big = "x" * 60_000
    for _ in range(400):
        assert send(stub, envelope("", "Progress", "", "alice", core_pb2.ProgressPayload(message=big))).ok
    if profile == "v0.4.0":
        assert sum(1 for _ in frames) < 400                       # cut off, ends OK
        return
    with pytest.raises(grpc.RpcError) as info:
        for _ in frames:
            pass
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.details() == "WatchSignals receiver fell behind by 1 signals"
    assert trailer(info.value, "macp-error-code") == "STREAM_LAGGED"


# --- ListSessions paging (current.md §10) -----------------------------------------------------------

def test_list_sessions_pages_by_session_id(inprocess_factory):
    import base64

    srv = inprocess_factory(env={"MACP_PROTOCOL_PROFILE": "current", "MACP_MEMORY_ONLY": "1",
                                 "MACP_LIST_SESSIONS_DEFAULT_PAGE_SIZE": "3", "MACP_LIST_SESSIONS_MAX_PAGE_SIZE": "4"})
    stub = srv.stub()
    ids = sorted(start(stub)[0] for _ in range(7))
    md = bearer("alice")
    first = stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=md)
    assert [s.session_id for s in first.sessions] == ids[:3]
    assert base64.urlsafe_b64decode(first.next_page_token + "==").decode() == f"v1:{ids[2]}"
    second = stub.ListSessions(core_pb2.ListSessionsRequest(page_size=50, page_token=first.next_page_token),
                               metadata=md)
    assert [s.session_id for s in second.sessions] == ids[3:7] and second.next_page_token == ""   # clamped to 4
    for request in (core_pb2.ListSessionsRequest(page_size=-1), core_pb2.ListSessionsRequest(page_token="bm90djE"),
                    core_pb2.ListSessionsRequest(page_token="a=b"), core_pb2.ListSessionsRequest(page_token="x" * 1025)):
        with pytest.raises(grpc.RpcError) as info:
            stub.ListSessions(request, metadata=md)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailer(info.value, "macp-error-code") == "INVALID_REQUEST"
    # the SDK walks every page
    from macp_sdk import AuthConfig, MacpClient
    with MacpClient(target=srv.target, allow_insecure=True, auth=AuthConfig.for_dev_agent("alice")) as client:
        assert sorted(s.session_id for s in client.list_sessions()) == ids


# --- Handoff implicit accept, recorded by the runtime (current.md §12.4) --------------------------

def test_a_timed_out_offer_is_accepted_by_a_recorded_runtime_handoff_accept(server_factory):
    from macp_sdk import AuthConfig, MacpClient
    from tests.support.sdk import implicit_handoff_policy, offer_past_its_implicit_accept
    from tests.support.streamkit import Duplex

    srv = server_factory(env=CURRENT)
    coord = AuthConfig.for_dev_agent("coord")
    with MacpClient(target=srv.target, allow_insecure=True, auth=coord, default_timeout=10) as client:
        session = offer_past_its_implicit_accept(client, coord, implicit_handoff_policy())
        stub = srv.stub()
        d = Duplex(stub, "coord").subscribe(session.session_id)
        got = [r.envelope for r in d.recv_n(4)]
        d.close()
        assert [e.message_type for e in got] == ["SessionStart", "HandoffOffer", "HandoffAccept", "HandoffContext"]
        synthetic = got[2]
        assert (synthetic.message_id, synthetic.sender) == ("implicit-accept:h1", "alice")
        accepted = handoff_pb2.HandoffAcceptPayload.FromString(synthetic.payload)
        assert (accepted.implicit, accepted.accepted_by, accepted.reason) == (True, "alice", "implicit accept (timeout)")
        assert synthetic.timestamp_unix_ms >= got[1].timestamp_unix_ms
        session.handoff_projection.apply_envelope(synthetic)
        assert session.handoff_projection.is_implicitly_accepted("h1")
        md = stub.GetSession(core_pb2.GetSessionRequest(session_id=session.session_id), metadata=bearer("coord"))
        assert "alice" not in [a.participant_id for a in md.metadata.participant_activity]
        sid = session.session_id
    # replay re-applies the recorded accept as data
    srv.restart()
    stub = srv.stub()
    d = Duplex(stub, "coord").subscribe(sid)
    assert [r.envelope.message_id for r in d.recv_n(4)][2] == "implicit-accept:h1"
    d.close()
    # an explicit answer after the deadline is too late; the Commitment is ready
    late = envelope(HANDOFF, "HandoffAccept", sid, "alice",
                    handoff_pb2.HandoffAcceptPayload(handoff_id="h1", accepted_by="alice"))
    assert send(stub, late).error.code == "INVALID_ENVELOPE"
    done = send(stub, envelope(HANDOFF, "Commitment", sid, "coord", commitment(policy_version="",
                                                                                action="handoff.accepted")))
    assert done.ok and done.session_state == RESOLVED


def test_the_sweep_records_a_due_implicit_accept_without_a_trigger(inprocess_factory):
    from macp.v1 import policy_pb2
    from tests.support.streamkit import Duplex

    srv = inprocess_factory(env={**CURRENT, "MACP_CLEANUP_INTERVAL_SECS": "0.1", "MACP_MEMORY_ONLY": "1"})
    stub = srv.stub()
    assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id="h.eager", mode=HANDOFF, rules=json.dumps({"acceptance": {"implicit_accept_timeout_ms": 200}}),
        schema_version=1)), metadata=bearer("admin")).ok
    sid, ack = start(stub, mode=HANDOFF, participants=("coord", "alice"), policy_version="h.eager")
    assert ack.ok
    d = Duplex(stub, "coord").subscribe(sid)
    d.recv_n(1)
    assert send(stub, envelope(HANDOFF, "HandoffOffer", sid, "coord", handoff_pb2.HandoffOfferPayload(
        handoff_id="h1", target_participant="alice"))).ok
    got = d.recv_n(2, timeout=5)                       # the offer, then the sweep's implicit accept
    assert [r.envelope.message_id for r in got][1] == "implicit-accept:h1"
    d.close()


def test_the_implicit_accept_deadline_skips_suspended_time_only_before_it():
    from macp_runtime.specs.hooks.rules4 import implicit_accept_deadline as deadline
    assert deadline(1000, 300, ()) == 1300
    assert deadline(1000, 300, [(1100, 1200)]) == 1400                 # paused inside: moves it
    assert deadline(1000, 300, [(500, 1100)]) == 1400                  # paused across the offer: the part after
    assert deadline(1000, 300, [(1300, 5000)]) == 1300                 # paused at/after the deadline: no move
    assert deadline(1000, 300, [(1250, 1280), (1320, 1400)]) == 1410   # the second pause starts before 1330


def test_a_pause_after_the_deadline_does_not_move_the_implicit_accept(inprocess_factory):
    from macp.v1 import policy_pb2

    srv = inprocess_factory(env={**CURRENT, "MACP_MEMORY_ONLY": "1"})
    stub = srv.stub()
    assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id="h.late", mode=HANDOFF, rules=json.dumps({"acceptance": {"implicit_accept_timeout_ms": 200}}),
        schema_version=1)), metadata=bearer("admin")).ok
    sid, ack = start(stub, mode=HANDOFF, participants=("coord", "alice"), policy_version="h.late")
    assert ack.ok
    assert send(stub, envelope(HANDOFF, "HandoffOffer", sid, "coord", handoff_pb2.HandoffOfferPayload(
        handoff_id="h1", target_participant="alice"))).ok
    time.sleep(0.4)
    before_pause = int(time.time() * 1000)
    assert stub.SuspendSession(core_pb2.SuspendSessionRequest(session_id=sid), metadata=bearer("coord")).ack.ok
    time.sleep(0.5)
    assert stub.ResumeSession(core_pb2.ResumeSessionRequest(session_id=sid), metadata=bearer("coord")).ack.ok
    assert send(stub, envelope(HANDOFF, "HandoffContext", sid, "coord", handoff_pb2.HandoffContextPayload(
        handoff_id="h1", content_type="text/plain", context=b"x"))).ok
    from tests.support.streamkit import Duplex
    d = Duplex(stub, "coord").subscribe(sid)
    got = [r.envelope for r in d.recv_n(4)]
    d.close()
    assert got[2].message_id == "implicit-accept:h1"
    assert got[2].timestamp_unix_ms <= before_pause        # the 500 ms pause came after the deadline
