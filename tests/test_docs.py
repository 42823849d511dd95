"""Generated mode documentation: committed pages match the specs, and the CLI writes them."""
from __future__ import annotations

import os
import subprocess
import sys

from macp_runtime.codegen import load_modes
from macp_runtime.codegen.docs import mermaid, render

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "modes")


def test_committed_mode_docs_are_up_to_date():
    pages = render(load_modes())
    stale = []
    for name, text in pages.items():
        path = os.path.join(DOCS, name)
        if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
            stale.append(name)
    extra = sorted(set(os.listdir(DOCS)) - set(pages) - {p[:-3] + ".svg" for p in pages})
    assert not stale and not extra, (
        f"docs/modes is stale ({stale}, unexpected {extra}): run `macp-runtime docs --out docs/modes`")


def test_every_mode_page_has_a_diagram_tables_and_payload_fields():
    pages = render(load_modes())
    decision = pages["macp.mode.decision.v1.md"]
    assert "```mermaid\nstateDiagram-v2\n    [*] --> Proposal\n" in decision
    assert "    Evaluation --> Voting : Vote\n" in decision
    assert "| `Vote` | Evaluation, Voting | Voting | `participant` |" in decision
    assert "| 2 | `vote` | string |" in decision                       # read from the protobuf descriptor
    assert "| `voting.algorithm` | string | `none` |" in decision       # policy rules the mode reads
    assert "`POLICY_DENIED`" in decision and "`SESSION_NOT_OPEN`" in decision
    assert "index.md" in pages and "[`macp.mode.task.v1`](macp.mode.task.v1.md)" in pages["index.md"]


def test_mermaid_edges_follow_the_compiled_machine():
    for mode in load_modes():
        text = mermaid(mode)
        for by_phase in mode.transitions.values():
            for t in by_phase.values():
                for src in t.sources:
                    for b in t.branches:
                        assert f"    {src} --> {b.phase} : " in text, (mode.name, src, b.phase)


def test_docs_command_writes_pages(tmp_path):
    out = tmp_path / "docs"
    proc = subprocess.run([sys.executable, "-m", "macp_runtime", "docs", "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert (out / "index.md").exists() and (out / "macp.mode.quorum.v1.md").exists()
    assert str(out / "index.md") in proc.stdout
