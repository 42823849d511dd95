#!/usr/bin/env python3
"""Proposal mode example client: a buyer and a seller converge on a counter-offer (runtime.md §12).

Steps: buyer SessionStart (participants buyer, seller); seller Proposal offer-1 (1000 units at 12.00);
buyer CounterProposal offer-2 superseding offer-1 (1000 units at 11.20); buyer and seller Accept
offer-2 (every participant accepts it, so the session converges); buyer Commitment
`proposal.accepted`; GetSession as the seller.

Plain gRPC with the `macp-proto` bindings, plaintext, development credentials; start the server with
MACP_ALLOW_INSECURE=1 and no auth configuration, then

    python examples/proposal_client.py --target 127.0.0.1:50051

Each Ack is printed as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`; the last line
is `RESOLVED session=<id>` when every step went as expected (exit 1 otherwise, 2 if unreachable).
"""
from __future__ import annotations

import sys

from macp.modes.proposal.v1 import proposal_pb2

from _client import RESOLVED, main

MODE = "macp.mode.proposal.v1"


def scenario(c) -> None:
    c.start("buyer", ["buyer", "seller"], "agree on the price of 1000 units")
    c.send("proposal", "seller", "Proposal", proposal_pb2.ProposalPayload(
        proposal_id="offer-1", title="1000 units at 12.00", summary="list price", tags=["price"]))
    c.send("counter_proposal", "buyer", "CounterProposal", proposal_pb2.CounterProposalPayload(
        proposal_id="offer-2", supersedes_proposal_id="offer-1", title="1000 units at 11.20",
        summary="volume discount"))
    c.send("accept_buyer", "buyer", "Accept", proposal_pb2.AcceptPayload(proposal_id="offer-2", reason="my offer"))
    c.send("accept_seller", "seller", "Accept", proposal_pb2.AcceptPayload(proposal_id="offer-2", reason="deal"))
    c.commit("buyer", "proposal.accepted", "purchase", "both parties accepted offer-2")
    c.get_session("seller", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
