"""Generated mode documentation: committed pages match the specs, and the CLI writes them."""
from __future__ import annotations

import os
import subprocess
import sys

from macp_runtime.codegen import load_modes
from macp_runtime.codegen.docs import mermaid, render

from tests.support import ROOT

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


# --- issue 15: reference pages, real spec paths, filled-in hook parameters, JSON fields, --svg ---------

def test_committed_reference_pages_are_up_to_date():
    from macp_runtime.codegen.docs import render_reference

    for name, text in render_reference().items():
        path = os.path.join(ROOT, "docs", name)
        assert os.path.exists(path) and open(path, encoding="utf-8").read() == text, (
            f"docs/{name} is stale: run `macp-runtime docs --out docs/modes`")


def test_reference_pages_cover_every_key_and_hook():
    from macp_runtime.codegen.catalogue import catalogue
    from macp_runtime.codegen.docs import render_reference

    pages = render_reference()
    fmt, hooks = pages["spec-format.md"], pages["hooks.md"]
    for key in ("`spec_version`", "`transitions[].guards[].why`", "`commitment.ready`", "`payloads.<name>.fields.<name>.type`",
                "`unlisted_messages.accept.to[].when`", "yaml-language-server: $schema="):
        assert key in fmt, key
    for entry in catalogue():
        assert f"## `{entry['ref']}`" in hooks, entry["ref"]
    assert "{hook: generic.count_at_least, message: <message>, count: <count>}" in hooks


def test_example_spec_pages_name_the_real_path_fill_in_parameters_and_describe_json_fields():
    modes = load_modes([os.path.join(ROOT, "examples", "specs")])
    page = render([m for m in modes if m.name == "ext.sealed_bid.v1"])["ext.sealed_bid.v1.md"]
    assert "| Spec | `examples/specs/sealed_bid.yaml` |" in page
    assert "from examples/specs/sealed_bid.yaml." in page.splitlines()[0]
    assert "at least 2 different senders have sent Bid" in page           # parameters filled in
    assert "the session declares at least 2 participants" in page
    assert "`count`" not in page
    assert "| `amount` | number | yes | the bid, greater than 0 |" in page  # described JSON fields
    assert "One sealed bid." in page


def test_svg_without_graphviz_fails_clearly(tmp_path):
    env = {k: v for k, v in os.environ.items()}
    env["PATH"] = str(tmp_path)          # no `dot` on this PATH (the interpreter is called by its full path)
    proc = subprocess.run([sys.executable, "-m", "macp_runtime", "docs", "--out", str(tmp_path / "out" / "modes"), "--svg"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "--svg needs Graphviz" in proc.stderr
    assert not (tmp_path / "out").exists()     # nothing half-written
