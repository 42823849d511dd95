"""Hooks of dynamically registered extension modes (modes.md §8), used by specs/templates/passthrough.yaml.

Payloads are opaque: nothing is decoded except the Commitment. The mode state is `{}` after
SessionStart and `{"payload_base64": <the last accepted message's payload>}` afterwards (base64 keeps
the state JSON-compatible; it holds exactly the raw bytes).
"""
from __future__ import annotations

import base64
import json

from .context import HookContext


def open_or_participant(session, sender: str) -> bool:
    """Anyone may send while the participant list is empty; otherwise only declared participants."""
    return not session.participants or sender in session.participant_set


def empty_state(session) -> dict:
    return {}


def keep_payload(ctx: HookContext) -> None:
    ctx.state.clear()
    ctx.state["payload_base64"] = base64.b64encode(ctx.raw).decode("ascii")


def commitment_summary(ctx: HookContext) -> bytes:
    """The resolution: `{"action":…,"commitment_id":…}` (compact UTF-8 JSON)."""
    c = ctx.payload
    return json.dumps({"action": c.action, "commitment_id": c.commitment_id},
                      separators=(",", ":"), ensure_ascii=False).encode("utf-8")
