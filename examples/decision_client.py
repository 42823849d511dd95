#!/usr/bin/env python3
"""Decision mode example client: one session from SessionStart to a resolved Commitment.

This is the scenario of the reference runtime's `client` example (runtime.md §12, first row), with
the two mistakes that keep the reference's version from ever resolving fixed in the scenario:

* the coordinator is a declared participant, so it may send the Proposal (only declared
  participants may propose, evaluate, object or vote in Decision mode);
* votes say `APPROVE` (`yes` is not a Decision vote).

Steps: Initialize; ListModes; coordinator SessionStart (participants coordinator, alice, bob);
coordinator Proposal p1; alice Evaluation APPROVE 0.94; alice and bob Vote APPROVE; coordinator
Commitment `deployment.approved`; GetSession as alice.

It talks plain gRPC with the `macp-proto` bindings, in plaintext and with development credentials
(`authorization: Bearer <name>`), so start the server with MACP_ALLOW_INSECURE=1 and no auth config:

    MACP_ALLOW_INSECURE=1 macp-runtime serve
    python examples/decision_client.py --target 127.0.0.1:50051

Each Ack is printed as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`. The client
exits 0 and prints `RESOLVED session=<id>` last when every step went as expected; otherwise it says
which step differed and exits 1 (2 if the server cannot be reached).
"""
from __future__ import annotations

import sys

from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2

from _client import RESOLVED, StepFailed, main

MODE = "macp.mode.decision.v1"


def scenario(c) -> None:
    init = c.stub.Initialize(core_pb2.InitializeRequest(
        supported_protocol_versions=["1.0"], client_info=core_pb2.ClientInfo(name="decision_client", version="1.0")),
        timeout=c.timeout)
    print(f"[initialize] version={init.selected_protocol_version} runtime={init.runtime_info.name} "
          f"{init.runtime_info.version}")
    if init.selected_protocol_version != "1.0":
        raise StepFailed(f"initialize: selected protocol version {init.selected_protocol_version!r}")
    modes = [m.mode for m in c.stub.ListModes(core_pb2.ListModesRequest(), timeout=c.timeout).modes]
    print(f"[list_modes] {len(modes)} modes: {', '.join(modes)}")
    if MODE not in modes:
        raise StepFailed(f"list_modes: {MODE} is not offered")

    c.start("coordinator", ["coordinator", "alice", "bob"], "decide whether to deploy v2")
    c.send("proposal", "coordinator", "Proposal", decision_pb2.ProposalPayload(
        proposal_id="p1", option="deploy v2", rationale="all checks are green"))
    c.send("evaluation", "alice", "Evaluation", decision_pb2.EvaluationPayload(
        proposal_id="p1", recommendation="APPROVE", confidence=0.94, reason="low risk"))
    c.send("vote_alice", "alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE", reason="ship it"))
    c.send("vote_bob", "bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE", reason="agreed"))
    c.commit("coordinator", "deployment.approved", "release", "approved by all voters")
    c.get_session("alice", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
