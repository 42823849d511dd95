"""The operator CLI against a live server: output checked, not just exit status."""
from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time

from macp.modes.decision.v1 import decision_pb2

from tests.support import ROOT, commitment, envelope, new_session_id, send, start_payload

MODE = "macp.mode.decision.v1"


def cli(srv, *args, token="coord", timeout=60):
    proc = subprocess.run([sys.executable, "-m", "macp_runtime", *args, "--target", srv.target, "--token", token],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return proc


def decision_session(stub, resolve=True) -> str:
    sid = new_session_id()
    steps = [("coord", "SessionStart", start_payload(["coord", "alice", "bob"])),
             ("coord", "Proposal", decision_pb2.ProposalPayload(proposal_id="p1", option="ship it")),
             ("alice", "Vote", decision_pb2.VotePayload(proposal_id="p1", vote="APPROVE"))]
    if resolve:
        steps.append(("coord", "Commitment", commitment(action="deployment.approved")))
    for who, mtype, payload in steps:
        assert send(stub, envelope(MODE, mtype, sid, who, payload)).ok
    return sid


class Lines:
    """A streaming CLI command whose stdout lines arrive on a queue."""

    def __init__(self, srv, *args, token="coord"):
        self.proc = subprocess.Popen([sys.executable, "-m", "macp_runtime", *args, "--target", srv.target,
                                      "--token", token], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))

    def next(self, timeout=20):
        return self.q.get(timeout=timeout)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def test_sessions_list_table_and_json(runtime_server):
    sid = decision_session(runtime_server.stub())
    out = cli(runtime_server, "sessions", "list")
    assert out.returncode == 0, out.stderr
    row = next(l for l in out.stdout.splitlines() if l.startswith(sid))
    assert MODE in row and "RESOLVED" in row and "coord" in row
    assert out.stdout.splitlines()[0].split()[:3] == ["SESSION", "MODE", "STATE"]
    js = cli(runtime_server, "sessions", "list", "--json")
    entry = next(s for s in json.loads(js.stdout) if s["session_id"] == sid)
    assert entry["state"] == "RESOLVED" and entry["participants"] == ["coord", "alice", "bob"]


def test_sessions_show_decodes_history(runtime_server):
    sid = decision_session(runtime_server.stub())
    out = cli(runtime_server, "sessions", "show", sid, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["metadata"]["state"] == "RESOLVED"
    types = [e["message_type"] for e in doc["history"]]
    assert types == ["SessionStart", "Proposal", "Vote", "Commitment"]
    assert doc["history"][1]["payload"] == {"proposal_id": "p1", "option": "ship it"}
    assert doc["history"][0]["payload"]["participants"] == ["coord", "alice", "bob"]
    text = cli(runtime_server, "sessions", "show", sid)
    assert "state        RESOLVED" in text.stdout and "history (4 envelope(s)):" in text.stdout
    assert '"vote": "APPROVE"' in text.stdout


def test_sessions_show_errors_are_reported(runtime_server):
    out = cli(runtime_server, "sessions", "show", new_session_id())
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr
    sid = decision_session(runtime_server.stub())
    out = cli(runtime_server, "sessions", "show", sid, token="outsider")
    assert out.returncode == 1 and "PERMISSION_DENIED" in out.stderr


def test_sessions_watch_streams_lifecycle_events(runtime_server):
    marker = decision_session(runtime_server.stub(), resolve=False)
    watch = Lines(runtime_server, "sessions", "watch", "--json")
    try:
        # the watch has subscribed once its initial listing shows the marker (a fixed sleep raced the
        # CLI's start-up on a loaded machine); only then does the session start
        while json.loads(watch.next())["session"].get("session_id") != marker:
            pass
        sid = decision_session(runtime_server.stub())
        events = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ev = json.loads(watch.next())
            if ev["session"].get("session_id") == sid:
                events.append(ev["event"])
                if ev["event"] == "RESOLVED":
                    break
        assert events[0] == "CREATED" and events[-1] == "RESOLVED"
    finally:
        watch.close()


def test_sessions_tail_follows_live_envelopes(runtime_server):
    stub = runtime_server.stub()
    sid = decision_session(stub, resolve=False)
    tail = Lines(runtime_server, "sessions", "tail", sid, "--after", "1", "--json")
    try:
        first = json.loads(tail.next())
        assert first["message_type"] == "Proposal"        # --after 1 skips the SessionStart
        assert json.loads(tail.next())["message_type"] == "Vote"
        assert send(stub, envelope(MODE, "Vote", sid, "bob",
                                   decision_pb2.VotePayload(proposal_id="p1", vote="reject"))).ok
        live = json.loads(tail.next())
        assert (live["message_type"], live["sender"], live["payload"]["vote"]) == ("Vote", "bob", "reject")
    finally:
        tail.close()


def test_modes_and_policies_list(runtime_server):
    out = cli(runtime_server, "modes", "list")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[1].startswith("macp.mode.decision.v1") and "standard" in lines[1]
    assert any(l.startswith("ext.multi_round.v1") and "extension" in l for l in lines)
    doc = json.loads(cli(runtime_server, "modes", "list", "--json").stdout)
    assert [m["mode"] for m in doc["standard"]][:5] == [
        "macp.mode.decision.v1", "macp.mode.proposal.v1", "macp.mode.task.v1", "macp.mode.handoff.v1",
        "macp.mode.quorum.v1"]
    pol = cli(runtime_server, "policies", "list")
    assert pol.returncode == 0 and "policy.default" in pol.stdout
    pjs = json.loads(cli(runtime_server, "policies", "list", "--json").stdout)
    default = next(p for p in pjs if p["policy_id"] == "policy.default")
    assert default["rules"]["commitment"]["authority"] == "initiator_only"


def test_every_command_explains_itself():
    for args in (["sessions", "list"], ["sessions", "show"], ["sessions", "watch"], ["sessions", "tail"],
                 ["modes", "list"], ["policies", "list"], ["serve"], ["docs"], ["check"]):
        out = subprocess.run([sys.executable, "-m", "macp_runtime", *args, "--help"], capture_output=True,
                             text=True, timeout=30, cwd=ROOT)
        assert out.returncode == 0 and "example" in out.stdout, args
