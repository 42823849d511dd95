"""Handoff mode hooks (macp.mode.handoff.v1): serial offers, context, target responses, implicit accept.

The phase is derived from the offers after every message: Accepted (some offer accepted; no more
offers), Offered (one offer pending), AwaitingOffer (no offer yet, or only declined ones).
"""
from __future__ import annotations

from .context import HookContext
from .policy_rules import HANDOFF_SCHEMA, rules_for, unsupported_schema_reasons

OFFERED = "Offered"
ACCEPTED = "Accepted"
DECLINED = "Declined"
IMPLICIT_REASON = "implicit accept (timeout)"


def initial_state(session) -> dict:
    return {"offers": {}, "contexts": {}}


def two_or_more_participants(session) -> bool:
    return len(session.participants) >= 2


def _offer(ctx: HookContext) -> dict:
    return ctx.state["offers"][ctx.payload.handoff_id]


def _timed_out(ctx: HookContext) -> list[str]:
    """Ids of pending offers that the policy's implicit-accept timeout converts at this Commitment."""
    timeout = rules_for(ctx.session.policy, HANDOFF_SCHEMA)["acceptance"]["implicit_accept_timeout_ms"]
    if timeout <= 0:
        return []
    now = ctx.timestamp_ms
    return [hid for hid, o in ctx.state["offers"].items()
            if o["disposition"] == OFFERED and o["offered_at_ms"] > 0 and now - o["offered_at_ms"] >= timeout]


# --- guards: HandoffOffer ------------------------------------------------------------------------

def offer_fields_valid(ctx: HookContext) -> bool:
    p = ctx.payload
    return (p.handoff_id != "" and p.target_participant != "" and p.handoff_id not in ctx.state["offers"]
            and p.target_participant in ctx.session.participant_set and p.target_participant != ctx.sender)


# --- guards: context and responses ---------------------------------------------------------------

def offer_known(ctx: HookContext) -> bool:
    return ctx.payload.handoff_id in ctx.state["offers"]


def sender_is_offerer(ctx: HookContext) -> bool:
    return _offer(ctx)["offered_by"] == ctx.sender


def sender_is_target(ctx: HookContext) -> bool:
    return _offer(ctx)["target_participant"] == ctx.sender


def accepted_by_is_sender(ctx: HookContext) -> bool:
    return ctx.payload.accepted_by in ("", ctx.sender)


def declined_by_is_sender(ctx: HookContext) -> bool:
    return ctx.payload.declined_by in ("", ctx.sender)


def offer_pending(ctx: HookContext) -> bool:
    return _offer(ctx)["disposition"] == OFFERED


# --- phase selection and readiness ---------------------------------------------------------------

def any_accepted(ctx: HookContext) -> bool:
    return any(o["disposition"] == ACCEPTED for o in ctx.state["offers"].values())


def any_pending(ctx: HookContext) -> bool:
    return any(o["disposition"] == OFFERED for o in ctx.state["offers"].values())


def commitment_ready(ctx: HookContext) -> bool:
    """§5.6: some offer is Accepted or Declined once the implicit-accept pass has run (not mutated here)."""
    converted = set(_timed_out(ctx))
    return bool(converted) or any(o["disposition"] in (ACCEPTED, DECLINED) for o in ctx.state["offers"].values())


# --- effects -------------------------------------------------------------------------------------

def record_offer(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["offers"][p.handoff_id] = {
        "handoff_id": p.handoff_id, "target_participant": p.target_participant, "scope": p.scope,
        "reason": p.reason, "offered_by": ctx.sender, "disposition": OFFERED, "accepted_by": None,
        "declined_by": None, "outcome_reason": None, "offered_at_ms": ctx.timestamp_ms,
    }


def record_context(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["contexts"].setdefault(p.handoff_id, []).append(
        {"content_type": p.content_type, "context": list(p.context), "sender": ctx.sender})


def record_accept(ctx: HookContext) -> None:
    offer = _offer(ctx)
    offer.update(disposition=ACCEPTED, accepted_by=ctx.sender, outcome_reason=ctx.payload.reason)


def record_decline(ctx: HookContext) -> None:
    offer = _offer(ctx)
    offer.update(disposition=DECLINED, declined_by=ctx.sender, outcome_reason=ctx.payload.reason)


def apply_implicit_accepts(ctx: HookContext) -> None:
    for hid in _timed_out(ctx):
        offer = ctx.state["offers"][hid]
        offer.update(disposition=ACCEPTED, accepted_by=offer["target_participant"], outcome_reason=IMPLICIT_REASON)


# --- commitment evaluator (§10.8.4) --------------------------------------------------------------

def handoff_policy(ctx: HookContext) -> list[str]:
    return unsupported_schema_reasons(ctx.session.policy)
