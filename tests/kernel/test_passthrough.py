"""Dynamically registered extension modes (passthrough, modes.md §8), compiled from the template and
run in-process by the Engine (MemoryStore, fixed clock).

Spec: modes.md §0.4 (non-strict SessionStart), §1.3 (Commitment contract), §8, §10.5 (binding applies
to every mode), §11.23. Also the compiler's generic `unlisted_messages.accept`.
"""
from __future__ import annotations

import base64
import json
import uuid

import pytest
from macp.v1 import core_pb2, envelope_pb2

from macp_runtime.vocabulary.identity import Identity
from macp_runtime.codegen import compile_spec, load_modes, load_spec_text
from macp_runtime.codegen.errors import SpecError
from macp_runtime.codegen.passthrough import allowed_message_types, compile_passthrough
from macp_runtime.kernel import interpreter
from macp_runtime.kernel.engine import Engine
from macp_runtime.vocabulary.errors import MacpError
from macp_runtime.registries.modes import ModeRegistry
from macp_runtime.registries.policies import PolicyRegistry
from macp_runtime.vocabulary.session import OPEN, RESOLVED
from macp_runtime.storage import MemoryStore

NOW = 1_700_000_000_000
MODE = "ext.notes.v1"
_BUILTINS = None


def builtins():
    global _BUILTINS
    if _BUILTINS is None:
        _BUILTINS = load_modes()
    return _BUILTINS


def descriptor(message_types, mode=MODE, **fields):
    fields.setdefault("mode_version", "2.1.0")
    return core_pb2.ModeDescriptor(mode=mode, message_types=message_types, **fields)


class World:
    """An engine serving the built-in modes plus one passthrough mode."""

    def __init__(self, desc, store=None, policies=None):
        self.compiled = compile_passthrough(desc)
        self.modes = ModeRegistry(builtins() + [self.compiled])
        self.store = store or MemoryStore()
        if store is None:
            self.store.open()
        self.policies = policies or PolicyRegistry()
        self.engine = Engine(self.modes, self.policies, self.store, clock=lambda: NOW)

    def env(self, sid, sender, message_type, payload=b"", mode=MODE):
        raw = payload if isinstance(payload, bytes) else payload.SerializeToString()
        return envelope_pb2.Envelope(macp_version="1.0", mode=mode, message_type=message_type,
                                     message_id=str(uuid.uuid4()), session_id=sid, sender=sender,
                                     timestamp_unix_ms=NOW, payload=raw)

    def start(self, initiator="owner", participants=(), **fields) -> tuple[str, MacpError | None]:
        fields.setdefault("ttl_ms", 60_000)
        sid = str(uuid.uuid4())
        start = core_pb2.SessionStartPayload(participants=list(participants), **fields)
        try:
            self.engine.start_session(self.env(sid, initiator, "SessionStart", start), Identity(initiator))
        except MacpError as exc:
            return sid, exc
        return sid, None

    def open(self, initiator="owner", participants=(), **fields) -> str:
        fields.setdefault("mode_version", "2.1.0")   # what the Commitments below carry
        sid, err = self.start(initiator, participants, **fields)
        assert err is None, err
        return sid

    def send(self, sid, sender, message_type, payload=b"") -> MacpError | None:
        try:
            self.engine.process_message(self.env(sid, sender, message_type, payload), Identity(sender))
        except MacpError as exc:
            return exc
        return None

    def session(self, sid):
        return self.engine.lookup(sid)


def commitment(policy_version="policy.default", mode_version="2.1.0", configuration_version="", **fields):
    fields.setdefault("commitment_id", "c-1")
    fields.setdefault("action", "notes.agreed")
    fields.setdefault("authority_scope", "notes")
    fields.setdefault("reason", "done")
    fields.setdefault("outcome_positive", True)
    return core_pb2.CommitmentPayload(mode_version=mode_version, configuration_version=configuration_version,
                                      policy_version=policy_version, **fields)


def code(err):
    return None if err is None else err.code


# --- compiling ------------------------------------------------------------------------------------

def test_compiled_mode_shape():
    desc = descriptor(["SessionStart", "Note", "Commitment", "SessionStart"], title="Notes",
                      terminal_message_types=["Commitment"], schema_uris={"json": "x"})
    compiled = compile_passthrough(desc)
    assert compiled.name == MODE and compiled.version == "2.1.0"
    assert compiled.descriptor == desc and compiled.descriptor is not desc   # returned exactly as registered
    assert not compiled.standards_track and not compiled.strict_start
    assert sorted(compiled.transitions) == ["Commitment", "Note"]
    assert compiled.unlisted_transitions is None
    assert allowed_message_types(desc) == ["Note", "Commitment"]


def test_each_descriptor_gets_its_own_mode():
    a = compile_passthrough(descriptor(["A"], mode="ext.a"))
    b = compile_passthrough(descriptor(["SessionStart"], mode="ext.b"))
    assert (a.name, b.name) == ("ext.a", "ext.b")
    assert "A" in a.transitions and b.unlisted_transitions is not None and a.unlisted_transitions is None


# --- SessionStart ---------------------------------------------------------------------------------

def test_non_strict_session_start():
    w = World(descriptor(["SessionStart", "Note", "Commitment"]))
    # no participants, no versions, repeated participants: all fine
    assert w.start()[1] is None
    assert w.start(participants=["a", "a", " "], mode_version="", configuration_version="")[1] is None
    assert w.start(mode_version="2.1.0")[1] is None
    assert code(w.start(mode_version="1.0.0")[1]) == "INVALID_ENVELOPE"           # version must match if given
    assert code(w.start(ttl_ms=0)[1]) == "INVALID_ENVELOPE"
    assert code(w.start(ttl_ms=86_400_001)[1]) == "INVALID_ENVELOPE"
    sid = str(uuid.uuid4())
    with pytest.raises(MacpError) as err:                                          # empty payload
        w.engine.start_session(w.env(sid, "owner", "SessionStart", b""), Identity("owner"))
    assert err.value.code == "INVALID_ENVELOPE"
    sid = w.open()
    assert w.session(sid).state == {} and w.session(sid).policy_version == "policy.default"


def test_policy_is_bound_in_passthrough_sessions_too():
    policies = PolicyRegistry()
    assert policies.register("p.task", "macp.mode.task.v1", "", "{}", 1) is None
    assert policies.register("p.ext", MODE, "", "{}", 1) is None
    w = World(descriptor(["SessionStart", "Commitment"]), policies=policies)
    assert code(w.start(policy_version="p.missing")[1]) == "UNKNOWN_POLICY_VERSION"
    assert code(w.start(policy_version="p.task")[1]) == "INVALID_POLICY_DEFINITION"
    sid = w.open(policy_version="p.ext")
    # the Commitment must name the bound policy (§1.3 step 4)
    assert code(w.send(sid, "owner", "Commitment", commitment(policy_version="policy.default"))) == "INVALID_ENVELOPE"
    assert w.send(sid, "owner", "Commitment", commitment(policy_version="p.ext")) is None


# --- messages -------------------------------------------------------------------------------------

def test_anyone_may_send_when_participants_are_empty_and_state_is_the_last_payload():
    w = World(descriptor(["SessionStart", "Note", "Commitment"]))
    sid = w.open()
    assert w.send(sid, "stranger", "Note", b"\x00\xffhello") is None
    assert w.session(sid).state == {"payload_base64": base64.b64encode(b"\x00\xffhello").decode()}
    assert w.send(sid, "owner", "Note", b"") is None
    assert w.session(sid).state == {"payload_base64": ""}
    # a type the descriptor does not list: authorised (anyone), then refused
    assert code(w.send(sid, "stranger", "Other", b"x")) == "INVALID_ENVELOPE"
    assert w.session(sid).status == OPEN


def test_declared_participants_only_when_listed():
    w = World(descriptor(["SessionStart", "Note", "Commitment"]))
    sid = w.open(initiator="owner", participants=["alice", "bob"])
    assert code(w.send(sid, "mallory", "Note", b"x")) == "FORBIDDEN"
    assert code(w.send(sid, "owner", "Note", b"x")) == "FORBIDDEN"        # the initiator is not a participant
    assert w.send(sid, "alice", "Note", b"x") is None
    assert code(w.send(sid, "mallory", "Other", b"x")) == "FORBIDDEN"     # authorisation first
    assert code(w.send(sid, "bob", "Other", b"x")) == "INVALID_ENVELOPE"
    # ... but the initiator alone commits, participant or not
    assert code(w.send(sid, "alice", "Commitment", commitment())) == "FORBIDDEN"
    assert w.send(sid, "owner", "Commitment", commitment()) is None
    assert w.session(sid).status == RESOLVED


def test_commitment_contract_and_resolution():
    w = World(descriptor(["SessionStart", "Note", "Commitment"], terminal_message_types=["Commitment"]))
    sid = w.open(participants=["alice"], configuration_version="cfg")
    assert w.send(sid, "alice", "Note", b"draft") is None
    assert code(w.send(sid, "alice", "Commitment", b"\xff garbage")) == "FORBIDDEN"
    assert code(w.send(sid, "owner", "Commitment", b"\xff garbage")) == "INVALID_ENVELOPE"
    for bad in (commitment(configuration_version=""),                       # versions must match the session
                commitment(configuration_version="cfg", mode_version="1.0.0"),
                commitment(configuration_version="cfg", policy_version=""),
                commitment(configuration_version="cfg", reason=" "),
                commitment(configuration_version="cfg", action="notes.rejected", outcome_positive=True)):
        assert code(w.send(sid, "owner", "Commitment", bad)) == "INVALID_ENVELOPE", bad
    assert w.session(sid).status == OPEN
    good = commitment(configuration_version="cfg", action="notes.agreed \u2713", commitment_id="c-\u00e9")
    assert w.send(sid, "owner", "Commitment", good) is None
    s = w.session(sid)
    assert s.status == RESOLVED
    assert s.resolution == '{"action":"notes.agreed \u2713","commitment_id":"c-\u00e9"}'.encode("utf-8")
    assert json.loads(s.resolution) == {"action": "notes.agreed \u2713", "commitment_id": "c-\u00e9"}
    assert s.state == {"payload_base64": base64.b64encode(b"draft").decode()}    # kept as it was
    assert code(w.send(sid, "alice", "Note", b"late")) == "SESSION_NOT_OPEN"


def test_only_session_start_listed_accepts_every_type():
    w = World(descriptor(["SessionStart"]))
    sid = w.open(participants=["alice"])
    for message_type in ("Anything", "trigger", "to_Open", "weird type.*", "Commitmentx"):
        assert w.send(sid, "alice", message_type, message_type.encode()) is None, message_type
    assert code(w.send(sid, "mallory", "Anything", b"")) == "FORBIDDEN"
    assert w.session(sid).state == {"payload_base64": base64.b64encode(b"Commitmentx").decode()}
    # a message literally named Commitment resolves it
    assert code(w.send(sid, "alice", "Commitment", commitment())) == "FORBIDDEN"
    assert w.send(sid, "owner", "Commitment", commitment()) is None
    assert w.session(sid).status == RESOLVED


def test_without_commitment_the_session_cannot_resolve():
    w = World(descriptor(["SessionStart", "Note", "Done"], terminal_message_types=["Done"]))
    sid = w.open()
    assert w.send(sid, "owner", "Done", b"") is None                       # terminal types are descriptive only
    assert w.session(sid).status == OPEN
    assert code(w.send(sid, "someone", "Commitment", commitment())) == "FORBIDDEN"
    assert code(w.send(sid, "owner", "Commitment", commitment())) == "INVALID_ENVELOPE"
    assert w.session(sid).status == OPEN


def test_descriptor_without_session_start_still_starts_sessions():
    w = World(descriptor(["Note"]))
    sid = w.open()
    assert w.send(sid, "x", "Note", b"1") is None
    assert code(w.send(sid, "x", "Other", b"1")) == "INVALID_ENVELOPE"


def test_replay_rebuilds_passthrough_sessions():
    w = World(descriptor(["SessionStart", "Note", "Commitment"]))
    open_sid = w.open(participants=["alice"])
    assert w.send(open_sid, "alice", "Note", b"one") is None
    assert w.send(open_sid, "alice", "Note", b"two") is None
    done_sid = w.open()
    assert w.send(done_sid, "owner", "Commitment", commitment()) is None

    again = World(descriptor(["SessionStart", "Note", "Commitment"]), store=w.store)
    assert again.engine.recover(strict=True) == (2, 0)
    assert again.session(open_sid).state == {"payload_base64": base64.b64encode(b"two").decode()}
    assert again.session(open_sid).status == OPEN
    assert again.session(done_sid).status == RESOLVED
    assert again.session(done_sid).resolution == w.session(done_sid).resolution


# --- the compiler's unlisted_messages.accept ------------------------------------------------------

ACCEPTING = """
spec_version: 1
mode: ext.accepting.v1
version: 1.0.0
descriptor: {message_types: [SessionStart, Commitment]}
hooks: passthrough
payloads: {Commitment: macp.v1.CommitmentPayload}
phases: {initial: Open, names: [Open, Done]}
unlisted_messages:
  senders: [anyone]
  accept: {from: [Open], to: Open, effects: [keep_payload]}
transitions: []
commitment: {message: Commitment, from: [Open], to: Done, senders: [initiator]}
"""


def test_unlisted_accept_compiles_and_runs():
    mode = compile_spec(load_spec_text(ACCEPTING, "accepting.yaml"), "accepting.yaml")
    assert mode.unlisted_transitions["Open"].message == "<unlisted>"
    session = type("S", (), {})()
    session.phase, session.state, session.initiator = "Open", {}, "i"
    plan = interpreter.evaluate(mode, session, "x", "Whatever", b"raw", NOW)
    assert plan.ctx.payload == b"raw"
    assert interpreter.apply(session, plan) is None
    assert session.state == {"payload_base64": base64.b64encode(b"raw").decode()} and session.phase == "Open"


@pytest.mark.parametrize("unlisted, message", [
    ("{accept: {from: [Open], to: Open}}", "accepting unlisted messages needs unlisted_messages.senders"),
    ("{senders: [anyone], accept: {from: [Nope], to: Open}}", "unknown phase 'Nope'"),
    ("{senders: [anyone], accept: {from: [Open], to: Open, message: X}}", "unknown key 'message'"),
    ("{senders: [anyone], accept: [1]}", "must be a mapping"),
])
def test_unlisted_accept_errors(unlisted, message):
    text = ACCEPTING.replace(
        "unlisted_messages:\n  senders: [anyone]\n  accept: {from: [Open], to: Open, effects: [keep_payload]}",
        f"unlisted_messages: {unlisted}")
    with pytest.raises(SpecError) as err:
        compile_spec(load_spec_text(text, "accepting.yaml"), "accepting.yaml")
    assert message in str(err.value)
