"""Lifecycle rules that need a controllable clock or many threads, driven in-process: the 7-day
suspension cap (lazy and at resume), replay of SessionSuspend/SessionResume, what the sweep expires
and evicts, and the exact replay/live boundary of subscribe_with_history under concurrent sends.
Spec: runtime.md §5.5–§5.9, §7.2.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.vocabulary.errors import MacpError, StatusError
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.vocabulary.session import EXPIRED, OPEN, SUSPENDED
from macp_runtime.storage import MemoryStore

MODE = "macp.mode.decision.v1"
DAY = 86_400_000
T0 = 1_700_000_000_000
_MODES = ModeRegistry.from_spec_dirs()


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def env(sid, sender, mtype, payload, ts=T0):
    return envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=mtype, message_id=str(uuid.uuid4()),
                                 session_id=sid, sender=sender, timestamp_unix_ms=ts,
                                 payload=payload.SerializeToString())


def new_engine(store=None, clock=None):
    if store is None:
        store = MemoryStore()
        store.open()
    return Engine(_MODES, PolicyRegistry(), store, clock=clock or Clock())


def start(engine, ttl=DAY, participants=("alice", "bob")):
    sid = str(uuid.uuid4())
    payload = core_pb2.SessionStartPayload(participants=list(participants), mode_version="1.0.0",
                                           configuration_version="c", ttl_ms=ttl)
    engine.start_session(env(sid, "coord", "SessionStart", payload, ts=engine.clock()), Identity("coord"))
    return sid


def proposal(sid, pid):
    return env(sid, "alice", "Proposal", decision_pb2.ProposalPayload(proposal_id=pid, option="o"))


COORD = Identity("coord")


def test_a_suspension_longer_than_seven_days_expires_on_lookup():
    clock = Clock()
    engine = new_engine(clock=clock)
    sid = start(engine)
    engine.suspend_session(sid, COORD, "pause")
    clock.now += 7 * DAY          # exactly the cap: not yet (strictly greater)
    assert engine.lookup(sid).status == SUSPENDED
    clock.now += 1
    assert engine.lookup(sid).status == EXPIRED
    assert engine.store.history(sid)[-1].message_type == "TtlExpired"


def test_banked_time_accumulates_and_the_cap_expires_at_resume():
    clock = Clock()
    engine = new_engine(clock=clock)
    sid = start(engine)
    deadline = engine.lookup(sid).deadline_ms
    engine.suspend_session(sid, COORD, "a")
    clock.now += 4 * DAY
    assert engine.resume_session(sid, COORD, "b").state == OPEN
    session = engine.lookup(sid)
    assert session.deadline_ms == deadline + 4 * DAY and session.accumulated_suspended_ms == 4 * DAY
    resume = core_pb2.SessionResumePayload.FromString(engine.store.history(sid)[-1].payload)
    assert (resume.banked_ms, resume.resumed_by, resume.reason) == (4 * DAY, "coord", "b")
    engine.suspend_session(sid, COORD, "c")
    clock.now += 3 * DAY + 1      # 7 days + 1 ms in total
    with pytest.raises(MacpError) as info:
        engine.resume_session(sid, COORD, "d")
    assert info.value.code == "SESSION_NOT_OPEN"
    assert engine.lookup(sid).status == EXPIRED


def test_resume_past_the_cap_without_a_lookup_records_the_resume_then_expires():
    clock = Clock()
    engine = new_engine(clock=clock)
    sid = start(engine)
    engine.suspend_session(sid, COORD, "a")
    clock.now += 7 * DAY + 5
    session = engine.table.sessions[sid]
    engine.control.lookup = lambda _sid: session   # skip the prelude's lazy expiry, as in a race
    with pytest.raises(MacpError):
        engine.resume_session(sid, COORD, "late")
    assert session.status == EXPIRED
    assert [r.message_type for r in engine.store.history(sid)][-1] == "SessionResume"


def test_replay_restores_suspension_and_banked_time():
    clock = Clock()
    store = MemoryStore()
    store.open()
    engine = new_engine(store, clock)
    suspended, resumed, capped = start(engine), start(engine), start(engine)
    for sid in (suspended, resumed, capped):
        engine.suspend_session(sid, COORD, "x")
    clock.now += 2 * DAY
    engine.resume_session(resumed, COORD, "y")
    before = engine.lookup(resumed).deadline_ms
    clock.now += 6 * DAY
    engine.lookup(capped)                      # expires: 8 days suspended
    again = new_engine(store, clock)
    assert again.recover() == (3, 0)
    s = again.table.sessions[suspended]
    assert (s.status, s.suspended_at_ms) == (SUSPENDED, T0)
    r = again.table.sessions[resumed]
    assert (r.status, r.deadline_ms, r.accumulated_suspended_ms) == (OPEN, before, 2 * DAY)
    assert again.table.sessions[capped].status == EXPIRED


def test_the_sweep_expires_open_sessions_only_and_evicts_old_resolved_and_expired_ones():
    clock = Clock()
    engine = new_engine(clock=clock)
    overdue = start(engine, ttl=1000)
    paused = start(engine, ttl=1000)
    engine.suspend_session(paused, COORD, "p")
    cancelled = start(engine, ttl=1000)
    engine.cancel_session(cancelled, COORD, "c")
    clock.now += 2000
    young = start(engine, ttl=DAY)
    assert engine.sweep(retention_ms=DAY) == (1, 0)
    assert engine.table.sessions[overdue].status == EXPIRED and engine.table.sessions[paused].status == SUSPENDED
    clock.now += DAY + 1
    # `young` expires now but started after the cut-off; `overdue` (started at T0) is evicted.
    assert engine.sweep(retention_ms=DAY + 1000) == (1, 1)
    assert overdue not in engine.table.sessions
    assert {paused, cancelled, young} <= set(engine.table.sessions)
    assert engine.store.history(overdue) == []            # released from the (memory) store
    with pytest.raises(StatusError):
        engine.lookup(overdue)


def test_subscribe_with_history_has_no_gap_and_no_duplicate_under_concurrent_sends():
    engine = new_engine()
    sid = start(engine)
    session = engine.table.sessions[sid]
    total = 1500

    class Sub:
        def __init__(self):
            self.live = []

        def offer(self, index, item):
            self.live.append(index)
            return True

        def discard_before(self, n):
            self.live = [i for i in self.live if i >= n]

    def sender():
        for i in range(total):
            engine.process_message(proposal(sid, f"p{i}"), Identity("alice"))
            if i % 20 == 0:
                time.sleep(0.0002)   # let the subscribing thread in

    t = threading.Thread(target=sender)
    t.start()
    subs = []
    while True:
        sub = Sub()
        snapshot = len(engine.subscribe_with_history(session, sub))
        subs.append((snapshot, sub))
        if not t.is_alive():
            break
        time.sleep(0.003)
    t.join()
    assert len(subs) > 3
    for snapshot, sub in subs:
        assert list(range(snapshot)) + sub.live == list(range(total + 1))
        engine.unsubscribe(sid, sub)
    assert sid not in engine.fanout.channels
