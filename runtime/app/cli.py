"""`macp-runtime` command line."""
from __future__ import annotations

import argparse
import logging
import sys

from .config import ConfigError, from_env


def _serve_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="run the MACP gRPC server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the MACP runtime daemon (service macp.v1.MACPRuntimeService).\n\n"
                    "Every flag has an environment variable of the same meaning; a flag wins over its variable.",
        epilog="examples:\n"
               "  MACP_ALLOW_INSECURE=1 macp-runtime serve                 # dev: plaintext, dev auth, .macp-data\n"
               "  macp-runtime serve --allow-insecure --memory-only        # nothing written to disk\n"
               "  macp-runtime serve --tls-cert cert.pem --tls-key key.pem --bind 0.0.0.0:50051\n"
               "  macp-runtime serve --allow-insecure --storage-backend postgres "
               "--database-url postgresql://macp@127.0.0.1/macp\n")
    p.add_argument("--bind", dest="bind_addr", metavar="IP:PORT",
                   help="listen address, an IP literal and port (MACP_BIND_ADDR, default 127.0.0.1:50051)")
    p.add_argument("--allow-insecure", dest="allow_insecure", action="store_const", const=True,
                   help="serve plaintext when no TLS cert/key is given (MACP_ALLOW_INSECURE=1)")
    p.add_argument("--tls-cert", dest="tls_cert_path", metavar="PEM", help="server certificate (MACP_TLS_CERT_PATH)")
    p.add_argument("--tls-key", dest="tls_key_path", metavar="PEM", help="server private key (MACP_TLS_KEY_PATH)")
    p.add_argument("--data-dir", dest="data_dir", metavar="DIR",
                   help="where the durable log lives (MACP_DATA_DIR, default .macp-data)")
    p.add_argument("--memory-only", dest="memory_only", action="store_const", const=True,
                   help="keep everything in memory; nothing survives a restart (MACP_MEMORY_ONLY=1)")
    p.add_argument("--storage-backend", dest="storage_backend", choices=["file", "postgres"],
                   help="where sessions and registries live: the embedded log (file) or a PostgreSQL "
                        "database shared by several instances (MACP_STORAGE_BACKEND, default file)")
    p.add_argument("--database-url", dest="database_url", metavar="URL",
                   help="PostgreSQL database of the postgres backend, e.g. postgresql://macp@127.0.0.1/macp "
                        "(MACP_DATABASE_URL)")
    p.add_argument("--database-pool-size", dest="database_pool_size", type=int, metavar="N",
                   help="PostgreSQL connections per instance (MACP_DATABASE_POOL_SIZE, default 10)")
    p.add_argument("--strict-recovery", dest="strict_recovery", action="store_const", const=True,
                   help="refuse to start when any stored session fails to replay (MACP_STRICT_RECOVERY=1)")
    p.add_argument("--checkpoint-interval", dest="checkpoint_interval", type=int, metavar="N",
                   help="checkpoint an open session every N log entries so a restart replays less "
                        "(MACP_CHECKPOINT_INTERVAL, default 0 = only terminal checkpoints)")
    p.add_argument("--wal-segment-bytes", dest="wal_segment_bytes", type=int, metavar="N",
                   help="file backend: start a new log segment once one reaches N bytes "
                        "(MACP_WAL_SEGMENT_BYTES, default 67108864)")
    p.add_argument("--compact-dead-ratio", dest="compact_dead_ratio", type=float, metavar="R",
                   help="file backend: rewrite a sealed log segment once this share of its records is "
                        "covered by later checkpoints (MACP_COMPACT_DEAD_RATIO, default 0.5; 0 = never)")
    p.add_argument("--history-retention", dest="history_retention_secs", type=float, metavar="SECS",
                   help="file backend: keep a terminal session's whole history this long after it ended, so "
                        "WhatIfReplay can replay it (MACP_HISTORY_RETENTION_SECS, default 0: compaction may drop "
                        "it; MACP_COMPACT_DEAD_RATIO=0 keeps every history)")
    p.add_argument("--max-payload-bytes", dest="max_payload_bytes", type=int, metavar="N",
                   help="largest envelope payload accepted (MACP_MAX_PAYLOAD_BYTES, default 1048576)")
    p.add_argument("--session-start-limit", dest="session_start_limit_per_minute", type=int, metavar="N",
                   help="SessionStarts per sender per minute (MACP_SESSION_START_LIMIT_PER_MINUTE, default 60)")
    p.add_argument("--message-limit", dest="message_limit_per_minute", type=int, metavar="N",
                   help="other messages per sender per minute (MACP_MESSAGE_LIMIT_PER_MINUTE, default 600)")
    p.add_argument("--specs-dir", dest="specs_dirs", action="append", metavar="DIR",
                   help="extra directory of mode specs (*.yaml), repeatable (MACP_SPECS_DIR, ':'-separated)")
    p.add_argument("--workers", dest="workers", type=int, metavar="N",
                   help="threads for kernel calls that wait on storage (durable appends, PostgreSQL); "
                        "the RPCs themselves run on one asyncio loop (MACP_WORKERS, default 64)")
    p.add_argument("--max-streams", dest="max_streams", type=int, metavar="N",
                   help="open streams (StreamSession and Watch*) at most; a stream is a coroutine, "
                        "not a thread (MACP_MAX_STREAMS, default 10000)")
    p.add_argument("--max-streams-per-identity", dest="max_streams_per_identity", type=int, metavar="N",
                   help="open streams one identity may hold (MACP_MAX_STREAMS_PER_IDENTITY, default 0 = half "
                        "of --max-streams)")
    p.add_argument("--dev-mode-allow-remote", dest="dev_mode_allow_remote", action="store_const", const=True,
                   help="allow dev-mode auth (no MACP_AUTH_* set) on a non-loopback bind address "
                        "(MACP_DEV_MODE_ALLOW_REMOTE=1); anyone who can connect may then act as anyone")
    p.add_argument("--max-name-length", dest="max_name_length", type=int, metavar="N",
                   help="longest session id, message id, mode, message type, sender, policy or mode id accepted "
                        "(MACP_MAX_NAME_LENGTH, default 256 characters)")
    p.add_argument("--max-reason-bytes", dest="max_reason_bytes", type=int, metavar="N",
                   help="longest Cancel/Suspend/Resume reason accepted (MACP_MAX_REASON_BYTES, default 4096)")
    p.add_argument("--clock-skew-ms", dest="clock_skew_ms", type=int, metavar="MS",
                   help="how far an envelope timestamp may move a session deadline away from the server's "
                        "receive time (MACP_CLOCK_SKEW_MS, default 30000)")
    p.add_argument("--cleanup-interval", dest="cleanup_interval_secs", type=float, metavar="SECS",
                   help="period of the TTL sweep and eviction pass (MACP_CLEANUP_INTERVAL_SECS, default 60)")
    p.add_argument("--session-retention", dest="session_retention_secs", type=float, metavar="SECS",
                   help="resolved/expired sessions older than this (from their start) leave memory "
                        "(MACP_SESSION_RETENTION_SECS, default 3600)")
    p.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (MACP_LOG_LEVEL, default info)")
    p.add_argument("--reflection", dest="reflection", action=argparse.BooleanOptionalAction, default=None,
                   help="gRPC server reflection for grpcurl (MACP_REFLECTION=1/0; default: on in dev-mode auth only)")
    p.add_argument("--metrics-addr", dest="metrics_addr", metavar="IP:PORT",
                   help="serve Prometheus metrics over HTTP on this address (MACP_METRICS_ADDR; default off)")
    p.add_argument("--console-addr", dest="console_addr", metavar="IP:PORT",
                   help="serve the read-only browser console on this address, e.g. 127.0.0.1:50080 "
                        "(MACP_CONSOLE_ADDR; default off)")
    p.add_argument("--log-json", dest="log_json", action="store_const", const=True,
                   help="one JSON object per log line (MACP_LOG_FORMAT=json)")
    p.add_argument("--protocol-profile", dest="protocol_profile", choices=["current", "v0.4.0"],
                   help="protocol line to speak: current (what macp-sdk-python 0.22 expects) or v0.4.0 "
                        "(the Rust reference v0.4.0, exactly) (MACP_PROTOCOL_PROFILE, default current)")
    p.add_argument("--receipt-signing-key-file", dest="receipt_signing_key_file", metavar="FILE",
                   help="Ed25519 key that signs decision receipts: PKCS#8 PEM or a base64 32-byte seed "
                        "(MACP_RECEIPT_SIGNING_KEY_FILE; MACP_RECEIPT_SIGNING_KEY holds the seed inline; "
                        "default: a key generated at first start and kept with the data)")
    p.add_argument("--receipt-key-id", dest="receipt_key_id", metavar="KID",
                   help="kid of the configured receipt key (MACP_RECEIPT_KEY_ID, default its JWK thumbprint)")
    p.add_argument("--receipt-issuer", dest="receipt_issuer", metavar="TEXT",
                   help="issuer member of decision receipts (MACP_RECEIPT_ISSUER, default runtime:macp-runtime)")


def _docs_parser(sub) -> None:
    p = sub.add_parser(
        "docs", help="generate Markdown documentation of every mode from its spec",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render one Markdown page per mode (descriptor, roles, who may send what in which phase, "
                    "checks and their error codes, payload fields, policy rules, a Mermaid state diagram) "
                    "and an index, from the built-in specs plus any --specs-dir.",
        epilog="examples:\n"
               "  macp-runtime docs --out docs/modes            # what the repository commits\n"
               "  macp-runtime docs --specs-dir my-modes --out /tmp/mode-docs --svg\n")
    p.add_argument("--out", default="docs/modes", metavar="DIR", help="output directory (default docs/modes)")
    p.add_argument("--specs-dir", dest="specs_dirs", action="append", default=[], metavar="DIR",
                   help="extra directory of mode specs, repeatable")
    p.add_argument("--svg", action="store_true",
                   help="also write an SVG diagram per mode (needs Graphviz `dot`; without it: exit 1, nothing written)")
    p.add_argument("--reference-out", metavar="DIR",
                   help="where the format reference goes: spec-format.md, hooks.md, spec-schema.json "
                        "(default: the parent of --out when it is a folder named modes, as docs/ for docs/modes; "
                        "else --out itself)")


def _run_docs(args) -> int:
    import os

    from ..codegen import SpecError, load_modes
    from ..codegen.docs import GraphvizMissing, write

    try:
        modes = load_modes(args.specs_dirs)
    except SpecError as exc:
        for problem in getattr(exc, "errors", [exc]):
            print(f"error: {problem}", file=sys.stderr)
        return 1
    out = os.path.abspath(args.out)
    reference = args.reference_out or (os.path.dirname(out) if os.path.basename(out) == "modes" else out)
    try:
        paths = write(modes, args.out, svg=args.svg, reference_dir=reference)
    except GraphvizMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _check_parser(sub) -> None:
    p = sub.add_parser(
        "check", help="validate mode specs without starting the server",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile each spec and report every problem of every file, as FILE:LINE: LEVEL: KEY.PATH: "
                    "MESSAGE with the known alternatives and the nearest name: YAML errors, the structure of "
                    "docs/spec-schema.json (unknown keys, wrong types), unknown phases, message types, roles and "
                    "hooks, hooks used where they cannot be, missing/unknown/mistyped hook parameters, payload "
                    "fields a described JSON payload lacks, message types without payload bindings, unreachable "
                    "phases, commit conditions that can never hold; warns when a spec overrides a built-in mode. "
                    "Exit status 1 when any error is found (or any warning with --strict), else 0.",
        epilog="examples:\n"
               "  macp-runtime check                          # the built-in specs\n"
               "  macp-runtime check my-modes/ review.yaml    # files and directories\n")
    p.add_argument("paths", nargs="*", metavar="PATH", help="spec files or directories (default: the built-in specs)")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors")


def _run_check(args) -> int:
    from ..codegen.lint import lint_paths
    from ..specs import SPECS_DIR

    findings, count = lint_paths(args.paths or [SPECS_DIR])
    for f in findings:
        print(f)
    errors = sum(1 for f in findings if f.level == "error")
    warnings = len(findings) - errors
    print(f"{count} spec(s) checked: {errors} error(s), {warnings} warning(s)")
    if count == 0:
        print("no spec files found", file=sys.stderr)
        return 1
    return 1 if errors or (args.strict and warnings) else 0


def _hooks_parser(sub) -> None:
    p = sub.add_parser(
        "hooks", help="list the hooks a mode spec can name, with their parameters",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Print the hook catalogue: each hook's name as a spec writes it, where it may be used "
                    "(guard, effect, when, ready, role, start, state, ...), its parameters with their types, "
                    "and what it checks. Without MODULE: the generic and common hooks, the ones YAML-only "
                    "specs use.",
        epilog="examples:\n"
               "  macp-runtime hooks                 # generic + common\n"
               "  macp-runtime hooks decision task   # the hooks of built-in modes\n"
               "  macp-runtime hooks --all --json\n")
    p.add_argument("modules", nargs="*", metavar="MODULE", help="hook modules to list")
    p.add_argument("--all", action="store_true", help="every built-in hook module")
    p.add_argument("--json", action="store_true", help="JSON instead of text")


def _run_hooks(args) -> int:
    import json

    from ..codegen.catalogue import all_modules, catalogue, format_text

    known = all_modules()
    unknown = [m for m in args.modules if m not in known]
    if unknown:
        print(f"unknown hook module(s) {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    entries = catalogue(known if args.all else args.modules or None)
    print(json.dumps(entries, indent=2, default=str) if args.json else format_text(entries))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="macp-runtime",
        description="MACP runtime for Python: coordination modes declared in YAML, one generic session engine.")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"macp-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _docs_parser(sub)
    _check_parser(sub)
    _hooks_parser(sub)
    from .opcli import register

    register(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "docs":
        return _run_docs(args)
    if args.command == "check":
        return _run_check(args)
    if args.command == "hooks":
        return _run_hooks(args)
    if hasattr(args, "func"):   # operator commands (sessions, modes, policies)
        return args.func(args)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}
    try:
        cfg = from_env(overrides=overrides)
    except ConfigError as exc:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for problem in exc.problems:
            logging.getLogger("macp_runtime").error("configuration: %s", problem)
        return 1
    from ..vocabulary.logs import configure

    configure(cfg.log_level, cfg.log_json)
    if cfg.policies_dry_run:
        from ..registries.policy_admission import dry_run
        from ..registries.profile import get

        return dry_run(cfg.policies_dir, get(cfg.protocol_profile))
    from .server import serve

    return serve(cfg)
