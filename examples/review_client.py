#!/usr/bin/env python3
"""Drive the YAML-only "review then sign-off" mode (examples/specs/review_signoff.yaml).

Start a server that loads the example specs, then run this client:

    MACP_SPECS_DIR=examples/specs scripts/serve        # or: macp-runtime serve --specs-dir examples/specs
    .venv/bin/python examples/review_client.py

lead starts a session with reviewers ana and ben; ana comments; both approve (the mode moves to its
SignOff phase once every participant approved); lead signs off and commits. Also shows two refusals
the spec declares: a sign-off before all approvals and a comment from an outsider.
Exit status 0 when every answer is as expected and the session ends RESOLVED.
"""
# macp-example: server-env MACP_SPECS_DIR=examples/specs
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

MODE = "ext.review_signoff.v1"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="127.0.0.1:50051", help="server address (default 127.0.0.1:50051)")
    args = ap.parse_args()
    stub = core_pb2_grpc.MACPRuntimeServiceStub(grpc.insecure_channel(args.target))
    session_id = str(uuid.uuid4())
    failures = 0

    def send(label, sender, message_type, payload: bytes, expect_ok=True, expect_code=""):
        nonlocal failures
        env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=message_type,
                                    message_id=str(uuid.uuid4()), session_id=session_id, sender=sender,
                                    timestamp_unix_ms=int(time.time() * 1000), payload=payload)
        ack = stub.Send(core_pb2.SendRequest(envelope=env), metadata=[("authorization", f"Bearer {sender}")]).ack
        print(f"[{label}] ok={str(ack.ok).lower()} duplicate={str(ack.duplicate).lower()} "
              f"state={ack.session_state} error='{ack.error.code}'")
        if ack.ok != expect_ok or ack.error.code != expect_code:
            print(f"    unexpected: wanted ok={expect_ok} error='{expect_code}'")
            failures += 1
        return ack

    def js(obj) -> bytes:
        return json.dumps(obj).encode()

    try:
        modes = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"])).supported_modes
    except grpc.RpcError as exc:
        print(f"cannot reach {args.target}: {exc.code().name}")
        return 2
    if MODE not in modes:
        print(f"the server does not serve {MODE}: start it with --specs-dir examples/specs")
        return 1
    start = core_pb2.SessionStartPayload(intent="review PR 42", participants=["ana", "ben"], mode_version="1.0.0",
                                         configuration_version="config.default", policy_version="policy.default",
                                         ttl_ms=60_000)
    send("start", "lead", "SessionStart", start.SerializeToString())
    send("comment by ana", "ana", "Comment", js({"text": "please rename the flag"}))
    send("comment by outsider", "eve", "Comment", js({"text": "hi"}), False, "FORBIDDEN")
    send("approve by ana", "ana", "Approve", js({}))
    send("sign-off too early", "lead", "SignOff", js({"note": "lgtm"}), False, "INVALID_ENVELOPE")
    send("approve by ben", "ben", "Approve", js({"note": "ship it"}))
    send("sign-off", "lead", "SignOff", js({"note": "lgtm"}))
    commitment = core_pb2.CommitmentPayload(commitment_id="c1", action="review.approved", authority_scope="repo",
                                            reason="all reviewers approved", mode_version="1.0.0",
                                            policy_version="policy.default",
                                            configuration_version="config.default", outcome_positive=True)
    ack = send("commitment", "lead", "Commitment", commitment.SerializeToString())
    meta = stub.GetSession(core_pb2.GetSessionRequest(session_id=session_id),
                           metadata=[("authorization", "Bearer ana")]).metadata
    state = core_pb2.SessionMetadata.DESCRIPTOR.fields_by_name["state"].enum_type.values_by_number[meta.state].name
    print(f"[get session] state={meta.state} ({state})")
    if failures or meta.state != envelope_pb2.SESSION_STATE_RESOLVED:
        print(f"FAILED: {failures} unexpected answer(s)")
        return 1
    print(f"RESOLVED session={session_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
