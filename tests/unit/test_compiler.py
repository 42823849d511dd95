"""The spec compiler: the built-in specs compile, and broken specs fail with file, line and key path."""
from __future__ import annotations

import os

import pytest

from macp_runtime.codegen import SpecError, compile_spec, load_modes, load_spec_file, load_spec_text
from macp_runtime.specs import SPECS_DIR

DECISION = os.path.join(SPECS_DIR, "decision.yaml")


def decision_text() -> str:
    with open(DECISION, encoding="utf-8") as fh:
        return fh.read()


def compile_text(text: str, file: str = "broken.yaml"):
    return compile_spec(load_spec_text(text, file), file)


def test_builtin_specs_compile_once_per_mode_with_a_shared_machine():
    modes = load_modes()
    names = [m.name for m in modes]
    assert "macp.mode.decision.v1" in names
    decision = next(m for m in modes if m.name == "macp.mode.decision.v1")
    assert decision.machine.models == []          # sessions are never added as models
    assert decision.initial_phase == "Proposal"
    assert set(decision.machine.get_triggers("Evaluation")) == {"Proposal", "Evaluation", "Objection", "Vote",
                                                                 "Commitment"}
    assert decision.machine.get_triggers("Committed") == []


@pytest.mark.parametrize("old,new,path,message", [
    ("spec_version: 1\n", "spec_version: 1\ncolour: blue\n", "colour", "unknown key 'colour'"),
    ("    from: [Evaluation, Voting]\n    to: Voting\n", "    from: [Evaluation, Votng]\n    to: Voting\n",
     "transitions[3].from", "unknown phase 'Votng'"),
    ("      - check: vote_known\n", "      - check: vote_is_known\n", "transitions[3].guards[0].check",
     "hook 'vote_is_known' does not exist"),
    ("  senders: [committer]\n", "  senders: [comitter]\n", "commitment.senders", "unknown role 'comitter'"),
    ("  Vote: macp.modes.decision.v1.VotePayload\n", "  Vote: macp.modes.decision.v1.VotPayload\n", "payloads.Vote",
     "unknown protobuf message"),
    ("  Vote: macp.modes.decision.v1.VotePayload\n", "", "transitions[3].message", "has no payload binding"),
    ("  initial: Proposal\n", "  initial: Drafting\n", "phases.initial", "is not in phases.names"),
    ("        reject: InvalidPayload\n        why: each participant", "        reject: Nope\n        why: each participant",
     "transitions[3].guards[2].reject", "unknown rejection 'Nope'"),
    ("  terminal_message_types: [Commitment]\n", "  terminal_message_types: [Commit]\n",
     "descriptor.terminal_message_types", "must also appear in message_types"),
    ("  - message: Vote\n", "  - on: Vote\n", "transitions[3]", "unknown key True"),
])
def test_broken_specs_name_file_line_and_path(old, new, path, message):
    text = decision_text()
    assert old in text, old
    with pytest.raises(SpecError) as info:
        compile_text(text.replace(old, new, 1))
    err = info.value
    assert err.file == "broken.yaml"
    assert err.path.startswith(path), err
    assert message in err.message, err
    assert err.line is not None and err.line > 0
    assert str(err).startswith(f"broken.yaml:{err.line}: ")


def test_error_line_points_at_the_offending_key():
    text = decision_text().replace("spec_version: 1\n", "spec_version: 1\ncolour: blue\n", 1)
    with pytest.raises(SpecError) as info:
        compile_text(text)
    line_no = text.splitlines().index("colour: blue") + 1
    assert info.value.line == line_no


def test_invalid_yaml_reports_the_line():
    with pytest.raises(SpecError) as info:
        load_spec_text("mode: x\nphases: [a, b\n", "bad.yaml")
    assert "invalid YAML" in info.value.message and info.value.line is not None


def test_duplicate_keys_are_errors():
    with pytest.raises(SpecError) as info:
        load_spec_text("mode: a\nmode: b\n", "dup.yaml")
    assert info.value.message == "duplicate key" and info.value.line == 2


def test_missing_required_key():
    text = "\n".join(line for line in decision_text().splitlines() if not line.startswith("version:"))
    with pytest.raises(SpecError) as info:
        compile_text(text)
    assert "missing required key 'version'" in info.value.message


def test_branches_need_when_except_the_last():
    text = decision_text().replace("    to: Voting\n",
                                   "    to:\n      - {phase: Voting}\n      - {phase: Evaluation}\n", 1)
    with pytest.raises(SpecError) as info:
        compile_text(text)
    assert "only the last branch may omit 'when'" in info.value.message


def test_senders_must_agree_across_transitions_of_one_message():
    text = decision_text().replace(
        "  - message: Vote\n",
        "  - message: Vote\n    from: [Proposal]\n    to: Proposal\n    senders: [initiator]\n  - message: Vote\n", 1)
    with pytest.raises(SpecError) as info:
        compile_text(text)
    assert "must name the same senders" in info.value.message


def test_spec_file_loader_reports_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec_file(str(tmp_path / "nope.yaml"))
    assert "cannot read file" in info.value.message
