"""Decision receipts over the wire (current.md §14), checked by someone else's code: the SDK fetches
them and its own `verify_receipt` + `trusted_keys_from_jwks` judge them — for resolved Decision,
Proposal, Task, Handoff and Quorum sessions, before and after a restart, after compaction; a tampered
receipt and an unknown key fail. Also the refusals of §14.1/§14.4 with their `macp-error-code`
trailers, key configuration (generated 0600 key, PEM file, rotation keeping old keys published) and
the offline `macp-runtime receipts verify` command.
"""
from __future__ import annotations

import base64
import copy
import json
import os
import stat
import subprocess
import sys

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from macp.v1 import core_pb2, envelope_pb2
from macp_sdk import (AuthConfig, DecisionSession, HandoffSession, MacpClient, ProposalSession, QuorumSession,
                      TaskSession, build_contribute_payload, build_envelope, build_session_start_payload)
from macp_sdk.constants import MODE_MULTI_ROUND
from macp_sdk.errors import MacpTransportError
from macp_sdk.receipt import trusted_keys_from_jwks, verify_receipt

from tests.support import ROOT, bearer, new_session_id

# Receipts and what-if replay are served under the current profile (current.md §2.3, §14, §15).
PROFILE = "current"
CURRENT = {"MACP_PROTOCOL_PROFILE": PROFILE}

RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
ATTESTED = {"integrity": "match", "attestations": ["valid"], "verdict": "attested"}


def agent(name: str) -> AuthConfig:
    return AuthConfig.for_dev_agent(name)


def client_for(srv, who="coordinator") -> MacpClient:
    return MacpClient(target=srv.target, allow_insecure=True, auth=agent(who), default_timeout=10)


# --- one resolved session per standard mode, driven by the SDK ------------------------------------

def decision(c):
    s = DecisionSession(c, auth=agent("coordinator"))
    assert s.start(intent="deploy v2?", participants=["coordinator", "alice", "bob"], ttl_ms=60_000).ok
    assert s.propose("p1", "deploy v2", rationale="green build").ok
    assert s.evaluate("p1", "approve", confidence=0.94, reason="low risk", auth=agent("alice")).ok
    assert s.vote("p1", "APPROVE", auth=agent("alice")).ok
    assert s.vote("p1", "APPROVE", auth=agent("bob")).ok
    assert s.commit(action="deployment.approved", authority_scope="release", reason="all approve").ok
    return s.session_id, "macp.mode.decision.v1", "alice"


def proposal(c):
    s = ProposalSession(c, auth=agent("buyer"))
    assert s.start(intent="price", participants=["buyer", "seller"], ttl_ms=60_000).ok
    assert s.propose("offer-1", "1000 units at 12.00", auth=agent("seller")).ok
    assert s.accept("offer-1", reason="ok").ok
    assert s.accept("offer-1", reason="deal", auth=agent("seller")).ok
    assert s.commit(action="proposal.accepted", authority_scope="purchase", reason="both accepted").ok
    return s.session_id, "macp.mode.proposal.v1", "seller"


def task(c):
    s = TaskSession(c, auth=agent("planner"))
    assert s.start(intent="report", participants=["planner", "worker"], ttl_ms=60_000).ok
    assert s.request_task("t1", "Summarise incident 42", requested_assignee="worker").ok
    assert s.accept_task("t1", assignee="worker", auth=agent("worker")).ok
    assert s.complete_task("t1", assignee="worker", output=b"- a", summary="done", auth=agent("worker")).ok
    assert s.commit(action="task.completed", authority_scope="incident-42", reason="summary délivré ✓").ok
    return s.session_id, "macp.mode.task.v1", "worker"


def handoff(c):
    s = HandoffSession(c, auth=agent("owner"))
    assert s.start(intent="shift", participants=["owner", "target"], ttl_ms=60_000).ok
    assert s.offer("h1", "target", scope="on-call", reason="end of shift").ok
    assert s.accept_handoff("h1", accepted_by="target", reason="ready", auth=agent("target")).ok
    assert s.commit(action="handoff.accepted", authority_scope="on-call", reason="target accepted").ok
    return s.session_id, "macp.mode.handoff.v1", "target"


def quorum(c):
    s = QuorumSession(c, auth=agent("coordinator"))
    assert s.start(intent="deploy", participants=["alice", "bob", "carol"], ttl_ms=60_000).ok
    assert s.request_approval("r1", "deploy v2", required_approvals=2).ok
    assert s.approve("r1", auth=agent("alice")).ok
    assert s.approve("r1", auth=agent("bob")).ok
    assert s.commit(action="quorum.approved", authority_scope="production", reason="2 of 3").ok
    return s.session_id, "macp.mode.quorum.v1", "coordinator"


def multi_round(c):
    """An extension mode whose resolution is JSON, not the Commitment: the runtime records W itself."""
    sid = new_session_id()
    start = build_session_start_payload(intent="converge", participants=["coordinator", "alice", "bob"],
                                        ttl_ms=60_000, policy_version="")
    assert c.send(build_envelope(mode=MODE_MULTI_ROUND, message_type="SessionStart", session_id=sid,
                                 payload=start.SerializeToString(), sender="coordinator")).ok
    for who, value in (("alice", "blue"), ("bob", "green"), ("alice", "green")):
        assert c.send(build_envelope(mode=MODE_MULTI_ROUND, message_type="Contribute", session_id=sid, sender=who,
                                     payload=build_contribute_payload(value).SerializeToString()),
                      auth=agent(who)).ok
    commitment = core_pb2.CommitmentPayload(commitment_id="c1", action="multi_round.converged", authority_scope="s",
                                            reason="agreed", mode_version="1.0.0",
                                            configuration_version="config.default", outcome_positive=True)
    ack = c.send(build_envelope(mode=MODE_MULTI_ROUND, message_type="Commitment", session_id=sid,
                                sender="coordinator", payload=commitment.SerializeToString()))
    assert ack.ok and ack.session_state == RESOLVED
    return sid, MODE_MULTI_ROUND, "bob"


FLOWS = [decision, proposal, task, handoff, quorum, multi_round]


def fetch_verified(c, session_id: str, mode: str, reader: str, rev: int = 4):
    """The receipt through the SDK, verified by the SDK against the keys GetReceiptKeys publishes."""
    result = c.get_decision_receipt(session_id, auth=agent(reader))
    keys = trusted_keys_from_jwks(c.get_receipt_keys())
    assert verify_receipt(result.receipt, keys) == ATTESTED
    r = result.receipt
    assert (r["receipt_format"], r["session_id"], r["mode"]) == ("macp-receipt/1", session_id, mode)
    assert list(r) == ["receipt_format", "session_id", "mode", "commitment", "commitment_hash", "semantics_rev",
                       "issuer", "issued_at", "commitment_wire_b64", "attestations"]
    assert r["issuer"] == "runtime:macp-runtime"
    assert r["semantics_rev"] == {"implementation": "macp-runtime", "rev": rev}   # 4: sessions of the current line
    return result.raw, keys


def test_initialize_advertises_both_capabilities(runtime_server):
    with client_for(runtime_server) as c:
        caps = c.initialize().capabilities
    assert caps.policy_registry.what_if_replay is True
    assert caps.decision_receipt.get_decision_receipt is True and caps.decision_receipt.signed is True


def test_receipts_of_every_mode_verify_before_and_after_restart_and_compaction(server_factory, tmp_path):
    # small segments + eager compaction: after the restart the Commitments' own records are gone
    srv = server_factory(env={**CURRENT, "MACP_WAL_SEGMENT_BYTES": "4096", "MACP_COMPACT_DEAD_RATIO": "0.01"})
    raws = {}
    with client_for(srv) as c:
        sessions = [flow(c) for flow in FLOWS]
        for sid, mode, reader in sessions:
            raws[sid], keys = fetch_verified(c, sid, mode, reader)
            assert c.get_decision_receipt(sid, auth=agent(reader)).raw == raws[sid]      # byte-identical on every call
            wire = base64.b64decode(json.loads(raws[sid])["commitment_wire_b64"])
            assert core_pb2.CommitmentPayload.FromString(wire).commitment_id    # W as the SDK sent it
    srv.restart()
    srv.restart()   # the second open compacts what the first restart's checkpoints cover
    with client_for(srv) as c:
        for sid, mode, reader in sessions:
            raw, keys_after = fetch_verified(c, sid, mode, reader)
            assert raw == raws[sid]
        assert keys_after == keys
    key_file = os.path.join(srv.data_dir, "receipt-keys.json")
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_tampered_receipt_and_unknown_key_fail(runtime_server):
    with client_for(runtime_server) as c:
        sid, _, _ = decision(c)
        receipt = c.get_decision_receipt(sid).receipt
        keys = trusted_keys_from_jwks(c.get_receipt_keys())
    assert verify_receipt(receipt, keys) == ATTESTED
    # a changed commitment no longer matches its hash
    forged = copy.deepcopy(receipt)
    forged["commitment"]["action"] = "deployment.rejected"
    assert verify_receipt(forged, keys)["verdict"] == "unverified"
    # a consistent rewrite (new hash, new wire) keeps integrity but the signature no longer holds
    forged = copy.deepcopy(receipt)
    forged["issuer"] = "runtime:somebody-else"
    assert verify_receipt(forged, keys) == {"integrity": "match", "attestations": ["invalid"],
                                            "verdict": "integrity_only"}
    # a key the verifier does not know
    stranger = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    other = {"other-kid": base64.urlsafe_b64encode(stranger).rstrip(b"=").decode()}
    assert verify_receipt(receipt, other) == {"integrity": "match", "attestations": ["unknown_key"],
                                              "verdict": "integrity_only"}
    # the right kid with another key's bytes
    wrong = {kid: other["other-kid"] for kid in keys}
    assert verify_receipt(receipt, wrong)["attestations"] == ["invalid"]


def _status(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    trailers = dict(err.value.trailing_metadata() or ())
    return err.value.code(), err.value.details(), trailers.get("macp-error-code")


def test_refusals_carry_status_text_and_code(runtime_server):
    stub = runtime_server.stub()
    get = lambda sid, who="alice": stub.GetDecisionReceipt(core_pb2.GetDecisionReceiptRequest(session_id=sid),
                                                           metadata=bearer(who) if who else None)
    assert _status(lambda: get("x", None)) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated", "UNAUTHENTICATED")
    assert _status(lambda: get("")) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST: session_id must not be empty",
                                        "INVALID_REQUEST")
    missing = new_session_id()
    assert _status(lambda: get(missing)) == (grpc.StatusCode.NOT_FOUND, f"Session '{missing}' not found",
                                             "SESSION_NOT_FOUND")
    with client_for(runtime_server) as c:
        s = DecisionSession(c, auth=agent("coordinator"))
        assert s.start(intent="open", participants=["coordinator", "alice"], ttl_ms=60_000).ok
        assert _status(lambda: get(s.session_id, "mallory")) == (
            grpc.StatusCode.PERMISSION_DENIED, "FORBIDDEN: session access denied", "FORBIDDEN")
        assert _status(lambda: get(s.session_id)) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            f"RECEIPT_UNAVAILABLE: session '{s.session_id}' has no binding Commitment (state OPEN)",
            "RECEIPT_UNAVAILABLE")
        # the SDK reports the registry code from the trailer
        with pytest.raises(MacpTransportError) as err:
            c.get_decision_receipt(s.session_id, auth=agent("alice"))
        assert err.value.macp_code == "RECEIPT_UNAVAILABLE"
        assert s.cancel(reason="never mind").ok
        assert _status(lambda: get(s.session_id))[1].endswith("has no binding Commitment (state CANCELLED)")
    # GetReceiptKeys needs no credential
    jwks = json.loads(stub.GetReceiptKeys(core_pb2.GetReceiptKeysRequest()).jwks_json)
    assert [sorted(k) for k in jwks["keys"]] == [["alg", "crv", "kid", "kty", "use", "x"]]


def _seed_b64(seed: bytes) -> str:
    return base64.urlsafe_b64encode(seed).rstrip(b"=").decode()


def test_configured_pem_key_rotation_keeps_old_keys_published(server_factory, tmp_path):
    key = ed25519.Ed25519PrivateKey.generate()
    pem = tmp_path / "receipt.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    data_dir = str(tmp_path / "data")
    srv = server_factory(env={**CURRENT, "MACP_RECEIPT_SIGNING_KEY_FILE": str(pem), "MACP_RECEIPT_KEY_ID": "ops-2026-12",
                              "MACP_RECEIPT_ISSUER": "runtime:example"}, data_dir=data_dir)
    with client_for(srv) as c:
        sid, _, _ = decision(c)
        old_receipt = c.get_decision_receipt(sid).receipt
        assert old_receipt["issuer"] == "runtime:example"
        assert old_receipt["attestations"][0]["jws"].startswith(
            base64.urlsafe_b64encode(b'{"alg":"EdDSA","kid":"ops-2026-12"}').rstrip(b"=").decode() + "..")
        assert "seed" not in open(os.path.join(data_dir, "receipt-keys.json")).read()  # a configured key stays out
    srv.stop()
    # the next start has a new configured key (inline seed): the old public key stays published
    seed = os.urandom(32)
    srv2 = server_factory(env={**CURRENT, "MACP_RECEIPT_SIGNING_KEY": _seed_b64(seed)}, data_dir=data_dir)
    with client_for(srv2) as c:
        keys = trusted_keys_from_jwks(c.get_receipt_keys())
        assert "ops-2026-12" in keys and len(keys) == 2
        assert verify_receipt(old_receipt, keys) == ATTESTED
        fresh = c.get_decision_receipt(sid).receipt      # now signed with the new key
        assert verify_receipt(fresh, keys) == ATTESTED
        assert fresh["attestations"] != old_receipt["attestations"]
    srv2.stop()
    # back to a generated key, then rotate it offline: every key so far stays published
    srv3 = server_factory(env=CURRENT, data_dir=data_dir)
    with client_for(srv3) as c:
        before = c.get_decision_receipt(sid).receipt
    out = subprocess.run([sys.executable, "-m", "macp_runtime", "receipts", "rotate-key", "--data-dir", data_dir],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "MACP_ALLOW_INSECURE": "1"})
    assert out.returncode == 0, out.stderr
    with client_for(srv3) as c:   # a running daemon picks the rotated key set up at its next call
        after = c.get_decision_receipt(sid).receipt
        keys = trusted_keys_from_jwks(c.get_receipt_keys())
    assert len(keys) == 4
    for r in (old_receipt, fresh, before, after):
        assert verify_receipt(r, keys) == ATTESTED
    assert after["attestations"] != before["attestations"]


def test_bad_key_configuration_refuses_to_start(server_factory, tmp_path):
    srv = server_factory(env={**CURRENT, "MACP_RECEIPT_SIGNING_KEY": "too-short"}, start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert "receipt signing key" in srv.log()
    assert "too-short" not in srv.log()


def test_receipts_verify_command_offline(runtime_server, tmp_path):
    with client_for(runtime_server) as c:
        sid, _, _ = decision(c)
        raw = c.get_decision_receipt(sid).raw
        jwks = c.get_receipt_keys()
    receipt_file, keys_file = tmp_path / "receipt.json", tmp_path / "keys.json"
    receipt_file.write_text(raw)
    keys_file.write_text(json.dumps(jwks))

    def verify(*args):
        return subprocess.run([sys.executable, "-m", "macp_runtime", "receipts", "verify", *args],
                              capture_output=True, text=True, cwd=ROOT)

    ok = verify(str(receipt_file), "--keys", str(keys_file), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["verification"] == ATTESTED
    assert verify(str(receipt_file), "--keys", str(keys_file)).stdout.startswith("attested")
    # without keys: integrity only (exit 1: not attested)
    res = verify(str(receipt_file), "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["verification"]["verdict"] == "integrity_only"
    # tampered: unverified
    forged = json.loads(raw)
    forged["commitment"]["reason"] = "changed"
    receipt_file.write_text(json.dumps(forged))
    res = verify(str(receipt_file), "--keys", str(keys_file), "--json")
    assert res.returncode == 1 and json.loads(res.stdout)["verification"]["verdict"] == "unverified"


def test_receipt_records_the_sessions_own_revision(server_factory, tmp_path):
    """A session accepted under v0.4.0 keeps semantics_rev 0 in its receipt when a later process
    speaks the current line; under v0.4.0 itself the RPCs do not exist (as in that reference)."""
    data_dir = str(tmp_path / "data")
    old = server_factory(env={"MACP_PROTOCOL_PROFILE": "v0.4.0"}, data_dir=data_dir)
    with client_for(old) as c:
        sid, mode, reader = decision(c)
        assert not c.initialize().capabilities.HasField("decision_receipt")
    with pytest.raises(grpc.RpcError) as err:
        old.stub().GetDecisionReceipt(core_pb2.GetDecisionReceiptRequest(session_id=sid), metadata=bearer(reader))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    old.stop()
    new = server_factory(env=CURRENT, data_dir=data_dir)
    with client_for(new) as c:
        raw, _ = fetch_verified(c, sid, mode, reader, rev=0)
        sid4, mode4, reader4 = decision(c)
        fetch_verified(c, sid4, mode4, reader4, rev=4)
