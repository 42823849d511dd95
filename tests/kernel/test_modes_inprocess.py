"""Policy-dependent mode behaviour, evaluators and mode state, driven in-process.

Spec: modes.md §1.2 (commitment authority), §3–§7 (policy reads of each mode, state shapes),
§10.6–§10.9 (rule schemas, evaluators, number formatting). The Engine runs with a MemoryStore and a
fixed clock; a custom policy is bound by putting a BoundPolicy into the PolicyRegistry (RegisterPolicy
is not implemented yet). Deny reasons are compared exactly.
"""
from __future__ import annotations

import json
import types
import uuid

import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.modes.handoff.v1 import handoff_pb2
from macp.modes.proposal.v1 import proposal_pb2
from macp.modes.quorum.v1 import quorum_pb2
from macp.modes.task.v1 import task_pb2
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.vocabulary.errors import MacpError
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.vocabulary.session import OPEN, RESOLVED
from macp_runtime.specs.hooks import proposal as proposal_hooks
from macp_runtime.specs.hooks.policy_rules import BoundPolicy
from macp_runtime.storage import MemoryStore

NOW = 1_700_000_000_000
POLICY_ID = "policy.test"

DECISION = "macp.mode.decision.v1"
PROPOSAL = "macp.mode.proposal.v1"
TASK = "macp.mode.task.v1"
HANDOFF = "macp.mode.handoff.v1"
QUORUM = "macp.mode.quorum.v1"
MULTI_ROUND = "ext.multi_round.v1"

_MODES = None


def registry() -> ModeRegistry:
    global _MODES
    if _MODES is None:
        _MODES = ModeRegistry.from_spec_dirs()
    return _MODES


class Run:
    """One session on a private in-process engine. `rules` binds a custom policy (id POLICY_ID)."""

    def __init__(self, mode, participants, initiator, rules=None, schema_version=1, policy_mode="*"):
        self.mode = mode
        self.initiator = initiator
        self.store = MemoryStore()
        self.store.open()
        self.policies = PolicyRegistry()
        self.policy_id = "policy.default"
        if rules is not None:
            self.policy_id = POLICY_ID
            self.policies._policies[POLICY_ID] = BoundPolicy(POLICY_ID, policy_mode, "test", rules, schema_version)
        self.engine = Engine(registry(), self.policies, self.store, clock=lambda: NOW)
        self.sid = str(uuid.uuid4())
        start = core_pb2.SessionStartPayload(
            intent="t", participants=list(participants), mode_version="1.0.0", configuration_version="cfg",
            policy_version="" if rules is None else POLICY_ID, ttl_ms=60_000)
        self.engine.start_session(self.env(initiator, "SessionStart", start), Identity(initiator))

    def env(self, sender, message_type, payload, ts=NOW):
        raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
        return envelope_pb2.Envelope(macp_version="1.0", mode=self.mode, message_type=message_type,
                                     message_id=str(uuid.uuid4()), session_id=self.sid, sender=sender,
                                     timestamp_unix_ms=ts, payload=raw)

    def send(self, sender, message_type, payload, ts=NOW) -> MacpError | None:
        try:
            self.engine.process_message(self.env(sender, message_type, payload, ts), Identity(sender))
        except MacpError as exc:
            return exc
        return None

    def ok(self, sender, message_type, payload, ts=NOW) -> None:
        error = self.send(sender, message_type, payload, ts)
        assert error is None, f"{message_type} from {sender}: {error}"

    def rejected(self, kind, sender, message_type, payload, ts=NOW) -> MacpError:
        error = self.send(sender, message_type, payload, ts)
        assert error is not None, f"{message_type} from {sender} was accepted"
        assert error.kind.name == kind, error
        return error

    def commitment(self, action="x.done", outcome_positive=True, **fields):
        return core_pb2.CommitmentPayload(
            commitment_id="c1", action=action, authority_scope="s", reason="r", mode_version="1.0.0",
            configuration_version="cfg", policy_version=self.policy_id, outcome_positive=outcome_positive, **fields)

    def commit(self, sender=None, ts=NOW, **fields) -> MacpError | None:
        return self.send(sender or self.initiator, "Commitment", self.commitment(**fields), ts)

    def commits(self, sender=None, ts=NOW, **fields) -> None:
        error = self.commit(sender, ts, **fields)
        assert error is None, error
        assert self.session.status == RESOLVED

    def denied(self, *reasons, sender=None, ts=NOW, **fields) -> None:
        error = self.commit(sender, ts, **fields)
        assert error is not None and error.kind.name == "PolicyDenied", error
        assert error.reasons == list(reasons)
        assert error.details == json.dumps({"reasons": list(reasons), "reason": "; ".join(reasons)},
                                           separators=(",", ":"), ensure_ascii=False).encode()
        assert self.session.status == OPEN

    def not_ready(self, sender=None, ts=NOW, **fields) -> None:
        error = self.commit(sender, ts, **fields)
        assert error is not None and error.kind.name == "InvalidPayload", error

    @property
    def session(self):
        return self.engine.lookup(self.sid)

    @property
    def state(self) -> dict:
        return self.session.state

    @property
    def phase(self) -> str:
        return self.session.phase

    def replayed(self):
        """A second engine recovered from this run's store: the session as replay rebuilds it."""
        engine = Engine(registry(), self.policies, self.store, clock=lambda: NOW)
        recovered, failed = engine.recover(strict=True)
        assert failed == 0
        return engine.lookup(self.sid)


# ==================================================================================================
# Commitment authority (§1.2)
# ==================================================================================================

def _ready_quorum(rules):
    r = Run(QUORUM, ["alice", "bob"], "coord", rules=rules)
    r.ok("coord", "ApprovalRequest", quorum_pb2.ApprovalRequestPayload(request_id="r1", required_approvals=1))
    r.ok("alice", "Approve", quorum_pb2.ApprovePayload(request_id="r1"))
    return r


def test_authority_any_participant():
    r = _ready_quorum({"commitment": {"authority": "any_participant"}})
    assert r.commit("outsider").kind.name == "Forbidden"
    r.commits("bob")


def test_authority_any_participant_includes_initiator():
    r = _ready_quorum({"commitment": {"authority": "any_participant"}})
    r.commits("coord")


def test_authority_designated_role_excludes_initiator():
    r = _ready_quorum({"commitment": {"authority": "designated_role", "designated_roles": ["bob", "auditor"]}})
    assert r.commit("coord").kind.name == "Forbidden"
    assert r.commit("alice").kind.name == "Forbidden"
    r.commits("bob")


def test_authority_designated_role_may_name_a_non_participant():
    r = _ready_quorum({"commitment": {"authority": "designated_role", "designated_roles": ["auditor"]}})
    r.commits("auditor")


@pytest.mark.parametrize("authority", ["initiator_only", "Any_Participant", "somebody"])
def test_authority_initiator_only_and_unknown(authority):
    r = _ready_quorum({"commitment": {"authority": authority}})
    assert r.commit("alice").kind.name == "Forbidden"
    r.commits("coord")


def test_authority_group_that_does_not_parse_falls_back_to_initiator_only():
    r = _ready_quorum({"commitment": {"authority": "any_participant", "designated_roles": "bob"}})
    assert r.commit("alice").kind.name == "Forbidden"
    r.commits("coord")


def test_multi_round_ignores_commitment_authority():
    r = Run(MULTI_ROUND, ["alice", "bob"], "coord", rules={"commitment": {"authority": "any_participant"}})
    for who in ("alice", "bob"):
        r.ok(who, "Contribute", b'{"value":"v"}')
    assert r.commit("alice", action="multi_round.converged").kind.name == "Forbidden"
    r.commits("coord", action="multi_round.converged")


def test_multi_round_has_no_evaluator():
    r = Run(MULTI_ROUND, ["alice"], "coord", rules={}, schema_version=2)
    r.ok("alice", "Contribute", b'{"value":"v"}')
    r.commits(action="multi_round.converged")


# ==================================================================================================
# Decision evaluator (§10.8.1)
# ==================================================================================================

P3 = ["alice", "bob", "carol"]


def decision(rules, participants=P3, schema_version=1):
    r = Run(DECISION, participants, "coord", rules=rules, schema_version=schema_version)
    r.ok("alice", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy"))
    return r


def evaluate(r, sender, recommendation, confidence, pid="p1"):
    r.ok(sender, "Evaluation", decision_pb2.EvaluationPayload(proposal_id=pid, recommendation=recommendation,
                                                              confidence=confidence))


def object_(r, sender, severity, pid="p1"):
    r.ok(sender, "Objection", decision_pb2.ObjectionPayload(proposal_id=pid, reason="no", severity=severity))


def vote(r, sender, value, pid="p1"):
    r.ok(sender, "Vote", decision_pb2.VotePayload(proposal_id=pid, vote=value))


def test_decision_schema_version_denies_every_commitment():
    r = decision({}, schema_version=2)
    r.denied("unsupported policy schema version: 2 (supported: 1)")


def test_decision_minimum_confidence_requires_a_qualifying_evaluation():
    rules = {"evaluation": {"required_before_voting": True, "minimum_confidence": 0.8}}
    r = decision(rules)
    evaluate(r, "bob", "REVIEW", 0.95)                     # REVIEW is informational only
    evaluate(r, "carol", "approve", 0.79)
    r.denied("no qualifying evaluation meets minimum confidence threshold: 0.80")
    evaluate(r, "carol", "block", 0.8)                     # BLOCK qualifies
    r.commits()


def test_decision_required_before_voting_without_minimum():
    r = decision({"evaluation": {"required_before_voting": True}})
    evaluate(r, "bob", "REVIEW", 0.9)
    r.denied("evaluations required before voting but none provided (REVIEW evaluations are informational only)")
    evaluate(r, "bob", "REJECT", 0.0)
    r.commits()


def test_decision_minimum_confidence_ignored_unless_required():
    r = decision({"evaluation": {"minimum_confidence": 0.9}})
    r.commits()


def test_decision_required_before_voting_never_blocks_a_vote():
    r = decision({"evaluation": {"required_before_voting": True}})
    vote(r, "bob", "APPROVE")
    r.denied("evaluations required before voting but none provided (REVIEW evaluations are informational only)")


def test_decision_veto_threshold_and_senders():
    rules = {"objection_handling": {"critical_severity_vetoes": True, "veto_threshold": 2}}
    r = decision(rules)
    object_(r, "bob", "Critical")
    object_(r, "carol", "high")
    r2 = decision(rules)
    object_(r2, "bob", "critical")
    object_(r2, "bob", "critical")
    object_(r2, "carol", "critical")
    r2.denied("blocked by 3 blocking objection(s) (veto threshold: 2), from: bob, bob, carol")
    r.commits()                                             # one critical objection < 2


def test_decision_veto_threshold_zero_always_vetoes():
    r = decision({"objection_handling": {"critical_severity_vetoes": True, "veto_threshold": 0}})
    r.denied("blocked by 0 blocking objection(s) (veto threshold: 0), from: ")


def test_decision_veto_disabled_by_default():
    r = decision({"objection_handling": {"veto_threshold": 1}})
    object_(r, "bob", "critical")
    r.commits()


@pytest.mark.parametrize("quorum,reason", [
    ({"type": "count", "value": 2}, "vote quorum not met: 1 voters of 3 participants (quorum: 2 count)"),
    ({"type": "n_of_m", "value": 2.0}, "vote quorum not met: 1 voters of 3 participants (quorum: 2 n_of_m)"),
    ({"type": "percentage", "value": 75}, "vote quorum not met: 1 voters of 3 participants (quorum: 75 percentage)"),
    ({"type": "percentage", "value": 33.4},
     "vote quorum not met: 1 voters of 3 participants (quorum: 33.4 percentage)"),
    ({"type": "other", "value": 1.5}, "vote quorum not met: 1 voters of 3 participants (quorum: 1.5 other)"),
])
def test_decision_vote_quorum(quorum, reason):
    r = decision({"commitment": {"require_vote_quorum": True}, "voting": {"quorum": quorum}})
    vote(r, "bob", "APPROVE")
    r.denied(reason)


def test_decision_vote_quorum_counts_distinct_voters_and_needs_require_flag():
    r = decision({"voting": {"quorum": {"type": "count", "value": 3}}})
    r.commits()                                             # require_vote_quorum is false
    r = decision({"commitment": {"require_vote_quorum": True}, "voting": {"quorum": {"type": "count", "value": 2}}})
    r.ok("bob", "Proposal", decision_pb2.ProposalPayload(proposal_id="p2", option="other"))
    vote(r, "bob", "APPROVE", "p1")
    vote(r, "bob", "ABSTAIN", "p2")
    r.denied("vote quorum not met: 1 voters of 3 participants (quorum: 2 count)")
    vote(r, "alice", "abstain")
    r.commits()


def test_decision_percentage_quorum_met():
    r = decision({"commitment": {"require_vote_quorum": True}, "voting": {"quorum": {"type": "percentage",
                                                                                      "value": 66.6}}})
    vote(r, "bob", "APPROVE")
    vote(r, "carol", "ABSTAIN")
    r.commits()


@pytest.mark.parametrize("voting,votes,reason", [
    ({"algorithm": "majority", "threshold": 0.7}, ["APPROVE", "APPROVE", "REJECT"],
     "majority vote failed: 66.7% approve, need >= 70.0%"),
    ({"algorithm": "majority"}, ["APPROVE", "REJECT", "ABSTAIN"], None),             # exactly 50% passes
    ({"algorithm": "majority"}, ["REJECT", "REJECT", "APPROVE"], "majority vote failed: 33.3% approve, need >= 50.0%"),
    ({"algorithm": "supermajority"}, ["APPROVE", "REJECT"], "supermajority vote failed: 50.0% approve, need >= 66.7%"),
    ({"algorithm": "supermajority", "threshold": 0.8}, ["APPROVE", "APPROVE", "REJECT"],
     "supermajority vote failed: 66.7% approve, need >= 80.0%"),
    ({"algorithm": "supermajority"}, ["APPROVE", "APPROVE", "REJECT"], None),
    ({"algorithm": "unanimous"}, ["APPROVE", "APPROVE", "ABSTAIN"],
     "unanimous vote failed: 2 approve, 0 reject out of 3 participants"),
    ({"algorithm": "unanimous"}, ["APPROVE", "APPROVE", "APPROVE"], None),
    ({"algorithm": "unanimous"}, ["APPROVE", "REJECT", "APPROVE"],
     "unanimous vote failed: 2 approve, 1 reject out of 3 participants"),
    ({"algorithm": "weighted", "weights": {"alice": 3}}, ["APPROVE", "REJECT", "REJECT"], None),
    ({"algorithm": "weighted", "weights": {"alice": 0.5}, "threshold": 0.3}, ["APPROVE", "REJECT", "REJECT"],
     "weighted vote failed: 20.0% weighted approve, need >= 30.0%"),
    ({"algorithm": "plurality"}, ["APPROVE", "REJECT", "ABSTAIN"], "plurality vote tied: 1 approve vs 1 reject"),
    ({"algorithm": "plurality"}, ["APPROVE", "REJECT", "REJECT"], "plurality vote failed: 1 approve vs 2 reject"),
    ({"algorithm": "plurality"}, ["APPROVE", "APPROVE", "REJECT"], None),
    ({"algorithm": "Majority"}, ["APPROVE"],
     "unknown voting algorithm 'Majority'; supported: majority, supermajority, unanimous, weighted, plurality, none"),
    ({"algorithm": "none"}, ["REJECT", "REJECT", "REJECT"], None),
])
def test_decision_algorithms(voting, votes, reason):
    r = decision({"voting": voting})
    for sender, value in zip(P3, votes):
        vote(r, sender, value)
    if reason is None:
        r.commits()
    else:
        r.denied(reason)


@pytest.mark.parametrize("algorithm", ["majority", "supermajority", "unanimous", "weighted", "plurality", "bogus"])
def test_decision_no_votes_allows_unless_quorum_required(algorithm):
    voting = {"algorithm": algorithm, "threshold": 0.9, "weights": {"alice": 1}}
    r = decision({"voting": voting})
    vote(r, "alice", "ABSTAIN")
    r.commits()
    r = decision({"voting": voting, "commitment": {"require_vote_quorum": True}})
    vote(r, "alice", "ABSTAIN")
    r.denied("no votes cast")


def test_decision_weighted_zero_weight_is_no_votes():
    r = decision({"voting": {"algorithm": "weighted", "weights": {"alice": 0}},
                  "commitment": {"require_vote_quorum": True}})
    vote(r, "alice", "APPROVE")
    r.denied("no votes cast")


def test_decision_algorithm_counts_votes_across_proposals():
    r = decision({"voting": {"algorithm": "majority", "threshold": 0.6}})
    r.ok("bob", "Proposal", decision_pb2.ProposalPayload(proposal_id="p2", option="other"))
    vote(r, "alice", "APPROVE", "p1")
    vote(r, "alice", "REJECT", "p2")
    r.denied("majority vote failed: 50.0% approve, need >= 60.0%")


def test_decision_reasons_accumulate_in_order():
    rules = {
        "evaluation": {"required_before_voting": True, "minimum_confidence": 0.5},
        "objection_handling": {"critical_severity_vetoes": True},
        "commitment": {"require_vote_quorum": True},
        "voting": {"algorithm": "plurality", "quorum": {"type": "count", "value": 3}},
    }
    r = decision(rules)
    object_(r, "carol", "critical")
    vote(r, "bob", "REJECT")
    r.denied("no qualifying evaluation meets minimum confidence threshold: 0.50",
             "blocked by 1 blocking objection(s) (veto threshold: 1), from: carol",
             "vote quorum not met: 1 voters of 3 participants (quorum: 3 count)",
             "plurality vote failed: 0 approve vs 1 reject")


def test_decision_rules_that_do_not_parse_fall_back_to_defaults():
    r = decision({"voting": {"algorithm": "unanimous", "threshold": "high"}})
    vote(r, "alice", "REJECT")
    r.commits()


# ==================================================================================================
# Proposal mode policy reads (§3.5, §3.6) and evaluator (§10.8.2)
# ==================================================================================================

def proposal(rules=None, participants=("buyer", "seller"), initiator="buyer", schema_version=1):
    return Run(PROPOSAL, list(participants), initiator, rules=rules, schema_version=schema_version)


def prop(r, sender, pid, title="t"):
    r.ok(sender, "Proposal", proposal_pb2.ProposalPayload(proposal_id=pid, title=title, summary="s"))


def accept(r, sender, pid):
    r.ok(sender, "Accept", proposal_pb2.AcceptPayload(proposal_id=pid))


def counter_payload(pid, supersedes):
    return proposal_pb2.CounterProposalPayload(proposal_id=pid, supersedes_proposal_id=supersedes, title="c")


def test_proposal_counterparty_criterion():
    r = proposal({"acceptance": {"criterion": "counterparty"}}, participants=("buyer", "seller", "broker"))
    prop(r, "seller", "p1")
    accept(r, "buyer", "p1")
    assert r.phase == "Negotiating"
    accept(r, "broker", "p1")                              # the proposer need not accept
    assert r.phase == "Converged"
    r.commits(action="proposal.accepted")


def test_proposal_counterparty_single_participant_converges_immediately():
    r = proposal({"acceptance": {"criterion": "counterparty"}}, participants=("solo",), initiator="solo")
    prop(r, "solo", "p1")
    assert r.phase == "Converged"
    r.commits()


def test_proposal_initiator_criterion():
    r = proposal({"acceptance": {"criterion": "initiator"}}, participants=("buyer", "seller", "broker"))
    prop(r, "seller", "p1")
    accept(r, "seller", "p1")
    accept(r, "broker", "p1")
    assert r.phase == "Negotiating"
    accept(r, "buyer", "p1")
    assert r.phase == "Converged"
    r.commits()


def test_proposal_initiator_criterion_never_converges_without_the_initiator():
    r = proposal({"acceptance": {"criterion": "initiator"}}, participants=("a", "b"), initiator="coord")
    prop(r, "a", "p1")
    accept(r, "a", "p1")
    accept(r, "b", "p1")
    assert r.phase == "Negotiating"
    r.not_ready()


@pytest.mark.parametrize("rules", [{"acceptance": {"criterion": "ALL"}}, {},
                                   {"acceptance": {"criterion": "counterparty"},
                                    "counter_proposal": {"max_rounds": "3"}}])   # bad parse -> all defaults
def test_proposal_all_parties_is_the_default(rules):
    r = proposal(rules)
    prop(r, "seller", "p1")
    accept(r, "buyer", "p1")
    assert r.phase == "Negotiating"
    accept(r, "seller", "p1")
    assert r.phase == "Converged"


def test_proposal_max_rounds_limits_counter_proposals_per_session():
    r = proposal({"counter_proposal": {"max_rounds": 2}})
    prop(r, "seller", "p1")
    r.ok("buyer", "CounterProposal", counter_payload("p2", "p1"))
    r.ok("seller", "CounterProposal", counter_payload("p3", "p1"))      # counted across chains
    r.rejected("InvalidPayload", "buyer", "CounterProposal", counter_payload("p4", "p3"))
    prop(r, "buyer", "p4")                                              # plain proposals are unlimited


def test_proposal_max_rounds_zero_is_unlimited_and_ignores_schema_version():
    r = proposal({"counter_proposal": {"max_rounds": 0}})
    prop(r, "seller", "p1")
    for i in range(2, 8):
        r.ok("buyer", "CounterProposal", counter_payload(f"p{i}", "p1"))
    r = proposal({"counter_proposal": {"max_rounds": 1}}, schema_version=2)
    prop(r, "seller", "p1")
    r.ok("buyer", "CounterProposal", counter_payload("p2", "p1"))
    r.rejected("InvalidPayload", "buyer", "CounterProposal", counter_payload("p3", "p1"))


def test_proposal_terminal_on_any_reject():
    r = proposal({"rejection": {"terminal_on_any_reject": True}})
    prop(r, "seller", "p1")
    r.ok("buyer", "Reject", proposal_pb2.RejectPayload(proposal_id="p1", terminal=False, reason="no"))
    assert r.phase == "TerminalRejected"
    assert r.state["terminal_rejections"] == [{"proposal_id": "p1", "sender": "buyer", "reason": "no"}]
    assert r.state["rejections"] == [{"proposal_id": "p1", "sender": "buyer", "reason": "no", "terminal": True}]
    r.commits(action="proposal.rejected", outcome_positive=False)


def test_proposal_schema_version_denies_commitment():
    r = proposal({}, schema_version=2)
    prop(r, "seller", "p1")
    accept(r, "buyer", "p1")
    accept(r, "seller", "p1")
    r.denied("unsupported policy schema version: 2 (supported: 1)")


def test_proposal_evaluator_counter_proposal_limit():
    """Unreachable through submission; the evaluator still carries the rule (§10.8.2)."""
    policy = BoundPolicy(POLICY_ID, "*", "", {"counter_proposal": {"max_rounds": 1}}, 1)
    record = {"supersedes_proposal_id": "p1"}
    proposals = {"p1": {"supersedes_proposal_id": None}, "p2": record, "p3": record}
    ctx = types.SimpleNamespace(session=types.SimpleNamespace(policy=policy), state={"proposals": proposals})
    assert proposal_hooks.proposal_policy(ctx) == ["counter-proposal limit exceeded: 2 of 1 allowed"]
    ctx.state["proposals"].pop("p3")
    assert proposal_hooks.proposal_policy(ctx) == []


def test_proposal_state_shape():
    r = proposal()
    r.ok("seller", "Proposal", proposal_pb2.ProposalPayload(proposal_id="p1", title="offer", summary="terms",
                                                            details=b"\x01\x02", tags=["x"]))
    r.ok("buyer", "CounterProposal", proposal_pb2.CounterProposalPayload(
        proposal_id="p2", supersedes_proposal_id="p1", title="counter", summary="less", details=b"\x03"))
    accept(r, "buyer", "p1")
    accept(r, "buyer", "p2")
    r.ok("seller", "Reject", proposal_pb2.RejectPayload(proposal_id="p2", terminal=True, reason="no"))
    r.ok("seller", "Reject", proposal_pb2.RejectPayload(proposal_id="p1", reason="meh"))
    assert r.phase == "TerminalRejected"
    r.ok("buyer", "Withdraw", proposal_pb2.WithdrawPayload(proposal_id="p2"))
    assert r.phase == "Negotiating"
    assert r.state == {
        "proposals": {
            "p1": {"proposal_id": "p1", "title": "offer", "summary": "terms", "details": [1, 2], "tags": ["x"],
                   "proposer": "seller", "supersedes_proposal_id": None, "disposition": "Live"},
            "p2": {"proposal_id": "p2", "title": "counter", "summary": "less", "details": [3], "tags": [],
                   "proposer": "buyer", "supersedes_proposal_id": "p1", "disposition": "Withdrawn"},
        },
        "accepts": {},
        "terminal_rejections": [],
        "rejections": [{"proposal_id": "p2", "sender": "seller", "reason": "no", "terminal": True},
                       {"proposal_id": "p1", "sender": "seller", "reason": "meh", "terminal": False}],
    }
    replayed = r.replayed()
    assert replayed.state == r.state and replayed.phase == r.phase


# ==================================================================================================
# Task mode policy reads (§4.5) and evaluator (§10.8.3)
# ==================================================================================================

def task(rules=None, participants=("planner", "worker", "helper"), schema_version=1):
    r = Run(TASK, list(participants), "planner", rules=rules, schema_version=schema_version)
    r.ok("planner", "TaskRequest", task_pb2.TaskRequestPayload(task_id="t1", title="build"))
    return r


def t_accept(r, sender):
    r.ok(sender, "TaskAccept", task_pb2.TaskAcceptPayload(task_id="t1"))


def t_reject(r, sender, reason="busy"):
    r.ok(sender, "TaskReject", task_pb2.TaskRejectPayload(task_id="t1", reason=reason))


def t_complete(r, sender, output=b""):
    r.ok(sender, "TaskComplete", task_pb2.TaskCompletePayload(task_id="t1", output=output, summary="done"))


def t_fail(r, sender):
    r.ok(sender, "TaskFail", task_pb2.TaskFailPayload(task_id="t1", error_code="E", reason="x"))


REASSIGN = {"assignment": {"allow_reassignment_on_reject": True}}


def test_task_reassignment_after_rejection():
    r = task(REASSIGN)
    t_reject(r, "worker")
    t_accept(r, "helper")
    assert r.phase == "Assigned" and r.state["active_assignee"] == "helper"


def test_task_active_assignee_rejects_and_another_takes_over():
    r = task(REASSIGN)
    t_accept(r, "worker")
    r.rejected("InvalidPayload", "helper", "TaskReject", task_pb2.TaskRejectPayload(task_id="t1"))
    t_reject(r, "worker", "too hard")
    assert r.state["active_assignee"] is None and r.phase == "Requested"
    r.rejected("InvalidPayload", "worker", "TaskReject", task_pb2.TaskRejectPayload(task_id="t1"))  # only once
    t_accept(r, "worker")                                   # may accept again
    t_complete(r, "worker", b"out")
    r.commits(action="task.completed")


def test_task_reassignment_reads_ignore_schema_version():
    r = task(REASSIGN, schema_version=2)
    t_reject(r, "worker")
    t_accept(r, "helper")
    t_complete(r, "helper", b"x")
    r.denied("unsupported policy schema version: 2 (supported: 1)")


def test_task_default_policy_denies_reassignment():
    r = task()
    t_accept(r, "worker")
    error = r.rejected("PolicyDenied", "worker", "TaskReject", task_pb2.TaskRejectPayload(task_id="t1"))
    assert error.reasons == ["active assignee cannot reject without allow_reassignment_on_reject policy"]


def test_task_require_output():
    rules = {"completion": {"require_output": True}}
    r = task(rules)
    t_accept(r, "worker")
    t_complete(r, "worker", b"")
    r.denied("policy requires task output before commitment")
    r = task(rules)
    t_accept(r, "worker")
    t_complete(r, "worker", b"result")
    r.commits(action="task.completed")


def test_task_require_output_makes_fail_uncommittable():
    r = task({"completion": {"require_output": True}})
    t_accept(r, "worker")
    t_fail(r, "worker")
    r.denied("policy requires task output before commitment", action="task.failed", outcome_positive=False)


def test_task_state_shape():
    r = Run(TASK, ["planner", "worker"], "planner", rules=REASSIGN)
    r.ok("planner", "TaskRequest", task_pb2.TaskRequestPayload(
        task_id="t1", title="build", instructions="go", requested_assignee="worker", input=b"\x05",
        deadline_unix_ms=123))
    assert r.phase == "Requested"
    t_accept(r, "worker")
    t_reject(r, "worker", "oops")
    t_accept(r, "worker")
    r.ok("worker", "TaskUpdate", task_pb2.TaskUpdatePayload(task_id="t1", status="run", progress=0.25,
                                                            message="m", partial_output=b"\x07"))
    r.ok("worker", "TaskFail", task_pb2.TaskFailPayload(task_id="t1", assignee="worker", error_code="E1",
                                                        reason="broke", retryable=True))
    assert r.phase == "Reported"
    assert r.state == {
        "task": {"task_id": "t1", "title": "build", "instructions": "go", "requested_assignee": "worker",
                 "input": [5], "deadline_unix_ms": 123, "requester": "planner"},
        "active_assignee": "worker",
        "rejections": [{"task_id": "t1", "assignee": "worker", "reason": "oops"}],
        "updates": [{"task_id": "t1", "status": "run", "progress": 0.25, "message": "m", "partial_output": [7],
                     "sender": "worker"}],
        "terminal_report": {"Fail": {"task_id": "t1", "assignee": "worker", "error_code": "E1", "reason": "broke",
                                     "retryable": True}},
    }
    r.commits(action="task.failed", outcome_positive=False)
    assert r.phase == "Committed"
    replayed = r.replayed()
    assert replayed.state == r.state and replayed.status == RESOLVED


def test_task_complete_report_shape():
    r = task()
    t_accept(r, "worker")
    r.ok("worker", "TaskComplete", task_pb2.TaskCompletePayload(task_id="t1", output=b"ok", summary="fine"))
    assert r.state["terminal_report"] == {"Complete": {"task_id": "t1", "assignee": "worker", "output": [111, 107],
                                                       "summary": "fine"}}


# ==================================================================================================
# Handoff mode implicit accept (§5.5) and evaluator (§10.8.4)
# ==================================================================================================

def handoff(rules=None, schema_version=1):
    return Run(HANDOFF, ["owner", "target", "other"], "owner", rules=rules, schema_version=schema_version)


def offer(r, hid="h1", target="target", ts=NOW):
    r.ok("owner", "HandoffOffer", handoff_pb2.HandoffOfferPayload(handoff_id=hid, target_participant=target,
                                                                  scope="s", reason="r"), ts)


TIMEOUT = {"acceptance": {"implicit_accept_timeout_ms": 5000}}


def test_handoff_implicit_accept_at_commitment():
    r = handoff(TIMEOUT)
    offer(r, ts=NOW - 5000)
    history = len(r.store.history(r.sid))
    r.commits(ts=NOW, action="handoff.accepted")
    o = r.state["offers"]["h1"]
    assert (o["disposition"], o["accepted_by"], o["outcome_reason"]) == ("Accepted", "target",
                                                                        "implicit accept (timeout)")
    assert len(r.store.history(r.sid)) == history + 1        # only the Commitment, no synthetic message
    replayed = r.replayed()
    assert replayed.state == r.state


def test_handoff_implicit_accept_not_yet_due():
    r = handoff(TIMEOUT)
    offer(r, ts=NOW - 4999)
    r.not_ready(ts=NOW, action="handoff.accepted")
    assert r.state["offers"]["h1"]["disposition"] == "Offered"  # a rejected Commitment changes nothing


def test_handoff_implicit_accept_uses_the_commitment_envelope_timestamp():
    r = handoff(TIMEOUT)
    offer(r, ts=NOW)
    r.not_ready(ts=NOW + 4999, action="handoff.accepted")
    r.commits(ts=NOW + 5000, action="handoff.accepted")


def test_handoff_zero_offer_timestamp_disables_implicit_accept():
    r = handoff(TIMEOUT)
    offer(r, ts=0)
    r.not_ready(ts=NOW, action="handoff.accepted")


def test_handoff_no_timeout_by_default():
    r = handoff({})
    offer(r, ts=1)
    r.not_ready(ts=NOW)


def test_handoff_schema_version_denies_after_readiness():
    r = handoff(TIMEOUT, schema_version=2)
    offer(r, ts=NOW - 10_000)                                 # the timeout read ignores schema_version
    r.denied("unsupported policy schema version: 2 (supported: 1)", action="handoff.accepted")
    assert r.state["offers"]["h1"]["disposition"] == "Offered"


def test_handoff_schema_version_not_ready_is_invalid_payload():
    r = handoff({}, schema_version=2)
    offer(r)
    r.not_ready()


def test_handoff_state_shape():
    r = handoff()
    offer(r, "h1", ts=NOW - 10)
    r.ok("owner", "HandoffContext", handoff_pb2.HandoffContextPayload(handoff_id="h1", content_type="text/plain",
                                                                      context=b"\x09"))
    r.ok("target", "HandoffDecline", handoff_pb2.HandoffDeclinePayload(handoff_id="h1", reason="busy"))
    assert r.phase == "AwaitingOffer"
    offer(r, "h2", target="other")
    assert r.phase == "Offered"
    r.ok("other", "HandoffAccept", handoff_pb2.HandoffAcceptPayload(handoff_id="h2", accepted_by="other",
                                                                    reason="sure"))
    assert r.phase == "Accepted"
    assert r.state == {
        "offers": {
            "h1": {"handoff_id": "h1", "target_participant": "target", "scope": "s", "reason": "r",
                   "offered_by": "owner", "disposition": "Declined", "accepted_by": None, "declined_by": "target",
                   "outcome_reason": "busy", "offered_at_ms": NOW - 10},
            "h2": {"handoff_id": "h2", "target_participant": "other", "scope": "s", "reason": "r",
                   "offered_by": "owner", "disposition": "Accepted", "accepted_by": "other", "declined_by": None,
                   "outcome_reason": "sure", "offered_at_ms": NOW},
        },
        "contexts": {"h1": [{"content_type": "text/plain", "context": [9], "sender": "owner"}]},
    }


# ==================================================================================================
# Quorum mode threshold override (§6.6) and evaluator (§10.8.5)
# ==================================================================================================

def quorum(rules=None, participants=("alice", "bob", "carol"), required=3, schema_version=1):
    r = Run(QUORUM, list(participants), "coord", rules=rules, schema_version=schema_version)
    r.ok("coord", "ApprovalRequest", quorum_pb2.ApprovalRequestPayload(request_id="r1", action="a",
                                                                       required_approvals=required))
    return r


BALLOT = {"Approve": quorum_pb2.ApprovePayload, "Reject": quorum_pb2.RejectPayload,
          "Abstain": quorum_pb2.AbstainPayload}


def ballot(r, sender, kind):
    r.ok(sender, kind, BALLOT[kind](request_id="r1", reason="because"))


def test_quorum_count_override_replaces_required_approvals():
    r = quorum({"threshold": {"type": "n_of_m", "value": 1}}, required=3)
    r.not_ready(action="quorum.approved")
    ballot(r, "alice", "Approve")
    r.commits(action="quorum.approved")


def test_quorum_count_override_truncates():
    r = quorum({"threshold": {"type": "count", "value": 2.9}}, required=1)   # readiness: R = 2
    ballot(r, "alice", "Approve")
    r.not_ready()
    ballot(r, "bob", "Approve")
    # ... while the evaluator compares the voter count with the untruncated value.
    r.denied("quorum not met: 2 effective voters of 3 participants (threshold: 2.9 count)")
    ballot(r, "carol", "Reject")
    r.commits()


def test_quorum_fractional_override_is_ready_immediately_but_the_evaluator_denies():
    r = quorum({"threshold": {"value": 0.5}}, required=3)
    r.denied("quorum not met: 0 effective voters of 3 participants (threshold: 0.5 n_of_m)")
    ballot(r, "alice", "Reject")
    r.commits(action="quorum.rejected", outcome_positive=False)


def test_quorum_percentage_override():
    r = quorum({"threshold": {"type": "percentage", "value": 60}}, required=1)   # R = ceil(1.8) = 2
    ballot(r, "alice", "Approve")
    r.not_ready()
    ballot(r, "bob", "Approve")
    r.commits()


def test_quorum_percentage_evaluator_counts_effective_voters():
    r = quorum({"threshold": {"type": "percentage", "value": 100}}, required=1)   # R = 3
    ballot(r, "alice", "Approve")
    ballot(r, "bob", "Abstain")
    ballot(r, "carol", "Abstain")                         # unreachable now: 1 + 0 < 3
    r.denied("quorum not met: 1 effective voters of 3 participants (threshold: 100 percentage)",
             action="quorum.rejected", outcome_positive=False)


def test_quorum_abstentions_count_toward_quorum_when_configured():
    rules = {"threshold": {"value": 2}, "abstention": {"counts_toward_quorum": True, "interpretation": "ignored"}}
    r = quorum(rules, required=1)
    ballot(r, "alice", "Approve")
    ballot(r, "bob", "Abstain")
    ballot(r, "carol", "Abstain")
    r.commits(action="quorum.rejected", outcome_positive=False)


def test_quorum_abstentions_do_not_count_by_default():
    r = quorum({"threshold": {"value": 2}, "abstention": {"interpretation": "implicit_reject"}}, required=1)
    ballot(r, "alice", "Approve")
    ballot(r, "bob", "Abstain")
    ballot(r, "carol", "Abstain")
    r.denied("quorum not met: 1 effective voters of 3 participants (threshold: 2 n_of_m)")


def test_quorum_threshold_type_key_is_ignored():
    r = quorum({"threshold": {"threshold_type": "percentage", "value": 60}}, required=1)   # R = 60: unreachable
    r.denied("quorum not met: 0 effective voters of 3 participants (threshold: 60 n_of_m)")


def test_quorum_weighted_type_counts_as_a_count():
    r = quorum({"threshold": {"type": "weighted", "value": 1}}, required=3)
    ballot(r, "alice", "Approve")
    r.commits()


def test_quorum_request_bound_checked_despite_override():
    r = Run(QUORUM, ["alice", "bob"], "coord", rules={"threshold": {"value": 1}})
    r.rejected("InvalidPayload", "coord", "ApprovalRequest",
               quorum_pb2.ApprovalRequestPayload(request_id="r1", required_approvals=0))
    r.rejected("InvalidPayload", "coord", "ApprovalRequest",
               quorum_pb2.ApprovalRequestPayload(request_id="r1", required_approvals=3))


def test_quorum_override_ignores_schema_version_but_evaluator_denies():
    r = quorum({"threshold": {"value": 1}}, required=3, schema_version=2)
    ballot(r, "alice", "Approve")
    r.denied("unsupported policy schema version: 2 (supported: 1)")


def test_quorum_evaluator_passes_without_threshold():
    r = quorum({"abstention": {"counts_toward_quorum": True}}, required=1)
    ballot(r, "alice", "Approve")
    r.commits()


def test_quorum_state_shape():
    r = Run(QUORUM, ["alice", "bob"], "coord")
    r.ok("coord", "ApprovalRequest", quorum_pb2.ApprovalRequestPayload(
        request_id="r1", action="deploy", summary="v2", details=b"\x01", required_approvals=2))
    ballot(r, "alice", "Approve")
    ballot(r, "bob", "Abstain")
    assert r.phase == "Voting"
    assert r.state == {
        "request": {"request_id": "r1", "action": "deploy", "summary": "v2", "details": [1],
                    "required_approvals": 2, "requested_by": "coord"},
        "ballots": {"alice": {"request_id": "r1", "choice": "Approve", "sender": "alice", "reason": "because"},
                    "bob": {"request_id": "r1", "choice": "Abstain", "sender": "bob", "reason": "because"}},
    }
    r.commits(action="quorum.rejected", outcome_positive=False)       # 1 + 0 < 2: unreachable
    assert r.replayed().state == r.state


# ==================================================================================================
# Multi-round state and resolution (§7.4, §7.6)
# ==================================================================================================

def test_multi_round_state_and_resolution():
    r = Run(MULTI_ROUND, ["zed", "amy"], "coord")
    assert r.state == {"round": 0, "participants": ["zed", "amy"], "contributions": {},
                       "convergence_type": "all_equal", "converged": False}
    r.ok("zed", "Contribute", b'{"value":"a"}')
    r.ok("amy", "Contribute", b'{"value":"b"}')
    r.ok("amy", "Contribute", b'{"value":"b"}')            # identical: no round increment
    assert r.state["round"] == 2 and r.phase == "Collecting"
    r.ok("amy", "Contribute", '["a\\"\u00e9\\n"]'.encode())
    r.ok("zed", "Contribute", '{"value":"a\\"\u00e9\\n"}'.encode())
    assert r.phase == "Converged"
    assert r.state == {"round": 4, "participants": ["zed", "amy"],
                       "contributions": {"zed": 'a"\u00e9\n', "amy": 'a"\u00e9\n'},
                       "convergence_type": "all_equal", "converged": True}
    r.commits(action="multi_round.converged")
    assert r.session.resolution == (
        '{"converged_value":"a\\"\u00e9\\n","round":4,"final":{"amy":"a\\"\u00e9\\n","zed":"a\\"\u00e9\\n"}}'
    ).encode("utf-8")
    assert r.phase == "Committed"
    assert r.replayed().resolution == r.session.resolution


def test_multi_round_descriptor_is_an_extension():
    reg = registry()
    assert [d.mode for d in reg.extensions] == [MULTI_ROUND]
    d = reg.get(MULTI_ROUND)
    assert not d.standards_track and d.strict_start
    assert d.descriptor.title == "Multi-Round Mode" and list(d.descriptor.message_types) == [
        "SessionStart", "Contribute", "Commitment"]
