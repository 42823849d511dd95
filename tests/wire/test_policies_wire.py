"""Governance policies over gRPC: the policy RPCs, binding at SessionStart, denials at commit time.

Spec: modes.md §10.1 (descriptor conversion, canonical rules output), §10.2 (policy.default),
§10.3 (RegisterPolicy validation order and texts), §10.4 (Unregister/Get/List/Watch), §10.5
(binding), §10.8 (evaluators), §10.10 (how a denial surfaces on Send); runtime.md §8.9 (transport).
Project decision (not v0.4.0, where registrations are in memory only): registered policies survive a
restart.
"""
from __future__ import annotations

import json
import threading
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.modes.handoff.v1 import handoff_pb2
from macp.modes.proposal.v1 import proposal_pb2
from macp.modes.quorum.v1 import quorum_pb2
from macp.modes.task.v1 import task_pb2
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED

DECISION = "macp.mode.decision.v1"
PROPOSAL = "macp.mode.proposal.v1"
TASK = "macp.mode.task.v1"
HANDOFF = "macp.mode.handoff.v1"
QUORUM = "macp.mode.quorum.v1"

ADMIN = bearer("admin")
DEFAULT_RULES = (
    '{"commitment":{"authority":"initiator_only","designated_roles":[],"require_vote_quorum":false},'
    '"evaluation":{"minimum_confidence":0.0,"required_before_voting":false},'
    '"objection_handling":{"critical_severity_vetoes":false,"veto_threshold":1},'
    '"voting":{"algorithm":"none","quorum":{"type":"count","value":0}}}'
)
DEFAULT_DESCRIPTION = "Default policy \u2014 mode built-in rules apply with no additional governance constraints"


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


def unique(prefix="policy.test") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


def descriptor(policy_id, mode="*", rules="{}", schema_version=1, description="test policy", **fields):
    return policy_pb2.PolicyDescriptor(policy_id=policy_id, mode=mode, description=description, rules=rules,
                                       schema_version=schema_version, **fields)


def register(stub, policy_id, mode="*", rules="{}", schema_version=1, **fields):
    rules = rules if isinstance(rules, str) else json.dumps(rules)
    return stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(
        policy_descriptor=descriptor(policy_id, mode, rules, schema_version, **fields)), metadata=ADMIN)


def get(stub, policy_id):
    return stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id=policy_id), metadata=ADMIN).policy_descriptor


def ok_register(stub, mode="*", rules="{}", schema_version=1, prefix="policy.test") -> str:
    policy_id = unique(prefix)
    resp = register(stub, policy_id, mode, rules, schema_version)
    assert resp.ok and resp.error == "", resp.error
    return policy_id


# --- RegisterPolicy validation (§10.3), in order ---------------------------------------------------

@pytest.mark.parametrize("policy_id, mode, rules, schema_version, error", [
    # 1. blank id (Unicode White_Space counts as blank)
    ("", "*", "{}", 1, "policy_id must not be empty"),
    (" \t\u3000", "*", "{}", 1, "policy_id must not be empty"),
    # 2. reserved id, checked before the schema version
    ("policy.default", "*", "{}", 1, "cannot register with reserved policy_id 'policy.default'"),
    ("policy.default", "*", "{}", 0, "cannot register with reserved policy_id 'policy.default'"),
    # 3. schema_version 0, checked before the rules
    ("p.schema0", "*", "[]", 0, "schema_version must be > 0"),
    # 4. the parsed rules are not an object
    ("p.array", "*", "[]", 1, "rules must be a JSON object"),
    ("p.number", "*", "1", 1, "rules must be a JSON object"),
    ("p.string", "*", '"x"', 1, "rules must be a JSON object"),
    ("p.null", "*", "null", 1, "rules must be a JSON object"),
    # 6. weighted without weights (decision and *)
    ("p.weighted", DECISION, '{"voting":{"algorithm":"weighted"}}', 1,
     "voting.algorithm 'weighted' requires non-empty voting.weights"),
    ("p.weighted.any", "*", '{"voting":{"algorithm":"weighted","weights":{}}}', 1,
     "voting.algorithm 'weighted' requires non-empty voting.weights"),
    # 7. supermajority needs threshold > 0.5, and the default threshold is 0.5
    ("p.super", "*", '{"voting":{"algorithm":"supermajority"}}', 1,
     "voting.algorithm 'supermajority' requires voting.threshold > 0.5"),
    ("p.super.half", DECISION, '{"voting":{"algorithm":"supermajority","threshold":0.5}}', 1,
     "voting.algorithm 'supermajority' requires voting.threshold > 0.5"),
    # 8. designated_role without roles, in any mode (even an untyped extension mode)
    ("p.designated", DECISION, '{"commitment":{"authority":"designated_role"}}', 1,
     "commitment.authority 'designated_role' requires non-empty commitment.designated_roles"),
    ("p.designated.task", TASK, '{"commitment":{"authority":"designated_role","designated_roles":[]}}', 1,
     "commitment.authority 'designated_role' requires non-empty commitment.designated_roles"),
    ("p.designated.ext", "ext.custom.v1", '{"commitment":{"authority":"designated_role"}}', 1,
     "commitment.authority 'designated_role' requires non-empty commitment.designated_roles"),
])
def test_register_validation_texts(stub, policy_id, mode, rules, schema_version, error):
    resp = register(stub, policy_id, mode, rules, schema_version)
    assert (resp.ok, resp.error) == (False, error)


@pytest.mark.parametrize("mode, rules", [
    ("*", '{"voting":5}'),
    ("*", '{"voting":{"threshold":"x"}}'),
    (DECISION, '{"voting":{"quorum":{"value":null}}}'),
    (DECISION, '{"objection_handling":{"veto_threshold":1.0}}'),
    (DECISION, '{"commitment":{"designated_roles":[1]}}'),
    (PROPOSAL, '{"counter_proposal":{"max_rounds":-1}}'),
    (PROPOSAL, '{"rejection":{"terminal_on_any_reject":"true"}}'),
    (TASK, '{"completion":{"require_output":1}}'),
    (HANDOFF, '{"acceptance":{"implicit_accept_timeout_ms":1e3}}'),
    (QUORUM, '{"threshold":{"value":"2"}}'),
    (QUORUM, '{"abstention":[]}'),
])
def test_register_rule_schema_errors(stub, mode, rules):
    resp = register(stub, unique(), mode, rules)
    assert not resp.ok
    assert resp.error.startswith(f"rules do not match schema for mode '{mode}': "), resp.error


@pytest.mark.parametrize("mode, rules", [
    ("ext.custom.v1", '{"voting":5,"anything":[1,2]}'),   # extension modes are not typed
    ("", '{"voting":"x"}'),                               # nor is an empty mode
    (PROPOSAL, '{"voting":"x"}'),                         # unknown keys are ignored
    (QUORUM, '{"threshold":{"type":"weighted","value":2.5}}'),   # enum values are not validated
    ("*", '{"voting":{"algorithm":"supermajority","threshold":0.51},"unknown":{"x":null}}'),
    ("*", '{"voting":{"algorithm":"weighted","weights":{"a":2}}}'),
])
def test_register_accepts_type_correct_rules(stub, mode, rules):
    resp = register(stub, unique(), mode, rules)
    assert (resp.ok, resp.error) == (True, "")


def test_register_order_rules_before_duplicate(stub):
    policy_id = ok_register(stub)
    assert register(stub, policy_id, "*", "[]").error == "rules must be a JSON object"
    assert register(stub, policy_id, "*", '{"voting":{"algorithm":"weighted"}}').error == \
        "voting.algorithm 'weighted' requires non-empty voting.weights"
    resp = register(stub, policy_id, "*", "{}")
    assert (resp.ok, resp.error) == (False, f"policy '{policy_id}' is already registered")


def test_register_schema_version_other_than_one_is_accepted(stub):
    assert get(stub, ok_register(stub, schema_version=2)).schema_version == 2


@pytest.mark.parametrize("text", ["not json", "{", "{'a':1}", '{"a":NaN}', '{"a":1e400}', "", '{"a":1} x'])
def test_invalid_json_rules_silently_become_empty_object(stub, text):
    policy_id = unique()
    resp = register(stub, policy_id, DECISION, text)
    assert (resp.ok, resp.error) == (True, "")
    assert get(stub, policy_id).rules == "{}"


def test_register_without_descriptor_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(), metadata=ADMIN)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "descriptor required"


@pytest.mark.parametrize("call, request_", [
    ("RegisterPolicy", policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor("p.unauth"))),
    ("UnregisterPolicy", policy_pb2.UnregisterPolicyRequest(policy_id="p.unauth")),
    ("GetPolicy", policy_pb2.GetPolicyRequest(policy_id="policy.default")),
    ("ListPolicies", policy_pb2.ListPoliciesRequest()),
])
def test_policy_rpcs_need_authentication(stub, call, request_):
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, call)(request_)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_register_and_unregister_need_can_manage_mode_registry(inprocess_factory):
    srv = inprocess_factory(env={"MACP_AUTH_TOKENS_JSON": json.dumps([
        {"token": "tok-admin", "sender": "admin", "can_manage_mode_registry": True},
        {"token": "tok-user", "sender": "user"},
    ])})
    stub = srv.stub()
    admin, user = bearer("tok-admin"), bearer("tok-user")
    for call, request_ in (
            ("RegisterPolicy", policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor("p.perm"))),
            ("RegisterPolicy", policy_pb2.RegisterPolicyRequest()),          # permission before the descriptor
            ("UnregisterPolicy", policy_pb2.UnregisterPolicyRequest(policy_id="policy.default"))):
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, call)(request_, metadata=user)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
    assert stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor("p.perm")),
                               metadata=admin).ok
    # reading needs only an identity
    assert stub.GetPolicy(policy_pb2.GetPolicyRequest(policy_id="p.perm"), metadata=user).policy_descriptor.mode == "*"
    assert len(stub.ListPolicies(policy_pb2.ListPoliciesRequest(), metadata=user).descriptors) == 2
    with pytest.raises(grpc.RpcError) as err:
        stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="p.perm"), metadata=user)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="p.perm"), metadata=admin).ok


# --- Unregister / Get / List (§10.4) -------------------------------------------------------------

def test_unregister(stub):
    policy_id = ok_register(stub)
    resp = stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id=policy_id), metadata=ADMIN)
    assert (resp.ok, resp.error) == (True, "")
    resp = stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id=policy_id), metadata=ADMIN)
    assert (resp.ok, resp.error) == (False, f"policy '{policy_id}' not found")
    resp = stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="policy.default"), metadata=ADMIN)
    assert (resp.ok, resp.error) == (False, "cannot unregister the built-in default policy")
    # the id can be registered again
    assert register(stub, policy_id).ok


def test_get_unknown_policy_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        get(stub, "policy.nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "Policy 'policy.nope' not found"


def test_default_policy_exact(stub):
    d = get(stub, "policy.default")
    assert (d.policy_id, d.mode, d.description, d.schema_version, d.registered_at_unix_ms) == \
        ("policy.default", "*", DEFAULT_DESCRIPTION, 1, 0)
    assert d.rules == DEFAULT_RULES


def test_get_returns_descriptor_as_registered_with_canonical_rules(stub):
    policy_id = unique()
    text = ('{ "zeta": {"b": 2, "a": [3, {"y": 1, "x": 0.7}]},\n "é": "ü\u00e9\\n", "alpha": 60.0,'
            ' "tiny": 1e-7, "big": 1e16, "huge": 1.5e20, "zero": 0.0, "int": 60, "neg": -0, "t": true,'
            ' "n": null, "small": 0.00001 }')
    resp = stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor(
        policy_id, "ext.anything.v1", text, 3, description="Beschreibung \u2014 ok",
        registered_at_unix_ms=123456)), metadata=ADMIN)
    assert resp.ok, resp.error
    d = get(stub, policy_id)
    assert (d.policy_id, d.mode, d.description, d.schema_version, d.registered_at_unix_ms) == \
        (policy_id, "ext.anything.v1", "Beschreibung \u2014 ok", 3, 0)
    assert d.rules == ('{"alpha":60.0,"big":1e16,"huge":1.5e20,"int":60,"n":null,"neg":-0.0,'
                       '"small":0.00001,"t":true,"tiny":1e-7,"zero":0.0,'
                       '"zeta":{"a":[3,{"x":0.7,"y":1}],"b":2},"é":"üé\\n"}')


def test_list_filter_and_order(runtime_server):
    stub = runtime_server.stub()
    tag = uuid.uuid4().hex[:8]
    mode = f"ext.list{tag}.v1"
    ids = {
        "z": ok_register(stub, mode=mode, prefix=f"list{tag}.z"),
        "a": ok_register(stub, mode="*", prefix=f"list{tag}.a"),
        "m": ok_register(stub, mode=TASK, prefix=f"list{tag}.m"),
        "b": ok_register(stub, mode=mode, prefix=f"list{tag}.b"),
    }

    def listed(filter_mode):
        return [d.policy_id for d in stub.ListPolicies(policy_pb2.ListPoliciesRequest(mode=filter_mode),
                                                        metadata=ADMIN).descriptors]

    everything = listed("")
    assert everything == sorted(everything)
    assert set(ids.values()) | {"policy.default"} <= set(everything)
    filtered = listed(mode)
    assert filtered == sorted(filtered)
    mine = [p for p in filtered if p.startswith(f"list{tag}.")]
    assert mine == sorted([ids["a"], ids["b"], ids["z"]])      # equal or '*', never the task one
    assert "policy.default" in filtered
    assert all(get(stub, p).mode in (mode, "*") for p in filtered)
    assert ids["m"] in listed(TASK) and ids["z"] not in listed(TASK)


# --- WatchPolicies -------------------------------------------------------------------------------

def test_watch_policies_initial_list_then_one_list_per_change(inprocess_factory):
    srv = inprocess_factory()
    stub = srv.stub()
    call = stub.WatchPolicies(policy_pb2.WatchPoliciesRequest(), metadata=bearer("w"))   # any identity
    first = next(call)
    assert [d.policy_id for d in first.descriptors] == ["policy.default"]
    assert first.descriptors[0].rules == DEFAULT_RULES
    assert first.observed_at_unix_ms > 0

    assert register(stub, "w.b", TASK).ok
    assert not register(stub, "w.b", TASK).ok            # failures notify nobody
    assert register(stub, "w.a", "*", '{"voting":{"threshold":0.6}}').ok
    assert stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="w.b"), metadata=ADMIN).ok
    assert not stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="w.b"), metadata=ADMIN).ok

    lists = [[d.policy_id for d in next(call).descriptors] for _ in range(3)]
    assert lists == [["policy.default", "w.b"], ["policy.default", "w.a", "w.b"], ["policy.default", "w.a"]]
    call.cancel()

    # a new watcher starts with the current list, rules canonical
    again = next(stub.WatchPolicies(policy_pb2.WatchPoliciesRequest(), metadata=bearer("w")))
    assert [(d.policy_id, d.rules) for d in again.descriptors] == \
        [("policy.default", DEFAULT_RULES), ("w.a", '{"voting":{"threshold":0.6}}')]


def test_watch_policies_ends_ok_on_shutdown(server_factory):
    srv = server_factory()
    channel = grpc.insecure_channel(srv.target)    # its own channel: stop() closes the shared one
    call = core_pb2_grpc.MACPRuntimeServiceStub(channel).WatchPolicies(policy_pb2.WatchPoliciesRequest(),
                                                                     metadata=bearer("w"))
    next(call)
    done = threading.Event()
    rest = []

    def drain():
        try:
            rest.extend(call)
        except grpc.RpcError as exc:
            rest.append(exc.code())
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    assert srv.stop() == 0
    assert done.wait(10)
    assert rest == []
    channel.close()


# --- persistence (project decision) --------------------------------------------------------------

def test_registered_policies_survive_kill_and_restart(server_factory):
    srv = server_factory()
    stub = srv.stub()
    rules = '{"voting":{"algorithm":"majority","threshold":0.7},"é":1e-7}'
    assert register(stub, "keep.me", DECISION, rules, description="kept").ok
    assert register(stub, "drop.me", "*").ok
    assert stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id="drop.me"), metadata=ADMIN).ok
    before = get(stub, "keep.me")

    srv.kill()                                     # SIGKILL right after the acknowledgement
    srv.start()
    stub = srv.stub()
    assert get(stub, "keep.me") == before
    assert before.rules == '{"voting":{"algorithm":"majority","threshold":0.7},"é":1e-7}'
    listed = [d.policy_id for d in stub.ListPolicies(policy_pb2.ListPoliciesRequest(), metadata=ADMIN).descriptors]
    assert listed == ["keep.me", "policy.default"]
    assert get(stub, "policy.default").rules == DEFAULT_RULES
    assert register(stub, "keep.me").error == "policy 'keep.me' is already registered"
    # a session started after the restart binds the recovered policy and is governed by it
    s = DecisionRun(stub, policy="keep.me")
    s.vote_round(["APPROVE", "APPROVE", "REJECT"])
    assert_denied(s.commit(), ["majority vote failed: 66.7% approve, need >= 70.0%"])


def test_memory_only_policies_do_not_survive_restart(server_factory):
    srv = server_factory(env={"MACP_MEMORY_ONLY": "1"})
    assert register(srv.stub(), "gone.after.restart").ok
    srv.restart()
    with pytest.raises(grpc.RpcError) as err:
        get(srv.stub(), "gone.after.restart")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- binding at SessionStart (§10.5) -------------------------------------------------------------

def start(stub, mode, participants, initiator, policy_version):
    sid = new_session_id()
    ack = send(stub, envelope(mode, "SessionStart", sid, initiator,
                              start_payload(participants, policy_version=policy_version)))
    return sid, ack


def test_binding_unknown_policy(stub):
    _, ack = start(stub, DECISION, ["a", "b"], "a", "policy.missing")
    assert (ack.ok, ack.error.code, ack.error.message) == (False, "UNKNOWN_POLICY_VERSION", "UnknownPolicyVersion")


def test_binding_policy_of_another_mode(stub):
    policy_id = ok_register(stub, mode=TASK)
    _, ack = start(stub, DECISION, ["a", "b"], "a", policy_id)
    assert (ack.ok, ack.error.code, ack.error.message) == \
        (False, "INVALID_POLICY_DEFINITION", "InvalidPolicyDefinition")
    sid, ack = start(stub, TASK, ["a", "b"], "a", policy_id)
    assert ack.ok, ack.error
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("a")).metadata
    assert md.policy_version == policy_id


def test_binding_wildcard_policy_in_any_mode(stub):
    policy_id = ok_register(stub, mode="*")
    for mode, participants in ((DECISION, ["a", "b"]), (QUORUM, ["a", "b"]), ("ext.multi_round.v1", ["a", "b"])):
        _, ack = start(stub, mode, participants, "a", policy_id)
        assert ack.ok, (mode, ack.error)


def test_empty_policy_version_binds_default(stub):
    sid, ack = start(stub, DECISION, ["a", "b"], "a", "")
    assert ack.ok
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("a")).metadata
    assert md.policy_version == "policy.default"


# --- POLICY_DENIED at commit time (§10.8, §10.10) ------------------------------------------------

def assert_denied(ack, reasons):
    assert (ack.ok, ack.duplicate, ack.session_state) == (False, False, envelope_pb2.SESSION_STATE_UNSPECIFIED)
    # v0.4.0 profile: exactly the reference (the current profile adds "reason"; tests/wire/test_auction_wire.py)
    assert (ack.error.code, ack.error.message) == ("POLICY_DENIED", "PolicyDenied")
    assert ack.error.details == json.dumps({"reasons": reasons}, separators=(",", ":"),
                                           ensure_ascii=False).encode()


class Run:
    """A session of `mode` bound to `policy`, on the given stub."""

    def __init__(self, stub, mode, participants, initiator, policy):
        self.stub, self.mode, self.initiator, self.policy = stub, mode, initiator, policy
        self.sid, ack = start(stub, mode, participants, initiator, policy)
        assert ack.ok, ack.error

    def send(self, sender, message_type, payload):
        return send(self.stub, envelope(self.mode, message_type, self.sid, sender, payload))

    def must(self, sender, message_type, payload):
        ack = self.send(sender, message_type, payload)
        assert ack.ok, f"{message_type} from {sender}: {ack.error}"
        return ack

    def commit(self, action="done.approved", positive=True, sender=None):
        return self.send(sender or self.initiator, "Commitment",
                         commitment(action=action, outcome_positive=positive, policy_version=self.policy))


class DecisionRun(Run):
    VOTERS = ["alice", "bob", "carol"]

    def __init__(self, stub, policy):
        super().__init__(stub, DECISION, ["lead", *self.VOTERS], "lead", policy)
        self.must("lead", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="ship"))

    def vote_round(self, votes):
        for voter, vote in zip(self.VOTERS, votes):
            self.must(voter, "Vote", decision_pb2.VotePayload(proposal_id="p1", vote=vote))


def test_decision_majority_denied_then_resolved(stub):
    policy = ok_register(stub, DECISION, {"voting": {"algorithm": "majority", "threshold": 0.7}})
    s = DecisionRun(stub, policy)
    s.vote_round(["APPROVE", "APPROVE", "REJECT"])
    assert_denied(s.commit(), ["majority vote failed: 66.7% approve, need >= 70.0%"])
    # a Commitment from the wrong sender is FORBIDDEN before any policy evaluation
    assert s.commit(sender="alice").error.code == "FORBIDDEN"
    # a rejected Commitment consumes nothing: the same policy allows 3/3 in a new session
    s2 = DecisionRun(stub, policy)
    s2.vote_round(["APPROVE", "APPROVE", "APPROVE"])
    ack = s2.commit()
    assert (ack.ok, ack.session_state) == (True, RESOLVED)


def test_decision_several_reasons_accumulate(stub):
    policy = ok_register(stub, DECISION, {
        "voting": {"algorithm": "unanimous", "quorum": {"type": "percentage", "value": 75}},
        "commitment": {"require_vote_quorum": True},
        "objection_handling": {"critical_severity_vetoes": True},
    })
    s = DecisionRun(stub, policy)
    s.must("bob", "Objection", decision_pb2.ObjectionPayload(proposal_id="p1", reason="no", severity="CRITICAL"))
    s.vote_round(["APPROVE", "REJECT"])
    assert_denied(s.commit(), [
        "blocked by 1 blocking objection(s) (veto threshold: 1), from: bob",
        "vote quorum not met: 2 voters of 4 participants (quorum: 75 percentage)",
        "unanimous vote failed: 1 approve, 1 reject out of 4 participants",
    ])


def test_policy_unregistered_after_binding_still_governs_the_session(stub):
    policy = ok_register(stub, DECISION, {"voting": {"algorithm": "plurality"}})
    s = DecisionRun(stub, policy)
    assert stub.UnregisterPolicy(policy_pb2.UnregisterPolicyRequest(policy_id=policy), metadata=ADMIN).ok
    s.vote_round(["APPROVE", "REJECT"])
    assert_denied(s.commit(), ["plurality vote tied: 1 approve vs 1 reject"])
    # new sessions can no longer bind it
    _, ack = start(stub, DECISION, ["a", "b"], "a", policy)
    assert ack.error.code == "UNKNOWN_POLICY_VERSION"


def test_proposal_max_rounds_limits_counter_proposals(stub):
    # The evaluator's `counter-proposal limit exceeded` denial cannot be reached over the wire: the
    # same limit already refuses the extra CounterProposal at submission (modes.md §10.8.2, §3.6).
    policy = ok_register(stub, PROPOSAL, {"counter_proposal": {"max_rounds": 1}})
    s = Run(stub, PROPOSAL, ["buyer", "seller"], "buyer", policy)
    s.must("seller", "Proposal", proposal_pb2.ProposalPayload(proposal_id="o1", title="100"))
    s.must("buyer", "CounterProposal", proposal_pb2.CounterProposalPayload(
        proposal_id="o2", supersedes_proposal_id="o1", title="90"))
    ack = s.send("seller", "CounterProposal", proposal_pb2.CounterProposalPayload(
        proposal_id="o3", supersedes_proposal_id="o2", title="95"))
    assert (ack.ok, ack.error.code, ack.error.message) == (False, "INVALID_ENVELOPE", "InvalidPayload")
    for who in ("buyer", "seller"):
        s.must(who, "Accept", proposal_pb2.AcceptPayload(proposal_id="o2"))
    ack = s.commit("proposal.accepted")
    assert (ack.ok, ack.session_state) == (True, RESOLVED)


def test_task_require_output(stub):
    policy = ok_register(stub, TASK, {"completion": {"require_output": True}})
    s = Run(stub, TASK, ["planner", "worker"], "planner", policy)
    s.must("planner", "TaskRequest", task_pb2.TaskRequestPayload(task_id="t1", title="do", requested_assignee="worker"))
    s.must("worker", "TaskAccept", task_pb2.TaskAcceptPayload(task_id="t1"))
    s.must("worker", "TaskComplete", task_pb2.TaskCompletePayload(task_id="t1", summary="done, no output"))
    assert_denied(s.commit("task.completed"), ["policy requires task output before commitment"])


def test_task_reassignment_policy_reason(stub):
    s = Run(stub, TASK, ["planner", "w1", "w2"], "planner", "policy.default")
    s.must("planner", "TaskRequest", task_pb2.TaskRequestPayload(task_id="t1", title="do"))
    s.must("w1", "TaskReject", task_pb2.TaskRejectPayload(task_id="t1", reason="busy"))
    assert_denied(s.send("w2", "TaskAccept", task_pb2.TaskAcceptPayload(task_id="t1")),
                  ["reassignment after rejection not allowed by policy"])


def test_quorum_threshold_participation(stub):
    policy = ok_register(stub, QUORUM, {"threshold": {"type": "percentage", "value": 60}})
    s = Run(stub, QUORUM, ["alice", "bob", "carol"], "coordinator", policy)
    s.must("coordinator", "ApprovalRequest", quorum_pb2.ApprovalRequestPayload(
        request_id="r1", action="deploy", required_approvals=1))
    # R = ceil(60% of 3) = 2; two abstentions make it unreachable, so the session is ready ...
    s.must("alice", "Abstain", quorum_pb2.AbstainPayload(request_id="r1"))
    s.must("bob", "Abstain", quorum_pb2.AbstainPayload(request_id="r1"))
    # ... but abstentions do not count toward the evaluator's participation quorum
    assert_denied(s.commit("quorum.rejected", positive=False),
                  ["quorum not met: 0 effective voters of 3 participants (threshold: 60 percentage)"])


@pytest.mark.parametrize("mode", [DECISION, PROPOSAL, TASK, HANDOFF, QUORUM])
def test_schema_version_2_denies_every_commitment(stub, mode):
    policy = ok_register(stub, mode, {}, schema_version=2)
    if mode == DECISION:
        s = DecisionRun(stub, policy)
    elif mode == PROPOSAL:
        s = Run(stub, mode, ["buyer", "seller"], "buyer", policy)
        s.must("seller", "Proposal", proposal_pb2.ProposalPayload(proposal_id="o1"))
        for who in ("buyer", "seller"):
            s.must(who, "Accept", proposal_pb2.AcceptPayload(proposal_id="o1"))
    elif mode == TASK:
        s = Run(stub, mode, ["planner", "worker"], "planner", policy)
        s.must("planner", "TaskRequest", task_pb2.TaskRequestPayload(task_id="t1", requested_assignee="worker"))
        s.must("worker", "TaskAccept", task_pb2.TaskAcceptPayload(task_id="t1"))
        s.must("worker", "TaskComplete", task_pb2.TaskCompletePayload(task_id="t1", output=b"x"))
    elif mode == HANDOFF:
        s = Run(stub, mode, ["owner", "target"], "owner", policy)
        s.must("owner", "HandoffOffer", handoff_pb2.HandoffOfferPayload(handoff_id="h1", target_participant="target"))
        s.must("target", "HandoffAccept", handoff_pb2.HandoffAcceptPayload(handoff_id="h1"))
    else:
        s = Run(stub, mode, ["alice", "bob"], "coordinator", policy)
        s.must("coordinator", "ApprovalRequest", quorum_pb2.ApprovalRequestPayload(
            request_id="r1", required_approvals=1))
        s.must("alice", "Approve", quorum_pb2.ApprovePayload(request_id="r1"))
    assert_denied(s.commit(), ["unsupported policy schema version: 2 (supported: 1)"])
