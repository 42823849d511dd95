"""`macp-runtime` command line."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap

from . import options
from .config import Config, ConfigError, from_env

HELP_WIDTH = 100   # columns of --help's descriptions


def _command(sub, name: str, help_text: str, description: str, examples: list[str], more: str = ""):
    """A subcommand whose --help shows its description (paragraphs wrapped), examples and `more` as written."""
    text = "\n\n".join(textwrap.fill(" ".join(par.split()), HELP_WIDTH) for par in description.split("\n\n"))
    epilog = "examples:\n" + "".join(f"  {line}\n" for line in examples) + (f"\n{more}" if more else "")
    return sub.add_parser(name, help=help_text, description=text, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _serve_parser(sub) -> None:
    p = _command(
        sub, "serve", "run the MACP gRPC server",
        "Run the MACP runtime daemon (service macp.v1.MACPRuntimeService).\n\n"
        "Every flag has an environment variable of the same meaning; a flag wins over its variable. Some "
        "settings are environment variables only (listed after the examples). `macp-runtime config` shows what "
        "the environment comes to.",
        ["MACP_ALLOW_INSECURE=1 macp-runtime serve                 # dev: plaintext, dev auth, .macp-data",
         "macp-runtime serve --allow-insecure --memory-only        # nothing written to disk",
         "macp-runtime serve --tls-cert cert.pem --tls-key key.pem --bind 0.0.0.0:50051",
         "macp-runtime serve --allow-insecure --storage-backend postgres --database-url postgresql://macp@127.0.0.1/macp"],
        "environment only (auth: see the README's Authentication and TLS):\n"
        + options.environment_only(Config, HELP_WIDTH))
    options.add_flags(p, Config)


def _config_parser(sub) -> None:
    p = _command(
        sub, "config", "show the configuration the environment gives `serve`, or the settings as Markdown",
        "Without options: read the MACP_* variables as `serve` would and print every setting with its value "
        "(secrets masked) and where it came from; exit status 1, with every problem, when `serve` would refuse "
        "them.\n\n"
        "With --markdown: the README's tables of every setting (variable, flag, default, meaning), between the "
        "markers the README keeps them in (scripts/readme-options rewrites them).",
        ["MACP_MEMORY_ONLY=1 macp-runtime config", "macp-runtime config --markdown"])
    p.add_argument("--markdown", action="store_true", help="print the README tables of the settings instead")


def markdown_tables() -> str:
    """Every README table of settings: the daemon's (Configuration, Authentication) and the operator commands'."""
    from .client import Connection

    return "\n\n".join(options.markdown(cls, section) for cls in (Config, Connection)
                        for section in options.sections(cls))


def _run_config(args) -> int:
    if args.markdown:
        print(markdown_tables())
        return 0
    try:
        cfg = from_env()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    import os

    shown = cfg.describe()
    rows = [("VARIABLE", "FLAG", "VALUE", "FROM")]
    rows += [(opt.env, opt.flag or "-", json.dumps(shown[opt.field]),
             "environment" if opt.env in os.environ else "default") for opt in options.declared(Config)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    for warning in cfg.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _docs_parser(sub) -> None:
    p = _command(
        sub, "docs", "generate Markdown documentation of every mode from its spec",
        "Render one Markdown page per mode (descriptor, roles, who may send what in which phase, checks and "
        "their error codes, payload fields, policy rules, a Mermaid state diagram) and an index, from the "
        "built-in specs plus any --specs-dir.",
        ["macp-runtime docs --out docs/modes            # what the repository commits",
         "macp-runtime docs --specs-dir my-modes --out /tmp/mode-docs --svg"])
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
    p = _command(
        sub, "check", "validate mode specs without starting the server",
        "Compile each spec and report every problem of every file, as FILE:LINE: LEVEL: KEY.PATH: MESSAGE with "
        "the known alternatives and the nearest name: YAML errors, the structure of docs/spec-schema.json "
        "(unknown keys, wrong types), unknown phases, message types, roles and hooks, hooks used where they "
        "cannot be, missing/unknown/mistyped hook parameters, payload fields a described JSON payload lacks, "
        "message types without payload bindings, unreachable phases, commit conditions that can never hold; "
        "warns when a spec overrides a built-in mode.\n\n"
        "Exit status 1 when any error is found (or any warning with --strict), else 0.",
        ["macp-runtime check                          # the built-in specs",
         "macp-runtime check my-modes/ review.yaml    # files and directories"])
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
    p = _command(
        sub, "hooks", "list the hooks a mode spec can name, with their parameters",
        "Print the hook catalogue: each hook's name as a spec writes it, where it may be used (guard, effect, "
        "when, ready, role, start, state, ...), its parameters with their types, and what it checks. Without "
        "MODULE: the generic and common hooks, the ones YAML-only specs use.",
        ["macp-runtime hooks                 # generic + common",
         "macp-runtime hooks decision task   # the hooks of built-in modes",
         "macp-runtime hooks --all --json"])
    p.add_argument("modules", nargs="*", metavar="MODULE", help="hook modules to list")
    p.add_argument("--all", action="store_true", help="every built-in hook module")
    p.add_argument("--json", action="store_true", help="JSON instead of text")


def _run_hooks(args) -> int:
    from ..codegen.catalogue import all_modules, catalogue, format_text

    known = all_modules()
    unknown = [m for m in args.modules if m not in known]
    if unknown:
        print(f"unknown hook module(s) {', '.join(unknown)} (known: {', '.join(known)})", file=sys.stderr)
        return 2
    entries = catalogue(known if args.all else args.modules or None)
    print(json.dumps(entries, indent=2, default=str) if args.json else format_text(entries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="macp-runtime", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="MACP runtime for Python: coordination modes declared in YAML, one generic session engine, "
                    "served over gRPC\n(macp.v1.MACPRuntimeService).",
        epilog="commands by purpose:\n"
               "  the daemon          serve (its settings: flags and MACP_* variables), config (what they come to)\n"
               "  mode specs          check, docs, hooks (no server needed)\n"
               "  a running server    sessions, modes, policies (gRPC: --target, --token)\n"
               "  decision receipts   receipts verify (offline), receipts rotate-key (the data directory or database)\n"
               "\nEvery command explains itself: macp-runtime COMMAND --help, macp-runtime COMMAND ACTION --help.\n")
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"macp-runtime {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    _config_parser(sub)
    _docs_parser(sub)
    _check_parser(sub)
    _hooks_parser(sub)
    from .opcli import register

    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "config":
        return _run_config(args)
    if args.command == "docs":
        return _run_docs(args)
    if args.command == "check":
        return _run_check(args)
    if args.command == "hooks":
        return _run_hooks(args)
    if hasattr(args, "func"):   # operator commands (sessions, modes, policies)
        return args.func(args)
    overrides = {k: v for k, v in vars(args).items() if k != "command"}   # the flags' values, by field
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
        from ..registries.policy_files import dry_run
        from ..registries.profile import get

        return dry_run(cfg.policies_dir, get(cfg.protocol_profile), cfg.specs_dirs)
    from .server import serve

    return serve(cfg)
