"""The official Python SDK (macp-sdk-python 0.22, `macp_sdk`) drives Decision sessions on this runtime.

In-process SDK calls against the shared server; the outcome is checked independently with a raw
GetSession.
"""
from __future__ import annotations

import pytest
from macp_sdk import DecisionSession
from macp_sdk.errors import MacpAckError, MacpSessionError

from tests.support.sdk import client  # noqa: F401  (a fixture)
from tests.support.sdk import ALICE, BOB, CANCELLED, COORD, OPEN, RESOLVED, metadata_reader

# Shared by both protocol profiles: every test runs against a v0.4.0 and a current server.
PROFILES = ("v0.4.0", "current")


@pytest.fixture
def raw_metadata(runtime_server):
    return metadata_reader(runtime_server, "alice")


def started(client, participants=("coordinator", "alice", "bob")) -> DecisionSession:
    session = DecisionSession(client, auth=COORD)
    ack = session.start(intent="deploy v2?", participants=list(participants), ttl_ms=60_000)
    assert ack.ok and ack.session_state == OPEN
    return session


def test_decision_flow_through_the_sdk_resolves(client, raw_metadata):
    init = client.initialize()
    assert init.selected_protocol_version == "1.0"
    assert "macp.mode.decision.v1" in [m.mode for m in client.list_modes().modes]

    session = started(client)
    assert session.propose("p1", "deploy v2", rationale="green build").ok
    assert session.evaluate("p1", "approve", confidence=0.94, reason="low risk", auth=ALICE).ok
    assert session.raise_objection("p1", reason="friday deploy", severity="low", auth=BOB).ok
    assert session.vote("p1", "APPROVE", auth=ALICE).ok
    assert session.vote("p1", "approve", auth=BOB).ok
    ack = session.commit(action="deployment.approved", authority_scope="release", reason="all approve")
    assert ack.ok and ack.session_state == RESOLVED

    md = raw_metadata(session.session_id)
    assert md.state == RESOLVED
    assert md.initiator == "coordinator"
    assert list(md.participants) == ["coordinator", "alice", "bob"]
    assert (md.mode_version, md.configuration_version, md.policy_version) == (
        "1.0.0", "config.default", "policy.default")
    counts = {a.participant_id: a.message_count for a in md.participant_activity}
    assert counts == {"coordinator": 2, "alice": 2, "bob": 2}
    assert session.metadata(auth=BOB).metadata.state == RESOLVED

    # the SDK's own projection followed the accepted messages
    projection = session.decision_projection
    assert set(projection.proposals) == {"p1"}
    assert projection.is_committed
    assert projection.is_positive_outcome is True


def test_sdk_surfaces_runtime_rejections(client, raw_metadata, protocol_profile):
    reasons = protocol_profile != "v0.4.0"   # issue 15: `current` says why; v0.4.0 is the reference's text
    session = started(client, participants=("alice", "bob"))  # coordinator does not participate
    with pytest.raises(MacpAckError) as info:
        session.propose("p1", "deploy v2")
    forbidden = "Forbidden: 'coordinator' may not send Proposal" if reasons else "Forbidden"
    assert (info.value.failure.code, info.value.failure.message) == ("FORBIDDEN", forbidden)
    assert str(info.value) == f"FORBIDDEN: {forbidden}"    # the SDK's exception shows the text

    with pytest.raises(MacpAckError) as info:
        session.commit(action="deployment.approved", authority_scope="release", reason="too early")
    assert (info.value.failure.code, info.value.failure.message.partition(":")[0]) == ("INVALID_ENVELOPE", "InvalidPayload")
    if reasons:
        assert info.value.failure.message == "InvalidPayload: Commitment is not accepted in phase Proposal"

    assert session.propose("p1", "deploy v2", auth=ALICE).ok
    with pytest.raises(MacpAckError) as info:
        session.commit(action="deployment.approved", authority_scope="release", reason="x", auth=ALICE)
    assert info.value.failure.code == "FORBIDDEN"

    # the SDK validates vote values before they reach the wire
    with pytest.raises(MacpSessionError):
        session.vote("p1", "yes", auth=BOB)
    assert raw_metadata(session.session_id).state == OPEN
    assert session.commit(action="decision.selected", authority_scope="release", reason="ok").session_state \
        == RESOLVED


def test_sdk_resend_is_a_duplicate_and_cancel_works(client, raw_metadata):
    session = started(client)
    env = session._propose_envelope("p1", "deploy v2")
    first = client.send(env)
    again = client.send(env)
    assert first.ok and not first.duplicate
    assert again.ok and again.duplicate and again.session_state == OPEN

    ack = session.cancel(reason="changed our minds")
    assert ack.ok and ack.session_state == CANCELLED
    assert raw_metadata(session.session_id).state == CANCELLED
