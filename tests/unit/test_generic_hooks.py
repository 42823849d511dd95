"""Each generic hook (specs/hooks/generic.py) on its own: the condition it checks, its edge cases, its
declared signature and the text a refusal carries."""
from __future__ import annotations

import pytest
from macp.v1 import core_pb2

from macp_runtime.specs.hooks import generic as g
from macp_runtime.specs.hooks.context import HookContext
from macp_runtime.specs.hooks.contract import describe, signature_of


class FakeSession:
    def __init__(self, initiator="host", participants=("ana", "ben", "cy")):
        self.initiator = initiator
        self.participants = list(participants)
        self.participant_set = frozenset(participants)
        self.state = g.message_log(self)


def ctx(session, sender, mtype, payload):
    return HookContext(session, sender, mtype, payload, b"", 0)


def log(session, sender, mtype, payload=None):
    g.record(ctx(session, sender, mtype, payload if payload is not None else {}))


@pytest.fixture
def s():
    session = FakeSession()
    log(session, "ana", "Bid", {"amount": 10, "tag": "a-1"})
    log(session, "ben", "Bid", {"amount": 30})
    log(session, "ben", "Note", {"text": "x"})
    return session


@pytest.mark.parametrize("op,value,expected", [
    (">", 5, True), (">", 10, False), ("gt", 9.5, True), (">=", 10, True), ("≥", 11, False), ("ge", 10, True),
    ("<", 11, True), ("lt", 10, False), ("<=", 10, True), ("≤", 9, False), ("=", 10, True), ("==", 10.0, True),
    ("eq", 11, False), ("!=", 11, True), ("≠", 10, False), ("ne", "10", True), ("=", "10", False),
])
def test_field_compare_numbers(s, op, value, expected):
    assert g.field_compare(ctx(s, "cy", "Bid", {"amount": 10}), "amount", op, value) is expected


def test_field_compare_edge_cases(s):
    c = ctx(s, "cy", "Bid", {"amount": True, "name": "bob", "nested": {"v": 3}})
    assert not g.field_compare(c, "amount", ">", 0)                 # a boolean is not a number
    assert not g.field_compare(c, "missing", "<", 1)                # a missing field fails every comparison
    assert not g.field_compare(c, "missing", "!=", 1)
    assert g.field_compare(c, "name", "<", "carl")                  # strings compare as strings
    assert not g.field_compare(c, "name", ">", 3)                   # a string and a number never order
    assert g.field_compare(c, "nested.v", ">=", 3)                  # dots reach into objects
    assert not g.field_compare(ctx(s, "cy", "Bid", {"amount": float("nan")}), "amount", "<", 1)
    proto = core_pb2.CommitmentPayload(action="auction.awarded", outcome_positive=True)
    assert g.field_compare(ctx(s, "host", "Commitment", proto), "action", "=", "auction.awarded")  # protobuf fields


def test_fields_compare(s):
    c = ctx(s, "cy", "Offer", {"price": 5, "limit": 8, "a": "x", "b": "x"})
    assert g.fields_compare(c, "price", "<=", "limit")
    assert not g.fields_compare(c, "price", ">", "limit")
    assert g.fields_compare(c, "a", "=", "b")
    assert not g.fields_compare(c, "price", "=", "missing")


def test_sets_and_patterns(s):
    c = ctx(s, "cy", "Answer", {"choice": "yes", "code": "AB-12"})
    assert g.field_in(c, "choice", ["yes", "no"]) and not g.field_in(c, "choice", ["no"])
    assert g.field_not_in(c, "choice", ["no"]) and not g.field_not_in(c, "choice", ["yes"])
    assert not g.field_not_in(c, "missing", ["no"])
    assert g.field_matches(c, "code", r"[A-Z]{2}-\d+") and not g.field_matches(c, "code", r"\d+")
    assert not g.field_matches(ctx(s, "cy", "Answer", {"code": 12}), "code", r"\d+")   # only strings match


def test_names_of_people(s):
    assert g.field_names_sender_of(ctx(s, "host", "Commitment", {"winner": "ana"}), "winner", "Bid")
    assert not g.field_names_sender_of(ctx(s, "host", "Commitment", {"winner": "cy"}), "winner", "Bid")
    assert g.field_is_participant(ctx(s, "host", "X", {"who": "cy"}), "who")
    assert not g.field_is_participant(ctx(s, "host", "X", {"who": "host"}), "who")
    assert g.field_is_initiator(ctx(s, "ana", "X", {"who": "host"}), "who")
    assert not g.field_is_initiator(ctx(s, "ana", "X", {"who": "ana"}), "who")
    assert g.field_is_not_sender(ctx(s, "ana", "X", {"to": "ben"}), "to")
    assert not g.field_is_not_sender(ctx(s, "ana", "X", {"to": "ana"}), "to")
    assert not g.field_is_not_sender(ctx(s, "ana", "X", {}), "to")
    assert g.field_names_top_sender(ctx(s, "host", "Commitment", {"winner": "ben"}), "winner", "Bid", "amount")
    assert not g.field_names_top_sender(ctx(s, "host", "Commitment", {"winner": "ana"}), "winner", "Bid", "amount")
    assert not g.field_names_top_sender(ctx(FakeSession(), "host", "Commitment", {"winner": "ana"}), "winner", "Bid", "amount")


def test_counts_and_sums(s):
    c = ctx(s, "ben", "Bid", {"amount": 1})
    assert g.count_at_least(c, "Bid", 2) and not g.count_at_least(c, "Bid", 3)
    assert g.count_compare(c, "Bid", "=", 2) and g.count_compare(c, "Note", "<", 2)
    assert g.sender_sent_fewer_than(c, "Bid", 2) and not g.sender_sent_fewer_than(c, "Bid", 1)
    assert g.sender_sent_fewer_than(ctx(s, "cy", "Bid", {}), "Bid", 1)
    assert g.sum_compare(c, "Bid", "amount", "=", 40) and g.sum_compare(c, "Bid", "amount", ">", 39.5)
    assert g.sum_compare(c, "Nothing", "amount", "=", 0)
    assert g.any_sent(c, "Note") and not g.any_sent(c, "Close")
    assert g.none_sent(c, "Close") and not g.none_sent(c, "Bid")
    assert not g.all_participants_sent(c, "Bid")
    assert g.first_from_sender(ctx(s, "cy", "Bid", {})) and not g.first_from_sender(ctx(s, "ana", "Bid", {}))
    assert g.has_fields(ctx(s, "cy", "Bid", {"a": "x", "b": "y"}), ["a", "b"])
    assert not g.has_fields(ctx(s, "cy", "Bid", {"a": "x", "b": " "}), ["a", "b"])


def test_roles_and_start():
    s = FakeSession()
    assert g.named_by_last(s, "host", "Pass", "to")
    log(s, "host", "Pass", {"to": "ben"})
    assert g.named_by_last(s, "ben", "Pass", "to") and not g.named_by_last(s, "host", "Pass", "to")
    assert g.min_participants(s, 3) and not g.min_participants(s, 4)
    assert g.initiator_not_participant(s)
    assert not g.initiator_not_participant(FakeSession(participants=("host", "ana")))


def test_a_log_from_before_sums_existed_still_works():
    s = FakeSession()
    s.state = {"sent": {}, "values": {}, "last": {}}     # a checkpoint of the older message log
    log(s, "ana", "Bid", {"amount": 4})
    assert g.sum_compare(ctx(s, "ana", "Bid", {}), "Bid", "amount", "=", 4)


def test_every_generic_hook_declares_its_signature_and_text():
    from macp_runtime.codegen.catalogue import catalogue

    entries = [e for e in catalogue(["generic"])]
    assert len(entries) >= 20
    for e in entries:
        assert e["declared"] and e["text"], e["ref"]
    assert describe(g.count_at_least, {"message": "Bid", "count": 2}) == "at least 2 different senders have sent Bid"
    assert describe(g.field_compare, {"field": "amount", "op": "gt", "value": 0}) == "payload field `amount` > 0"
    assert signature_of(g.named_by_last).uses == ("role",)
    assert signature_of(g.sum_compare).params["value"].type == "number"
