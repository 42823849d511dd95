"""The canonical commitment hash `macp-commitment-hash/1` (RFC-MACP-0013 §3–§5; current.md §6.2).

A Commitment's identity across runtimes and SDKs: the SHA-256 of a domain label and the RFC 8785
(JCS) bytes of a fixed nine-member projection of the `CommitmentPayload`. Receipts (§14) carry it,
and `supersedes.commitment_hash` refers to it.

Works on the payload's **wire bytes** as accepted, because whether a payload is hashable at all
depends on what was on the wire: a field number outside the frozen set (1–9, or 1–2 inside
`supersedes`) makes it "not hashable under this label" (§5) and must never be silently dropped.
Hashing never depends on the payload being valid (an all-empty payload hashes).

Pure and grpc-free (vocabulary layer): only protobuf and the standard library.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError
from macp.v1 import core_pb2

LABEL = "macp-commitment-hash/1"
_PREFIX = (LABEL + ":").encode("ascii")

# Field names of the frozen sets (§5), in the projection's member order (§14.2 row 4): the order a
# receipt prints them; the canonical bytes sort them.
STRING_FIELDS = (
    "commitment_id",
    "action",
    "authority_scope",
    "reason",
    "mode_version",
    "policy_version",
    "configuration_version",
)
_FROZEN_PAYLOAD_NUMBERS = frozenset(range(1, 10))
_FROZEN_REF_NUMBERS = frozenset({1, 2})

# JCS (RFC 8785 §3.2.2.2) escapes: the short forms, \u00xx for the other C0 controls, everything
# else literal. One translation table, so escaping is a single C-level str.translate.
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
for _c in range(0x20):
    _ESCAPES.setdefault(_c, f"\\u{_c:04x}")
del _c
_NEEDS_ESCAPE = re.compile('[\x00-\x1f"\\\\]')


class NotHashable(ValueError):
    """The payload cannot be hashed under `macp-commitment-hash/1` (RFC-MACP-0013 §5)."""


def json_string(value: str) -> str:
    """`value` as a JCS string literal (quotes included)."""
    if _NEEDS_ESCAPE.search(value) is None:   # the common case: nothing to escape
        return '"' + value + '"'
    return '"' + value.translate(_ESCAPES) + '"'


def _check_frozen(payload: core_pb2.CommitmentPayload) -> None:
    # Our macp-proto binding must itself stay inside the frozen set: a newer binding with a tenth
    # field would make every decoded payload under-projected (checked once at import below).
    unknown = unknown_fields.UnknownFieldSet(payload)
    if len(unknown):
        numbers = sorted({f.field_number for f in unknown})
        raise NotHashable(f"CommitmentPayload carries unrecognised wire data (field number(s) {numbers}); only fields 1-9 are hashable")
    if payload.HasField("supersedes"):
        unknown = unknown_fields.UnknownFieldSet(payload.supersedes)
        if len(unknown):
            numbers = sorted({f.field_number for f in unknown})
            raise NotHashable(f"CommitmentPayload.supersedes carries unrecognised wire data (field number(s) {numbers}); only fields 1-2 are hashable")


def _binding_is_frozen() -> None:
    payload_numbers = {f.number for f in core_pb2.CommitmentPayload.DESCRIPTOR.fields}
    ref_numbers = {f.number for f in core_pb2.CommitmentRef.DESCRIPTOR.fields}
    if payload_numbers - _FROZEN_PAYLOAD_NUMBERS or ref_numbers - _FROZEN_REF_NUMBERS:
        raise ImportError(
            f"the installed macp-proto CommitmentPayload/CommitmentRef have fields outside the "
            f"{LABEL} frozen set; this module must be revised before it can hash them")


_binding_is_frozen()


def decode(wire: bytes) -> core_pb2.CommitmentPayload:
    """Parse `wire` and check it is hashable; raises `NotHashable` otherwise (also for bytes that do
    not parse as a CommitmentPayload)."""
    payload = core_pb2.CommitmentPayload()
    try:
        payload.ParseFromString(wire)
    except DecodeError as exc:
        raise NotHashable(f"not a CommitmentPayload: {exc}") from exc
    _check_frozen(payload)
    return payload


def projection(payload: core_pb2.CommitmentPayload) -> dict[str, Any]:
    """The §3 projection as an ordered dict (receipt member order): seven strings, the boolean, then
    `supersedes` only when the field is present (presence, not emptiness)."""
    out: dict[str, Any] = {name: getattr(payload, name) for name in STRING_FIELDS}
    out["outcome_positive"] = bool(payload.outcome_positive)
    if payload.HasField("supersedes"):
        out["supersedes"] = {
            "session_id": payload.supersedes.session_id,
            "commitment_hash": payload.supersedes.commitment_hash,
        }
    return out


def canonical_bytes(proj: Mapping[str, Any]) -> bytes:
    """C of RFC-MACP-0013 §4: the JCS bytes of a projection (strings, booleans, nested objects)."""
    return _jcs_object(proj).encode("utf-8")


def _jcs_object(obj: Mapping[str, Any]) -> str:
    parts = []
    # All member names are ASCII, so code-point order equals UTF-16 order.
    for name in sorted(obj):
        value = obj[name]
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json_string(value)
        elif isinstance(value, Mapping):
            text = _jcs_object(value)
        else:  # pragma: no cover - projections hold nothing else
            raise TypeError(f"unexpected {type(value).__name__} in a commitment projection")
        parts.append(json_string(name) + ":" + text)
    return "{" + ",".join(parts) + "}"


def hash_projection(proj: Mapping[str, Any]) -> str:
    """`sha256:<hex>` of a projection."""
    return "sha256:" + hashlib.sha256(_PREFIX + canonical_bytes(proj)).hexdigest()


def commitment_hash(payload: core_pb2.CommitmentPayload) -> str:
    """The canonical hash of a decoded payload; raises `NotHashable` when it carries fields outside
    the frozen set."""
    _check_frozen(payload)
    return hash_projection(projection(payload))


def hash_wire(wire: bytes) -> str:
    """The canonical hash of a payload given as wire bytes; raises `NotHashable`."""
    return hash_projection(projection(decode(wire)))


def is_hashable(wire: bytes) -> bool:
    try:
        decode(wire)
    except NotHashable:
        return False
    return True
