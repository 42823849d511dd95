"""Damaged storage at start-up, over the wire: a server is started on a data directory with a torn
last record, a garbage segment file, a damaged region in the middle, a damaged or unusable checkpoint
(before and after compaction), or an interrupted compaction. Every time it must start, say in its
start-up log what it dropped, and serve every session the damage did not touch exactly as before
(GetSession); a session the damage did touch is either recovered or named in the log.
Spec: runtime.md §10.5; README "Durability".
"""
from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload
from macp_runtime.kernel.checkpoints import read_snapshot
from macp_runtime.storage import ENTRY_KIND_CHECKPOINT, LogRecord
from macp_runtime.storage import file_log
from macp_runtime.storage.base import is_terminal_checkpoint

MODE = "macp.mode.decision.v1"
OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
CANCELLED = envelope_pb2.SESSION_STATE_CANCELLED
SMALL_SEGMENTS = {"MACP_WAL_SEGMENT_BYTES": "4096"}


def get(stub, sid) -> core_pb2.SessionMetadata:
    return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("coord")).metadata


def view(md: core_pb2.SessionMetadata):
    return (md.session_id, md.mode, md.state, md.started_at_unix_ms, md.expires_at_unix_ms, md.mode_version,
            md.configuration_version, md.policy_version, list(md.participants), md.initiator,
            sorted((a.participant_id, a.message_count) for a in md.participant_activity))


def msg(stub, sid, sender, mtype, payload):
    ack = send(stub, envelope(MODE, mtype, sid, sender, payload))
    assert ack.ok, ack
    return ack


def populate(stub, resolved=8, open_=3, cancelled=1) -> dict[str, core_pb2.SessionMetadata]:
    """Sessions of every kind; returns their metadata as GetSession shows it."""
    sids = []
    for i in range(resolved + open_ + cancelled):
        sid = new_session_id()
        msg(stub, sid, "coord", "SessionStart", start_payload(["alice", "bob"], ttl_ms=3_600_000))
        msg(stub, sid, "alice", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="ship"))
        if i < resolved:
            msg(stub, sid, "bob", "Evaluation", decision_pb2.EvaluationPayload(
                proposal_id="p1", recommendation="APPROVE", confidence=0.9))
            msg(stub, sid, "alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))
            assert msg(stub, sid, "coord", "Commitment", commitment(action="deployment.approved")).session_state \
                == RESOLVED
        elif i >= resolved + open_:
            ack = stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid, reason="x"),
                                     metadata=bearer("coord")).ack
            assert ack.session_state == CANCELLED
        sids.append(sid)
    return {sid: get(stub, sid) for sid in sids}


def frames(data_dir: str) -> list[tuple[Path, int, int, LogRecord]]:
    """Every valid frame on disk: (segment, offset, frame length, record), in log order."""
    out = []
    for seg in sorted(Path(data_dir, "wal").glob("*.log")):
        data = seg.read_bytes()
        pos = 0
        while pos + file_log.HEADER_SIZE <= len(data):
            _, length, _ = file_log._HEADER.unpack_from(data, pos)
            end = pos + file_log.HEADER_SIZE + length
            out.append((seg, pos, end - pos, LogRecord.FromString(data[pos + file_log.HEADER_SIZE:end])))
            pos = end
    return out


def checked_restart(server_factory, srv, before, *, touched=(), env=None):
    """Start a server on the damaged directory. Every session the damage did not touch must be as
    before; a touched one may be recovered or gone (named in the log when some of it survived, or
    silently when every record of it lay in the damage, which the log reports by size). Returns
    (server, log text of this start)."""
    srv2 = server_factory(env=env or SMALL_SEGMENTS, data_dir=srv.data_dir)
    stub = srv2.stub()
    text = srv2.log().split("starting macp-runtime")[-1]
    for sid in re.findall(r"session (\S+) could not be recovered", text):
        assert sid in touched, f"{sid} was not touched by the damage but could not be recovered"
    for sid, md in before.items():
        try:
            now = get(stub, sid)
        except grpc.RpcError as exc:
            assert sid in touched, f"{sid} lost: {exc.details()}"
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            continue
        if sid not in touched:
            assert view(now) == view(md), sid
    return srv2, text


@pytest.fixture
def stopped(server_factory):
    """A data directory with sessions of every kind, written by a server that then stopped cleanly
    (so every terminal checkpoint is on disk)."""
    srv = server_factory(env=SMALL_SEGMENTS)
    before = populate(srv.stub())
    assert srv.stop() == 0
    return srv, before


def test_torn_last_record_is_cut_off_and_reported(server_factory, stopped):
    srv, before = stopped
    last = sorted(Path(srv.data_dir, "wal").glob("*.log"))[-1]
    torn = file_log.frame(LogRecord(session_id=new_session_id(), message_type="Proposal",
                                    payload=b"x" * 100).SerializeToString())[:40]
    with open(last, "ab") as f:     # a crash in the middle of a write: never acknowledged
        f.write(torn)
    srv2, text = checked_restart(server_factory, srv, before)
    assert re.search(r"storage recovery dropped 1 records \(40 bytes\): .*invalid tail at offset \d+ "
                     r"\(40 bytes, ~1 record\(s\)\) truncated", text), text
    # the directory is whole again: a second start drops nothing
    srv2.stop()
    srv3, text = checked_restart(server_factory, srv2, before)
    assert "dropped" not in text


@pytest.mark.parametrize("where", ["after", "middle"])
def test_a_garbage_segment_file_costs_only_what_it_held(server_factory, stopped, where):
    srv, before = stopped
    segments = sorted(Path(srv.data_dir, "wal").glob("*.log"))
    if where == "after":    # a stray file that sorts last, e.g. from a botched copy
        victim = segments[-1].with_name(f"{int(segments[-1].stem) + 5:08d}.log")
        touched: set[str] = set()
    else:                   # a sealed segment overwritten by garbage
        victim = segments[len(segments) // 2]
        touched = {r.session_id for seg, _, _, r in frames(srv.data_dir) if seg == victim}
    victim.write_bytes(random.Random(5).randbytes(3000))
    srv2, text = checked_restart(server_factory, srv, before, touched=touched)
    verb = "truncated" if where == "after" else "skipped"
    assert re.search(rf"storage recovery dropped \d+ records \(3000 bytes\): .*{victim.name}: .* {verb}", text), text
    stub = srv2.stub()
    for sid in set(before) - touched:   # untouched sessions go on as before
        if before[sid].state == OPEN:
            ack = send(stub, envelope(MODE, "Vote", sid, "alice", decision_pb2.VotePayload(proposal_id="p1",
                                                                                         vote="APPROVE")))
            assert ack.ok, ack


def test_a_damaged_region_in_the_middle_is_skipped(server_factory, stopped):
    srv, before = stopped
    everything = frames(srv.data_dir)
    # damage one whole frame in the middle of a sealed segment (a message of an open session)
    seg, off, length, rec = next((f for f in everything[len(everything) // 3:]
                                  if before.get(f[3].session_id) and before[f[3].session_id].state == OPEN
                                  and f[3].message_type == "Proposal"))
    data = bytearray(seg.read_bytes())
    data[off + 5 : off + length - 5] = b"\0" * (length - 10)
    seg.write_bytes(bytes(data))
    srv2, text = checked_restart(server_factory, srv, before, touched={rec.session_id})
    assert re.search(rf"{seg.name}: damaged region at offset {off}\.\.{off + length} \({length} bytes, ~1 record\(s\)\) "
                     r"skipped", text), text


def _terminal_checkpoint(data_dir: str, state=RESOLVED):
    return next(f for f in frames(data_dir) if is_terminal_checkpoint(f[3])
                and read_snapshot(f[3].payload).status == state)


def test_a_checkpoint_with_a_bad_checksum_is_replaced_by_replaying_its_session(server_factory, stopped):
    srv, before = stopped
    seg, off, length, rec = _terminal_checkpoint(srv.data_dir)
    data = bytearray(seg.read_bytes())
    data[off + length - 2] ^= 0x55
    seg.write_bytes(bytes(data))
    srv2, text = checked_restart(server_factory, srv, before)     # nothing lost: the messages are there
    assert re.search(rf"storage recovery dropped 1 records .*damaged region .*apparently of session "
                     rf"{rec.session_id}\) skipped", text), text
    assert "1 terminal sessions get a checkpoint now" in text


def test_an_unusable_checkpoint_falls_back_to_the_messages(server_factory, stopped):
    srv, before = stopped
    seg, off, length, rec = _terminal_checkpoint(srv.data_dir, CANCELLED)
    rec.payload = b"\x0a\x03bad"              # decodes, but names another session
    data = seg.read_bytes()
    seg.write_bytes(data[:off] + file_log.frame(rec.SerializeToString()) + data[off + length:])
    srv2, text = checked_restart(server_factory, srv, before)
    assert re.search(rf"session {rec.session_id}: its checkpoint cannot be restored .*replaying its messages",
                     text), text


def test_after_compaction_a_damaged_checkpoint_loses_its_session_only(server_factory, stopped):
    srv, before = stopped
    srv2 = server_factory(env=SMALL_SEGMENTS, data_dir=srv.data_dir)   # reopen: compaction runs
    deadline = time.monotonic() + 20
    while "storage: compacted" not in srv2.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    assert srv2.stop() == 0
    assert "storage: compacted" in srv2.log()
    seg, off, length, rec = _terminal_checkpoint(srv.data_dir)
    assert not any(r.session_id == rec.session_id and r.kind != ENTRY_KIND_CHECKPOINT
                   for _, _, _, r in frames(srv.data_dir)), "its messages should be compacted away"
    data = bytearray(seg.read_bytes())
    data[off + 30] ^= 0xFF
    seg.write_bytes(bytes(data))
    srv3, text = checked_restart(server_factory, srv2, before, touched={rec.session_id})
    assert re.search(r"storage recovery dropped 1 records .*damaged region", text), text
    with pytest.raises(grpc.RpcError) as info:
        get(srv3.stub(), rec.session_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_interrupted_compaction_leaves_a_replayable_directory(server_factory, stopped):
    srv, before = stopped
    seg = sorted(Path(srv.data_dir, "wal").glob("*.log"))[0]
    # what a kill between writing the replacement and renaming it leaves behind
    Path(str(seg) + ".compact").write_bytes(seg.read_bytes()[:1000])
    (Path(srv.data_dir, "wal") / "notes.txt").write_text("not a segment")
    srv2, text = checked_restart(server_factory, srv, before)
    assert f"removed {seg.name}.compact, left by an interrupted compaction" in text
    assert not Path(str(seg) + ".compact").exists()
    assert "dropped" not in text


def test_a_subscriber_gets_a_terminal_sessions_history_until_a_restart(server_factory):
    """README "What a subscriber gets": the whole history while the server runs, nothing after a restart
    (the session's history is then its checkpoint; as the reference runtime); open sessions keep theirs."""
    from tests.support.streamkit import Duplex

    srv = server_factory(env=SMALL_SEGMENTS)
    stub = srv.stub()
    before = populate(stub, resolved=1, open_=1, cancelled=0)
    resolved, open_ = list(before)
    d = Duplex(stub, "alice").subscribe(resolved)
    assert [r.envelope.message_type for r in d.recv_n(5)] == ["SessionStart", "Proposal", "Evaluation", "Vote",
                                                              "Commitment"]
    d.close()
    assert srv.stop() == 0          # a clean stop: the checkpoint is surely written
    srv2, _ = checked_restart(server_factory, srv, before)
    stub = srv2.stub()
    d = Duplex(stub, "alice").subscribe(resolved)
    assert d.nothing_within(1.0)
    d.close()
    d = Duplex(stub, "alice").subscribe(open_)
    assert [r.envelope.message_type for r in d.recv_n(2)] == ["SessionStart", "Proposal"]
    d.close()
