"""Task mode hooks (macp.mode.task.v1): one delegated task, assignee responses, progress and a report.

"Task id matches" (modes.md §4.4) means the payload's task_id is non-empty and equals the stored one.
The phase is derived from the state after every message: Requested (no active assignee),
Assigned (an active assignee), Reported (a Complete/Fail report exists).
"""
from __future__ import annotations

from .context import HookContext
from .policy_rules import TASK_SCHEMA, rules_for, unsupported_schema_reasons


def initial_state(session) -> dict:
    return {"task": None, "active_assignee": None, "rejections": [], "updates": [], "terminal_report": None}


def two_or_more_participants(session) -> bool:
    return len(session.participants) >= 2


def _allow_reassignment(ctx: HookContext) -> bool:
    return rules_for(ctx.session.policy, TASK_SCHEMA)["assignment"]["allow_reassignment_on_reject"]


def _eligible(ctx: HookContext) -> bool:
    """E(sender): the requested assignee if one is named, else any participant but the initiator."""
    requested = ctx.state["task"]["requested_assignee"]
    if requested:
        return ctx.sender == requested
    return ctx.sender in ctx.session.participant_set and ctx.sender != ctx.session.initiator


# --- guards: TaskRequest -------------------------------------------------------------------------

def task_id_present(ctx: HookContext) -> bool:
    return ctx.payload.task_id != ""


def requested_assignee_participates(ctx: HookContext) -> bool:
    assignee = ctx.payload.requested_assignee
    return assignee == "" or assignee in ctx.session.participant_set


# --- guards: responses and reports ---------------------------------------------------------------

def task_id_matches(ctx: HookContext) -> bool:
    task_id = ctx.payload.task_id
    return task_id != "" and task_id == ctx.state["task"]["task_id"]


def no_active_assignee(ctx: HookContext) -> bool:
    return ctx.state["active_assignee"] is None


def reassignment_permitted(ctx: HookContext) -> bool:
    return not ctx.state["rejections"] or _allow_reassignment(ctx)


def assignee_field_is_sender(ctx: HookContext) -> bool:
    assignee = ctx.payload.assignee
    return assignee == "" or assignee == ctx.sender


def eligible_responder(ctx: HookContext) -> bool:
    return _eligible(ctx)


def active_assignee_may_reject(ctx: HookContext) -> bool:
    return ctx.state["active_assignee"] != ctx.sender or _allow_reassignment(ctx)


def sender_is_active_if_any(ctx: HookContext) -> bool:
    active = ctx.state["active_assignee"]
    return active is None or active == ctx.sender


def eligible_if_unassigned(ctx: HookContext) -> bool:
    return ctx.state["active_assignee"] is not None or _eligible(ctx)


def first_rejection_by_sender(ctx: HookContext) -> bool:
    return all(r["assignee"] != ctx.sender for r in ctx.state["rejections"])


def active_and_unreported(ctx: HookContext) -> bool:
    return ctx.state["terminal_report"] is None and ctx.state["active_assignee"] == ctx.sender


# --- phase selection and readiness ---------------------------------------------------------------

def reported(ctx: HookContext) -> bool:
    return ctx.state["terminal_report"] is not None


def assigned(ctx: HookContext) -> bool:
    return ctx.state["active_assignee"] is not None


# --- effects -------------------------------------------------------------------------------------

def record_request(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["task"] = {
        "task_id": p.task_id, "title": p.title, "instructions": p.instructions,
        "requested_assignee": p.requested_assignee, "input": list(p.input),
        "deadline_unix_ms": p.deadline_unix_ms, "requester": ctx.sender,
    }


def record_accept(ctx: HookContext) -> None:
    ctx.state["active_assignee"] = ctx.sender


def record_reject(ctx: HookContext) -> None:
    if ctx.state["active_assignee"] == ctx.sender:
        ctx.state["active_assignee"] = None
    ctx.state["rejections"].append(
        {"task_id": ctx.payload.task_id, "assignee": ctx.sender, "reason": ctx.payload.reason})


def record_update(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["updates"].append({
        "task_id": p.task_id, "status": p.status, "progress": p.progress, "message": p.message,
        "partial_output": list(p.partial_output), "sender": ctx.sender,
    })


def record_complete(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["terminal_report"] = {"Complete": {
        "task_id": p.task_id, "assignee": ctx.sender, "output": list(p.output), "summary": p.summary,
    }}


def record_fail(ctx: HookContext) -> None:
    p = ctx.payload
    ctx.state["terminal_report"] = {"Fail": {
        "task_id": p.task_id, "assignee": ctx.sender, "error_code": p.error_code, "reason": p.reason,
        "retryable": p.retryable,
    }}


# --- commitment evaluator (§10.8.3) --------------------------------------------------------------

def task_policy(ctx: HookContext) -> list[str]:
    reasons = unsupported_schema_reasons(ctx.session.policy)
    if reasons:
        return reasons
    if rules_for(ctx.session.policy, TASK_SCHEMA)["completion"]["require_output"]:
        report = ctx.state["terminal_report"] or {}
        complete = report.get("Complete")
        if complete is None or not complete["output"]:
            return ["policy requires task output before commitment"]
    return []
