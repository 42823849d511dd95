"""Operator commands that talk to a running server over gRPC: sessions, modes, policies.

    macp-runtime sessions list | show ID | watch | tail ID
    macp-runtime modes list
    macp-runtime policies list

Output is a readable table by default and one JSON document (or one JSON line per event for the
streaming commands) with --json. Every command takes the same connection and auth options (client.py).
"""
from __future__ import annotations

import base64
import datetime
import json
import sys

import grpc
from google.protobuf import json_format
from macp.v1 import core_pb2, envelope_pb2, policy_pb2

from .client import auth_metadata, command, connect, fail, print, table

STATE_NAMES = {v.number: v.name.replace("SESSION_STATE_", "") for v in envelope_pb2.SessionState.DESCRIPTOR.values}
EVENT_NAMES = {v.number: v.name.replace("EVENT_TYPE_", "")
               for v in core_pb2.SessionLifecycleEvent.EventType.DESCRIPTOR.values}

def register(sub) -> None:
    sessions = sub.add_parser("sessions", help="inspect sessions on a running server",
                              description="Inspect the sessions of a running server over gRPC.")
    ssub = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    command(ssub, "list", "list the sessions the server holds in memory",
            "macp-runtime sessions list --target 127.0.0.1:50051", sessions_list)
    p = command(ssub, "show", "one session's metadata and its accepted history, payloads decoded",
                "macp-runtime sessions show 0b6e…-… --token alice", sessions_show, session=True)
    p.add_argument("--idle", type=float, default=0.5, help="stop reading history after this many idle seconds")
    command(ssub, "watch", "follow session lifecycle events (created, resolved, expired, ...) until Ctrl-C",
            "macp-runtime sessions watch --json", sessions_watch)
    p = command(ssub, "tail", "follow one session's envelopes live (passive subscribe), payloads decoded",
                "macp-runtime sessions tail 0b6e…-… --after 0 --token alice", sessions_tail, session=True)
    p.add_argument("--after", type=int, default=0, help="replay history from this log index first (default 0)")

    modes = sub.add_parser("modes", help="list the modes a running server serves",
                           description="List the modes a running server serves, over gRPC.")
    msub = modes.add_subparsers(dest="action", metavar="ACTION", required=True)
    command(msub, "list", "list standard and extension modes with their descriptors",
            "macp-runtime modes list --json", modes_list)

    policies = sub.add_parser("policies", help="list governance policies of a running server; re-judge under one",
                              description="Governance policies of a running server, over gRPC: list them, or "
                                          "re-judge a session's history under another (what-if).")
    psub = policies.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command(psub, "list", "list registered governance policies (optionally for one mode)",
                "macp-runtime policies list --mode macp.mode.decision.v1", policies_list)
    p.add_argument("--mode", default="", help="only policies for this mode (and `*` policies)")

    from .receipt_cli import register as register_receipts  # sessions receipt, policies what-if, receipts

    register_receipts(sub, ssub, psub)


# --- plumbing ----------------------------------------------------------------------------------------

def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _meta_dict(m) -> dict:
    d = json_format.MessageToDict(m, preserving_proto_field_name=True)
    d["state"] = STATE_NAMES.get(m.state, str(m.state))
    return d


class _Decoder:
    """Decodes envelope payloads with the local copies of the mode specs."""

    def __init__(self, specs_dirs):
        self._modes = None
        self._dirs = specs_dirs

    def decode(self, env) -> object:
        if env.message_type == "SessionStart":
            return json_format.MessageToDict(core_pb2.SessionStartPayload.FromString(env.payload),
                                             preserving_proto_field_name=True)
        if self._modes is None:
            from ..codegen import load_modes

            try:
                self._modes = {m.name: m for m in load_modes(self._dirs)}
            except Exception:  # decoding is a convenience; never fail the command for it
                self._modes = {}
        mode = self._modes.get(env.mode)
        binding = mode.payloads.get(env.message_type) if mode else None
        try:
            if binding is not None:
                value = binding.decode(env.payload)
                if hasattr(value, "DESCRIPTOR"):
                    return json_format.MessageToDict(value, preserving_proto_field_name=True)
                if isinstance(value, (dict, list, str, int, float)):
                    return value
        except Exception:
            pass
        try:
            return json.loads(env.payload.decode("utf-8"))
        except Exception:
            return {"base64": base64.b64encode(env.payload).decode()}


def _envelope_dict(env, decoder: _Decoder) -> dict:
    return {"message_id": env.message_id, "message_type": env.message_type, "sender": env.sender,
            "timestamp_unix_ms": env.timestamp_unix_ms, "payload": decoder.decode(env)}


def _print_envelope(d: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(d, sort_keys=True), flush=True)
    else:
        payload = json.dumps(d["payload"], sort_keys=True)
        print(f"{_when(d['timestamp_unix_ms'])}  {d['sender']:<16} {d['message_type']:<16} {payload}", flush=True)


# --- commands ----------------------------------------------------------------------------------------

def sessions_list(args) -> int:
    channel, stub = connect(args)
    try:
        sessions = list(stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=auth_metadata(args), timeout=30).sessions)
    except grpc.RpcError as exc:
        return fail(exc)
    finally:
        channel.close()
    sessions.sort(key=lambda m: m.started_at_unix_ms)
    if args.json:
        print(json.dumps([_meta_dict(m) for m in sessions], indent=2, sort_keys=True))
        return 0
    rows = [[m.session_id, m.mode, STATE_NAMES.get(m.state, m.state), m.initiator, len(m.participants),
             _when(m.started_at_unix_ms), _when(m.expires_at_unix_ms)] for m in sessions]
    print(table(rows, ["SESSION", "MODE", "STATE", "INITIATOR", "PARTICIPANTS", "STARTED (UTC)", "EXPIRES (UTC)"]))
    print(f"{len(sessions)} session(s)")
    return 0


def _subscribe(stub, args, session_id: str, after: int):
    import queue
    import threading

    requests: queue.Queue = queue.Queue()
    requests.put(core_pb2.StreamSessionRequest(subscribe_session_id=session_id, after_sequence=after))
    done = threading.Event()

    def gen():
        yield requests.get()
        done.wait()  # keep the request side open: a passive observer must not half-close

    return stub.StreamSession(gen(), metadata=auth_metadata(args)), done


def sessions_show(args) -> int:
    import threading

    channel, stub = connect(args)
    decoder = _Decoder(args.specs_dir)
    try:
        meta = stub.GetSession(core_pb2.GetSessionRequest(session_id=args.session_id), metadata=auth_metadata(args),
                               timeout=30).metadata
        call, done = _subscribe(stub, args, args.session_id, 0)
        history, errors = [], []
        timer = None

        def stop():
            call.cancel()

        try:
            timer = threading.Timer(args.idle, stop)
            timer.start()
            for resp in call:
                timer.cancel()
                if resp.HasField("error"):
                    errors.append(resp.error.message)
                    break
                history.append(_envelope_dict(resp.envelope, decoder))
                timer = threading.Timer(args.idle, stop)
                timer.start()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                return fail(exc)
        finally:
            if timer:
                timer.cancel()
            done.set()
    except grpc.RpcError as exc:
        return fail(exc)
    finally:
        channel.close()
    if errors:
        print(f"error: {errors[0]}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"metadata": _meta_dict(meta), "history": history}, indent=2, sort_keys=True))
        return 0
    print(f"session      {meta.session_id}\nmode         {meta.mode} {meta.mode_version}\n"
          f"state        {STATE_NAMES.get(meta.state, meta.state)}\ninitiator    {meta.initiator}\n"
          f"participants {', '.join(meta.participants)}\npolicy       {meta.policy_version}\n"
          f"started      {_when(meta.started_at_unix_ms)} UTC\nexpires      {_when(meta.expires_at_unix_ms)} UTC")
    if meta.participant_activity:
        print("activity     " + ", ".join(f"{a.participant_id}: {a.message_count}"
                                          for a in meta.participant_activity))
    print(f"\nhistory ({len(history)} envelope(s)):")
    for d in history:
        _print_envelope(d, False)
    return 0


def _streamed(channel, follow, *cleanup) -> int:
    """Run a command that follows a stream: Ctrl-C or a cancelled call ends it with 0, another gRPC error
    with 1; then `cleanup` and the channel close."""
    try:
        return follow()
    except grpc.RpcError as exc:
        return 0 if exc.code() == grpc.StatusCode.CANCELLED else fail(exc)
    except KeyboardInterrupt:
        return 0
    finally:
        for step in cleanup:
            step()
        channel.close()


def sessions_watch(args) -> int:
    channel, stub = connect(args)

    def follow() -> int:
        for resp in stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=auth_metadata(args)):
            ev = resp.event
            name = EVENT_NAMES.get(ev.event_type, str(ev.event_type))
            if args.json:
                print(json.dumps({"event": name, "observed_at_unix_ms": ev.observed_at_unix_ms,
                                  "session": _meta_dict(ev.session)}, sort_keys=True), flush=True)
            else:
                s = ev.session
                print(f"{_when(ev.observed_at_unix_ms)}  {name:<9} {s.session_id}  {s.mode}  "
                      f"{STATE_NAMES.get(s.state, s.state)}", flush=True)
        return 0

    return _streamed(channel, follow)


def sessions_tail(args) -> int:
    channel, stub = connect(args)
    decoder = _Decoder(args.specs_dir)
    call, done = _subscribe(stub, args, args.session_id, args.after)

    def follow() -> int:
        for resp in call:
            if resp.HasField("error"):
                print(f"error: {resp.error.message}", file=sys.stderr)
                return 1
            _print_envelope(_envelope_dict(resp.envelope, decoder), args.json)
        return 0

    return _streamed(channel, follow, done.set)


def modes_list(args) -> int:
    channel, stub = connect(args)
    try:
        standard = list(stub.ListModes(core_pb2.ListModesRequest(), timeout=30).modes)
        try:
            ext = list(stub.ListExtModes(core_pb2.ListExtModesRequest(), timeout=30).modes)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            ext = []
    except grpc.RpcError as exc:
        return fail(exc)
    finally:
        channel.close()
    if args.json:
        print(json.dumps({"standard": [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in standard],
                          "extensions": [json_format.MessageToDict(m, preserving_proto_field_name=True) for m in ext]},
                         indent=2, sort_keys=True))
        return 0
    rows = [[m.mode, m.mode_version, "standard" if i < len(standard) else "extension", m.title,
             ", ".join(t for t in m.message_types if t != "SessionStart")]
            for i, m in enumerate(standard + ext)]
    print(table(rows, ["MODE", "VERSION", "KIND", "TITLE", "MESSAGE TYPES"]))
    return 0


def policies_list(args) -> int:
    channel, stub = connect(args)
    try:
        descriptors = list(stub.ListPolicies(policy_pb2.ListPoliciesRequest(mode=args.mode), metadata=auth_metadata(args),
                                             timeout=30).descriptors)
    except grpc.RpcError as exc:
        return fail(exc)
    finally:
        channel.close()
    if args.json:
        out = []
        for d in descriptors:
            item = json_format.MessageToDict(d, preserving_proto_field_name=True)
            item["rules"] = json.loads(d.rules or "{}")
            out.append(item)
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    rows = [[d.policy_id, d.mode, d.schema_version, d.description] for d in descriptors]
    print(table(rows, ["POLICY", "MODE", "SCHEMA", "DESCRIPTION"]))
    return 0
