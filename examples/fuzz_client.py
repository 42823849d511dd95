#!/usr/bin/env python3
"""Error-path client: asks the runtime the twelve questions of the reference's `fuzz_client` and
checks every answer against runtime.md §12.

Cases: Initialize; ListModes; ListRoots; GetManifest of an unknown agent; an unsupported protocol
version; an empty mode; a valid Task SessionStart; a duplicate message; sender spoofing; an
oversized payload; GetSession without membership; cancellation by the initiator.

The reference's own client stops at case 4 (GetManifest of `demo-agent` answers NOT_FOUND, which it
treats as fatal); this one expects that NOT_FOUND and goes on through every case. Each answer is
printed with the code received — Acks as `[label] ok=<bool> duplicate=<bool> state=<int> error='<code>'`
— followed by `expected ...` and `as expected` or `DIFFERS`. The last line is
`ALL 12 CASES AS EXPECTED` (exit 0) or `DIFFERENT n of 12 cases: ...` (exit 1); exit 2 when the
server cannot be reached. It never resolves a session, so it has no RESOLVED line.

Plaintext, development credentials (`authorization: Bearer <name>`):

    MACP_ALLOW_INSECURE=1 macp-runtime serve
    python examples/fuzz_client.py --target 127.0.0.1:50051
"""
# macp-example: expect ^ALL 12 CASES AS EXPECTED$
from __future__ import annotations

import argparse
import sys
import time
import uuid

import grpc
from macp.modes.task.v1 import task_pb2
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

TASK = "macp.mode.task.v1"
STANDARD_MODES = ["macp.mode.decision.v1", "macp.mode.proposal.v1", "macp.mode.task.v1",
                  "macp.mode.handoff.v1", "macp.mode.quorum.v1"]
OPEN = envelope_pb2.SESSION_STATE_OPEN
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
OVERSIZED = 2_000_000          # over the 1 MiB payload limit, under gRPC's 4 MiB message limit


def _b(value: bool) -> str:
    return "true" if value else "false"


class FuzzClient:
    def __init__(self, channel: grpc.Channel, timeout: float):
        self.stub = core_pb2_grpc.MACPRuntimeServiceStub(channel)
        self.timeout = timeout
        self.session_id = str(uuid.uuid4())
        self.results: list[tuple[int, str, bool]] = []

    # --- recording ---------------------------------------------------------------------------------

    def check(self, number: int, label: str, same: bool, expected: str) -> None:
        print(f"    expected {expected}: {'as expected' if same else 'DIFFERS'}")
        self.results.append((number, label, same))

    @staticmethod
    def auth(agent: str):
        return [("authorization", f"Bearer {agent}")]

    def call(self, method, request, agent: str | None = None):
        """(response, None) or (None, RpcError)."""
        try:
            return method(request, metadata=self.auth(agent) if agent else None, timeout=self.timeout), None
        except grpc.RpcError as err:
            return None, err

    def envelope(self, message_type: str, sender: str, payload: bytes, *, session_id=None, mode=TASK,
                 macp_version="1.0", message_id=None) -> envelope_pb2.Envelope:
        return envelope_pb2.Envelope(
            macp_version=macp_version, mode=mode, message_type=message_type,
            message_id=message_id or str(uuid.uuid4()), session_id=session_id or self.session_id,
            sender=sender, timestamp_unix_ms=int(time.time() * 1000), payload=payload)

    def send(self, label: str, agent: str, env: envelope_pb2.Envelope):
        ack, err = self.call(self.stub.Send, core_pb2.SendRequest(envelope=env), agent)
        if err is not None:
            print(f"[{label}] rpc error {err.code().name}: {err.details()}")
            return None
        print(f"[{label}] ok={_b(ack.ack.ok)} duplicate={_b(ack.ack.duplicate)} state={ack.ack.session_state} "
              f"error='{ack.ack.error.code}'")
        return ack.ack

    def expect_ack(self, number, label, ack, *, ok=True, duplicate=False, state=None, code=""):
        if state is None:
            state = OPEN if ok else envelope_pb2.SESSION_STATE_UNSPECIFIED
        same = (ack is not None and ack.ok == ok and ack.duplicate == duplicate and ack.session_state == state
                and ack.error.code == code)
        self.check(number, label, same, f"ok={_b(ok)} duplicate={_b(duplicate)} state={state} error='{code}'")

    def expect_status(self, number, label, err, code: grpc.StatusCode, details: str):
        got = "OK" if err is None else f"{err.code().name} '{err.details()}'"
        print(f"[{label}] status {got}")
        same = err is not None and err.code() == code and err.details() == details
        self.check(number, label, same, f"status {code.name} '{details}'")

    # --- the twelve cases (runtime.md §12, fuzz_client) --------------------------------------------

    def run(self) -> list[str]:
        init, err = self.call(self.stub.Initialize, core_pb2.InitializeRequest(
            supported_protocol_versions=["1.0"], client_info=core_pb2.ClientInfo(name="fuzz_client", version="1.0")))
        version = init.selected_protocol_version if init else f"rpc error {err.code().name}"
        print(f"[initialize] version={version}")
        self.check(1, "initialize", init is not None and version == "1.0", "version=1.0")

        modes, err = self.call(self.stub.ListModes, core_pb2.ListModesRequest())
        names = [m.mode for m in modes.modes] if modes else []
        print(f"[list_modes] {', '.join(names) if modes else f'rpc error {err.code().name}'}")
        self.check(2, "list_modes", names == STANDARD_MODES, f"the five standard modes ({', '.join(STANDARD_MODES)})")

        roots, err = self.call(self.stub.ListRoots, core_pb2.ListRootsRequest())
        print(f"[list_roots] {f'count={len(roots.roots)}' if roots else f'rpc error {err.code().name}'}")
        self.check(3, "list_roots", roots is not None and len(roots.roots) == 0, "count=0")

        _, err = self.call(self.stub.GetManifest, core_pb2.GetManifestRequest(agent_id="demo-agent"))
        self.expect_status(4, "get_manifest demo-agent", err, grpc.StatusCode.NOT_FOUND,
                           "Agent 'demo-agent' not found")

        start = core_pb2.SessionStartPayload(
            intent="exercise the error paths", participants=["planner", "worker"], mode_version="1.0.0",
            configuration_version="config.default", policy_version="policy.default", ttl_ms=60_000
        ).SerializeToString()

        ack = self.send("bad_version", "planner", self.envelope("SessionStart", "planner", start,
                                                                 session_id="freeze-check-1", macp_version="2.0"))
        self.expect_ack(5, "bad_version", ack, ok=False, code="UNSUPPORTED_PROTOCOL_VERSION")

        ack = self.send("empty_mode", "planner", self.envelope("SessionStart", "planner", start,
                                                                session_id="freeze-check-2", mode=""))
        self.expect_ack(6, "empty_mode", ack, ok=False, code="INVALID_ENVELOPE")

        print(f"[session] id={self.session_id}")
        ack = self.send("session_start", "planner", self.envelope("SessionStart", "planner", start))
        self.expect_ack(7, "session_start", ack)

        request = task_pb2.TaskRequestPayload(task_id="t1", title="index the corpus", instructions="all of it",
                                              requested_assignee="worker").SerializeToString()
        first = self.send("dup_first", "planner", self.envelope("TaskRequest", "planner", request, message_id="dup-1"))
        second = self.send("dup_second", "planner", self.envelope("TaskRequest", "planner", request,
                                                                  message_id="dup-1"))
        same = (first is not None and first.ok and not first.duplicate and first.session_state == OPEN
                and second is not None and second.ok and second.duplicate and second.session_state == OPEN)
        self.check(8, "duplicate", same, "first ok=true duplicate=false, second ok=true duplicate=true, state=1")

        ack = self.send("spoof", "planner", self.envelope("TaskUpdate", "mallory", bytes([1, 2, 3])))
        self.expect_ack(9, "spoof", ack, ok=False, code="UNAUTHENTICATED")

        ack = self.send("oversized", "worker", self.envelope("TaskUpdate", "worker", b"\x00" * OVERSIZED))
        self.expect_ack(10, "oversized", ack, ok=False, code="PAYLOAD_TOO_LARGE")

        _, err = self.call(self.stub.GetSession, core_pb2.GetSessionRequest(session_id=self.session_id), "outsider")
        self.expect_status(11, "get_session outsider", err, grpc.StatusCode.PERMISSION_DENIED,
                           "FORBIDDEN: session access denied")

        resp, err = self.call(self.stub.CancelSession, core_pb2.CancelSessionRequest(
            session_id=self.session_id, reason="error-path run finished"), "planner")
        if resp is None:
            print(f"[cancel] rpc error {err.code().name}: {err.details()}")
        else:
            print(f"[cancel] ok={_b(resp.ack.ok)} duplicate={_b(resp.ack.duplicate)} "
                  f"state={resp.ack.session_state} error='{resp.ack.error.code}'")
        self.expect_ack(12, "cancel", resp.ack if resp else None, state=CANCELLED)

        return [f"{n} {label}" for n, label, same in self.results if not same]


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
        client = FuzzClient(channel, args.timeout)
        differing = client.run()
    total = len(client.results)
    if differing:
        print(f"DIFFERENT {len(differing)} of {total} cases: {'; '.join(differing)}")
        return 1
    print(f"ALL {total} CASES AS EXPECTED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
