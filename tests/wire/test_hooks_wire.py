"""A hook can never corrupt a session (issue 12 point 11, issue 13 point 2), over the wire.

Before: a registered spec whose hook raised wrote the message durably, answered gRPC UNKNOWN with the
exception text, and the session was dropped at the next restart (MACP_STRICT_RECOVERY=1 refused to
start). Now a hook name resolves only to a public function of its hook module whose signature fits
(checked when the spec compiles), every hook runs before the commit point on a copy of the state, and
a failure is an `ok=false` Ack (INVALID_ENVELOPE, InvalidModeState) with nothing written.
"""
from __future__ import annotations

import json

import pytest
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
HOOKS_PY = '''"""Hooks that raise on demand: a JSON payload {"boom": true} makes them fail."""


def notes(session):
    return {"notes": []}


def record(ctx):
    ctx.state["notes"].append(ctx.sender)
    if ctx.payload.get("boom"):
        raise RuntimeError("effect failed after changing the state")


def checked(ctx):
    if ctx.payload.get("boom"):
        raise KeyError("guard failed")
    return True


def crowded(ctx):
    if ctx.payload.get("boom"):
        raise ZeroDivisionError("condition failed")
    return len(ctx.state["notes"]) > 99


def has_notes(ctx):
    return bool(ctx.state["notes"])


def picky_start(session):
    if "boom" in session.participants:
        raise ValueError("start requirement failed")
    return True


def not_bytes(ctx):
    return 42
'''

FRAGILE = """\
spec_version: 1
mode: ext.fragile.v1
version: 1.0.0
hooks: fragile_hooks.py
descriptor:
  message_types: [SessionStart, Note, Poke, Shift, Commitment]
payloads: {Note: json, Poke: json, Shift: json, Commitment: macp.v1.CommitmentPayload}
state: {initial: notes}
session_start: {requires: [picky_start]}
phases: {initial: Open, names: [Open, Done, Other]}
transitions:
  - {message: Note, from: [Open], to: Open, senders: [participant], effects: [record]}
  - {message: Poke, from: [Open], to: Open, senders: [participant], guards: [{check: checked, why: poke}]}
  - message: Shift
    from: [Open]
    to: [{phase: Other, when: crowded}, {phase: Open}]
    senders: [participant]
commitment: {message: Commitment, from: [Open], to: Done, senders: [initiator], ready: has_notes}
"""
BAD_RESOLUTION = FRAGILE.replace("ext.fragile.v1", "ext.badres.v1").replace("ready: has_notes",
                                                                          "resolution: not_bytes")


@pytest.fixture
def fragile(server_factory, tmp_path):
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "fragile_hooks.py").write_text(HOOKS_PY)
    (specs / "fragile.yaml").write_text(FRAGILE)
    (specs / "badres.yaml").write_text(BAD_RESOLUTION)
    return server_factory(env={"MACP_STRICT_RECOVERY": "1", "MACP_SPECS_DIR": str(specs)})


def register(stub, name, text):
    d = core_pb2.ModeDescriptor(mode=name, mode_version="1.0.0",
                                message_types=["SessionStart", "Note", "Poke", "Shift", "Commitment"],
                                schema_uris={"macp-runtime/spec-yaml": text.replace("MODE", name)})
    return stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=bearer("admin"))


def history(stub, sid, who="alice") -> list[str]:
    from tests.support.streamkit import Duplex
    d = Duplex(stub, who).subscribe(sid)
    out = []
    while not d.nothing_within(0.5):
        out.append(d.recv().envelope.message_type)
    d.close()
    d.wait_end()
    return out


def json_env(mode, mtype, sid, value):
    return envelope(mode, mtype, sid, "", json.dumps(value).encode())


def test_a_raising_hook_is_refused_before_anything_is_durable(fragile):
    srv = fragile
    stub = srv.stub()
    mode = "ext.fragile.v1"
    sid = new_session_id()
    assert send(stub, envelope(mode, "SessionStart", sid, "alice", start_payload(["alice", "bob"]))).ok
    for mtype in ("Note", "Poke", "Shift"):   # an effect (after changing the state), a guard, a phase condition
        ack = send(stub, json_env(mode, mtype, sid, {"boom": True}), as_sender="bob")
        assert not ack.ok and ack.error.code == "INVALID_ENVELOPE" and ack.error.message.startswith("InvalidModeState"), ack
    assert history(stub, sid) == ["SessionStart"]                                    # nothing of them written
    # the refused Note's effect changed only its copy: no note recorded, so a Commitment is not ready yet
    ack = send(stub, envelope(mode, "Commitment", sid, "alice", commitment(mode_version="1.0.0")))
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE", ack
    assert send(stub, json_env(mode, "Note", sid, {"boom": False}), as_sender="bob").ok
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("alice")).metadata
    assert md.state == OPEN
    srv.restart()                                                                    # strict recovery starts
    stub = srv.stub()
    assert history(stub, sid) == ["SessionStart", "Note"]
    ack = send(stub, envelope(mode, "Commitment", sid, "alice", commitment(mode_version="1.0.0")))
    assert ack.ok and ack.session_state == RESOLVED, ack


def test_a_raising_start_requirement_or_resolution_is_refused(fragile):
    stub = fragile.stub()
    sid = new_session_id()
    ack = send(stub, envelope("ext.fragile.v1", "SessionStart", sid, "alice", start_payload(["alice", "boom"])))
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE", ack
    assert sid not in {s.session_id for s in
                       stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=bearer("alice")).sessions}
    sid = new_session_id()
    assert send(stub, envelope("ext.badres.v1", "SessionStart", sid, "alice", start_payload(["alice", "bob"]))).ok
    ack = send(stub, envelope("ext.badres.v1", "Commitment", sid, "alice", commitment(mode_version="1.0.0")))
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE", ack
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("alice")).metadata
    assert md.state == OPEN


REGISTERED = """\
spec_version: 1
mode: MODE
version: 1.0.0
descriptor:
  message_types: [SessionStart, Note, Poke, Shift, Commitment]
payloads: {Note: json, Poke: json, Shift: json, Commitment: macp.v1.CommitmentPayload}
state: {initial: generic.message_log}
phases: {initial: Open, names: [Open, Done]}
transitions:
  - {message: Note, from: [Open], to: Open, senders: [participant], effects: [generic.record]}
commitment: {message: Commitment, from: [Open], to: Done, senders: [initiator]}
"""


@pytest.mark.parametrize("replace,needle", [
    ("effects: [generic.record]", "effects: [generic.is_blank]"),           # imported into generic, not defined
    ("effects: [generic.record]", "effects: [generic._private]"),
    ("effects: [generic.record]", "effects: [generic.HookContext]"),        # a class, not a function
    ("effects: [generic.record]", "effects: [generic.count_at_least]"),     # required parameters missing
    ("effects: [generic.record]", "effects: [{hook: generic.count_at_least, message: Note}]"),
    ("effects: [generic.record]", "effects: [generic.min_participants]"),   # a start hook taking `count`
])
def test_hook_names_resolve_only_to_fitting_public_functions(runtime_server, replace, needle):
    """Before: `effects: [generic.is_blank]` registered and then failed at run time with gRPC UNKNOWN."""
    text = REGISTERED.replace(replace, needle)
    assert needle in text
    resp = register(runtime_server.stub(), f"ext.hookcheck{abs(hash(needle)) % 10**6}.v1", text)
    assert not resp.ok and "<spec-yaml>" in resp.error, resp.error


def test_a_role_hook_with_the_wrong_arity_is_refused(runtime_server):
    text = REGISTERED.replace("phases:", "roles: {scribe: generic.record}\nphases:")
    resp = register(runtime_server.stub(), "ext.rolecheck.v1", text)
    assert not resp.ok and "roles.scribe" in resp.error, resp.error
