#!/usr/bin/env python3
"""Drive the YAML-only sealed-bid auction (examples/specs/sealed_bid.yaml).

Start a server that loads the example specs, then run this client:

    MACP_SPECS_DIR=examples/specs scripts/serve        # or: macp-runtime serve --specs-dir examples/specs
    .venv/bin/python examples/auction_client.py

host opens an auction for ana, ben and cy; ana and ben bid; host closes the bidding and awards ben,
the highest bidder. On the way it shows the refusals the spec declares, each with the reason the
runtime sends back in `error.message`: a second bid, a bid of 0, a Commitment before the bidding is
closed, a bid after closing, and an award to someone who did not bid.
Exit status 0 when every answer is as expected and the session ends RESOLVED.
"""
# macp-example: server-env MACP_SPECS_DIR=examples/specs
# macp-example: server-env MACP_PROTOCOL_PROFILE=current
from __future__ import annotations

import json
import sys

from _client import RESOLVED, Client, StepFailed, main

MODE = "ext.sealed_bid.v1"


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def refused(client: Client, label: str, sender: str, message_type: str, payload: bytes, reason: str) -> None:
    """Send a message the spec must refuse, and check that the refusal says why."""
    try:
        client.send(label, sender, message_type, payload)
    except StepFailed:
        pass
    else:
        raise StepFailed(f"{label}: was accepted")
    ack = client.last_ack
    print(f"    why: {ack.error.message}")
    if not ack.error.message.endswith(reason):
        raise StepFailed(f"{label}: refused with {ack.error.message!r}, expected the reason {reason!r}")


def scenario(client: Client) -> None:
    client.start("host", ["ana", "ben", "cy"], "sell the vintage lamp")
    client.send("bid by ana", "ana", "Bid", js({"amount": 120}))
    refused(client, "second bid by ana", "ana", "Bid", js({"amount": 130}), "each participant bids exactly once")
    refused(client, "bid of 0 by cy", "cy", "Bid", js({"amount": 0}), "the amount must be greater than 0")
    client.send("bid by ben", "ben", "Bid", js({"amount": 150, "note": "my best offer"}))
    refused(client, "award before closing", "host", "Commitment", js({"winner": "ben", "amount": 150}),
            "Commitment is not accepted in phase Bidding")
    client.send("close bidding", "host", "Close", js({}))
    refused(client, "late bid by cy", "cy", "Bid", js({"amount": 200}), "Bid is not accepted in phase Closed")
    refused(client, "award to a non-bidder", "host", "Commitment", js({"winner": "cy", "amount": 200}),
            "the winner must be one of the bidders")
    client.send("award to ben", "host", "Commitment", js({"winner": "ben", "amount": 150}), RESOLVED)
    client.get_session("ana", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
