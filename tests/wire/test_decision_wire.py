"""Decision mode (macp.mode.decision.v1) over the wire: the happy path and every reject path.

Spec: modes.md §0–§2 (authorisation, phases, payload checks, Commitment contract §1.2–§1.4) and
runtime.md §2.3 (Ack shapes), §5.3 (SessionMetadata), §5.4 (message processing).

Every rejection is asserted in full: ok=false, duplicate=false, session_state=UNSPECIFIED, the wire
code and the display name, and the echoed session/message ids.
"""
from __future__ import annotations

import math
import time
import uuid
from typing import NamedTuple

import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

MODE = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED

COORD = "coordinator"
PARTICIPANTS = ("alice", "bob", "carol")


class Sent(NamedTuple):
    env: envelope_pb2.Envelope
    ack: envelope_pb2.Ack


class DecisionSession:
    """A fresh Decision session on the shared server; helpers return (envelope, ack)."""

    def __init__(self, stub, participants=PARTICIPANTS, initiator=COORD, **start_fields):
        self.stub = stub
        self.sid = new_session_id()
        self.initiator = initiator
        self.start = self.send(initiator, "SessionStart", start_payload(participants, **start_fields))
        assert self.start.ack.ok, self.start.ack

    def send(self, sender, message_type, payload=b"", message_id=None, **fields) -> Sent:
        env = envelope(MODE, message_type, self.sid, sender, payload, message_id=message_id, **fields)
        return Sent(env, send(self.stub, env))

    def proposal(self, sender="alice", proposal_id="p1", option="deploy v2", **kw) -> Sent:
        return self.send(sender, "Proposal",
                         decision_pb2.ProposalPayload(proposal_id=proposal_id, option=option,
                                                      rationale="because"), **kw)

    def evaluation(self, sender="bob", proposal_id="p1", recommendation="APPROVE", confidence=0.9, **kw) -> Sent:
        return self.send(sender, "Evaluation",
                         decision_pb2.EvaluationPayload(proposal_id=proposal_id, recommendation=recommendation,
                                                        confidence=confidence, reason="looks fine"), **kw)

    def objection(self, sender="carol", proposal_id="p1", severity="high", **kw) -> Sent:
        return self.send(sender, "Objection",
                         decision_pb2.ObjectionPayload(proposal_id=proposal_id, reason="risky", severity=severity),
                         **kw)

    def vote(self, sender="alice", proposal_id="p1", vote="APPROVE", **kw) -> Sent:
        return self.send(sender, "Vote", decision_pb2.VotePayload(proposal_id=proposal_id, vote=vote, reason="ok"),
                         **kw)

    def commit(self, sender=None, payload=None, **commitment_fields) -> Sent:
        if payload is None:
            payload = commitment(**commitment_fields)
        return self.send(sender or self.initiator, "Commitment", payload)

    def metadata(self, as_sender=None) -> core_pb2.SessionMetadata:
        return self.stub.GetSession(core_pb2.GetSessionRequest(session_id=self.sid),
                                    metadata=bearer(as_sender or self.initiator)).metadata


def assert_ok(sent: Sent, state=OPEN) -> None:
    ack = sent.ack
    assert ack.ok, ack
    assert not ack.duplicate
    assert ack.session_state == state
    assert ack.message_id == sent.env.message_id
    assert ack.session_id == sent.env.session_id
    assert not ack.HasField("error")


def assert_rejected(sent: Sent, code: str, message: str) -> None:
    ack, env = sent.ack, sent.env
    assert not ack.ok, ack
    assert not ack.duplicate
    assert ack.session_state == envelope_pb2.SESSION_STATE_UNSPECIFIED
    assert ack.error.code == code, ack
    assert ack.error.message == message, ack
    assert ack.message_id == env.message_id
    assert ack.session_id == env.session_id
    assert ack.error.message_id == env.message_id
    assert ack.error.session_id == env.session_id
    assert ack.error.details == b""   # v0.4.0: the reference's (the current profile says why)
    assert ack.accepted_at_unix_ms > 0


def invalid_payload(sent: Sent) -> None:
    assert_rejected(sent, "INVALID_ENVELOPE", "InvalidPayload")


def forbidden(sent: Sent) -> None:
    assert_rejected(sent, "FORBIDDEN", "Forbidden")


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


@pytest.fixture
def session(stub):
    return DecisionSession(stub)


@pytest.fixture
def with_proposal(session):
    assert_ok(session.proposal())
    return session


@pytest.fixture
def voting(with_proposal):
    assert_ok(with_proposal.vote("alice"))
    return with_proposal


# --- happy path -------------------------------------------------------------------------------------

def test_happy_path_resolves_and_metadata_is_exact(stub):
    before = int(time.time() * 1000)
    s = DecisionSession(stub, participants=["alice", "bob", "carol"], ttl_ms=120_000, context_id="ctx-42",
                        extensions={"x.trace": b"1", "x.team": b"infra"})
    assert_ok(s.start)
    assert_ok(s.proposal("alice", "p1", "deploy v2"))
    assert_ok(s.proposal("bob", "p2", "wait a week"))
    assert_ok(s.evaluation("bob", "p1", "APPROVE", 0.94))
    assert_ok(s.evaluation("carol", "p2", "REVIEW", 0.5))
    assert_ok(s.objection("carol", "p2", "low"))
    assert_ok(s.vote("alice", "p1", "APPROVE"))
    assert_ok(s.vote("bob", "p1", "APPROVE"), OPEN)
    assert_ok(s.vote("carol", "p1", "REJECT"))
    assert_ok(s.vote("carol", "p2", "ABSTAIN"))
    assert_ok(s.commit(action="deployment.approved", outcome_positive=True), RESOLVED)
    after = int(time.time() * 1000)

    for reader in (COORD, "alice", "carol"):
        md = s.metadata(reader)
        assert md.session_id == s.sid
        assert md.mode == MODE
        assert md.state == RESOLVED
        assert before <= md.started_at_unix_ms <= after
        # Live deadline = SessionStart envelope timestamp + ttl_ms (§5.2 step 11).
        assert md.expires_at_unix_ms == s.start.env.timestamp_unix_ms + 120_000
        assert md.mode_version == "1.0.0"
        assert md.configuration_version == "config.default"
        assert md.policy_version == "policy.default"
        assert list(md.participants) == ["alice", "bob", "carol"]
        assert md.initiator == COORD
        assert md.context_id == "ctx-42"
        assert sorted(md.extension_keys) == ["x.team", "x.trace"]
        activity = {a.participant_id: a for a in md.participant_activity}
        # SessionStart is not counted; the initiator counts for its Commitment.
        assert {k: v.message_count for k, v in activity.items()} == {"alice": 2, "bob": 3, "carol": 4, COORD: 1}
        for a in activity.values():
            assert md.started_at_unix_ms <= a.last_message_at_unix_ms <= after
        assert activity[COORD].last_message_at_unix_ms >= max(
            activity[p].last_message_at_unix_ms for p in ("alice", "bob", "carol"))


def test_commitment_needs_no_votes(with_proposal):
    # §2.6: votes are not required by the mode itself; evaluations neither.
    assert_ok(with_proposal.commit(action="decision.selected"), RESOLVED)


def test_initiator_may_also_be_a_participant(stub):
    s = DecisionSession(stub, participants=[COORD, "alice"])
    assert_ok(s.proposal(COORD))
    assert_ok(s.vote(COORD))
    assert_ok(s.vote("alice"))
    assert_ok(s.commit(action="deployment.approved"), RESOLVED)


def test_accepted_values_are_case_free(with_proposal):
    s = with_proposal
    assert_ok(s.evaluation("bob", recommendation="approve"))
    assert_ok(s.evaluation("bob", recommendation="Review", confidence=0.0))
    assert_ok(s.evaluation("carol", recommendation="bLoCk", confidence=1.0))
    assert_ok(s.evaluation("carol", recommendation="reject"))
    assert_ok(s.objection("alice", severity="CRITICAL"))
    assert_ok(s.objection("alice", severity="Medium"))
    assert_ok(s.objection("alice", severity=""))  # empty means medium
    assert_ok(s.vote("alice", vote="approve"))
    assert_ok(s.vote("bob", vote="Reject"))
    assert_ok(s.vote("carol", vote="abstain"))


def test_nan_confidence_is_not_rejected(with_proposal):
    # modes.md §2.5: only confidence < 0 or > 1 is refused; NaN passes both comparisons.
    assert_ok(with_proposal.evaluation(confidence=math.nan))


def test_evaluations_and_objections_are_unlimited(with_proposal):
    for _ in range(3):
        assert_ok(with_proposal.evaluation("bob"))
        assert_ok(with_proposal.objection("bob", severity="low"))


def test_vote_on_another_proposal_is_fine(session):
    # Votes are per (proposal, sender). Both proposals must exist before the first vote closes proposals.
    assert_ok(session.proposal("alice", "p1"))
    assert_ok(session.proposal("bob", "p2"))
    assert_ok(session.vote("alice", "p1"))
    assert_ok(session.vote("alice", "p2", "REJECT"))
    invalid_payload(session.vote("alice", "p2", "APPROVE"))


# --- authorisation (§2.3) -----------------------------------------------------------------------

@pytest.mark.parametrize("message_type", ["Proposal", "Evaluation", "Objection", "Vote"])
def test_non_participant_is_forbidden(with_proposal, message_type):
    s = with_proposal
    payloads = {
        "Proposal": decision_pb2.ProposalPayload(proposal_id="p9", option="x"),
        "Evaluation": decision_pb2.EvaluationPayload(proposal_id="p1", recommendation="APPROVE", confidence=0.5),
        "Objection": decision_pb2.ObjectionPayload(proposal_id="p1", reason="r", severity="low"),
        "Vote": decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"),
    }
    forbidden(s.send("mallory", message_type, payloads[message_type]))
    # The initiator is not a declared participant either (runtime.md §12: the reference's example).
    forbidden(s.send(COORD, message_type, payloads[message_type]))


def test_authorisation_precedes_payload_checks(session):
    # Garbage payload and wrong phase, but the sender check comes first.
    forbidden(session.send("mallory", "Vote", b"\xff\xff\xff"))


@pytest.mark.parametrize("message_type", ["Foo", "proposal", "VOTE", "SessionCancel", "TtlExpired", "Withdraw"])
def test_unknown_message_type_is_forbidden_even_for_participants(with_proposal, message_type):
    forbidden(with_proposal.send("alice", message_type, b""))
    forbidden(with_proposal.send(COORD, message_type, b""))


# --- Proposal (§2.5) ---------------------------------------------------------------------------

def test_proposal_in_voting_phase(voting):
    invalid_payload(voting.proposal("bob", "p2"))


@pytest.mark.parametrize("proposal_id,option", [("", "x"), ("  ", "x"), ("p1", ""), ("p1", " \t\n"),
                                                ("\u3000", "x")])
def test_proposal_blank_fields(session, proposal_id, option):
    invalid_payload(session.proposal("alice", proposal_id, option))


def test_proposal_undecodable_payload(session):
    invalid_payload(session.send("alice", "Proposal", b"\xff\xff\xff"))
    invalid_payload(session.send("alice", "Proposal", bytes([0x0A, 0x01, 0xFF])))  # invalid UTF-8 string


def test_duplicate_proposal_id(with_proposal):
    invalid_payload(with_proposal.proposal("bob", "p1", "other option"))
    # ids are compared exactly: a different case is a different proposal
    assert_ok(with_proposal.proposal("bob", "P1", "other option"))


def test_empty_payload_proposal_is_blank(session):
    # An empty payload decodes to all defaults, so the fields are blank.
    invalid_payload(session.send("alice", "Proposal", b""))


# --- Evaluation --------------------------------------------------------------------------------

def test_evaluation_before_any_proposal(session):
    invalid_payload(session.evaluation("bob", "p1"))


@pytest.mark.parametrize("recommendation", ["", "MAYBE", "APPROVED", " approve", "approve ", "yes"])
def test_evaluation_bad_recommendation(with_proposal, recommendation):
    invalid_payload(with_proposal.evaluation(recommendation=recommendation))


@pytest.mark.parametrize("confidence", [-0.0001, -1.0, 1.0001, 2.0, math.inf, -math.inf])
def test_evaluation_confidence_out_of_range(with_proposal, confidence):
    invalid_payload(with_proposal.evaluation(confidence=confidence))


def test_evaluation_unknown_proposal(with_proposal):
    invalid_payload(with_proposal.evaluation(proposal_id="p2"))


def test_evaluation_after_first_vote(voting):
    invalid_payload(voting.evaluation("bob"))


# --- Objection ---------------------------------------------------------------------------------

@pytest.mark.parametrize("severity", ["urgent", "blocker", " high", "high ", "none"])
def test_objection_bad_severity(with_proposal, severity):
    invalid_payload(with_proposal.objection(severity=severity))


def test_objection_before_proposal_and_after_vote(session):
    invalid_payload(session.objection())
    assert_ok(session.proposal())
    invalid_payload(session.objection(proposal_id="nope"))
    assert_ok(session.vote())
    invalid_payload(session.objection())


# --- Vote --------------------------------------------------------------------------------------

@pytest.mark.parametrize("vote", ["yes", "no", "", "APPROVED", " approve", "approve "])
def test_vote_bad_value(with_proposal, vote):
    invalid_payload(with_proposal.vote(vote=vote))


def test_vote_before_any_proposal(session):
    invalid_payload(session.vote())


def test_vote_on_unknown_proposal(with_proposal):
    invalid_payload(with_proposal.vote(proposal_id="p2"))


def test_second_vote_same_sender_same_proposal(voting):
    invalid_payload(voting.vote("alice", vote="APPROVE"))
    invalid_payload(voting.vote("alice", vote="REJECT"))  # no change of vote either
    assert_ok(voting.vote("bob"))  # other senders are unaffected


# --- Commitment authority (§1.2) ---------------------------------------------------------------

@pytest.mark.parametrize("sender", ["alice", "mallory"])
def test_commitment_from_non_initiator(with_proposal, sender):
    forbidden(with_proposal.commit(sender=sender, action="deployment.approved"))
    # Authorisation comes before decoding: a garbage payload is still FORBIDDEN.
    forbidden(with_proposal.commit(sender=sender, payload=b"\xff\xff\xff"))


def test_commitment_before_any_proposal(session):
    invalid_payload(session.commit(action="deployment.approved"))


def test_commitment_garbage_payload_from_initiator(with_proposal):
    invalid_payload(with_proposal.commit(payload=b"\xff\xff\xff"))
    invalid_payload(with_proposal.commit(payload=b""))  # all fields blank


# --- Commitment contract (§1.3) ----------------------------------------------------------------

@pytest.mark.parametrize("field", ["commitment_id", "action", "authority_scope", "reason"])
@pytest.mark.parametrize("value", ["", "  "])
def test_commitment_blank_fields(with_proposal, field, value):
    fields = {"action": "deployment.approved", field: value}
    invalid_payload(with_proposal.commit(**fields))


@pytest.mark.parametrize("field,value", [
    ("mode_version", "1.0.1"), ("mode_version", ""), ("mode_version", "1.0.0 "),
    ("configuration_version", "config.other"), ("configuration_version", ""),
    ("policy_version", "policy.other"), ("policy_version", ""), ("policy_version", "Policy.Default"),
])
def test_commitment_version_mismatch(with_proposal, field, value):
    invalid_payload(with_proposal.commit(action="deployment.approved", **{field: value}))


def test_commitment_custom_configuration_version_must_match(stub):
    s = DecisionSession(stub, configuration_version="cfg-7")
    assert_ok(s.proposal())
    invalid_payload(s.commit(action="deployment.approved"))  # helper default is config.default
    assert_ok(s.commit(action="deployment.approved", configuration_version="cfg-7"), RESOLVED)


def test_empty_policy_version_binds_policy_default(stub):
    s = DecisionSession(stub, policy_version="")
    assert s.metadata().policy_version == "policy.default"
    assert_ok(s.proposal())
    # The session stores the resolved id, so an empty policy_version in the Commitment is refused.
    invalid_payload(s.commit(action="deployment.approved", policy_version=""))
    assert_ok(s.commit(action="deployment.approved", policy_version="policy.default"), RESOLVED)


@pytest.mark.parametrize("ref", [
    core_pb2.CommitmentRef(),
    core_pb2.CommitmentRef(session_id="s-1"),
    core_pb2.CommitmentRef(commitment_hash="sha256:" + "0" * 64),
    core_pb2.CommitmentRef(session_id=" ", commitment_hash="sha256:" + "0" * 64),
    core_pb2.CommitmentRef(session_id="s-1", commitment_hash="\t"),
])
def test_commitment_supersedes_with_blank_fields(with_proposal, ref):
    payload = commitment(action="deployment.approved")
    payload.supersedes.CopyFrom(ref)
    assert payload.HasField("supersedes")
    invalid_payload(with_proposal.commit(payload=payload))


def test_commitment_supersedes_complete_is_accepted_without_lookup(with_proposal):
    payload = commitment(action="deployment.approved",
                         supersedes=core_pb2.CommitmentRef(session_id="never-existed", commitment_hash="whatever"))
    assert_ok(with_proposal.commit(payload=payload), RESOLVED)


# --- outcome_positive (§1.4) -------------------------------------------------------------------

@pytest.mark.parametrize("action,positive", [
    ("deployment.rejected", True), ("deployment.failed", True), ("deployment.declined", True),
    ("deployment.approved", False), ("decision.selected", False), ("offer.accepted", False),
    ("task.completed", False), ("unapproved", False), ("deployment.unapproved", False),
])
def test_outcome_positive_inconsistent_with_action(with_proposal, action, positive):
    invalid_payload(with_proposal.commit(action=action, outcome_positive=positive))


@pytest.mark.parametrize("action,positive", [
    ("deployment.rejected", False), ("deployment.approved", True), ("unapproved", True),
    ("decision.go", True), ("decision.go", False), ("deployment.Approved", False),
    ("deployment.approved ", False),
])
def test_outcome_positive_consistent_is_accepted(stub, action, positive):
    s = DecisionSession(stub)
    assert_ok(s.proposal())
    assert_ok(s.commit(action=action, outcome_positive=positive), RESOLVED)


# --- after resolution --------------------------------------------------------------------------

def test_messages_after_resolved_are_session_not_open(with_proposal):
    s = with_proposal
    assert_ok(s.commit(action="deployment.approved"), RESOLVED)
    assert_rejected(s.vote("alice"), "SESSION_NOT_OPEN", "SessionNotOpen")
    assert_rejected(s.proposal("bob", "p2"), "SESSION_NOT_OPEN", "SessionNotOpen")
    assert_rejected(s.commit(action="deployment.approved", commitment_id="c2"), "SESSION_NOT_OPEN",
                    "SessionNotOpen")
    # State checks come before the mode's authorisation: even outsiders and unknown types get this.
    assert_rejected(s.send("mallory", "Foo", b"\xff"), "SESSION_NOT_OPEN", "SessionNotOpen")
    assert s.metadata().state == RESOLVED


# --- rejected messages change nothing ----------------------------------------------------------

def test_rejected_message_id_can_be_reused(with_proposal):
    s = with_proposal
    mid = str(uuid.uuid4())
    invalid_payload(s.vote("alice", vote="yes", message_id=mid))
    forbidden(s.vote("mallory", message_id=mid))
    ok = s.vote("alice", vote="APPROVE", message_id=mid)
    assert_ok(ok)
    dup = s.vote("alice", vote="APPROVE", message_id=mid)
    assert dup.ack.ok and dup.ack.duplicate and dup.ack.session_state == OPEN
    # the accepted vote counted once; the rejected attempts did not consume alice's vote
    invalid_payload(s.vote("alice"))


def test_rejected_message_does_not_change_phase_or_activity(session):
    invalid_payload(session.vote("alice"))
    invalid_payload(session.evaluation("bob"))
    md = session.metadata()
    assert list(md.participant_activity) == []
    # Still in phase Proposal: a proposal is accepted, and evaluation now works.
    assert_ok(session.proposal())
    assert_ok(session.evaluation("bob"))
    counts = {a.participant_id: a.message_count for a in session.metadata().participant_activity}
    assert counts == {"alice": 1, "bob": 1}
