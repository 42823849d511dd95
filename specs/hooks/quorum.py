"""Quorum mode hooks (macp.mode.quorum.v1): one approval request, final ballots, threshold readiness.

The policy's `threshold.value`, when > 0, replaces the request's required_approvals for readiness
(modes.md §6.6) and is also the evaluator's participation quorum (§10.8.5).
"""
from __future__ import annotations

import math

from .context import HookContext
from .policy_rules import QUORUM_SCHEMA, U32_MAX, format_quorum_value, quorum_met, rules_for, unsupported_schema_reasons

APPROVE = "Approve"
REJECT = "Reject"
ABSTAIN = "Abstain"


def initial_state(session) -> dict:
    return {"request": None, "ballots": {}}


def _as_u32(x: float) -> int:
    """A float converted the way a saturating float-to-u32 cast does (NaN -> 0)."""
    if x != x or x <= 0:
        return 0
    if x >= U32_MAX:
        return U32_MAX
    return int(x)


def required_approvals(session, state: dict) -> int:
    """R: the policy threshold if its value is > 0, else the request's required_approvals."""
    threshold = rules_for(session.policy, QUORUM_SCHEMA)["threshold"]
    value = threshold["value"]
    if value > 0:
        if threshold["type"] == "percentage":
            share = value / 100.0 * len(session.participants)
            return _as_u32(math.ceil(share) if math.isfinite(share) else share)
        return _as_u32(value)
    return state["request"]["required_approvals"]


def _count(state: dict, choice: str) -> int:
    return sum(1 for b in state["ballots"].values() if b["choice"] == choice)


# --- guards --------------------------------------------------------------------------------------

def request_valid(ctx: HookContext) -> bool:
    p = ctx.payload
    return p.request_id != "" and 0 < p.required_approvals <= len(ctx.session.participants)


def first_ballot_on_request(ctx: HookContext) -> bool:
    return ctx.payload.request_id == ctx.state["request"]["request_id"] and ctx.sender not in ctx.state["ballots"]


def commitment_ready(ctx: HookContext) -> bool:
    """A request exists and the threshold is met or can no longer be met."""
    state = ctx.state
    if state["request"] is None:
        return False
    needed = required_approvals(ctx.session, state)
    approvals = _count(state, APPROVE)
    outstanding = max(len(ctx.session.participants) - len(state["ballots"]), 0)
    return approvals >= needed or approvals + outstanding < needed


# --- effects -------------------------------------------------------------------------------------

def record_request(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["request"] = {
        "request_id": p.request_id, "action": p.action, "summary": p.summary, "details": list(p.details),
        "required_approvals": p.required_approvals, "requested_by": ctx.sender,
    }


def _ballot(choice: str):
    def record(ctx: HookContext) -> None:
        ctx.state["ballots"][ctx.sender] = {
            "request_id": ctx.payload.request_id, "choice": choice, "sender": ctx.sender, "reason": ctx.payload.reason,
        }
    record.__name__ = f"record_{choice.lower()}"
    return record


record_approve = _ballot(APPROVE)
record_reject = _ballot(REJECT)
record_abstain = _ballot(ABSTAIN)


# --- commitment evaluator (§10.8.5) --------------------------------------------------------------

def quorum_policy(ctx: HookContext) -> list[str]:
    policy = ctx.session.policy
    reasons = unsupported_schema_reasons(policy)
    if reasons:
        return reasons
    rules = rules_for(policy, QUORUM_SCHEMA)
    state = ctx.state
    voters = _count(state, APPROVE) + _count(state, REJECT)
    if rules["abstention"]["counts_toward_quorum"]:
        voters += _count(state, ABSTAIN)
    participants = len(ctx.session.participants)
    threshold = rules["threshold"]
    if threshold["value"] > 0 and not quorum_met(threshold["type"], threshold["value"], voters, participants):
        return [f"quorum not met: {voters} effective voters of {participants} participants "
                f"(threshold: {format_quorum_value(threshold['value'])} {threshold['type']})"]
    return []
