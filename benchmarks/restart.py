#!/usr/bin/env python3
"""Restart time: how long the daemon takes to replay a data directory and accept gRPC calls.

Builds a data directory of Decision sessions by writing history records directly with the
runtime's own store (fast, and exactly what the server would have written), then starts
`python -m macp_runtime serve` on it several times and reports the time from process start until a
gRPC channel is ready, plus the server's own recovery line.

  python benchmarks/restart.py --sessions 10000 --records-per-session 10 --runs 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2

from macp_runtime.storage import ENTRY_KIND_INCOMING, FileLogStore, LogRecord

MODE = "macp.mode.decision.v1"


def session_records(session_id: str, n: int, now: int) -> list[LogRecord]:
    """A Decision history of `n` records: start, proposal, evaluations, two votes, maybe a commitment."""
    def rec(sender, mtype, payload):
        return LogRecord(session_id=session_id, kind=ENTRY_KIND_INCOMING, message_id=str(uuid.uuid4()),
                         message_type=mtype, sender=sender, mode=MODE, macp_version="1.0",
                         timestamp_unix_ms=now, received_at_ms=now, payload=payload.SerializeToString())

    out = [rec("coordinator", "SessionStart", core_pb2.SessionStartPayload(
        intent="bench", participants=["coordinator", "alice", "bob"], mode_version="1.0.0",
        configuration_version="config.default", policy_version="policy.default", ttl_ms=86_400_000)),
        rec("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy"))]
    tail = [rec("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            rec("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            rec("coordinator", "Commitment", core_pb2.CommitmentPayload(
                commitment_id="c1", action="deployment.approved", authority_scope="bench", reason="ok",
                mode_version="1.0.0", policy_version="policy.default", configuration_version="config.default",
                outcome_positive=True))]
    while len(out) + len(tail) < n:
        out.append(rec("alice", "Evaluation", decision_pb2.EvaluationPayload(
            proposal_id="p1", recommendation="APPROVE", confidence=0.9)))
    return (out + tail)[:max(n, 2)]


def build(data_dir: str, sessions: int, per_session: int) -> int:
    store = FileLogStore(data_dir)
    store.open()
    now = int(time.time() * 1000)
    total = 0
    for _ in range(sessions):
        for record in session_records(str(uuid.uuid4()), per_session, now):
            store.append(record)
            total += 1
    store.close()
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_start(data_dir: str) -> tuple[float, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
    env.update(MACP_ALLOW_INSECURE="1", MACP_BIND_ADDR=f"127.0.0.1:{port}", MACP_DATA_DIR=data_dir)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "macp_runtime", "serve"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=600)
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    line = next((l for l in out.splitlines() if "recovered" in l), "")
    return elapsed, line.split(": ", 1)[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--records-per-session", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated data directory")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="macp-restart-")
    data_dir = os.path.join(tmp, "data")
    try:
        t0 = time.perf_counter()
        total = build(data_dir, args.sessions, args.records_per_session)
        size = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(data_dir) for f in fs)
        print(f"built {args.sessions} sessions, {total} records, {size / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
        times = []
        for i in range(args.runs):
            elapsed, line = time_start(data_dir)
            times.append(elapsed)
            print(f"run {i + 1}: ready after {elapsed:.2f}s  ({line})")
        print(f"restart_s_median={statistics.median(times):.2f} min={min(times):.2f} max={max(times):.2f} "
              f"sessions={args.sessions} records={total}")
    finally:
        if args.keep:
            print(f"data directory kept: {data_dir}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
