"""Proposal mode hooks (macp.mode.proposal.v1): proposals, counter-proposals, accepts, rejects, withdrawals.

The phase is recomputed from the state after every accepted message (modes.md §3.5): a terminal
rejection wins, then convergence of any Live proposal under the policy's acceptance criterion.
"""
from __future__ import annotations

from .common import is_blank
from .context import HookContext
from .policy_rules import PROPOSAL_SCHEMA, rules_for, unsupported_schema_reasons

LIVE = "Live"
WITHDRAWN = "Withdrawn"


def initial_state(session) -> dict:
    return {"proposals": {}, "accepts": {}, "terminal_rejections": [], "rejections": []}


def _rules(ctx: HookContext) -> dict:
    return rules_for(ctx.session.policy, PROPOSAL_SCHEMA)


def _live(state: dict, proposal_id: str) -> bool:
    record = state["proposals"].get(proposal_id)
    return record is not None and record["disposition"] == LIVE


def _counter_proposals(state: dict) -> int:
    return sum(1 for p in state["proposals"].values() if p["supersedes_proposal_id"] is not None)


def _accepted(session, state: dict, criterion: str, record: dict) -> bool:
    """Whether the Live proposal `record` meets the acceptance criterion."""
    pid = record["proposal_id"]
    accepts = state["accepts"]
    if criterion == "counterparty":
        return all(accepts.get(p) == pid for p in session.participants if p != record["proposer"])
    if criterion == "initiator":
        return accepts.get(session.initiator) == pid
    # all_parties, and any unrecognised criterion
    return bool(session.participants) and all(accepts.get(p) == pid for p in session.participants)


def _converged(ctx: HookContext) -> bool:
    criterion = _rules(ctx)["acceptance"]["criterion"]
    return any(r["disposition"] == LIVE and _accepted(ctx.session, ctx.state, criterion, r)
               for r in ctx.state["proposals"].values())


# --- guards --------------------------------------------------------------------------------------

def proposal_id_present(ctx: HookContext) -> bool:
    return not is_blank(ctx.payload.proposal_id)


def proposal_id_unused(ctx: HookContext) -> bool:
    return ctx.payload.proposal_id not in ctx.state["proposals"]


def supersedes_present(ctx: HookContext) -> bool:
    return not is_blank(ctx.payload.supersedes_proposal_id)


def supersedes_known(ctx: HookContext) -> bool:
    return ctx.payload.supersedes_proposal_id in ctx.state["proposals"]


def within_round_limit(ctx: HookContext) -> bool:
    limit = _rules(ctx)["counter_proposal"]["max_rounds"]
    return limit == 0 or _counter_proposals(ctx.state) < limit


def proposal_live(ctx: HookContext) -> bool:
    return _live(ctx.state, ctx.payload.proposal_id)


def proposal_known(ctx: HookContext) -> bool:
    return ctx.payload.proposal_id in ctx.state["proposals"]


def sender_is_proposer(ctx: HookContext) -> bool:
    return ctx.state["proposals"][ctx.payload.proposal_id]["proposer"] == ctx.sender


def not_withdrawn(ctx: HookContext) -> bool:
    return ctx.state["proposals"][ctx.payload.proposal_id]["disposition"] != WITHDRAWN


# --- phase selection (after the effects) ---------------------------------------------------------

def terminally_rejected(ctx: HookContext) -> bool:
    return bool(ctx.state["terminal_rejections"])


converged = _converged


def commitment_ready(ctx: HookContext) -> bool:
    """§3.7: after a refresh the phase is Converged or TerminalRejected."""
    return terminally_rejected(ctx) or _converged(ctx)


# --- effects -------------------------------------------------------------------------------------

def record_proposal(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["proposals"][p.proposal_id] = {
        "proposal_id": p.proposal_id, "title": p.title, "summary": p.summary, "details": list(p.details),
        "tags": list(p.tags), "proposer": ctx.sender, "supersedes_proposal_id": None, "disposition": LIVE,
    }


def record_counter_proposal(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["proposals"][p.proposal_id] = {
        "proposal_id": p.proposal_id, "title": p.title, "summary": p.summary, "details": list(p.details),
        "tags": [], "proposer": ctx.sender, "supersedes_proposal_id": p.supersedes_proposal_id,
        "disposition": LIVE,
    }


def record_accept(ctx: HookContext) -> None:
    ctx.state["accepts"][ctx.sender] = ctx.payload.proposal_id


def record_reject(ctx: HookContext) -> None:
    p = ctx.payload
    terminal = p.terminal or _rules(ctx)["rejection"]["terminal_on_any_reject"]
    ctx.state["rejections"].append(
        {"proposal_id": p.proposal_id, "sender": ctx.sender, "reason": p.reason, "terminal": terminal})
    if terminal:
        ctx.state["terminal_rejections"].append(
            {"proposal_id": p.proposal_id, "sender": ctx.sender, "reason": p.reason})


def record_withdraw(ctx: HookContext) -> None:
    pid = ctx.payload.proposal_id
    state = ctx.state
    state["proposals"][pid]["disposition"] = WITHDRAWN
    state["accepts"] = {sender: target for sender, target in state["accepts"].items() if target != pid}
    state["terminal_rejections"] = [r for r in state["terminal_rejections"] if r["proposal_id"] != pid]


# --- commitment evaluator (§10.8.2) --------------------------------------------------------------

def proposal_policy(ctx: HookContext) -> list[str]:
    reasons = unsupported_schema_reasons(ctx.session.policy)
    if reasons:
        return reasons
    limit = _rules(ctx)["counter_proposal"]["max_rounds"]
    count = _counter_proposals(ctx.state)
    if limit > 0 and count > limit:
        return [f"counter-proposal limit exceeded: {count} of {limit} allowed"]
    return []
