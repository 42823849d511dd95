"""Replay the reference runtime's conformance fixtures (../shared/conformance/*.json).

Each fixture is replayed twice:
  * over gRPC against a real server: SessionStart from the initiator, every message from its sender,
    accept/reject (and the error code when given) per message, the final state via GetSession;
  * in-process (Engine + MemoryStore): the same, plus `expected_mode_state` (subset match against the
    session's mode state, with the session phase under "phase") and `expected_resolution`.
Fixtures with an inline `policy` register it first (RegisterPolicy over gRPC; `register` in-process).

Two fixture sets (see ../shared/conformance/README.md), each the contract of one protocol profile
(runtime/registries/profile.py, ../shared/spec/current.md §17):
  * `*.json`: the v0.4.0 reference's own set: every fixture must pass under `v0.4.0`;
  * `protocol-head/*.json`: the protocol repository's newer set: every fixture must pass under `current`.
Each set is also replayed under the other profile, where the documented differences are strict
xfails naming the difference: under `v0.4.0` the head fixtures that need an empty policy_version
echo, a schema_version 2 policy or the multi-round initiator exemption; under `current` the two
v0.4.0 decision fixtures that send lower-case votes (current.md §12.1 casing).
"""
from __future__ import annotations

import glob
import json
import os
import uuid

import pytest
from google.protobuf import descriptor as pb_descriptor
from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.vocabulary.errors import MacpError
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.registries import profile as profiles
from macp_runtime.storage import MemoryStore

from tests.support import ROOT, envelope, send
from tests.support.inprocess import InProcessServer

FIXTURE_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "conformance"))
FIXTURES = sorted(glob.glob(os.path.join(FIXTURE_DIR, "*.json")))
HEAD_FIXTURES = sorted(glob.glob(os.path.join(FIXTURE_DIR, "protocol-head", "*.json")))

if not FIXTURES:
    pytest.skip(f"no conformance fixtures found in {FIXTURE_DIR}", allow_module_level=True)

STATES = {
    "Open": envelope_pb2.SESSION_STATE_OPEN,
    "Resolved": envelope_pb2.SESSION_STATE_RESOLVED,
    "Expired": envelope_pb2.SESSION_STATE_EXPIRED,
    "Cancelled": envelope_pb2.SESSION_STATE_CANCELLED,
    "Suspended": envelope_pb2.SESSION_STATE_SUSPENDED,
}
MODE_PACKAGES = {
    "decision": "decision", "proposal": "proposal", "task": "task", "handoff": "handoff", "quorum": "quorum",
}


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def fixture_id(path: str) -> str:
    name = os.path.splitext(os.path.basename(path))[0]
    return f"head/{name}" if os.path.basename(os.path.dirname(path)) == "protocol-head" else name


def head_difference(fx: dict) -> str | None:
    """Which documented protocol-head vs v0.4.0 difference a fixture depends on, if any."""
    if fx.get("policy", {}).get("schema_version", 1) != 1:
        return "registers a schema_version 2 policy, under which v0.4.0 denies every commitment"
    commitments = [m for m in fx["messages"] if m["message_type"] == "Commitment" and m["expect"] == "accept"]
    if not fx.get("policy_version") and any(m["payload"].get("policy_version", "") == "" for m in commitments):
        return "expects a Commitment with an empty policy_version to be accepted (v0.4.0 requires policy.default)"
    if fx["mode"] == "ext.multi_round.v1" and fx["initiator"] in fx["participants"] and commitments:
        return "lists the initiator among multi-round participants (v0.4.0 then waits for its contribution)"
    return None


def v040_difference(fx: dict) -> str | None:
    """Which documented current-line difference a v0.4.0 fixture depends on, if any (current.md §17)."""
    lower = [m for m in fx["messages"] if m["message_type"] == "Vote" and m["expect"] == "accept"
             and m["payload"].get("vote", "") != m["payload"].get("vote", "").upper()]
    if lower:
        return "sends a lower-case vote and expects it accepted (the current line is case-sensitive)"
    return None


def fixture_params() -> list:
    """(profile, fixture): each set under its own profile must pass; under the other profile the
    documented differences are strict xfails."""
    params = []
    for p in FIXTURES:
        params.append(pytest.param("v0.4.0", p, id=f"v0.4.0-{fixture_id(p)}"))
    for p in HEAD_FIXTURES:
        params.append(pytest.param("current", p, id=f"current-{fixture_id(p)}"))
    for p in HEAD_FIXTURES:
        why = head_difference(load(p))
        marks = [pytest.mark.xfail(strict=True, reason=f"protocol-head differs from v0.4.0: {why}")] if why else []
        params.append(pytest.param("v0.4.0", p, id=f"v0.4.0-{fixture_id(p)}", marks=marks))
    for p in FIXTURES:
        why = v040_difference(load(p))
        marks = [pytest.mark.xfail(strict=True, reason=f"the current line differs from v0.4.0: {why}")] if why else []
        params.append(pytest.param("current", p, id=f"current-{fixture_id(p)}", marks=marks))
    return params


@pytest.fixture(scope="module")
def server_for(tmp_path_factory):
    """One server per protocol profile, started when first needed."""
    servers: dict[str, InProcessServer] = {}

    def get(profile: str) -> InProcessServer:
        if profile not in servers:
            servers[profile] = InProcessServer(str(tmp_path_factory.mktemp(profile) / "data"),
                                               {"MACP_PROTOCOL_PROFILE": profile}).start()
        return servers[profile]

    yield get
    for srv in servers.values():
        srv.kill()


# --- payload encoding ------------------------------------------------------------------------------

def _message_class(payload_type: str):
    if payload_type == "Commitment":
        return core_pb2.CommitmentPayload
    short, _, message_type = payload_type.partition(".")
    package = MODE_PACKAGES[short]
    module = __import__(f"macp.modes.{package}.v1.{package}_pb2", fromlist=["_"])
    return getattr(module, f"{message_type}Payload")


def _fill(msg, data: dict):
    fields = msg.DESCRIPTOR.fields_by_name
    by_json = {f.json_name: f for f in msg.DESCRIPTOR.fields}
    for key, value in data.items():
        field = fields.get(key) or by_json.get(key)
        if field is None:
            raise KeyError(f"{msg.DESCRIPTOR.full_name} has no field {key!r}")
        if field.type == pb_descriptor.FieldDescriptor.TYPE_BYTES:
            value = bytes(value) if isinstance(value, list) else str(value).encode("utf-8")
            setattr(msg, field.name, value)
        elif field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
            _fill(getattr(msg, field.name), value)
        elif field.is_repeated:
            getattr(msg, field.name).extend(value)
        else:
            setattr(msg, field.name, value)
    return msg


def encode_payload(message: dict) -> bytes:
    payload_type = message["payload_type"]
    if payload_type == "multi_round.Contribute":
        return json.dumps(message["payload"]).encode("utf-8")
    return _fill(_message_class(payload_type)(), message["payload"]).SerializeToString()


def start_payload_of(fx: dict) -> bytes:
    return core_pb2.SessionStartPayload(
        intent="conformance", participants=fx["participants"], mode_version=fx["mode_version"],
        configuration_version=fx["configuration_version"], policy_version=fx.get("policy_version", ""),
        ttl_ms=fx["ttl_ms"]).SerializeToString()


def subset_mismatch(expected, actual, path="state"):
    """None when every key/value of `expected` is present in `actual`; else a description."""
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path}: expected an object, got {actual!r}"
        for key, value in expected.items():
            if key not in actual:
                return f"{path}.{key}: missing"
            problem = subset_mismatch(value, actual[key], f"{path}.{key}")
            if problem:
                return problem
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{path}: expected {expected!r}, got {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            problem = subset_mismatch(e, a, f"{path}[{i}]")
            if problem:
                return problem
        return None
    if expected != actual:
        return f"{path}: expected {expected!r}, got {actual!r}"
    return None


def check_resolution(fx: dict, resolution: bytes | None):
    if "expect_resolution_present" in fx:
        assert (resolution is not None) == fx["expect_resolution_present"]
    if "expected_resolution" in fx:
        assert resolution is not None
        commitment = core_pb2.CommitmentPayload.FromString(resolution)
        for key, value in fx["expected_resolution"].items():
            assert getattr(commitment, key) == value, f"resolution.{key}"


# --- over gRPC -------------------------------------------------------------------------------------

def policy_rules_text(policy: dict) -> str:
    rules = policy.get("rules", {})
    return rules if isinstance(rules, str) else json.dumps(rules)


def register_over_grpc(stub, policy: dict) -> None:
    resp = stub.RegisterPolicy(policy_pb2.RegisterPolicyRequest(policy_descriptor=policy_pb2.PolicyDescriptor(
        policy_id=policy["policy_id"], mode=policy.get("mode", "*"), description=policy.get("description", ""),
        rules=policy_rules_text(policy), schema_version=policy.get("schema_version", 1))),
        metadata=[("authorization", "Bearer conformance-admin")])
    # the module's server is shared: a fixture run twice finds its policy already there
    assert resp.ok or resp.error == f"policy '{policy['policy_id']}' is already registered", resp.error


@pytest.mark.parametrize("profile,path", fixture_params())
def test_fixture_over_grpc(server_for, profile, path):
    fx = load(path)
    stub = server_for(profile).stub()
    if "policy" in fx:
        register_over_grpc(stub, fx["policy"])
    sid = str(uuid.uuid4())
    ack = send(stub, envelope(fx["mode"], "SessionStart", sid, fx["initiator"], start_payload_of(fx)))
    assert ack.ok, ack.error
    for i, message in enumerate(fx["messages"]):
        env = envelope(fx["mode"], message["message_type"], sid, message["sender"], encode_payload(message))
        ack = send(stub, env)
        where = f"message {i} ({message['message_type']} from {message['sender']})"
        if message["expect"] == "accept":
            assert ack.ok, f"{where}: {ack.error}"
        else:
            assert not ack.ok, f"{where} was accepted"
            if "expected_error_code" in message:
                assert ack.error.code == message["expected_error_code"], where
    meta = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid),
                           metadata=[("authorization", f"Bearer {fx['initiator']}")]).metadata
    assert meta.state == STATES[fx["expected_final_state"]]


# --- in-process ------------------------------------------------------------------------------------

NOW_MS = 1_700_000_000_000   # the in-process engine's fixed clock; envelopes carry the same time


def _env(fx, message_type, sid, sender, payload, ts=NOW_MS):
    return envelope_pb2.Envelope(macp_version="1.0", mode=fx["mode"], message_type=message_type,
                                 message_id=str(uuid.uuid4()), session_id=sid, sender=sender,
                                 timestamp_unix_ms=ts, payload=payload)


def _engine_for(fx: dict, profile: str = "v0.4.0") -> Engine:
    store = MemoryStore()
    store.open()
    prof = profiles.get(profile)
    policies = PolicyRegistry(profile=prof)
    if "policy" in fx:
        p = fx["policy"]
        error = policies.register(p["policy_id"], p.get("mode", "*"), p.get("description", ""),
                                  policy_rules_text(p), p.get("schema_version", 1))
        assert error is None, error
    return Engine(ModeRegistry.from_spec_dirs(profile=prof), policies, store, clock=lambda: NOW_MS, profile=prof)


@pytest.mark.parametrize("profile,path", fixture_params())
def test_fixture_in_process(profile, path):
    replay_in_process(load(path), profile)


PV_ONLY = [p for p in HEAD_FIXTURES if (head_difference(load(p)) or "").startswith("expects a Commitment with an empty")
           and not (load(p)["mode"] == "ext.multi_round.v1")]


@pytest.mark.parametrize("path", [pytest.param(p, id=fixture_id(p)) for p in PV_ONLY])
def test_head_fixture_passes_once_commitments_name_policy_default(path):
    """The only thing these protocol-head fixtures need that v0.4.0 refuses is the empty policy_version."""
    fx = load(path)
    for m in fx["messages"]:
        if m["message_type"] == "Commitment" and m["payload"].get("policy_version", "") == "":
            m["payload"]["policy_version"] = "policy.default"
    replay_in_process(fx)


def replay_in_process(fx: dict, profile: str = "v0.4.0") -> None:
    engine = _engine_for(fx, profile)
    sid = str(uuid.uuid4())
    engine.start_session(_env(fx, "SessionStart", sid, fx["initiator"], start_payload_of(fx)),
                         Identity(fx["initiator"]))
    for i, message in enumerate(fx["messages"]):
        env = _env(fx, message["message_type"], sid, message["sender"], encode_payload(message))
        where = f"message {i} ({message['message_type']} from {message['sender']})"
        try:
            engine.process_message(env, Identity(message["sender"]))
            error = None
        except MacpError as exc:
            error = exc
        if message["expect"] == "accept":
            assert error is None, f"{where}: {error}"
        else:
            assert error is not None, f"{where} was accepted"
            if "expected_error_code" in message:
                assert error.code == message["expected_error_code"], where
    session = engine.lookup(sid)
    assert session.status == STATES[fx["expected_final_state"]]
    check_resolution(fx, session.resolution)
    if "expected_mode_state" in fx:
        state = dict(session.state)
        state.setdefault("phase", session.phase)
        problem = subset_mismatch(fx["expected_mode_state"], state)
        assert problem is None, problem
