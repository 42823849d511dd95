"""Checkpoints and compaction, in-process: terminal and interval checkpoints restore exactly what a
full replay rebuilds; compaction of the file log drops only what a checkpoint covers, survives a
crash at each of its steps, and never disturbs a concurrent reader; damaged or unusable checkpoints
fall back to the history still on disk. Spec: runtime.md §10.4, §10.5; runtime/kernel/checkpoints.py.
"""
from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.vocabulary.session import CANCELLED, EXPIRED, OPEN, RESOLVED, SUSPENDED
from macp_runtime.storage import ENTRY_KIND_CHECKPOINT, ENTRY_KIND_INCOMING, FileLogStore, MemoryStore
from macp_runtime.storage import file_log
from macp_runtime.storage.base import TERMINAL_CHECKPOINT, is_terminal_checkpoint

MODE = "macp.mode.decision.v1"
T0 = 1_700_000_000_000
_MODES = ModeRegistry.from_spec_dirs()
COORD = Identity("coord")


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def env(sid, sender, mtype, payload, ts=T0, message_id=None):
    return envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=mtype,
                                 message_id=message_id or str(uuid.uuid4()), session_id=sid, sender=sender,
                                 timestamp_unix_ms=ts, payload=payload.SerializeToString())


def open_store(d: Path, **opts) -> FileLogStore:
    store = FileLogStore(str(d), **opts)
    store.open()
    return store


def engine_on(store, clock=None, interval=0, **opts) -> Engine:
    return Engine(_MODES, PolicyRegistry(), store, clock=clock or Clock(), checkpoint_interval=interval, **opts)


def start(engine, ttl=86_400_000, participants=("alice", "bob")):
    sid = str(uuid.uuid4())
    payload = core_pb2.SessionStartPayload(participants=list(participants), mode_version="1.0.0",
                                           configuration_version="c", policy_version="policy.default",
                                           ttl_ms=ttl, context_id="ctx", intent="i",
                                           extensions={"x.k": b"v"})
    engine.start_session(env(sid, "coord", "SessionStart", payload, ts=engine.clock()), COORD)
    return sid


def send(engine, sid, sender, mtype, payload):
    return engine.process_message(env(sid, sender, mtype, payload), Identity(sender))


def proposal(engine, sid, pid="p1"):
    return send(engine, sid, "alice", "Proposal", decision_pb2.ProposalPayload(proposal_id=pid, option="o"))


def evaluation(engine, sid, who="bob"):
    return send(engine, sid, who, "Evaluation", decision_pb2.EvaluationPayload(
        proposal_id="p1", recommendation="APPROVE", confidence=0.75, reason="fine"))


def vote(engine, sid, who):
    return send(engine, sid, who, "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))


def commit(engine, sid):
    return send(engine, sid, "coord", "Commitment", core_pb2.CommitmentPayload(
        commitment_id="c1", action="deployment.approved", authority_scope="t", reason="ok", mode_version="1.0.0",
        policy_version="policy.default", configuration_version="c", outcome_positive=True))


def resolved_session(engine):
    sid = start(engine)
    proposal(engine, sid)
    evaluation(engine, sid)
    vote(engine, sid, "alice")
    vote(engine, sid, "bob")
    assert commit(engine, sid).state == RESOLVED
    return sid


def fingerprint(s):
    """Everything a session carries that a restart must give back."""
    return (s.session_id, s.mode, s.status, s.phase, s.state, s.initiator, s.participants, s.mode_version,
            s.configuration_version, s.policy_version, s.policy.to_json(), s.intent, s.context_id,
            s.extension_keys, s.ttl_ms, s.started_at_ms, s.deadline_ms, sorted(s.seen),
            {k: list(v) for k, v in (s.activity or {}).items()}, s.resolution, s.suspended_at_ms,
            s.accumulated_suspended_ms, s.compiled.digest)


def wal_bytes(d: Path) -> int:
    """Bytes of the log's segments; a segment background compaction deletes between listing and sizing
    counts as nothing (it is gone)."""
    total = 0
    for p in (d / "wal").glob("*.log"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def test_every_terminal_transition_writes_a_checkpoint_that_restores_the_session(tmp_path):
    d = tmp_path / "data"
    clock = Clock()
    store = open_store(d)
    engine = engine_on(store, clock)
    resolved = resolved_session(engine)
    cancelled = start(engine)
    proposal(engine, cancelled)
    engine.cancel_session(cancelled, COORD, "no")
    swept = start(engine, ttl=1000)
    lazy = start(engine, ttl=1000)
    suspended = start(engine)
    engine.suspend_session(suspended, COORD, "pause")
    open_ = start(engine)
    proposal(engine, open_)
    clock.now += 5000
    assert engine.sweep(3_600_000) == (2, 0)        # swept and lazy both expire here
    assert engine.flush_checkpoints()
    before = {sid: fingerprint(engine.lookup(sid)) for sid in (resolved, cancelled, swept, lazy, suspended, open_)}
    for sid in (resolved, cancelled, swept, lazy):
        history = store.history(sid)
        assert is_terminal_checkpoint(history[-1]), [r.message_type for r in history]
        assert engine.lookup(sid).log_length == len(history)
    for sid in (suspended, open_):
        assert all(r.kind != ENTRY_KIND_CHECKPOINT for r in store.history(sid))
    engine.close()
    store.close()

    # no background compaction here: it may otherwise drop the records full_history() reads below
    # before the test gets there (a race under load)
    store = open_store(d, compact_dead_ratio=None)
    engine = engine_on(store, clock)
    assert engine.recover() == (6, 0)
    after = {sid: fingerprint(engine.lookup(sid)) for sid in before}
    assert after == before
    # after the reopen a terminal session's history is its checkpoint alone (as the reference)
    for sid in (resolved, cancelled, swept, lazy):
        assert [r.message_type for r in store.history(sid)] == [TERMINAL_CHECKPOINT]
        assert engine.lookup(sid).log_length == 1
    assert len(store.history(open_)) == 2
    # dedup still knows every accepted id, and nothing more can be sent
    first = store.full_history(resolved)   # the records are still on disk (nothing compacted yet)
    assert [r.message_type for r in first][:2] == ["SessionStart", "Proposal"]
    again = engine.process_message(env(resolved, "alice", "Proposal", decision_pb2.ProposalPayload(
        proposal_id="p1", option="o"), message_id=first[1].message_id), Identity("alice"))
    assert again.duplicate and again.state == RESOLVED
    assert engine.lookup(suspended).status == SUSPENDED
    engine.resume_session(suspended, COORD, "go")
    assert vote(engine, open_, "alice").state == OPEN
    engine.close()
    store.close()


def test_full_replay_and_checkpoint_agree_with_a_memory_replay(tmp_path):
    """The restored session equals the one a fresh engine builds from the same envelopes."""
    d = tmp_path / "data"
    store = open_store(d)
    engine = engine_on(store)
    sid = resolved_session(engine)
    assert engine.flush_checkpoints()
    envelopes = [r for r in store.history(sid) if r.kind == ENTRY_KIND_INCOMING]
    engine.close()
    store.close()

    mem = MemoryStore()
    mem.open()
    fresh = engine_on(mem)
    for r in envelopes:
        e = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=r.message_type, message_id=r.message_id,
                                  session_id=sid, sender=r.sender, timestamp_unix_ms=r.timestamp_unix_ms,
                                  payload=r.payload)
        if r.message_type == "SessionStart":
            fresh.start_session(e, Identity(r.sender))
        else:
            fresh.process_message(e, Identity(r.sender))
    expected = fingerprint(fresh.lookup(sid))

    store = open_store(d)
    engine = engine_on(store)
    engine.recover()
    got = fingerprint(engine.lookup(sid))
    # activity times and the start time are the server clock's in both; only they may differ
    assert got[:15] == expected[:15] and got[17:] == expected[17:]
    store.close()


def test_interval_checkpoints_shorten_replay_and_keep_the_history(tmp_path):
    d = tmp_path / "data"
    store = open_store(d)
    engine = engine_on(store, interval=4)
    sid = start(engine, participants=("alice", "bob", "carol", "dave", "erin"))
    proposal(engine, sid)
    for who in ("bob", "carol", "dave", "erin", "alice"):
        evaluation(engine, sid, who)
    vote(engine, sid, "alice")
    history = store.history(sid)
    kinds = [r.kind == ENTRY_KIND_CHECKPOINT for r in history]
    # L counts the checkpoint itself: written when the log reached 4 and 8 entries
    assert [i for i, k in enumerate(kinds) if k] == [4, 8]
    assert engine.lookup(sid).log_length == len(history) == 10
    before = fingerprint(engine.lookup(sid))
    store.close()

    store = open_store(d)
    engine = engine_on(store, interval=4)
    engine.recover()
    assert fingerprint(engine.lookup(sid)) == before
    assert len(store.history(sid)) == 10                # interval checkpoints compact nothing
    assert vote(engine, sid, "bob").state == OPEN
    assert commit(engine, sid).state == RESOLVED
    store.close()


def test_a_mode_state_json_cannot_hold_gets_no_interval_checkpoint(tmp_path):
    store = open_store(tmp_path / "data")
    engine = engine_on(store, interval=2)
    sid = start(engine)
    engine.lookup(sid).state["odd"] = (1, 2)            # a tuple comes back from JSON as a list
    proposal(engine, sid)
    assert all(r.kind != ENTRY_KIND_CHECKPOINT for r in store.history(sid))
    store.close()


def test_recovery_writes_the_checkpoints_a_crash_left_out(tmp_path):
    d = tmp_path / "data"
    store = open_store(d)
    engine = engine_on(store)
    engine.checkpoints.enabled = False                  # as if killed before the checkpointer ran
    sids = [resolved_session(engine) for _ in range(3)]
    store.close()

    store = open_store(d)
    engine = engine_on(store)
    assert engine.recover() == (3, 0)
    assert engine.flush_checkpoints()
    for sid in sids:
        assert is_terminal_checkpoint(store.history(sid)[-1])
    store.close()
    store = open_store(d)
    assert all(len(h) == 1 for _, h in store.replay())
    store.close()


def _fill(d: Path, sessions: int, segment_bytes: int = 4096):
    store = open_store(d, segment_bytes=segment_bytes, compact_dead_ratio=None)
    engine = engine_on(store)
    sids = [resolved_session(engine) for _ in range(sessions)]
    open_sid = start(engine)
    proposal(engine, open_sid)
    assert engine.flush_checkpoints()
    states = {sid: fingerprint(engine.lookup(sid)) for sid in sids + [open_sid]}
    engine.close()
    store.close()
    return sids, open_sid, states


def _recovered(d: Path, **opts):
    store = open_store(d, **opts)
    engine = engine_on(store)
    recovered, failed = engine.recover()
    return store, engine, recovered, failed


def test_compaction_drops_what_checkpoints_cover_and_restores_the_same_sessions(tmp_path):
    d = tmp_path / "data"
    sids, open_sid, states = _fill(d, 40)
    size_before = wal_bytes(d)
    store, engine, recovered, _ = _recovered(d, segment_bytes=4096, compact_dead_ratio=None)
    assert recovered == 41
    assert store.compact(0.5) > 0
    assert store.compactions > 0
    size_after = wal_bytes(d)
    assert size_after < 0.6 * size_before, (size_before, size_after)   # a checkpoint is ~half a session
    # nothing visible changed, in this process or after a reopen
    assert {sid: fingerprint(engine.lookup(sid)) for sid in states} == states
    assert len(store.history(open_sid)) == 2
    store.compact(0.0)                                  # segments below the ratio too
    assert store.compact(0.0) == 0                      # nothing dead is left
    store.close()
    store, engine, recovered, failed = _recovered(d)
    assert (recovered, failed) == (41, 0)
    assert {sid: fingerprint(engine.lookup(sid)) for sid in states} == states
    assert all(len(store.history(sid)) == 1 for sid in sids)
    assert proposal(engine, open_sid, "p2").state == OPEN    # the open session goes on
    store.close()


def test_records_still_shown_in_history_are_not_compacted(tmp_path):
    """A session that resolved in this process keeps its history for subscribers until it is released."""
    d = tmp_path / "data"
    store = open_store(d, segment_bytes=2048, compact_dead_ratio=None)
    engine = engine_on(store)
    sids = [resolved_session(engine) for _ in range(20)]
    assert engine.flush_checkpoints()
    lengths = {sid: len(store.history(sid)) for sid in sids}
    assert store.compact(0.0) == 0
    assert {sid: len(store.history(sid)) for sid in sids} == lengths
    for sid in sids[:10]:
        store.release(sid)                               # evicted: only the checkpoint must stay
    assert store.compact(0.0) > 0
    assert {sid: len(store.history(sid)) for sid in sids[10:]} == {sid: lengths[sid] for sid in sids[10:]}
    store.close()
    store, engine, recovered, failed = _recovered(d)
    assert (recovered, failed) == (20, 0)
    assert all(engine.lookup(sid).status == RESOLVED for sid in sids)
    store.close()


def test_older_incarnations_are_compacted_away(tmp_path):
    d = tmp_path / "data"
    clock = Clock()
    store = open_store(d, segment_bytes=1024, compact_dead_ratio=None)
    engine = engine_on(store, clock)
    sid = resolved_session(engine)
    assert engine.flush_checkpoints()
    clock.now += 10_000
    assert engine.sweep(1000) == (0, 1)                 # evicted: the id may start again
    payload = core_pb2.SessionStartPayload(participants=["alice", "bob"], mode_version="1.0.0",
                                           configuration_version="c", ttl_ms=86_400_000)
    engine.start_session(env(sid, "coord", "SessionStart", payload, ts=clock.now), COORD)
    for _ in range(12):                                 # fill segments so the old ones are sealed
        resolved_session(engine)
    assert engine.flush_checkpoints()
    store.compact(0.0)
    store.close()
    raw = b"".join(p.read_bytes() for p in sorted((d / "wal").glob("*.log")))
    store, engine, _, _ = _recovered(d)
    assert engine.lookup(sid).status == OPEN and len(store.history(sid)) == 1
    assert raw.count(sid.encode()) == 1                 # only the new SessionStart names the id
    store.close()


@pytest.mark.parametrize("crash_at", ["write", "fsync", "rename", "dir-fsync", "unlink"])
def test_a_crash_at_any_step_of_compaction_leaves_a_replayable_directory(tmp_path, monkeypatch, crash_at):
    d = tmp_path / "data"
    # tiny segments: some hold only records a later checkpoint covers, and are removed, not rewritten
    segment_bytes = 400 if crash_at == "unlink" else 4096
    sids, open_sid, states = _fill(d, 30, segment_bytes=segment_bytes)
    store, engine, _, _ = _recovered(d, segment_bytes=segment_bytes, compact_dead_ratio=None)

    class Crash(Exception):
        pass

    real = {"write": os.pwrite, "fsync": os.fsync, "rename": os.replace, "dir-fsync": os.fsync,
            "unlink": os.unlink}
    calls = {"n": 0}

    def boom(*args, **kwargs):
        if crash_at == "dir-fsync":                     # the file fsync passes, the directory's fails
            calls["n"] += 1
            if calls["n"] == 1 and not kwargs:
                return real["fsync"](*args)
        raise Crash(crash_at)

    target = {"write": "pwrite", "fsync": "fsync", "rename": "replace", "dir-fsync": "fsync", "unlink": "unlink"}
    monkeypatch.setattr(os, target[crash_at], boom)
    with pytest.raises(Crash):
        store.compact(0.0)
    monkeypatch.undo()
    # "kill -9": no close(), the lock goes with the process; here the files are released by hand
    store._release_files()
    leftovers = list((d / "wal").glob("*.compact"))
    store, engine, recovered, failed = _recovered(d, compact_dead_ratio=None)
    assert (recovered, failed) == (31, 0)
    assert not list((d / "wal").glob("*.compact"))
    assert {sid: fingerprint(engine.lookup(sid)) for sid in states} == states
    assert crash_at not in ("write", "rename") or leftovers
    store.compact(0.0)
    store.close()
    store, engine, recovered, failed = _recovered(d)
    assert (recovered, failed) == (31, 0)
    store.close()


def test_readers_during_compaction_see_consistent_histories(tmp_path):
    d = tmp_path / "data"
    sids, open_sid, _ = _fill(d, 60, segment_bytes=2048)
    store, engine, _, _ = _recovered(d, segment_bytes=2048, compact_dead_ratio=None)
    expected = {sid: [r.SerializeToString() for r in store.history(sid)] for sid in sids + [open_sid]}
    stop = threading.Event()
    errors = []

    def reader():
        while not stop.is_set():
            for sid, want in expected.items():
                got = [r.SerializeToString() for r in store.history(sid)]
                if got != want:
                    errors.append(sid)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert store.compact(0.0) > 0
        for _ in range(10):                              # appends go on meanwhile
            proposal(engine, start(engine))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    store.close()


def test_background_compaction_runs_after_recovery(tmp_path):
    d = tmp_path / "data"
    _fill(d, 30)
    size_before = wal_bytes(d)
    store = open_store(d, segment_bytes=4096, compact_interval_s=0.05)
    engine = engine_on(store)
    engine.recover()                                    # starts the compactor
    for _ in range(100):
        if store.compactions:
            break
        threading.Event().wait(0.05)
    assert store.compactions > 0 and wal_bytes(d) < size_before
    store.close()


# --- damaged checkpoints -----------------------------------------------------------------------------

def _checkpoint_frame(d: Path, sid: str) -> tuple[Path, int, int]:
    """(segment, offset, frame length) of the session's terminal checkpoint."""
    for seg in sorted((d / "wal").glob("*.log")):
        data = seg.read_bytes()
        pos = 0
        while pos < len(data):
            _, length, _ = file_log._HEADER.unpack_from(data, pos)
            payload = data[pos + 12 : pos + 12 + length]
            rec = file_log.LogRecord.FromString(payload)
            if rec.session_id == sid and is_terminal_checkpoint(rec):
                return seg, pos, 12 + length
            pos += 12 + length
    raise AssertionError("no checkpoint")


def test_a_checkpoint_with_a_bad_checksum_falls_back_to_the_messages(tmp_path):
    d = tmp_path / "data"
    sids, open_sid, states = _fill(d, 5, segment_bytes=1 << 20)
    seg, off, length = _checkpoint_frame(d, sids[2])
    data = bytearray(seg.read_bytes())
    data[off + length - 3] ^= 0xFF
    seg.write_bytes(bytes(data))
    store = FileLogStore(str(d))
    report = store.open()
    assert report.dropped_records == 1 and seg.name in report.problems[0]
    engine = engine_on(store)
    assert engine.recover() == (6, 0)
    assert {sid: fingerprint(engine.lookup(sid)) for sid in states} == states
    assert engine.flush_checkpoints()                   # a new checkpoint replaces the damaged one
    assert is_terminal_checkpoint(store.history(sids[2])[-1])
    store.close()


def test_an_unusable_checkpoint_falls_back_to_the_history_still_on_disk(tmp_path, caplog):
    d = tmp_path / "data"
    sids, open_sid, states = _fill(d, 5, segment_bytes=1 << 20)
    seg, off, length = _checkpoint_frame(d, sids[1])
    data = seg.read_bytes()
    rec = file_log.LogRecord.FromString(data[off + 12 : off + length])
    rec.payload = b"\xff\xfe not a snapshot"
    new_frame = file_log.frame(rec.SerializeToString())
    seg.write_bytes(data[:off] + new_frame + data[off + length:])
    store = open_store(d)
    engine = engine_on(store)
    assert engine.recover() == (6, 0)
    assert "checkpoint cannot be restored" in caplog.text
    assert {sid: fingerprint(engine.lookup(sid)) for sid in states} == states
    assert engine.flush_checkpoints()
    store.close()
    store, engine, recovered, failed = _recovered(d)
    assert (recovered, failed) == (6, 0)
    assert engine.lookup(sids[1]).status == RESOLVED
    store.close()


def test_a_damaged_checkpoint_of_a_compacted_session_loses_that_session_only(tmp_path):
    d = tmp_path / "data"
    sids, open_sid, states = _fill(d, 30)
    store, engine, _, _ = _recovered(d, segment_bytes=4096, compact_dead_ratio=None)
    store.compact(0.0)
    store.close()
    seg, off, length = _checkpoint_frame(d, sids[3])
    data = bytearray(seg.read_bytes())
    data[off + 20] ^= 0xFF
    seg.write_bytes(bytes(data))
    store = FileLogStore(str(d))
    report = store.open()
    assert report.dropped_records == 1 and "skipped" in report.problems[0]
    engine = engine_on(store)
    recovered, failed = engine.recover()
    assert recovered + failed == 30 and sids[3] not in {s.session_id for s in engine.sessions()}
    assert {sid: fingerprint(engine.lookup(sid)) for sid in states if sid != sids[3]} == \
        {sid: v for sid, v in states.items() if sid != sids[3]}
    store.close()


@pytest.mark.parametrize("where", ["after", "middle"])
def test_a_garbage_segment_file_costs_only_the_sessions_it_held(tmp_path, where):
    d = tmp_path / "data"
    sids, open_sid, states = _fill(d, 30)
    segments = sorted((d / "wal").glob("*.log"))
    if where == "after":
        victim = segments[-1].with_name(f"{int(segments[-1].stem) + 3:08d}.log")
        touched = set()
    else:
        victim = segments[len(segments) // 2]
        touched = {r.session_id for seg, r in _records(d) if seg == victim}
    victim.write_bytes(os.urandom(5000))
    store = FileLogStore(str(d), compact_dead_ratio=None)
    report = store.open()
    assert report.dropped_bytes == 5000 and victim.name in report.problems[0]
    engine = engine_on(store)
    engine.recover()
    for sid, state in states.items():
        if sid not in touched:
            assert fingerprint(engine.lookup(sid)) == state
    store.close()


def _records(d: Path):
    for seg in sorted((d / "wal").glob("*.log")):
        data = seg.read_bytes()
        pos = 0
        while pos < len(data):
            _, length, _ = file_log._HEADER.unpack_from(data, pos)
            yield seg, file_log.LogRecord.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length


def test_a_large_snapshot_is_stored_deflated_and_restores(tmp_path, monkeypatch):
    from macp_runtime.kernel import checkpoints
    from macp_runtime.storage import SessionSnapshot

    monkeypatch.setattr(checkpoints, "DEFLATE_ABOVE", 100)
    d = tmp_path / "data"
    store = open_store(d)
    engine = engine_on(store)
    sid = resolved_session(engine)
    assert engine.flush_checkpoints()
    before = fingerprint(engine.lookup(sid))
    payload = store.history(sid)[-1].payload
    assert SessionSnapshot.FromString(payload).deflated and not SessionSnapshot.FromString(payload).session_id
    assert checkpoints.read_snapshot(payload).session_id == sid
    store.close()
    store, engine, recovered, failed = _recovered(d)
    assert fingerprint(engine.lookup(sid)) == before
    store.close()
