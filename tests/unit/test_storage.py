"""Tests of the session history stores (memory and the embedded file log)."""
from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from macp_runtime.storage import (
    ENTRY_KIND_INCOMING,
    ENTRY_KIND_INTERNAL,
    FileLogStore,
    LogRecord,
    MemoryStore,
    RecoveryReport,
    StorageError,
    Store,
    open_store,
)
from macp_runtime.storage import file_log

from tests.support import ROOT

REPO = Path(ROOT)


def rec(session_id: str, n: int, payload: bytes = b"") -> LogRecord:
    return LogRecord(
        session_id=session_id,
        kind=ENTRY_KIND_INCOMING,
        message_id=f"{session_id}-{n}",
        message_type="Proposal",
        sender="agent://a",
        mode="macp.mode.decision.v1",
        macp_version="1.0",
        timestamp_unix_ms=1_700_000_000_000 + n,
        received_at_ms=1_700_000_000_100 + n,
        payload=payload or f"payload {n}".encode(),
    )


def ids(records: list[LogRecord]) -> list[str]:
    return [r.message_id for r in records]


def segments(data_dir: Path) -> list[Path]:
    return sorted(p for p in (data_dir / "wal").iterdir() if p.name.endswith(".log"))


def reopen(data_dir: Path, **opts) -> tuple[FileLogStore, RecoveryReport]:
    store = FileLogStore(str(data_dir), **opts)
    return store, store.open()


@pytest.fixture(params=["memory", "file"])
def store(request, tmp_path):
    s: Store = open_store(request.param == "memory", str(tmp_path / "data"))
    s.open()
    yield s
    s.close()


# ---------------------------------------------------------------- both stores


def test_round_trip_and_indices(store):
    assert store.append(rec("s1", 0)) == 0
    assert store.append(rec("s2", 0)) == 0
    assert store.append(rec("s1", 1)) == 1
    internal = LogRecord(session_id="s1", kind=ENTRY_KIND_INTERNAL, message_type="TtlExpired", sender="_runtime")
    assert store.append(internal) == 2

    h = store.history("s1")
    assert ids(h) == ["s1-0", "s1-1", ""]
    assert h[0] == rec("s1", 0)
    assert h[2].kind == ENTRY_KIND_INTERNAL
    assert store.history("unknown") == []
    assert [(sid, ids(rs)) for sid, rs in store.replay()] == [("s1", ["s1-0", "s1-1", ""]), ("s2", ["s2-0"])]


def test_stored_record_is_independent_of_caller(store):
    r = rec("s", 0)
    store.append(r)
    r.payload = b"mutated"
    assert store.history("s")[0].payload == b"payload 0"


def test_open_store_factory(tmp_path):
    assert isinstance(open_store(True, str(tmp_path)), MemoryStore)
    s = open_store(False, str(tmp_path / "d"), segment_bytes=1234)
    assert isinstance(s, FileLogStore) and s.durable and s.segment_bytes == 1234
    assert not (tmp_path / "d").exists()  # the factory does not open
    assert MemoryStore.durable is False


def test_records_pickle_under_installed_module_name():
    assert LogRecord.__module__ == "macp_runtime.storage.records_pb2"
    assert pickle.loads(pickle.dumps(rec("s", 1))) == rec("s", 1)


# ---------------------------------------------------------------- file log


def test_reopen_shows_same_records(tmp_path):
    d = tmp_path / "data"
    s, report = reopen(d)
    assert report.records == 0 and report.dropped_records == 0
    for i in range(5):
        s.append(rec("a", i))
        s.append(rec("b", i, payload=os.urandom(5000)))  # larger than the read-ahead
    before = list(s.replay())
    s.close()
    s.close()  # idempotent
    with pytest.raises(StorageError):
        s.append(rec("a", 99))

    s2, report = reopen(d)
    assert (report.sessions, report.records, report.dropped_records, report.problems) == (2, 10, 0, [])
    assert list(s2.replay()) == before
    assert s2.append(rec("a", 5)) == 5
    s2.close()


def test_concurrent_appends_group_commit(tmp_path):
    d = tmp_path / "data"
    s, _ = reopen(d)
    threads, per_thread, sessions_per_thread = 8, 60, 5
    acked: dict[str, list[str]] = {}
    errors = []
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        mine = [f"t{t}-s{k}" for k in range(sessions_per_thread)]
        for i in range(per_thread):
            sid = mine[i % sessions_per_thread]
            try:
                idx = s.append(rec(sid, i))
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return
            acked.setdefault(sid, []).append(f"{sid}-{i}")
            assert idx == len(acked[sid]) - 1

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    total = threads * per_thread
    assert s.synced_records == total
    assert s.sync_count <= total
    s.close()

    s2, report = reopen(d)
    assert report.records == total and report.dropped_records == 0
    replayed = dict((sid, ids(rs)) for sid, rs in s2.replay())
    assert replayed == acked
    s2.close()


def _fill(d: Path, n: int = 10) -> None:
    s, _ = reopen(d)
    for i in range(n):
        s.append(rec("s", i))
    s.close()


@pytest.mark.parametrize("damage", ["torn", "garbage", "torn+garbage"])
def test_torn_tail_is_truncated(tmp_path, damage):
    d = tmp_path / "data"
    _fill(d)
    (seg,) = segments(d)
    good_size = seg.stat().st_size
    if "torn" in damage:
        with open(seg, "r+b") as f:
            f.truncate(good_size - 3)
    if "garbage" in damage:
        with open(seg, "ab") as f:
            f.write(random.Random(1).randbytes(777))

    s, report = reopen(d)
    expected = 9 if "torn" in damage else 10
    assert ids(s.history("s")) == [f"s-{i}" for i in range(expected)]
    assert report.records == expected
    assert report.dropped_records >= 1 and report.dropped_bytes > 0
    assert len(report.problems) == 1 and seg.name in report.problems[0]
    assert s.append(rec("s", 100)) == expected
    s.close()

    s, report = reopen(d)
    assert report.dropped_records == 0 and report.problems == []
    assert ids(s.history("s"))[-1] == "s-100"
    s.close()


def test_garbage_in_middle_is_skipped(tmp_path):
    d = tmp_path / "data"
    _fill(d, 10)
    (seg,) = segments(d)
    raw = seg.read_bytes()
    frame_len = len(file_log.frame(rec("s", 0).SerializeToString()))
    # Corrupt the payload of record 3 (the frames are all the same length) and insert junk after it.
    start = 3 * frame_len
    damaged = bytearray(raw)
    damaged[start + 20] ^= 0xFF
    damaged[start + frame_len : start + frame_len] = b"\x00junk" * 10 + file_log.MAGIC + b"\xff" * 9
    seg.write_bytes(bytes(damaged))

    s, report = reopen(d)
    assert ids(s.history("s")) == [f"s-{i}" for i in range(10) if i != 3]
    assert report.dropped_records >= 1
    assert report.dropped_bytes == frame_len + 50 + 13
    assert any("offset" in p and seg.name in p for p in report.problems)
    assert s.append(rec("s", 10)) == 9
    s.close()


def test_junk_file_in_wal_is_ignored(tmp_path):
    d = tmp_path / "data"
    _fill(d, 3)
    (d / "wal" / "notes.txt").write_bytes(b"not a segment")
    (d / "wal" / "123.log").write_bytes(os.urandom(100))  # wrong name format
    s, report = reopen(d)
    assert report.records == 3 and report.problems == []
    s.close()


def test_second_open_of_same_dir_fails(tmp_path):
    d = tmp_path / "data"
    s, _ = reopen(d)
    with pytest.raises(StorageError, match="in use by another process"):
        FileLogStore(str(d)).open()
    s.close()
    s2, _ = reopen(d)  # released by close()
    s2.close()


def test_second_open_from_another_process_fails(tmp_path):
    d = tmp_path / "data"
    s, _ = reopen(d)
    code = (
        "import sys\n"
        "from macp_runtime.storage import FileLogStore, StorageError\n"
        "try:\n"
        f"    FileLogStore({str(d)!r}).open()\n"
        "except StorageError as e:\n"
        "    print(e); sys.exit(3)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    s.close()
    assert proc.returncode == 3, proc.stderr
    assert "in use by another process" in proc.stdout


def test_fdatasync_failure_discards_the_record(tmp_path, monkeypatch):
    d = tmp_path / "data"
    s, _ = reopen(d)
    assert s.append(rec("s", 0)) == 0

    real = os.fdatasync
    calls = {"n": 0}

    def failing_once(fd):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(5, "Input/output error (simulated)")
        return real(fd)

    (seg,) = segments(d)
    size_before = seg.stat().st_size
    monkeypatch.setattr(os, "fdatasync", failing_once)
    with pytest.raises(StorageError, match="fdatasync failed"):
        s.append(rec("s", 1))
    assert seg.stat().st_size == size_before  # the failed batch was cut off again
    assert ids(s.history("s")) == ["s-0"]
    assert s.append(rec("s", 2)) == 1
    s.close()

    s, report = reopen(d)
    assert ids(s.history("s")) == ["s-0", "s-2"]
    assert report.dropped_records == 0
    s.close()


def test_failed_truncation_fails_the_store_closed(tmp_path, monkeypatch):
    d = tmp_path / "data"
    s, _ = reopen(d)
    s.append(rec("s", 0))

    def fail(fd, *a):
        raise OSError(5, "simulated")

    monkeypatch.setattr(os, "fdatasync", fail)
    monkeypatch.setattr(os, "ftruncate", fail)
    with pytest.raises(StorageError):
        s.append(rec("s", 1))
    monkeypatch.undo()
    with pytest.raises(StorageError, match="store failed"):
        s.append(rec("s", 2))
    assert ids(s.history("s")) == ["s-0"]
    s.close()


def test_segment_rotation(tmp_path):
    d = tmp_path / "data"
    s, _ = reopen(d, segment_bytes=300)
    for i in range(20):
        assert s.append(rec(f"s{i % 3}", i)) == i // 3
    s.close()
    segs = segments(d)
    assert len(segs) > 3
    assert [p.name for p in segs[:2]] == ["00000001.log", "00000002.log"]

    s, report = reopen(d, segment_bytes=300)
    assert report.records == 20 and report.problems == []
    assert [sid for sid, _ in s.replay()] == ["s0", "s1", "s2"]
    assert ids(s.history("s1")) == [f"s1-{i}" for i in range(1, 20, 3)]
    s.append(rec("s0", 99))
    s.close()
    assert len(segments(d)) >= len(segs)


def test_damage_in_sealed_segment_keeps_later_segments(tmp_path):
    d = tmp_path / "data"
    s, _ = reopen(d, segment_bytes=200)
    for i in range(12):
        s.append(rec("s", i))
    s.close()
    first = segments(d)[0]
    with open(first, "r+b") as f:  # torn end of a sealed segment: skipped, not truncated
        f.truncate(first.stat().st_size - 5)
    s, report = reopen(d, segment_bytes=200)
    got = ids(s.history("s"))
    assert len(got) == 11 and got[-1] == "s-11"
    assert report.dropped_records == 1 and "skipped" in report.problems[0]
    s.close()


def test_generated_code_is_up_to_date():
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- incarnations and release


def start_rec(session_id: str, n: int) -> LogRecord:
    r = rec(session_id, n)
    r.message_type = "SessionStart"
    return r


def test_session_start_begins_a_new_incarnation(store):
    assert store.append(start_rec("s", 0)) == 0
    assert store.append(rec("s", 1)) == 1
    assert store.append(rec("t", 0)) == 0
    # The id is used again (after an eviction): indices restart, only the new incarnation is read.
    assert store.append(start_rec("s", 10)) == 0
    assert store.append(rec("s", 11)) == 1
    assert ids(store.history("s")) == ["s-10", "s-11"]
    assert dict((sid, ids(rs)) for sid, rs in store.replay()) == {"s": ["s-10", "s-11"], "t": ["t-0"]}


def test_release_forgets_the_in_memory_index(store):
    store.append(start_rec("s", 0))
    store.append(rec("s", 1))
    store.release("s")
    store.release("never-seen")
    assert store.history("s") == []
    assert [sid for sid, _ in store.replay()] == []
    assert store.append(start_rec("s", 5)) == 0
    assert ids(store.history("s")) == ["s-5"]


def test_reopen_keeps_only_the_latest_incarnation(tmp_path):
    s, _ = reopen(tmp_path / "d")
    s.append(start_rec("s", 0))
    s.append(rec("s", 1))
    s.release("s")          # evicted: the records stay on disk
    s.append(rec("u", 0))
    s.close()
    s, report = reopen(tmp_path / "d")
    assert ids(s.history("s")) == ["s-0", "s-1"]   # back after a restart, as runtime.md §5.9 says
    s.append(start_rec("s", 7))
    s.append(rec("s", 8))
    s.close()
    s, report = reopen(tmp_path / "d")
    assert ids(s.history("s")) == ["s-7", "s-8"]
    assert report.records == 3                     # the indexed records: s-7, s-8, u-0
    s.close()
