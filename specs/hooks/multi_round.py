"""Multi-round extension hooks (ext.multi_round.v1): JSON contributions until every participant agrees.

`round` counts value changes, not synchronous rounds; convergence (all participants contributed and
all values equal) is sticky. The resolution is a compact JSON summary (modes.md §7.6).
"""
from __future__ import annotations

import json

from .context import HookContext, Reject


def initial_state(session) -> dict:
    return {"round": 0, "participants": list(session.participants), "contributions": {},
            "convergence_type": "all_equal", "converged": False}


# --- payload decoding ------------------------------------------------------------------------------

class _Pairs(list):
    """A JSON object kept as its (key, value) pairs, so duplicate keys stay visible."""


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def decode_contribution(raw: bytes) -> str:
    """`{"value": "<string>"}` (other keys ignored) or `["<string>"]`; returns the value."""
    def bad(why: str):
        return Reject("InvalidPayload", detail=f"Contribute payload: {why}")

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("not valid UTF-8") from None
    try:
        data = json.loads(text, object_pairs_hook=_Pairs, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise bad("not valid JSON") from None
    if isinstance(data, _Pairs):
        values = [v for k, v in data if k == "value"]
        if any(_has_surrogate(k) for k, _ in data):
            raise bad("a key holds an unpaired surrogate")
        if len(values) != 1:
            raise bad("exactly one `value` key is required")
        value = values[0]
    elif isinstance(data, list) and not isinstance(data, _Pairs):
        if len(data) != 1:
            raise bad("the positional form has exactly one element")
        value = data[0]
    else:
        raise bad("expected an object with a string `value`")
    if not isinstance(value, str) or _has_surrogate(value):
        raise bad("`value` must be a string")
    return value


# --- phase selection -------------------------------------------------------------------------------

def converged(ctx: HookContext) -> bool:
    return ctx.state["converged"]


# --- effects ---------------------------------------------------------------------------------------

def _store_contribution(ctx: HookContext) -> dict:
    """Keep the sender's value (a changed or first value starts a new round); the contributions."""
    state = ctx.state
    contributions = state["contributions"]
    if ctx.sender not in contributions or contributions[ctx.sender] != ctx.payload:
        state["round"] += 1
        contributions[ctx.sender] = ctx.payload
    return contributions


def record_contribution(ctx: HookContext) -> None:
    contributions = _store_contribution(ctx)
    state = ctx.state
    if all(p in contributions for p in state["participants"]) and len(set(contributions.values())) <= 1:
        state["converged"] = True


# --- resolution (§7.6) -----------------------------------------------------------------------------

def resolution(ctx: HookContext) -> bytes:
    """Compact JSON `{"converged_value", "round", "final"}` with `final` keys sorted."""
    state = ctx.state
    final = dict(sorted(state["contributions"].items()))
    first = next(iter(final.values()), "")
    doc = {"converged_value": first, "round": state["round"], "final": final}
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
