"""Decision receipts, `macp-receipt/1` (current.md §14; RFC-MACP-0013 Appendix A).

A receipt is built on request from what the durable log recorded for the session: the binding
Commitment's payload bytes W and its acceptance time (kept on the session, in its terminal checkpoint
and restored by replay from the Commitment's record), the session id and mode, and the session's
semantics revision. Nothing here runs on the commit path: Send pays nothing for receipts.

Every input is recorded and Ed25519 is deterministic, so the same session and key configuration give
the same bytes on every call, after a restart, from any instance and after compaction (§14.1 step 6).

Kernel-side (no grpc): `receipt_for` raises `ReceiptUnavailable` with the §14.4 text; the transport
maps it to FAILED_PRECONDITION + RECEIPT_UNAVAILABLE.
"""
from __future__ import annotations

import base64
import datetime
import json
from typing import Any

from macp.v1 import envelope_pb2

from ..vocabulary.session import RESOLVED, Session
from . import commitment_hash as ch
from .receipt_keys import ReceiptKeys, b64url

RECEIPT_FORMAT = "macp-receipt/1"
IMPLEMENTATION = "macp-runtime"
DEFAULT_ISSUER = "runtime:macp-runtime"
_MAX_SAFE_INTEGER = 2**53 - 1   # integers a JavaScript verifier reads exactly


class ReceiptUnavailable(Exception):
    """No receipt can be issued for the session; the message is the §14.4 status text."""


def issued_at(ms: int) -> str:
    """RFC 3339 UTC with milliseconds: `YYYY-MM-DDTHH:MM:SS.mmmZ`."""
    moment = datetime.datetime.fromtimestamp(ms // 1000, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


def semantics_rev(session: Session) -> int:
    """The semantics revision the session recorded at its start (current.md §1.2). Sessions of this
    runtime follow the v0.4.0 rules, revision 0, until a session records another one."""
    return int(getattr(session, "semantics_rev", 0) or 0)


def _json(value: Any) -> str:
    """Compact JSON, members in insertion order, non-ASCII literal (§14.2 serialisation)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _jcs(value: Any) -> str:
    """RFC 8785 of a receipt body: objects sorted by UTF-16 code units, strings per §6.2 step 2."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > _MAX_SAFE_INTEGER:
            raise TypeError("an integer outside ±(2^53-1) has no JCS form here")
        return str(value)
    if isinstance(value, str):
        return ch.json_string(value)
    if isinstance(value, dict):
        keys = sorted(value, key=lambda k: k.encode("utf-16-be"))
        return "{" + ",".join(ch.json_string(k) + ":" + _jcs(value[k]) for k in keys) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_jcs(v) for v in value) + "]"
    raise TypeError(f"a receipt body cannot hold a {type(value).__name__}")


def attestation(body: dict, key) -> dict:
    """The detached-payload EdDSA JWS over the JCS bytes of `body` (the receipt without attestations)."""
    header = b64url(('{"alg":"EdDSA","kid":' + ch.json_string(key.kid) + "}").encode("utf-8"))
    signing_input = (header + "." + b64url(_jcs(body).encode("utf-8"))).encode("ascii")
    return {"type": "jws", "jws": header + ".." + b64url(key.sign(signing_input))}


def build(*, session_id: str, mode: str, wire: bytes, committed_at_ms: int, rev: int, issuer: str,
          key=None) -> str:
    """The receipt JSON of a Commitment given as its wire bytes. Raises `ch.NotHashable`."""
    projection = ch.projection(ch.decode(wire))
    receipt: dict[str, Any] = {
        "receipt_format": RECEIPT_FORMAT,
        "session_id": session_id,
        "mode": mode,
        "commitment": projection,
        "commitment_hash": ch.hash_projection(projection),
        "semantics_rev": {"implementation": IMPLEMENTATION, "rev": rev},
        "issuer": issuer,
        "issued_at": issued_at(committed_at_ms),
        "commitment_wire_b64": base64.b64encode(wire).decode("ascii"),
    }
    receipt["attestations"] = [attestation(receipt, key)] if key is not None else []
    return _json(receipt)


def _state_name(status: int) -> str:
    return envelope_pb2.SessionState.Name(status).removeprefix("SESSION_STATE_")


def receipt_for(session: Session, keys: ReceiptKeys, issuer: str = DEFAULT_ISSUER) -> str:
    """§14.1 step 5–6 for a session the caller may read (take it under the session's lock or from a
    consistent copy: `status` and `commitment` are read once)."""
    status, commitment = session.status, session.commitment
    sid = session.session_id
    if status != RESOLVED:
        raise ReceiptUnavailable(f"RECEIPT_UNAVAILABLE: session '{sid}' has no binding Commitment "
                                 f"(state {_state_name(status)})")
    if commitment is None:
        raise ReceiptUnavailable(f"RECEIPT_UNAVAILABLE: the binding Commitment of session '{sid}' "
                                 "is no longer available")
    wire, at_ms = commitment
    try:
        return build(session_id=sid, mode=session.mode, wire=wire, committed_at_ms=at_ms,
                     rev=semantics_rev(session), issuer=issuer, key=keys.current().active)
    except ch.NotHashable:
        raise ReceiptUnavailable(f"RECEIPT_UNAVAILABLE: the binding Commitment of session '{sid}' "
                                 f"cannot be hashed under {ch.LABEL}") from None


class Receipts:
    """What the receipt RPCs need beside the engine: the keys and the issuer name."""

    def __init__(self, keys: ReceiptKeys, issuer: str = DEFAULT_ISSUER):
        self.keys = keys
        self.issuer = issuer

    def receipt(self, session: Session) -> str:
        return receipt_for(session, self.keys, self.issuer)

    def jwks_json(self) -> str:
        return self.keys.current().jwks_json


def verify_file_text(text: str, jwks_text: str | None) -> dict:
    """Offline verification of a saved receipt (the `receipts verify` command): integrity, then each
    attestation against the given key set. The outcome vocabulary is RFC-MACP-0013 A.4's."""
    try:
        receipt = json.loads(text)
    except ValueError:
        return {"integrity": None, "attestations": [], "verdict": "refused"}
    keys: dict[str, str] = {}
    if jwks_text:
        try:
            jwks = json.loads(jwks_text)
        except ValueError:
            jwks = {}
        keys = _trusted(jwks)
    return verify(receipt, keys)


def _trusted(jwks: Any) -> dict[str, str]:
    raw = jwks.get("keys") if isinstance(jwks, dict) else None
    out: dict[str, str] = {}
    seen: set[str] = set()
    dup: set[str] = set()
    for key in raw if isinstance(raw, list) else []:
        if not isinstance(key, dict):
            continue
        kid, x = key.get("kid"), key.get("x")
        if not isinstance(kid, str):
            continue
        if kid in seen:   # a kid names one key: an ambiguous one is trusted for none
            dup.add(kid)
        seen.add(kid)
        if kid and (key.get("kty") == "OKP" and key.get("crv") == "Ed25519" and isinstance(x, str) and x
                and key.get("alg", "EdDSA") == "EdDSA" and key.get("use", "sig") == "sig"
                and not any(m in key for m in ("d", "p", "q", "dp", "dq", "qi", "oth", "k"))):
            out[kid] = x
    for kid in dup:
        out.pop(kid, None)
    return out


_COMMITMENT_STRINGS = frozenset(ch.STRING_FIELDS)


def _integrity(receipt: dict) -> str:
    commitment = receipt.get("commitment")
    if not isinstance(commitment, dict) or not set(commitment) <= _COMMITMENT_STRINGS | {"outcome_positive",
                                                                                         "supersedes"}:
        return "cannot_verify"
    if not all(isinstance(commitment.get(f), str) for f in ch.STRING_FIELDS) or \
            not isinstance(commitment.get("outcome_positive"), bool):
        return "cannot_verify"
    if "supersedes" in commitment:
        sup = commitment["supersedes"]
        if not isinstance(sup, dict) or set(sup) != {"session_id", "commitment_hash"} or \
                not all(isinstance(v, str) for v in sup.values()):
            return "cannot_verify"
    claimed = receipt.get("commitment_hash")
    if not isinstance(claimed, str) or ch.hash_projection(commitment) != claimed:
        return "mismatch"
    if "commitment_wire_b64" in receipt:
        text = receipt["commitment_wire_b64"]
        try:
            if not isinstance(text, str):
                raise ValueError
            wire = base64.b64decode(text, validate=True)
            if base64.b64encode(wire).decode("ascii") != text:   # strict: canonical padding only
                raise ValueError
            decoded = ch.projection(ch.decode(wire))
        except (ValueError, ch.NotHashable):
            return "cannot_verify"
        if ch.hash_projection(decoded) != claimed:
            return "mismatch"
        if decoded != {k: commitment[k] for k in decoded} or set(decoded) != set(commitment):
            return "mismatch"
    return "match"


def _check_attestation(att: Any, body_b64: str, keys: dict[str, str]) -> str:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ed25519

    if not isinstance(att, dict) or att.get("type") != "jws":
        return "unsupported"
    jws = att.get("jws")
    parts = jws.split(".") if isinstance(jws, str) else []
    if len(parts) != 3 or parts[1] != "":
        return "invalid"
    try:
        header = json.loads(_unb64url(parts[0]).decode("utf-8"))
        signature = _unb64url(parts[2])
    except ValueError:
        return "invalid"
    if not isinstance(header, dict) or header.get("alg") != "EdDSA":
        return "unsupported"
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        return "unknown_key"
    try:
        public = _unb64url(keys[kid])
        ed25519.Ed25519PublicKey.from_public_bytes(public).verify(
            signature, (parts[0] + "." + body_b64).encode("ascii"))
    except (InvalidSignature, ValueError):
        return "invalid"
    return "valid"


def _unb64url(text: str) -> bytes:
    if not text or not all(c.isalnum() or c in "-_" for c in text) or not text.isascii():
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify(receipt: Any, keys: dict[str, str]) -> dict:
    """Integrity (no keys needed) and authenticity of a receipt: the same outcomes as the SDK's
    `verify_receipt` (the tests hold the two together)."""
    if not isinstance(receipt, dict) or receipt.get("receipt_format") != RECEIPT_FORMAT:
        return {"integrity": None, "attestations": [], "verdict": "refused"}
    integrity = _integrity(receipt)
    if integrity != "match":
        return {"integrity": integrity, "attestations": [], "verdict": "unverified"}
    try:
        body = b64url(_jcs({k: v for k, v in receipt.items() if k != "attestations"}).encode("utf-8"))
    except TypeError:
        body = None
    outcomes = []
    raw = receipt.get("attestations")
    for att in raw if isinstance(raw, list) else []:
        if body is None:
            outcomes.append("invalid" if isinstance(att, dict) and att.get("type") == "jws" else "unsupported")
        else:
            outcomes.append(_check_attestation(att, body, keys))
    return {"integrity": "match", "attestations": outcomes,
            "verdict": "attested" if "valid" in outcomes else "integrity_only"}
