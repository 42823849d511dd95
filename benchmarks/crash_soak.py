#!/usr/bin/env python3
"""Long kill -9 soak: many iterations of load -> SIGKILL at a random moment -> offline log check ->
restart -> state and dedup check (see tests/support/crashkit.py for exactly what is verified).

  python benchmarks/crash_soak.py --iterations 100 --clients 6
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))   # the test helpers: package tests.support

from tests.support import ServerProcess  # noqa: E402
from tests.support.crashkit import crash_iterations  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=50)
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--max-run", type=float, default=1.5, help="longest load phase before a kill, seconds")
    ap.add_argument("--segment-bytes", type=int, default=16384,
                    help="MACP_WAL_SEGMENT_BYTES: small segments make kills land in rotation and compaction")
    ap.add_argument("--checkpoint-interval", type=int, default=3, help="MACP_CHECKPOINT_INTERVAL (0 = off)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="macp-soak-") as tmp:
        data_dir = os.path.join(tmp, "data")
        server = ServerProcess(data_dir, env={"MACP_WAL_SEGMENT_BYTES": str(args.segment_bytes),
                                              "MACP_CHECKPOINT_INTERVAL": str(args.checkpoint_interval)})
        t0 = time.perf_counter()
        stats = crash_iterations(lambda: server.start(), args.iterations, seed=args.seed,
                                 max_run=args.max_run, clients=args.clients)
        elapsed = time.perf_counter() - t0
        compacted = server.log().count("storage: compacted")
    print(f"survived {stats['iterations']} kill -9 iterations in {elapsed:.0f}s (seed {args.seed}): "
          f"{stats['acked_messages']} acknowledged messages in {stats['sessions']} sessions verified, "
          f"{stats['unacked_tail_records']} durable-but-unacknowledged tail records seen, "
          f"{compacted} segment compactions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
