"""Shared plumbing of the example clients (not an example itself: files starting with `_` are helpers).

Plain gRPC with the `macp-proto` bindings, plaintext, development credentials
(`authorization: Bearer <name>`, the same name in `envelope.sender`), the versions runtime.md §12 uses
(`mode_version 1.0.0`, `configuration_version config.default`, `policy_version policy.default`,
`ttl_ms 60000`). Every Ack is printed as
`[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`; any answer other than the expected one
ends the run with exit status 1 (2 when the server cannot be reached); success prints
`RESOLVED session=<id>` last.
"""
from __future__ import annotations

import argparse
import sys
import time
import uuid

import grpc
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

MODE_VERSION = "1.0.0"
CONFIGURATION_VERSION = "config.default"
POLICY_VERSION = "policy.default"
TTL_MS = 60_000
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED


class StepFailed(Exception):
    pass


def _b(value: bool) -> str:
    return "true" if value else "false"


class Client:
    """One session of `mode`, driven by several agents over one channel."""

    def __init__(self, channel: grpc.Channel, mode: str, timeout: float, pace: float = 0.0):
        self.stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        self.mode = mode
        self.timeout = timeout
        self.pace = pace          # seconds to wait before each envelope, to watch it in the console
        self._sent = 0
        self.session_id = str(uuid.uuid4())

    @staticmethod
    def credentials(agent: str):
        return [("authorization", f"Bearer {agent}")]

    def send(self, label: str, sender: str, message_type: str, payload, expect_state: int = OPEN):
        """Send one envelope as `sender`; anything but ok, not duplicate, `expect_state` fails the run."""
        raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
        if self.pace and self._sent:
            time.sleep(self.pace)
        self._sent += 1
        env = envelope_pb2.Envelope(
            macp_version="1.0", mode=self.mode, message_type=message_type, message_id=str(uuid.uuid4()),
            session_id=self.session_id, sender=sender, timestamp_unix_ms=int(time.time() * 1000), payload=raw)
        ack = self.stub.Send(core_pb2.SendRequest(envelope=env), metadata=self.credentials(sender),
                             timeout=self.timeout).ack
        self.last_ack = ack
        print(f"[{label}] ok={_b(ack.ok)} duplicate={_b(ack.duplicate)} state={ack.session_state} "
              f"error='{ack.error.code}'")
        if not ack.ok or ack.duplicate or ack.session_state != expect_state:
            raise StepFailed(f"{label}: expected ok=true duplicate=false state={expect_state}, got ok={_b(ack.ok)} "
                             f"duplicate={_b(ack.duplicate)} state={ack.session_state} error='{ack.error.code}' "
                             f"({ack.error.message})")
        return ack

    def start(self, initiator: str, participants: list[str], intent: str):
        print(f"[session] id={self.session_id} mode={self.mode}")
        return self.send("session_start", initiator, "SessionStart", core_pb2.SessionStartPayload(
            intent=intent, participants=participants, mode_version=MODE_VERSION,
            configuration_version=CONFIGURATION_VERSION, policy_version=POLICY_VERSION, ttl_ms=TTL_MS))

    def commit(self, sender: str, action: str, scope: str, reason: str):
        return self.send("commitment", sender, "Commitment", core_pb2.CommitmentPayload(
            commitment_id=str(uuid.uuid4()), action=action, authority_scope=scope, reason=reason,
            mode_version=MODE_VERSION, policy_version=POLICY_VERSION, configuration_version=CONFIGURATION_VERSION,
            outcome_positive=True), RESOLVED)

    def get_session(self, as_agent: str, expect_state: int, label: str = "get_session"):
        md = self.stub.GetSession(core_pb2.GetSessionRequest(session_id=self.session_id),
                                  metadata=self.credentials(as_agent), timeout=self.timeout).metadata
        print(f"[{label}] state={md.state} mode={md.mode} initiator={md.initiator} "
              f"participants={','.join(md.participants)}")
        if md.state != expect_state:
            raise StepFailed(f"{label}: state {md.state}, expected {expect_state}")
        return md


def main(doc: str, mode: str, scenario, argv: list[str] | None = None) -> int:
    """Parse `--target`/`--timeout`, run `scenario(client)` and report; the example's exit status."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051",
                        help="host:port of the MACP runtime (plaintext gRPC); default %(default)s")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds (default 10)")
    parser.add_argument("--pace", type=float, default=0.0, metavar="SECS",
                        help="wait this long before each envelope after the first, to follow the session in the "
                             "browser console (default 0)")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.timeout)
        except grpc.FutureTimeoutError:
            print(f"cannot reach {args.target}", file=sys.stderr)
            return 2
        client = Client(channel, mode, args.timeout, args.pace)
        try:
            scenario(client)
        except StepFailed as exc:
            print(f"FAILED {exc}", file=sys.stderr)
            return 1
        except grpc.RpcError as exc:
            print(f"FAILED rpc error {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"RESOLVED session={client.session_id}")
    return 0
