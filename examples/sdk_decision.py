#!/usr/bin/env python3
"""Decision mode through the official Python SDK (`macp-sdk-python`, import name `macp_sdk`).

The same scenario as decision_client.py, driven by `macp_sdk.MacpClient` and
`macp_sdk.DecisionSession` instead of raw envelopes: the coordinator starts a session with
participants coordinator, alice and bob and proposes p1; alice evaluates it (APPROVE, 0.94); alice
and bob vote APPROVE; the coordinator commits `deployment.approved`; alice reads the session back.

Each agent authenticates with SDK development credentials (`AuthConfig.for_dev_agent(name)`, i.e.
`authorization: Bearer <name>`), so the server must run in plaintext dev mode:

    MACP_ALLOW_INSECURE=1 macp-runtime serve
    python examples/sdk_decision.py --target 127.0.0.1:50051

The SDK raises on a rejected message, so any step the runtime refuses ends the run with exit
status 1 and the runtime's error code. On success the last line is `RESOLVED session=<id>`.
"""
from __future__ import annotations

import argparse
import logging
import sys

import grpc
from macp.v1 import envelope_pb2
from macp_sdk import AuthConfig, DecisionSession, MacpClient
from macp_sdk.errors import MacpAckError, MacpSdkError

RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED


def show(label: str, ack: envelope_pb2.Ack) -> None:
    print(f"[{label}] ok={str(ack.ok).lower()} duplicate={str(ack.duplicate).lower()} "
          f"state={ack.session_state} error='{ack.error.code}'")


def run(target: str, timeout: float) -> str:
    coordinator = AuthConfig.for_dev_agent("coordinator")
    alice = AuthConfig.for_dev_agent("alice")
    bob = AuthConfig.for_dev_agent("bob")

    with MacpClient(target=target, allow_insecure=True, auth=coordinator, default_timeout=timeout) as client:
        init = client.initialize()
        print(f"[initialize] version={init.selected_protocol_version} runtime={init.runtime_info.name}")
        modes = [m.mode for m in client.list_modes().modes]
        print(f"[list_modes] {', '.join(modes)}")

        session = DecisionSession(client, auth=coordinator)
        print(f"[session] id={session.session_id}")
        show("session_start", session.start(intent="decide whether to deploy v2",
                                            participants=["coordinator", "alice", "bob"], ttl_ms=60_000))
        show("proposal", session.propose("p1", "deploy v2", rationale="all checks are green"))
        show("evaluation", session.evaluate("p1", "APPROVE", confidence=0.94, reason="low risk", auth=alice))
        show("vote_alice", session.vote("p1", "APPROVE", reason="ship it", auth=alice))
        show("vote_bob", session.vote("p1", "APPROVE", reason="agreed", auth=bob))
        show("commitment", session.commit(action="deployment.approved", authority_scope="release",
                                          reason="approved by all voters"))

        md = session.metadata(auth=alice).metadata
        print(f"[get_session] state={md.state} initiator={md.initiator} participants={','.join(md.participants)}")
        if md.state != RESOLVED:
            raise RuntimeError(f"session ended in state {md.state}, expected {RESOLVED} (RESOLVED)")
        return session.session_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="host:port of the MACP runtime (plaintext gRPC); default %(default)s")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds (default 10)")
    args = parser.parse_args(argv)
    # The SDK warns on every plaintext channel; this example is plaintext on purpose.
    logging.getLogger("macp_sdk").setLevel(logging.ERROR)
    try:
        session_id = run(args.target, args.timeout)
    except MacpAckError as exc:
        print(f"FAILED the runtime refused a message: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:
        print(f"FAILED rpc error {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (MacpSdkError, RuntimeError) as exc:
        print(f"FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"RESOLVED session={session_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
