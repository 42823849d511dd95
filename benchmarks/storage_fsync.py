#!/usr/bin/env python3
"""Measure the cost of one durable append on this machine's disk.

Variants:
  filelog-1t   FileLogStore, 1 thread: every append pays its own write + fdatasync.
  filelog-Nt   FileLogStore, N threads appending to different sessions at once: group commit
               lets one fdatasync cover several records (reported as records/fsync).
  sqlite-wal   SQLite, journal_mode=WAL, synchronous=FULL, one transaction per record, 1 thread
               (the obvious alternative embedded store, for comparison).

For each variant it prints records/s and the p50/p99 latency of a single append as the caller
sees it. The files are written under --dir (default: a temporary directory in the current
directory, so the disk measured is the one you run from) and removed afterwards.

Example:  python benchmarks/storage_fsync.py --records 3000 --threads 8
"""
from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import tempfile
import threading
import time

try:
    from macp_runtime.storage import ENTRY_KIND_INCOMING, FileLogStore, LogRecord
except ImportError:  # running from a checkout without `pip install -e .`
    sys.exit("macp_runtime is not importable: run `pip install -e .` in the repository first")


def make_record(session: int, n: int, payload: bytes) -> LogRecord:
    return LogRecord(
        session_id=f"session-{session:06d}",
        kind=ENTRY_KIND_INCOMING,
        message_id=f"m-{session}-{n}",
        message_type="Proposal",
        sender="agent://bench",
        mode="macp.mode.decision.v1",
        macp_version="1.0",
        timestamp_unix_ms=int(time.time() * 1000),
        received_at_ms=int(time.time() * 1000),
        payload=payload,
    )


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def report(name: str, latencies: list[float], elapsed: float, extra: str = "") -> None:
    lat = sorted(latencies)
    print(
        f"{name:<14} {len(lat):>7} rec  {len(lat) / elapsed:>9.0f} rec/s  "
        f"p50 {percentile(lat, 50) * 1e3:7.3f} ms  p99 {percentile(lat, 99) * 1e3:7.3f} ms  {extra}"
    )


def bench_filelog(base: str, records: int, threads: int, payload: bytes) -> None:
    data_dir = os.path.join(base, f"filelog-{threads}t")
    store = FileLogStore(data_dir)
    store.open()
    per_thread = records // threads
    latencies: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)

    def worker(t: int) -> None:
        out = latencies[t]
        recs = [make_record(t * 1000 + (i % 10), i, payload) for i in range(per_thread)]
        barrier.wait()
        for r in recs:
            t0 = time.perf_counter()
            store.append(r)
            out.append(time.perf_counter() - t0)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in ts:
        t.join()
    elapsed = time.perf_counter() - start
    syncs, synced = store.sync_count, store.synced_records
    store.close()
    report(
        f"filelog-{threads}t",
        [x for part in latencies for x in part],
        elapsed,
        f"{synced / max(1, syncs):.2f} records/fsync",
    )


def bench_sqlite(base: str, records: int, payload: bytes) -> None:
    path = os.path.join(base, "sqlite", "history.db")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE log (session_id TEXT NOT NULL, idx INTEGER NOT NULL, record BLOB NOT NULL, PRIMARY KEY (session_id, idx))")
    recs = [make_record(i % 10, i, payload) for i in range(records)]
    latencies = []
    counters: dict[str, int] = {}
    start = time.perf_counter()
    for r in recs:
        t0 = time.perf_counter()
        idx = counters.get(r.session_id, 0)
        db.execute("BEGIN")
        db.execute("INSERT INTO log VALUES (?, ?, ?)", (r.session_id, idx, r.SerializeToString()))
        db.execute("COMMIT")
        counters[r.session_id] = idx + 1
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    db.close()
    report("sqlite-wal", latencies, elapsed, "synchronous=FULL, 1 txn/record")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--records", type=int, default=2000, help="records per variant (default 2000)")
    parser.add_argument("--threads", type=int, default=8, help="threads of the group-commit variant (default 8)")
    parser.add_argument("--payload-bytes", type=int, default=256, help="payload size per record (default 256)")
    parser.add_argument("--dir", default=None, help="parent directory for the scratch files (default: cwd)")
    parser.add_argument("--keep", action="store_true", help="do not delete the scratch files")
    args = parser.parse_args(argv)

    base = tempfile.mkdtemp(prefix="macp-fsync-bench-", dir=args.dir or os.getcwd())
    payload = os.urandom(args.payload_bytes)
    try:
        print(f"scratch dir {base}, {args.records} records/variant, {args.payload_bytes} B payload")
        bench_filelog(base, args.records, 1, payload)
        bench_filelog(base, args.records, args.threads, payload)
        bench_sqlite(base, args.records, payload)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
