"""The extension registry and roots over the wire (runtime.md §8.3–§8.5, modes.md §8–§9):
ListExtModes, RegisterExtMode (passthrough, or a full YAML spec under
`schema_uris["macp-runtime/spec-yaml"]` enforced by its compiled machine), UnregisterExtMode,
PromoteMode, WatchModeRegistry, ListRoots/WatchRoots, and persistence across a restart.

Tests that only add uniquely named extensions share the module's server; tests that assert whole
listings after promoting or unregistering get a memory-only server of their own (`fresh`).
"""
from __future__ import annotations

import json

import grpc
import pytest
from macp.v1 import core_pb2, envelope_pb2

from tests.support import bearer, commitment, envelope, new_session_id, send, start_payload
from tests.support.streamkit import Collector

OPEN = envelope_pb2.SESSION_STATE_OPEN
RESOLVED = envelope_pb2.SESSION_STATE_RESOLVED
SPEC_KEY = "macp-runtime/spec-yaml"
BUILTINS = ["macp.mode.decision.v1", "macp.mode.proposal.v1", "macp.mode.task.v1", "macp.mode.handoff.v1",
            "macp.mode.quorum.v1"]

SIGNOFF_SPEC = """\
# A draft by the initiator, one sign-off per participant, then the initiator commits.
spec_version: 1
mode: ext.whatever.v1          # the registered descriptor's name wins
version: 2.0.0
strict_start: true
descriptor:
  title: Sign-off
  description: A draft, everyone signs off, the initiator commits.
  message_types: [SessionStart, Draft, SignOff, Commitment]
  terminal_message_types: [Commitment]
payloads:
  Draft: json
  SignOff: json
  Commitment: macp.v1.CommitmentPayload
state:
  initial: generic.message_log
phases:
  initial: Drafting
  names: [Drafting, Signing, Committed]
unlisted_messages:
  senders: []
transitions:
  - message: Draft
    from: [Drafting]
    to: Signing
    senders: [initiator]
    effects: [generic.record]
  - message: SignOff
    from: [Signing]
    to: Signing
    senders: [participant]
    guards:
      - check: generic.first_from_sender
        reject: InvalidPayload
        why: one sign-off each
    effects: [generic.record]
commitment:
  message: Commitment
  from: [Signing]
  to: Committed
  senders: [initiator]
  guards:
    - check: common.commitment_matches_session
      reject: InvalidPayload
      why: the Commitment must carry the session's versions
  ready: {hook: generic.all_participants_sent, message: SignOff}
"""


@pytest.fixture(scope="module")
def stub(runtime_server):
    return runtime_server.stub()


@pytest.fixture
def fresh(inprocess_factory):
    return inprocess_factory(env={"MACP_MEMORY_ONLY": "1"}).stub()


def descriptor(mode, message_types=("SessionStart", "Ping", "Commitment"), mode_version="1.0.0",
               terminal=("Commitment",), **fields) -> core_pb2.ModeDescriptor:
    return core_pb2.ModeDescriptor(mode=mode, mode_version=mode_version, title="t", message_types=list(message_types),
                                   terminal_message_types=list(terminal), **fields)


def spec_descriptor(mode="ext.signoff.v1", text=SIGNOFF_SPEC, mode_version="2.0.0") -> core_pb2.ModeDescriptor:
    return descriptor(mode, ("SessionStart", "Draft", "SignOff", "Commitment"), mode_version,
                      schema_uris={SPEC_KEY: text})


def register(stub, d, who="admin"):
    return stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=bearer(who))


def unregister(stub, mode, who="admin"):
    return stub.UnregisterExtMode(core_pb2.UnregisterExtModeRequest(mode=mode), metadata=bearer(who))


def promote(stub, mode, new_name="", who="admin"):
    return stub.PromoteMode(core_pb2.PromoteModeRequest(mode=mode, promoted_mode_name=new_name), metadata=bearer(who))


def ext_modes(stub) -> list[str]:
    return [m.mode for m in stub.ListExtModes(core_pb2.ListExtModesRequest()).modes]


def std_modes(stub) -> list[str]:
    return [m.mode for m in stub.ListModes(core_pb2.ListModesRequest()).modes]


def start(stub, mode, participants=("alice", "bob"), sender="coord", mode_version="1.0.0", **fields) -> str:
    sid = new_session_id()
    ack = send(stub, envelope(mode, "SessionStart", sid, sender,
                              start_payload(participants, mode_version=mode_version, **fields)))
    assert ack.ok, ack
    return sid


def msg(stub, mode, sid, sender, mtype, payload=b""):
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return send(stub, envelope(mode, mtype, sid, sender, payload))


# --- listing and registration -------------------------------------------------------------------

def test_ext_modes_list_the_built_in_extension(fresh):
    stub = fresh
    modes = stub.ListExtModes(core_pb2.ListExtModesRequest()).modes
    assert [m.mode for m in modes] == ["ext.multi_round.v1"]
    assert modes[0].title == "Multi-Round Mode"
    assert std_modes(stub) == BUILTINS


@pytest.mark.parametrize("d,error", [
    (descriptor(" "), "mode name must not be empty"),
    (descriptor("macp.mode.mine.v1"), "cannot register extension with reserved macp.mode.* namespace"),
    (descriptor("ext.x.v1", message_types=()), "extension descriptor must declare at least one message type"),
    (descriptor("ext.x.v1", mode_version="  "), "extension descriptor must bind mode_version"),
    (descriptor("ext.x.v1", terminal=("Done",)), "terminal message type 'Done' must also appear in message_types"),
    (descriptor("ext.multi_round.v1"), "mode 'ext.multi_round.v1' is already registered"),
    (descriptor("macp.mode.decision.v1", message_types=()), "cannot register extension with reserved macp.mode.* namespace"),
])
def test_register_validation_texts(stub, d, error):
    resp = register(stub, d)
    assert (resp.ok, resp.error) == (False, error)


def test_register_needs_a_descriptor_and_an_identity(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(), metadata=bearer("admin"))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "descriptor required")
    for rpc, req in ((stub.RegisterExtMode, core_pb2.RegisterExtModeRequest(mode_descriptor=descriptor("ext.a.v1"))),
                     (stub.UnregisterExtMode, core_pb2.UnregisterExtModeRequest(mode="ext.a.v1")),
                     (stub.PromoteMode, core_pb2.PromoteModeRequest(mode="ext.a.v1"))):
        with pytest.raises(grpc.RpcError) as info:
            rpc(req)
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")


def test_registry_changes_need_the_capability(inprocess_factory):
    tokens = [{"token": "t-admin", "sender": "admin", "can_manage_mode_registry": True},
              {"token": "t-user", "sender": "user"}]
    stub = inprocess_factory(env={"MACP_MEMORY_ONLY": "1", "MACP_AUTH_TOKENS_JSON": json.dumps(tokens)}).stub()
    for rpc, req in ((stub.RegisterExtMode, core_pb2.RegisterExtModeRequest(mode_descriptor=descriptor("ext.a.v1"))),
                     (stub.UnregisterExtMode, core_pb2.UnregisterExtModeRequest(mode="ext.a.v1")),
                     (stub.PromoteMode, core_pb2.PromoteModeRequest(mode="ext.a.v1"))):
        with pytest.raises(grpc.RpcError) as info:
            rpc(req, metadata=bearer("t-user"))
        assert (info.value.code(), info.value.details()) == (grpc.StatusCode.PERMISSION_DENIED, "Forbidden")
    assert register(stub, descriptor("ext.a.v1"), who="t-admin").ok
    assert "ext.a.v1" in ext_modes(stub)


def test_a_passthrough_extension_session_resolves_by_commitment(stub):
    d = descriptor("ext.ping.v1", schema_uris={"docs": "https://example.invalid/ping"})
    resp = register(stub, d)
    assert (resp.ok, resp.error) == (True, "")
    listed = {m.mode: m for m in stub.ListExtModes(core_pb2.ListExtModesRequest()).modes}
    assert listed["ext.ping.v1"] == d                                  # returned as submitted
    init = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]))
    assert "ext.ping.v1" in init.supported_modes and list(init.supported_modes) == sorted(init.supported_modes)
    sid = start(stub, "ext.ping.v1", participants=("alice",))
    assert msg(stub, "ext.ping.v1", sid, "alice", "Ping", b"anything").ok
    assert msg(stub, "ext.ping.v1", sid, "mallory", "Ping", b"x").error.code == "FORBIDDEN"
    assert msg(stub, "ext.ping.v1", sid, "alice", "Pong", b"x").error.code == "INVALID_ENVELOPE"
    done = send(stub, envelope("ext.ping.v1", "Commitment", sid, "coord", commitment()))
    assert (done.ok, done.session_state) == (True, RESOLVED)


# --- a full YAML spec --------------------------------------------------------------------------------

def test_a_yaml_spec_extension_is_enforced_by_its_compiled_machine(stub):
    mode = "ext.signoff.v2"
    resp = register(stub, spec_descriptor(mode))
    assert (resp.ok, resp.error) == (True, "")
    assert mode in ext_modes(stub)
    # strict SessionStart (the spec says so): participants are required
    bad = send(stub, envelope(mode, "SessionStart", new_session_id(), "coord",
                              start_payload([], mode_version="2.0.0")))
    assert (bad.ok, bad.error.code) == (False, "INVALID_ENVELOPE")
    sid = start(stub, mode, participants=("alice", "bob"), mode_version="2.0.0")
    assert msg(stub, mode, sid, "alice", "SignOff", {"ok": True}).error.code == "INVALID_ENVELOPE"   # wrong phase
    assert msg(stub, mode, sid, "alice", "Draft", {"text": "v1"}).error.code == "FORBIDDEN"         # not the initiator
    assert msg(stub, mode, sid, "alice", "Ping", b"").error.code == "FORBIDDEN"                     # not in the spec
    assert msg(stub, mode, sid, "coord", "Draft", {"text": "v1"}).ok
    assert msg(stub, mode, sid, "alice", "SignOff", {"ok": True}).ok
    assert msg(stub, mode, sid, "alice", "SignOff", {"ok": True}).error.code == "INVALID_ENVELOPE"   # guard
    versions = dict(mode_version="2.0.0")
    early = send(stub, envelope(mode, "Commitment", sid, "coord", commitment(**versions)))
    assert early.error.code == "INVALID_ENVELOPE"                      # not ready: bob has not signed
    assert msg(stub, mode, sid, "bob", "SignOff", {"ok": True}).ok
    assert send(stub, envelope(mode, "Commitment", sid, "alice", commitment(**versions))).error.code == "FORBIDDEN"
    done = send(stub, envelope(mode, "Commitment", sid, "coord", commitment(**versions)))
    assert (done.ok, done.session_state) == (True, RESOLVED)


def test_an_invalid_spec_is_refused_with_the_compilers_precise_error(stub):
    text = SIGNOFF_SPEC.replace("    from: [Signing]\n    to: Signing", "    from: [Sigining]\n    to: Signing")
    line = text.splitlines().index("    from: [Sigining]") + 1
    resp = register(stub, spec_descriptor(text=text))
    assert (resp.ok, resp.error) == (False, f"<spec-yaml>:{line}: transitions[1].from: unknown phase 'Sigining' "
                                            "(known: Committed, Drafting, Signing; did you mean 'Signing'?)")
    resp = register(stub, spec_descriptor(text="mode: [unclosed"))
    assert not resp.ok and resp.error.startswith("<spec-yaml>:1: <root>: invalid YAML")
    resp = register(stub, spec_descriptor(text=SIGNOFF_SPEC.replace("version: 2.0.0", "version: 2.1.0")))
    assert (resp.ok, resp.error) == (False, "<spec-yaml>: version: the spec's version '2.1.0' differs from "
                                            "the descriptor's mode_version '2.0.0'")
    evil = SIGNOFF_SPEC.replace("state:\n", "hooks: /tmp/evil.py\nstate:\n")
    resp = register(stub, spec_descriptor(text=evil))
    assert not resp.ok and "a registered spec may only name a hook module of the runtime" in resp.error
    assert "ext.signoff.v1" not in ext_modes(stub)                     # nothing was registered


# --- unregister and promote ---------------------------------------------------------------------------

def test_unregister(fresh):
    stub = fresh
    assert register(stub, descriptor("ext.ping.v1")).ok
    sid = start(stub, "ext.ping.v1", participants=())
    assert msg(stub, "ext.ping.v1", sid, "anyone", "Ping", b"1").ok   # no participants: anyone may send
    assert (unregister(stub, "ext.nope.v1").error) == "mode 'ext.nope.v1' not found"
    assert (unregister(stub, "macp.mode.decision.v1").error) == "cannot unregister built-in mode 'macp.mode.decision.v1'"
    assert (unregister(stub, "ext.multi_round.v1").error) == "cannot unregister built-in mode 'ext.multi_round.v1'"
    resp = unregister(stub, "ext.ping.v1")
    assert (resp.ok, resp.error) == (True, "")
    assert "ext.ping.v1" not in ext_modes(stub)
    ack = msg(stub, "ext.ping.v1", sid, "anyone", "Ping", b"2")      # the live session is stranded
    assert (ack.ok, ack.error.code) == (False, "MODE_NOT_SUPPORTED")
    ack = send(stub, envelope("ext.ping.v1", "SessionStart", new_session_id(), "coord", start_payload(["a"])))
    assert ack.error.code == "MODE_NOT_SUPPORTED"


def test_promote(fresh):
    stub = fresh
    assert register(stub, descriptor("ext.ping.v1")).ok
    assert register(stub, descriptor("ext.pong.v1")).ok
    old = start(stub, "ext.ping.v1", participants=())
    assert promote(stub, "ext.nope.v1").error == "mode 'ext.nope.v1' not found"
    assert promote(stub, "macp.mode.task.v1").error == "mode 'macp.mode.task.v1' is already standards-track"
    assert promote(stub, "ext.ping.v1", "ext.pong.v1").error == "cannot promote: target name 'ext.pong.v1' already exists"
    resp = promote(stub, "ext.ping.v1", "org.ping.v2")
    assert (resp.ok, resp.error, resp.mode) == (True, "", "org.ping.v2")
    assert std_modes(stub) == BUILTINS + ["org.ping.v2"]
    assert ext_modes(stub) == ["ext.multi_round.v1", "ext.pong.v1"]
    modes = stub.ListModes(core_pb2.ListModesRequest()).modes
    assert modes[-1].mode == "org.ping.v2" and list(modes[-1].message_types) == ["SessionStart", "Ping", "Commitment"]
    assert promote(stub, "org.ping.v2").error == "mode 'org.ping.v2' is already standards-track"
    assert unregister(stub, "org.ping.v2").error == "cannot unregister standards-track mode 'org.ping.v2'"
    # The old name is gone, stranding its sessions; the promoted mode is strict at SessionStart.
    assert msg(stub, "ext.ping.v1", old, "x", "Ping", b"").error.code == "MODE_NOT_SUPPORTED"
    loose = send(stub, envelope("org.ping.v2", "SessionStart", new_session_id(), "coord",
                                start_payload([], configuration_version="")))
    assert loose.error.code == "INVALID_ENVELOPE"
    sid = start(stub, "org.ping.v2", participants=("alice",))
    assert msg(stub, "org.ping.v2", sid, "alice", "Ping", b"").ok
    assert promote(stub, "ext.pong.v1").mode == "ext.pong.v1"          # promoted in place
    assert std_modes(stub) == BUILTINS + ["ext.pong.v1", "org.ping.v2"]
    assert promote(stub, "ext.multi_round.v1").ok                     # the built-in extension can be promoted too
    assert ext_modes(stub) == []
    assert unregister(stub, "ext.multi_round.v1").error == "cannot unregister built-in mode 'ext.multi_round.v1'"


# --- watches and roots --------------------------------------------------------------------------------

def test_watch_mode_registry_sends_one_notice_now_and_one_per_change(fresh):
    stub = fresh
    w = Collector(stub.WatchModeRegistry(core_pb2.WatchModeRegistryRequest(), metadata=bearer("watcher")))
    first = w.recv()
    assert first.change.registry == "modes" and first.change.observed_at_unix_ms > 0
    assert register(stub, descriptor("ext.ping.v1")).ok
    assert not register(stub, descriptor("ext.ping.v1")).ok          # failures are silent
    assert promote(stub, "ext.ping.v1", "ext.ping.v2").ok
    assert not unregister(stub, "ext.ping.v1").ok
    assert register(stub, descriptor("ext.tmp.v1")).ok and unregister(stub, "ext.tmp.v1").ok
    changes = [w.recv() for _ in range(4)]
    assert all(c.change.registry == "modes" for c in changes)
    stamps = [c.change.observed_at_unix_ms for c in changes]
    assert stamps == sorted(stamps) and stamps[0] >= first.change.observed_at_unix_ms
    assert w.nothing_within(0.3)
    w.cancel()


def test_roots(stub):
    assert list(stub.ListRoots(core_pb2.ListRootsRequest()).roots) == []
    w = Collector(stub.WatchRoots(core_pb2.WatchRootsRequest(), metadata=bearer("watcher")))
    assert w.recv().change.observed_at_unix_ms > 0
    assert w.nothing_within(0.5) and not w.ended.is_set()              # open, silent
    w.cancel()


# --- persistence ----------------------------------------------------------------------------------------

def test_registry_and_its_sessions_survive_a_restart(server_factory):
    srv = server_factory()
    stub = srv.stub()
    assert register(stub, spec_descriptor()).ok
    assert register(stub, descriptor("ext.ping.v1")).ok
    assert register(stub, descriptor("ext.gone.v1")).ok and unregister(stub, "ext.gone.v1").ok
    assert promote(stub, "ext.multi_round.v1", "ext.rounds.v2").ok
    signoff = start(stub, "ext.signoff.v1", participants=("alice",), mode_version="2.0.0")
    assert msg(stub, "ext.signoff.v1", signoff, "coord", "Draft", {"text": "v1"}).ok
    ping = start(stub, "ext.ping.v1", participants=("alice",))
    listings = (std_modes(stub), stub.ListExtModes(core_pb2.ListExtModesRequest()).modes)
    srv.kill()
    srv.start()
    stub = srv.stub()
    assert (std_modes(stub), stub.ListExtModes(core_pb2.ListExtModesRequest()).modes) == listings
    assert std_modes(stub)[-1] == "ext.rounds.v2" and "ext.gone.v1" not in ext_modes(stub)
    # The sessions were replayed through the restored modes and carry on where they were.
    assert msg(stub, "ext.signoff.v1", signoff, "coord", "Draft", {"text": "v2"}).error.code == "INVALID_ENVELOPE"
    assert msg(stub, "ext.signoff.v1", signoff, "alice", "SignOff", {"ok": True}).ok
    done = send(stub, envelope("ext.signoff.v1", "Commitment", signoff, "coord", commitment(mode_version="2.0.0")))
    assert (done.ok, done.session_state) == (True, RESOLVED)
    done = send(stub, envelope("ext.ping.v1", "Commitment", ping, "coord", commitment()))
    assert (done.ok, done.session_state) == (True, RESOLVED)
    assert "sessions could not be recovered" not in srv.log()
