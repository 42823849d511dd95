"""One option table (issue 13 point 7): runtime/app/config.py declares each setting once, and the environment,
the `serve` flags, `--help` and the README's tables all come from it. In process, except the two `--help`
runs of the installed entry point."""
from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from macp_runtime.app import options
from macp_runtime.app.cli import build_parser, markdown_tables
from macp_runtime.app.client import Connection
from macp_runtime.app.config import Config, ConfigError, from_env
from macp_runtime.kernel.auth import AuthConfigError, AuthSettings, DevAuthenticator, build_authenticator


def _root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    while not os.path.isfile(os.path.join(here, "pyproject.toml")):
        here = os.path.dirname(here)
    return here


ROOT = _root()
BLOCK = re.compile(r"^<!-- options:(?P<section>[a-z]+) .*?-->$.*?^<!-- end of options:(?P=section) -->$", re.M | re.S)


def test_the_readme_tables_are_the_option_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        readme = fh.read()
    in_readme = {m.group("section"): m.group(0) for m in BLOCK.finditer(readme)}
    generated = {m.group("section"): m.group(0) for m in BLOCK.finditer(markdown_tables())}
    assert set(generated) == {"serve", "auth", "client"}
    for section, block in generated.items():
        assert in_readme.get(section) == block, (
            f"README.md's options:{section} table differs from the option table (runtime/app/config.py, "
            f"client.py): run scripts/readme-options to rewrite it")


def test_every_setting_is_declared_once():
    opts = options.declared(Config) + options.declared(Connection)
    envs = [o.env for o in opts]
    flags = [o.flag for o in options.declared(Config) if o.flag]
    assert len(envs) == len(set(envs)) and len(flags) == len(set(flags))
    assert all(o.env.startswith("MACP_") and o.help for o in opts)
    undeclared = {f.name for f in dataclasses.fields(Config)} - {o.field for o in options.declared(Config)}
    assert undeclared == {"auth_unknown", "warnings"}
    # secrets are never flags (argv is visible to other users)
    assert not [o.env for o in opts if o.secret and o.flag]


def test_the_profile_choices_are_the_profiles():
    from macp_runtime.registries.profile import PROFILES

    (opt,) = [o for o in options.declared(Config) if o.field == "protocol_profile"]
    assert set(opt.kind.choices) == set(PROFILES)


def test_defaults_and_types():
    cfg = from_env({})
    assert cfg == Config(auth_unknown=[], warnings=[])
    assert (cfg.bind_addr, cfg.workers, cfg.specs_dirs, cfg.reflection, cfg.log_json) == \
        ("127.0.0.1:50051", 64, [], None, False)
    cfg = from_env({"MACP_WORKERS": "8", "MACP_COMPACT_DEAD_RATIO": "0.25", "MACP_MEMORY_ONLY": "1",
                    "MACP_REFLECTION": "0", "MACP_LOG_FORMAT": "json", "MACP_LOG_LEVEL": "DEBUG",
                    "MACP_SPECS_DIR": os.pathsep.join([ROOT, "", ROOT])})
    assert (cfg.workers, cfg.compact_dead_ratio, cfg.memory_only, cfg.reflection, cfg.log_json, cfg.log_level,
            cfg.specs_dirs) == (8, 0.25, True, False, True, "debug", [ROOT, ROOT])
    assert from_env({"MACP_MEMORY_ONLY": "yes"}).memory_only is False   # as the reference: only "1" switches on


def _serve_flags(*argv: str) -> dict:
    args = build_parser().parse_args(["serve", *argv])
    return {k: v for k, v in vars(args).items() if k != "command"}


def test_a_flag_wins_over_its_variable():
    env = {"MACP_WORKERS": "3", "MACP_BIND_ADDR": "127.0.0.1:1", "MACP_REFLECTION": "1",
           "MACP_SPECS_DIR": "/nonexistent-a"}
    cfg = from_env(env, _serve_flags("--workers", "5", "--bind", "[::1]:2", "--no-reflection", "--specs-dir", ROOT))
    assert (cfg.workers, cfg.bind_addr, cfg.reflection, cfg.specs_dirs) == (5, "[::1]:2", False, [ROOT])
    cfg = from_env(env | {"MACP_SPECS_DIR": ROOT}, _serve_flags())   # no flag: the variable
    assert (cfg.workers, cfg.bind_addr, cfg.reflection, cfg.specs_dirs) == (3, "127.0.0.1:1", True, [ROOT])
    cfg = from_env({"MACP_LOG_FORMAT": "text"}, _serve_flags("--log-json", "--allow-insecure"))
    assert cfg.log_json is True and cfg.allow_insecure is True


def test_every_problem_is_reported_naming_the_variable_or_the_flag():
    with pytest.raises(ConfigError) as info:
        from_env({"MACP_WORKERS": "many", "MACP_COMPACT_DEAD_RATIO": "2", "MACP_REFLECTION": "yes",
                  "MACP_BIND_ADDR": "localhost:80", "MACP_TLS_CERT_PATH": "/nonexistent.pem",
                  "MACP_STORAGE_BACKEND": "rocksdb", "MACP_RECEIPT_ISSUER": ""},
                 _serve_flags("--max-streams", "0", "--metrics-addr", "nowhere"))
    assert info.value.problems == [
        "MACP_BIND_ADDR must be an IP address and port such as 127.0.0.1:50051 or [::1]:50051, got 'localhost:80'",
        "MACP_TLS_CERT_PATH points to '/nonexistent.pem', which does not exist",
        "MACP_STORAGE_BACKEND: unknown storage backend: rocksdb. Valid: file, postgres",
        "MACP_COMPACT_DEAD_RATIO must be a number from 0 to 1, got '2'",
        "MACP_WORKERS must be a positive integer, got 'many'",
        "MACP_MAX_STREAMS must be a positive integer, got '0' (given as --max-streams)",
        "MACP_METRICS_ADDR must be an IP address and port such as 127.0.0.1:9464, got 'nowhere' "
        "(given as --metrics-addr)",
        "MACP_REFLECTION must be 0 or 1, got 'yes'",
        "MACP_RECEIPT_ISSUER must not be empty",
    ]


def test_unusable_sweep_variables_fall_back_with_a_warning_but_flags_are_refused():
    cfg = from_env({"MACP_CLEANUP_INTERVAL_SECS": "soon"})
    assert cfg.cleanup_interval_secs == 60.0
    assert cfg.warnings == ["MACP_CLEANUP_INTERVAL_SECS='soon' is not a positive number of seconds; "
                            "using the default 60"]
    with pytest.raises(ConfigError) as info:
        from_env({}, _serve_flags("--cleanup-interval", "0"))
    assert info.value.problems == ["MACP_CLEANUP_INTERVAL_SECS must be a positive number of seconds, got '0' "
                                   "(given as --cleanup-interval)"]


def test_the_start_up_description_masks_secrets():
    shown = from_env({"MACP_AUTH_TOKENS_JSON": '[{"token": "t0ps3cret", "sender": "a"}]',
                      "MACP_RECEIPT_SIGNING_KEY": "c2VlZA==", "MACP_AUTH_JWKS_JSON": '{"keys": []}',
                      "MACP_DATABASE_URL": "postgresql://macp:pw@127.0.0.1/macp"}).describe()
    assert shown["auth_tokens_json"] == shown["receipt_signing_key"] == shown["auth_jwks_json"] == "***"
    assert shown["database_url"] == "postgresql://macp:***@127.0.0.1/macp"
    assert shown["workers"] == 64


def test_auth_is_built_from_settings_and_still_fails_closed():
    assert isinstance(build_authenticator(AuthSettings()), DevAuthenticator)
    cfg = from_env({"MACP_AUTH_TOKEN_FILE": "/typo"})   # not a setting, but under MACP_AUTH_: fail closed
    assert cfg.auth_unknown == ["MACP_AUTH_TOKEN_FILE"]
    with pytest.raises(AuthConfigError, match="MACP_AUTH_TOKEN_FILE is set but configures no resolver"):
        build_authenticator(AuthSettings(unknown=tuple(cfg.auth_unknown)))
    with pytest.raises(AuthConfigError, match="MACP_AUTH_AUDIENCE is set but MACP_AUTH_ISSUER is not"):
        build_authenticator(AuthSettings(audience=""))   # set but empty is set
    chain = build_authenticator(AuthSettings(tokens_json='[{"token": "t", "sender": "s"}]'))
    assert chain.resolvers


def _env_readers(path: str) -> list[int]:
    tree = ast.parse(open(path, encoding="utf-8").read())
    return [node.lineno for node in ast.walk(tree)
            if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
                and isinstance(node.value, ast.Name) and node.value.id == "os")
            or (isinstance(node, ast.ImportFrom) and node.module == "os"
                and {a.name for a in node.names} & {"environ", "getenv", "environb"})]


def test_nothing_below_the_application_reads_the_environment():
    offenders = []
    for top in ("runtime", "codegen", "specs"):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            rel = os.path.relpath(folder, ROOT)
            if rel.split(os.sep)[:2] == ["runtime", "app"]:
                continue
            offenders += [f"{rel}/{name}:{line}" for name in files if name.endswith(".py")
                          for line in _env_readers(os.path.join(folder, name))]
    assert offenders == []


def _subparsers(parser, path=()):
    for action in parser._actions:   # argparse has no public walk over subcommands
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from _subparsers(sub, (*path, name))


def test_every_command_explains_itself():
    parser = build_parser()
    commands = dict(_subparsers(parser))
    assert {("serve",), ("config",), ("check",), ("sessions", "list"), ("receipts", "rotate-key")} <= set(commands)
    for path, sub in commands.items():
        text = sub.format_help()
        assert sub.description, f"macp-runtime {' '.join(path)} --help has no description"
        for action in sub._actions:
            if action.option_strings and action.help is None:
                pytest.fail(f"macp-runtime {' '.join(path)}: {action.option_strings[0]} has no help")
        assert "usage: macp-runtime " + " ".join(path) in text
    serve = " ".join(commands[("serve",)].format_help().split())
    for opt in options.declared(Config):
        assert (opt.flag or opt.env) in serve, opt.env
    assert "--allow-insecure" in serve and "(MACP_ALLOW_INSECURE=1)" in serve
    assert "(MACP_WORKERS, default 64)" in serve
    assert "(see Durability)" in serve and "MACP_AUTH_*" in serve and "every Watch*" in serve


def test_the_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "macp_runtime", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("serve", "config", "check", "docs", "hooks", "sessions", "modes", "policies", "receipts"):
        assert command in out.stdout
    out = subprocess.run([sys.executable, "-m", "macp_runtime", "config", "--markdown"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == markdown_tables()
