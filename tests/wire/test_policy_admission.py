"""RegisterPolicy admission under the current profile (../shared/spec/current.md §13.2–§13.3): closed
rule objects, value domains, schema versions 1–3, the reserved policy.std. namespace and its three
pre-registered profiles; in-process against the registry and over the wire with the SDK's builders.
Under v0.4.0 the registry answers as before (tests/*/test_policies_*.py).
"""
from __future__ import annotations

import json

import pytest
from macp.v1 import policy_pb2
from macp_sdk.policy import (QuorumThreshold, VotingRules, build_decision_policy, build_handoff_policy,
                             build_proposal_policy, build_quorum_policy, build_task_policy)

from macp_runtime.registries import profile as profiles
from macp_runtime.registries.policies import PolicyRegistry

from tests.support import bearer

PROFILE = "current"
P = "INVALID_POLICY_DEFINITION: "
DECISION = "macp.mode.decision.v1"
QUORUM = "macp.mode.quorum.v1"


def registry(profile="current") -> PolicyRegistry:
    return PolicyRegistry(profile=profiles.get(profile))


def reg(rules, mode=DECISION, policy_id="p.test", schema_version=1, registry_=None):
    text = rules if isinstance(rules, str) else json.dumps(rules)
    return (registry_ or registry()).register(policy_id, mode, "", text, schema_version)


REFUSED = [
    ("bad-json", "{", DECISION, 1, P + "rules is not valid JSON"),
    ("schema-0", {}, DECISION, 0, P + "schema_version must be > 0"),
    ("schema-4", {}, DECISION, 4, P + "unsupported schema_version 4 (supported: 1, 2, 3)"),
    ("not-object", [], DECISION, 1, P + "rules must be a JSON object"),
    ("unknown-key", {"voting": {"algo": "majority"}}, DECISION, 1,
     P + "rules do not match schema for mode 'macp.mode.decision.v1': unknown field `algo`"),
    ("unknown-top", {"votes": {}}, DECISION, 1, P + "rules do not match schema"),
    ("x-extension", {"x-acme.rules": {}}, DECISION, 1,
     P + "rule extension 'x-acme.rules' is not registered on this runtime"),
    ("type", {"voting": {"threshold": "high"}}, DECISION, 1, P + "rules do not match schema"),
    ("wrong-case", {"voting": {"algorithm": "Majority"}}, DECISION, 1,
     P + "voting.algorithm 'Majority' is not one of: none, majority, supermajority, unanimous, weighted, plurality"),
    ("supermajority-default", {"voting": {"algorithm": "supermajority"}}, DECISION, 1,
     P + "voting.algorithm 'supermajority' requires voting.threshold > 0.5"),
    ("threshold-range", {"voting": {"threshold": 1.5}}, DECISION, 1, P + "voting.threshold 1.5 is out of range"),
    ("weights", {"voting": {"algorithm": "weighted", "weights": {"b": 0, "a": -1}}}, DECISION, 1,
     P + "voting.weights has non-positive values for: 'a', 'b'"),
    ("weighted-empty", {"voting": {"algorithm": "weighted"}}, DECISION, 1,
     P + "voting.algorithm 'weighted' requires non-empty voting.weights"),
    ("quorum-type", {"voting": {"quorum": {"type": "n_of_m"}}}, DECISION, 1,
     P + "voting.quorum.type 'n_of_m' is not one of: count, percentage"),
    ("veto-threshold", {"objection_handling": {"veto_threshold": 0}}, DECISION, 1,
     P + "objection_handling.veto_threshold 0 is out of range: must be >= 1"),
    ("objection-action", {"objection_handling": {"critical_objection_action": "ignore"}}, DECISION, 2,
     P + "objection_handling.critical_objection_action 'ignore' is not one of"),
    ("authority", {"commitment": {"authority": "anyone"}}, "macp.mode.task.v1", 1,
     P + "commitment.authority 'anyone' is not one of"),
    ("task-closed-commitment", {"commitment": {"require_vote_quorum": True}}, "macp.mode.task.v1", 1,
     P + "rules do not match schema for mode 'macp.mode.task.v1': unknown field `require_vote_quorum`"),
    ("designated", {"commitment": {"authority": "designated_role"}}, "macp.mode.handoff.v1", 1,
     P + "commitment.authority 'designated_role' requires non-empty commitment.designated_roles"),
    ("quorum-count-alias", {"threshold": {"type": "count", "value": 2}}, QUORUM, 1,
     P + "threshold.type 'count' is not one of: n_of_m, percentage"),
    ("quorum-zero", {"threshold": {"type": "n_of_m", "value": 0}}, QUORUM, 1,
     P + "threshold.value 0 is out of range: must be greater than 0"),
    ("quorum-fraction", {"threshold": {"value": 1.5}}, QUORUM, 1, P + "threshold.value 1.5 must be an integer"),
    ("quorum-percent", {"threshold": {"type": "percentage", "value": 101}}, QUORUM, 1,
     P + "threshold.value 101 is out of range: must be <= 100"),
    ("criterion", {"acceptance": {"criterion": "majority"}}, "macp.mode.proposal.v1", 1,
     P + "acceptance.criterion 'majority' is not one of"),
    ("std-unassigned", {}, DECISION, 1, P + "policy_id 'policy.std.nonesuch' is in the reserved 'policy.std.' namespace"),
    ("std-not-canonical", {"voting": {"algorithm": "majority"}}, DECISION, 1,
     P + "policy_id 'policy.std.majority' is reserved by RFC-MACP-0012 §2.2"),
]


@pytest.mark.parametrize("rules,mode,version,error", [pytest.param(*r[1:], id=r[0]) for r in REFUSED])
def test_refused(rules, mode, version, error):
    pid = {"std-unassigned": "policy.std.nonesuch", "std-not-canonical": "policy.std.majority"}
    name = next((k for k, *rest in REFUSED if rest == [rules, mode, version, error]), "")
    got = reg(rules, mode, policy_id=pid.get(name, "p.test"), schema_version=version)
    assert got is not None and got.startswith(error), got


ADMITTED = [
    ("empty", {}, DECISION, 3),
    ("quorum-integral-float", {"threshold": {"type": "percentage", "value": 75.0}}, QUORUM, 1),
    ("quorum-no-bar", {"threshold": {}}, QUORUM, 1),
    ("annotations", {"_comment": [1, 2], "$schema": "x", "voting": {"algorithm": "majority"}}, DECISION, 2),
    ("wildcard-union", {"commitment": {"require_vote_quorum": True}, "threshold": {"type": "n_of_m", "value": 2},
                        "acceptance": {"criterion": "initiator", "implicit_accept_timeout_ms": 5}}, "*", 1),
    ("extension-mode-anything", {"whatever": {"goes": 1}}, "ext.custom.v1", 1),
    ("v2-keys-under-v1", {"commitment": {"allow_decline_over_approval": True},
                          "objection_handling": {"critical_objection_action": "hold"}}, DECISION, 1),
]


@pytest.mark.parametrize("rules,mode,version", [pytest.param(*r[1:], id=r[0]) for r in ADMITTED])
def test_admitted(rules, mode, version):
    assert reg(rules, mode, schema_version=version) is None


def test_builtin_profiles_are_listed_and_reserved():
    r = registry()
    ids = [v.policy_id for v in r.list()]
    assert ids == ["policy.default", "policy.std.majority", "policy.std.supermajority", "policy.std.unanimous"]
    assert [v.policy_id for v in r.list("macp.mode.task.v1")] == ["policy.default"]
    assert r.describe("policy.std.majority").rules == (
        '{"commitment":{"require_vote_quorum":true},"voting":{"algorithm":"majority","quorum":{"type":"count",'
        '"value":1},"threshold":0.5}}')
    # the canonical definition re-registered lands on the duplicate check
    canonical = json.loads(r.describe("policy.std.unanimous").rules)
    assert reg(canonical, policy_id="policy.std.unanimous", registry_=r) == \
        "policy 'policy.std.unanimous' is already registered"
    assert r.unregister("policy.std.majority") == \
        "cannot unregister the built-in reserved policy 'policy.std.majority' (RFC-MACP-0012 §2.2)"
    assert r.unregister("policy.std.nonesuch") == "policy 'policy.std.nonesuch' not found"
    assert r.bind("policy.std.majority", DECISION)[1] == "policy.std.majority"


def test_v040_registry_is_unchanged():
    r = registry("v0.4.0")
    assert [v.policy_id for v in r.list()] == ["policy.default"]
    assert reg({"voting": {"algo": "x"}}, registry_=r) is None            # unknown keys ignored
    assert reg("{", policy_id="p.bad", registry_=r) is None               # invalid JSON silently {}
    assert reg({}, policy_id="policy.std.majority", registry_=r) is None  # an ordinary id


def test_sdk_builders_register_over_the_wire(runtime_server):
    stub = runtime_server.stub()
    built = [build_decision_policy("sdk.d3", "", voting=VotingRules(algorithm="majority")),
             build_decision_policy("sdk.d1", "", schema_version=1),
             build_quorum_policy("sdk.q", "", threshold=QuorumThreshold(type="n_of_m", value=2)),
             build_proposal_policy("sdk.p", ""), build_task_policy("sdk.t", ""), build_handoff_policy("sdk.h", "")]
    for descriptor in built:
        resp = stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=descriptor),
                                   metadata=bearer("admin"))
        assert (resp.ok, resp.error) == (True, ""), descriptor.policy_id
    resp = stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id="bad.sv", mode=DECISION, rules="{}", schema_version=7)), metadata=bearer("admin"))
    assert (resp.ok, resp.error) == (False, P + "unsupported schema_version 7 (supported: 1, 2, 3)")
    listed = [d.policy_id for d in stub.ListPolicies(policy_pb2.ListPoliciesRequest(mode=DECISION),
                                                     metadata=bearer("admin")).descriptors]
    assert listed[:4] == ["policy.default", "policy.std.majority", "policy.std.supermajority", "policy.std.unanimous"]
