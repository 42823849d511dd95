"""Generic hooks for modes written in YAML only (no Python of their own).

They work on a small message log kept as the mode state (`state.initial: generic.message_log`,
effect `generic.record`) and take their parameters from the spec, for example
`ready: {hook: generic.all_participants_sent, message: SignOff}`. JSON payloads
(`payloads: {Comment: json}`) are dicts; other payloads are recorded by sender only.
"""
from __future__ import annotations

from .common import is_blank
from .context import HookContext


def message_log(session) -> dict:
    """State: who sent each message type (in order), and the last JSON payload per type and sender."""
    return {"sent": {}, "values": {}, "last": {}}


# --- effects ---------------------------------------------------------------------------------------

def record(ctx: HookContext) -> None:
    """Append the sender to the message type's log and keep its JSON payload."""
    state = ctx.state
    state["sent"].setdefault(ctx.message_type, []).append(ctx.sender)
    if isinstance(ctx.payload, dict):
        state["values"].setdefault(ctx.message_type, {})[ctx.sender] = ctx.payload
        state["last"][ctx.message_type] = {"sender": ctx.sender, "payload": ctx.payload}


# --- guards ----------------------------------------------------------------------------------------

def first_from_sender(ctx: HookContext) -> bool:
    """The sender has not sent this message type before."""
    return ctx.sender not in ctx.state["sent"].get(ctx.message_type, ())


def has_fields(ctx: HookContext, fields: list) -> bool:
    """The JSON payload has a non-blank string for each of the named fields."""
    payload = ctx.payload if isinstance(ctx.payload, dict) else {}
    return all(isinstance(payload.get(f), str) and not is_blank(payload[f]) for f in fields)


def field_in(ctx: HookContext, field: str, values: list) -> bool:
    """The JSON payload's field is one of the listed values."""
    return isinstance(ctx.payload, dict) and ctx.payload.get(field) in values


def field_is_participant(ctx: HookContext, field: str) -> bool:
    """The JSON payload's field names a declared participant."""
    return isinstance(ctx.payload, dict) and ctx.payload.get(field) in ctx.session.participant_set


def field_is_not_sender(ctx: HookContext, field: str) -> bool:
    """The JSON payload's field names someone other than the sender."""
    return isinstance(ctx.payload, dict) and ctx.payload.get(field) != ctx.sender


# --- conditions (phase branches, readiness) --------------------------------------------------------

def all_participants_sent(ctx: HookContext, message: str) -> bool:
    """Every declared participant has sent `message` at least once."""
    sent = ctx.state["sent"].get(message, ())
    return all(p in sent for p in ctx.session.participants)


def count_at_least(ctx: HookContext, message: str, count: int) -> bool:
    """At least `count` different senders have sent `message`."""
    return len(set(ctx.state["sent"].get(message, ()))) >= count


def any_sent(ctx: HookContext, message: str) -> bool:
    """Someone has sent `message`."""
    return bool(ctx.state["sent"].get(message))


def none_sent(ctx: HookContext, message: str) -> bool:
    """Nobody has sent `message` yet."""
    return not ctx.state["sent"].get(message)


# --- roles (session, sender) -----------------------------------------------------------------------

def named_by_last(session, sender: str, message: str, field: str) -> bool:
    """Whoever the last `message` named in `field`; the initiator until there is one."""
    last = session.state["last"].get(message)
    holder = last["payload"].get(field) if last else session.initiator
    return sender == holder


# --- session start ---------------------------------------------------------------------------------

def min_participants(session, count: int) -> bool:
    """The session declares at least `count` participants."""
    return len(session.participants) >= count
