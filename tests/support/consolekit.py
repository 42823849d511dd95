"""Helpers of the console tests: a server with the console on, HTTP and server-sent-event clients,
and a Decision session driven over gRPC one step at a time."""
from __future__ import annotations

import http.client
import json
import queue
import socket
import threading
import urllib.error
import urllib.request

from macp.modes.decision.v1 import decision_pb2

from tests.support import commitment, envelope, free_port, new_session_id, send, start_payload

DECISION = "macp.mode.decision.v1"


def console_server(server_factory, env: dict | None = None, args: list[str] | None = None):
    """A server with the console on a free loopback port; `.console` is its base URL."""
    port = free_port()
    srv = server_factory(env={"MACP_CONSOLE_ADDR": f"127.0.0.1:{port}", **(env or {})}, args=args)
    srv.console = f"http://127.0.0.1:{port}"
    srv.console_port = port
    wait_console(srv, port)
    return srv


def wait_console(srv, port: int, timeout: float = 20.0) -> None:
    """Until the console accepts connections (it starts on the daemon's loop right after gRPC serves)."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or srv.proc.poll() is not None:
                raise RuntimeError(f"the console did not come up:\n{srv.log()}")
            time.sleep(0.05)


def get(base: str, path: str, token: str | None = None, raw: bool = False):
    """(status, body as JSON, headers) — or the raw bytes with raw=True."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    req = urllib.request.Request(base + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
            return resp.status, (body if raw else json.loads(body)), resp.headers
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = body
        return exc.code, parsed, exc.headers


class EventStream:
    """GET /api/events read on a thread: `next(kinds, timeout)` returns (event, data)."""

    def __init__(self, port: int, token: str, query: str = ""):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.connect()
        self.sock = self.conn.sock   # kept: close() must wake the reader thread blocked on it
        self.conn.request("GET", "/api/events" + query, headers={"Authorization": f"Bearer {token}"})
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.events: queue.Queue = queue.Queue()
        if self.status == 200:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        event, data = "message", ""
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    data += line[6:]
                elif line == "":
                    if data:
                        self.events.put((event, json.loads(data)))
                    event, data = "message", ""
        except Exception:
            pass
        self.events.put(("closed", None))

    def next(self, kinds=None, timeout: float = 5.0):
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kinds} event within {timeout}s")
            event, data = self.events.get(timeout=left)
            if kinds is None or event in kinds or event == "closed":
                return event, data

    def close(self):
        # Shut the socket down first: the reader thread sits in a read holding the response's buffer
        # lock, and closing the response waits for that lock — while the server's keep-alive comments
        # keep the read from ever timing out. After shutdown the read returns at once.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.conn.close()
        except Exception:
            pass


class DecisionSession:
    """A Decision session: coordinator (initiator) with participants alice and bob, one step per call."""

    def __init__(self, stub, initiator: str = "coordinator", participants=("coordinator", "alice", "bob")):
        self.stub = stub
        self.sid = new_session_id()
        self.initiator = initiator
        self.participants = list(participants)

    def _send(self, sender: str, message_type: str, payload):
        ack = send(self.stub, envelope(DECISION, message_type, self.sid, sender, payload))
        assert ack.ok, (message_type, ack.error.code, ack.error.message)
        return ack

    def start(self):
        payload = start_payload(self.participants, ttl_ms=600_000)
        payload.intent = "ship release 2"
        return self._send(self.initiator, "SessionStart", payload)

    def propose(self):
        return self._send(self.participants[0], "Proposal", decision_pb2.ProposalPayload(
            proposal_id="p1", option="deploy v2", rationale="tests pass"))

    def evaluate(self):
        return self._send("alice", "Evaluation", decision_pb2.EvaluationPayload(
            proposal_id="p1", recommendation="APPROVE", confidence=0.9, reason="looks good"))

    def vote(self, who: str):
        return self._send(who, "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE", reason="yes"))

    def commit(self):
        return self._send(self.initiator, "Commitment", commitment(action="deployment.approved"))
