"""`macp-runtime check`: one test per class of spec mistake, plus exit status and output format."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from macp_runtime.codegen.lint import lint_paths
from macp_runtime.specs import SPECS_DIR

with open(os.path.join(SPECS_DIR, "decision.yaml"), encoding="utf-8") as fh:
    # a copy under its own name: a copy under the built-in's name is (rightly) warned about as an override
    DECISION = fh.read().replace("mode: macp.mode.decision.v1", "mode: ext.decision_copy.v1", 1)


def write(tmp_path, text, name="mode.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def errors_of(tmp_path, text):
    findings, count = lint_paths([write(tmp_path, text)])
    assert count == 1
    return [f for f in findings if f.level == "error"], findings


def test_builtin_specs_are_clean():
    findings, count = lint_paths([SPECS_DIR])
    assert count >= 6 and findings == []


def test_yaml_error_has_a_line_number(tmp_path):
    errors, _ = errors_of(tmp_path, DECISION.replace("  names: [Proposal, Evaluation, Voting, Committed]",
                                                     "  names: [Proposal, Evaluation, Voting, Committed", 1))
    assert len(errors) == 1 and "invalid YAML" in errors[0].message and errors[0].line


def test_unknown_key(tmp_path):
    errors, _ = errors_of(tmp_path, DECISION.replace("    effects: [record_vote]", "    effect: [record_vote]", 1))
    assert "unknown key 'effect'" in errors[0].message and errors[0].path == "transitions[3].effect"


def test_unreachable_phase(tmp_path):
    text = DECISION.replace("names: [Proposal, Evaluation, Voting, Committed]",
                            "names: [Proposal, Evaluation, Voting, Committed, Archived]", 1)
    errors, _ = errors_of(tmp_path, text)
    assert [e.message for e in errors] == ["phase 'Archived' is unreachable from the initial phase 'Proposal'"]
    assert errors[0].line == text.splitlines().index("  names: [Proposal, Evaluation, Voting, Committed, Archived]") + 1


def test_transition_from_unknown_phase(tmp_path):
    errors, _ = errors_of(tmp_path, DECISION.replace("    from: [Evaluation]\n    to: Evaluation\n    senders: [participant]\n    guards:\n      - check: recommendation_known",
                                                     "    from: [Evaluaton]\n    to: Evaluation\n    senders: [participant]\n    guards:\n      - check: recommendation_known", 1))
    assert "unknown phase 'Evaluaton'" in errors[0].message and errors[0].path == "transitions[1].from"


def test_hook_that_does_not_exist(tmp_path):
    errors, _ = errors_of(tmp_path, DECISION.replace("effects: [record_vote]", "effects: [record_votes]", 1))
    assert "hook 'record_votes' does not exist" in errors[0].message


def test_message_type_without_payload_binding(tmp_path):
    text = DECISION.replace("message_types: [SessionStart, Proposal, Evaluation, Objection, Vote, Commitment]",
                            "message_types: [SessionStart, Proposal, Evaluation, Objection, Vote, Commitment, Nudge]", 1)
    errors, _ = errors_of(tmp_path, text)
    assert [e.message for e in errors] == ["message type 'Nudge' has no payload binding"]


def test_commitment_that_can_never_hold(tmp_path):
    # Nothing leads into Voting any more, and the commitment only accepts Voting.
    text = DECISION.replace("    from: [Evaluation, Voting]\n    to: Voting\n", "    from: [Voting]\n    to: Voting\n", 1)
    text = text.replace("  from: [Evaluation, Voting]\n  to: Committed\n", "  from: [Voting]\n  to: Committed\n", 1)
    errors, _ = errors_of(tmp_path, text)
    messages = [e.message for e in errors]
    assert "the commitment can never be accepted: none of its from-phases is reachable" in messages
    assert "phase 'Voting' is unreachable from the initial phase 'Proposal'" in messages


def test_commitment_with_no_sender(tmp_path):
    errors, _ = errors_of(tmp_path, DECISION.replace("  senders: [committer]\n", "  senders: []\n", 1))
    assert [e.message for e in errors] == ["the commitment can never be accepted: nobody may send it"]


def test_cli_exit_status_and_format(tmp_path):
    good = write(tmp_path, DECISION, "good.yaml")
    bad = write(tmp_path, DECISION.replace("effects: [record_vote]", "effects: [nope]", 1), "bad.yaml")
    ok = subprocess.run([sys.executable, "-m", "macp_runtime", "check", good], capture_output=True, text=True)
    assert ok.returncode == 0 and "1 spec(s) checked: 0 error(s), 0 warning(s)" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "macp_runtime", "check", str(tmp_path)], capture_output=True, text=True)
    assert fail.returncode == 1
    line = next(l for l in fail.stdout.splitlines() if l.startswith(bad))
    assert ": error: transitions[3].effects[0]: hook 'nope' does not exist" in line
    assert line.split(":")[1].isdigit()
    assert "2 spec(s) checked: 1 error(s)" in fail.stdout


@pytest.mark.parametrize("args", [["--strict"], []])
def test_warnings_fail_only_with_strict(tmp_path, args):
    text = DECISION.replace("  Commitment: macp.v1.CommitmentPayload\n",
                            "  Commitment: macp.v1.CommitmentPayload\n  Extra: macp.v1.CommitmentPayload\n", 1)
    path = write(tmp_path, text)
    proc = subprocess.run([sys.executable, "-m", "macp_runtime", "check", *args, path], capture_output=True, text=True)
    assert "warning: payloads.Extra" in proc.stdout
    assert proc.returncode == (1 if args else 0)
