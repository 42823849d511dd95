"""Generic hooks for modes written in YAML only (no Python of their own).

They work on a small message log kept as the mode state (`state.initial: generic.message_log`,
effect `generic.record`) and take their parameters from the spec, for example
`ready: {hook: generic.count_at_least, message: Bid, count: 2}`. JSON payloads
(`payloads: {Bid: json}`) are dicts; protobuf payloads are read field by field; other payloads are
recorded by sender only. `macp-runtime hooks` prints this catalogue with every parameter.
"""
from __future__ import annotations

import math
import re

from .common import is_blank
from .context import HookContext
from .contract import CONDITION_USES, OPERATORS, hook

_MISSING = object()


@hook("state", text="a message log: who sent each message type, and the JSON payloads")
def message_log(session) -> dict:
    """State: who sent each message type (in order), and the JSON payloads per type and sender."""
    return {"sent": {}, "values": {}, "last": {}, "all": {}}


def _field(payload, path: str):
    """`payload[path]` for a JSON object, `getattr` for a protobuf message; dots reach deeper."""
    value = payload
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif value is not _MISSING and hasattr(value, "DESCRIPTOR") and part in value.DESCRIPTOR.fields_by_name:
            value = getattr(value, part)
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def _compare(left, op: str, right) -> bool:
    """Numbers compare as numbers, strings as strings; anything else (or a mix) is only ever ≠."""
    op = OPERATORS[op]
    ln, rn = _number(left), _number(right)
    if ln is not None and rn is not None:
        left, right = ln, rn
    elif not (isinstance(left, str) and isinstance(right, str)):
        if op == "=":
            return False
        if op == "≠":
            return left is not _MISSING and right is not _MISSING and left != right
        return False
    if op == ">":
        return left > right
    if op == "≥":
        return left >= right
    if op == "<":
        return left < right
    if op == "≤":
        return left <= right
    if op == "=":
        return left == right
    return left != right


# --- effects ---------------------------------------------------------------------------------------

@hook("effect", text="record the sender (and a JSON payload) in the message log")
def record(ctx: HookContext) -> None:
    """Append the sender to the message type's log and keep its JSON payload."""
    state = ctx.state
    state["sent"].setdefault(ctx.message_type, []).append(ctx.sender)
    if isinstance(ctx.payload, dict):
        state["values"].setdefault(ctx.message_type, {})[ctx.sender] = ctx.payload
        state["last"][ctx.message_type] = {"sender": ctx.sender, "payload": ctx.payload}
        state.setdefault("all", {}).setdefault(ctx.message_type, []).append(ctx.payload)


# --- guards: the sender ----------------------------------------------------------------------------

@hook("guard", text="the sender has not sent this message type before")
def first_from_sender(ctx: HookContext) -> bool:
    """The sender has not sent this message type before."""
    return ctx.sender not in ctx.state["sent"].get(ctx.message_type, ())


@hook(*CONDITION_USES, message="message", count="count",
      text="the sender has sent {message} fewer than {count} times")
def sender_sent_fewer_than(ctx: HookContext, message: str, count: int) -> bool:
    """Counts per sender: this sender's earlier `message`s number fewer than `count`."""
    return ctx.state["sent"].get(message, []).count(ctx.sender) < count


# --- guards: payload fields ------------------------------------------------------------------------

@hook(*CONDITION_USES, fields="fields", text="the payload has a non-blank string for each of {fields}")
def has_fields(ctx: HookContext, fields: list) -> bool:
    """The JSON payload has a non-blank string for each of the named fields."""
    return all(isinstance(v := _field(ctx.payload, f), str) and not is_blank(v) for f in fields)


@hook(*CONDITION_USES, field="field", op="op", value="scalar", text="payload field `{field}` {op} {value}")
def field_compare(ctx: HookContext, field: str, op: str, value) -> bool:
    """The payload field compares to a constant (>, >=, <, <=, =, != or ≥ ≤ ≠); a missing field fails."""
    return _compare(_field(ctx.payload, field), op, value)


@hook(*CONDITION_USES, field="field", op="op", other="field", text="payload field `{field}` {op} field `{other}`")
def fields_compare(ctx: HookContext, field: str, op: str, other: str) -> bool:
    """Two payload fields compare (numbers as numbers, strings as strings); a missing field fails."""
    return _compare(_field(ctx.payload, field), op, _field(ctx.payload, other))


@hook(*CONDITION_USES, field="field", values="list", text="payload field `{field}` is one of {values}")
def field_in(ctx: HookContext, field: str, values: list) -> bool:
    """The payload field is one of the listed values."""
    return _field(ctx.payload, field) in values


@hook(*CONDITION_USES, field="field", values="list", text="payload field `{field}` is none of {values}")
def field_not_in(ctx: HookContext, field: str, values: list) -> bool:
    """The payload field is present and none of the listed values."""
    value = _field(ctx.payload, field)
    return value is not _MISSING and value not in values


_PATTERNS: dict[str, re.Pattern] = {}


@hook(*CONDITION_USES, field="field", pattern="regex", text="payload field `{field}` matches /{pattern}/")
def field_matches(ctx: HookContext, field: str, pattern: str) -> bool:
    """The payload field is a string matching the regular expression as a whole."""
    value = _field(ctx.payload, field)
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = _PATTERNS[pattern] = re.compile(pattern)
    return isinstance(value, str) and compiled.fullmatch(value) is not None


@hook(*CONDITION_USES, field="field", text="payload field `{field}` names a declared participant")
def field_is_participant(ctx: HookContext, field: str) -> bool:
    """The payload field names a declared participant."""
    return _field(ctx.payload, field) in ctx.session.participant_set


@hook(*CONDITION_USES, field="field", text="payload field `{field}` names the initiator")
def field_is_initiator(ctx: HookContext, field: str) -> bool:
    """The payload field names the session's initiator."""
    return _field(ctx.payload, field) == ctx.session.initiator


@hook(*CONDITION_USES, field="field", message="message", text="payload field `{field}` names a sender of {message}")
def field_names_sender_of(ctx: HookContext, field: str, message: str) -> bool:
    """The payload field names someone who has sent `message` in this session."""
    return _field(ctx.payload, field) in ctx.state["sent"].get(message, ())


@hook(*CONDITION_USES, field="field", text="payload field `{field}` names someone other than the sender")
def field_is_not_sender(ctx: HookContext, field: str) -> bool:
    """The payload field names someone other than the sender."""
    value = _field(ctx.payload, field)
    return value is not _MISSING and value != ctx.sender


# --- conditions on the log (phase branches, readiness, guards) -------------------------------------

@hook(*CONDITION_USES, message="message", text="every declared participant has sent {message}")
def all_participants_sent(ctx: HookContext, message: str) -> bool:
    """Every declared participant has sent `message` at least once."""
    sent = ctx.state["sent"].get(message, ())
    return all(p in sent for p in ctx.session.participants)


@hook(*CONDITION_USES, message="message", count="count", text="at least {count} different senders have sent {message}")
def count_at_least(ctx: HookContext, message: str, count: int) -> bool:
    """At least `count` different senders have sent `message`."""
    return len(set(ctx.state["sent"].get(message, ()))) >= count


@hook(*CONDITION_USES, message="message", op="op", count="count", text="the number of {message} messages {op} {count}")
def count_compare(ctx: HookContext, message: str, op: str, count: int) -> bool:
    """The number of `message`s accepted so far (from all senders) compares to `count`."""
    return _compare(len(ctx.state["sent"].get(message, ())), op, count)


@hook(*CONDITION_USES, message="message", text="someone has sent {message}")
def any_sent(ctx: HookContext, message: str) -> bool:
    """Someone has sent `message`."""
    return bool(ctx.state["sent"].get(message))


@hook(*CONDITION_USES, message="message", text="nobody has sent {message} yet")
def none_sent(ctx: HookContext, message: str) -> bool:
    """Nobody has sent `message` yet."""
    return not ctx.state["sent"].get(message)


@hook(*CONDITION_USES, message="message", field="message_field", op="op", value="number",
      text="the sum of `{field}` over all {message} messages {op} {value}")
def sum_compare(ctx: HookContext, message: str, field: str, op: str, value) -> bool:
    """The sum of a numeric JSON field over every recorded `message` compares to `value` (non-numbers count 0)."""
    total = 0
    for payload in ctx.state.get("all", {}).get(message, ()):
        n = _number(_field(payload, field))
        total += n if n is not None else 0
    return _compare(total, op, value)


@hook(*CONDITION_USES, field="field", message="message", of="message_field",
      text="payload field `{field}` names the sender of the highest `{of}` among the {message} messages")
def field_names_top_sender(ctx: HookContext, field: str, message: str, of: str) -> bool:
    """The payload field names the sender whose last `message` has the largest numeric `of` (a tie: any of them)."""
    best, senders = None, set()
    for sender, payload in ctx.state["values"].get(message, {}).items():
        n = _number(_field(payload, of))
        if n is None:
            continue
        if best is None or n > best:
            best, senders = n, {sender}
        elif n == best:
            senders.add(sender)
    return _field(ctx.payload, field) in senders


# --- roles (session, sender) -----------------------------------------------------------------------

@hook("role", message="message", field="message_field", text="whoever the last {message} named in `{field}` (the initiator before)")
def named_by_last(session, sender: str, message: str, field: str) -> bool:
    """Whoever the last `message` named in `field`; the initiator until there is one."""
    last = session.state["last"].get(message)
    holder = last["payload"].get(field) if last else session.initiator
    return sender == holder


# --- session start ---------------------------------------------------------------------------------

@hook("start", count="count", text="the session declares at least {count} participants")
def min_participants(session, count: int) -> bool:
    """The session declares at least `count` participants."""
    return len(session.participants) >= count


@hook("start", text="the initiator is not among the participants")
def initiator_not_participant(session) -> bool:
    """The initiator is not among the declared participants (an auctioneer does not bid)."""
    return session.initiator not in session.participant_set
