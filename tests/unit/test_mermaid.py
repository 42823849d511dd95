"""Every committed Mermaid diagram parses with a real Mermaid parser (the `mermaid` npm package under
Node, tests/mermaid/), and each mode's state diagram has exactly the mode's phases as states (a label
that ends a statement early would invent states such as `;` or `[any_pending]`).

The parser is installed by tests/mermaid/ensure.sh (scripts/test runs it when npm is present). Without
Node the test is skipped, except under CI=true, where it must run.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess

import pytest

from macp_runtime.codegen import load_modes
from macp_runtime.codegen.docs import mermaid, page_name

from tests.support import ROOT

MERMAID_DIR = os.path.join(ROOT, "tests", "mermaid")
BLOCK = re.compile(r"^```mermaid\n(.*?)^```", re.MULTILINE | re.DOTALL)


def committed_diagrams() -> list[tuple[str, str]]:
    out = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
                       + [os.path.join(ROOT, "README.md")]):
        with open(path, encoding="utf-8") as fh:
            for i, m in enumerate(BLOCK.finditer(fh.read())):
                out.append((f"{os.path.relpath(path, ROOT)}#{i + 1}", m.group(1)))
    return out


@pytest.fixture(scope="module")
def parse():
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is required under CI=true (.ci/run installs it)")
        pytest.skip("node is not installed")
    if not os.path.isdir(os.path.join(MERMAID_DIR, "node_modules", "mermaid")):
        proc = subprocess.run([os.path.join(MERMAID_DIR, "ensure.sh")], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"could not install the Mermaid parser:\n{proc.stderr}"

    def run(texts: list[str]) -> list[dict]:
        proc = subprocess.run([node, os.path.join(MERMAID_DIR, "parse.mjs")], input=json.dumps(texts),
                              capture_output=True, text=True, timeout=120, cwd=MERMAID_DIR)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    return run


def test_every_committed_diagram_parses(parse):
    diagrams = committed_diagrams()
    assert len(diagrams) >= 6
    results = parse([text for _, text in diagrams])
    failures = [(where, r["error"]) for (where, _), r in zip(diagrams, results) if not r["ok"]]
    assert not failures, failures


def test_mode_diagrams_have_exactly_the_modes_phases(parse):
    modes = load_modes([os.path.join(ROOT, "examples", "specs")])
    results = parse([mermaid(m) for m in modes])
    for mode, r in zip(modes, results):
        assert r["ok"] and r["type"] == "stateDiagram", (mode.name, r)
        states = {s for s in r["states"] if s not in ("root_start", "root_end")}
        assert states == set(mode.phases), (page_name(mode), sorted(states))


def test_the_parser_catches_a_broken_label(parse):
    broken = "stateDiagram-v2\n    [*] --> A\n    A --> B : X; Y [when]\n    B --> [*]"
    (r,) = parse([broken])
    assert not r["ok"] or {s for s in r["states"] if not s.startswith("root_")} != {"A", "B"}
