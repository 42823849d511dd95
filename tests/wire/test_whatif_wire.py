"""WhatIfReplay over the wire (current.md §15): a recorded history re-judged under a candidate policy
through the same compiled modes and evaluators as live traffic, nothing changed on the server; the
order of checks and their status texts and codes; who may replay; HISTORY_UNAVAILABLE after
compaction and the retention that keeps histories replayable; the operator CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2, policy_pb2
from macp_sdk import AuthConfig, MacpClient
from macp_sdk.errors import MacpTransportError, parse_error_details

from tests.support import ROOT, bearer, commitment, envelope, new_session_id, send, start_payload

# Receipts and what-if replay are served under the current profile (current.md §2.3, §14, §15).
PROFILE = "current"
CURRENT = {"MACP_PROTOCOL_PROFILE": PROFILE}

MODE = "macp.mode.decision.v1"
PEOPLE = ["coordinator", "alice", "bob"]
OPEN, RESOLVED = envelope_pb2.SESSION_STATE_OPEN, envelope_pb2.SESSION_STATE_RESOLVED
Kinds = policy_pb2.WhatIfEntryOutcome
# Stricter than the default: a vote quorum of three, with every declared participant voting.
STRICT_RULES = {"voting": {"algorithm": "majority", "threshold": 0.5, "quorum": {"type": "count", "value": 3}},
                "commitment": {"require_vote_quorum": True}}


def descriptor(policy_id="policy.what-if.strict", rules=None, mode=MODE, schema_version=1):
    return policy_pb2.PolicyDescriptor(policy_id=policy_id, mode=mode, description="three votes needed",
                                       rules=json.dumps(STRICT_RULES if rules is None else rules),
                                       schema_version=schema_version)


def run_decision(stub, sid, policy_version="policy.default"):
    """A Decision session resolved with two of three votes; the Ack of every message, in order."""
    steps = [("coordinator", "SessionStart", start_payload(PEOPLE, policy_version=policy_version)),
             ("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy")),
             ("alice", "Evaluation", decision_pb2.EvaluationPayload(proposal_id="p1", recommendation="APPROVE",
                                                                    confidence=0.9)),
             ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
             ("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
             ("coordinator", "Commitment", commitment(policy_version=policy_version))]
    return [send(stub, envelope(MODE, mtype, sid, sender, payload, message_id=f"m{i}"))
            for i, (sender, mtype, payload) in enumerate(steps)]


def what_if(stub, sid, candidate, who="alice"):
    request = policy_pb2.WhatIfReplayRequest(session_id=sid)
    if candidate is not None:
        request.candidate.CopyFrom(candidate)
    return stub.WhatIfReplay(request, metadata=bearer(who) if who else None)


def refusal(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details(), dict(err.value.trailing_metadata() or ()).get("macp-error-code")


def test_stricter_policy_reports_the_live_evaluators_denial(runtime_server):
    stub = runtime_server.stub()
    sid = new_session_id()
    assert all(a.ok for a in run_decision(stub, sid))
    before = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("alice")).metadata

    with MacpClient(target=runtime_server.target, allow_insecure=True, auth=AuthConfig.for_dev_agent("alice"),
                    default_timeout=10) as client:
        response = client.what_if_replay(sid, descriptor())

    # the live evaluator's answer for the same history under the same policy, registered for real
    admin = bearer("admin")
    live_id = f"policy.live.{uuid.uuid4().hex[:8]}"
    assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor(live_id)),
                               metadata=admin).ok
    twin = new_session_id()
    acks = run_decision(stub, twin, policy_version=live_id)
    assert all(a.ok for a in acks[:-1]) and not acks[-1].ok
    live_denial = acks[-1].error
    assert live_denial.code == "POLICY_DENIED"

    assert response.recorded_policy_id == "policy.default"
    assert response.candidate_policy_id == "policy.what-if.strict"
    assert response.recorded.state == RESOLVED and response.recorded.resolved_by_history_index == 5
    assert response.recorded.resolved_by_message_id == "m5"
    assert response.recorded.resolved_by_message_type == "Commitment"
    assert response.recorded.resolution == commitment().SerializeToString()
    assert response.candidate.state == OPEN and response.candidate.resolution == b""
    assert response.HasField("first_divergence") and response.first_divergence == 5
    assert [(d.history_index, d.message_id) for d in response.denials] == [(5, "m5")]
    assert response.denials[0].details == live_denial.details                 # the same evaluator, the same words
    assert parse_error_details(response.denials[0].details) == parse_error_details(live_denial.details)
    assert [e.message_type for e in response.entries] == ["SessionStart", "Proposal", "Evaluation", "Vote", "Vote",
                                                          "Commitment"]
    assert [e.history_index for e in response.entries] == list(range(6))
    assert all(e.recorded.kind == Kinds.KIND_APPLIED for e in response.entries)
    assert [e.candidate.kind for e in response.entries] == [Kinds.KIND_APPLIED] * 5 + [Kinds.KIND_REFUSED]
    last = response.entries[5].candidate
    assert (last.state, last.error_code, last.details) == (OPEN, "POLICY_DENIED", live_denial.details)
    assert response.entries[5].recorded.state == RESOLVED

    # nothing changed: same metadata, the candidate was never registered
    after = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("alice")).metadata
    assert after == before
    ids = [d.policy_id for d in stub.ListPolicies(policy_pb2.ListPoliciesRequest(), metadata=admin).descriptors]
    assert "policy.what-if.strict" not in ids


def test_same_policy_does_not_diverge_and_registered_policies_work(runtime_server):
    stub = runtime_server.stub()
    sid = new_session_id()
    assert all(a.ok for a in run_decision(stub, sid))
    default = stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="policy.default"),
                             metadata=bearer("alice")).policy_descriptor
    response = what_if(stub, sid, default)
    assert not response.HasField("first_divergence")
    assert response.candidate == response.recorded and not response.denials
    assert all(e.recorded == e.candidate for e in response.entries)


def test_open_session_and_a_looser_candidate(runtime_server):
    # recorded under the strict policy, the Commitment was refused (never in the history); an OPEN
    # session replays as far as its history goes
    stub = runtime_server.stub()
    strict_id = f"policy.strict.{uuid.uuid4().hex[:8]}"
    assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor(strict_id)),
                               metadata=bearer("admin")).ok
    sid = new_session_id()
    acks = run_decision(stub, sid, policy_version=strict_id)
    assert not acks[-1].ok
    response = what_if(stub, sid, descriptor("policy.loose", rules={}))
    assert response.recorded_policy_id == strict_id
    assert len(response.entries) == 5 and response.recorded.state == OPEN and response.candidate.state == OPEN
    assert not response.HasField("first_divergence")


def test_order_of_checks_texts_and_codes(runtime_server):
    stub = runtime_server.stub()
    sid = new_session_id()
    assert all(a.ok for a in run_decision(stub, sid))
    assert refusal(lambda: what_if(stub, sid, descriptor(), who=None)) == (
        grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", "UNAUTHENTICATED")
    assert refusal(lambda: what_if(stub, "", descriptor())) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST: session_id must not be empty", "INVALID_REQUEST")
    missing = new_session_id()
    assert refusal(lambda: what_if(stub, missing, None)) == (
        grpc.StatusCode.NOT_FOUND, f"Session '{missing}' not found", "SESSION_NOT_FOUND")
    # (FORBIDDEN: test_who_may_replay; every dev-mode identity may manage the registries, so may replay)
    assert refusal(lambda: what_if(stub, sid, None)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST: candidate required", "INVALID_REQUEST")
    bad = [
        (descriptor(rules=None).__class__(policy_id="x", mode=MODE, rules="{not json", schema_version=1),
         "INVALID_POLICY_DEFINITION: rules is not valid JSON"),
        (descriptor(policy_id=" "), "INVALID_POLICY_DEFINITION: policy_id must not be empty"),
        (descriptor(schema_version=0), "INVALID_POLICY_DEFINITION: schema_version must be > 0"),
        (descriptor(rules=[1]), "INVALID_POLICY_DEFINITION: rules must be a JSON object"),
        (descriptor(rules={"voting": {"algorithm": "supermajority", "threshold": 0.5}}),
         "INVALID_POLICY_DEFINITION: voting.algorithm 'supermajority' requires voting.threshold > 0.5"),
        (descriptor(mode="macp.mode.quorum.v1", rules={}),
         f"INVALID_POLICY_DEFINITION: candidate policy mode 'macp.mode.quorum.v1' does not match session mode '{MODE}'"),
    ]
    for candidate, text in bad:
        code, details, macp_code = refusal(lambda: what_if(stub, sid, candidate))
        assert (code, macp_code) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_POLICY_DEFINITION"), details
        assert details.startswith(text), details
    # reserved ids do not matter for a descriptor that is never registered
    assert what_if(stub, sid, descriptor(policy_id="policy.default")).candidate_policy_id == "policy.default"


def test_who_may_replay(inprocess_factory, tmp_path):
    tokens = [{"token": "t-alice", "sender": "alice"}, {"token": "t-coord", "sender": "coordinator"},
              {"token": "t-bob", "sender": "bob"},
              {"token": "t-obs", "sender": "auditor", "is_observer": True},
              {"token": "t-admin", "sender": "registrar", "can_manage_mode_registry": True},
              {"token": "t-eve", "sender": "eve"}]
    srv = inprocess_factory(env={**CURRENT, "MACP_AUTH_TOKENS_JSON": json.dumps(tokens)})
    stub = srv.stub()
    sid = new_session_id()
    for i, (who, mtype, payload) in enumerate([
            ("t-coord", "SessionStart", start_payload(PEOPLE)),
            ("t-coord", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="x")),
            ("t-alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("t-coord", "Commitment", commitment())]):
        ack = stub.Send(core_pb2.SendRequest(envelope=envelope(MODE, mtype, sid, "", payload)),
                        metadata=bearer(who)).ack
        assert ack.ok, (mtype, ack.error)
    for token in ("t-alice", "t-coord", "t-obs", "t-admin"):   # participant, initiator, observer, registry manager
        assert what_if(stub, sid, descriptor(), who=token).recorded.state == RESOLVED
    assert refusal(lambda: what_if(stub, sid, descriptor(), who="t-eve"))[2] == "FORBIDDEN"
    # receipts: the session access rule alone (no registry managers)
    get = lambda who: stub.GetDecisionReceipt(core_pb2.GetDecisionReceiptRequest(session_id=sid), metadata=bearer(who))
    for token in ("t-alice", "t-coord", "t-obs", "t-bob"):
        assert json.loads(get(token).receipt_json)["session_id"] == sid
    assert refusal(lambda: get("t-admin"))[2] == "FORBIDDEN"
    assert refusal(lambda: get("t-eve"))[2] == "FORBIDDEN"


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _compacted(srv, sid) -> bool:
    """WhatIfReplay of `sid` is refused as FAILED_PRECONDITION: its history's beginning is compacted away."""
    try:
        what_if(srv.stub(), sid, descriptor())
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    return False


def test_compacted_history_is_unavailable_unless_kept(server_factory, tmp_path):
    compacting = {"MACP_WAL_SEGMENT_BYTES": "4096", "MACP_COMPACT_DEAD_RATIO": "0.01"}
    srv = server_factory(env={**CURRENT, **compacting})
    stub = srv.stub()
    sids = [new_session_id() for _ in range(4)]
    for sid in sids:
        assert all(a.ok for a in run_decision(stub, sid))
    assert what_if(stub, sids[0], descriptor()).recorded.state == RESOLVED   # before any restart: all there
    srv.restart()   # terminal checkpoints now stand for the histories...
    srv.restart()   # ...and the compactor drops what they cover

    assert _wait_for(lambda: _compacted(srv, sids[0]))
    code, details, macp_code = refusal(lambda: what_if(srv.stub(), sids[0], descriptor()))
    assert (code, macp_code) == (grpc.StatusCode.FAILED_PRECONDITION, "HISTORY_UNAVAILABLE")
    assert details == ("HISTORY_UNAVAILABLE: session history before ordinal 6 was compacted; "
                       "WhatIfReplay needs the complete accepted history")
    with MacpClient(target=srv.target, allow_insecure=True, auth=AuthConfig.for_dev_agent("alice"),
                    default_timeout=10) as client:
        with pytest.raises(MacpTransportError) as err:
            client.what_if_replay(sids[0], descriptor())
        assert err.value.macp_code == "HISTORY_UNAVAILABLE"
        assert client.get_decision_receipt(sids[0]).receipt["session_id"] == sids[0]   # receipts outlive it

    # MACP_COMPACT_DEAD_RATIO=0 keeps every history replayable across restarts
    keep = server_factory(env={**CURRENT, "MACP_WAL_SEGMENT_BYTES": "4096", "MACP_COMPACT_DEAD_RATIO": "0"})
    sid = new_session_id()
    assert all(a.ok for a in run_decision(keep.stub(), sid))
    keep.restart()
    keep.restart()
    time.sleep(0.5)
    response = what_if(keep.stub(), sid, descriptor())
    assert response.first_divergence == 5 and len(response.entries) == 6


def test_cli_what_if_and_receipt(runtime_server, tmp_path):
    stub = runtime_server.stub()
    sid = new_session_id()
    assert all(a.ok for a in run_decision(stub, sid))
    policy_file = tmp_path / "strict.json"
    policy_file.write_text(json.dumps({"policy_id": "policy.file", "mode": MODE, "description": "strict",
                                       "rules": STRICT_RULES, "schema_version": 1}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "macp_runtime", *args, "--target", runtime_server.target,
                               "--token", "alice"], capture_output=True, text=True, cwd=ROOT, env=env)

    out = cli("policies", "what-if", sid, f"@{policy_file}", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["first_divergence"] == 5 and summary["candidate"]["state"] == "OPEN"
    assert summary["denials"][0]["message_id"] == "m5"
    assert summary["entries"][5]["candidate"]["error_code"] == "POLICY_DENIED"
    text = cli("policies", "what-if", sid, "policy.default")
    assert text.returncode == 0, text.stderr
    assert "diverges at  -" in text.stdout and "RESOLVED by #5 Commitment" in text.stdout
    text = cli("policies", "what-if", sid, f"@{policy_file}")
    assert "denied #5" in text.stdout
    missing = cli("policies", "what-if", sid, "policy.nonesuch")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

    saved = tmp_path / "receipt.json"
    out = cli("sessions", "receipt", sid, "--json", "--out", str(saved))
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["verification"]["verdict"] == "attested"
    assert saved.read_text() == doc["receipt_json"]
    text = cli("sessions", "receipt", sid)
    assert text.returncode == 0 and "verdict      attested" in text.stdout
    open_sid = new_session_id()
    assert send(stub, envelope(MODE, "SessionStart", open_sid, "alice", start_payload(PEOPLE))).ok
    bad = cli("sessions", "receipt", open_sid)
    assert bad.returncode == 1 and "RECEIPT_UNAVAILABLE" in bad.stderr


def test_history_retention_keeps_histories_replayable_for_a_while(server_factory):
    """MACP_HISTORY_RETENTION_SECS: compaction keeps a terminal session's whole history that long after
    the session ended (its terminal checkpoint); afterwards it is compacted as usual."""
    retention = 30
    srv = server_factory(env={**CURRENT, "MACP_WAL_SEGMENT_BYTES": "4096", "MACP_COMPACT_DEAD_RATIO": "0.01",
                              "MACP_HISTORY_RETENTION_SECS": str(retention)})
    sids = [new_session_id() for _ in range(4)]
    for sid in sids:
        assert all(a.ok for a in run_decision(srv.stub(), sid))
    ended = time.monotonic()
    srv.restart()
    srv.restart()   # without the retention this start compacts the histories away (see above)
    time.sleep(1.0)
    assert time.monotonic() - ended < retention - 5, "the restarts took too long for this test"
    for sid in sids:
        response = what_if(srv.stub(), sid, descriptor())
        assert len(response.entries) == 6 and response.first_divergence == 5
    time.sleep(max(0.0, ended + retention + 1 - time.monotonic()))
    srv.restart()   # compaction at start: the retention has passed

    assert _wait_for(lambda: _compacted(srv, sids[0]))


def test_task_under_a_require_output_candidate(runtime_server):
    """Another mode, another evaluator: a Task resolved without output, judged under a policy that
    requires output, is denied with the code and text the live Task evaluator gives."""
    from macp_sdk import TaskSession
    from macp_sdk.errors import MacpAckError
    from macp_sdk.policy import TaskCompletionRules, build_task_policy

    def run(client, policy_version=""):
        planner, worker = AuthConfig.for_dev_agent("planner"), AuthConfig.for_dev_agent("worker")
        s = TaskSession(client, auth=planner, policy_version=policy_version)
        assert s.start(intent="report", participants=["planner", "worker"], ttl_ms=60_000).ok
        assert s.request_task("t1", "Write the report", requested_assignee="worker").ok
        assert s.accept_task("t1", auth=worker).ok
        assert s.complete_task("t1", summary="no output attached", auth=worker).ok
        return s

    strict = build_task_policy("policy.task.output", "output required",
                               completion=TaskCompletionRules(require_output=True))
    with MacpClient(target=runtime_server.target, allow_insecure=True, auth=AuthConfig.for_dev_agent("planner"),
                    default_timeout=10) as client:
        session = run(client)
        assert session.commit(action="task.completed", authority_scope="report", reason="done").ok
        response = client.what_if_replay(session.session_id, strict)
        live_policy = policy_pb2.PolicyDescriptor()
        live_policy.CopyFrom(strict)
        live_policy.policy_id = f"policy.task.output.{uuid.uuid4().hex[:8]}"
        assert client.register_policy(live_policy).ok
        twin = run(client, live_policy.policy_id)
        with pytest.raises(MacpAckError) as err:
            twin.commit(action="task.completed", authority_scope="report", reason="done")
    live = err.value.failure
    assert live.code == "POLICY_DENIED"
    assert response.first_divergence == 4 and response.candidate.state == OPEN
    assert [d.history_index for d in response.denials] == [4]
    replayed = parse_error_details(response.denials[0].details)
    assert (replayed.reasons, replayed.denials) == (live.reasons, live.denials)   # what the live Ack said
    assert [d.code for d in replayed.denials] == ["output_required"]


def test_replays_count_against_the_callers_message_rate(inprocess_factory):
    srv = inprocess_factory(env={**CURRENT, "MACP_MESSAGE_LIMIT_PER_MINUTE": "3"})
    stub = srv.stub()
    sid = new_session_id()
    assert all(a.ok for a in run_decision(stub, sid))   # bob sent one Vote of his three
    assert what_if(stub, sid, descriptor(), who="bob").recorded.state == RESOLVED
    assert what_if(stub, sid, descriptor(), who="bob").recorded.state == RESOLVED
    assert refusal(lambda: what_if(stub, sid, descriptor(), who="bob")) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimited", "RATE_LIMITED")


def test_recorded_lifecycle_records_are_replayed_where_they_happened(runtime_server):
    """Suspend/resume between messages and a cancellation are part of the replay (no entries of their
    own): a suspended-and-resumed session still resolves in both replays; a cancelled one ends
    CANCELLED in both, whatever the candidate."""
    stub = runtime_server.stub()
    coord = bearer("coordinator")
    sid = new_session_id()
    acks = [send(stub, envelope(MODE, mtype, sid, who, payload)) for who, mtype, payload in [
        ("coordinator", "SessionStart", start_payload(PEOPLE)),
        ("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy")),
        ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))]]
    sid2 = new_session_id()
    steps = [("coordinator", "SessionStart", start_payload(PEOPLE)),
             ("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy"))]
    for i, (who, mtype, payload) in enumerate(steps):
        assert send(stub, envelope(MODE, mtype, sid2, who, payload, message_id=f"s{i}")).ok
    assert stub.SuspendSession(core_pb2.SuspendSessionRequest(session_id=sid2, reason="pause"), metadata=coord).ack.ok
    assert stub.ResumeSession(core_pb2.ResumeSessionRequest(session_id=sid2, reason="go"), metadata=coord).ack.ok
    for i, (who, mtype, payload) in enumerate([
            ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("coordinator", "Commitment", commitment())]):
        assert send(stub, envelope(MODE, mtype, sid2, who, payload, message_id=f"t{i}")).ok
    default = stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="policy.default"), metadata=coord).policy_descriptor
    response = what_if(stub, sid2, default, who="coordinator")
    assert len(response.entries) == 5 and not response.HasField("first_divergence")
    assert response.recorded.state == RESOLVED and response.recorded.resolved_by_message_id == "t2"

    assert all(a.ok for a in acks)
    assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid, reason="stop"), metadata=coord).ack.ok
    response = what_if(stub, sid, descriptor(), who="coordinator")
    assert len(response.entries) == 3
    assert response.recorded.state == response.candidate.state == envelope_pb2.SESSION_STATE_CANCELLED
    assert all(e.recorded.kind == Kinds.KIND_APPLIED and e.recorded.state == OPEN for e in response.entries)


def test_a_recorded_implicit_accept_is_replayed_as_the_record_it_is(inprocess_factory):
    """current.md §15.3: a runtime-written implicit HandoffAccept is an entry like any other and is
    applied in both replays (no new synthetic accept is generated)."""
    from tests.support.sdk import implicit_handoff_policy, offer_past_its_implicit_accept

    srv = inprocess_factory(env=CURRENT)
    coord = AuthConfig.for_dev_agent("coord")
    policy = implicit_handoff_policy()
    with MacpClient(target=srv.target, allow_insecure=True, auth=coord, default_timeout=10) as client:
        session = offer_past_its_implicit_accept(client, coord, policy)
        assert session.commit(action="handoff.accepted", authority_scope="on-call", reason="implicit").ok
        response = client.what_if_replay(session.session_id, policy, auth=AuthConfig.for_dev_agent("alice"))
        receipt = client.get_decision_receipt(session.session_id).receipt
    assert [e.message_id for e in response.entries][2] == "implicit-accept:h1"
    assert all(e.recorded.kind == Kinds.KIND_APPLIED for e in response.entries)
    assert response.recorded.state == RESOLVED and response.recorded.resolved_by_history_index == 4
    assert not response.HasField("first_divergence")
    assert receipt["commitment"]["action"] == "handoff.accepted"
