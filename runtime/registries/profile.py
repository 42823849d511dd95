"""Protocol profiles: which protocol line the runtime speaks (../shared/spec/current.md §1).

Two profiles, one engine. `current` (the default) answers as the reference's current line does
(runtime 0.9.x, `semantics_rev` 4 — what macp-sdk-python 0.22.0 expects); `v0.4.0` reproduces the
Rust reference v0.4.0 exactly. Everything that differs at the *runtime* level sits behind one
`Profile` object; everything that differs at the *mode* level is spec data: under `current` the
mode specs of `specs/current/` replace those of `specs/` (same mode names, different rules), and a
session keeps the spec it started under (the SessionStart record names its digest).

Per session, the revision a session was accepted under (`semantics_rev`, 0 or 4) is recorded on its
SessionStart record and in its checkpoints; replay applies the recorded revision, never the process
profile (current.md §1.2), so a process running `current` still serves an older session as v0.4.0.
Runtime-level rules that outlive SessionStart (the suspension cap) therefore read the session's
revision (`Session.semantics_rev`), not the process profile.

Nothing here imports grpc: the transport asks the profile what to put on the wire.
"""
from __future__ import annotations

import dataclasses
import json
import os

from macp.v1 import core_pb2, policy_pb2

from ..specs import SPECS_DIR
from ..vocabulary.ids import valid_session_id, valid_session_id_current

DEFAULT_SUSPEND_CAP_MS = 604_800_000    # 7 days (RT §5.7; current.md §5.3 when max_suspend_ms is 0)
ERROR_CODE_TRAILER = "macp-error-code"
ERROR_DETAILS_TRAILER = "macp-error-details-bin"

# Client envelopes may not use these message ids, by (semantics_rev, mode) (current.md §4.3): the
# runtime synthesises implicit handoff accepts under them.
RESERVED_MESSAGE_ID_PREFIXES = {(4, "macp.mode.handoff.v1"): "implicit-accept:"}


def synthesizer(semantics_rev: int, mode: str):
    """The hook that yields the envelopes the runtime itself accepts into a session of this revision
    and mode before a trigger is judged (current.md §12.4: implicit handoff accepts), or None."""
    if semantics_rev >= 4 and mode == "macp.mode.handoff.v1":
        from ..specs.hooks.rules4 import due_implicit_accepts

        return due_implicit_accepts
    return None


# --- capabilities (Initialize) -------------------------------------------------------------------

def _capabilities(*, roots_list_changed: bool, current: bool, register_policy: bool = True,
                  receipts: bool = False, receipts_signed: bool = False,
                  what_if_replay: bool = False) -> core_pb2.Capabilities:
    policy_registry = policy_pb2.PolicyRegistryCapability(register_policy=register_policy, list_policies=True,
                                                          list_changed=True)
    caps = core_pb2.Capabilities(
        sessions=core_pb2.SessionsCapability(stream=True, list_sessions=True, watch_sessions=True),
        cancellation=core_pb2.CancellationCapability(cancel_session=True),
        progress=core_pb2.ProgressCapability(progress=True),
        manifest=core_pb2.ManifestCapability(get_manifest=True),
        mode_registry=core_pb2.ModeRegistryCapability(list_modes=True, list_changed=True),
        roots=core_pb2.RootsCapability(list_roots=True, list_changed=roots_list_changed),
        policy_registry=policy_registry,
        experimental=core_pb2.ExperimentalCapabilities(features={"ext_mode_lifecycle": "true"}),
    )
    if current:
        # Only what this runtime implements is advertised (issue 16): `rule_extensions` is the
        # (empty) list of registered rule extensions; WhatIfReplay and decision receipts are
        # advertised only once they are served (set through `Profile.enable`).
        caps.policy_registry.what_if_replay = what_if_replay
        if receipts:
            caps.decision_receipt.get_decision_receipt = True
            caps.decision_receipt.signed = receipts_signed
    return caps


def _doc(text: str):
    """A Profile field documented for the README's differences table (`differences_table`)."""
    return dataclasses.field(default=None, metadata={"doc": text})


@dataclasses.dataclass
class Profile:
    """The runtime-level behaviour of one protocol profile. Handlers ask it; they never test names."""

    name: str
    semantics_rev: int = _doc("`semantics_rev` recorded on a new session's SessionStart and checkpoints")
    runtime_version: str = _doc("`Initialize` `runtime_info.version`")
    spec_overlay: str | None = _doc("mode specs replacing `specs/*.yaml` (table below)")
    error_trailer: bool = _doc("`macp-error-code` trailer on every status caused by a MACP error")
    structured_denials: bool = _doc("`POLICY_DENIED` details carry `denials` (code, message, participants)")
    empty_roster_modes: frozenset = _doc("strict modes whose SessionStart may list no participants")
    honour_max_suspend_ms: bool = _doc("`max_suspend_ms` binds the suspension cap (0 = 7 days, < 0 refused)")
    roots_list_changed: bool = _doc("`Initialize` `capabilities.roots.list_changed`")
    paged_list_sessions: bool = _doc("ListSessions pages by session id with `v1:` tokens (default 100, max 1000)")
    signals_need_auth: bool = _doc("WatchSignals needs a caller; frames carry `sender_authenticated = true`")
    lag_is_error: bool = _doc("a lagging watch ends RESOURCE_EXHAUSTED + STREAM_LAGGED (v0.4.0: ends OK)")
    session_id_rule: str = _doc("SessionStart session ids")
    stream_inline_errors: bool = _doc("StreamSession: what Send answers in an Ack comes inline (code, message_id, "
                                      "details) and the stream stays open")
    progress_shape_strict: bool = _doc("Progress: ambient iff session_id and mode are both empty; one empty is "
                                       "INVALID_ENVELOPE")
    request_ceiling: bool = _doc("largest gRPC request = MACP_MAX_PAYLOAD_BYTES + 64 KiB (v0.4.0: gRPC's 4 MiB)")
    evict_cancelled: bool = _doc("the retention sweep also evicts CANCELLED sessions")
    ext_mode_commitment_only: bool = _doc("RegisterExtMode: terminal types required, `Commitment` the only one; "
                                          "PromoteMode never into `macp.mode.*`")
    bind_descriptor_mode_version: bool = _doc("an extension session started without `mode_version` binds the "
                                              "registered descriptor's version (v0.4.0: binds \"\")")
    created_once: bool = _doc("WatchSessions: a CREATED buffered during the initial sync is dropped for "
                              "sessions the sync listed")
    resume_records_remaining_ttl: bool = _doc("the SessionResume record's `banked_ms` is the TTL remaining at "
                                              "suspend (v0.4.0: the suspended duration)")
    after_sequence_ordinals: bool = _doc("StreamSession `after_sequence` = 1-based accepted-envelope ordinal, "
                                         "exclusive (v0.4.0: raw log index)")
    features: dict = dataclasses.field(default_factory=dict)   # served optional RPCs (receipts, what-if)
    # issue 15: a refusal's Ack says why — error.message "<display name>: <reason>", error.details
    # {"reason": ...} (POLICY_DENIED keeps its members and adds it), inline stream frames carry the same
    # details. Off under v0.4.0, which answers exactly as the reference (display name, empty details).
    refusal_reasons: bool = False
    list_sessions_default_page_size: int = 100
    list_sessions_max_page_size: int = 1000

    # -- session ids --------------------------------------------------------------------------------

    def valid_session_id(self, session_id: str) -> bool:
        return (valid_session_id_current if self.semantics_rev >= 4 else valid_session_id)(session_id)

    # -- Initialize ---------------------------------------------------------------------------------

    def capabilities(self, register_policy: bool = True) -> core_pb2.Capabilities:
        current = self.semantics_rev >= 4
        return _capabilities(roots_list_changed=self.roots_list_changed, current=current,
                             register_policy=register_policy,
                             receipts=bool(self.features.get("decision_receipt")),
                             receipts_signed=bool(self.features.get("decision_receipt_signed")),
                             what_if_replay=bool(self.features.get("what_if_replay")))

    def enable(self, feature: str, value=True) -> None:
        """Advertise an optional RPC once it is served (decision_receipt, decision_receipt_signed,
        what_if_replay). Under v0.4.0 nothing is advertised beyond the v0.4.0 set."""
        self.features[feature] = value

    # -- errors on the wire -------------------------------------------------------------------------

    def trailers(self, macp_code: str | None, details: bytes = b"") -> tuple:
        """Trailing metadata for a non-OK status caused by a MACP error (empty under v0.4.0)."""
        if not self.error_trailer or not macp_code:
            return ()
        out = ((ERROR_CODE_TRAILER, macp_code),)
        if details:
            out += ((ERROR_DETAILS_TRAILER, details),)
        return out

    def error_message(self, exc) -> str:
        """Ack.error.message of a MacpError."""
        return exc.message if self.refusal_reasons else exc.display_name

    def error_details(self, exc, inline: bool = False) -> bytes:
        """Ack.error.details of a MacpError (`inline`: of a StreamSession error frame, which under
        v0.4.0 carries none)."""
        if not self.refusal_reasons:
            return b"" if inline else (self.denial_details(exc.reasons) if exc.kind.code == "POLICY_DENIED" else b"")
        if exc.kind.code == "POLICY_DENIED":
            return self.denial_details(exc.reasons, exc.reason)
        return exc.details

    def denial_details(self, reasons: list, reason: str = "") -> bytes:
        """Ack.error.details of POLICY_DENIED (§3.4): `{"reasons":[…]}`, plus `denials` under current
        (and `reason`, the reasons as one text, with refusal reasons on)."""
        doc: dict = {"reasons": [str(r) for r in reasons]}
        if self.structured_denials:
            denials = []
            for r in reasons:
                item = {"code": getattr(r, "code", "unspecified"), "message": str(r)}
                participants = getattr(r, "participants", ())
                if participants:
                    item["participants"] = list(participants)
                denials.append(item)
            doc["denials"] = denials
        if reason and self.refusal_reasons:
            doc["reason"] = reason
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()

    # -- per-session rules ----------------------------------------------------------------------------

    def suspend_cap(self, max_suspend_ms: int) -> int:
        """The suspension cap bound at SessionStart (recorded; never re-read from the profile)."""
        if self.honour_max_suspend_ms and max_suspend_ms > 0:
            return max_suspend_ms
        return DEFAULT_SUSPEND_CAP_MS

    def spec_dirs(self) -> list[str]:
        """Spec directories (after the base `specs/`) whose modes replace the base ones."""
        return [os.path.join(SPECS_DIR, self.spec_overlay)] if self.spec_overlay else []


# What each line sets, side by side: field -> (v0.4.0, current).
_LINES: dict[str, tuple] = {
    "semantics_rev": (0, 4),
    "runtime_version": ("0.4.0", "0.9.0"),
    "spec_overlay": (None, "current"),
    "error_trailer": (False, True),
    "structured_denials": (False, True),
    "refusal_reasons": (False, True),
    "empty_roster_modes": (frozenset(), frozenset({"macp.mode.decision.v1"})),   # RFC-MACP-0007 1.3.0 §2
    "session_id_rule": ("a 36-byte id with `-` must be a lowercase UUID v4/v7; else base64url, 22+ chars",
                        "only UUID-shaped ids must be lowercase v4/v7; else base64url, 22-128 chars"),
    "honour_max_suspend_ms": (False, True),
    "roots_list_changed": (True, False),
    "paged_list_sessions": (False, True),
    "signals_need_auth": (False, True),
    "lag_is_error": (False, True),
    "stream_inline_errors": (False, True),
    "after_sequence_ordinals": (False, True),
    "progress_shape_strict": (False, True),
    "request_ceiling": (False, True),
    "evict_cancelled": (False, True),
    "ext_mode_commitment_only": (False, True),
    "bind_descriptor_mode_version": (False, True),
    "created_once": (False, True),
    "resume_records_remaining_ttl": (False, True),
}


def v040() -> Profile:
    return Profile(name="v0.4.0", **{field: values[0] for field, values in _LINES.items()})


def current() -> Profile:
    return Profile(name="current", **{field: values[1] for field, values in _LINES.items()})


PROFILES = {"current": current, "v0.4.0": v040}
DEFAULT_PROFILE = "current"


def get(name: str) -> Profile:
    """A fresh Profile object by name (KeyError when unknown)."""
    return PROFILES[name]()


def for_rev(semantics_rev: int) -> Profile:
    """The profile whose rules a session of this recorded revision runs under."""
    return current() if semantics_rev >= 4 else v040()


# --- what differs, as a table (README "Protocol profiles"; tests/unit/test_profile_docs.py keeps it true) ----

def _guard_text(g: dict) -> str:
    return f"`{g.get('check')}` ({g.get('reject')}): {g.get('why', '')}".rstrip(": ")


def _mode_rows(base: dict, overlay: dict) -> list[tuple[str, str, str]]:
    """(where, v0.4.0, current) for every rule the overlay spec changes."""
    rows = []

    def diff(where: str, old: list, new: list, text=lambda x: f"`{x}`") -> None:
        gone = [text(x) for x in old if x not in new]
        added = [text(x) for x in new if x not in old]
        if gone or added:
            rows.append((where, "<br>".join(gone) or "—", "<br>".join(added) or "—"))

    diff("SessionStart requires", list(base.get("session_start", {}).get("requires", []) or []),
         list(overlay.get("session_start", {}).get("requires", []) or []))
    for msg, ref in (overlay.get("payloads") or {}).items():
        old = (base.get("payloads") or {}).get(msg)
        if old != ref:
            diff(f"{msg} payload", [old], [ref], lambda x: f"`{x.get('decode') if isinstance(x, dict) else x}`")
    old_t = {t["message"]: t for t in base.get("transitions", [])}
    for t in overlay.get("transitions", []) + [dict(overlay["commitment"], message="Commitment")]:
        b = old_t.get(t["message"]) or (dict(base["commitment"], message="Commitment")
                                         if t["message"] == "Commitment" else {})
        diff(f"{t['message']} guards", b.get("guards", []), t.get("guards", []), _guard_text)
        diff(f"{t['message']} effects", b.get("effects", []) or [], t.get("effects", []) or [])
        for key in ("ready", "policy"):
            if b.get(key) != t.get(key):
                diff(f"{t['message']} {'readiness' if key == 'ready' else 'policy evaluator'}",
                     [b.get(key)] if b.get(key) else [], [t.get(key)] if t.get(key) else [])
    return rows


def differences_table() -> str:
    """Markdown: the runtime-level differences (from the two Profile objects) and the mode-level ones
    (from specs/*.yaml against specs/current/*.yaml)."""
    import glob

    import yaml

    old, new = v040(), current()
    lines = ["| Runtime behaviour | `v0.4.0` | `current` |", "|---|---|---|"]
    for f in dataclasses.fields(Profile):
        doc = f.metadata.get("doc")
        a, b = getattr(old, f.name), getattr(new, f.name)
        if doc and a != b:
            def show(v) -> str:
                if isinstance(v, frozenset):
                    return ", ".join(f"`{x}`" for x in sorted(v)) or "—"
                if isinstance(v, bool):
                    return "yes" if v else "no"
                return "—" if v is None else str(v)
            lines.append(f"| {doc} | {show(a)} | {show(b)} |")
    lines += ["", "| Mode | Rule | `v0.4.0` | `current` |", "|---|---|---|---|"]
    for path in sorted(glob.glob(os.path.join(SPECS_DIR, new.spec_overlay, "*.yaml"))):
        with open(path, encoding="utf-8") as fh:
            overlay = yaml.safe_load(fh)
        with open(os.path.join(SPECS_DIR, os.path.basename(path)), encoding="utf-8") as fh:
            base = yaml.safe_load(fh)
        for where, a, b in _mode_rows(base, overlay):
            lines.append(f"| `{overlay['mode']}` | {where} | {a} | {b} |")
    return "\n".join(lines) + "\n"
