"""Hooks shared by several modes: blankness, the Commitment contract (§1.2–1.4), plain roles."""
from __future__ import annotations

from .context import HookContext, Reject
from .contract import hook
from .policy_rules import commitment_authority_allows

# Unicode White_Space (what Rust's str::trim strips); str.strip() would also strip U+001C..U+001F.
WHITE_SPACE = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)


def is_blank(text: str) -> bool:
    return not text.strip(WHITE_SPACE)


# --- roles -------------------------------------------------------------------------------------

@hook("role", text="may commit under the bound policy's commitment authority (initiator by default)")
def commitment_authority(session, sender: str) -> bool:
    """The policy-aware commitment authority of the standard modes."""
    return commitment_authority_allows(session.policy, session.initiator, session.participant_set, sender)


# --- the Commitment contract -------------------------------------------------------------------

_NEGATIVE_SUFFIXES = ("rejected", "failed", "declined")
_POSITIVE_SUFFIXES = ("selected", "accepted", "completed", "approved")


@hook("guard", text="the Commitment carries the session's versions, the required fields and a consistent outcome")
def commitment_matches_session(ctx: HookContext) -> bool:
    """§1.3: required fields, version binding to the session, supersedes shape, outcome sign."""
    c = ctx.payload
    session = ctx.session
    _check_commitment_fields(c, session)
    if session.policy_version and c.policy_version != session.policy_version:
        raise Reject("InvalidPayload", detail="commitment policy_version differs from the session's bound policy")
    if c.HasField("supersedes") and (is_blank(c.supersedes.session_id) or is_blank(c.supersedes.commitment_hash)):
        raise Reject("InvalidPayload", detail="supersedes needs session_id and commitment_hash")
    _check_outcome_sign(c)
    return True


# Steps of the contract that every protocol line shares (rules4.commitment_contract uses them too);
# private, so no spec can name them as hooks.

def _check_commitment_fields(c, session) -> None:
    """Required fields and the version binding to the session (§1.3 steps 1-3)."""
    if is_blank(c.commitment_id) or is_blank(c.action) or is_blank(c.authority_scope) or is_blank(c.reason):
        raise Reject("InvalidPayload", detail="commitment_id, action, authority_scope and reason are required")
    if c.mode_version != session.mode_version or c.configuration_version != session.configuration_version:
        raise Reject("InvalidPayload", detail="commitment mode_version/configuration_version differ from the session")


def _check_outcome_sign(c) -> None:
    """§1.4: an action's suffix fixes the sign of outcome_positive."""
    action = c.action
    if action.endswith(_NEGATIVE_SUFFIXES):
        if c.outcome_positive:
            raise Reject("InvalidPayload", detail=f"action {action!r} requires outcome_positive = false")
    elif action.endswith(_POSITIVE_SUFFIXES) and not c.outcome_positive:
        raise Reject("InvalidPayload", detail=f"action {action!r} requires outcome_positive = true")


@hook("resolution")
def commitment_payload(ctx: HookContext) -> bytes:
    """The Commitment payload, byte for byte."""
    return ctx.raw


@hook("start", text="the session declares at least one participant")
def participants_present(session) -> bool:
    return len(session.participants) > 0


@hook("start", text="the initiator is one of the participants")
def initiator_participates(session) -> bool:
    return session.initiator in session.participant_set
