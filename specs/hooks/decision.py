"""Decision mode hooks (macp.mode.decision.v1): value normalisation, per-proposal votes, evaluator."""
from __future__ import annotations

from .common import is_blank
from .context import HookContext
from .policy_rules import (
    DECISION_SCHEMA,
    evaluation_shortfall,
    format_quorum_value,
    quorum_met,
    unsupported_schema_reasons,
)

RECOMMENDATIONS = frozenset({"APPROVE", "REVIEW", "BLOCK", "REJECT"})
VOTES = frozenset({"APPROVE", "REJECT", "ABSTAIN"})
SEVERITIES = frozenset({"critical", "high", "medium", "low"})


def initial_state(session) -> dict:
    return {"proposals": {}, "evaluations": [], "objections": [], "votes": {}}


# --- guards --------------------------------------------------------------------------------------

def proposal_fields_present(ctx: HookContext) -> bool:
    return not is_blank(ctx.payload.proposal_id) and not is_blank(ctx.payload.option)


def proposal_is_new(ctx: HookContext) -> bool:
    return ctx.payload.proposal_id not in ctx.state["proposals"]


def proposal_known(ctx: HookContext) -> bool:
    return ctx.payload.proposal_id in ctx.state["proposals"]


def recommendation_known(ctx: HookContext) -> bool:
    return ctx.payload.recommendation.upper() in RECOMMENDATIONS


def confidence_in_range(ctx: HookContext) -> bool:
    # Written as "not outside" so that NaN passes, as in the reference.
    c = ctx.payload.confidence
    return not (c < 0.0 or c > 1.0)


def severity_known(ctx: HookContext) -> bool:
    severity = ctx.payload.severity
    return severity == "" or severity.lower() in SEVERITIES


def vote_known(ctx: HookContext) -> bool:
    return ctx.payload.vote.upper() in VOTES


def first_vote_on_proposal(ctx: HookContext) -> bool:
    return ctx.sender not in ctx.state["votes"].get(ctx.payload.proposal_id, ())


def has_proposal(ctx: HookContext) -> bool:
    return bool(ctx.state["proposals"])


# --- effects (run after the message is durable) --------------------------------------------------

def record_proposal(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["proposals"][p.proposal_id] = {
        "proposal_id": p.proposal_id, "option": p.option, "rationale": p.rationale, "sender": ctx.sender,
    }


def record_evaluation(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["evaluations"].append({
        "proposal_id": p.proposal_id, "recommendation": p.recommendation.upper(),
        "confidence": p.confidence, "reason": p.reason, "sender": ctx.sender,
    })


def record_objection(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["objections"].append({
        "proposal_id": p.proposal_id, "reason": p.reason,
        "severity": p.severity.lower() if p.severity else "medium", "sender": ctx.sender,
    })


def record_vote(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["votes"].setdefault(p.proposal_id, {})[ctx.sender] = {
        "proposal_id": p.proposal_id, "vote": p.vote.upper(), "reason": p.reason, "sender": ctx.sender,
    }


# --- commitment evaluator (§10.8.1) --------------------------------------------------------------

def decision_policy(ctx: HookContext) -> list[str]:
    policy = ctx.session.policy
    reasons = unsupported_schema_reasons(policy)
    if reasons or policy is None:
        return reasons
    rules = policy.parsed(DECISION_SCHEMA)
    state = ctx.state
    participants = len(ctx.session.participants)

    shortfall = evaluation_shortfall(rules["evaluation"], state["evaluations"])
    if shortfall is not None:
        reasons.append(shortfall[0])

    veto = rules["objection_handling"]
    if veto["critical_severity_vetoes"]:
        critical = [o["sender"] for o in state["objections"] if o["severity"] == "critical"]
        if len(critical) >= veto["veto_threshold"]:
            reasons.append(
                f"blocked by {len(critical)} blocking objection(s) (veto threshold: {veto['veto_threshold']}), "
                f"from: {', '.join(critical)}")

    voting = rules["voting"]
    require_quorum = rules["commitment"]["require_vote_quorum"]
    voters = {sender for by_sender in state["votes"].values() for sender in by_sender}
    q = voting["quorum"]
    if require_quorum and not quorum_met(q["type"], q["value"], len(voters), participants):
        reasons.append(
            f"vote quorum not met: {len(voters)} voters of {participants} participants "
            f"(quorum: {format_quorum_value(q['value'])} {q['type']})")

    algorithm = voting["algorithm"]
    if algorithm != "none":
        reasons.extend(_algorithm_reasons(algorithm, voting, state, ctx.session, require_quorum))
    return reasons


def _algorithm_reasons(algorithm, voting, state, session, require_quorum) -> list[str]:
    all_votes = [v for by_sender in state["votes"].values() for v in by_sender.values()]
    approve = sum(1 for v in all_votes if v["vote"] == "APPROVE")
    reject = sum(1 for v in all_votes if v["vote"] == "REJECT")
    no_votes = ["no votes cast"] if require_quorum else []
    if algorithm == "weighted":
        weights = voting["weights"]
        total = approve_w = 0.0
        for v in all_votes:
            if v["vote"] in ("APPROVE", "REJECT"):
                w = weights.get(v["sender"], 1.0)
                total += w
                if v["vote"] == "APPROVE":
                    approve_w += w
        if total == 0:
            return no_votes
        ratio = approve_w / total
        if ratio >= voting["threshold"]:
            return []
        return [f"weighted vote failed: {ratio * 100:.1f}% weighted approve, need >= {voting['threshold'] * 100:.1f}%"]
    cast = approve + reject
    if cast == 0:
        return no_votes
    ratio = approve / cast
    if algorithm == "majority":
        if ratio >= voting["threshold"]:
            return []
        return [f"majority vote failed: {ratio * 100:.1f}% approve, need >= {voting['threshold'] * 100:.1f}%"]
    if algorithm == "supermajority":
        needed = voting["threshold"] if voting["threshold"] > 0.5 else 2 / 3
        if ratio >= needed:
            return []
        return [f"supermajority vote failed: {ratio * 100:.1f}% approve, need >= {needed * 100:.1f}%"]
    if algorithm == "unanimous":
        approvers = {v["sender"] for v in all_votes if v["vote"] == "APPROVE"}
        if reject == 0 and all(p in approvers for p in session.participants):
            return []
        return [f"unanimous vote failed: {approve} approve, {reject} reject out of {len(session.participants)} participants"]
    if algorithm == "plurality":
        if approve > reject:
            return []
        if approve == reject:
            return [f"plurality vote tied: {approve} approve vs {reject} reject"]
        return [f"plurality vote failed: {approve} approve vs {reject} reject"]
    return [f"unknown voting algorithm '{algorithm}'; supported: majority, supermajority, unanimous, weighted, plurality, none"]
