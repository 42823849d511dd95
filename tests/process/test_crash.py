"""Durability under SIGKILL: nothing acknowledged is lost, duplicated or reordered, and state after
restart equals the replay of what is on disk. A few iterations here; benchmarks/crash_soak.py runs long."""
from __future__ import annotations

import os

import pytest
from tests.support.crashkit import crash_iterations


# Small segments and interval checkpoints: kills also interrupt rotation, checkpoint writes and the
# compaction that follows every restart (each restart leaves the envelopes of terminal sessions dead).
STRESS_ENV = {"MACP_WAL_SEGMENT_BYTES": "16384", "MACP_CHECKPOINT_INTERVAL": "3"}


def test_kill_9_loses_no_acknowledged_message(server_factory, tmp_path):
    data_dir = str(tmp_path / "crash-data")
    iterations = int(os.environ.get("MACP_CRASH_ITERATIONS", "4"))
    servers = []

    def make():
        servers.append(server_factory(env=STRESS_ENV, data_dir=data_dir))
        return servers[-1]

    stats = crash_iterations(make, iterations, seed=7, log=lambda line: None)
    assert stats["iterations"] == iterations
    assert stats["acked_messages"] > 50, stats      # the load really ran between kills
    assert "storage: compacted" in servers[0].log(), "no compaction ran between the kills"


def test_kill_9_during_compaction(server_factory, tmp_path):
    """A backlog of dead records is built with compaction off; then servers with compaction on are
    killed within moments of becoming ready, i.e. while they compact, again and again."""
    data_dir = str(tmp_path / "crash-data")
    build = crash_iterations(
        lambda: server_factory(env={**STRESS_ENV, "MACP_COMPACT_DEAD_RATIO": "0"}, data_dir=data_dir),
        1, seed=3, min_run=1.5, max_run=2.0, clients=6, log=lambda line: None)
    assert build["acked_messages"] > 100, build
    servers = []

    def make():
        servers.append(server_factory(env={**STRESS_ENV, "MACP_WAL_SEGMENT_BYTES": "4096"}, data_dir=data_dir))
        return servers[-1]

    stats = crash_iterations(make, int(os.environ.get("MACP_CRASH_ITERATIONS", "4")) + 2, seed=11, min_run=0.0,
                             max_run=0.08, log=lambda line: None)
    assert stats["iterations"] >= 6
    log = servers[0].log()
    assert "storage: compacted" in log
