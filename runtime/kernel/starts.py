"""SessionStart's checks (runtime.md §5.2) and the building of a new Session: for a start being
accepted, for one being replayed (under the rules of the revision it was accepted under and the spec
it started with) and for WhatIfReplay's scratch sessions."""
from __future__ import annotations

from macp.v1 import core_pb2

from ..registries import profile as profiles
from ..registries.modes import ModeRegistry
from ..registries.policies import PolicyRegistry
from ..registries.profile import Profile
from ..specs.hooks.common import is_blank
from ..specs.hooks.context import Reject
from ..specs.hooks.policy_rules import BoundPolicy
from ..storage import LogRecord
from ..vocabulary.errors import Kind, MacpError
from ..vocabulary.session import Session
from . import interpreter
from .records import mode_error

MAX_TTL_MS = 86_400_000
MAX_PARTICIPANTS = 1000
MAX_PARTICIPANT_NAME = 256
DEFAULT_CLOCK_SKEW_MS = 30_000


class Starts:
    def __init__(self, modes: ModeRegistry, policies: PolicyRegistry, profile: Profile, spec_archive=None,
                 clock_skew_ms: int = DEFAULT_CLOCK_SKEW_MS):
        """profile: the rules new sessions are accepted under; spec_archive: the SpecArchive of a durable
        runtime (the spec text each session started with), else None; clock_skew_ms: MACP_CLOCK_SKEW_MS."""
        self.modes = modes
        self.policies = policies
        self.profile = profile
        self.spec_archive = spec_archive
        self.clock_skew_ms = clock_skew_ms

    def deadline_base(self, timestamp_ms: int, received_ms: int) -> int:
        """Where a session's TTL starts: the server's receive time, which the envelope's timestamp may
        move by at most `clock_skew_ms` (MACP_CLOCK_SKEW_MS) either way. A client clock cannot make
        a session that never expires, nor a deadline outside int64."""
        if not timestamp_ms:
            return received_ms
        skew = self.clock_skew_ms
        return min(max(timestamp_ms, received_ms - skew), received_ms + skew)

    def check(self, mode_name: str, raw: bytes, prof: Profile):
        """The kernel's SessionStart checks under the rules of `prof` (the revision being accepted or
        replayed): (compiled mode, SessionStartPayload), or raises MacpError."""
        compiled = self.modes.get(mode_name)
        if compiled is None:
            raise MacpError(Kind.UnknownMode, detail=f"mode {mode_name!r} is not registered")
        if not raw:
            raise MacpError(Kind.InvalidPayload, detail="SessionStart needs a SessionStartPayload")
        try:
            start = core_pb2.SessionStartPayload.FromString(raw)
        except Exception:
            raise MacpError(Kind.InvalidPayload, detail="SessionStart payload does not decode") from None
        if compiled.strict_start:
            if not 1 <= start.ttl_ms <= MAX_TTL_MS:
                raise MacpError(Kind.InvalidTtl, detail=f"ttl_ms {start.ttl_ms} outside 1..{MAX_TTL_MS}")
            if is_blank(start.mode_version) or is_blank(start.configuration_version):
                raise MacpError(Kind.InvalidPayload, detail="mode_version and configuration_version are required")
            participants = start.participants
            if not participants and compiled.name not in prof.empty_roster_modes:
                raise MacpError(Kind.InvalidPayload, detail="participants must not be empty")
            if len(participants) > MAX_PARTICIPANTS:
                raise MacpError(Kind.InvalidPayload, detail=f"at most {MAX_PARTICIPANTS} participants")
            trimmed = set()
            for p in participants:
                t = p.strip()
                if is_blank(p) or t in trimmed:
                    raise MacpError(Kind.InvalidPayload, detail="participants must be non-blank and unique")
                trimmed.add(t)
            if prof.honour_max_suspend_ms and start.max_suspend_ms < 0:
                raise MacpError(Kind.InvalidPayload, detail="max_suspend_ms must not be negative")
        if len(start.participants) > MAX_PARTICIPANTS or any(len(p) > MAX_PARTICIPANT_NAME for p in start.participants):
            raise MacpError(Kind.InvalidPayload, detail=f"at most {MAX_PARTICIPANTS} participants of at most "
                                                        f"{MAX_PARTICIPANT_NAME} characters each")
        if compiled.version and start.mode_version and start.mode_version != compiled.version:
            raise MacpError(Kind.InvalidEnvelope,
                            detail=f"mode_version {start.mode_version!r} differs from {compiled.version!r}")
        if not 1 <= start.ttl_ms <= MAX_TTL_MS:
            raise MacpError(Kind.InvalidTtl, detail=f"ttl_ms {start.ttl_ms} outside 1..{MAX_TTL_MS}")
        return compiled, start

    def new_session(self, session_id, compiled, initiator, start, started_at, deadline,
                    bound: BoundPolicy | None = None, prof: Profile | None = None,
                    suspend_cap_ms: int = 0, effective_id: str | None = None) -> Session:
        """A Session of an accepted start (bound to the registry's policy), or of a replayed one (`bound`:
        the binding recorded at its start). Raises MacpError when the mode's start hooks refuse it."""
        if bound is None:
            policy, effective = self.policies.bind(start.policy_version, compiled.name)
        else:  # replay: the binding recorded at the start, whatever the registry holds today
            policy, effective = bound, effective_id or bound.policy_id
        try:
            session = Session(session_id, compiled, initiator, start, policy, started_at, deadline, effective)
            prof = prof or self.profile
            if prof.bind_descriptor_mode_version and not start.mode_version and compiled.version:
                session.mode_version = compiled.version   # current.md §5.2 (non-strict extensions only)
            session.semantics_rev = prof.semantics_rev
            session.suspend_cap_ms = suspend_cap_ms or prof.suspend_cap(start.max_suspend_ms)
            interpreter.check_start(compiled, session)
        except Reject as exc:
            raise mode_error(exc) from None
        except Exception as exc:   # a start or initial-state hook failed: refused, nothing written
            raise MacpError(Kind.InvalidModeState, detail=f"a SessionStart hook of {compiled.name} failed: "
                                                          f"{type(exc).__name__}: {str(exc)[:200]}") from None
        return session

    def start_of(self, start_rec: LogRecord):
        """(compiled mode, SessionStartPayload, profile) of a logged SessionStart: the rules of the
        revision it was accepted under and of the spec it started with, not today's. Raises MacpError
        when the start is not valid (any more)."""
        recorded = profiles.for_rev(start_rec.semantics_rev)
        compiled, start = self.check(start_rec.mode, start_rec.payload, recorded)
        if self.spec_archive is not None:
            compiled = self.spec_archive.compiled(start_rec.mode_spec_digest, compiled)
        return compiled, start, recorded

    def logged_session(self, start_rec: LogRecord, bound: BoundPolicy | None, session_id: str | None = None,
                       effective_id: str | None = None) -> Session:
        """The session of a logged SessionStart as replay builds it (`bound`: the policy to bind)."""
        compiled, start, recorded = self.start_of(start_rec)
        base = self.deadline_base(start_rec.timestamp_unix_ms, start_rec.received_at_ms)
        return self.new_session(session_id or start_rec.session_id, compiled, start_rec.sender, start,
                                start_rec.received_at_ms, base + start.ttl_ms, bound, recorded,
                                start_rec.bound_max_suspend_ms, effective_id=effective_id)

    def scratch_session(self, start_rec: LogRecord, policy: BoundPolicy, effective_id: str) -> Session:
        """A session built from its logged SessionStart exactly as replay builds it, but bound to
        `policy` and entered nowhere (WhatIfReplay judges a candidate policy on it). Raises MacpError
        when the start is refused."""
        return self.logged_session(start_rec, policy, effective_id=effective_id)

    def compiled_for(self, mode: str, digest: str):
        """The compiled mode a checkpoint names (the archived spec of `digest` when there is one)."""
        compiled = self.modes.get(mode)
        if compiled is None:
            raise ValueError(f"mode {mode!r} is not registered")
        if self.spec_archive is not None:
            compiled = self.spec_archive.compiled(digest, compiled)
        return compiled
