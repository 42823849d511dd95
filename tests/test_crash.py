"""Durability under SIGKILL: nothing acknowledged is lost, duplicated or reordered, and state after
restart equals the replay of what is on disk. A few iterations here; benchmarks/crash_soak.py runs long."""
from __future__ import annotations

import os

from crashkit import crash_iterations


def test_kill_9_loses_no_acknowledged_message(server_factory, tmp_path):
    data_dir = str(tmp_path / "crash-data")
    iterations = int(os.environ.get("MACP_CRASH_ITERATIONS", "4"))
    stats = crash_iterations(lambda: server_factory(data_dir=data_dir), iterations, seed=7,
                             log=lambda line: None)
    assert stats["iterations"] == iterations
    assert stats["acked_messages"] > 50, stats      # the load really ran between kills
