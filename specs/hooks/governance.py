"""Commitment evaluators of the current protocol line (current.md §13.5), named by the specs in
`specs/current/`: policy schema versions 1–3, outcome-aware (a negative Commitment is gated
differently from a positive one), and every deny reason carries a deny code (§13.6) that the
runtime sends in `POLICY_DENIED` details as `denials[]`.

A reason is a `Denial`: a `str` (the human text, exactly what v0.4.0-style reasons are) that also
carries `code` and `participants`; anything that joins or prints reasons keeps working.
"""
from __future__ import annotations

import math

from . import policy_rules as v1
from .context import HookContext
from .policy_rules import (
    U32_MAX,
    BoundPolicy,
    RuleTypeError,
    evaluation_shortfall,
    format_quorum_value,
    parse_group,
    quorum_met,
)

SUPPORTED_SCHEMA_VERSIONS = (1, 2, 3)


class Denial(str):
    """One deny reason with its code (current.md §3.4 `denials[i]`)."""

    code: str
    participants: tuple

    def __new__(cls, message: str, code: str = "unspecified", participants=()):
        self = super().__new__(cls, message)
        self.code = code
        self.participants = tuple(participants)
        return self


# The rule schemas of the current line, named by the specs in `specs/current/` (`policy_rules`): the
# v0.4.0 groups of policy_rules.py plus what §13.1–§13.2 change. RegisterPolicy checks rules against
# them, closed at every level (runtime/registries/policy_admission.py).
#
# Decision, schema versions 1–3: v0.4.0's keys plus the two version-2 keys, which are read whatever
# version a descriptor declares (current.md §13.1).
DECISION_SCHEMA = {
    **v1.DECISION_SCHEMA,
    "objection_handling": {**v1.DECISION_SCHEMA["objection_handling"], "critical_objection_action": ("str", "deny")},
    "commitment": {**v1.COMMITMENT_SCHEMA, "allow_decline_over_approval": ("bool", False)},
}
# The other four modes' `commitment` group: `authority` and `designated_roles` only (§13.2 row 9).
COMMITMENT_SCHEMA = {key: v1.COMMITMENT_SCHEMA[key] for key in ("authority", "designated_roles")}
PROPOSAL_SCHEMA = {**v1.PROPOSAL_SCHEMA, "commitment": COMMITMENT_SCHEMA}
TASK_SCHEMA = {**v1.TASK_SCHEMA, "commitment": COMMITMENT_SCHEMA}
HANDOFF_SCHEMA = {**v1.HANDOFF_SCHEMA, "commitment": COMMITMENT_SCHEMA}
QUORUM_SCHEMA = {**v1.QUORUM_SCHEMA, "commitment": COMMITMENT_SCHEMA}


def _preamble(policy: BoundPolicy | None, schema: dict) -> tuple[dict | None, list]:
    """(a) unsupported schema version, (b) rules that fail the typed parse → deny; else the rules."""
    if policy is None:
        return None, []
    if policy.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
        return None, [Denial(f"unsupported policy schema version: {policy.schema_version} (supported: [1, 2, 3])",
                             "unsupported_schema_version")]
    try:
        return _parsed(policy, schema), []
    except RuleTypeError as exc:
        return None, [Denial(f"policy '{policy.policy_id}' rules failed to parse at evaluation time: {exc}",
                             "invalid_rules")]


def _parsed(policy: BoundPolicy, schema: dict) -> dict:
    """Strict parse, cached on the bound policy (a type error is not cached: it raises each time)."""
    key = ("strict", id(schema))
    cached = policy._parsed.get(key)
    if cached is None:
        cached = parse_group(schema, policy.rules)
        policy._parsed[key] = cached
    return cached


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


# --- Decision (current.md §13.5.1) ---------------------------------------------------------------

def decision_policy(ctx: HookContext) -> list:
    rules, reasons = _preamble(ctx.session.policy, DECISION_SCHEMA)
    if rules is None:
        return reasons
    positive = ctx.payload.outcome_positive
    state = ctx.state
    participants = ctx.session.participants
    p_count = len(participants)

    # 1. the objection check first: it decides whether this is an objection-authorised decline
    veto_reason = None
    oh = rules["objection_handling"]
    if oh["critical_severity_vetoes"]:
        objectors = [o["sender"] for o in state["objections"] if o["severity"] == "critical"]
        t = oh["veto_threshold"]
        if len(objectors) >= t:
            n = len(objectors)
            action = oh["critical_objection_action"]
            if action == "finalize_decline":
                if not positive:
                    return []   # an objection-authorised decline: evaluation, quorum and votes are not applied
                veto_reason = Denial(f"veto blocks a positive commitment: {n} blocking objection(s) (veto threshold: "
                                     f"{t}) (critical_objection_action=finalize_decline)", "veto", objectors)
            elif action == "hold":
                veto_reason = Denial(f"held for escalation by {n} blocking objection(s) (veto threshold: {t}) "
                                     f"(critical_objection_action=hold)", "veto_hold", objectors)
            else:
                veto_reason = Denial(f"blocked by {n} blocking objection(s) (veto threshold: {t})", "veto", objectors)

    # 2. evaluations
    shortfall = evaluation_shortfall(rules["evaluation"], state["evaluations"])
    if shortfall is not None:
        reasons.append(Denial(*shortfall))
    # 3. the veto reason
    if veto_reason is not None:
        reasons.append(veto_reason)

    # 4. vote quorum (both directions)
    voting = rules["voting"]
    require_quorum = rules["commitment"]["require_vote_quorum"]
    votes = [v for by_sender in state["votes"].values() for v in by_sender.values()]
    voters = {v["sender"] for v in votes}
    q = voting["quorum"]
    if require_quorum and not quorum_met(q["type"], q["value"], len(voters), p_count):
        reasons.append(Denial(f"vote quorum not met: {len(voters)} voters of {p_count} participants "
                              f"(quorum: {format_quorum_value(q['value'])} {q['type']})", "quorum_not_met"))

    # 5. the voting result, mapped by direction
    algorithm = voting["algorithm"]
    if algorithm == "none":
        return reasons
    weights = voting["weights"]
    weighted = algorithm == "weighted"

    def weight(sender: str) -> float:
        return weights.get(sender, 0.0)

    decisive = [v for v in votes if v["vote"] in ("APPROVE", "REJECT") and (not weighted or weight(v["sender"]) > 0)]
    decisive_rejects = sum(1 for v in decisive if v["vote"] == "REJECT")
    schema_version = ctx.session.policy.schema_version
    if not decisive:
        if positive:
            if schema_version >= 3:
                reasons.append(Denial(
                    f"no decisive votes cast: under policy schema_version {schema_version} the '{algorithm}' voting "
                    f"algorithm is binding on an empty tally and does not authorize a positive commitment "
                    f"(RFC-MACP-0012 §4.1)", "no_votes"))
            elif require_quorum:
                reasons.append(Denial("no votes cast", "no_votes"))
        else:
            reasons.append(Denial("no votes cast; a decline requires at least one decisive explicit reject vote",
                                  "decline_not_backed"))
        return reasons
    passed, text, code = _tally(algorithm, voting, decisive, participants, weight)
    if passed:
        if not positive:
            if not rules["commitment"]["allow_decline_over_approval"]:
                reasons.append(Denial(
                    "vote passed the approval threshold but a decline was requested; set "
                    f"commitment.allow_decline_over_approval to permit an executive override ({text})",
                    "decline_over_approval"))
            elif decisive_rejects == 0:
                detail = ("a REJECT from a participant outside voting.weights is non-decisive, and incomplete "
                          "participation is not a rejection" if weighted else
                          "no REJECT was cast; neither an abstention nor a missing ballot is a rejection")
                reasons.append(Denial(f"allow_decline_over_approval permits a decline over a passing vote, but no "
                                      f"decisive reject backs it ({detail}): {text}", "decline_not_backed"))
    elif positive:
        reasons.append(Denial(text, code))
    elif decisive_rejects == 0:
        reasons.append(Denial("approval threshold not met but no decisive reject to justify a decline (incomplete "
                              f"participation is not a rejection): {text}", "decline_not_backed"))
    return reasons


def _tally(algorithm, voting, decisive, participants, weight) -> tuple[bool, str, str]:
    """(passed, the Passed/Failed text, the code of a Failed result against a positive Commitment)."""
    approve = sum(1 for v in decisive if v["vote"] == "APPROVE")
    reject = len(decisive) - approve
    threshold = voting["threshold"]
    if algorithm == "weighted":
        total = sum(weight(v["sender"]) for v in decisive)
        ratio = sum(weight(v["sender"]) for v in decisive if v["vote"] == "APPROVE") / total
        ok = ratio >= threshold
        verb = "passed" if ok else "failed"
        return ok, f"weighted vote {verb}: {_pct(ratio)} weighted approve, need >= {_pct(threshold)}", \
            "threshold_not_met"
    ratio = approve / (approve + reject)
    if algorithm == "majority":
        ok = ratio >= threshold
        return ok, f"majority vote {'passed' if ok else 'failed'}: {_pct(ratio)} approve, need >= {_pct(threshold)}", \
            "threshold_not_met"
    if algorithm == "supermajority":
        needed = threshold if threshold > 0.5 else 2 / 3
        ok = ratio >= needed
        return ok, (f"supermajority vote {'passed' if ok else 'failed'}: {_pct(ratio)} approve, "
                    f"need >= {_pct(needed)}"), "threshold_not_met"
    if algorithm == "unanimous":
        approvers = {v["sender"] for v in decisive if v["vote"] == "APPROVE"}
        ok = reject == 0 and all(p in approvers for p in participants)
        return ok, (f"unanimous vote {'passed' if ok else 'failed'}: {approve} approve, {reject} reject out of "
                    f"{len(participants)} participants"), "threshold_not_met"
    if algorithm == "plurality":
        if approve > reject:
            return True, f"plurality vote passed: {approve} approve vs {reject} reject", "threshold_not_met"
        if approve == reject:
            return False, f"plurality vote tied: {approve} approve vs {reject} reject", "threshold_not_met"
        return False, f"plurality vote failed: {approve} approve vs {reject} reject", "threshold_not_met"
    return False, (f"unknown voting algorithm '{algorithm}'; supported: majority, supermajority, unanimous, "
                   f"weighted, plurality, none"), "invalid_rules"


# --- Proposal (§13.5.2, §12.2) -----------------------------------------------------------------

def proposal_policy(ctx: HookContext) -> list:
    """Positive Commitments only: the counter-proposal limit, then a Live proposal meeting the
    bound acceptance criterion (§12.2: matters only in TerminalRejected sessions)."""
    rules, reasons = _preamble(ctx.session.policy, PROPOSAL_SCHEMA)
    if reasons or not ctx.payload.outcome_positive:
        return reasons
    from . import proposal as proposal_hooks

    if rules is not None:
        max_rounds = rules["counter_proposal"]["max_rounds"]
        counters = proposal_hooks._counter_proposals(ctx.state)
        if max_rounds > 0 and counters > max_rounds:
            return [Denial(f"counter-proposal limit exceeded: {counters} of {max_rounds} allowed")]
    if not proposal_hooks.converged(ctx):
        criterion = proposal_hooks._rules(ctx)["acceptance"]["criterion"]
        return [Denial(f"no live proposal satisfies the '{criterion}' acceptance criterion; a positive "
                       f"commitment requires an accepted proposal", "criterion_not_met")]
    return []


# --- Task (§13.5.3) ------------------------------------------------------------------------------

def task_policy(ctx: HookContext) -> list:
    rules, reasons = _preamble(ctx.session.policy, TASK_SCHEMA)
    if rules is None or not ctx.payload.outcome_positive:
        return reasons
    if rules["completion"]["require_output"]:
        report = ctx.state["terminal_report"] or {}
        complete = report.get("Complete")
        if complete is None or not complete["output"]:
            return [Denial("policy requires task output before commitment", "output_required")]
    return []


# --- Handoff (§13.5.4) ---------------------------------------------------------------------------

def handoff_policy(ctx: HookContext) -> list:
    return _preamble(ctx.session.policy, HANDOFF_SCHEMA)[1]


# --- Quorum (§12.5, §13.5.5) ---------------------------------------------------------------------

UNSATISFIABLE = math.inf


def policy_threshold(session) -> float | None:
    """The effective policy bar E computed from the policy alone: None (no bar), a count, or ∞."""
    policy = session.policy
    if policy is None:
        return None
    if "threshold" not in policy.rules:
        return None
    try:   # only the threshold group is read (SDK effective_quorum_threshold, the runtime's port)
        threshold = parse_group(QUORUM_SCHEMA["threshold"], policy.rules["threshold"], "rules.threshold")
    except RuleTypeError:
        return None
    value = threshold["value"]
    if not value > 0 or not math.isfinite(value):
        return None
    kind = threshold["type"]
    if kind in ("n_of_m", "count"):
        return min(max(1, math.ceil(value)), U32_MAX)
    if kind == "percentage":
        p = len(session.participants)
        if p == 0:
            return UNSATISFIABLE
        if value == int(value):
            return min(max(1, (int(value) * p + 99) // 100), U32_MAX)
        return min(max(1, math.ceil(value * p / 100)), U32_MAX)
    return UNSATISFIABLE


def quorum_required(session, state: dict) -> float:
    """R: the policy bar when the policy sets one (as given, even above P), else required_approvals."""
    bar = policy_threshold(session)
    return state["request"]["required_approvals"] if bar is None else bar


def quorum_ready(ctx: HookContext) -> bool:
    """A request exists and (A ≥ R or A + (P − B) < R); no at-least-one-ballot guard."""
    state = ctx.state
    if state["request"] is None:
        return False
    needed = quorum_required(ctx.session, state)
    ballots = state["ballots"].values()
    approvals = sum(1 for b in ballots if b["choice"] == "Approve")
    outstanding = max(len(ctx.session.participants) - len(state["ballots"]), 0)
    return approvals >= needed or approvals + outstanding < needed


def quorum_policy(ctx: HookContext) -> list:
    rules, reasons = _preamble(ctx.session.policy, QUORUM_SCHEMA)
    if rules is None or not ctx.payload.outcome_positive:
        return reasons
    bar = policy_threshold(ctx.session)
    if bar is None:
        return []
    approvals = sum(1 for b in ctx.state["ballots"].values() if b["choice"] == "Approve")
    threshold = rules["threshold"]
    if bar is UNSATISFIABLE:
        return [Denial(f"approval threshold '{threshold['type']}' cannot be satisfied by this runtime "
                       f"({len(ctx.session.participants)} participants): no positive commitment is possible",
                       "threshold_not_met")]
    if approvals < bar:
        return [Denial(f"approval threshold not met: {approvals} of {bar} required approvals "
                       f"({format_quorum_value(threshold['value'])} {threshold['type']})", "threshold_not_met")]
    return []
