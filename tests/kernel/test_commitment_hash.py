"""The canonical commitment hash (current.md §6.2): pinned vectors, and agreement with the SDK's own
`macp_sdk.commitment_hash` (the top authority) on random payloads, including hashability."""
from __future__ import annotations

import hashlib
import importlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from macp.v1 import core_pb2

from macp_runtime.kernel import commitment_hash as ch
from tests.support.strategies import commitment_payloads

# `macp_sdk` re-exports a function named like the submodule; importlib returns the module itself.
sdk = importlib.import_module("macp_sdk.commitment_hash")

BASE = dict(commitment_id="c1", action="decision.approved", authority_scope="seam", reason="sealed by seam",
            mode_version="macp.mode.decision.v1", policy_version="1.0.0", configuration_version="1.0.0",
            outcome_positive=True)

V001 = "sha256:9f58e9d114d11860d48aa2bcb8cda458b9618b1cc8560595a802b68c4af85d41"
VECTORS = [
    ("001_minimal", core_pb2.CommitmentPayload(**BASE), V001),
    ("002_supersedes",
     core_pb2.CommitmentPayload(**{**BASE, "commitment_id": "c2"},
                                supersedes=core_pb2.CommitmentRef(session_id="prior-sess", commitment_hash=V001)),
     "sha256:7cc490432ad6b25e9c19fc7c3a84f1e33abe497fca1fd5266ff0275db3650f9d"),
    ("003_all_empty", core_pb2.CommitmentPayload(),
     "sha256:3240d1a7adb7bd9420ad5490182227ce699c9e4e465f7934885fe2ded939f32e"),
    ("004_empty_supersedes", core_pb2.CommitmentPayload(supersedes=core_pb2.CommitmentRef()),
     "sha256:9776c22ef165f26817f89bb456cf6bc56a659eb1561a576f6ea9a435bd3291d7"),
    ("005_escapes",
     core_pb2.CommitmentPayload(**{**BASE, "commitment_id": "c5", "action": 'decision."appro\\ved"',
                                   "authority_scope": "café", "reason": "ré\tsumé\n— naïve \U0001F702",
                                   "outcome_positive": False}),
     "sha256:03f8ac2b8172958504092ce9fe5154dbcfe300fd30a350453d4e4bd715822ab2"),
]


@pytest.mark.parametrize("name,payload,expected", VECTORS, ids=[v[0] for v in VECTORS])
def test_pinned_vectors(name, payload, expected):
    assert ch.commitment_hash(payload) == expected
    assert ch.hash_wire(payload.SerializeToString()) == expected


def test_canonical_bytes_of_vectors():
    assert ch.canonical_bytes(ch.projection(core_pb2.CommitmentPayload())) == (
        b'{"action":"","authority_scope":"","commitment_id":"","configuration_version":"","mode_version":"",'
        b'"outcome_positive":false,"policy_version":"","reason":""}')
    # 005's reference JCS bytes (RFC-MACP-0013 vector): escapes, literal non-ASCII and astral code points.
    jcs_005 = bytes.fromhex(
        "7b22616374696f6e223a226465636973696f6e2e5c22617070726f5c5c7665645c22222c22617574686f726974795f73636f7065"
        "223a22636166c3a9222c22636f6d6d69746d656e745f6964223a226335222c22636f6e66696775726174696f6e5f76657273696f"
        "6e223a22312e302e30222c226d6f64655f76657273696f6e223a226d6163702e6d6f64652e6465636973696f6e2e7631222c226f"
        "7574636f6d655f706f736974697665223a66616c73652c22706f6c6963795f76657273696f6e223a22312e302e30222c22726561"
        "736f6e223a2272c3a95c7473756dc3a95c6ee28094206e61c3af766520f09f9c82227d")
    assert ch.canonical_bytes(ch.projection(VECTORS[4][1])) == jcs_005
    assert ch.hash_projection(ch.projection(VECTORS[4][1])) == "sha256:" + hashlib.sha256(
        b"macp-commitment-hash/1:" + jcs_005).hexdigest()


def test_projection_member_order_and_supersedes_presence():
    p = ch.projection(VECTORS[1][1])
    assert list(p) == ["commitment_id", "action", "authority_scope", "reason", "mode_version", "policy_version",
                       "configuration_version", "outcome_positive", "supersedes"]
    assert list(p["supersedes"]) == ["session_id", "commitment_hash"]
    assert "supersedes" not in ch.projection(core_pb2.CommitmentPayload())
    assert ch.projection(VECTORS[3][1])["supersedes"] == {"session_id": "", "commitment_hash": ""}


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, value: bytes):
    return _varint(number << 3 | 2) + _varint(len(value)) + value


@pytest.mark.parametrize("extra", [
    _field(10, b"x"),                        # a tenth field
    _varint(12 << 3) + _varint(1),            # a varint field outside 1-9
    _field(9, _field(3, b"z")),              # supersedes with a third field
    _varint(1 << 3) + _varint(5),            # field 1 with the wrong wire type: unrecognised data
])
def test_not_hashable_wire_matches_sdk(extra):
    wire = VECTORS[0][1].SerializeToString() + extra
    assert sdk.verify_commitment_hash(wire, V001) == "cannot_verify"
    assert not ch.is_hashable(wire)
    with pytest.raises(ch.NotHashable):
        ch.hash_wire(wire)


@pytest.mark.parametrize("wire", [b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\x00"])
def test_undecodable_wire_is_not_hashable(wire):
    assert sdk.verify_commitment_hash(wire, V001) == "cannot_verify"
    assert not ch.is_hashable(wire)


def test_empty_wire_hashes():
    assert ch.hash_wire(b"") == VECTORS[2][2]


def payloads():
    return commitment_payloads(max_size=24)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
def test_agrees_with_sdk_on_random_payloads(payload):
    expected = sdk.commitment_hash(payload)
    assert ch.commitment_hash(payload) == expected
    wire = payload.SerializeToString()
    assert ch.hash_wire(wire) == expected
    assert sdk.verify_commitment_hash(wire, ch.hash_wire(wire)) == "match"
    assert ch.canonical_bytes(ch.projection(payload)) == sdk.canonical_projection(payload)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads(), st.integers(min_value=10, max_value=2000), st.binary(max_size=8))
def test_agrees_with_sdk_on_hashability(payload, number, blob):
    wire = payload.SerializeToString() + _field(number, blob)
    assert (sdk.verify_commitment_hash(wire, "sha256:" + "0" * 64) == "cannot_verify") == (not ch.is_hashable(wire))
