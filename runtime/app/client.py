"""What every operator command shares: the connection and auth settings (flags and environment, declared
once in `Connection`), the gRPC channel, and printing server-supplied text safely.

Used by opcli.py (sessions, modes, policies) and receipt_cli.py (receipts, what-if); it imports neither.
"""
from __future__ import annotations

import argparse
import builtins
import dataclasses
import ipaddress
import os
import re
import sys

import grpc
from macp.v1 import core_pb2_grpc

from . import options
from .options import SWITCH, TEXT, option


@dataclasses.dataclass
class Connection:
    target: str = option(
        "MACP_TARGET", TEXT, "127.0.0.1:50051", flag="--target", metavar="HOST:PORT", section="client",
        help="server address")
    token: str = option(
        "MACP_TOKEN", TEXT, "operator", flag="--token", metavar="TOKEN", section="client",
        help="bearer token (in dev mode: the sender name); prefer `MACP_TOKEN` or `--token-file`: argv is "
             "visible to other users")
    token_file: str | None = option(
        "MACP_TOKEN_FILE", TEXT, None, flag="--token-file", metavar="FILE", section="client",
        help="read the bearer token from this file (its first line)")
    tls_ca: str | None = option(
        "MACP_TLS_CA_PATH", TEXT, None, flag="--tls-ca", metavar="PEM", section="client",
        help="PEM CA bundle: connect with TLS instead of plaintext")
    allow_plaintext_token: bool = option(
        "MACP_ALLOW_PLAINTEXT_TOKEN", SWITCH, False, flag="--allow-plaintext-token", section="client",
        help="send the token without TLS to a non-loopback target (refused otherwise)")


def add_connection(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("connection and auth (a flag wins over its variable)")
    options.add_flags(group, Connection)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--specs-dir", action="append", default=[], metavar="DIR",
                   help="extra spec directories, to decode payloads of user-defined modes")


def command(sub, name: str, help_text: str, example: str, func, session: bool = False) -> argparse.ArgumentParser:
    """A subcommand that talks to a server: the connection flags, --json, --specs-dir, an example; `session`:
    it names one session (the positional SESSION_ID)."""
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}\n",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    if session:
        p.add_argument("session_id", metavar="SESSION_ID", help="the session's id")
    add_connection(p)
    p.set_defaults(func=func)
    return p


def _is_loopback_target(target: str) -> bool:
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def connect(args):
    """(channel, stub) for the command's connection settings; sets `args.token` (from the file if one is given)."""
    conn, _problems, _warnings = options.read(Connection, os.environ, vars(args))   # text and a switch: no problems
    args.token = conn.token
    if conn.token_file:
        try:
            with open(conn.token_file, encoding="utf-8") as fh:
                args.token = fh.readline().strip()
        except OSError as exc:
            raise SystemExit(f"error: cannot read the token file {conn.token_file}: {exc.strerror}")
    if not conn.tls_ca and not conn.allow_plaintext_token and not _is_loopback_target(conn.target):
        raise SystemExit(f"error: refusing to send a bearer token in plaintext to {safe(conn.target)}: use --tls-ca, "
                         f"or --allow-plaintext-token (MACP_ALLOW_PLAINTEXT_TOKEN=1) if you mean it")
    if conn.tls_ca:
        with open(conn.tls_ca, "rb") as fh:
            channel = grpc.secure_channel(conn.target, grpc.ssl_channel_credentials(root_certificates=fh.read()))
    else:
        channel = grpc.insecure_channel(conn.target)
    return channel, core_pb2_grpc.MACPRuntimeServiceStub(channel)


def auth_metadata(args):
    return [("authorization", f"Bearer {args.token}")]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def safe(text) -> str:
    """A server-supplied string with control characters (terminal escapes, carriage returns) made visible."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 0x100
                        else f"\\u{ord(m.group(0)):04x}", str(text))


def print(*values, **kwargs) -> None:   # noqa: A001 - every line printed with it goes through safe()
    builtins.print(*(safe(v) for v in values), **kwargs)


def table(rows: list[list], header: list[str]) -> str:
    rows = [[safe(c).replace("\n", "\\n") for c in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def fail(exc: grpc.RpcError) -> int:
    print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
    return 1
