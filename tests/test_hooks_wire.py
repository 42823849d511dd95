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

from conftest import bearer, commitment, envelope, new_session_id, send, start_payload

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
RAISES = "{hook: generic.field_in, field: x, values: abc}"   # `1 in "abc"` raises TypeError; `"a" in "abc"` not

FRAGILE = f"""\
spec_version: 1
mode: MODE
version: 1.0.0
descriptor:
  message_types: [SessionStart, Note, Poke, Shift, Commitment]
payloads: {{Note: json, Poke: json, Shift: json, Commitment: macp.v1.CommitmentPayload}}
state: {{initial: generic.message_log}}
phases: {{initial: Open, names: [Open, Done, Other]}}
transitions:
  - message: Note
    from: [Open]
    to: Open
    senders: [participant]
    effects: [generic.record, {RAISES}]
  - message: Poke
    from: [Open]
    to: Open
    senders: [participant]
    guards: [{{check: {RAISES}}}]
  - message: Shift
    from: [Open]
    to: [{{phase: Other, when: {{hook: generic.count_at_least, message: Note, count: "2"}}}}, {{phase: Open}}]
    senders: [participant]
    effects: [generic.record]
commitment:
  message: Commitment
  from: [Open]
  to: Done
  senders: [initiator]
  ready: {{hook: generic.count_at_least, message: Note, count: 1}}
"""


def register(stub, name, text):
    d = core_pb2.ModeDescriptor(mode=name, mode_version="1.0.0",
                                message_types=["SessionStart", "Note", "Poke", "Shift", "Commitment"],
                                schema_uris={"macp-runtime/spec-yaml": text.replace("MODE", name)})
    return stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=bearer("admin"))


def history(stub, sid, who="alice") -> list[str]:
    from streamkit import Duplex
    d = Duplex(stub, who).subscribe(sid)
    out = []
    while not d.nothing_within(0.5):
        out.append(d.recv().envelope.message_type)
    d.close()
    d.wait_end()
    return out


def json_env(mode, mtype, sid, value):
    return envelope(mode, mtype, sid, "", json.dumps(value).encode())


def test_a_raising_hook_is_refused_before_anything_is_durable(server_factory):
    srv = server_factory(env={"MACP_STRICT_RECOVERY": "1"})
    stub = srv.stub()
    mode = "ext.fragile.v1"
    resp = register(stub, mode, FRAGILE)
    assert resp.ok, resp.error
    sid = new_session_id()
    assert send(stub, envelope(mode, "SessionStart", sid, "alice", start_payload(["alice", "bob"]))).ok
    assert send(stub, json_env(mode, "Note", sid, {"x": "a"}), as_sender="bob").ok       # the effect does not raise
    for mtype in ("Note", "Poke"):                      # an effect and a guard that raise
        ack = send(stub, json_env(mode, mtype, sid, {"x": 1}), as_sender="bob")
        assert not ack.ok and ack.error.code == "INVALID_ENVELOPE" and ack.error.message == "InvalidModeState", ack
    ack = send(stub, json_env(mode, "Shift", sid, {}), as_sender="bob")            # a phase branch that raises
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE", ack
    assert history(stub, sid) == ["SessionStart", "Note"]                            # nothing of them written
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("alice")).metadata
    assert md.state == OPEN
    # the live state was not touched by the refused Note's first effect: one Note recorded, so ready holds
    srv.restart()                                                                    # strict recovery starts
    stub = srv.stub()
    assert history(stub, sid) == ["SessionStart", "Note"]
    ack = send(stub, envelope(mode, "Commitment", sid, "alice", commitment(mode_version="1.0.0")))
    assert ack.ok and ack.session_state == RESOLVED, ack


def test_a_raising_start_requirement_or_resolution_is_refused(server_factory):
    srv = server_factory()
    stub = srv.stub()
    start_raises = FRAGILE.replace("state: {initial: generic.message_log}",
                                   "state: {initial: generic.message_log}\nsession_start:\n"
                                   "  requires: [{hook: generic.min_participants, count: \"2\"}]")
    assert register(stub, "ext.badstart.v1", start_raises).ok
    sid = new_session_id()
    ack = send(stub, envelope("ext.badstart.v1", "SessionStart", sid, "alice", start_payload(["alice", "bob"])))
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE", ack
    assert not stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=bearer("alice")).sessions
    bad_resolution = FRAGILE.replace("  ready: {hook: generic.count_at_least, message: Note, count: 1}",
                                     "  resolution: generic.first_from_sender")
    assert register(stub, "ext.badres.v1", bad_resolution).ok
    sid = new_session_id()
    assert send(stub, envelope("ext.badres.v1", "SessionStart", sid, "alice", start_payload(["alice", "bob"]))).ok
    ack = send(stub, envelope("ext.badres.v1", "Commitment", sid, "alice", commitment(mode_version="1.0.0")))
    assert not ack.ok and ack.error.code == "INVALID_ENVELOPE", ack
    md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("alice")).metadata
    assert md.state == OPEN


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
    text = FRAGILE.replace(replace, needle)
    assert needle in text
    resp = register(runtime_server.stub(), f"ext.hookcheck{abs(hash(needle)) % 10**6}.v1", text)
    assert not resp.ok and "<spec-yaml>" in resp.error, resp.error


def test_a_role_hook_with_the_wrong_arity_is_refused(runtime_server):
    text = FRAGILE.replace("phases:", "roles: {scribe: generic.record}\nphases:")
    resp = register(runtime_server.stub(), "ext.rolecheck.v1", text)
    assert not resp.ok and "roles.scribe" in resp.error, resp.error
