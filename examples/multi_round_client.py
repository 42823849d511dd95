#!/usr/bin/env python3
"""Multi-round extension example client: two participants contribute until they agree
(runtime.md §12).

Steps: coordinator SessionStart `ext.multi_round.v1` (participants alice, bob); alice Contribute
`{"value":"option_a"}`; bob Contribute option_b; GetSession (open: they differ); bob Contribute
option_a; GetSession (still open: convergence enables the Commitment but does not resolve);
coordinator Commitment `multi_round.converged`; GetSession (resolved).

Contributions are JSON bytes, not protobuf. Plain gRPC with the `macp-proto` bindings, plaintext,
development credentials; start the server with MACP_ALLOW_INSECURE=1 and no auth configuration, then

    python examples/multi_round_client.py --target 127.0.0.1:50051

Each Ack is printed as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`; the last line
is `RESOLVED session=<id>` when every step went as expected (exit 1 otherwise, 2 if unreachable).
"""
from __future__ import annotations

import json
import sys

from _client import OPEN, RESOLVED, main

MODE = "ext.multi_round.v1"


def contribution(value: str) -> bytes:
    return json.dumps({"value": value}).encode("utf-8")


def scenario(c) -> None:
    c.start("coordinator", ["alice", "bob"], "pick one option")
    c.send("contribute_alice_1", "alice", "Contribute", contribution("option_a"))
    c.send("contribute_bob_1", "bob", "Contribute", contribution("option_b"))
    c.get_session("coordinator", OPEN, "get_session_round_1")
    c.send("contribute_bob_2", "bob", "Contribute", contribution("option_a"))
    c.get_session("coordinator", OPEN, "get_session_converged")
    c.commit("coordinator", "multi_round.converged", "choice", "alice and bob agree on option_a")
    c.get_session("coordinator", RESOLVED)


if __name__ == "__main__":
    sys.exit(main(__doc__, MODE, scenario))
