"""Small envelope and metadata helpers: build an Envelope, a SessionStart or Commitment payload, send with
dev-mode auth."""
from __future__ import annotations

import time
import uuid

from macp.v1 import core_pb2, envelope_pb2


def new_session_id() -> str:
    return str(uuid.uuid4())


def envelope(mode: str, message_type: str, session_id: str, sender: str, payload=b"", message_id: str | None = None,
             **fields) -> envelope_pb2.Envelope:
    raw = payload if isinstance(payload, (bytes, bytearray)) else payload.SerializeToString()
    env = envelope_pb2.Envelope(macp_version="1.0", mode=mode, message_type=message_type,
                                message_id=message_id or str(uuid.uuid4()), session_id=session_id, sender=sender,
                                timestamp_unix_ms=int(time.time() * 1000), payload=bytes(raw))
    for k, v in fields.items():
        setattr(env, k, v)
    return env


def send(stub, env: envelope_pb2.Envelope, as_sender: str | None = None) -> envelope_pb2.Ack:
    """Send with dev auth as `as_sender` (default: the envelope's sender)."""
    who = as_sender if as_sender is not None else env.sender
    metadata = [("authorization", f"Bearer {who}")] if who else []
    return stub.Send(core_pb2.SendRequest(envelope=env), metadata=metadata).ack


def start_payload(participants, ttl_ms=60_000, mode_version="1.0.0", configuration_version="config.default",
                  policy_version="policy.default", **fields) -> core_pb2.SessionStartPayload:
    return core_pb2.SessionStartPayload(intent="test", participants=list(participants), mode_version=mode_version,
                                        configuration_version=configuration_version, policy_version=policy_version,
                                        ttl_ms=ttl_ms, **fields)


def commitment(action="decision.selected", outcome_positive=True, mode_version="1.0.0",
               configuration_version="config.default", policy_version="policy.default", **fields):
    return core_pb2.CommitmentPayload(commitment_id=fields.pop("commitment_id", "c1"), action=action,
                                      authority_scope=fields.pop("authority_scope", "test"),
                                      reason=fields.pop("reason", "done"), mode_version=mode_version,
                                      policy_version=policy_version, configuration_version=configuration_version,
                                      outcome_positive=outcome_positive, **fields)


def bearer(sender: str):
    return [("authorization", f"Bearer {sender}")]


def display_name(error) -> str:
    """The display name at the head of `MACPError.message` (issue 15: `<display name>: <reason>`),
    after checking that a reason in the message is the one `details` carries as `{"reason": ...}`."""
    import json

    name, sep, reason = error.message.partition(": ")
    if sep and error.details:
        assert json.loads(error.details).get("reason") == reason, error
    return name
