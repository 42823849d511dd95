"""Client-side helpers for streaming RPCs in tests (not a test module).

`Duplex` drives one StreamSession: frames go in through a queue (the request side stays open until
`close()`), responses are pumped by a thread into another queue so a test can wait with a timeout.
`Collector` does the same for a server stream (WatchSessions, WatchSignals, ...). Below them, the
Decision-session helpers the StreamSession tests of both profiles share (`start`, `proposal`, `ids`,
`inline`).
"""
from __future__ import annotations

import queue
import threading
import time

import grpc
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, envelope, new_session_id, send, start_payload

END = object()


class _Pump:
    def __init__(self, call):
        self.call = call
        self.items: queue.Queue = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.reading = threading.Event()   # clear it to stop reading (a deliberately slow client)
        self.reading.set()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            for item in self.call:
                self.items.put(item)
                self.reading.wait()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended.set()
            self.items.put(END)

    def recv(self, timeout: float = 5.0):
        """The next response; END once the call is over; raises TimeoutError when nothing arrives."""
        try:
            return self.items.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no response within the timeout") from None

    def recv_n(self, n: int, timeout: float = 10.0) -> list:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            item = self.recv(max(0.01, deadline - time.monotonic()))
            if item is END:
                raise AssertionError(f"stream ended after {len(out)} of {n} responses: {self.status()}")
            out.append(item)
        return out

    def nothing_within(self, seconds: float) -> bool:
        try:
            item = self.items.get(timeout=seconds)
        except queue.Empty:
            return True
        self.items.queue.appendleft(item)
        return False

    def wait_end(self, timeout: float = 5.0) -> list:
        """Every remaining response until the call ends."""
        deadline = time.monotonic() + timeout
        out = []
        while True:
            item = self.recv(max(0.01, deadline - time.monotonic()))
            if item is END:
                return out
            out.append(item)

    def status(self):
        """(code, details) of the ended call; (OK, '') for a normal end."""
        self.ended.wait(10)
        if self.error is None:
            return grpc.StatusCode.OK, ""
        return self.error.code(), self.error.details()

    def cancel(self):
        self.call.cancel()


class Duplex(_Pump):
    def __init__(self, stub, who: str | None):
        self.requests: queue.Queue = queue.Queue()
        call = stub.StreamSession(iter(self.requests.get, None), metadata=bearer(who) if who else [])
        super().__init__(call)

    def send(self, envelope) -> "Duplex":
        self.requests.put(core_pb2.StreamSessionRequest(envelope=envelope))
        return self

    def subscribe(self, session_id: str, after_sequence: int = 0) -> "Duplex":
        self.requests.put(core_pb2.StreamSessionRequest(subscribe_session_id=session_id,
                                                        after_sequence=after_sequence))
        return self

    def raw(self, request) -> "Duplex":
        self.requests.put(request)
        return self

    def close(self) -> None:
        """Half-close the request side."""
        self.requests.put(None)


class Collector(_Pump):
    pass


# --- a Decision session to stream ------------------------------------------------------------------

DECISION = "macp.mode.decision.v1"


def start(stub, participants=("alice", "bob"), sender="coord", **fields) -> str:
    """A new Decision session started by `sender`; its id."""
    sid = new_session_id()
    ack = send(stub, envelope(DECISION, "SessionStart", sid, sender, start_payload(participants, **fields)))
    assert ack.ok, ack
    return sid


def proposal(sid, pid, sender="alice", **fields):
    return envelope(DECISION, "Proposal", sid, sender, decision_pb2.ProposalPayload(proposal_id=pid, option="o"),
                    **fields)


def ids(responses) -> list[str]:
    """The message ids of stream responses that must all be envelopes."""
    assert all(r.HasField("envelope") for r in responses), responses
    return [r.envelope.message_id for r in responses]


def inline(resp) -> envelope_pb2.MACPError:
    """The inline error frame a response must be."""
    assert resp.HasField("error"), resp
    return resp.error


# --- in-process: what the kernel's fan-out offers a subscriber -------------------------------------

class RecordingSubscriber:
    """A fan-out subscriber (offer / discard_before) that records (log index, message type) of each
    envelope it is offered and never falls behind."""

    def __init__(self):
        self.got = []

    def offer(self, index, item):
        self.got.append((index, item.envelope.message_type))
        return True

    def discard_before(self, index):
        pass
