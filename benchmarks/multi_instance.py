#!/usr/bin/env python3
"""Throughput of one and of two runtime instances over one PostgreSQL database.

    python benchmarks/multi_instance.py [--duration 10] [--workload sessions] [--database-url URL]

Without --database-url a throw-away PostgreSQL server is started (tests/support/pgkit.py: initdb in a temporary
directory, a free port, as an unprivileged user when run as root; default settings, fsync on).
Each configuration gets a fresh database and fresh instances, then ../shared/bench/loadgen.py runs:

* one instance:  one loadgen, --workers 2 --threads 4, at instance A;
* two instances: two loadgens at once, each --workers 1 --threads 4, one at A and one at B.

Reported per configuration: messages/s (summed), p50/p99 of every Send, CPU of the instances, of
PostgreSQL and of the load generators (% of one core), and PostgreSQL transactions per Send
(pg_stat_database; the store runs every statement in autocommit, so one transaction is one round trip,
the listening connections' catch-up reads included).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADGEN = os.path.join(os.path.dirname(ROOT), "shared", "bench", "loadgen.py")
sys.path.insert(0, ROOT)   # the test helpers: package tests.support


def cpu_of(pids: list[int]) -> float:
    from_loadgen = _loadgen_module()
    return sum(from_loadgen.server_cpu(pid) or 0.0 for pid in pids)


_LG = None


def _loadgen_module():
    global _LG
    if _LG is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location("loadgen", LOADGEN)
        _LG = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(_LG)
    return _LG


def postmaster_pid(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        directory = conn.execute("SHOW data_directory").fetchone()[0]
    with open(os.path.join(directory, "postmaster.pid")) as fh:
        return int(fh.readline())


def transactions(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                           "WHERE datname = current_database()").fetchone()
    return int(row[0])


def run(config: str, instances: int, base_url: str, args, tmp: str) -> dict:
    import psycopg

    from tests.support import ServerProcess

    name = f"bench_{config}_{int(time.time())}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = base_url.rsplit("/", 1)[0] + "/" + name
    env = {"MACP_STORAGE_BACKEND": "postgres", "MACP_DATABASE_URL": url, "MACP_LOG_LEVEL": "warning"}
    servers = [ServerProcess(os.path.join(tmp, f"{config}{i}"), env) for i in range(instances)]
    for srv in servers:
        srv.start()
    try:
        outs = [os.path.join(tmp, f"{config}-{i}.json") for i in range(instances)]
        workers = 2 if instances == 1 else 1
        cmd = [sys.executable, LOADGEN, "--workload", args.workload, "--duration", str(args.duration),
               "--workers", str(workers), "--threads", str(args.threads)]
        pg = postmaster_pid(url)
        before_tx = transactions(url)
        procs = [subprocess.Popen(cmd + ["--target", srv.target, "--json-out", out], stdout=subprocess.DEVNULL)
                 for srv, out in zip(servers, outs)]
        time.sleep(args.warmup_guess)   # loadgen warms up 1 s after connecting; measure its window only
        cpu0 = {"instances": cpu_of([s.proc.pid for s in servers]), "postgres": cpu_of([pg]),
                "loadgen": cpu_of([p.pid for p in procs])}
        t0 = time.monotonic()
        for p in procs:
            if p.wait() != 0:
                raise RuntimeError(f"loadgen failed ({config})")
        elapsed = time.monotonic() - t0
        cpu1 = {"instances": cpu_of([s.proc.pid for s in servers]), "postgres": cpu_of([pg]),
                "loadgen": 0.0}
        time.sleep(1.5)   # statistics reach pg_stat_database within a second
        after_tx = transactions(url)
        results = [json.load(open(out)) for out in outs]
    finally:
        for srv in servers:
            srv.stop()
    lg = _loadgen_module()
    msgs = sum(r["messages"] for r in results)
    errors = sum(r["errors"] for r in results)
    lat = [r["latency_ms"] for r in results]
    return {
        "config": config,
        "instances": instances,
        "msgs_per_s": round(sum(r["msgs_per_s"] for r in results), 1),
        "sessions_per_s": round(sum(r["sessions_per_s"] for r in results), 1),
        "p50_ms": round(max(x["p50"] for x in lat), 2),
        "p99_ms": round(max(x["p99"] for x in lat), 2),
        "errors": errors,
        "instances_cpu_pct": round(100 * (cpu1["instances"] - cpu0["instances"]) / elapsed, 1),
        "postgres_cpu_pct": round(100 * (cpu1["postgres"] - cpu0["postgres"]) / elapsed, 1),
        "loadgen_cpu_pct_per_worker": [r["client_cpu_pct_per_worker"] for r in results],
        # every measured and unmeasured Send, warm-up included: the count the transactions cover
        "pg_transactions_per_send": round((after_tx - before_tx) / max(1, msgs * (1 + 1.0 / args.duration)), 2),
        "_lg": lg.__name__,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--database-url", help="an existing PostgreSQL server (a database per run is created)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=4, help="closed-loop clients per loadgen worker")
    ap.add_argument("--workload", default="sessions", choices=["sessions", "unary"])
    ap.add_argument("--warmup-guess", type=float, default=2.5,
                    help="seconds after starting loadgen before CPU is sampled (its connect + warm-up)")
    args = ap.parse_args()
    server = None
    base = args.database_url
    if base is None:
        from tests.support import pgkit

        server = pgkit.PostgresServer(pgkit.find_bin_dir()).start()
        base = server.url()
    try:
        with tempfile.TemporaryDirectory(prefix="macp-multi-") as tmp:
            rows = [run("one", 1, base, args, tmp), run("two", 2, base, args, tmp)]
    finally:
        if server is not None:
            server.stop()
    for r in rows:
        r.pop("_lg")
        print(json.dumps(r))
    print(f"scaling one -> two instances: {rows[1]['msgs_per_s'] / rows[0]['msgs_per_s']:.2f}x")
    return 0 if not any(r["errors"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
