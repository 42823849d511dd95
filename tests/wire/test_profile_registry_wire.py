"""Current-profile deltas of the registry RPCs, the envelope shape and the session lifecycle
(../shared/spec/current.md §4.1, §4.4, §7, §11.2); each against a v0.4.0 server too, where the answer
must stay as before.
"""
from __future__ import annotations

import time

import grpc
import pytest
from macp.modes.decision.v1 import decision_pb2
from macp.v1 import core_pb2

from tests.support import bearer, envelope, new_session_id, send, start_payload
from tests.support.inprocess import InProcessServer

MODE = "macp.mode.decision.v1"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pair = {name: InProcessServer(str(tmp_path_factory.mktemp(name) / "data"),
                                  {"MACP_PROTOCOL_PROFILE": name, "MACP_MEMORY_ONLY": "1"}).start()
            for name in ("current", "v0.4.0")}
    yield pair
    for srv in pair.values():
        srv.kill()


def descriptor(mode, message_types=("SessionStart", "Ping", "Commitment"), terminal=("Commitment",),
               mode_version="1.0.0"):
    return core_pb2.ModeDescriptor(mode=mode, mode_version=mode_version, title="t", message_types=list(message_types),
                                   terminal_message_types=list(terminal))


def register(stub, d):
    return stub.RegisterExtMode(core_pb2.RegisterExtModeRequest(mode_descriptor=d), metadata=bearer("admin"))


@pytest.mark.parametrize("d,current_error,v040_error", [
    (descriptor("ext.a.v1", terminal=()), "extension descriptor must declare at least one terminal message type", ""),
    (descriptor("ext.b.v1", message_types=("SessionStart", "Ping", "Done"), terminal=("Done",)),
     "dynamically registered modes resolve only on 'Commitment'; terminal message type 'Done' would never "
     "terminate a session", ""),
    (descriptor("ext.c.v1", message_types=("SessionStart", "Ping"), terminal=("Commitment",)),
     "terminal message type 'Commitment' must also appear in message_types",
     "terminal message type 'Commitment' must also appear in message_types"),
])
def test_register_ext_mode_validation(servers, d, current_error, v040_error):
    for profile, error in (("current", current_error), ("v0.4.0", v040_error)):
        resp = register(servers[profile].stub(), d)
        assert (resp.ok, resp.error) == (not error, error), profile


def test_promote_into_the_reserved_namespace(servers):
    for profile, ok in (("current", False), ("v0.4.0", True)):
        stub = servers[profile].stub()
        assert register(stub, descriptor("ext.promo.v1")).ok
        resp = stub.PromoteMode(core_pb2.PromoteModeRequest(mode="ext.promo.v1", promoted_mode_name="macp.mode.promo.v1"),
                                metadata=bearer("admin"))
        assert resp.ok is ok, profile
        if not ok:
            assert resp.error == "cannot promote 'ext.promo.v1' into the reserved macp.mode.* namespace"


def test_progress_shape(servers):
    sid = new_session_id()
    for profile in ("current", "v0.4.0"):
        stub = servers[profile].stub()
        assert send(stub, envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice"]))).ok
        scoped_without_mode = envelope("", "Progress", sid, "alice", core_pb2.ProgressPayload(progress=1))
        ack = send(stub, scoped_without_mode)
        assert (ack.ok, ack.error.code) == ((False, "INVALID_ENVELOPE") if profile == "current" else (True, ""))
        ambient_with_mode = envelope(MODE, "Progress", "", "alice", core_pb2.ProgressPayload(progress=1))
        assert send(stub, ambient_with_mode).error.code == "INVALID_ENVELOPE"


def test_cancelled_sessions_are_evicted_under_current(server_factory):
    for profile, evicted in (("current", True), ("v0.4.0", False)):
        srv = server_factory(env={"MACP_PROTOCOL_PROFILE": profile, "MACP_MEMORY_ONLY": "1",
                                  "MACP_CLEANUP_INTERVAL_SECS": "0.1", "MACP_SESSION_RETENTION_SECS": "0.3"})
        stub = srv.stub()
        sid = new_session_id()
        assert send(stub, envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice"]))).ok
        assert stub.CancelSession(core_pb2.CancelSessionRequest(session_id=sid), metadata=bearer("coord")).ack.ok
        time.sleep(1.0)
        listed = [s.session_id for s in stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=bearer("coord")).sessions]
        assert (sid not in listed) is evicted, profile
        srv.kill()


def test_request_size_ceiling_is_the_payload_limit_plus_64_kib(inprocess_factory):
    srv = inprocess_factory(env={"MACP_PROTOCOL_PROFILE": "current", "MACP_MEMORY_ONLY": "1",
                                 "MACP_MAX_PAYLOAD_BYTES": "4194304"})
    stub = srv.stub()
    sid = new_session_id()
    assert send(stub, envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice"]))).ok
    big = envelope(MODE, "Proposal", sid, "alice", decision_pb2.ProposalPayload(proposal_id="p", option="o",
                                                                              rationale="x" * 4_200_000))
    assert send(stub, big).error.code == "PAYLOAD_TOO_LARGE"     # above the limit, below the ceiling
    huge = envelope(MODE, "Proposal", sid, "alice", b"x" * (4_194_304 + 70_000))
    with pytest.raises(grpc.RpcError) as info:
        send(stub, huge)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_extension_session_without_mode_version_binds_the_descriptors(servers):
    from tests.support import commitment
    for profile in ("current", "v0.4.0"):
        stub = servers[profile].stub()
        mode = "ext.bind.v1"
        assert register(stub, descriptor(mode, mode_version="3.1.0")).ok
        sid = new_session_id()
        assert send(stub, envelope(mode, "SessionStart", sid, "coord", start_payload(["alice"], mode_version=""))).ok
        md = stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=bearer("coord")).metadata
        bound = "3.1.0" if profile == "current" else ""
        assert md.mode_version == bound
        wrong = "" if profile == "current" else "3.1.0"
        assert not send(stub, envelope(mode, "Commitment", sid, "coord", commitment(mode_version=wrong))).ok
        assert send(stub, envelope(mode, "Commitment", sid, "coord", commitment(mode_version=bound))).ok


# --- MACP_POLICIES_DIR: a file-loaded, read-only policy registry (current.md §11.3) --------------------

def _policy_file(directory, name, **doc):
    import json
    full = {"policy_id": "file.p", "mode": MODE, "description": "from a file",
            "rules": {"voting": {"algorithm": "majority"}}, "schema_version": 2}
    full.update(doc)
    (directory / name).write_text(json.dumps(full))


def test_policies_dir_loads_read_only(inprocess_factory, tmp_path):
    from macp.v1 import policy_pb2
    pdir = tmp_path / "policies"
    pdir.mkdir()
    _policy_file(pdir, "a.json", policy_id="file.a")
    _policy_file(pdir, "b.json", policy_id="file.b", mode="*", rules={})
    srv = inprocess_factory(env={"MACP_PROTOCOL_PROFILE": "current", "MACP_POLICIES_DIR": str(pdir)})
    stub = srv.stub()
    ids = [d.policy_id for d in stub.ListPolicies(policy_pb2.ListPoliciesRequest(), metadata=bearer("a")).descriptors]
    assert "file.a" in ids and "file.b" in ids
    init = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]))
    assert not init.capabilities.policy_registry.register_policy
    for call, req in ((stub.RegisterPolicy, policy_pb2.RegisterPolicyRequest()),
                      (stub.UnregisterPolicy, policy_pb2.UnregisterPolicyRequest(policy_id="file.a"))):
        with pytest.raises(grpc.RpcError) as info:
            call(req)                                            # refused before authentication
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details() == "policy registry is read-only: policies are file-loaded via MACP_POLICIES_DIR"
        assert dict(info.value.trailing_metadata())["macp-error-code"] == "REGISTRY_READ_ONLY"


def test_a_rejected_policy_file_aborts_startup_and_the_dry_run_reports_each_file(server_factory, tmp_path):
    import os
    import subprocess
    import sys
    pdir = tmp_path / "policies"
    pdir.mkdir()
    _policy_file(pdir, "1-good.json", policy_id="file.good")
    _policy_file(pdir, "2-bad.json", policy_id="file.bad", rules={"voting": {"algorithm": "Majority"}})
    srv = server_factory(env={"MACP_PROTOCOL_PROFILE": "current", "MACP_POLICIES_DIR": str(pdir)}, start=False)
    srv.start(wait=False)
    assert srv.proc.wait(20) == 1
    assert "2-bad.json rejected: INVALID_POLICY_DEFINITION: voting.algorithm 'Majority'" in srv.log()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
    env.update(MACP_POLICIES_DIR=str(pdir), MACP_POLICIES_DRY_RUN="1")
    out = subprocess.run([sys.executable, "-m", "macp_runtime", "serve"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0] == "OK 1-good.json file.good"
    assert lines[1].startswith("REJECTED 2-bad.json: INVALID_POLICY_DEFINITION: voting.algorithm 'Majority'")


def test_resume_record_banks_the_remaining_ttl_under_current():
    """In process: the SessionResume record's banked_ms per revision (current.md §7)."""
    from macp_runtime.registries import profile as profiles
    from macp_runtime.vocabulary.identity import Identity
    from macp_runtime.kernel.engine import Engine
    from macp_runtime.registries.modes import ModeRegistry
    from macp_runtime.registries.policies import PolicyRegistry
    from macp_runtime.storage import MemoryStore

    for name, expected in (("current", 60_000 - 1_000), ("v0.4.0", 5_000)):
        prof = profiles.get(name)
        clock = [1_700_000_000_000]
        store = MemoryStore()
        store.open()
        engine = Engine(ModeRegistry.from_spec_dirs(profile=prof), PolicyRegistry(profile=prof), store,
                        clock=lambda: clock[0], profile=prof)
        sid = new_session_id()
        env = envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice"], ttl_ms=60_000))
        env.timestamp_unix_ms = clock[0]
        engine.start_session(env, Identity("coord"))
        clock[0] += 1_000
        engine.suspend_session(sid, Identity("coord"), "pause")
        clock[0] += 5_000
        engine.resume_session(sid, Identity("coord"), "go")
        resume = [r for r in store.history(sid) if r.message_type == "SessionResume"][0]
        assert core_pb2.SessionResumePayload.FromString(resume.payload).banked_ms == expected, name
        assert engine.lookup(sid).deadline_ms == 1_700_000_000_000 + 60_000 + 5_000


def test_watch_sessions_announces_each_session_once(servers):
    stub = servers["current"].stub()
    sid = new_session_id()
    assert send(stub, envelope(MODE, "SessionStart", sid, "coord", start_payload(["alice"]))).ok
    call = stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=bearer("coord"), timeout=5)
    created = []
    try:
        for frame in call:
            if frame.event.event_type == core_pb2.SessionLifecycleEvent.EVENT_TYPE_CREATED:
                created.append(frame.event.session.session_id)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert created.count(sid) == 1
