"""Mode rules of the current protocol line (semantics_rev 4, current.md §6, §12), named by the specs
in `specs/current/`. Each function is one rule; the v0.4.0 specs keep naming the v0.4.0 hooks, so a
session runs the rules of the spec it started under (no profile test anywhere in here).
"""
from __future__ import annotations

import math
import re

from macp.modes.multi_round.v1 import multi_round_pb2

from . import multi_round as multi_round_hooks
from . import task as task_hooks
from .common import _check_commitment_fields, _check_outcome_sign, is_blank
from .context import HookContext, Reject
from .governance import Denial
from .policy_rules import HANDOFF_SCHEMA, TASK_SCHEMA, rules_for

# --- the Commitment contract (current.md §6.1) ---------------------------------------------------

_COMMITMENT_HASH = re.compile(r"sha256:[0-9a-f]{64}\Z")


def commitment_contract(ctx: HookContext) -> bool:
    """Required fields, version binding, the policy_version echo (empty matches the bound policy),
    a well-formed `supersedes`, the outcome sign."""
    c = ctx.payload
    session = ctx.session
    _check_commitment_fields(c, session)
    if c.policy_version and c.policy_version != session.policy_version:
        raise Reject("InvalidPayload", detail="commitment policy_version differs from the session's bound policy")
    if c.HasField("supersedes") and (is_blank(c.supersedes.session_id)
                                     or not _COMMITMENT_HASH.match(c.supersedes.commitment_hash)):
        raise Reject("InvalidPayload", detail="supersedes needs session_id and a sha256:<64 hex> commitment_hash")
    _check_outcome_sign(c)
    return True


# --- Decision (current.md §12.1) -----------------------------------------------------------------

def vote_exact(ctx: HookContext) -> bool:
    return ctx.payload.vote in ("APPROVE", "REJECT", "ABSTAIN")


def recommendation_exact(ctx: HookContext) -> bool:
    return ctx.payload.recommendation in ("APPROVE", "REVIEW", "BLOCK", "REJECT")


def severity_exact(ctx: HookContext) -> bool:
    return ctx.payload.severity in ("", "critical", "high", "medium", "low")


def confidence_finite_in_range(ctx: HookContext) -> bool:
    c = ctx.payload.confidence
    return math.isfinite(c) and 0.0 <= c <= 1.0


# --- Task (current.md §12.3) ---------------------------------------------------------------------

def someone_besides_initiator(session) -> bool:
    """The initiator may orchestrate from outside the roster; someone else must be on it."""
    return any(p != session.initiator for p in session.participants)


def _allow_reassignment(ctx: HookContext) -> bool:
    return rules_for(ctx.session.policy, TASK_SCHEMA)["assignment"]["allow_reassignment_on_reject"]


def _rejected(ctx: HookContext, sender: str) -> bool:
    return any(r["assignee"] == sender for r in ctx.state["rejections"])


def assignee_may_give_back(ctx: HookContext) -> bool:
    if ctx.state["active_assignee"] == ctx.sender and not _allow_reassignment(ctx):
        raise Reject("PolicyDenied", Denial("active assignee cannot reject without allow_reassignment_on_reject "
                                            "policy", "reassignment_not_allowed"))
    return True


def sender_never_rejected(ctx: HookContext) -> bool:
    return not _rejected(ctx, ctx.sender)


def reassignment_after_give_back_permitted(ctx: HookContext) -> bool:
    if any(r.get("while_assigned") for r in ctx.state["rejections"]) and not _allow_reassignment(ctx):
        raise Reject("PolicyDenied", Denial("reassignment after rejection not allowed by policy",
                                            "reassignment_not_allowed"))
    return True


def record_reject(ctx: HookContext) -> None:
    """A give-back (the active assignee) frees the slot; anyone else's is a personal decline."""
    state = ctx.state
    while_assigned = state["active_assignee"] == ctx.sender
    if while_assigned:
        state["active_assignee"] = None
    state["rejections"].append({"task_id": ctx.payload.task_id, "assignee": ctx.sender,
                                "reason": ctx.payload.reason, "while_assigned": while_assigned})


def _no_eligible_responder(ctx: HookContext) -> bool:
    task = ctx.state["task"]
    if task is None or ctx.state["active_assignee"] is not None:
        return False
    requested = task["requested_assignee"]
    if requested:
        # SDK 0.22.0 TaskProjection.negative_commit_eligible: the named assignee *declined before
        # accepting* (a personal decline, not a give-back). current.md §12.3 says any rejection record;
        # the SDK code wins.
        return any(r["assignee"] == requested and not r.get("while_assigned") for r in ctx.state["rejections"])
    return all(_rejected(ctx, p) for p in ctx.session.participants if p != ctx.session.initiator)


def task_commitment_ready(ctx: HookContext) -> bool:
    """A terminal report (either direction), or — negative only — no eligible responder remains."""
    if task_hooks.reported(ctx):
        return True
    return not ctx.payload.outcome_positive and _no_eligible_responder(ctx)


# --- Handoff (current.md §4.3, §12.4) ------------------------------------------------------------

IMPLICIT_ACCEPT_PREFIX = "implicit-accept:"


def target_never_declined(ctx: HookContext) -> bool:
    """RFC-0010 §5 rule 3a: a target that declined an offer is not offered to again."""
    target = ctx.payload.target_participant
    return not any(o["target_participant"] == target and o["disposition"] == "Declined"
                   for o in ctx.state["offers"].values())


# --- Multi-round (current.md §12.6) --------------------------------------------------------------

def _canonical_proto(raw: bytes) -> bool:
    msg = multi_round_pb2.ContributePayload()
    try:
        msg.ParseFromString(raw)
    except Exception:
        return False
    msg.DiscardUnknownFields()   # "no unknown fields once discarded": they would change the bytes
    return msg.SerializeToString(deterministic=True) == raw


def decode_contribution(raw: bytes) -> str:
    """Canonical protobuf `ContributePayload`; the legacy JSON `{"value": …}` still accepted unless the
    bytes are also the canonical protobuf encoding (the rev-3 tie-break)."""
    if not raw:
        raise Reject("InvalidPayload", detail="Contribute payload is empty")
    if raw[:1] in (b"{", b"[", b" ", b"\t", b"\n", b"\r") and not _canonical_proto(raw):
        try:
            return multi_round_hooks.decode_contribution(raw)
        except Reject:
            pass
    msg = multi_round_pb2.ContributePayload()
    try:
        msg.ParseFromString(raw)
    except Exception:
        raise Reject("InvalidPayload", detail="Contribute payload is neither JSON nor a ContributePayload") from None
    return msg.value


def record_contribution(ctx: HookContext) -> None:
    """Converged when every participant other than the initiator has contributed and all stored
    values (the initiator's included, if it chose to contribute) are equal."""
    contributions = multi_round_hooks._store_contribution(ctx)
    state = ctx.state
    initiator = ctx.session.initiator
    required = [p for p in state["participants"] if p != initiator]
    if contributions and all(p in contributions for p in required) and len(set(contributions.values())) <= 1:
        state["converged"] = True


# --- Handoff: the implicit accept, recorded by the runtime (current.md §12.4) ----------------------

IMPLICIT_REASON = "implicit accept (timeout)"


def accept_not_implicit(ctx: HookContext) -> bool:
    """Only the runtime records an implicit accept (a client's `implicit = true` is refused)."""
    return not ctx.payload.implicit or ctx.session.runtime_message


def record_offer(ctx: HookContext) -> None:
    """The offer, timed by the runtime's acceptance clock (never the envelope's), with the suspended
    time accumulated so far (suspensions after the offer do not count towards the timeout)."""
    p = ctx.payload
    session = ctx.session
    ctx.state["offers"][p.handoff_id] = {
        "handoff_id": p.handoff_id, "target_participant": p.target_participant, "scope": p.scope,
        "reason": p.reason, "offered_by": ctx.sender, "disposition": "Offered", "accepted_by": None,
        "declined_by": None, "outcome_reason": None, "offered_at_ms": session.accepted_at_ms,
        "suspended_ms_at_offer": session.accumulated_suspended_ms,
    }


def any_answered(ctx: HookContext) -> bool:
    """Commitment readiness: some offer Accepted (explicitly or by a recorded implicit accept) or Declined."""
    return any(o["disposition"] in ("Accepted", "Declined") for o in ctx.state["offers"].values())


def due_implicit_accepts(session, now: int) -> list:
    """The implicit accepts due at `now` (pending offers whose timeout has run, suspended time not
    counted) as the envelopes the runtime records: id `implicit-accept:<handoff_id>`, sender the
    target, timestamp the computed deadline, payload `implicit = true`."""
    from macp.modes.handoff.v1 import handoff_pb2
    from macp.v1 import envelope_pb2

    timeout = rules_for(session.policy, HANDOFF_SCHEMA)["acceptance"]["implicit_accept_timeout_ms"]
    if timeout <= 0:
        return []
    out = []
    for hid, offer in session.state["offers"].items():
        if offer["disposition"] != "Offered":
            continue
        deadline = implicit_accept_deadline(offer["offered_at_ms"], timeout, session.suspensions)
        if now < deadline:
            continue
        target = offer["target_participant"]
        payload = handoff_pb2.HandoffAcceptPayload(handoff_id=hid, accepted_by=target, reason=IMPLICIT_REASON,
                                                   implicit=True)
        out.append(envelope_pb2.Envelope(
            macp_version="1.0", mode=session.mode, message_type="HandoffAccept",
            message_id=IMPLICIT_ACCEPT_PREFIX + hid, session_id=session.session_id, sender=target,
            timestamp_unix_ms=deadline,
            payload=payload.SerializeToString(deterministic=True)))
    return out


def implicit_accept_deadline(offered_at: int, timeout: int, suspensions) -> int:
    """The earliest t with (t - offered_at) - (suspended time inside [offered_at, t]) >= timeout, from
    the session's completed suspensions: a pause starting at or after the deadline does not move it."""
    deadline = offered_at + timeout
    for start, end in sorted(suspensions):
        if end <= offered_at:
            continue
        start = max(start, offered_at)
        if start >= deadline:
            break
        deadline += end - start
    return deadline
