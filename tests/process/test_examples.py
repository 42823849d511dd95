"""Every example client really works: each `examples/*.py` is run against a fresh server.

An example passes when, started as `python examples/<name>.py --target <host:port>`, it exits with
status 0 and prints a line starting with `RESOLVED` (the examples' "session ended resolved" line).
New example files are picked up automatically.

An example that needs something else declares it in module-level comment lines of the form
`# macp-example: <directive> <value>` (column 0, anywhere in the file):

    # macp-example: skip <reason>           not run by this test (e.g. a library module or a long demo)
    # macp-example: server-env KEY=VALUE    extra environment for its server (repeatable)
    # macp-example: args <arguments>        extra command-line arguments after --target (shell-split)
    # macp-example: expect <regex>          a line that must match instead of ^RESOLVED (re.MULTILINE)
    # macp-example: timeout <seconds>       run time limit (default 60)

Files whose name starts with `_` are helpers, never run.
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.support import ROOT

EXAMPLES_DIR = os.path.join(ROOT, "examples")
DIRECTIVE = re.compile(r"^# macp-example:\s*(\S+)\s*(.*?)\s*$", re.MULTILINE)
KNOWN = {"skip", "server-env", "args", "expect", "timeout"}


def example_files() -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(EXAMPLES_DIR, "*.py"))
                  if not os.path.basename(p).startswith("_"))


def directives(path: str) -> dict[str, list[str]]:
    with open(path, encoding="utf-8") as fh:
        found: dict[str, list[str]] = {}
        for name, value in DIRECTIVE.findall(fh.read()):
            if name not in KNOWN:
                raise ValueError(f"{os.path.basename(path)}: unknown directive 'macp-example: {name}'")
            found.setdefault(name, []).append(value)
    return found


EXAMPLES = example_files()
IDS = [os.path.basename(p) for p in EXAMPLES]


def test_examples_are_discovered():
    assert {"decision_client.py", "sdk_decision.py"} <= set(IDS)


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_reaches_resolved(server_factory, path):
    d = directives(path)
    if "skip" in d:
        pytest.skip(d["skip"][0] or "skipped by its macp-example directive")
    env = dict(kv.split("=", 1) for kv in d.get("server-env", []))
    srv = server_factory(env=env)
    extra = [a for line in d.get("args", []) for a in shlex.split(line)]
    timeout = float(d.get("timeout", ["60"])[0])
    proc = subprocess.run([sys.executable, path, "--target", srv.target, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    report = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}\n--- server log\n{srv.log()}"
    assert proc.returncode == 0, report
    expected = d.get("expect", [r"^RESOLVED\b"])[0]
    assert re.search(expected, proc.stdout, re.MULTILINE), report


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_help_mentions_target(path):
    if "skip" in directives(path):
        pytest.skip("skipped by its macp-example directive")
    proc = subprocess.run([sys.executable, path, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "--target" in proc.stdout
