#!/usr/bin/env python3
"""Restart time: how long the daemon takes to recover a data directory and accept gRPC calls.

Builds a data directory of Decision sessions, then starts `python -m macp_runtime serve` on it
several times in a row and reports, for each start, the time from process start until a gRPC
channel is ready, the server's own recovery line, and the size of the log afterwards. Between
starts the server is left running until its background work is done (missing checkpoints written,
compaction finished: the log stops changing), so consecutive runs show the stages a data directory
goes through:

  --build direct  records written straight to the store, no checkpoints (a directory from before
                  checkpoints existed, or every checkpoint lost): run 1 replays every message and
                  writes the terminal checkpoints; run 2 restores from checkpoints and compacts;
                  run 3 restores from the compacted log.
  --build engine  sessions driven through an in-process engine on the store, which writes terminal
                  checkpoints as the server does: run 1 restores from checkpoints and compacts, run 2
                  restores from the compacted log.

  python benchmarks/restart.py --sessions 10000 --records-per-session 10 --runs 3
  python benchmarks/restart.py --build engine --open-fraction 0.2 --runs 2
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import grpc
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.storage import ENTRY_KIND_INCOMING, FileLogStore, LogRecord

MODE = "macp.mode.decision.v1"


def session_records(session_id: str, n: int, now: int, resolve: bool = True) -> list[LogRecord]:
    """A Decision history of `n` records: start, proposal, evaluations, two votes and (when `resolve`)
    a commitment."""
    def rec(sender, mtype, payload):
        return LogRecord(session_id=session_id, kind=ENTRY_KIND_INCOMING, message_id=str(uuid.uuid4()),
                         message_type=mtype, sender=sender, mode=MODE, macp_version="1.0",
                         timestamp_unix_ms=now, received_at_ms=now, payload=payload.SerializeToString())

    out = [rec("coordinator", "SessionStart", core_pb2.SessionStartPayload(
        intent="bench", participants=["coordinator", "alice", "bob"], mode_version="1.0.0",
        configuration_version="config.default", policy_version="policy.default", ttl_ms=86_400_000)),
        rec("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy"))]
    tail = [rec("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
            rec("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))]
    if resolve:
        tail.append(rec("coordinator", "Commitment", core_pb2.CommitmentPayload(
            commitment_id="c1", action="deployment.approved", authority_scope="bench", reason="ok",
            mode_version="1.0.0", policy_version="policy.default", configuration_version="config.default",
            outcome_positive=True)))
    while len(out) + len(tail) < n:
        out.append(rec("alice", "Evaluation", decision_pb2.EvaluationPayload(
            proposal_id="p1", recommendation="APPROVE", confidence=0.9)))
    return (out + tail)[:max(n, 2)]


def _plan(sessions: int, open_fraction: float) -> list[bool]:
    """Which sessions resolve: an even spread of `open_fraction` stays open."""
    open_every = round(1 / open_fraction) if open_fraction > 0 else 0
    return [not (open_every and i % open_every == 0) for i in range(sessions)]


def build_direct(data_dir: str, sessions: int, per_session: int, open_fraction: float) -> int:
    store = FileLogStore(data_dir, compact_dead_ratio=None)
    store.open()
    now = int(time.time() * 1000)
    total = 0
    for resolve in _plan(sessions, open_fraction):
        for record in session_records(str(uuid.uuid4()), per_session, now, resolve):
            store.append(record)
            total += 1
    store.close()
    return total


def build_engine(data_dir: str, sessions: int, per_session: int, open_fraction: float, threads: int = 8) -> int:
    """The same histories driven through an engine (terminal checkpoints included), several sessions
    at once so appends share fdatasyncs."""
    store = FileLogStore(data_dir, compact_dead_ratio=None)
    store.open()
    engine = Engine(ModeRegistry.from_spec_dirs(), PolicyRegistry(), store)
    plan = _plan(sessions, open_fraction)
    now = int(time.time() * 1000)
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(k, sessions, threads):
            sid = str(uuid.uuid4())
            for r in session_records(sid, per_session, now, plan[i]):
                env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=r.message_type,
                                            message_id=r.message_id, session_id=sid, sender=r.sender,
                                            timestamp_unix_ms=now, payload=r.payload)
                try:
                    if r.message_type == "SessionStart":
                        engine.start_session(env, Identity(r.sender))
                    else:
                        engine.process_message(env, Identity(r.sender))
                except Exception as exc:
                    errors.append(f"{r.message_type}: {exc}")
                    return

    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise SystemExit(f"build failed: {errors[0]}")
    engine.flush_checkpoints(600)
    engine.close()
    total = store.synced_records
    store.close()
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wal_size(data_dir: str) -> int:
    wal = os.path.join(data_dir, "wal")
    return sum(os.path.getsize(os.path.join(wal, f)) for f in os.listdir(wal))


def time_start(data_dir: str, settle_s: float) -> tuple[float, str]:
    """Start a server, time it to ready, let it finish its background work, stop it (SIGTERM)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
    env.update(MACP_ALLOW_INSECURE="1", MACP_BIND_ADDR=f"127.0.0.1:{port}", MACP_DATA_DIR=data_dir)
    log_path = os.path.join(os.path.dirname(data_dir), f"server-{port}.log")
    with open(log_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "macp_runtime", "serve"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                grpc.channel_ready_future(ch).result(timeout=600)
            elapsed = time.perf_counter() - t0
            # Background work (checkpoints the recovery found missing, compaction) until the log is quiet.
            last, quiet_since = wal_size(data_dir), time.monotonic()
            while time.monotonic() - quiet_since < settle_s:
                time.sleep(0.25)
                size = wal_size(data_dir)
                if size != last:
                    last, quiet_since = size, time.monotonic()
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    with open(log_path) as fh:
        text = fh.read()
    line = next((l for l in text.splitlines() if "recovered" in l), "")
    detail = next((l for l in text.splitlines() if "recovery:" in l), "")
    compacted = sum(1 for l in text.splitlines() if "storage: compacted" in l)
    summary = line.split(": ", 1)[-1].split("; ", 1)[-1]
    if detail:
        summary += " | " + detail.split("recovery: ", 1)[-1]
    return elapsed, f"{summary} | {compacted} segments compacted"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--records-per-session", type=int, default=10)
    ap.add_argument("--open-fraction", type=float, default=0.0,
                    help="share of sessions left open (no Commitment), default 0")
    ap.add_argument("--build", choices=("direct", "engine"), default="direct")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds the log must stay unchanged before a run's server is stopped")
    ap.add_argument("--keep", action="store_true", help="keep the generated data directory")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="macp-restart-")
    data_dir = os.path.join(tmp, "data")
    try:
        t0 = time.perf_counter()
        builder = build_direct if args.build == "direct" else build_engine
        total = builder(data_dir, args.sessions, args.records_per_session, args.open_fraction)
        print(f"built ({args.build}) {args.sessions} sessions ({args.open_fraction:.0%} open), {total} records, "
              f"log {wal_size(data_dir) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s")
        for i in range(args.runs):
            before = wal_size(data_dir)
            elapsed, line = time_start(data_dir, args.settle)
            print(f"run {i + 1}: ready after {elapsed:.2f}s  log {before / 1e6:.1f} MB -> {wal_size(data_dir) / 1e6:.1f} MB"
                  f"  ({line})")
            sys.stdout.flush()
    finally:
        if args.keep:
            print(f"data directory kept: {data_dir}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
