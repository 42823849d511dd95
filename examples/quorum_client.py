#!/usr/bin/env python3
"""Quorum mode example client: a coordinator asks three voters for two approvals (runtime.md §12).

Steps: coordinator SessionStart (participants alice, bob, carol — the coordinator is not a voter);
coordinator ApprovalRequest r1 needing 2 approvals; alice and bob Approve; coordinator Commitment
`quorum.approved`; GetSession as carol (who never voted).

Plain gRPC with the `macp-proto` bindings, plaintext, development credentials; start the server with
MACP_ALLOW_INSECURE=1 and no auth configuration, then

    python examples/quorum_client.py --target 127.0.0.1:50051

Each Ack is printed as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`; the last line
is `RESOLVED session=<id>` when every step went as expected (exit 1 otherwise, 2 if unreachable).
"""
from __future__ import annotations

import sys

from macp.modes.quorum.v1 import quorum_pb2

from _client import RESOLVED, main

MODE = "macp.mode.quorum.v1"


def scenario(c) -> None:
    c.start("coordinator", ["alice", "bob", "carol"], "approve the production deploy")
    c.send("approval_request", "coordinator", "ApprovalRequest", quorum_pb2.ApprovalRequestPayload(
        request_id="r1", action="deploy v2 to production", summary="all checks green", required_approvals=2))
    c.send("approve_alice", "alice", "Approve", quorum_pb2.ApprovePayload(request_id="r1", reason="looks good"))
    c.send("approve_bob", "bob", "Approve", quorum_pb2.ApprovePayload(request_id="r1", reason="ship it"))
    c.commit("coordinator", "quorum.approved", "production", "2 of 3 approvals")
    c.get_session("carol", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
