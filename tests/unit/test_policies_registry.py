"""The PolicyRegistry in-process: JSON reading and canonical writing, watchers, persistence.

Spec: modes.md §10.1 (rules text → JSON value → canonical text), §10.3, §10.4; runtime.md §8.9
(watch buffer 16, a lagging watcher is cut off).
"""
from __future__ import annotations

import json

import pytest

from macp_runtime.vocabulary.broadcast import LAGGED
from macp_runtime.vocabulary.errors import MacpError
from macp_runtime.registries.policies import PolicyRegistry, canonical_json, format_float, parse_rules_text
from macp_runtime.storage.base import StorageError
from macp_runtime.storage.documents import FileDocuments, MemoryDocuments


@pytest.mark.parametrize("value, text", [
    (0.0, "0.0"), (-0.0, "-0.0"), (0.7, "0.7"), (60.0, "60.0"), (1e-7, "1e-7"), (1e16, "1e16"),
    (1.5e20, "1.5e20"), (1e-5, "0.00001"), (9.5e-6, "9.5e-6"), (1234567890123456.0, "1234567890123456.0"),
    (-2.5e-9, "-2.5e-9"), (0.1 + 0.2, "0.30000000000000004"), (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e308"), (123.456, "123.456"),
])
def test_float_format(value, text):
    assert format_float(value) == text


def test_canonical_json_sorts_every_level_and_keeps_non_ascii():
    value = {"b": [{"z": 1, "a": None}], "a": {"é": "ü", "e": "\u2028\u0001\""}, "A": True}
    assert canonical_json(value) == '{"A":true,"a":{"e":"\u2028\\u0001\\"","é":"ü"},"b":[{"a":null,"z":1}]}'


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("   ", {}),
    ("{}", {}),
    ('{"a":1,"a":2}', {"a": 2}),                       # the last duplicate key wins
    ('{"a":-0}', {"a": -0.0}),                         # -0 is a float
    ('{"a":18446744073709551615}', {"a": 2**64 - 1}),  # u64 max stays an integer
    ('{"a":18446744073709551616}', {"a": 18446744073709551616.0}),
    ('{"a":-9223372036854775809}', {"a": -9223372036854775809.0}),
    ('{"a":NaN}', {}), ('{"a":Infinity}', {}), ('{"a":1e999}', {}),
    ('{"a":"\\ud800"}', {}), ('{"\\udc00":1}', {}),
    ('{"a":"\\ud83d\\ude00"}', {"a": "\U0001F600"}),
    ("[" * 127 + "]" * 127, json.loads("[" * 127 + "]" * 127)),   # nesting limit 127
    ("[" * 128 + "]" * 128, {}),
])
def test_rules_text_parsing(text, expected):
    assert parse_rules_text(text) == expected


def test_integers_and_floats_keep_their_kind_through_output():
    reg = PolicyRegistry()
    assert reg.register("p", "ext.x.v1", "", '{"i":3,"f":3.0,"e":3e0,"big":1e2}', 1) is None
    assert reg.describe("p").rules == '{"big":100.0,"e":3.0,"f":3.0,"i":3}'


def test_watch_lagging_subscriber_is_cut_off():
    reg = PolicyRegistry()
    initial, sub = reg.watch()
    assert [v.policy_id for v in initial] == ["policy.default"]
    for i in range(16):
        assert reg.register(f"p{i:02d}", "*", "", "{}", 1) is None
    assert reg.register("p16", "*", "", "{}", 1) is None    # the 17th change overflows the buffer
    items = sub.drain()
    assert len(items) == 17 and items[-1] is LAGGED
    assert [v.policy_id for v in items[0]] == ["p00", "policy.default"]
    assert len(reg.changes) == 0


def test_watch_gets_full_lists_and_close_ends_it():
    reg = PolicyRegistry()
    _, sub = reg.watch()
    reg.register("b", "*", "", "{}", 1)
    reg.unregister("b")
    assert [[v.policy_id for v in item] for item in sub.drain()] == [["b", "policy.default"], ["policy.default"]]
    reg.close()
    assert sub.get(0.1) is not None   # CLOSED


def test_binding():
    reg = PolicyRegistry()
    reg.register("t", "macp.mode.task.v1", "", "{}", 1)
    assert reg.bind("", "macp.mode.decision.v1")[1] == "policy.default"
    assert reg.bind("t", "macp.mode.task.v1")[0].policy_id == "t"
    with pytest.raises(MacpError) as err:
        reg.bind("t", "macp.mode.decision.v1")
    assert err.value.code == "INVALID_POLICY_DEFINITION"
    with pytest.raises(MacpError) as err:
        reg.bind("missing", "macp.mode.task.v1")
    assert err.value.code == "UNKNOWN_POLICY_VERSION"


def test_persistence_round_trip(tmp_path):
    docs = FileDocuments(str(tmp_path))
    reg = PolicyRegistry(docs)
    assert reg.register("p1", "*", "d\u2014", '{"x":{"b":1e-7,"a":-0}}', 2) is None
    assert reg.register("p2", "*", "", "{}", 1) is None
    assert reg.unregister("p2") is None
    again = PolicyRegistry(FileDocuments(str(tmp_path)))
    assert again.list() == reg.list()
    assert [v.policy_id for v in again.list()] == ["p1", "policy.default"]
    assert again.describe("p1").rules == '{"x":{"a":-0.0,"b":1e-7}}'
    assert again.get("p1").schema_version == 2


def test_failed_save_changes_nothing():
    class Broken(MemoryDocuments):
        def save(self, name, doc):
            raise StorageError("disk full")

    reg = PolicyRegistry(Broken())
    _, sub = reg.watch()
    with pytest.raises(StorageError):
        reg.register("p", "*", "", "{}", 1)
    assert reg.get("p") is None and sub.drain() == []


def test_damaged_document_is_an_error(tmp_path):
    FileDocuments(str(tmp_path)).save("policies", {"format": 1, "policies": [{"policy_id": "x"}]})
    with pytest.raises(StorageError):
        PolicyRegistry(FileDocuments(str(tmp_path)))
