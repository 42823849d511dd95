#!/usr/bin/env python3
"""Handoff mode example client: an owner hands responsibility to a target, with context
(runtime.md §12).

Steps: owner SessionStart (participants owner, target); owner HandoffOffer h1 to the target; owner
HandoffContext for h1 (JSON notes); target HandoffAccept; owner Commitment `handoff.accepted`;
GetSession as the target.

Plain gRPC with the `macp-proto` bindings, plaintext, development credentials; start the server with
MACP_ALLOW_INSECURE=1 and no auth configuration, then

    python examples/handoff_client.py --target 127.0.0.1:50051

Each Ack is printed as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`; the last line
is `RESOLVED session=<id>` when every step went as expected (exit 1 otherwise, 2 if unreachable).
"""
from __future__ import annotations

import json
import sys

from macp.modes.handoff.v1 import handoff_pb2

from _client import RESOLVED, main

MODE = "macp.mode.handoff.v1"


def scenario(c) -> None:
    c.start("owner", ["owner", "target"], "hand over the on-call pager")
    c.send("handoff_offer", "owner", "HandoffOffer", handoff_pb2.HandoffOfferPayload(
        handoff_id="h1", target_participant="target", scope="on-call", reason="end of shift"))
    notes = {"open_incidents": ["INC-7"], "muted_alerts": [], "runbook": "https://example.invalid/runbook"}
    c.send("handoff_context", "owner", "HandoffContext", handoff_pb2.HandoffContextPayload(
        handoff_id="h1", content_type="application/json", context=json.dumps(notes).encode()))
    c.send("handoff_accept", "target", "HandoffAccept", handoff_pb2.HandoffAcceptPayload(
        handoff_id="h1", accepted_by="target", reason="ready"))
    c.commit("owner", "handoff.accepted", "on-call", "the target accepted the pager")
    c.get_session("target", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
