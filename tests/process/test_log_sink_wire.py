"""A log reader that stops reading must not stop the server (issue 14: nothing blocks the event loop).

The server's stderr is a one-page pipe that nobody reads while clients work: before, the first write
to the full pipe blocked the event loop, and every RPC after it ran into its deadline."""
from __future__ import annotations

import fcntl
import os
import threading

from macp.v1 import core_pb2

from tests.support.envelopes import envelope, new_session_id, start_payload
from tests.support.server import ServerProcess
from tests.support.streamkit import DECISION, proposal

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SESSIONS = 200   # a "session created" line each, ~40 KB of log: ten times what the pipe holds


def _send(stub, env):
    """Send as the envelope's sender; an answer must come within 5 s (a blocked loop gives none)."""
    request = core_pb2.SendRequest(envelope=env)
    return stub.Send(request, metadata=[("authorization", f"Bearer {env.sender}")], timeout=5).ack


def _start(stub) -> str:
    sid = new_session_id()
    ack = _send(stub, envelope(DECISION, "SessionStart", sid, "coord", start_payload(("alice", "bob"))))
    assert ack.ok, ack
    return sid


class _PipedServer(ServerProcess):
    """A server whose stdout and stderr go to a pipe the test reads only when it chooses to."""

    def output(self):
        self.read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, 4096)
        return write_fd

    def drain(self) -> bytes:
        """Everything the server writes from now until it exits (read on a thread)."""
        got = bytearray()

        def reader():
            while chunk := os.read(self.read_fd, 65536):
                got.extend(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        self.stop()
        t.join(10)
        return bytes(got)


def test_a_log_reader_that_stops_reading_does_not_stop_the_server(tmp_path):
    srv = _PipedServer(str(tmp_path / "data")).start()
    os.close(srv._log)   # the server holds its end; ours would keep the pipe open after it exits
    try:
        stub = srv.stub()
        sids = [_start(stub) for _ in range(SESSIONS)]
        ack = _send(stub, proposal(sids[-1], "p1"))
        assert ack.ok, ack
        refused = _send(stub, envelope(DECISION, "Proposal", sids[-1], "mallory", b""))
        assert not refused.ok   # the refusal path logs too
    finally:
        text = srv.drain().decode("utf-8", "replace")
    created = [line for line in text.splitlines() if "session created" in line]
    assert [line.split("session_id=")[1].split()[0] for line in created] == sids   # every line, in order
    assert "lines were dropped" not in text
    assert "stopped" in text   # the lines of the shutdown came after the backlog
