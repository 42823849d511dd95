"""The receipt builder and the offline verifier against the SDK's own `macp_sdk.receipt`: for the same
inputs the runtime's receipt equals, byte for byte after the SDK's dict is serialised in its member
order, what the SDK's `build_receipt` issues (signature included, Ed25519 being deterministic); and the
offline verifier (`macp-runtime receipts verify`) reaches the SDK's verdict on mutated receipts."""
from __future__ import annotations

import base64
import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from macp.v1 import core_pb2
from macp_sdk.receipt import ReceiptSigner, build_receipt, trusted_keys_from_jwks, verify_receipt

from macp_runtime.kernel import receipts
from macp_runtime.kernel.receipt_keys import ReceiptKeys, SigningKey, parse_key_file, parse_seed_text, thumbprint
from tests.support.strategies import commitment_payloads


def commitments():
    return commitment_payloads(max_size=16)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commitments(), st.text(min_size=1, max_size=12), st.integers(min_value=0, max_value=4),
       st.integers(min_value=0, max_value=4_102_444_800_000), st.booleans())
def test_builder_matches_the_sdk(payload, session_id, rev, at_ms, signed):
    seed = bytes(range(32))
    key = SigningKey(seed) if signed else None
    wire = payload.SerializeToString()
    ours = receipts.build(session_id=session_id, mode="macp.mode.decision.v1", wire=wire, committed_at_ms=at_ms,
                          rev=rev, issuer="runtime:macp-runtime", key=key)
    theirs = build_receipt(payload, session_id=session_id, mode="macp.mode.decision.v1",
                           issuer="runtime:macp-runtime", issued_at=receipts.issued_at(at_ms),
                           signer=ReceiptSigner(kid=key.kid, private_key=seed) if signed else None,
                           semantics_rev={"implementation": "macp-runtime", "rev": rev}, commitment_wire=wire)
    assert ours == json.dumps(theirs, separators=(",", ":"), ensure_ascii=False)
    keys = ReceiptKeys(key, [(key.kid, key.x)] if key else [])
    trusted = trusted_keys_from_jwks(json.loads(keys.jwks_json))
    expected = verify_receipt(json.loads(ours), trusted)
    assert expected["verdict"] == ("attested" if signed else "integrity_only")
    assert receipts.verify_file_text(ours, keys.jwks_json) == expected


def test_issued_at_format():
    assert receipts.issued_at(0) == "1970-01-01T00:00:00.000Z"
    assert receipts.issued_at(1_733_385_600_007) == "2024-12-05T08:00:00.007Z"


MUTATIONS = [
    lambda r: r.update(receipt_format="macp-receipt/2"),
    lambda r: r["commitment"].update(action="other"),
    lambda r: r["commitment"].update(extra="x"),
    lambda r: r["commitment"].pop("reason"),
    lambda r: r["commitment"].update(outcome_positive="yes"),
    lambda r: r.update(commitment_hash=r["commitment_hash"].upper()),
    lambda r: r.update(commitment_wire_b64="!!"),
    lambda r: r.update(commitment_wire_b64=base64.b64encode(b"\x52\x01x").decode()),   # field 10: not hashable
    lambda r: r.update(commitment_wire_b64=base64.b64encode(core_pb2.CommitmentPayload(
        commitment_id="zz").SerializeToString()).decode()),
    lambda r: r.update(issuer="someone else"),
    lambda r: r.update(semantics_rev={"implementation": "macp-runtime", "rev": 2**60}),
    lambda r: r.update(semantics_rev={"implementation": "macp-runtime", "rev": 1.5}),
    lambda r: r.update(attestations=[{"type": "vendor", "format": "x", "binds": "receipt", "value": "v"}]),
    lambda r: r.update(attestations=[{"type": "jws", "jws": "a.b.c"}]),
    lambda r: r.update(attestations=[{"type": "jws", "jws": "e30..AAAA"}]),
    lambda r: r["attestations"].append(dict(r["attestations"][0])),
    lambda r: r.update(attestations="nope"),
    lambda r: r.pop("commitment_wire_b64"),
    lambda r: r.update(transcript={"digest_alg": "sha-256", "digest": "x"}),
]


def test_offline_verifier_agrees_with_the_sdk_on_mutations():
    key = SigningKey(os.urandom(32))
    keys = ReceiptKeys(key, [(key.kid, key.x)])
    payload = core_pb2.CommitmentPayload(commitment_id="c1", action="a", authority_scope="s", reason="r",
                                         mode_version="1", policy_version="p", configuration_version="c",
                                         outcome_positive=True)
    raw = receipts.build(session_id="s1", mode="m", wire=payload.SerializeToString(), committed_at_ms=5, rev=4,
                         issuer="i", key=key)
    trusted = trusted_keys_from_jwks(json.loads(keys.jwks_json))
    for i, mutate in enumerate(MUTATIONS):
        receipt = json.loads(raw)
        mutate(receipt)
        text = json.dumps(receipt)
        assert receipts.verify_file_text(text, keys.jwks_json) == verify_receipt(json.loads(text), trusted), i
    assert receipts.verify_file_text("not json", keys.jwks_json)["verdict"] == "refused"
    # key sets: a duplicated kid is dropped, private members disqualify a key
    dup = json.dumps({"keys": json.loads(keys.jwks_json)["keys"] * 2})
    assert receipts.verify_file_text(raw, dup) == verify_receipt(json.loads(raw), trusted_keys_from_jwks(json.loads(dup)))
    private = json.loads(keys.jwks_json)
    private["keys"][0]["d"] = "secret"
    assert receipts.verify_file_text(raw, json.dumps(private))["attestations"] == ["unknown_key"]


def test_key_parsing_and_thumbprint():
    seed = os.urandom(32)
    key = SigningKey(seed)
    assert parse_seed_text(base64.urlsafe_b64encode(seed).rstrip(b"=").decode()) == seed
    assert parse_seed_text(base64.b64encode(seed).decode() + "\n") == seed
    assert parse_key_file(base64.b64encode(seed)) == seed
    # RFC 8037 Appendix A.3: the thumbprint of the example Ed25519 key
    assert thumbprint("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo") == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    assert key.kid == thumbprint(key.x)
    jwks = json.loads(ReceiptKeys(key, [(key.kid, key.x), (key.kid, key.x), ("old", "eA")]).jwks_json)
    assert [k["kid"] for k in jwks["keys"]] == [key.kid, "old"]
    assert list(jwks["keys"][0]) == ["kty", "crv", "x", "kid", "alg", "use"]
