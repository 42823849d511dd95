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

import argparse
import sys
import time
import uuid

import grpc
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

MODE = "macp.mode.decision.v1"
MODE_VERSION = "1.0.0"
CONFIGURATION_VERSION = "config.default"
POLICY_VERSION = "policy.default"
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
OPEN = envelope_pb2.SESSION_STATE_OPEN


class StepFailed(Exception):
    pass


def _b(value: bool) -> str:
    return "true" if value else "false"  # printed like the reference's example clients


class DecisionClient:
    def __init__(self, channel: grpc.Channel, timeout: float):
        self.stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        self.timeout = timeout
        self.session_id = str(uuid.uuid4())

    @staticmethod
    def credentials(agent: str):
        return [("authorization", f"Bearer {agent}")]

    def send(self, label: str, sender: str, message_type: str, payload, expect_state: int) -> envelope_pb2.Ack:
        env = envelope_pb2.Envelope(
            macp_version="1.0", mode=MODE, message_type=message_type, message_id=str(uuid.uuid4()),
            session_id=self.session_id, sender=sender, timestamp_unix_ms=int(time.time() * 1000),
            payload=payload.SerializeToString())
        ack = self.stub.Send(core_pb2.SendRequest(envelope=env), metadata=self.credentials(sender),
                             timeout=self.timeout).ack
        print(f"[{label}] ok={_b(ack.ok)} duplicate={_b(ack.duplicate)} state={ack.session_state} "
              f"error='{ack.error.code}'")
        if not ack.ok or ack.duplicate or ack.session_state != expect_state:
            raise StepFailed(f"{label}: expected ok=True duplicate=False state={expect_state}, "
                             f"got ok={ack.ok} duplicate={ack.duplicate} state={ack.session_state} "
                             f"error='{ack.error.code}' ({ack.error.message})")
        return ack

    def run(self) -> None:
        init = self.stub.Initialize(core_pb2.InitializeRequest(
            supported_protocol_versions=["1.0"],
            client_info=core_pb2.ClientInfo(name="decision_client", version="1.0")), timeout=self.timeout)
        print(f"[initialize] version={init.selected_protocol_version} runtime={init.runtime_info.name} "
              f"{init.runtime_info.version}")
        if init.selected_protocol_version != "1.0":
            raise StepFailed(f"initialize: selected protocol version {init.selected_protocol_version!r}")

        modes = [m.mode for m in self.stub.ListModes(core_pb2.ListModesRequest(), timeout=self.timeout).modes]
        print(f"[list_modes] {len(modes)} modes: {', '.join(modes)}")
        if MODE not in modes:
            raise StepFailed(f"list_modes: {MODE} is not offered")

        print(f"[session] id={self.session_id}")
        self.send("session_start", "coordinator", "SessionStart", core_pb2.SessionStartPayload(
            intent="decide whether to deploy v2", participants=["coordinator", "alice", "bob"],
            mode_version=MODE_VERSION, configuration_version=CONFIGURATION_VERSION,
            policy_version=POLICY_VERSION, ttl_ms=60_000), OPEN)
        self.send("proposal", "coordinator", "Proposal", decision_pb2.ProposalPayload(
            proposal_id="p1", option="deploy v2", rationale="all checks are green"), OPEN)
        self.send("evaluation", "alice", "Evaluation", decision_pb2.EvaluationPayload(
            proposal_id="p1", recommendation="APPROVE", confidence=0.94, reason="low risk"), OPEN)
        self.send("vote_alice", "alice", "Vote", decision_pb2.VotePayload(
            proposal_id="p1", vote="APPROVE", reason="ship it"), OPEN)
        self.send("vote_bob", "bob", "Vote", decision_pb2.VotePayload(
            proposal_id="p1", vote="APPROVE", reason="agreed"), OPEN)
        self.send("commitment", "coordinator", "Commitment", core_pb2.CommitmentPayload(
            commitment_id=str(uuid.uuid4()), action="deployment.approved", authority_scope="release",
            reason="approved by all voters", mode_version=MODE_VERSION, policy_version=POLICY_VERSION,
            configuration_version=CONFIGURATION_VERSION, outcome_positive=True), RESOLVED)

        md = self.stub.GetSession(core_pb2.GetSessionRequest(session_id=self.session_id),
                                  metadata=self.credentials("alice"), timeout=self.timeout).metadata
        print(f"[get_session] state={md.state} mode={md.mode} initiator={md.initiator} "
              f"participants={','.join(md.participants)}")
        if md.state != RESOLVED:
            raise StepFailed(f"get_session: state {md.state}, expected {RESOLVED} (RESOLVED)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="host:port of the MACP runtime (plaintext gRPC); default %(default)s")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds (default 10)")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"cannot reach {args.target}", file=sys.stderr)
            return 2
        client = DecisionClient(channel, args.timeout)
        try:
            client.run()
        except StepFailed as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return 1
        except grpc.RpcError as exc:
            print(f"FAILED rpc error {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"RESOLVED session={client.session_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
