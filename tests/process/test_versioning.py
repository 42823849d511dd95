"""A running session stays bound to the spec it started under, across a restart with a changed spec."""
from __future__ import annotations

import json
import os
import shutil

from macp.v1 import core_pb2

from tests.support import ROOT, commitment, envelope, new_session_id, send, start_payload

MODE = "ext.poll.v1"


def answer(choice):
    return json.dumps({"choice": choice}).encode()


def test_changed_spec_applies_to_new_sessions_only(server_factory, tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    shutil.copy(os.path.join(ROOT, "examples", "specs", "poll.yaml"), specs / "poll.yaml")
    data_dir = str(tmp_path / "data")
    srv = server_factory(env={"MACP_SPECS_DIR": str(specs)}, data_dir=data_dir)
    stub = srv.stub()
    old = new_session_id()
    assert send(stub, envelope(MODE, "SessionStart", old, "host", start_payload(["ana", "ben"]))).ok
    assert send(stub, envelope(MODE, "Question", old, "host", json.dumps({"text": "ship?"}).encode())).ok
    assert send(stub, envelope(MODE, "Answer", old, "ana", answer("yes"))).ok
    srv.stop()

    # The operator tightens the mode: "abstain" is no longer a valid answer.
    text = (specs / "poll.yaml").read_text()
    (specs / "poll.yaml").write_text(text.replace('values: ["yes", "no", "abstain"]', 'values: ["yes", "no"]'))
    srv.start()
    stub = srv.stub()
    # The old session keeps its rules: abstain is still accepted there, and it can finish.
    ack = send(stub, envelope(MODE, "Answer", old, "ben", answer("abstain")))
    assert ack.ok, ack
    assert send(stub, envelope(MODE, "Commitment", old, "host", commitment(action="poll.closed"))).ok
    # A new session gets the new rules.
    new = new_session_id()
    assert send(stub, envelope(MODE, "SessionStart", new, "host", start_payload(["ana", "ben"]))).ok
    assert send(stub, envelope(MODE, "Question", new, "host", json.dumps({"text": "again?"}).encode())).ok
    ack = send(stub, envelope(MODE, "Answer", new, "ben", answer("abstain")))
    assert (ack.ok, ack.error.code) == (False, "INVALID_ENVELOPE")
    # And a second restart still replays both correctly (the old one via the archived spec).
    srv.kill()
    srv.start()
    meta = srv.stub().GetSession(core_pb2.GetSessionRequest(session_id=old),
                                 metadata=[("authorization", "Bearer host")]).metadata
    assert meta.state == 2
    assert "earlier spec" in srv.log()
