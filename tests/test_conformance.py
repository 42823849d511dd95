"""Replay the reference runtime's conformance fixtures (../shared/conformance/*.json).

Each fixture is replayed twice:
  * over gRPC against a real server: SessionStart from the initiator, every message from its sender,
    accept/reject (and the error code when given) per message, the final state via GetSession;
  * in-process (Engine + MemoryStore): the same, plus `expected_mode_state` (subset match against the
    session's mode state, with the session phase under "phase") and `expected_resolution`.
Fixtures with an inline `policy` need RegisterPolicy; until that RPC exists they run in-process only
(the policy is bound directly into the PolicyRegistry) and the wire run is skipped with that reason.
"""
from __future__ import annotations

import glob
import json
import os
import uuid

import pytest
from google.protobuf import descriptor as pb_descriptor
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.auth import Identity
from macp_runtime.engine import Engine
from macp_runtime.errors import MacpError
from macp_runtime.modes import ModeRegistry
from macp_runtime.policies import PolicyRegistry
from macp_runtime.specs.hooks.policy_rules import BoundPolicy
from macp_runtime.storage import MemoryStore

from conftest import envelope, send

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_DIR = os.path.normpath(os.path.join(ROOT, "..", "shared", "conformance"))
FIXTURES = sorted(glob.glob(os.path.join(FIXTURE_DIR, "*.json")))

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
    return os.path.splitext(os.path.basename(path))[0]


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

WIRE_FIXTURES = [pytest.param(p, id=fixture_id(p), marks=pytest.mark.skip(
    reason="inline policy needs RegisterPolicy (not implemented yet); replayed in-process only"))
    if "policy" in load(p) else pytest.param(p, id=fixture_id(p)) for p in FIXTURES]


@pytest.mark.parametrize("path", WIRE_FIXTURES)
def test_fixture_over_grpc(runtime_server, path):
    fx = load(path)
    stub = runtime_server.stub()
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


def _engine_for(fx: dict) -> Engine:
    store = MemoryStore()
    store.open()
    policies = PolicyRegistry()
    if "policy" in fx:
        p = fx["policy"]
        rules = p.get("rules", {})
        if isinstance(rules, str):
            try:
                rules = json.loads(rules) if rules else {}
            except ValueError:
                rules = {}
        policies._policies[p["policy_id"]] = BoundPolicy(p["policy_id"], p.get("mode", "*"),
                                                         p.get("description", ""), rules,
                                                         p.get("schema_version", 1))
    return Engine(ModeRegistry.from_spec_dirs(), policies, store, clock=lambda: NOW_MS)


@pytest.mark.parametrize("path", [pytest.param(p, id=fixture_id(p)) for p in FIXTURES])
def test_fixture_in_process(path):
    fx = load(path)
    engine = _engine_for(fx)
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
