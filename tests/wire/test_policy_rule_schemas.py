"""A mode's policy rule schema comes from its spec only (`policy_rules`, by name or written out in YAML):
RegisterPolicy checks rules against the schema of the target mode's compiled spec, so a mode written
in YAML alone brings its own schema. In-process against the registries, and over the wire with a
spec directory."""
from __future__ import annotations

import json

import pytest
from macp.v1 import policy_pb2

from macp_runtime.codegen import SpecError, compile_spec, load_modes, load_spec_text
from macp_runtime.registries import profile as profiles
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.specs.hooks import governance, policy_rules
from macp_runtime.specs.hooks.policy_rules import rules_for

from tests.support import bearer

P = "INVALID_POLICY_DEFINITION: "
MODE = "ext.poll_rules.v1"

SPEC = """
spec_version: 1
mode: ext.poll_rules.v1
version: 1.0.0
descriptor:
  message_types: [SessionStart, Answer, Commitment]
  terminal_message_types: [Commitment]
payloads:
  Answer: json
  Commitment: macp.v1.CommitmentPayload
phases: {initial: Open, names: [Open, Done]}
policy_rules:
  answers:
    min_answers: [u32, 1]
    options: [[str], ["yes", "no"]]
    weights: [[map, num], {}]
  commitment:
    authority: [str, initiator_only]
    designated_roles: [[str], []]
transitions:
  - {message: Answer, from: [Open], to: Open, senders: [participant]}
commitment: {message: Commitment, from: [Open], to: Done, senders: [initiator]}
"""


def compiled(text: str = SPEC, name: str = "poll_rules.yaml"):
    return compile_spec(load_spec_text(text, name), name)


def registries(profile: str):
    prof = profiles.get(profile)
    modes = ModeRegistry(load_modes(prof.spec_dirs()) + [compiled()])
    return modes, PolicyRegistry(profile=prof, modes=modes)


def reg(policies: PolicyRegistry, rules, mode=MODE, policy_id="p.poll") -> str | None:
    return policies.register(policy_id, mode, "", json.dumps(rules), 1)


def test_a_written_out_schema_compiles_to_the_rule_schema_form():
    schema = compiled().policy_schema
    assert schema == {"answers": {"min_answers": ("u32", 1), "options": (["str"], ["yes", "no"]),
                                  "weights": (("map", "num"), {})},
                      "commitment": {"authority": ("str", "initiator_only"), "designated_roles": (["str"], [])}}
    assert rules_for(None, schema)["answers"] == {"min_answers": 1, "options": ["yes", "no"], "weights": {}}


def test_the_built_in_specs_name_their_schemas():
    v040 = {m.name: m.policy_schema for m in load_modes()}
    current = {m.name: m.policy_schema for m in load_modes(profiles.get("current").spec_dirs())}
    assert v040["macp.mode.quorum.v1"] is policy_rules.QUORUM_SCHEMA
    assert current["macp.mode.quorum.v1"] is governance.QUORUM_SCHEMA
    assert current["macp.mode.decision.v1"] is governance.DECISION_SCHEMA
    # the current line's Decision schema is v0.4.0's plus its own keys, written once
    assert governance.DECISION_SCHEMA["voting"] is policy_rules.DECISION_SCHEMA["voting"]
    assert set(governance.QUORUM_SCHEMA["commitment"]) == {"authority", "designated_roles"}


@pytest.mark.parametrize("rules, problem", [
    ("{answers: {min_answers: [int, 1]}}", "unknown rule type 'int'"),
    ("{answers: {min_answers: [u32, -1]}}", "the default does not have the key's type"),
    ("{answers: {options: [[str], [1]]}}", "the default does not have the key's type"),
    ("{answers: {min_answers: u32}}", "policy_rules.answers.min_answers"),   # the format's schema
    ("{answers: {}}", "a rule group is a non-empty mapping"),
    ("nope.SCHEMA", "unknown rule schema 'nope.SCHEMA'"),
])
def test_a_bad_schema_is_a_spec_error_naming_the_key(rules, problem):
    text = SPEC[:SPEC.index("policy_rules:")] + f"policy_rules: {rules}\n" + SPEC[SPEC.index("transitions:"):]
    with pytest.raises(SpecError) as info:
        compiled(text)
    assert problem in str(info.value)
    assert "policy_rules" in str(info.value)


def test_current_closes_the_mode_s_own_schema():
    _, policies = registries("current")
    assert reg(policies, {"answers": {"min_answers": 2, "options": ["a", "b"]}, "_note": "x"}) is None
    assert reg(policies, {"answers": {"colour": "red"}}, policy_id="p.2") == (
        P + f"rules do not match schema for mode '{MODE}': unknown field `colour` at rules.answers.colour")
    assert reg(policies, {"answers": {"min_answers": "two"}}, policy_id="p.3").startswith(
        P + f"rules do not match schema for mode '{MODE}': invalid type")
    assert reg(policies, {"commitment": {"authority": "anyone"}}, policy_id="p.4") == (
        P + "commitment.authority 'anyone' is not one of: initiator_only, any_participant, designated_role")


def test_v040_type_checks_the_mode_s_own_schema():
    _, policies = registries("v0.4.0")
    assert reg(policies, {"answers": {"min_answers": 2}, "extra": 1}) is None     # unknown keys ignored
    assert reg(policies, {"answers": {"min_answers": -2}}, policy_id="p.2").startswith(
        f"rules do not match schema for mode '{MODE}': invalid type")


def test_a_mode_the_registry_does_not_know_takes_any_object():
    policies = PolicyRegistry(profile=profiles.get("current"))   # the profile's spec files only
    assert reg(policies, {"answers": {"colour": "red"}}) is None


def test_an_extension_schema_does_not_widen_the_wildcard():
    _, policies = registries("current")
    assert reg(policies, {"answers": {"min_answers": 1}}, mode="*").startswith(
        P + "rules do not match schema for mode '*': unknown field `answers`")
    assert reg(policies, {"threshold": {"type": "n_of_m", "value": 2}, "voting": {"algorithm": "majority"}},
               mode="*", policy_id="p.any") is None


def test_register_policy_over_the_wire_checks_a_yaml_mode_s_schema(server_factory, tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "poll_rules.yaml").write_text(SPEC)
    srv = server_factory(env={"MACP_SPECS_DIR": str(specs), "MACP_PROTOCOL_PROFILE": "current"})
    stub = srv.stub()

    def register(policy_id, rules):
        return stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
            policy_id=policy_id, mode=MODE, rules=json.dumps(rules), schema_version=1)), metadata=bearer("admin"))

    resp = register("poll.bad", {"answers": {"options": "yes"}})
    assert not resp.ok and resp.error.startswith(P + f"rules do not match schema for mode '{MODE}'")
    resp = register("poll.ok", {"answers": {"options": ["yes", "no", "maybe"]}})
    assert (resp.ok, resp.error) == (True, "")
