"""Proposal, Task, Handoff, Quorum and Multi-round modes over the wire: happy paths and reject paths.

Spec: modes.md §0.1 (error codes), §1 (Commitment contract), §3–§7 (the modes), §9.1 (descriptors).
Every rejection asserts the exact Ack: ok=false, duplicate=false, session_state=UNSPECIFIED, the wire
code and display name, and the echoed ids. Decision mode has its own file (test_decision_wire.py).
Behaviour that needs a non-default policy is tested in-process (test_modes_inprocess.py) until
RegisterPolicy exists.
"""
from __future__ import annotations

import json
from typing import NamedTuple

import grpc
import pytest
from macp.modes.handoff.v1 import handoff_pb2
from macp.modes.proposal.v1 import proposal_pb2
from macp.modes.quorum.v1 import quorum_pb2
from macp.modes.task.v1 import task_pb2
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
UNSPECIFIED = envelope_pb2.SESSION_STATE_UNSPECIFIED

PROPOSAL = "macp.mode.proposal.v1"
TASK = "macp.mode.task.v1"
HANDOFF = "macp.mode.handoff.v1"
QUORUM = "macp.mode.quorum.v1"
MULTI_ROUND = "ext.multi_round.v1"


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


class Sent(NamedTuple):
    env: envelope_pb2.Envelope
    ack: envelope_pb2.Ack


class Session:
    """A fresh session of `mode` on the shared server."""

    def __init__(self, stub, mode, participants, initiator, **start_fields):
        self.stub = stub
        self.mode = mode
        self.sid = new_session_id()
        self.initiator = initiator
        self.start = self.send(initiator, "SessionStart", start_payload(participants, **start_fields))

    def send(self, sender, message_type, payload=b"", **fields) -> Sent:
        env = envelope(self.mode, message_type, self.sid, sender, payload, **fields)
        return Sent(env, send(self.stub, env))

    def commit(self, sender=None, payload=None, **fields) -> Sent:
        if payload is None:
            payload = commitment(**fields)
        return self.send(sender or self.initiator, "Commitment", payload)

    def state(self) -> int:
        return self.stub.GetSession(core_pb2.GetSessionRequest(session_id=self.sid),
                                    metadata=bearer(self.initiator)).metadata.state


def started(stub, mode, participants, initiator, **fields) -> Session:
    s = Session(stub, mode, participants, initiator, **fields)
    assert s.start.ack.ok, s.start.ack
    return s


def assert_ok(sent: Sent, state=OPEN) -> None:
    ack = sent.ack
    assert ack.ok, ack
    assert not ack.duplicate
    assert ack.session_state == state
    assert ack.message_id == sent.env.message_id and ack.session_id == sent.env.session_id


def assert_rejected(sent: Sent, code: str, message: str, details: bytes = b"") -> None:
    ack = sent.ack
    assert not ack.ok, f"{sent.env.message_type} was accepted"
    assert not ack.duplicate
    assert ack.session_state == UNSPECIFIED
    assert (ack.error.code, ack.error.message) == (code, message), ack.error
    assert ack.error.details == details
    assert ack.error.session_id == sent.env.session_id
    assert ack.error.message_id == sent.env.message_id


def invalid(sent: Sent) -> None:
    assert_rejected(sent, "INVALID_ENVELOPE", "InvalidPayload")


def forbidden(sent: Sent) -> None:
    assert_rejected(sent, "FORBIDDEN", "Forbidden")


def denied(sent: Sent, *reasons: str) -> None:
    assert_rejected(sent, "POLICY_DENIED", "PolicyDenied",
                    json.dumps({"reasons": list(reasons)}, separators=(",", ":")).encode())


GARBAGE = b"\xff\xff\xff"   # not a decodable protobuf message


# ==================================================================================================
# Descriptors (§9.1)
# ==================================================================================================

EXPECTED_DESCRIPTORS = {
    PROPOSAL: ("Proposal Mode",
               "Negotiation with proposals, counterproposals, accepts, rejects, withdrawals, and a terminal "
               "Commitment.",
               "semantic-deterministic", "peer",
               ["SessionStart", "Proposal", "CounterProposal", "Accept", "Reject", "Withdraw", "Commitment"]),
    TASK: ("Task Mode",
           "One bounded delegated task with assignee responses, progress, completion/failure reports, and a terminal "
           "Commitment.",
           "structural-only", "orchestrated",
           ["SessionStart", "TaskRequest", "TaskAccept", "TaskReject", "TaskUpdate", "TaskComplete", "TaskFail",
            "Commitment"]),
    HANDOFF: ("Handoff Mode",
              "Scoped responsibility transfer with handoff offers, context, target responses, and a terminal "
              "Commitment.",
              "context-frozen", "delegated",
              ["SessionStart", "HandoffOffer", "HandoffContext", "HandoffAccept", "HandoffDecline", "Commitment"]),
    QUORUM: ("Quorum Mode",
             "Threshold approval with one approval request, participant ballots, and a terminal Commitment.",
             "semantic-deterministic", "quorum",
             ["SessionStart", "ApprovalRequest", "Approve", "Reject", "Abstain", "Commitment"]),
    MULTI_ROUND: ("Multi-Round Mode",
                  "Iterative convergence through multiple contribution rounds until all participants agree, with a "
                  "terminal Commitment.",
                  "semantic-deterministic", "peer", ["SessionStart", "Contribute", "Commitment"]),
}


def _check_descriptor(d) -> None:
    title, description, determinism, participant_model, types = EXPECTED_DESCRIPTORS[d.mode]
    assert d.mode_version == "1.0.0"
    assert d.title == title
    assert d.description == description
    assert d.determinism_class == determinism
    assert d.participant_model == participant_model
    assert list(d.message_types) == types
    assert list(d.terminal_message_types) == ["Commitment"]
    assert dict(d.schema_uris) == {"protobuf": "buf.build/multiagentcoordinationprotocol/macp"}


def test_list_modes_standard_descriptors(stub):
    modes = stub.ListModes(core_pb2.ListModesRequest()).modes
    assert [d.mode for d in modes][:5] == ["macp.mode.decision.v1", PROPOSAL, TASK, HANDOFF, QUORUM]
    for d in modes[1:5]:
        _check_descriptor(d)
    assert MULTI_ROUND not in [d.mode for d in modes]


def test_list_ext_modes_multi_round_descriptor(stub):
    try:
        modes = stub.ListExtModes(core_pb2.ListExtModesRequest()).modes
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip("ListExtModes is not implemented yet (descriptor checked in-process)")
        raise
    by_name = {d.mode: d for d in modes}
    _check_descriptor(by_name[MULTI_ROUND])


def test_all_modes_are_supported(stub):
    resp = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]))
    for mode in (PROPOSAL, TASK, HANDOFF, QUORUM, MULTI_ROUND):
        assert mode in resp.supported_modes


# ==================================================================================================
# Shared Commitment behaviour (§1.2–§1.4) for the five modes, driven to a ready state
# ==================================================================================================

def ready_proposal(stub):
    s = started(stub, PROPOSAL, ["buyer", "seller"], "buyer")
    assert_ok(s.send("seller", "Proposal", proposal_pb2.ProposalPayload(proposal_id="p1", title="offer")))
    for who in ("buyer", "seller"):
        assert_ok(s.send(who, "Accept", proposal_pb2.AcceptPayload(proposal_id="p1")))
    return s, "proposal.accepted", "seller"


def ready_task(stub):
    s = started(stub, TASK, ["planner", "worker"], "planner")
    assert_ok(s.send("planner", "TaskRequest", task_pb2.TaskRequestPayload(task_id="t1", title="build")))
    assert_ok(s.send("worker", "TaskAccept", task_pb2.TaskAcceptPayload(task_id="t1")))
    assert_ok(s.send("worker", "TaskComplete", task_pb2.TaskCompletePayload(task_id="t1", output=b"x")))
    return s, "task.completed", "worker"


def ready_handoff(stub):
    s = started(stub, HANDOFF, ["owner", "target"], "owner")
    assert_ok(s.send("owner", "HandoffOffer", handoff_pb2.HandoffOfferPayload(handoff_id="h1",
                                                                              target_participant="target")))
    assert_ok(s.send("target", "HandoffAccept", handoff_pb2.HandoffAcceptPayload(handoff_id="h1")))
    return s, "handoff.accepted", "target"


def ready_quorum(stub):
    s = started(stub, QUORUM, ["alice", "bob", "carol"], "coordinator")
    assert_ok(s.send("coordinator", "ApprovalRequest",
                     quorum_pb2.ApprovalRequestPayload(request_id="r1", action="deploy", required_approvals=1)))
    assert_ok(s.send("alice", "Approve", quorum_pb2.ApprovePayload(request_id="r1")))
    return s, "quorum.approved", "alice"


def ready_multi_round(stub):
    s = started(stub, MULTI_ROUND, ["alice", "bob"], "coordinator")
    for who in ("alice", "bob"):
        assert_ok(s.send(who, "Contribute", b'{"value":"a"}'))
    return s, "multi_round.converged", "alice"


READY = {PROPOSAL: ready_proposal, TASK: ready_task, HANDOFF: ready_handoff, QUORUM: ready_quorum,
         MULTI_ROUND: ready_multi_round}
ALL_MODES = list(READY)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_commitment_from_a_participant_is_forbidden_even_with_garbage(stub, mode):
    s, action, participant = READY[mode](stub)
    forbidden(s.commit(participant, action=action))
    forbidden(s.commit(participant, payload=GARBAGE))
    forbidden(s.commit("outsider", action=action))
    assert s.state() == OPEN


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("payload", [
    GARBAGE,
    commitment(commitment_id=" "),
    commitment(reason=""),
    commitment(authority_scope="\t"),
    commitment(action=" "),
    commitment(mode_version="1.0.1"),
    commitment(configuration_version="other"),
    commitment(policy_version=""),                       # §11.1: the session bound policy.default
    commitment(supersedes=core_pb2.CommitmentRef()),     # present but empty
    commitment(supersedes=core_pb2.CommitmentRef(session_id="s", commitment_hash=" ")),
], ids=["garbage", "blank-id", "empty-reason", "blank-scope", "blank-action", "mode-version", "config-version",
        "empty-policy-version", "empty-supersedes", "blank-hash"])
def test_commitment_contract_violations(stub, mode, payload):
    s, _, _ = READY[mode](stub)
    invalid(s.commit(payload=payload))
    assert s.state() == OPEN


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("action,positive", [
    ("x.rejected", True), ("x.failed", True), ("x.declined", True),
    ("x.selected", False), ("x.accepted", False), ("x.completed", False), ("x.approved", False),
    ("unapproved", False),
])
def test_commitment_outcome_sign_mismatch(stub, mode, action, positive):
    s, _, _ = READY[mode](stub)
    invalid(s.commit(action=action, outcome_positive=positive))


@pytest.mark.parametrize("mode", ALL_MODES)
@pytest.mark.parametrize("action,positive", [("x.rejected", False), ("Task.Failed", True), ("other", False),
                                             ("other", True)])
def test_commitment_outcome_sign_accepted(stub, mode, action, positive):
    s, _, _ = READY[mode](stub)
    assert_ok(s.commit(action=action, outcome_positive=positive, supersedes=core_pb2.CommitmentRef(
        session_id="earlier", commitment_hash="abc")), state=RESOLVED)
    assert s.state() == RESOLVED


@pytest.mark.parametrize("mode", ALL_MODES)
def test_messages_after_resolution_are_session_not_open(stub, mode):
    s, action, participant = READY[mode](stub)
    assert_ok(s.commit(action=action), state=RESOLVED)
    assert_rejected(s.commit(action=action), "SESSION_NOT_OPEN", "SessionNotOpen")
    assert_rejected(s.send(participant, "Whatever", b""), "SESSION_NOT_OPEN", "SessionNotOpen")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_unknown_message_type(stub, mode):
    """§11.3: FORBIDDEN for non-participants, INVALID_ENVELOPE for participants."""
    s, _, participant = READY[mode](stub)
    forbidden(s.send("outsider", "Vote", b""))
    invalid(s.send(participant, "Vote", b""))
    invalid(s.send(participant, "commitment", b""))
    invalid(s.send(participant, "SessionStartX", b""))


# ==================================================================================================
# Proposal mode (§3)
# ==================================================================================================

def prop(pid="p1", title="offer", **kw):
    return proposal_pb2.ProposalPayload(proposal_id=pid, title=title, summary="terms", **kw)


def counter(pid, supersedes, **kw):
    return proposal_pb2.CounterProposalPayload(proposal_id=pid, supersedes_proposal_id=supersedes, title="ctr", **kw)


def accept(pid="p1"):
    return proposal_pb2.AcceptPayload(proposal_id=pid, reason="ok")


def reject(pid="p1", terminal=False):
    return proposal_pb2.RejectPayload(proposal_id=pid, terminal=terminal, reason="no")


def withdraw(pid="p1"):
    return proposal_pb2.WithdrawPayload(proposal_id=pid, reason="changed mind")


def proposal_session(stub, participants=("buyer", "seller"), initiator="buyer"):
    return started(stub, PROPOSAL, list(participants), initiator)


def test_proposal_happy_path(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop(tags=["a", "b"], details=b"\x00\x01")))
    invalid(s.commit(action="proposal.accepted"))           # not converged yet
    assert_ok(s.send("buyer", "Accept", accept()))
    invalid(s.commit(action="proposal.accepted"))           # all_parties: the proposer must accept too
    assert_ok(s.send("seller", "Accept", accept()))
    assert_ok(s.commit(action="proposal.accepted"), state=RESOLVED)
    assert s.state() == RESOLVED


def test_proposal_session_start_rules(stub):
    # The initiator need not be a participant.
    s = proposal_session(stub, participants=("a", "b"), initiator="coordinator")
    forbidden(s.send("coordinator", "Proposal", prop()))
    assert_ok(s.send("a", "Proposal", prop()))
    assert_ok(s.send("a", "Accept", accept()))
    assert_ok(s.send("b", "Accept", accept()))
    assert_ok(s.commit(action="proposal.accepted"), state=RESOLVED)


def test_proposal_reject_paths(stub):
    s = proposal_session(stub)
    forbidden(s.send("outsider", "Proposal", prop()))
    invalid(s.send("seller", "Proposal", GARBAGE))
    invalid(s.send("seller", "Proposal", prop(pid="")))
    invalid(s.send("seller", "Proposal", prop(pid=" \t")))
    assert_ok(s.send("seller", "Proposal", prop(pid=" p1")))           # stored untrimmed
    assert_ok(s.send("seller", "Proposal", prop(pid="p1")))
    invalid(s.send("buyer", "Proposal", prop(pid="p1")))                # duplicate id, any sender
    # CounterProposal
    invalid(s.send("buyer", "CounterProposal", GARBAGE))
    invalid(s.send("buyer", "CounterProposal", counter("", "p1")))
    invalid(s.send("buyer", "CounterProposal", counter("p2", "")))
    invalid(s.send("buyer", "CounterProposal", counter("p2", " ")))
    invalid(s.send("buyer", "CounterProposal", counter("p1", "p1")))    # id already used
    invalid(s.send("buyer", "CounterProposal", counter("p2", "nope")))
    assert_ok(s.send("buyer", "CounterProposal", counter("p2", "p1")))
    invalid(s.send("seller", "Proposal", prop(pid="p2")))               # ids are shared with counter-proposals
    forbidden(s.send("outsider", "CounterProposal", counter("p3", "p1")))
    # Accept / Reject need a Live proposal
    invalid(s.send("buyer", "Accept", GARBAGE))
    invalid(s.send("buyer", "Accept", accept("nope")))
    invalid(s.send("buyer", "Reject", GARBAGE))
    invalid(s.send("buyer", "Reject", reject("nope")))
    forbidden(s.send("outsider", "Accept", accept("p1")))


def test_proposal_withdraw_paths(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop()))
    invalid(s.send("seller", "Withdraw", GARBAGE))
    invalid(s.send("seller", "Withdraw", withdraw(" ")))
    invalid(s.send("seller", "Withdraw", withdraw("nope")))
    forbidden(s.send("buyer", "Withdraw", withdraw("p1")))             # not the proposer
    forbidden(s.send("outsider", "Withdraw", withdraw("p1")))
    assert_ok(s.send("seller", "Withdraw", withdraw("p1")))
    forbidden(s.send("buyer", "Withdraw", withdraw("p1")))             # author check precedes "already withdrawn"
    invalid(s.send("seller", "Withdraw", withdraw("p1")))
    invalid(s.send("buyer", "Accept", accept("p1")))                   # no longer Live
    invalid(s.send("buyer", "Reject", reject("p1")))
    assert_ok(s.send("buyer", "CounterProposal", counter("p2", "p1")))   # a withdrawn target is fine


def test_proposal_convergence_does_not_lock(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop("p1")))
    assert_ok(s.send("buyer", "Accept", accept("p1")))
    assert_ok(s.send("seller", "Accept", accept("p1")))
    # Converged, but a new proposal and an accept of it move the phase back to Negotiating.
    assert_ok(s.send("buyer", "Proposal", prop("p2")))
    assert_ok(s.send("buyer", "Accept", accept("p2")))                 # overwrites buyer's accept of p1
    invalid(s.commit(action="proposal.accepted"))
    assert_ok(s.send("seller", "Accept", accept("p2")))
    assert_ok(s.send("seller", "Accept", accept("p2")))                # re-accepting is allowed
    assert_ok(s.commit(action="proposal.accepted"), state=RESOLVED)


def test_proposal_withdraw_undoes_convergence(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop("p1")))
    assert_ok(s.send("buyer", "Accept", accept("p1")))
    assert_ok(s.send("seller", "Accept", accept("p1")))
    assert_ok(s.send("seller", "Withdraw", withdraw("p1")))
    invalid(s.commit(action="proposal.accepted"))


def test_proposal_non_terminal_reject_does_not_make_ready(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop("p1")))
    assert_ok(s.send("buyer", "Reject", reject("p1")))
    assert_ok(s.send("buyer", "Reject", reject("p1")))                 # unlimited rejects
    invalid(s.commit(action="proposal.rejected", outcome_positive=False))


def test_proposal_terminal_reject_makes_ready(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop("p1")))
    assert_ok(s.send("buyer", "Reject", reject("p1", terminal=True)))
    # Either sign is accepted in TerminalRejected (only the suffix rule applies).
    assert_ok(s.commit(action="proposal.accepted"), state=RESOLVED)


def test_proposal_withdraw_clears_terminal_rejection(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop("p1")))
    assert_ok(s.send("buyer", "Reject", reject("p1", terminal=True)))
    assert_ok(s.send("seller", "Withdraw", withdraw("p1")))            # TerminalRejected -> Negotiating
    invalid(s.commit(action="proposal.rejected", outcome_positive=False))


def test_proposal_negative_commitment_when_converged(stub):
    s = proposal_session(stub)
    assert_ok(s.send("seller", "Proposal", prop("p1")))
    assert_ok(s.send("buyer", "Accept", accept("p1")))
    assert_ok(s.send("seller", "Accept", accept("p1")))
    assert_ok(s.commit(action="proposal.rejected", outcome_positive=False), state=RESOLVED)


def test_proposal_single_participant_all_parties(stub):
    s = proposal_session(stub, participants=("solo",), initiator="solo")
    assert_ok(s.send("solo", "Proposal", prop("p1")))
    invalid(s.commit(action="proposal.accepted"))
    assert_ok(s.send("solo", "Accept", accept("p1")))
    assert_ok(s.commit(action="proposal.accepted"), state=RESOLVED)


# ==================================================================================================
# Task mode (§4)
# ==================================================================================================

def req(task_id="t1", assignee="", **kw):
    return task_pb2.TaskRequestPayload(task_id=task_id, title="build", instructions="do it",
                                       requested_assignee=assignee, **kw)


def t_accept(task_id="t1", assignee=""):
    return task_pb2.TaskAcceptPayload(task_id=task_id, assignee=assignee, reason="ok")


def t_reject(task_id="t1", assignee=""):
    return task_pb2.TaskRejectPayload(task_id=task_id, assignee=assignee, reason="busy")


def t_update(task_id="t1", progress=0.5):
    return task_pb2.TaskUpdatePayload(task_id=task_id, status="running", progress=progress, message="half")


def t_complete(task_id="t1", assignee="", output=b"result"):
    return task_pb2.TaskCompletePayload(task_id=task_id, assignee=assignee, output=output, summary="done")


def t_fail(task_id="t1", assignee=""):
    return task_pb2.TaskFailPayload(task_id=task_id, assignee=assignee, error_code="E1", reason="broke",
                                    retryable=True)


def task_session(stub, participants=("planner", "worker", "helper"), initiator="planner"):
    return started(stub, TASK, list(participants), initiator)


NO_REASSIGN = "reassignment after rejection not allowed by policy"
ACTIVE_CANNOT_REJECT = "active assignee cannot reject without allow_reassignment_on_reject policy"


def test_task_happy_path(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req(assignee="worker", input=b"in", deadline_unix_ms=5)))
    assert_ok(s.send("worker", "TaskAccept", t_accept(assignee="worker")))
    assert_ok(s.send("worker", "TaskUpdate", t_update()))
    assert_ok(s.send("worker", "TaskUpdate", t_update(progress=7.0)))   # progress is not range-checked
    invalid(s.commit(action="task.completed"))                           # no terminal report yet
    assert_ok(s.send("worker", "TaskComplete", t_complete(assignee="worker")))
    assert_ok(s.commit(action="task.completed"), state=RESOLVED)
    assert s.state() == RESOLVED


@pytest.mark.parametrize("participants,initiator", [
    (["planner"], "planner"),                 # fewer than two participants
    (["worker", "helper"], "planner"),        # initiator not a participant
])
def test_task_session_start_rules(stub, participants, initiator):
    s = Session(stub, TASK, participants, initiator)
    assert_rejected(s.start, "INVALID_ENVELOPE", "InvalidPayload")


def test_task_request_paths(stub):
    s = task_session(stub)
    forbidden(s.send("worker", "TaskRequest", req()))
    forbidden(s.send("worker", "TaskRequest", GARBAGE))                 # authorisation precedes decoding
    forbidden(s.send("outsider", "TaskRequest", req()))
    invalid(s.send("planner", "TaskRequest", GARBAGE))
    invalid(s.send("planner", "TaskRequest", req(task_id="")))
    invalid(s.send("planner", "TaskRequest", req(assignee="outsider")))
    assert_ok(s.send("planner", "TaskRequest", req(task_id=" ")))       # only emptiness is checked
    invalid(s.send("planner", "TaskRequest", req(task_id="t2")))        # exactly one request


def test_task_messages_before_request(stub):
    s = task_session(stub)
    invalid(s.send("worker", "TaskAccept", t_accept()))
    invalid(s.send("worker", "TaskReject", t_reject()))
    invalid(s.send("worker", "TaskUpdate", t_update()))
    invalid(s.send("worker", "TaskComplete", t_complete()))
    invalid(s.send("worker", "TaskFail", t_fail()))
    invalid(s.commit(action="task.completed"))
    forbidden(s.send("outsider", "TaskAccept", t_accept()))


def test_task_accept_paths(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req(assignee="worker")))
    invalid(s.send("worker", "TaskAccept", GARBAGE))
    invalid(s.send("worker", "TaskAccept", t_accept(task_id="")))
    invalid(s.send("worker", "TaskAccept", t_accept(task_id="t2")))
    invalid(s.send("helper", "TaskAccept", t_accept(task_id="t2")))      # id mismatch precedes eligibility
    invalid(s.send("worker", "TaskAccept", t_accept(assignee="helper")))
    invalid(s.send("helper", "TaskAccept", t_accept(assignee="worker")))  # assignee field precedes eligibility
    forbidden(s.send("helper", "TaskAccept", t_accept()))                # not the requested assignee
    forbidden(s.send("planner", "TaskAccept", t_accept()))
    assert_ok(s.send("worker", "TaskAccept", t_accept()))
    invalid(s.send("worker", "TaskAccept", t_accept()))                  # an active assignee exists
    invalid(s.send("helper", "TaskAccept", t_accept()))


def test_task_eligibility_without_requested_assignee(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req()))
    forbidden(s.send("planner", "TaskAccept", t_accept()))               # the initiator is not eligible
    assert_ok(s.send("helper", "TaskAccept", t_accept()))                # first eligible accept wins
    invalid(s.send("worker", "TaskAccept", t_accept()))


def test_task_initiator_may_be_the_requested_assignee(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req(assignee="planner")))
    forbidden(s.send("worker", "TaskAccept", t_accept()))
    assert_ok(s.send("planner", "TaskAccept", t_accept()))
    assert_ok(s.send("planner", "TaskFail", t_fail()))
    assert_ok(s.commit(action="task.failed", outcome_positive=False), state=RESOLVED)


def test_task_reject_then_accept_is_policy_denied(stub):
    """§11.16: after any TaskReject nobody can accept under the default policy."""
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req()))
    assert_ok(s.send("worker", "TaskReject", t_reject(assignee="worker")))
    denied(s.send("helper", "TaskAccept", t_accept()), NO_REASSIGN)
    denied(s.send("planner", "TaskAccept", t_accept()), NO_REASSIGN)      # policy check precedes eligibility
    denied(s.send("helper", "TaskAccept", t_accept(assignee="worker")), NO_REASSIGN)  # ... and the assignee field
    invalid(s.send("helper", "TaskAccept", t_accept(task_id="t2")))
    invalid(s.send("worker", "TaskReject", t_reject()))                   # each sender rejects at most once
    assert_ok(s.send("helper", "TaskReject", t_reject()))
    invalid(s.commit(action="task.failed", outcome_positive=False))       # stuck: no report possible


def test_task_reject_paths(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req(assignee="worker")))
    invalid(s.send("worker", "TaskReject", GARBAGE))
    invalid(s.send("worker", "TaskReject", t_reject(task_id="")))
    invalid(s.send("worker", "TaskReject", t_reject(task_id="t9")))
    invalid(s.send("worker", "TaskReject", t_reject(assignee="helper")))
    invalid(s.send("helper", "TaskReject", t_reject(assignee="worker")))   # assignee field precedes eligibility
    forbidden(s.send("helper", "TaskReject", t_reject()))                 # not eligible (worker was requested)
    forbidden(s.send("planner", "TaskReject", t_reject()))
    assert_ok(s.send("worker", "TaskAccept", t_accept()))
    denied(s.send("worker", "TaskReject", t_reject()), ACTIVE_CANNOT_REJECT)
    denied(s.send("worker", "TaskReject", t_reject(assignee="helper")), ACTIVE_CANNOT_REJECT)
    invalid(s.send("helper", "TaskReject", t_reject()))                   # §11.16: non-active while assigned
    invalid(s.send("planner", "TaskReject", t_reject()))


def test_task_update_and_report_paths(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req(assignee="worker")))
    forbidden(s.send("worker", "TaskUpdate", t_update()))                 # no active assignee yet
    forbidden(s.send("worker", "TaskComplete", t_complete()))
    forbidden(s.send("worker", "TaskFail", t_fail()))
    assert_ok(s.send("worker", "TaskAccept", t_accept()))
    invalid(s.send("worker", "TaskUpdate", GARBAGE))
    invalid(s.send("worker", "TaskUpdate", t_update(task_id="")))
    invalid(s.send("helper", "TaskUpdate", t_update(task_id="t9")))       # id mismatch precedes authorship
    forbidden(s.send("helper", "TaskUpdate", t_update()))
    forbidden(s.send("planner", "TaskUpdate", t_update()))
    forbidden(s.send("outsider", "TaskUpdate", t_update()))
    invalid(s.send("worker", "TaskComplete", t_complete(task_id="t9")))
    forbidden(s.send("helper", "TaskComplete", t_complete(assignee="helper")))  # authorship precedes assignee field
    invalid(s.send("worker", "TaskComplete", t_complete(assignee="helper")))
    invalid(s.send("worker", "TaskFail", t_fail(assignee="helper")))
    forbidden(s.send("helper", "TaskFail", t_fail()))
    assert_ok(s.send("worker", "TaskComplete", t_complete(output=b"")))
    # After a terminal report every further report is FORBIDDEN (not INVALID_ENVELOPE).
    forbidden(s.send("worker", "TaskUpdate", t_update()))
    forbidden(s.send("worker", "TaskComplete", t_complete()))
    forbidden(s.send("worker", "TaskFail", t_fail()))
    invalid(s.send("worker", "TaskUpdate", t_update(task_id="t9")))
    # No mode check of the commitment outcome against the report.
    assert_ok(s.commit(action="task.failed", outcome_positive=False), state=RESOLVED)


def test_task_commitment_after_fail(stub):
    s = task_session(stub)
    assert_ok(s.send("planner", "TaskRequest", req()))
    assert_ok(s.send("worker", "TaskAccept", t_accept()))
    assert_ok(s.send("worker", "TaskFail", t_fail(assignee="worker")))
    assert_ok(s.commit(action="task.completed"), state=RESOLVED)


# ==================================================================================================
# Handoff mode (§5)
# ==================================================================================================

def offer(hid="h1", target="target", **kw):
    return handoff_pb2.HandoffOfferPayload(handoff_id=hid, target_participant=target, scope="support",
                                           reason="escalate", **kw)


def h_context(hid="h1", context=b"notes"):
    return handoff_pb2.HandoffContextPayload(handoff_id=hid, content_type="text/plain", context=context)


def h_accept(hid="h1", by=""):
    return handoff_pb2.HandoffAcceptPayload(handoff_id=hid, accepted_by=by, reason="ready")


def h_decline(hid="h1", by=""):
    return handoff_pb2.HandoffDeclinePayload(handoff_id=hid, declined_by=by, reason="busy")


def handoff_session(stub, participants=("owner", "target", "other"), initiator="owner"):
    return started(stub, HANDOFF, list(participants), initiator)


def test_handoff_happy_path(stub):
    s = handoff_session(stub)
    assert_ok(s.send("owner", "HandoffOffer", offer()))
    assert_ok(s.send("owner", "HandoffContext", h_context()))
    invalid(s.commit(action="handoff.accepted"))                          # no answer yet
    assert_ok(s.send("target", "HandoffAccept", h_accept(by="target")))
    assert_ok(s.send("owner", "HandoffContext", h_context()))            # late context is fine
    assert_ok(s.commit(action="handoff.accepted"), state=RESOLVED)
    assert s.state() == RESOLVED


@pytest.mark.parametrize("participants,initiator", [
    (["owner"], "owner"),
    (["target", "other"], "owner"),
])
def test_handoff_session_start_rules(stub, participants, initiator):
    s = Session(stub, HANDOFF, participants, initiator)
    assert_rejected(s.start, "INVALID_ENVELOPE", "InvalidPayload")


def test_handoff_offer_paths(stub):
    s = handoff_session(stub)
    forbidden(s.send("target", "HandoffOffer", offer()))
    forbidden(s.send("target", "HandoffOffer", GARBAGE))
    forbidden(s.send("outsider", "HandoffOffer", offer()))
    invalid(s.send("owner", "HandoffOffer", GARBAGE))
    invalid(s.send("owner", "HandoffOffer", offer(hid="")))
    invalid(s.send("owner", "HandoffOffer", offer(target="")))
    invalid(s.send("owner", "HandoffOffer", offer(target="outsider")))
    invalid(s.send("owner", "HandoffOffer", offer(target="owner")))
    assert_ok(s.send("owner", "HandoffOffer", offer(hid=" ")))            # only emptiness is checked
    invalid(s.send("owner", "HandoffOffer", offer(hid="h2")))             # one offer pending
    invalid(s.send("owner", "HandoffOffer", offer(hid="h2", target="other")))
    assert_ok(s.send("target", "HandoffDecline", h_decline(hid=" ")))
    invalid(s.send("owner", "HandoffOffer", offer(hid=" ")))              # id already used
    assert_ok(s.send("owner", "HandoffOffer", offer(hid="h2")))           # same target again after a decline
    assert_ok(s.send("target", "HandoffAccept", h_accept(hid="h2")))
    invalid(s.send("owner", "HandoffOffer", offer(hid="h3", target="other")))   # no offers after an accept


def test_handoff_context_paths(stub):
    s = handoff_session(stub)
    invalid(s.send("owner", "HandoffContext", h_context()))               # unknown offer
    assert_ok(s.send("owner", "HandoffOffer", offer()))
    invalid(s.send("owner", "HandoffContext", GARBAGE))
    invalid(s.send("target", "HandoffContext", h_context("nope")))        # unknown id precedes authorship
    forbidden(s.send("target", "HandoffContext", h_context()))
    forbidden(s.send("outsider", "HandoffContext", h_context()))
    assert_ok(s.send("owner", "HandoffContext", h_context(context=b"")))
    assert_ok(s.send("target", "HandoffDecline", h_decline()))
    assert_ok(s.send("owner", "HandoffContext", h_context()))             # after a decline too


@pytest.mark.parametrize("message_type,make", [("HandoffAccept", h_accept), ("HandoffDecline", h_decline)])
def test_handoff_answer_paths(stub, message_type, make):
    s = handoff_session(stub)
    invalid(s.send("target", message_type, make()))                       # unknown offer
    assert_ok(s.send("owner", "HandoffOffer", offer()))
    invalid(s.send("target", message_type, GARBAGE))
    invalid(s.send("target", message_type, make("nope")))
    invalid(s.send("other", message_type, make("nope")))                  # unknown id precedes authorship
    forbidden(s.send("other", message_type, make()))
    forbidden(s.send("owner", message_type, make()))
    forbidden(s.send("other", message_type, make(by="other")))            # authorship precedes the by-field
    invalid(s.send("target", message_type, make(by="other")))
    assert_ok(s.send("target", message_type, make(by="target")))
    invalid(s.send("target", "HandoffAccept", h_accept()))                # already answered
    invalid(s.send("target", "HandoffDecline", h_decline()))
    forbidden(s.send("other", "HandoffAccept", h_accept()))               # authorship precedes disposition


def test_handoff_declined_offer_makes_ready_while_another_is_pending(stub):
    s = handoff_session(stub)
    assert_ok(s.send("owner", "HandoffOffer", offer("h1")))
    assert_ok(s.send("target", "HandoffDecline", h_decline("h1")))
    assert_ok(s.send("owner", "HandoffOffer", offer("h2", target="other")))
    assert_ok(s.commit(action="handoff.declined", outcome_positive=False), state=RESOLVED)


def test_handoff_pending_offer_without_timeout_is_not_ready(stub):
    s = handoff_session(stub)
    assert_ok(s.send("owner", "HandoffOffer", offer(), timestamp_unix_ms=1))
    invalid(s.commit(action="handoff.accepted"))


# ==================================================================================================
# Quorum mode (§6)
# ==================================================================================================

def approval_request(rid="r1", required=2, **kw):
    return quorum_pb2.ApprovalRequestPayload(request_id=rid, action="deploy", summary="v2",
                                             required_approvals=required, **kw)


BALLOTS = {"Approve": quorum_pb2.ApprovePayload, "Reject": quorum_pb2.RejectPayload,
           "Abstain": quorum_pb2.AbstainPayload}


def ballot(kind, rid="r1"):
    return BALLOTS[kind](request_id=rid, reason="because")


def quorum_session(stub, participants=("alice", "bob", "carol"), initiator="coordinator"):
    return started(stub, QUORUM, list(participants), initiator)


def test_quorum_happy_path(stub):
    s = quorum_session(stub)
    assert_ok(s.send("coordinator", "ApprovalRequest", approval_request(details=b"\x01")))
    assert_ok(s.send("alice", "Approve", ballot("Approve")))
    invalid(s.commit(action="quorum.approved"))                           # 1 of 2
    assert_ok(s.send("bob", "Approve", ballot("Approve")))
    assert_ok(s.send("carol", "Reject", ballot("Reject")))               # ballots still accepted after the threshold
    assert_ok(s.commit(action="quorum.approved"), state=RESOLVED)
    assert s.state() == RESOLVED


def test_quorum_request_paths(stub):
    s = quorum_session(stub)
    forbidden(s.send("alice", "ApprovalRequest", approval_request()))
    forbidden(s.send("alice", "ApprovalRequest", GARBAGE))
    invalid(s.send("coordinator", "ApprovalRequest", GARBAGE))
    invalid(s.send("coordinator", "ApprovalRequest", approval_request(rid="")))
    invalid(s.send("coordinator", "ApprovalRequest", approval_request(required=0)))
    invalid(s.send("coordinator", "ApprovalRequest", approval_request(required=4)))
    assert_ok(s.send("coordinator", "ApprovalRequest", approval_request(required=3)))
    invalid(s.send("coordinator", "ApprovalRequest", approval_request(rid="r2")))


@pytest.mark.parametrize("kind", list(BALLOTS))
def test_quorum_ballot_paths(stub, kind):
    s = quorum_session(stub)
    invalid(s.send("alice", kind, ballot(kind)))                          # no request yet
    forbidden(s.send("coordinator", kind, ballot(kind)))                  # coordinator is not a voter
    forbidden(s.send("outsider", kind, ballot(kind)))
    assert_ok(s.send("coordinator", "ApprovalRequest", approval_request()))
    invalid(s.send("alice", kind, GARBAGE))
    invalid(s.send("alice", kind, ballot(kind, rid="r2")))
    invalid(s.send("alice", kind, ballot(kind, rid="")))
    assert_ok(s.send("alice", kind, ballot(kind)))
    for other in BALLOTS:                                                 # ballots are final
        invalid(s.send("alice", other, ballot(other)))


def test_quorum_initiator_votes_only_when_listed(stub):
    s = quorum_session(stub, participants=("coordinator", "alice"), initiator="coordinator")
    assert_ok(s.send("coordinator", "ApprovalRequest", approval_request(required=1)))
    assert_ok(s.send("coordinator", "Approve", ballot("Approve")))
    assert_ok(s.commit(action="quorum.approved"), state=RESOLVED)


def test_quorum_commitment_before_request(stub):
    s = quorum_session(stub)
    invalid(s.commit(action="quorum.approved"))


def test_quorum_ready_when_threshold_unreachable(stub):
    s = quorum_session(stub)
    assert_ok(s.send("coordinator", "ApprovalRequest", approval_request(required=2)))
    assert_ok(s.send("alice", "Reject", ballot("Reject")))
    invalid(s.commit(action="quorum.rejected", outcome_positive=False))   # 0 + 2 outstanding >= 2
    assert_ok(s.send("bob", "Abstain", ballot("Abstain")))                # 0 + 1 outstanding < 2
    assert_ok(s.commit(action="quorum.rejected", outcome_positive=False), state=RESOLVED)


# ==================================================================================================
# Multi-round extension (§7)
# ==================================================================================================

def mr_session(stub, participants=("alice", "bob"), initiator="coordinator"):
    return started(stub, MULTI_ROUND, list(participants), initiator)


def test_multi_round_happy_path(stub):
    s = mr_session(stub)
    assert_ok(s.send("alice", "Contribute", b'{"value":"option_a"}'))
    assert_ok(s.send("bob", "Contribute", b'{"value":"option_b"}'))
    invalid(s.commit(action="multi_round.converged"))
    assert_ok(s.send("bob", "Contribute", b'{"value":"option_a"}'))
    assert_ok(s.commit(action="multi_round.converged"), state=RESOLVED)
    assert s.state() == RESOLVED


@pytest.mark.parametrize("payload", [
    b'{"value":"x","other":[1,{"value":2}]}',
    b'["x"]',
    b' {"value" : "x"} ',
    '{"value":"caf\u00e9"}'.encode(),
])
def test_multi_round_accepted_payload_shapes(stub, payload):
    s = mr_session(stub)
    assert_ok(s.send("alice", "Contribute", payload))


@pytest.mark.parametrize("payload", [
    b"\xff\xfe",                     # not UTF-8
    b"",                             # not JSON
    b"value",
    b'{"value":1}',
    b'{"value":null}',
    b'{"value":["x"]}',
    b'{"other":"x"}',
    b'{"value":"x","value":"y"}',    # duplicate value key
    b'["x","y"]',
    b"[]",
    b"[1]",
    b'"x"',
    b'{"value":"x"} trailing',
    b'{"value":"x","n":NaN}',
    b'{"value":"\\ud800"}',          # unpaired surrogate
])
def test_multi_round_rejected_payloads(stub, payload):
    s = mr_session(stub)
    invalid(s.send("alice", "Contribute", payload))


def test_multi_round_authorisation(stub):
    s = mr_session(stub)
    forbidden(s.send("coordinator", "Contribute", b'{"value":"a"}'))     # initiator not a participant
    forbidden(s.send("outsider", "Contribute", b'{"value":"a"}'))
    forbidden(s.send("outsider", "Contribute", b"garbage"))
    forbidden(s.commit("alice", action="multi_round.converged"))          # initiator-only, before readiness
    forbidden(s.commit("alice", payload=GARBAGE))


def test_multi_round_identical_recontribution_and_sticky_convergence(stub):
    s = mr_session(stub)
    assert_ok(s.send("alice", "Contribute", b'{"value":""}'))
    assert_ok(s.send("alice", "Contribute", b'{"value":""}'))             # identical: accepted, no change
    invalid(s.commit(payload=GARBAGE))                                    # not converged
    assert_ok(s.send("bob", "Contribute", b'[""]'))
    invalid(s.send("alice", "Contribute", b'{"value":"b"}'))              # converged: no more contributions
    invalid(s.send("bob", "Contribute", b'{"value":""}'))
    invalid(s.send("bob", "Contribute", b"garbage"))
    assert_ok(s.commit(action="multi_round.converged"), state=RESOLVED)


def test_multi_round_commitment_contract_after_convergence(stub):
    s = mr_session(stub)
    for who in ("alice", "bob"):
        assert_ok(s.send(who, "Contribute", b'{"value":"v"}'))
    invalid(s.commit(action="multi_round.converged", policy_version=""))
    invalid(s.commit(action="x.failed", outcome_positive=True))
    assert_ok(s.commit(action="x.failed", outcome_positive=False), state=RESOLVED)
