"""The file store's history retention (MACP_HISTORY_RETENTION_SECS): compaction keeps the records a
terminal checkpoint covers while the checkpoint is younger than the retention, so `complete_history`
(what WhatIfReplay reads) still has the session's beginning; older ones are compacted as before, and a
segment kept only for the retention is looked at again once it has passed."""
from __future__ import annotations

import time

from macp_runtime.storage import ENTRY_KIND_CHECKPOINT, ENTRY_KIND_INCOMING, FileLogStore, LogRecord
from macp_runtime.storage.base import TERMINAL_CHECKPOINT

HOUR_MS = 3_600_000


def _now() -> int:
    return time.time_ns() // 1_000_000


def record(sid: str, n: int, message_type: str, at_ms: int) -> LogRecord:
    kind = ENTRY_KIND_CHECKPOINT if message_type == TERMINAL_CHECKPOINT else ENTRY_KIND_INCOMING
    return LogRecord(session_id=sid, kind=kind, message_id="" if kind == ENTRY_KIND_CHECKPOINT else f"{sid}-{n}",
                     message_type=message_type, sender="a", mode="m", macp_version="1.0",
                     timestamp_unix_ms=at_ms, received_at_ms=at_ms, payload=b"x" * 200)


def write_sessions(d, ended_at: dict[str, int]) -> None:
    """Sessions of three envelopes and a terminal checkpoint at the given times, in small segments."""
    store = FileLogStore(str(d), segment_bytes=1024, compact_dead_ratio=None)
    store.open()
    for sid, at in ended_at.items():
        for n, mtype in enumerate(["SessionStart", "Proposal", "Commitment"]):
            store.append(record(sid, n, mtype, at - 10))
        store.append(record(sid, 3, TERMINAL_CHECKPOINT, at))
    store.close()


def reopened(d, retention_ms: int) -> FileLogStore:
    store = FileLogStore(str(d), segment_bytes=1024, compact_dead_ratio=None, history_retention_ms=retention_ms)
    store.open()
    return store


def test_recent_histories_survive_compaction_old_ones_do_not(tmp_path):
    d = tmp_path / "data"
    now = _now()
    write_sessions(d, {"recent": now - 1000, "old": now - 2 * HOUR_MS})
    store = reopened(d, HOUR_MS)
    assert store.compact(0) > 0                      # the old session's envelopes go
    recent = store.complete_history("recent")
    assert [r.message_type for r in recent] == ["SessionStart", "Proposal", "Commitment", TERMINAL_CHECKPOINT]
    assert store.complete_history("old") is None
    assert [r.message_type for r in store.history("old")] == [TERMINAL_CHECKPOINT]
    store.close()
    store = reopened(d, HOUR_MS)                     # and still after another start
    assert store.complete_history("recent") is not None
    store.close()


def test_without_retention_everything_covered_is_compacted(tmp_path):
    d = tmp_path / "data"
    write_sessions(d, {"recent": _now() - 1000})
    store = reopened(d, 0)
    store.compact(0)
    assert store.complete_history("recent") is None
    store.close()


def test_a_kept_segment_is_looked_at_again_once_the_retention_passed(tmp_path):
    d = tmp_path / "data"
    write_sessions(d, {"s": _now() - 1000})
    store = reopened(d, 1500)
    store.compact()                                  # the default ratio: kept for the retention
    assert store.complete_history("s") is not None
    rechecks = [seg.recheck_at_ms for seg in store._segs if seg.recheck_at_ms]
    assert rechecks and all(r <= _now() + 1500 for r in rechecks)
    time.sleep(0.6)
    store.compact()                                  # due now: compacted without any new dead record
    assert store.complete_history("s") is None
    assert [r.message_type for r in store.history("s")] == [TERMINAL_CHECKPOINT]
    store.close()
