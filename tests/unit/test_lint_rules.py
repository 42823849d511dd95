"""Issue 15's lint rules: the schema, hook signatures, all errors of a file with line, path, known
alternatives and did-you-mean; `check DIR` on overrides; `macp-runtime hooks`; the published schema."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from macp_runtime.codegen.compiler import compile_spec
from macp_runtime.codegen.errors import SpecError
from macp_runtime.codegen.lint import lint_paths
from macp_runtime.codegen.loader import load_spec_text
from macp_runtime.codegen.validate import SCHEMA_PATH

from tests.support import ROOT

with open(os.path.join(ROOT, "examples", "specs", "sealed_bid.yaml"), encoding="utf-8") as fh:
    AUCTION = fh.read()


def line_no(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def errors(tmp_path, text: str, name="mode.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    findings, count = lint_paths([str(path)])
    assert count == 1
    return [f for f in findings if f.level == "error"]


def one(tmp_path, text: str):
    found = errors(tmp_path, text)
    assert len(found) == 1, [str(f) for f in found]
    return found[0]


def test_three_seeded_errors_are_all_reported_with_line_and_suggestion(tmp_path):
    text = (AUCTION.replace("    to: Closed\n", "    to: Closd\n", 1)
            .replace("ready: {hook: generic.count_at_least, message: Bid, count: 2}",
                     "ready: {hook: generic.count_at_least, message: Bidd, count: 2}")
            .replace("    effects: [generic.record]\n\n  - message: Close", "    effects: [generic.recrod]\n\n  - message: Close"))
    found = errors(tmp_path, text)
    assert [(f.line, f.path) for f in found] == [
        (line_no(text, "[generic.recrod]"), "transitions[0].effects[0]"),
        (line_no(text, "to: Closd"), "transitions[1].to"),
        (line_no(text, "message: Bidd"), "commitment.ready.message"),
    ]
    assert "did you mean 'generic.record'?" in found[0].message
    assert found[1].message == "unknown phase 'Closd' (known: Awarded, Bidding, Closed; did you mean 'Closed'?)"
    assert found[2].message == ("message type 'Bidd' is not in descriptor.message_types "
                                "(known: Bid, Close, Commitment, SessionStart; did you mean 'Bid'?)")


def test_the_compiler_raises_all_of_them_too(tmp_path):
    text = AUCTION.replace("    to: Closed\n", "    to: Closd\n", 1).replace("senders: [initiator]", "senders: [initator]")
    with pytest.raises(SpecError) as info:
        compile_spec(load_spec_text(text, "auction.yaml"), "auction.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("auction.yaml:") for line in lines)
    assert "unknown role 'initator'" in lines[1] and "did you mean 'initiator'?" in lines[1]


def test_missing_hook_parameter_is_caught_before_run_time(tmp_path):
    text = AUCTION.replace("{hook: generic.count_at_least, message: Bid, count: 2}",
                           "{hook: generic.count_at_least, message: Bid}")
    f = one(tmp_path, text)
    assert (f.line, f.path) == (line_no(text, "ready:"), "commitment.ready.hook")
    assert "needs parameter 'count'" in f.message


def test_unknown_hook_parameter_suggests_the_declared_one(tmp_path):
    f = one(tmp_path, AUCTION.replace("message: Bid, count: 2}", "message: Bid, cout: 2}"))
    assert f.path == "commitment.ready.cout"
    assert "has no parameter 'cout'" in f.message and "did you mean 'count'?" in f.message


def test_mistyped_hook_parameter(tmp_path):
    f = one(tmp_path, AUCTION.replace("message: Bid, count: 2}", "message: Bid, count: two}"))
    assert f.path == "commitment.ready.count" and "must be a non-negative integer, not 'two'" in f.message


def test_message_parameter_must_be_declared(tmp_path):
    f = one(tmp_path, AUCTION.replace("field: winner, message: Bid}", "field: winner, message: Offer}"))
    assert "message type 'Offer' is not in descriptor.message_types" in f.message


def test_bad_operator_and_bad_pattern(tmp_path):
    f = one(tmp_path, AUCTION.replace('op: ">"', 'op: "=>"'))
    assert f.path.endswith(".op") and "must be a comparison" in f.message
    text = AUCTION.replace('{hook: generic.field_compare, field: amount, op: ">", value: 0}',
                           '{hook: generic.field_matches, field: note, pattern: "a("}')
    f = one(tmp_path, text)
    assert f.path.endswith(".pattern") and "regular expression" in f.message


def test_hook_used_where_it_cannot_be(tmp_path):
    f = one(tmp_path, AUCTION.replace("    effects: [generic.record]\n\n  - message: Close",
                                      "    effects: [generic.first_from_sender]\n\n  - message: Close"))
    assert "cannot be used as effect" in f.message and "usable as: guard" in f.message


def test_unknown_hook_module_and_bare_names(tmp_path):
    f = one(tmp_path, AUCTION.replace("check: generic.first_from_sender", "check: generik.first_from_sender"))
    assert "unknown hook module 'generik'" in f.message and "did you mean 'generic'?" in f.message
    f = one(tmp_path, AUCTION.replace("check: generic.first_from_sender", "check: first_from_sender"))
    assert "did you mean 'generic.first_from_sender'?" in f.message


def test_unknown_key_suggests_the_nearest(tmp_path):
    text = AUCTION.replace("    effects: [generic.record]\n\n  - message: Close", "    efects: [generic.record]\n\n  - message: Close")
    f = one(tmp_path, text)
    assert (f.line, f.path) == (line_no(text, "efects:"), "transitions[0].efects")
    assert "unknown key 'efects'" in f.message and "did you mean 'effects'?" in f.message


def test_branch_typos_keep_the_users_line_and_path(tmp_path):
    text = AUCTION.replace("  to: Awarded\n", "  to:\n    - phase: Awarded\n      when: {hook: generic.any_sent, message: Close}\n"
                                              "    - phase: Awardd\n", 1)
    f = one(tmp_path, text)
    assert (f.line, f.path) == (line_no(text, "phase: Awardd"), "commitment.to[1].phase")
    assert "did you mean 'Awarded'?" in f.message


def test_wrong_shapes_say_what_is_expected(tmp_path):
    f = one(tmp_path, AUCTION.replace("  names: [Bidding, Closed, Awarded]", "  names: Bidding"))
    assert (f.path, f.message) == ("phases.names", "must be a list")
    f = one(tmp_path, AUCTION.replace("        reject: InvalidPayload\n        why: each", "        reject: Invalid\n        why: each"))
    assert "unknown rejection 'Invalid'" in f.message and "did you mean 'InvalidPayload'?" in f.message


def test_payload_field_descriptions_are_checked(tmp_path):
    f = one(tmp_path, AUCTION.replace("amount: {type: number, required: true", "amount: {type: numbr, required: true", 1))
    assert f.path == "payloads.Bid.fields.amount.type" and "did you mean 'number'?" in f.message


def test_check_dir_warns_about_overriding_a_builtin(tmp_path):
    (tmp_path / "mine.yaml").write_text(AUCTION.replace("mode: ext.sealed_bid.v1", "mode: macp.mode.decision.v1"))
    findings, _ = lint_paths([str(tmp_path)])
    assert [(f.level, f.path) for f in findings] == [("warning", "mode")]
    assert "overrides the built-in spec decision.yaml" in findings[0].message


def test_hooks_command_prints_the_catalogue():
    out = subprocess.run([sys.executable, "-m", "macp_runtime", "hooks"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "generic.count_at_least  [guard, when, ready]" in out.stdout
    assert "count: count (required)" in out.stdout
    js = subprocess.run([sys.executable, "-m", "macp_runtime", "hooks", "--all", "--json"], capture_output=True,
                        text=True, cwd=ROOT)
    entries = json.loads(js.stdout)
    assert {"generic.field_compare", "common.commitment_matches_session", "decision.record_vote"} <= {e["ref"] for e in entries}
    bad = subprocess.run([sys.executable, "-m", "macp_runtime", "hooks", "generics"], capture_output=True, text=True)
    assert bad.returncode == 2 and "known:" in bad.stderr


def test_the_schema_is_valid_and_published_in_docs():
    from jsonschema import Draft202012Validator

    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        schema = json.load(fh)
    Draft202012Validator.check_schema(schema)
    with open(os.path.join(ROOT, "docs", "spec-schema.json"), encoding="utf-8") as fh:
        assert json.load(fh) == schema, "docs/spec-schema.json is stale: run macp-runtime docs"


def test_every_committed_spec_validates_against_the_schema():
    findings, count = lint_paths([os.path.join(ROOT, "specs"), os.path.join(ROOT, "examples", "specs")])
    assert count >= 10 and [f for f in findings if f.level == "error"] == []


# --- serving (issue 15 point 6) --------------------------------------------------------------------

def test_a_broken_spec_at_start_up_is_one_clean_line_per_problem(tmp_path):
    from tests.support import ServerProcess

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "a.yaml").write_text(AUCTION.replace("    to: Closed\n", "    to: Closd\n", 1)
                                  .replace("message: Bid, count: 2}", "message: Bid}"))
    (specs / "b.yaml").write_text(AUCTION.replace("mode: ext.sealed_bid.v1", "mode: ext.b.v1")
                                  .replace("senders: [initiator]", "senders: [initator]"))
    srv = ServerProcess(str(tmp_path / "data"), env={"MACP_SPECS_DIR": str(specs)}).start(wait=False)
    assert srv.proc.wait(30) == 1
    out = srv.log()
    assert "Traceback" not in out, out
    problems = [line for line in out.splitlines() if "mode spec: " in line]
    assert len(problems) == 4, out          # two in a.yaml, both initiator roles in b.yaml
    assert sum("a.yaml:" in p for p in problems) == 2 and sum("b.yaml:" in p for p in problems) == 2
    assert any("unknown phase 'Closd'" in p and "did you mean 'Closed'?" in p for p in problems)


def test_overriding_a_builtin_is_logged(tmp_path):
    from tests.support import ServerProcess

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mine.yaml").write_text(AUCTION.replace("mode: ext.sealed_bid.v1", "mode: macp.mode.task.v1"))
    srv = ServerProcess(str(tmp_path / "data"), env={"MACP_SPECS_DIR": str(specs)}).start()
    try:
        line = next(l for l in srv.log().splitlines() if "overrides the spec" in l)
        assert "macp.mode.task.v1" in line and "mine.yaml" in line and "task.yaml" in line
    finally:
        srv.kill()


def test_one_version_source():
    from importlib import metadata

    import macp_runtime

    out = subprocess.run([sys.executable, "-m", "macp_runtime", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"macp-runtime {metadata.version('macp-runtime')}" == f"macp-runtime {macp_runtime.__version__}"


def test_payload_fields_named_by_hooks_must_be_described(tmp_path):
    text = AUCTION.replace('{hook: generic.field_compare, field: amount, op: ">", value: 0}',
                           '{hook: generic.field_compare, field: amont, op: ">", value: 0}')
    f = one(tmp_path, text)
    assert (f.line, f.path) == (line_no(text, "field: amont"), "transitions[0].guards[1].check.field")
    assert "not among the fields payloads.Bid describes" in f.message and "did you mean 'amount'?" in f.message
    # a parameter naming a field of another message's payloads is checked against that message
    f = one(tmp_path, AUCTION.replace("message: Bid, of: amount}", "message: Bid, of: amout}"))
    assert f.path == "commitment.guards[1].check.of" and "payloads.Bid" in f.message
    # payloads that describe no fields accept any field name
    assert errors(tmp_path, AUCTION.replace('{hook: generic.field_compare, field: amount, op: ">", value: 0}',
                                            '{hook: generic.field_compare, field: anything, op: ">", value: 0}')
                  .replace("    type: json\n    description: One sealed bid.\n", "    type: json\n    description: x\n", 1)
                  .replace("    fields:\n      amount: {type: number, required: true, description: \"the bid, greater than 0\"}\n"
                           "      note: {type: string, description: free text for the auctioneer}\n", "", 1)) == []


@pytest.mark.parametrize("old,new,path,message", [
    ("spec_version: 1\n", "", "", "missing required key 'spec_version'"),
    ("spec_version: 1\n", "spec_version: 2\n", "spec_version", "must be 1"),
    ("  names: [Bidding, Closed, Awarded]", "  names: []", "phases.names", "must not be empty"),
    ("- check: generic.first_from_sender\n", "- check: generic first\n", "transitions[0].guards[0].check",
     "is not a hook name"),
    ("  terminal_message_types: [Commitment]", "  terminal_message_types: [Commitmnt]",
     "descriptor.terminal_message_types[0]", "must also appear in message_types"),
    ("  initial: Bidding", "  initial: Biding", "phases.initial", "initial phase 'Biding' is not in phases.names"),
    ("state:\n", "roles:\n  initiator: generic.named_by_last\nstate:\n", "roles.initiator", "is a built-in role"),
    ("  - message: Close\n", "  - message: SessionStart\n", "transitions[1].message", "handled by the engine"),
    ("  Close:\n    type: json\n    description: Ends the bidding; no payload fields are needed.\n", "",
     "transitions[1].message", "has no payload binding"),
    ("  - message: Close\n    from: [Bidding]", "  - message: Bid\n    from: [Bidding]", "transitions[1].from",
     "already has a transition on 'Bid'"),
    ("  - message: Close\n    from: [Bidding]\n    to: Closed\n", "  - message: Bid\n    from: [Closed]\n    to: Closed\n",
     "transitions[1].senders", "must name the same senders"),
    ("    to: Closed\n", "    to:\n      - {phase: Closed}\n      - {phase: Bidding}\n", "transitions[1].to[0]",
     "only the last branch may omit 'when'"),
    ("    to: Closed\n", "    to:\n      - {phase: Closed, when: {hook: generic.any_sent, message: Bid}}\n",
     "transitions[1].to[0].when", "the last branch must not have 'when'"),
    ("unlisted_messages:\n  senders: []\n", "unlisted_messages:\n  accept: {from: [Bidding], to: Bidding}\n",
     "unlisted_messages.accept", "needs unlisted_messages.senders"),
    ("  initial: generic.message_log", "  initial: generic.record", "state.initial", "cannot be used as state"),
])
def test_each_structural_and_cross_reference_rule(tmp_path, old, new, path, message):
    assert old in AUCTION, old
    found = errors(tmp_path, AUCTION.replace(old, new, 1))
    assert any(f.path == path and message in f.message for f in found), [str(f) for f in found]
    assert all(f.line for f in found), [str(f) for f in found]
