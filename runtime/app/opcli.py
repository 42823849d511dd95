"""Operator commands that talk to a running server over gRPC: sessions, modes, policies.

    macp-runtime sessions list | show ID | watch | tail ID
    macp-runtime modes list
    macp-runtime policies list

Output is a readable table by default and one JSON document (or one JSON line per event for the
streaming commands) with --json. Every command takes the same connection and auth options.
"""
from __future__ import annotations

import argparse
import base64
import builtins
import datetime
import ipaddress
import json
import os
import re
import sys

import grpc
from google.protobuf import json_format
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2, policy_pb2

STATE_NAMES = {v.number: v.name.replace("SESSION_STATE_", "") for v in envelope_pb2.SessionState.DESCRIPTOR.values}
EVENT_NAMES = {v.number: v.name.replace("EVENT_TYPE_", "")
               for v in core_pb2.SessionLifecycleEvent.EventType.DESCRIPTOR.values}

CONNECTION_HELP = """connection and auth (also from the environment):
  --target      MACP_TARGET        server address, default 127.0.0.1:50051
  --token       MACP_TOKEN         bearer token (in dev mode: the sender name), default "operator";
                                   prefer MACP_TOKEN or --token-file: argv is visible to other users
  --token-file  MACP_TOKEN_FILE    read the bearer token from this file (first line)
  --tls-ca      MACP_TLS_CA_PATH   PEM CA bundle: connect with TLS instead of plaintext
  --allow-plaintext-token  MACP_ALLOW_PLAINTEXT_TOKEN=1
                                   send the token without TLS to a non-loopback target (refused otherwise)
"""


def _add_connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=os.environ.get("MACP_TARGET", "127.0.0.1:50051"), help=argparse.SUPPRESS)
    p.add_argument("--token", default=os.environ.get("MACP_TOKEN", "operator"), help=argparse.SUPPRESS)
    p.add_argument("--token-file", default=os.environ.get("MACP_TOKEN_FILE"), help=argparse.SUPPRESS)
    p.add_argument("--tls-ca", default=os.environ.get("MACP_TLS_CA_PATH"), help=argparse.SUPPRESS)
    p.add_argument("--allow-plaintext-token", action="store_true",
                   default=os.environ.get("MACP_ALLOW_PLAINTEXT_TOKEN") == "1", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--specs-dir", action="append", default=[], metavar="DIR",
                   help="extra spec directories, to decode payloads of user-defined modes")


def _cmd(sub, name: str, help_text: str, example: str, func) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text,
                       epilog=f"example:\n  {example}\n\n{CONNECTION_HELP}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_connection(p)
    p.set_defaults(func=func)
    return p


def register(sub) -> None:
    sessions = sub.add_parser("sessions", help="inspect sessions on a running server",
                              description="Inspect the sessions of a running server over gRPC.")
    ssub = sessions.add_subparsers(dest="action", metavar="ACTION", required=True)
    _cmd(ssub, "list", "list the sessions the server holds in memory",
         "macp-runtime sessions list --target 127.0.0.1:50051", sessions_list)
    p = _cmd(ssub, "show", "one session's metadata and its accepted history, payloads decoded",
             "macp-runtime sessions show 0b6e…-… --token alice", sessions_show)
    p.add_argument("session_id")
    p.add_argument("--idle", type=float, default=0.5, help="stop reading history after this many idle seconds")
    _cmd(ssub, "watch", "follow session lifecycle events (created, resolved, expired, ...) until Ctrl-C",
         "macp-runtime sessions watch --json", sessions_watch)
    p = _cmd(ssub, "tail", "follow one session's envelopes live (passive subscribe), payloads decoded",
             "macp-runtime sessions tail 0b6e…-… --after 0 --token alice", sessions_tail)
    p.add_argument("session_id")
    p.add_argument("--after", type=int, default=0, help="replay history from this log index first (default 0)")

    modes = sub.add_parser("modes", help="list the modes a running server serves")
    msub = modes.add_subparsers(dest="action", metavar="ACTION", required=True)
    _cmd(msub, "list", "list standard and extension modes with their descriptors",
         "macp-runtime modes list --json", modes_list)

    policies = sub.add_parser("policies", help="list governance policies of a running server")
    psub = policies.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = _cmd(psub, "list", "list registered governance policies (optionally for one mode)",
             "macp-runtime policies list --mode macp.mode.decision.v1", policies_list)
    p.add_argument("--mode", default="", help="only policies for this mode (and `*` policies)")

    from .receipt_cli import register as register_receipts  # sessions receipt, policies what-if, receipts

    register_receipts(sub, ssub, psub)


# --- plumbing ----------------------------------------------------------------------------------------

def _is_loopback_target(target: str) -> bool:
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _stub(args):
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as fh:
                args.token = fh.readline().strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read the token file {args.token_file}: {exc.strerror}")
    if not args.tls_ca and not args.allow_plaintext_token and not _is_loopback_target(args.target):
        raise SystemExit(f"error: refusing to send a bearer token in plaintext to {_safe(args.target)}: use --tls-ca, "
                         f"or --allow-plaintext-token (MACP_ALLOW_PLAINTEXT_TOKEN=1) if you mean it")
    if args.tls_ca:
        with open(args.tls_ca, "rb") as fh:
            channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(root_certificates=fh.read()))
    else:
        channel = grpc.insecure_channel(args.target)
    return channel, core_pb2_grpc.MACPRuntimeServiceStub(channel)


def _md(args):
    return [("authorization", f"Bearer {args.token}")]


def _when(ms: int) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _safe(text) -> str:
    """A server-supplied string with control characters (terminal escapes, carriage returns) made visible."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 0x100
                        else f"\\u{ord(m.group(0)):04x}", str(text))


def print(*values, **kwargs) -> None:   # noqa: A001 - every line this module prints goes through _safe
    builtins.print(*(_safe(v) for v in values), **kwargs)


def _table(rows: list[list[str]], header: list[str]) -> str:
    rows = [[_safe(c).replace("\n", "\\n") for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


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


def _fail(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1


# --- commands ----------------------------------------------------------------------------------------

def sessions_list(args) -> int:
    channel, stub = _stub(args)
    try:
        sessions = list(stub.ListSessions(core_pb2.ListSessionsRequest(), metadata=_md(args), timeout=30).sessions)
    except grpc.RpcError as exc:
        return _fail(exc)
    finally:
        channel.close()
    sessions.sort(key=lambda m: m.started_at_unix_ms)
    if args.json:
        print(json.dumps([_meta_dict(m) for m in sessions], indent=2, sort_keys=True))
        return 0
    rows = [[m.session_id, m.mode, STATE_NAMES.get(m.state, m.state), m.initiator, len(m.participants),
             _when(m.started_at_unix_ms), _when(m.expires_at_unix_ms)] for m in sessions]
    print(_table(rows, ["SESSION", "MODE", "STATE", "INITIATOR", "PARTICIPANTS", "STARTED (UTC)", "EXPIRES (UTC)"]))
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

    return stub.StreamSession(gen(), metadata=_md(args)), done


def sessions_show(args) -> int:
    import threading

    channel, stub = _stub(args)
    decoder = _Decoder(args.specs_dir)
    try:
        meta = stub.GetSession(core_pb2.GetSessionRequest(session_id=args.session_id), metadata=_md(args),
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
                return _fail(exc)
        finally:
            if timer:
                timer.cancel()
            done.set()
    except grpc.RpcError as exc:
        return _fail(exc)
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


def sessions_watch(args) -> int:
    channel, stub = _stub(args)
    try:
        for resp in stub.WatchSessions(core_pb2.WatchSessionsRequest(), metadata=_md(args)):
            ev = resp.event
            name = EVENT_NAMES.get(ev.event_type, str(ev.event_type))
            if args.json:
                print(json.dumps({"event": name, "observed_at_unix_ms": ev.observed_at_unix_ms,
                                  "session": _meta_dict(ev.session)}, sort_keys=True), flush=True)
            else:
                s = ev.session
                print(f"{_when(ev.observed_at_unix_ms)}  {name:<9} {s.session_id}  {s.mode}  "
                      f"{STATE_NAMES.get(s.state, s.state)}", flush=True)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return 0
        return _fail(exc)
    except KeyboardInterrupt:
        return 0
    finally:
        channel.close()
    return 0


def sessions_tail(args) -> int:
    channel, stub = _stub(args)
    decoder = _Decoder(args.specs_dir)
    call, done = _subscribe(stub, args, args.session_id, args.after)
    try:
        for resp in call:
            if resp.HasField("error"):
                print(f"error: {resp.error.message}", file=sys.stderr)
                return 1
            _print_envelope(_envelope_dict(resp.envelope, decoder), args.json)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return 0
        return _fail(exc)
    except KeyboardInterrupt:
        return 0
    finally:
        done.set()
        channel.close()
    return 0


def modes_list(args) -> int:
    channel, stub = _stub(args)
    try:
        standard = list(stub.ListModes(core_pb2.ListModesRequest(), timeout=30).modes)
        try:
            ext = list(stub.ListExtModes(core_pb2.ListExtModesRequest(), timeout=30).modes)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            ext = []
    except grpc.RpcError as exc:
        return _fail(exc)
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
    print(_table(rows, ["MODE", "VERSION", "KIND", "TITLE", "MESSAGE TYPES"]))
    return 0


def policies_list(args) -> int:
    channel, stub = _stub(args)
    try:
        descriptors = list(stub.ListPolicies(policy_pb2.ListPoliciesRequest(mode=args.mode), metadata=_md(args),
                                             timeout=30).descriptors)
    except grpc.RpcError as exc:
        return _fail(exc)
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
    print(_table(rows, ["POLICY", "MODE", "SCHEMA", "DESCRIPTION"]))
    return 0
