"""The official Python SDK (`macp_sdk`) drives Proposal, Task, Handoff and Quorum sessions to RESOLVED,
with the default policy and with policies built and registered through the SDK.

Spec: runtime.md §12 (the scenarios), modes.md §3–§6 (the modes), §10 (policies). Outcomes are checked
independently with a raw GetSession.
"""
from __future__ import annotations

import uuid

import pytest
from macp.v1 import core_pb2, envelope_pb2
from macp_sdk import AuthConfig, HandoffSession, MacpClient, ProposalSession, QuorumSession, TaskSession
from macp_sdk.errors import MacpAckError
from macp_sdk.policy import (CounterProposalRules, ProposalAcceptanceRules, QuorumThreshold, TaskCompletionRules,
                             build_proposal_policy, build_quorum_policy, build_task_policy)

from tests.support import bearer

# Shared by both protocol profiles: every test runs against a v0.4.0 and a current server.
PROFILES = ("v0.4.0", "current")

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED


def agent(name: str) -> AuthConfig:
    return AuthConfig.for_dev_agent(name)


@pytest.fixture(scope="module")
def client(runtime_server):
    with MacpClient(target=runtime_server.target, allow_insecure=True, auth=agent("admin"), default_timeout=10) as c:
        yield c


@pytest.fixture
def state_of(runtime_server):
    stub = runtime_server.stub()

    def read(session_id: str, who: str) -> int:
        return stub.GetSession(core_pb2.GetSessionRequest(session_id=session_id), metadata=bearer(who)).metadata.state

    return read


def registered(client, descriptor) -> str:
    """Register an SDK-built policy under a fresh id; returns the id."""
    descriptor.policy_id = f"{descriptor.policy_id}.{uuid.uuid4().hex[:8]}"
    resp = client.register_policy(descriptor)
    assert resp.ok, resp.error
    assert client.get_policy(descriptor.policy_id).policy_descriptor.mode == descriptor.mode
    return descriptor.policy_id


def started(session, participants, intent="sdk flow"):
    ack = session.start(intent=intent, participants=list(participants), ttl_ms=60_000)
    assert ack.ok and ack.session_state == OPEN
    return session


# --- Proposal ------------------------------------------------------------------------------------

def test_proposal_buyer_and_seller_converge_on_a_counter_offer(client, state_of):
    buyer, seller = agent("buyer"), agent("seller")
    s = started(ProposalSession(client, auth=buyer), ["buyer", "seller"])
    assert s.propose("offer-1", "1000 units at 12.00", auth=seller).ok
    assert s.counter_propose("offer-2", "offer-1", "1000 units at 11.20", summary="volume discount").ok
    assert s.accept("offer-2", reason="mine").ok
    assert s.accept("offer-2", reason="deal", auth=seller).ok
    ack = s.commit(action="proposal.accepted", authority_scope="purchase", reason="both accepted offer-2")
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(s.session_id, "seller") == RESOLVED
    p = s.proposal_projection
    assert set(p.proposals) == {"offer-1", "offer-2"} and p.proposals["offer-2"].supersedes == "offer-1"
    assert p.accepted_proposal() == "offer-2" and p.is_committed


def test_proposal_with_an_sdk_built_policy(client, state_of):
    policy = registered(client, build_proposal_policy(
        "policy.sdk.proposal", "counterparty acceptance, one counter-offer",
        acceptance=ProposalAcceptanceRules(criterion="counterparty"),
        counter_proposal=CounterProposalRules(max_rounds=1)))
    buyer, seller = agent("buyer"), agent("seller")
    s = started(ProposalSession(client, auth=buyer, policy_version=policy), ["buyer", "seller"])
    assert s.propose("o1", "100", auth=seller).ok
    assert s.counter_propose("o2", "o1", "90").ok
    with pytest.raises(MacpAckError) as err:                     # max_rounds = 1
        s.counter_propose("o3", "o2", "95", auth=seller)
    assert err.value.failure.code == "INVALID_ENVELOPE"
    assert s.accept("o2", auth=seller).ok                        # counterparty of o2 is the seller: converged
    ack = s.commit(action="proposal.accepted", authority_scope="purchase", reason="counterparty accepted")
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(s.session_id, "buyer") == RESOLVED


# --- Task ----------------------------------------------------------------------------------------

def test_task_planner_and_worker_with_progress(client, state_of):
    planner, worker = agent("planner"), agent("worker")
    s = started(TaskSession(client, auth=planner), ["planner", "worker"])
    assert s.request_task("t1", "Summarise incident 42", instructions="three bullets", requested_assignee="worker").ok
    assert s.accept_task("t1", assignee="worker", auth=worker).ok
    assert s.update_task("t1", status="in_progress", progress=0.5, message="halfway", auth=worker).ok
    assert s.complete_task("t1", assignee="worker", output=b"- a\n- b\n- c", summary="done", auth=worker).ok
    ack = s.commit(action="task.completed", authority_scope="incident-42", reason="summary delivered")
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(s.session_id, "worker") == RESOLVED
    p = s.task_projection
    assert p.is_completed("t1") and p.progress_of("t1") == 1.0   # the SDK counts a completed task as 100%


def test_task_with_an_sdk_built_require_output_policy(client, state_of, protocol_profile):
    policy = registered(client, build_task_policy(
        "policy.sdk.task", "output required", completion=TaskCompletionRules(require_output=True)))
    planner, worker = agent("planner"), agent("worker")
    s = started(TaskSession(client, auth=planner, policy_version=policy), ["planner", "worker"])
    assert s.request_task("t1", "Write the report", requested_assignee="worker").ok
    assert s.accept_task("t1", auth=worker).ok
    assert s.complete_task("t1", summary="no output attached", auth=worker).ok
    with pytest.raises(MacpAckError) as err:
        s.commit(action="task.completed", authority_scope="report", reason="done?")
    assert err.value.failure.code == "POLICY_DENIED"
    assert err.value.reasons == ["policy requires task output before commitment"]
    assert state_of(s.session_id, "planner") == OPEN
    if protocol_profile == "v0.4.0":
        # the negative outcome is denied as well under require_output (no Complete with output exists)
        with pytest.raises(MacpAckError):
            s.commit(action="task.failed", authority_scope="report", reason="nothing delivered",
                     outcome_positive=False)
    else:   # current.md §13.5.3: require_output gates positive Commitments only
        assert s.commit(action="task.failed", authority_scope="report", reason="nothing delivered",
                        outcome_positive=False).ok


# --- Handoff -------------------------------------------------------------------------------------

def test_handoff_owner_to_target_with_context(client, state_of):
    owner, target = agent("owner"), agent("target")
    s = started(HandoffSession(client, auth=owner), ["owner", "target"])
    assert s.offer("h1", "target", scope="on-call", reason="end of shift").ok
    assert s.add_context("h1", content_type="application/json", context=b'{"open_incidents":["INC-7"]}').ok
    assert s.accept_handoff("h1", accepted_by="target", reason="ready", auth=target).ok
    ack = s.commit(action="handoff.accepted", authority_scope="on-call", reason="target accepted")
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(s.session_id, "target") == RESOLVED
    assert s.handoff_projection.is_accepted("h1")


# --- Quorum --------------------------------------------------------------------------------------

def test_quorum_coordinator_and_ballots(client, state_of):
    coordinator = agent("coordinator")
    s = started(QuorumSession(client, auth=coordinator), ["alice", "bob", "carol"])
    assert s.request_approval("r1", "deploy v2", summary="all green", required_approvals=2).ok
    with pytest.raises(MacpAckError) as err:                     # one approval is not enough yet
        s.commit(action="quorum.approved", authority_scope="production", reason="early")
    assert err.value.failure.code == "INVALID_ENVELOPE"
    assert s.approve("r1", reason="lgtm", auth=agent("alice")).ok
    assert s.approve("r1", reason="ship it", auth=agent("bob")).ok
    ack = s.commit(action="quorum.approved", authority_scope="production", reason="2 of 3 approvals")
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(s.session_id, "carol") == RESOLVED
    assert s.quorum_projection.approval_count("r1") == 2


def test_quorum_with_an_sdk_built_threshold_policy(client, state_of):
    # the policy threshold (3 of 3) replaces the request's required_approvals (1)
    policy = registered(client, build_quorum_policy(
        "policy.sdk.quorum", "unanimous approval", threshold=QuorumThreshold(type="n_of_m", value=3)))
    coordinator = agent("coordinator")
    s = started(QuorumSession(client, auth=coordinator, policy_version=policy), ["alice", "bob", "carol"])
    assert s.request_approval("r1", "rotate keys", required_approvals=1).ok
    assert s.approve("r1", auth=agent("alice")).ok
    with pytest.raises(MacpAckError) as err:
        s.commit(action="quorum.approved", authority_scope="keys", reason="too early")
    assert err.value.failure.code == "INVALID_ENVELOPE"
    assert s.approve("r1", auth=agent("bob")).ok
    assert s.approve("r1", auth=agent("carol")).ok
    ack = s.commit(action="quorum.approved", authority_scope="keys", reason="all three approved")
    assert ack.ok and ack.session_state == RESOLVED
    assert state_of(s.session_id, "alice") == RESOLVED
