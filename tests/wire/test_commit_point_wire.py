"""The transport's commit point with the file store (deferred commit on the event loop), through the
wire of an in-process server: what GetSession shows is durable, and what would block the loop (a
session lock a kernel thread holds across an fdatasync, the first archiving of a mode's spec text)
is waited for off it."""
from __future__ import annotations

import asyncio
import threading
import time
import uuid

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

from tests.kernel.test_checkpoints import engine_on, open_store
from macp_runtime.kernel.auth import DevAuthenticator
from macp_runtime.registries.spec_archive import SpecArchive
from macp_runtime.storage.documents import open_documents
from macp_runtime.transport.server import GrpcServer
from macp_runtime.vocabulary.session import now_ms

MODE = "macp.mode.decision.v1"


class Served:
    """An Engine on a FileLogStore behind the grpc.aio transport, on a loop in a thread of its own."""

    def __init__(self, tmp_path):
        self.store = open_store(tmp_path / "data")
        self.engine = engine_on(self.store, clock=now_ms,
                                spec_archive=SpecArchive(open_documents(False, str(tmp_path / "data"))))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = GrpcServer(self.engine, DevAuthenticator(), bind_addr="127.0.0.1:0", credentials=None,
                                 reflect=False, blocking=True, workers=4, max_payload_bytes=1 << 20,
                                 session_start_limit=10**9, message_limit=10**9, max_streams=100)
        port = self.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = core_pb2_grpc.MACPRuntimeServiceStub(self.channel)

    def run(self, coro, timeout=10):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def loop_thread(self) -> int:
        return self.thread.ident

    def send(self, sid, sender, mtype, payload, timeout=10):
        env = envelope_pb2.Envelope(macp_version="1.0", mode=MODE, message_type=mtype, message_id=str(uuid.uuid4()),
                                    session_id=sid, sender=sender, timestamp_unix_ms=now_ms(),
                                    payload=payload.SerializeToString())
        return self.stub.Send(core_pb2.SendRequest(envelope=env), metadata=(("authorization", f"Bearer {sender}"),),
                              timeout=timeout).ack

    def start_session(self):
        sid = str(uuid.uuid4())
        ack = self.send(sid, "coord", "SessionStart", core_pb2.SessionStartPayload(
            participants=["coord", "alice", "bob"], mode_version="1.0.0", configuration_version="c",
            policy_version="policy.default", ttl_ms=600_000))
        assert ack.ok, ack.error
        return sid

    def get_session(self, sid, timeout=10):
        return self.stub.GetSession(core_pb2.GetSessionRequest(session_id=sid),
                                    metadata=(("authorization", "Bearer coord"),), timeout=timeout).metadata

    def close(self):
        self.channel.close()
        self.run(self.server.stop(0, self.engine.close))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.store.close()


@pytest.fixture
def served(tmp_path):
    s = Served(tmp_path)
    yield s
    s.close()


def _proposal():
    return decision_pb2.ProposalPayload(proposal_id="p1", option="o", rationale="r")


def _activity(meta, who):
    return next((a.message_count for a in meta.participant_activity if a.participant_id == who), 0)


def test_get_session_shows_a_message_only_once_it_is_durable(served):
    sid = served.start_session()
    before = _activity(served.get_session(sid), "coord")
    gate = threading.Event()
    real_write = served.store._write_batch

    def held(data):   # the fdatasync of the next batch does not finish until the test says so
        gate.wait(10)
        return real_write(data)

    served.store._write_batch = held
    try:
        acked = []
        sender = threading.Thread(target=lambda: acked.append(served.send(sid, "coord", "Proposal", _proposal())))
        sender.start()
        deadline = time.monotonic() + 5
        while served.engine.pending(sid) is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.engine.pending(sid) is not None   # judged and applied in memory, not yet durable
        shown = served.stub.GetSession.future(core_pb2.GetSessionRequest(session_id=sid),
                                              metadata=(("authorization", "Bearer coord"),), timeout=10)
        time.sleep(0.3)
        assert not shown.done()   # GetSession waits for the record rather than show it early
        assert not acked
    finally:
        gate.set()
        served.store._write_batch = real_write
    sender.join(10)
    assert acked and acked[0].ok
    assert _activity(shown.result().metadata, "coord") == before + 1   # the Proposal, now durable


def test_a_session_lock_held_by_a_kernel_thread_does_not_stop_the_loop(served):
    busy, other = served.start_session(), served.start_session()
    before = _activity(served.get_session(other), "coord")
    lock = served.engine.peek(busy).lock
    lock.acquire()   # as the checkpointer or the sweeper does across an fdatasync
    try:
        acked = []
        waiting = threading.Thread(target=lambda: acked.append(served.send(busy, "coord", "Proposal", _proposal())))
        waiting.start()
        time.sleep(0.2)
        assert not acked   # its Send waits for the lock ...
        started = time.monotonic()
        ack = served.send(other, "coord", "Proposal", _proposal(), timeout=5)   # ... the loop serves the rest
        assert ack.ok and time.monotonic() - started < 2
        assert _activity(served.get_session(other), "coord") == before + 1
    finally:
        lock.release()
    waiting.join(10)
    assert acked and acked[0].ok


def test_a_mode_spec_is_archived_off_the_loop(served):
    archive = served.engine.spec_archive
    threads = []
    real_save = archive.documents.save

    def save(name, doc):
        threads.append(threading.get_ident())
        return real_save(name, doc)

    archive.documents.save = save
    served.start_session()
    served.start_session()
    assert len(threads) == 1 and threads[0] != served.loop_thread()   # once, on a kernel thread
    assert archive.archived(served.engine.modes.get(MODE))
