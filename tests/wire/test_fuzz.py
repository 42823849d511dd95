"""Property-based fuzzing with Hypothesis, against a real server and against the spec compiler.

Properties (runtime.md §2, §3, §5.4, §9):

* random bytes, and byte-level mutations of valid requests, sent to the unary RPCs never crash the
  server and never get an UNKNOWN or INTERNAL status. Bytes that do not decode as the request
  message answer INVALID_ARGUMENT `the request does not decode` before any handler runs (issue 12:
  grpcio's own answer, INTERNAL `Exception deserializing request!`, blamed the server);
* envelopes built from valid ones and then mutated (version, mode, type, ids, sender, credentials,
  payload) always get an Ack, never `INTERNAL_ERROR`, and a rejected or duplicate envelope leaves
  every session exactly as it was (GetSession metadata compared before/after) and creates none;
* the YAML spec loader and compiler, given random or mutated text, either compile or raise SpecError.

Example counts are bounded by the `macp-fuzz` profile so the file stays well under 40 s on two cores;
set MACP_FUZZ_EXAMPLES=<n> for a longer run (every test then runs n examples).
"""
from __future__ import annotations

import glob
import importlib
import os
import pkgutil
import time
import uuid

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pool, message_factory
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from macp.v1 import core_pb2, envelope_pb2

from tests.support import ROOT, ServerProcess
from macp_runtime.codegen import SpecError, compile_spec, load_spec_file, load_spec_text

_EXAMPLES = os.environ.get("MACP_FUZZ_EXAMPLES")
settings.register_profile("macp-fuzz", max_examples=60, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                 HealthCheck.filter_too_much])
settings.register_profile("macp-fuzz-long", parent=settings.get_profile("macp-fuzz"),
                          max_examples=int(_EXAMPLES) if _EXAMPLES else 60)
PROFILE = settings.get_profile("macp-fuzz-long" if _EXAMPLES else "macp-fuzz")


def examples(n: int) -> settings:
    """The profile, with this test's own default example count (unless MACP_FUZZ_EXAMPLES says otherwise)."""
    return settings(PROFILE, max_examples=PROFILE.max_examples if _EXAMPLES else n)


SERVICE = "/macp.v1.MACPRuntimeService/"
SPEC_FILES = sorted(glob.glob(os.path.join(ROOT, "specs", "*.yaml")))
PEOPLE = ["alice", "bob", "carol"]
INITIATOR = "alice"


# --- the modes, their message types and payload classes, read from the specs --------------------------

def _payload_classes() -> dict[str, dict[str, type]]:
    import macp

    for info in pkgutil.walk_packages(macp.__path__, "macp."):
        if info.name.endswith("_pb2"):
            importlib.import_module(info.name)
    pool = descriptor_pool.Default()
    modes = {}
    for path in SPEC_FILES:
        spec = load_spec_file(path)
        classes = {}
        for mtype in spec["descriptor"]["message_types"]:
            name = (spec.get("payloads") or {}).get(mtype)
            cls = None
            if isinstance(name, str):   # a mapping names a hook decoder (e.g. JSON contributions)
                try:
                    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))
                except KeyError:
                    cls = None
            classes[mtype] = cls
        modes[spec["mode"]] = classes
    return modes


MODES = _payload_classes()
KNOWN_TYPES = {t for m in MODES.values() for t in m} | {"Signal", "Progress"}

# words the mode rules react to, so generated payloads reach the guards rather than only decoding errors
WORDS = ["p1", "p2", "t1", "h1", "r1", "c1", "alice", "bob", "carol", "mallory", "APPROVE", "REJECT", "ABSTAIN",
         "approve", "yes", "completed", "in_progress", "1.0.0", "config.default", "policy.default", "",
         "{\"value\":\"a\"}", "a", "x" * 40]

_SCALARS = {
    descriptor.FieldDescriptor.TYPE_STRING: st.one_of(st.sampled_from(WORDS), st.text(max_size=12)),
    descriptor.FieldDescriptor.TYPE_BYTES: st.one_of(st.sampled_from([b"", b"{\"value\":\"a\"}", b"\x00"]),
                                                     st.binary(max_size=16)),
    descriptor.FieldDescriptor.TYPE_BOOL: st.booleans(),
    descriptor.FieldDescriptor.TYPE_DOUBLE: st.one_of(st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0]),
                                                      st.floats(allow_nan=True)),
    descriptor.FieldDescriptor.TYPE_FLOAT: st.floats(width=32, allow_nan=True),
}
_INTS = st.one_of(st.sampled_from([0, 1, 2, 3, -1, 60_000]), st.integers(-2**31, 2**31 - 1))


def _field_value(field, depth: int):
    if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            return st.just(None)
        return message_of(message_factory.GetMessageClass(field.message_type), depth + 1)
    if field.type == descriptor.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if field.type in _SCALARS:
        return _SCALARS[field.type]
    if field.type in (descriptor.FieldDescriptor.TYPE_UINT32, descriptor.FieldDescriptor.TYPE_UINT64,
                      descriptor.FieldDescriptor.TYPE_FIXED32, descriptor.FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**31)
    return _INTS


@st.composite
def message_of(draw, cls, depth: int = 0):
    """A message of `cls` with a random subset of fields filled with plausible or random values."""
    msg = cls()
    if depth > 2:
        return msg
    for field in cls.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        value_strategy = _field_value(field, depth)
        if field.is_repeated:
            values = [v for v in draw(st.lists(value_strategy, max_size=3)) if v is not None]
            if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                for v in values:
                    getattr(msg, field.name).add().CopyFrom(v)
            else:
                getattr(msg, field.name).extend(values)
        else:
            value = draw(value_strategy)
            if value is None:
                continue
            if field.type == descriptor.FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, field.name).CopyFrom(value)
            else:
                setattr(msg, field.name, value)
    return msg


@st.composite
def mutated_bytes(draw, data: bytes):
    """Byte-level mutations: flips, truncation, insertion, splice with random bytes."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "random"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate" and data:
            data = data[:draw(st.integers(0, len(data) - 1))]
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            i = draw(st.integers(0, len(data) - 1))
            del data[i:i + draw(st.integers(1, 8))]
        else:
            data = bytearray(draw(st.binary(max_size=64)))
    return bytes(data)


def payload_for(mode: str, mtype: str):
    """Valid-shaped payload bytes for a message type, or random/mutated bytes."""
    cls = MODES.get(mode, {}).get(mtype)
    if mtype == "SessionStart":
        cls = core_pb2.SessionStartPayload
    elif mtype == "Signal":
        cls = core_pb2.SignalPayload
    elif mtype == "Progress":
        cls = core_pb2.ProgressPayload
    shaped = (message_of(cls).map(lambda m: m.SerializeToString()) if cls is not None
              else st.sampled_from([b"{\"value\":\"a\"}", b"{}", b""]))
    return st.one_of(shaped, shaped.flatmap(mutated_bytes), st.binary(max_size=64))


# --- a valid flow per mode: mutations start from these envelopes, at every depth -----------------------

def _flows() -> dict[str, list[tuple[str, str, bytes]]]:
    from macp.modes.decision.v1 import decision_pb2 as d
    from macp.modes.handoff.v1 import handoff_pb2 as h
    from macp.modes.proposal.v1 import proposal_pb2 as p
    from macp.modes.quorum.v1 import quorum_pb2 as q
    from macp.modes.task.v1 import task_pb2 as t

    def commit(action):
        return core_pb2.CommitmentPayload(commitment_id="c1", action=action, authority_scope="fuzz", reason="done",
                                          mode_version="1.0.0", policy_version="policy.default",
                                          configuration_version="config.default", outcome_positive=True)

    flows = {
        "macp.mode.decision.v1": [
            ("alice", "Proposal", d.ProposalPayload(proposal_id="p1", option="ship")),
            ("bob", "Evaluation", d.EvaluationPayload(proposal_id="p1", recommendation="APPROVE", confidence=0.9)),
            ("bob", "Vote", d.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("carol", "Vote", d.VotePayload(proposal_id="p1", vote="APPROVE")),
            ("alice", "Commitment", commit("decision.selected"))],
        "macp.mode.proposal.v1": [
            ("bob", "Proposal", p.ProposalPayload(proposal_id="o1", title="offer")),
            ("alice", "CounterProposal", p.CounterProposalPayload(proposal_id="o2", supersedes_proposal_id="o1",
                                                                  title="counter")),
            ("alice", "Accept", p.AcceptPayload(proposal_id="o2")),
            ("bob", "Accept", p.AcceptPayload(proposal_id="o2")),
            ("carol", "Accept", p.AcceptPayload(proposal_id="o2")),
            ("alice", "Commitment", commit("proposal.accepted"))],
        "macp.mode.task.v1": [
            ("alice", "TaskRequest", t.TaskRequestPayload(task_id="t1", title="job", requested_assignee="bob")),
            ("bob", "TaskAccept", t.TaskAcceptPayload(task_id="t1", assignee="bob")),
            ("bob", "TaskUpdate", t.TaskUpdatePayload(task_id="t1", status="in_progress", progress=0.5)),
            ("bob", "TaskComplete", t.TaskCompletePayload(task_id="t1", assignee="bob", summary="done")),
            ("alice", "Commitment", commit("task.completed"))],
        "macp.mode.handoff.v1": [
            ("alice", "HandoffOffer", h.HandoffOfferPayload(handoff_id="h1", target_participant="bob", scope="s")),
            ("alice", "HandoffContext", h.HandoffContextPayload(handoff_id="h1", content_type="text/plain",
                                                                context=b"ctx")),
            ("bob", "HandoffAccept", h.HandoffAcceptPayload(handoff_id="h1", accepted_by="bob")),
            ("alice", "Commitment", commit("handoff.accepted"))],
        "macp.mode.quorum.v1": [
            ("alice", "ApprovalRequest", q.ApprovalRequestPayload(request_id="r1", action="go", required_approvals=2)),
            ("bob", "Approve", q.ApprovePayload(request_id="r1")),
            ("carol", "Approve", q.ApprovePayload(request_id="r1")),
            ("alice", "Commitment", commit("quorum.approved"))],
        "ext.multi_round.v1": [
            ("alice", "Contribute", b'{"value":"a"}'),
            ("bob", "Contribute", b'{"value":"a"}'),
            ("carol", "Contribute", b'{"value":"a"}'),
            ("alice", "Commitment", commit("multi_round.converged"))],
    }
    return {mode: [(who, mtype, raw if isinstance(raw, bytes) else raw.SerializeToString())
                   for who, mtype, raw in steps] for mode, steps in flows.items()}


FLOWS = _flows()


# --- the server --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(str(tmp_path_factory.mktemp("fuzz") / "data")).start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def stub(server):
    return server.stub()


def auth(who):
    return [("authorization", f"Bearer {who}")] if who else []


def start_session(stub, mode: str) -> str:
    sid = str(uuid.uuid4())
    payload = core_pb2.SessionStartPayload(intent="fuzz", participants=PEOPLE, mode_version="1.0.0",
                                           configuration_version="config.default",
                                           policy_version="policy.default", ttl_ms=600_000)
    env = envelope_pb2.Envelope(macp_version="1.0", mode=mode, message_type="SessionStart",
                                message_id=str(uuid.uuid4()), session_id=sid, sender=INITIATOR,
                                timestamp_unix_ms=int(time.time() * 1000), payload=payload.SerializeToString())
    ack = stub.Send(core_pb2.SendRequest(envelope=env), metadata=auth(INITIATOR)).ack
    assert ack.ok, (mode, ack)
    return sid


def snapshot(stub, sid):
    """GetSession metadata as the initiator, or None when the session does not exist."""
    try:
        return stub.GetSession(core_pb2.GetSessionRequest(session_id=sid), metadata=auth(INITIATOR)).metadata
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED), err
        return None if err.code() == grpc.StatusCode.NOT_FOUND else "no-access"


def send_and_check(stub, env, who, known: list[str]):
    """Send; the Ack is never INTERNAL_ERROR; a rejected or duplicate envelope changes no session."""
    watched = list(dict.fromkeys([*known, env.session_id]))
    before = {sid: snapshot(stub, sid) for sid in watched}
    try:
        ack = stub.Send(core_pb2.SendRequest(envelope=env), metadata=auth(who), timeout=30).ack
    except grpc.RpcError as err:   # pragma: no cover - reported with the envelope
        pytest.fail(f"Send answered status {err.code().name} '{err.details()}' for {env!r}")
    assert ack.error.code != "INTERNAL_ERROR", (env, ack)
    event(f"{env.message_type if env.message_type in KNOWN_TYPES else '?'}: "
          f"{'duplicate' if ack.duplicate else 'accepted' if ack.ok else ack.error.code}")
    assert ack.message_id == env.message_id and ack.session_id == env.session_id, (env, ack)
    if not ack.ok:
        assert ack.error.code and ack.session_state == envelope_pb2.SESSION_STATE_UNSPECIFIED, ack
    if not ack.ok or ack.duplicate:
        after = {sid: snapshot(stub, sid) for sid in watched}
        assert after == before, (env, who, ack)
    return ack


# --- properties over the wire -------------------------------------------------------------------------

UNARY = {
    "Send": core_pb2.SendRequest, "GetSession": core_pb2.GetSessionRequest,
    "CancelSession": core_pb2.CancelSessionRequest, "Initialize": core_pb2.InitializeRequest,
    "GetManifest": core_pb2.GetManifestRequest, "ListModes": core_pb2.ListModesRequest,
}


def _valid_send_bytes() -> bytes:
    env = envelope_pb2.Envelope(macp_version="1.0", mode="macp.mode.decision.v1", message_type="Proposal",
                                message_id="m1", session_id=str(uuid.uuid4()), sender="alice",
                                payload=b"\n\x02p1\x12\x03opt")
    return core_pb2.SendRequest(envelope=env).SerializeToString()


def _decodes(cls, data: bytes) -> bool:
    try:
        cls.FromString(data)
        return True
    except Exception:
        return False


@examples(300)
@given(method=st.sampled_from(sorted(UNARY)),
       data=st.one_of(st.binary(max_size=512), mutated_bytes(_valid_send_bytes())),
       who=st.sampled_from(["alice", "", "mallory"]))
def test_random_bytes_never_crash_the_server(server, stub, method, data, who):
    call = server.channel().unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    try:
        call(data, metadata=auth(who), timeout=30)
    except grpc.RpcError as err:
        assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method, data, err.details())
        if not _decodes(UNARY[method], data):
            assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "the request does not decode")
        else:
            assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
                                  grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.FAILED_PRECONDITION), (method, data, err)
    # still serving
    assert stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]),
                           timeout=10).selected_protocol_version == "1.0"


ENVELOPE_FIELDS = ["macp_version", "mode", "message_type", "message_id", "session_id", "sender", "payload", "who"]


@st.composite
def scenario(draw):
    """A mode, a few well-formed messages to move the session along, then one mutated envelope."""
    mode = draw(st.sampled_from(sorted(MODES)))
    types = [t for t in MODES[mode] if t != "SessionStart"]
    flow = FLOWS.get(mode, [])
    depth = draw(st.integers(0, len(flow)))
    steps = [(mtype, who, payload) for who, mtype, payload in flow[:depth]]   # valid moves first
    for _ in range(draw(st.integers(0, 2))):                                  # then some random ones
        mtype = draw(st.sampled_from(types))
        steps.append((mtype, draw(st.sampled_from(PEOPLE)), draw(payload_for(mode, mtype))))
    if depth < len(flow) and draw(st.booleans()):
        who, mtype, payload = flow[depth]                                      # mutate the next valid move
    else:
        mtype = draw(st.sampled_from(types + ["SessionStart", "Signal", "Progress"]))
        who, payload = draw(st.sampled_from(PEOPLE)), draw(payload_for(mode, mtype))
    base = {"macp_version": "1.0", "mode": mode, "message_type": mtype, "message_id": str(uuid.uuid4()),
            "session_id": "<session>", "sender": "", "payload": payload, "who": who}
    mutations = {
        "macp_version": st.sampled_from(["2.0", "", "1.0 ", "1", "1.00"]),
        "mode": st.one_of(st.sampled_from(sorted(MODES) + ["", " ", "macp.mode.nope.v1"]), st.text(max_size=8)),
        "message_type": st.one_of(st.sampled_from(sorted({t for m in MODES.values() for t in m})
                                                  + ["", "sessionstart", "Signal", "Progress", "Unknown"]),
                                  st.text(max_size=8)),
        "message_id": st.one_of(st.sampled_from(["", " ", "<repeat>"]), st.text(max_size=8)),
        "session_id": st.one_of(st.sampled_from(["", " ", "<other>", "<fresh>", "not-a-valid-id"]),
                                st.text(max_size=40)),
        "sender": st.sampled_from(["<who>", "mallory", " ", "alice", "bob"]),
        "payload": st.one_of(st.binary(max_size=64), mutated_bytes(base["payload"])),
        "who": st.sampled_from(["", "mallory", "bob", "carol", "alice"]),
    }
    for field in draw(st.lists(st.sampled_from(ENVELOPE_FIELDS), min_size=0, max_size=3, unique=True)):
        base[field] = draw(mutations[field])
    return mode, steps, base


@examples(150)
@given(case=scenario())
def test_mutated_envelopes_get_acks_and_rejections_change_nothing(stub, case):
    mode, steps, fields = case
    sid = start_session(stub, mode)
    other = start_session(stub, mode)
    known = [sid, other]
    sent_ids = []
    for mtype, who, payload in steps:
        env = envelope_pb2.Envelope(macp_version="1.0", mode=mode, message_type=mtype, message_id=str(uuid.uuid4()),
                                    session_id=sid, sender=who, timestamp_unix_ms=int(time.time() * 1000),
                                    payload=payload)
        send_and_check(stub, env, who, known)
        sent_ids.append(env.message_id)
    who = fields["who"]
    session_id = {"<session>": sid, "<other>": other, "<fresh>": str(uuid.uuid4())}.get(fields["session_id"],
                                                                                        fields["session_id"])
    message_id = fields["message_id"]
    if message_id == "<repeat>":
        message_id = sent_ids[-1] if sent_ids else "<repeat>"
    env = envelope_pb2.Envelope(
        macp_version=fields["macp_version"], mode=fields["mode"], message_type=fields["message_type"],
        message_id=message_id, session_id=session_id, sender=who if fields["sender"] == "<who>" else fields["sender"],
        timestamp_unix_ms=int(time.time() * 1000), payload=fields["payload"])
    send_and_check(stub, env, who, known)


# --- the spec loader and compiler ----------------------------------------------------------------------

SPEC_TEXTS = [open(p, encoding="utf-8").read() for p in SPEC_FILES]


@st.composite
def mutated_spec(draw):
    lines = draw(st.sampled_from(SPEC_TEXTS)).splitlines()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "replace-token", "indent", "chars", "value"]))
        i = draw(st.integers(0, len(lines) - 1))
        if kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(i, lines[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "replace-token":
            words = lines[i].split(" ")
            k = draw(st.integers(0, len(words) - 1))
            words[k] = draw(st.sampled_from(["", "[]", "{}", "-", ":", "null", "1", "true", "x", "[x]",
                                             "{hook: nope}", "'", "&a", "*a", "!!python/name:os.system"]))
            lines[i] = " ".join(words)
        elif kind == "indent":
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t"])) + lines[i].lstrip()
        elif kind == "value":
            key = lines[i].split(":", 1)[0]
            lines[i] = f"{key}: " + draw(st.sampled_from(["1", "-1", "0", "null", "[]", "{}", "true", "[1, 2]",
                                                          "{a: 1}", "'x'", "2.5", "[[]]", "[{}]"]))
        else:
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + draw(st.text(max_size=3)) + lines[i][pos:]
        if not lines:
            lines = [""]
    return "\n".join(lines)


def _compile(text: str) -> None:
    try:
        compile_spec(load_spec_text(text, "<fuzz>"), "<fuzz>")
    except SpecError:
        pass


@examples(400)
@given(text=st.one_of(st.text(max_size=300), mutated_spec()))
def test_spec_compiler_raises_only_spec_errors(text):
    _compile(text)


def test_spec_fuzz_baseline_compiles():
    # the unmutated specs compile, so mutations start from working input
    for path, text in zip(SPEC_FILES, SPEC_TEXTS):
        compile_spec(load_spec_text(text, path), path)
