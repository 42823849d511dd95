"""macp-sdk-python 0.22.0 drives every session type through its own high-level API against a server
speaking the `current` protocol profile (the default; ../shared/spec/current.md), including what it
only gets from a current-line runtime: empty-policy_version commitments, multi-round protobuf
Contribute, schema 2/3 policies with structured denial codes, max_suspend_ms, the macp-error-code
trailer, and the asyncio client. Outcomes are cross-checked with a raw GetSession.
"""
from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from macp.v1 import core_pb2
from macp_sdk import (AsyncDecisionSession, AsyncMacpClient, AuthConfig, DecisionSession, HandoffSession,
                      ProposalSession, QuorumSession, TaskSession, build_contribute_payload, build_envelope,
                      build_session_start_payload, macp_error_code)
from macp_sdk.constants import MODE_MULTI_ROUND
from macp_sdk.errors import MacpAckError, MacpSdkError
from macp_sdk.policy import (CommitmentRules, ObjectionHandlingRules, QuorumThreshold, TaskAssignmentRules,
                             VotingRules, build_decision_policy, build_quorum_policy, build_task_policy)

from tests.support.sdk import client  # noqa: F401  (a fixture)
from tests.support.sdk import ADMIN, ALICE, BOB, CAROL, COORD, EXPIRED, OPEN, RESOLVED, metadata_reader

PROFILE = "current"


@pytest.fixture
def state_of(runtime_server):
    return metadata_reader(runtime_server, "coordinator")


def registered(client, descriptor) -> str:
    descriptor.policy_id = f"{descriptor.policy_id}.{uuid.uuid4().hex[:8]}"
    resp = client.register_policy(descriptor, auth=ADMIN)
    assert resp.ok, resp.error
    return descriptor.policy_id


def started(session, participants, **kw):
    ack = session.start(intent="sdk flow", participants=list(participants), ttl_ms=60_000, **kw)
    assert ack.ok and ack.session_state == OPEN
    return session


def denial_codes(info) -> list[str]:
    return [d.code for d in info.value.denials]


# --- discovery -----------------------------------------------------------------------------------

def test_initialize_advertises_the_current_line(client):
    init = client.initialize()
    assert init.selected_protocol_version == "1.0"
    assert init.runtime_info.version == "0.9.0"
    caps = init.capabilities
    assert caps.roots.list_roots and not caps.roots.list_changed
    assert list(caps.policy_registry.rule_extensions) == []
    # the two optional RPC groups the SDK gates on (tests/wire/test_receipts_wire.py, tests/wire/test_whatif_wire.py)
    assert caps.policy_registry.what_if_replay
    assert caps.decision_receipt.get_decision_receipt and caps.decision_receipt.signed


def test_status_errors_carry_the_registry_code(client):
    with pytest.raises(grpc.RpcError) as info:
        client.get_session(str(uuid.uuid4()))
    assert macp_error_code(info.value) == "SESSION_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as info:
        client.get_manifest(agent_id="someone-else")
    assert macp_error_code(info.value) == "AGENT_NOT_FOUND"


# --- Decision ------------------------------------------------------------------------------------

def test_decision_with_an_empty_policy_version_resolves(client, state_of):
    session = started(DecisionSession(client, auth=COORD, policy_version=""), ["coordinator", "alice", "bob"])
    assert session.propose("p1", "deploy v2", rationale="green build").ok
    assert session.evaluate("p1", "approve", confidence=0.9, reason="low risk", auth=ALICE).ok
    assert session.raise_objection("p1", reason="friday", severity="low", auth=BOB).ok
    assert session.vote("p1", "approve", auth=ALICE).ok
    assert session.vote("p1", "APPROVE", auth=BOB).ok
    ack = session.commit(action="deployment.approved", authority_scope="release", reason="all approve")
    assert ack.ok and ack.session_state == RESOLVED
    md = state_of(session.session_id)
    assert md.state == RESOLVED and md.policy_version == "policy.default"
    assert session.decision_projection.is_positive_outcome is True


def test_decision_schema3_policy_denies_an_empty_tally_with_a_code(client, state_of):
    pid = registered(client, build_decision_policy("sdk.majority3", "majority, schema 3",
                                                   voting=VotingRules(algorithm="majority")))
    session = started(DecisionSession(client, auth=COORD, policy_version=pid), ["alice", "bob", "carol"])
    assert session.propose("p1", "ship", auth=ALICE).ok
    with pytest.raises(MacpAckError) as info:
        session.commit(action="decision.selected", authority_scope="s", reason="no votes yet")
    assert info.value.failure.code == "POLICY_DENIED"
    assert denial_codes(info) == ["no_votes"]
    assert "schema_version 3" in info.value.denials[0].message
    assert info.value.reasons == [info.value.denials[0].message]
    assert session.vote("p1", "APPROVE", auth=ALICE).ok
    assert session.vote("p1", "APPROVE", auth=BOB).ok
    assert session.commit(action="decision.selected", authority_scope="s", reason="passed").session_state == RESOLVED
    assert state_of(session.session_id, "alice").policy_version == pid


def test_decision_schema2_negative_outcome_needs_a_decisive_reject(client, state_of):
    pid = registered(client, build_decision_policy("sdk.majority2", "majority, schema 2", schema_version=2,
                                                   voting=VotingRules(algorithm="majority")))
    session = started(DecisionSession(client, auth=COORD, policy_version=pid), ["alice", "bob", "carol"])
    assert session.propose("p1", "ship", auth=ALICE).ok
    with pytest.raises(MacpAckError) as info:
        session.commit(action="decision.declined", authority_scope="s", reason="no", outcome_positive=False)
    assert denial_codes(info) == ["decline_not_backed"]
    # a positive commitment on an empty tally is allowed under schema 2 (legacy fail-open arm)
    assert session.vote("p1", "REJECT", auth=BOB).ok
    assert session.vote("p1", "REJECT", auth=CAROL).ok
    with pytest.raises(MacpAckError) as info:
        session.commit(action="decision.selected", authority_scope="s", reason="yes")
    assert denial_codes(info) == ["threshold_not_met"]
    ack = session.commit(action="decision.declined", authority_scope="s", reason="rejected", outcome_positive=False)
    assert ack.session_state == RESOLVED
    assert session.decision_projection.is_positive_outcome is False


def test_decision_veto_names_the_objectors_only_in_participants(client):
    pid = registered(client, build_decision_policy(
        "sdk.veto", "critical objections veto", objection_handling=ObjectionHandlingRules(
            critical_severity_vetoes=True, veto_threshold=1)))
    session = started(DecisionSession(client, auth=COORD, policy_version=pid), ["alice", "bob"])
    assert session.propose("p1", "ship", auth=ALICE).ok
    assert session.raise_objection("p1", reason="unsafe", severity="critical", auth=BOB).ok
    with pytest.raises(MacpAckError) as info:
        session.commit(action="decision.selected", authority_scope="s", reason="go")
    [denial] = info.value.denials
    assert denial.code == "veto" and denial.participants == ("bob",) and "bob" not in denial.message


def test_decision_allow_decline_over_approval(client):
    pid = registered(client, build_decision_policy(
        "sdk.override", "executive override", schema_version=2, voting=VotingRules(algorithm="majority"),
        commitment=CommitmentRules(allow_decline_over_approval=True)))
    session = started(DecisionSession(client, auth=COORD, policy_version=pid), ["alice", "bob", "carol"])
    assert session.propose("p1", "ship", auth=ALICE).ok
    assert session.vote("p1", "APPROVE", auth=ALICE).ok
    assert session.vote("p1", "APPROVE", auth=BOB).ok
    with pytest.raises(MacpAckError) as info:
        session.commit(action="decision.declined", authority_scope="s", reason="no", outcome_positive=False)
    assert denial_codes(info) == ["decline_not_backed"]
    assert session.vote("p1", "REJECT", auth=CAROL).ok
    assert session.commit(action="decision.declined", authority_scope="s", reason="override",
                          outcome_positive=False).session_state == RESOLVED


# --- Proposal, Task, Handoff, Quorum ---------------------------------------------------------------

def test_proposal_with_an_empty_policy_version(client, state_of):
    session = started(ProposalSession(client, auth=ALICE, policy_version=""), ["alice", "bob"])
    assert session.propose("p1", "offer", summary="100 units", auth=ALICE).ok
    assert session.counter_propose("p2", "p1", "counter", summary="90 units", auth=BOB).ok
    assert session.accept("p2", auth=ALICE).ok
    assert session.accept("p2", auth=BOB).ok
    ack = session.commit(action="proposal.accepted", authority_scope="deal", reason="agreed", auth=ALICE)
    assert ack.session_state == RESOLVED
    assert state_of(session.session_id, "alice").state == RESOLVED


def test_task_initiator_orchestrates_from_outside_and_a_decline_blocks_only_the_decliner(client, state_of):
    session = started(TaskSession(client, auth=COORD, policy_version=""), ["alice", "bob"])
    assert session.request_task("t1", "build", instructions="make it").ok
    assert session.reject_task("t1", reason="busy", auth=ALICE).ok
    projection = session.task_projection
    assert not projection.can_accept("alice") and projection.can_accept("bob")
    with pytest.raises(MacpAckError):
        session.accept_task("t1", auth=ALICE)
    assert session.accept_task("t1", auth=BOB).ok
    assert session.complete_task("t1", output=b"done", summary="ok", auth=BOB).ok
    ack = session.commit(action="task.completed", authority_scope="build", reason="done")
    assert ack.session_state == RESOLVED


def test_task_negative_commitment_once_no_eligible_responder_remains(client):
    session = started(TaskSession(client, auth=COORD, policy_version=""), ["alice", "bob"])
    assert session.request_task("t1", "build", requested_assignee="alice").ok
    with pytest.raises(MacpAckError):
        session.commit(action="task.failed", authority_scope="build", reason="nobody", outcome_positive=False)
    assert session.reject_task("t1", reason="busy", auth=ALICE).ok
    assert session.task_projection.negative_commit_eligible("t1")
    ack = session.commit(action="task.failed", authority_scope="build", reason="declined", outcome_positive=False)
    assert ack.session_state == RESOLVED


def test_task_give_back_denied_with_its_code(client):
    pid = registered(client, build_task_policy("sdk.strict", "no reassignment",
                                               assignment=TaskAssignmentRules(allow_reassignment_on_reject=False)))
    session = started(TaskSession(client, auth=COORD, policy_version=pid), ["coordinator", "alice", "bob"])
    assert session.request_task("t1", "build").ok
    assert session.accept_task("t1", auth=ALICE).ok
    with pytest.raises(MacpAckError) as info:
        session.reject_task("t1", reason="changed my mind", auth=ALICE)
    assert info.value.failure.code == "POLICY_DENIED" and denial_codes(info) == ["reassignment_not_allowed"]


def test_handoff_does_not_re_offer_to_a_target_that_declined(client):
    session = started(HandoffSession(client, auth=COORD, policy_version=""), ["coordinator", "alice", "bob"])
    assert session.offer("h1", "alice", scope="on-call").ok
    assert session.decline("h1", reason="away", auth=ALICE).ok
    assert not session.handoff_projection.can_offer_to("alice")
    with pytest.raises(MacpAckError) as info:
        session.offer("h2", "alice", scope="on-call")
    assert info.value.failure.code == "INVALID_ENVELOPE"
    assert session.offer("h3", "bob", scope="on-call").ok
    assert session.add_context("h3", content_type="text/plain", context=b"runbook").ok
    assert session.accept_handoff("h3", auth=BOB).ok
    ack = session.commit(action="handoff.accepted", authority_scope="on-call", reason="bob has it")
    assert ack.session_state == RESOLVED


def test_quorum_percentage_policy_rounds_up(client, state_of):
    pid = registered(client, build_quorum_policy("sdk.q60", "60 percent",
                                                 threshold=QuorumThreshold(type="percentage", value=60)))
    session = started(QuorumSession(client, auth=COORD, policy_version=pid), ["alice", "bob", "carol"])
    assert session.request_approval("r1", "deploy", summary="ship it", required_approvals=1).ok
    assert session.approve("r1", auth=ALICE).ok
    # 60% of 3 is 1.8: two approvals are needed (ceil), not one
    with pytest.raises(MacpAckError):
        session.commit(action="quorum.approved", authority_scope="s", reason="one is not enough")
    assert session.approve("r1", auth=BOB).ok
    ack = session.commit(action="quorum.approved", authority_scope="s", reason="two of three")
    assert ack.session_state == RESOLVED


# --- Multi-round: protobuf Contribute ----------------------------------------------------------

def test_multi_round_with_protobuf_contributions(client, state_of):
    sid = str(uuid.uuid4())
    start = build_session_start_payload(intent="converge", participants=["coordinator", "alice", "bob"],
                                        ttl_ms=60_000, policy_version="")
    assert client.send(build_envelope(mode=MODE_MULTI_ROUND, message_type="SessionStart", session_id=sid,
                                      payload=start.SerializeToString(), sender="coordinator"), auth=COORD).ok

    def contribute(value: str, who: AuthConfig, name: str):
        env = build_envelope(mode=MODE_MULTI_ROUND, message_type="Contribute", session_id=sid, sender=name,
                             payload=build_contribute_payload(value).SerializeToString())
        return client.send(env, auth=who)

    assert contribute("blue", ALICE, "alice").ok
    assert contribute("green", BOB, "bob").ok
    assert contribute('{"value":"x"}', ALICE, "alice").ok          # JSON-shaped text inside a protobuf value
    assert contribute("green", ALICE, "alice").ok
    # the initiator is listed but not a required contributor: converged now
    commitment = core_pb2.CommitmentPayload(commitment_id="c1", action="multi_round.converged", authority_scope="s",
                                            reason="agreed", mode_version="1.0.0",
                                            configuration_version="config.default", outcome_positive=True)
    ack = client.send(build_envelope(mode=MODE_MULTI_ROUND, message_type="Commitment", session_id=sid,
                                     sender="coordinator", payload=commitment.SerializeToString()), auth=COORD)
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(sid).state == RESOLVED


# --- max_suspend_ms ------------------------------------------------------------------------------

def test_max_suspend_ms_binds_the_suspension_cap(client, state_of):
    session = started(DecisionSession(client, auth=COORD, policy_version=""), ["alice"], max_suspend_ms=300)
    assert session.suspend(reason="pause").ok
    time.sleep(0.5)
    assert state_of(session.session_id).state == EXPIRED
    with pytest.raises(MacpSdkError):
        DecisionSession(client, auth=COORD).start(intent="x", participants=["alice"], ttl_ms=60_000,
                                                  max_suspend_ms=-1)


# --- the asyncio client --------------------------------------------------------------------------

def test_async_client_drives_a_decision(runtime_server, state_of):
    async def flow() -> str:
        async with AsyncMacpClient(target=runtime_server.target, allow_insecure=True, auth=COORD,
                                   default_timeout=10) as aclient:
            init = await aclient.initialize()
            assert init.runtime_info.version == "0.9.0"
            session = AsyncDecisionSession(aclient, auth=COORD, policy_version="")
            assert (await session.start(intent="async", participants=["alice", "bob"], ttl_ms=60_000)).ok
            assert (await session.propose("p1", "ship", auth=ALICE)).ok
            assert (await session.vote("p1", "APPROVE", auth=BOB)).ok
            ack = await session.commit(action="decision.selected", authority_scope="s", reason="ok")
            assert ack.session_state == RESOLVED
            return session.session_id

    sid = asyncio.run(flow())
    assert state_of(sid, "alice").state == RESOLVED


def test_task_give_back_by_the_named_assignee_does_not_make_a_decline_eligible(client):
    """SDK TaskProjection.negative_commit_eligible: only a decline *before accepting* counts."""
    pid = registered(client, build_task_policy("sdk.lenient", "reassignment allowed",
                                               assignment=TaskAssignmentRules(allow_reassignment_on_reject=True)))
    session = started(TaskSession(client, auth=COORD, policy_version=pid), ["alice", "bob"])
    assert session.request_task("t1", "build", requested_assignee="alice").ok
    assert session.accept_task("t1", auth=ALICE).ok
    assert session.reject_task("t1", reason="giving it back", auth=ALICE).ok
    assert not session.task_projection.negative_commit_eligible("t1")
    with pytest.raises(MacpAckError) as info:
        session.commit(action="task.failed", authority_scope="build", reason="x", outcome_positive=False)
    assert info.value.failure.code == "INVALID_ENVELOPE"
