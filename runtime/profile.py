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

from .ids import valid_session_id, valid_session_id_current

from .specs import SPECS_DIR

DEFAULT_SUSPEND_CAP_MS = 604_800_000    # 7 days (RT §5.7; current.md §5.3 when max_suspend_ms is 0)
ERROR_CODE_TRAILER = "macp-error-code"
ERROR_DETAILS_TRAILER = "macp-error-details-bin"

# Client envelopes may not use these message ids, by (semantics_rev, mode) (current.md §4.3): the
# runtime synthesises implicit handoff accepts under them.
RESERVED_MESSAGE_ID_PREFIXES = {(4, "macp.mode.handoff.v1"): "implicit-accept:"}


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


@dataclasses.dataclass
class Profile:
    """The runtime-level behaviour of one protocol profile. Handlers ask it; they never test names."""

    name: str
    semantics_rev: int                  # recorded on every session started under this profile
    runtime_version: str                # Initialize runtime_info.version
    spec_overlay: str | None            # directory under specs/ whose specs replace the base ones
    error_trailer: bool                 # macp-error-code (+ details-bin) trailing metadata (§3.2)
    structured_denials: bool            # POLICY_DENIED details carry `denials` (§3.4)
    empty_roster_modes: frozenset       # strict modes whose SessionStart may declare no participants (§5.1)
    honour_max_suspend_ms: bool         # SessionStartPayload.max_suspend_ms binds the cap (§5.3)
    roots_list_changed: bool            # Initialize capabilities.roots.list_changed (§2.3)
    new_error_codes: bool               # AGENT_NOT_FOUND, INVALID_REQUEST, REGISTRY_READ_ONLY, ... (§3.1)
    paged_list_sessions: bool           # ListSessions page_size/page_token (§10)
    signals_need_auth: bool             # WatchSignals authenticated, sender_authenticated=true (§9.1)
    lag_is_error: bool                  # a lagging watcher ends RESOURCE_EXHAUSTED + STREAM_LAGGED (§9.2)
    features: dict = dataclasses.field(default_factory=dict)   # served optional RPCs (receipts, what-if)
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

    def code(self, current_code: str, v040_code: str | None = None) -> str | None:
        """The registry code of a failure whose code is new in the current line (None: no code)."""
        return current_code if self.new_error_codes else v040_code

    def denial_details(self, reasons: list) -> bytes:
        """Ack.error.details of POLICY_DENIED (§3.4): `{"reasons":[…]}`, plus `denials` under current."""
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


def v040() -> Profile:
    return Profile(name="v0.4.0", semantics_rev=0, runtime_version="0.4.0", spec_overlay=None,
                   error_trailer=False, structured_denials=False, empty_roster_modes=frozenset(),
                   honour_max_suspend_ms=False, roots_list_changed=True, new_error_codes=False,
                   paged_list_sessions=False, signals_need_auth=False, lag_is_error=False)


def current() -> Profile:
    return Profile(name="current", semantics_rev=4, runtime_version="0.9.0", spec_overlay="current",
                   error_trailer=True, structured_denials=True,
                   empty_roster_modes=frozenset({"macp.mode.decision.v1"}),   # RFC-MACP-0007 1.3.0 §2
                   honour_max_suspend_ms=True, roots_list_changed=False, new_error_codes=True,
                   paged_list_sessions=True, signals_need_auth=True, lag_is_error=True)


PROFILES = {"current": current, "v0.4.0": v040}
DEFAULT_PROFILE = "current"


def get(name: str) -> Profile:
    """A fresh Profile object by name (KeyError when unknown)."""
    return PROFILES[name]()


def for_rev(semantics_rev: int) -> Profile:
    """The profile whose rules a session of this recorded revision runs under."""
    return current() if semantics_rev >= 4 else v040()
