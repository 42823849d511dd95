"""Kill -9 durability harness, shared by tests/process/test_crash.py (a few iterations in CI) and
benchmarks/crash_soak.py (long runs).

Each iteration: concurrent clients drive Decision sessions against a real server on a data
directory; the server is SIGKILLed at a random moment; then

1. offline, the data directory is read back with the runtime's own store: every acknowledged
   message is present exactly once, in acknowledgement order, and at most one unacknowledged
   record (the one in flight at the kill) follows the acknowledged ones of a session. A session
   whose history begins at a checkpoint (terminal before an earlier restart, its messages maybe
   compacted away) has its acknowledged ids among the checkpoint's seen ids instead;
2. the server restarts on the same directory and every session's state (GetSession) equals the
   state obtained by replaying its durable records through a fresh in-process engine (or the
   state its checkpoint records, which must agree with that replay wherever both exist);
3. re-sending an acknowledged message id is answered `duplicate=true`.

The server may run with small log segments and interval checkpoints (see tests/process/test_crash.py), so
kills also land in checkpoint writes, segment rotation and background compaction.
"""
from __future__ import annotations

import dataclasses
import random
import threading
import time
import uuid

import grpc
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.kernel.engine import Engine
from macp_runtime.vocabulary.errors import MacpError
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.kernel.checkpoints import read_snapshot
from macp_runtime.storage import ENTRY_KIND_CHECKPOINT, ENTRY_KIND_INCOMING, FileLogStore, MemoryStore

MODE = "macp.mode.decision.v1"
PARTICIPANTS = ["coordinator", "alice", "bob"]


def _script(session_id: str):
    """The messages of one Decision session, in order: (sender, type, payload)."""
    start = core_pb2.SessionStartPayload(intent="crash test", participants=PARTICIPANTS, mode_version="1.0.0",
                                         configuration_version="config.default", policy_version="policy.default",
                                         ttl_ms=3_600_000)
    commit = core_pb2.CommitmentPayload(commitment_id="c1", action="deployment.approved", authority_scope="crash",
                                        reason="done", mode_version="1.0.0", policy_version="policy.default",
                                        configuration_version="config.default", outcome_positive=True)
    steps = [("coordinator", "SessionStart", start),
             ("coordinator", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="deploy")),
             ("alice", "Evaluation", decision_pb2.EvaluationPayload(proposal_id="p1", recommendation="APPROVE",
                                                                     confidence=0.9)),
             ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
             ("bob", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE")),
             ("coordinator", "Commitment", commit)]
    return [(s, t, p.SerializeToString()) for s, t, p in steps]


@dataclasses.dataclass
class Acked:
    message_id: str
    message_type: str
    sender: str


@dataclasses.dataclass
class Ledger:
    """What the clients were told: acknowledged messages per session, in order."""

    acked: dict[str, list[Acked]] = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, session_id: str, a: Acked) -> None:
        with self.lock:
            self.acked.setdefault(session_id, []).append(a)

    @property
    def messages(self) -> int:
        return sum(len(v) for v in self.acked.values())


def run_clients(target: str, ledger: Ledger, stop: threading.Event, clients: int = 4) -> list[threading.Thread]:
    def client():
        channel = grpc.insecure_channel(target)
        stub = core_pb2_grpc_stub(channel)
        try:
            while not stop.is_set():
                sid = str(uuid.uuid4())
                for sender, mtype, payload in _script(sid):
                    if stop.is_set():
                        return
                    mid = str(uuid.uuid4())
                    env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=mtype, message_id=mid,
                                                session_id=sid, sender=sender,
                                                timestamp_unix_ms=int(time.time() * 1000), payload=payload)
                    try:
                        ack = stub.Send(core_pb2.SendRequest(envelope=env), timeout=10,
                                        metadata=[("authorization", f"Bearer {sender}")]).ack
                    except grpc.RpcError:
                        return  # the server is gone: whatever was in flight is unacknowledged
                    if not ack.ok or ack.duplicate:
                        raise AssertionError(f"unexpected ack for {mtype} in {sid}: {ack}")
                    ledger.add(sid, Acked(mid, mtype, sender))
        finally:
            channel.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def core_pb2_grpc_stub(channel):
    from macp.v1 import core_pb2_grpc

    return core_pb2_grpc.MACPRuntimeServiceStub(channel)


def verify_offline(data_dir: str, ledger: Ledger) -> dict[str, list]:
    """Check the durable log against the ledger. Returns the durable records per session."""
    store = FileLogStore(data_dir)
    report = store.open()
    try:
        durable = {sid: recs for sid, recs in store.replay()}
    finally:
        store.close()
    assert report.dropped_records == 0 or report.problems, report
    for sid, acked in ledger.acked.items():
        records = durable.get(sid, [])
        covered, records = _split_at_checkpoint(records)
        ids = [r.message_id for r in records if r.kind == ENTRY_KIND_INCOMING]
        acked_ids = [a.message_id for a in acked]
        in_checkpoint = sum(1 for a in acked_ids if a in covered)
        assert all(a in covered for a in acked_ids[:in_checkpoint]), f"{sid}: checkpoint lacks an earlier ack"
        acked_ids = acked_ids[in_checkpoint:]
        assert len(ids) == len(set(ids)), f"{sid}: a message appears twice in the log"
        assert not covered & set(ids), f"{sid}: a message both in the checkpoint and after it"
        assert ids[:len(acked_ids)] == acked_ids, f"{sid}: acknowledged messages missing or out of order"
        assert len(covered) - in_checkpoint + len(ids) - len(acked_ids) <= 1, \
            f"{sid}: more than one unacknowledged record"
    return durable


def _split_at_checkpoint(records: list) -> tuple[set, list]:
    """(seen ids of the history's first entry when it is a checkpoint, the records after it).
    A history that begins at its SessionStart gives (set(), all records)."""
    if records and records[0].kind == ENTRY_KIND_CHECKPOINT:
        return set(read_snapshot(records[0].payload).seen_message_ids), records[1:]
    return set(), records


def expected_states(durable: dict[str, list]) -> dict[str, int]:
    """Session state after replaying each session's durable records through a fresh engine."""
    store = MemoryStore()
    store.open()
    engine = Engine(ModeRegistry.from_spec_dirs(), PolicyRegistry(), store)
    out = {}
    for sid, records in durable.items():
        if records and records[0].kind == ENTRY_KIND_CHECKPOINT:   # nothing before it is left to replay
            snap = read_snapshot(records[0].payload)
            assert all(r.kind == ENTRY_KIND_CHECKPOINT for r in records[1:]), f"{sid}: records after its end"
            out[sid] = snap.status
            continue
        seen_before: set = set()
        terminal = None
        for r in records:
            if r.kind == ENTRY_KIND_CHECKPOINT:
                # A checkpoint holds exactly the ids accepted before it; a terminal one ends the session.
                snap = read_snapshot(r.payload)
                assert set(snap.seen_message_ids) == seen_before, f"{sid}: checkpoint's seen ids differ"
                terminal = snap if r.message_type == "TerminalCheckpoint" else None
                continue
            if r.kind == ENTRY_KIND_INCOMING:
                seen_before.add(r.message_id)
            env = envelope_pb2.Envelope(macp_version=r.macp_version, mode=r.mode, message_type=r.message_type,
                                        message_id=r.message_id, session_id=sid, sender=r.sender,
                                        timestamp_unix_ms=r.timestamp_unix_ms, payload=r.payload)
            try:
                if r.message_type == "SessionStart":
                    engine.start_session(env, Identity(r.sender))
                else:
                    engine.process_message(env, Identity(r.sender))
            except MacpError as exc:
                raise AssertionError(f"{sid}: durable record {r.message_type} does not replay: {exc}") from None
        out[sid] = engine.lookup(sid).status
        if terminal is not None:
            assert terminal.status == out[sid], f"{sid}: terminal checkpoint says {terminal.status}, replay {out[sid]}"
    return out


def verify_online(stub, durable: dict[str, list], ledger: Ledger, rng: random.Random, probes: int = 20) -> None:
    expected = expected_states(durable)
    for sid, state in expected.items():
        meta = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid),
                               metadata=[("authorization", "Bearer coordinator")]).metadata
        assert meta.state == state, f"{sid}: state {meta.state} after restart, replay says {state}"
    sessions = [sid for sid, acked in ledger.acked.items() if acked]
    for sid in rng.sample(sessions, min(probes, len(sessions))):
        a = rng.choice(ledger.acked[sid])
        # Dedup answers before the mode looks at the payload, except for SessionStart, whose
        # payload is validated first (runtime.md §13.1): resend that one as it was.
        payload = _script(sid)[0][2] if a.message_type == "SessionStart" else b""
        env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=a.message_type,
                                    message_id=a.message_id, session_id=sid, sender=a.sender,
                                    timestamp_unix_ms=int(time.time() * 1000), payload=payload)
        ack = stub.Send(core_pb2.SendRequest(envelope=env), metadata=[("authorization", f"Bearer {a.sender}")]).ack
        assert ack.ok and ack.duplicate, f"{sid}: acknowledged id {a.message_id} not recognised: {ack}"


def crash_iterations(make_server, iterations: int, seed: int = 1, min_run: float = 0.2, max_run: float = 1.2,
                     clients: int = 4, log=print) -> dict:
    """Run the kill/restart/verify cycle; returns figures. `make_server()` starts a ServerProcess."""
    rng = random.Random(seed)
    ledger = Ledger()
    server = make_server()
    stats = {"iterations": 0, "acked_messages": 0, "sessions": 0, "unacked_tail_records": 0}
    for i in range(iterations):
        stop = threading.Event()
        threads = run_clients(server.target, ledger, stop, clients)
        time.sleep(rng.uniform(min_run, max_run))
        server.kill()
        stop.set()
        for t in threads:
            t.join(15)
        durable = verify_offline(server.data_dir, ledger)
        stats["unacked_tail_records"] += sum(
            max(0, len([r for r in durable.get(s, []) if r.kind == ENTRY_KIND_INCOMING]) - len(a))
            for s, a in ledger.acked.items())
        server.start()
        verify_online(server.stub(), durable, ledger, rng)
        stats.update(iterations=i + 1, acked_messages=ledger.messages, sessions=len(ledger.acked))
        log(f"iteration {i + 1}: {ledger.messages} acknowledged messages in {len(ledger.acked)} sessions verified")
    server.kill()
    return stats
