"""Modes written in YAML only (examples/specs/) served with MACP_SPECS_DIR and driven over gRPC."""
from __future__ import annotations

import json
import os

import pytest
from macp.v1 import core_pb2

from tests.support import ROOT, commitment, envelope, new_session_id, send, start_payload

SPECS = os.path.join(ROOT, "examples", "specs")
OPEN, RESOLVED = 1, 2


@pytest.fixture(scope="module")
def user_server(tmp_path_factory):
    from tests.support.inprocess import InProcessServer

    srv = InProcessServer(str(tmp_path_factory.mktemp("user") / "data"), env={"MACP_SPECS_DIR": SPECS}).start()
    yield srv
    srv.kill()


def js(obj) -> bytes:
    return json.dumps(obj).encode()


class Session:
    def __init__(self, stub, mode, initiator, participants):
        self.stub, self.mode, self.sid = stub, mode, new_session_id()
        ack = self.send(initiator, "SessionStart", start_payload(participants))
        assert ack.ok, ack

    def send(self, sender, mtype, payload, **kw):
        return send(self.stub, envelope(self.mode, mtype, self.sid, sender, payload, **kw))


def code(ack):
    return (ack.ok, ack.error.code)


def test_user_modes_are_served(user_server):
    modes = user_server.stub().Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"])).supported_modes
    assert {"ext.review_signoff.v1", "ext.baton.v1", "ext.poll.v1", "macp.mode.decision.v1"} <= set(modes)


def test_review_then_signoff(user_server):
    s = Session(user_server.stub(), "ext.review_signoff.v1", "lead", ["ana", "ben"])
    assert code(s.send("ana", "Comment", js({"text": "nit"}))) == (True, "")
    assert code(s.send("ana", "Comment", js({"text": "  "}))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ana", "Comment", b"not json")) == (False, "INVALID_ENVELOPE")
    assert code(s.send("eve", "Comment", js({"text": "hi"}))) == (False, "FORBIDDEN")
    assert code(s.send("ana", "Shout", js({}))) == (False, "FORBIDDEN")       # unlisted: nobody
    assert code(s.send("ana", "Approve", js({}))) == (True, "")
    assert code(s.send("ana", "Approve", js({}))) == (False, "INVALID_ENVELOPE")  # once each
    assert code(s.send("lead", "SignOff", js({}))) == (False, "INVALID_ENVELOPE")  # still in Review
    assert code(s.send("lead", "Commitment", commitment(action="review.approved"))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ben", "Approve", js({}))) == (True, "")                   # all approved: SignOff
    assert code(s.send("ben", "Comment", js({"text": "late"}))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ana", "SignOff", js({}))) == (False, "FORBIDDEN")          # initiator only
    assert code(s.send("lead", "Commitment", commitment(action="review.approved"))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("lead", "SignOff", js({"note": "ok"}))) == (True, "")
    ack = s.send("lead", "Commitment", commitment(action="review.approved"))
    assert ack.ok and ack.session_state == RESOLVED


def test_baton_role_is_derived_from_state(user_server):
    s = Session(user_server.stub(), "ext.baton.v1", "ana", ["ana", "ben", "cy"])
    assert code(s.send("ben", "Work", js({"note": "x"}))) == (False, "FORBIDDEN")   # ana holds the baton
    assert code(s.send("ana", "Work", js({"note": "step 1"}))) == (True, "")
    assert code(s.send("ana", "Pass", js({"to": "ana"}))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ana", "Pass", js({"to": "zed"}))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ana", "Pass", js({"to": "ben"}))) == (True, "")
    assert code(s.send("ana", "Work", js({}))) == (False, "FORBIDDEN")              # not the holder any more
    assert code(s.send("ben", "Work", js({"note": "step 2"}))) == (True, "")
    assert code(s.send("ana", "Commitment", commitment(action="relay.completed"))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ben", "Pass", js({"to": "cy"}))) == (True, "")
    assert code(s.send("ben", "Commitment", commitment(action="relay.completed"))) == (False, "FORBIDDEN")
    ack = s.send("ana", "Commitment", commitment(action="relay.completed"))
    assert ack.ok and ack.session_state == RESOLVED


def test_baton_start_requirements(user_server):
    stub = user_server.stub()
    env = envelope("ext.baton.v1", "SessionStart", new_session_id(), "ana", start_payload(["ben", "cy"]))
    ack = send(stub, env)
    assert (ack.ok, ack.error.code) == (False, "INVALID_ENVELOPE")   # initiator must participate


def test_poll_answers(user_server):
    s = Session(user_server.stub(), "ext.poll.v1", "host", ["ana", "ben", "cy"])
    assert code(s.send("ana", "Answer", js({"choice": "yes"}))) == (False, "INVALID_ENVELOPE")  # no question yet
    assert code(s.send("ana", "Question", js({"text": "?"}))) == (False, "FORBIDDEN")
    assert code(s.send("host", "Question", js({"text": "ship?"}))) == (True, "")
    assert code(s.send("ana", "Answer", js({"choice": "maybe"}))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ana", "Answer", js({"choice": "yes"}))) == (True, "")
    assert code(s.send("host", "Commitment", commitment(action="poll.closed"))) == (False, "INVALID_ENVELOPE")
    assert code(s.send("ben", "Answer", js({"choice": "no"}))) == (True, "")
    assert code(s.send("ben", "Answer", js({"choice": "yes"}))) == (False, "INVALID_ENVELOPE")
    ack = s.send("host", "Commitment", commitment(action="poll.closed"))
    assert ack.ok and ack.session_state == RESOLVED


def test_example_specs_pass_the_linter():
    from macp_runtime.codegen.lint import lint_paths

    findings, count = lint_paths([SPECS])
    assert count == 4 and findings == []
