"""Send (§3), ambient Signals/Progress and WatchSignals (§6), and the session RPCs: GetSession,
CancelSession, SuspendSession, ResumeSession (§5.7), ListSessions and WatchSessions (§8.7, §8.8)."""
from __future__ import annotations

import base64
import logging
from time import perf_counter

import grpc
from macp.v1 import core_pb2

from ..kernel import access, paging
from ..kernel.fanout import Event
from ..kernel.records import Outcome
from ..specs.hooks.common import is_blank
from ..vocabulary.errors import Kind, MacpError, StatusError
from ..vocabulary.session import OPEN
from .commit import commit, durable
from .convert import (
    created_event,
    error_ack,
    lifecycle_response,
    ok_ack,
    send_response,
    session_metadata,
    signal_response,
)
from .loop import Doorbell
from .status import abort, abort_status_error, error_status, on_lag
from .watch import watch

log = logging.getLogger("macp_runtime.service")

UNDECODABLE_DETAILS = "the request does not decode"   # INVALID_ARGUMENT: the client sent bytes that are not the request
_SendRequest = core_pb2.SendRequest
MAX_PAGE_SIZE = 1000       # ListSessions page_size above this is served as this
_OPEN_OUTCOME = Outcome(False, OPEN)


class MessageHandler:
    """Send and the ambient messages (Signal, Progress) that never enter a session's history."""

    def __init__(self, t):
        self.t = t

    async def Send(self, request, context):
        if not request.HasField("envelope"):
            if request.__class__ is not _SendRequest:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_DETAILS)
            await abort(context, self.t.engine.profile, grpc.StatusCode.INVALID_ARGUMENT,
                        "SendRequest must contain an envelope", "INVALID_REQUEST")
        t = self.t
        env = request.envelope
        started = perf_counter()
        engine = t.engine
        try:
            identity = await t.admission.identity(context)
            is_start = t.admission.admit_send(env, identity)
            mtype = env.message_type
            if mtype == "Signal" or mtype == "Progress":
                outcome = await self.ambient(env, identity)
            else:
                if not t.offload.blocking:   # the memory store never blocks: no coroutine, no thread
                    outcome = (engine.start_session if is_start else engine.process_message)(env, identity)
                elif is_start:
                    outcome = await commit(t, env.session_id, engine.start_session, env, identity,
                                           starts_mode=env.mode)
                else:
                    outcome = await commit(t, env.session_id, engine.process_message, env, identity)
        except MacpError as exc:
            t.admission.rejected_log.info("message rejected", {
                "code": exc.code, "error": exc.message, "message_type": env.message_type, "mode": env.mode,
                "session_id": env.session_id, "message_id": env.message_id, "sender": env.sender,
                "detail": exc.detail})
            engine.metrics.send_done(env.mode, env.message_type, exc.code, perf_counter() - started)
            return core_pb2.SendResponse(ack=error_ack(exc, env.message_id, env.session_id, engine.profile))
        engine.metrics.send_done(env.mode, mtype, "", perf_counter() - started)
        return send_response(outcome, env.message_id, env.session_id)

    Send.guards_undecodable = True

    async def ambient(self, env, identity) -> Outcome:
        """Signals and Progress: validated, never part of any session's history (§6). One that names
        an existing session (session_id, or a Signal's correlation_session_id) needs a caller who may
        write to it; it then reaches only the watchers who may read that session."""
        payload = None
        if env.payload:
            try:
                if env.message_type == "Signal":
                    payload = core_pb2.SignalPayload.FromString(env.payload)
                    if is_blank(payload.signal_type):
                        raise MacpError(Kind.InvalidPayload, detail="signal_type must not be blank")
                else:
                    core_pb2.ProgressPayload.FromString(env.payload)
            except MacpError:
                raise
            except Exception:
                raise MacpError(Kind.InvalidPayload, detail=f"{env.message_type} payload does not decode") from None
        engine = self.t.engine
        subject = access.signal_subject(env, payload)
        if subject:
            session = engine.peek(subject)
            if session is not None and not access.may_write(session, identity):
                raise MacpError(Kind.Forbidden, detail=f"{identity.sender!r} may not signal session {subject!r}")
        signals, relay = engine.signals, engine.signal_relay
        if len(signals) or relay is not None:
            item = signal_response(env, engine.profile.signals_need_auth)
            signals.publish((subject, item))
            if relay is not None:   # other instances' WatchSignals subscribers (PostgreSQL NOTIFY)
                await self.t.offload(relay, item)
        return _OPEN_OUTCOME

    async def WatchSignals(self, request, context):
        t = self.t
        # every watch needs a credential (issue 12; current.md §9.1 asks the same of WatchSignals)
        identity = await t.admission.require_identity(context)
        peek = t.engine.peek

        def render(entry):
            subject, item = entry
            return item if access.may_watch_signal(subject, peek, identity) else None

        async with t.admission.streams.held(context, identity):
            bell = Doorbell(t.wakeups)
            sub = t.engine.signals.subscribe(bell.ring)
            if t.engine.closing.is_set():
                sub.cancel()
                return
            async for frame in watch(bell, sub, render,
                                     lagged=on_lag(context, t.engine.profile, "WatchSignals", "signals")):
                yield frame


class SessionHandler:
    def __init__(self, t):
        self.t = t

    async def GetSession(self, request, context):
        t = self.t
        identity = await t.admission.require_identity(context)
        try:
            session = await t.offload(t.engine.get_session, request.session_id, identity)
        except StatusError as exc:
            await abort_status_error(context, t.engine.profile, exc)
        await _durable_states(t, context, (session,))
        return core_pb2.GetSessionResponse(metadata=session_metadata(session))

    async def CancelSession(self, request, context):
        return await self._control(context, request, self.t.engine.cancel_session, core_pb2.CancelSessionResponse)

    async def SuspendSession(self, request, context):
        return await self._control(context, request, self.t.engine.suspend_session,
                                   core_pb2.SuspendSessionResponse)

    async def ResumeSession(self, request, context):
        return await self._control(context, request, self.t.engine.resume_session, core_pb2.ResumeSessionResponse)

    async def _control(self, context, request, action, response_type):
        t = self.t
        identity = await t.admission.require_identity(context)
        try:
            t.admission.admit_control(identity, request.reason)
            outcome = await t.offload(action, request.session_id, identity, request.reason)
        except StatusError as exc:
            await abort_status_error(context, t.engine.profile, exc)
        except MacpError as exc:
            return response_type(ack=error_ack(exc, "", request.session_id, t.engine.profile))
        return response_type(ack=ok_ack(outcome, "", request.session_id))

    async def ListSessions(self, request, context):
        """Every session in memory (no lazy expiry). page_size 0 = all of them, as v0.4.0 answers;
        page_size > 0 pages in (started_at, session_id) order with an opaque next_page_token."""
        t = self.t
        identity = await t.admission.require_identity(context)
        await t.offload(t.engine.refresh_sessions)   # a shared store: sessions other instances hold too
        sessions = t.engine.readable_sessions(identity)
        profile = t.engine.profile
        if profile.paged_list_sessions:   # current.md §10
            try:
                chosen, token = paging.page(sessions, request.page_size, request.page_token,
                                            profile.list_sessions_default_page_size,
                                            profile.list_sessions_max_page_size)
            except paging.PageError as exc:
                await abort(context, profile, grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_REQUEST")
            await _durable_states(t, context, chosen)
            return core_pb2.ListSessionsResponse(sessions=[session_metadata(s) for s in chosen],
                                                 next_page_token=token)
        if request.page_size < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        if request.page_size == 0 and not request.page_token:
            await _durable_states(t, context, sessions)
            return core_pb2.ListSessionsResponse(sessions=[session_metadata(s) for s in sessions])
        sessions.sort(key=lambda s: (s.started_at_ms, s.session_id))
        if request.page_token:
            after = _parse_page_token(request.page_token)
            if after is None:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not one this server issued")
            sessions = [s for s in sessions if (s.started_at_ms, s.session_id) > after]
        size = min(request.page_size, MAX_PAGE_SIZE) if request.page_size else len(sessions)
        page = sessions[:size]
        token = _page_token(page[-1]) if len(sessions) > size else ""
        await _durable_states(t, context, page)
        return core_pb2.ListSessionsResponse(sessions=[session_metadata(s) for s in page], next_page_token=token)

    async def WatchSessions(self, request, context):
        t = self.t
        identity = await t.admission.require_identity(context)
        async with t.admission.streams.held(context, identity):
            await t.offload(t.engine.refresh_sessions)   # a shared store: sessions other instances hold too
            bell = Doorbell(t.wakeups)
            sub = t.engine.lifecycle.subscribe(bell.ring)   # before the snapshot: nothing can fall between
            if t.engine.closing.is_set():
                sub.cancel()
                return
            synced = t.engine.readable_sessions(identity)
            first = [created_event(s) for s in synced]
            shown = lifecycle_response
            if t.engine.profile.created_once:   # current.md §7: one CREATED per session (sync wins)
                shown = _once_created({s.session_id for s in synced})

            def render(item):   # only sessions this caller may read (access.may_read)
                return shown(item) if access.may_read(item[1], identity) else None

            async for frame in watch(bell, sub, render, first,
                                     lagged=on_lag(context, t.engine.profile, "WatchSessions", "events")):
                yield frame


async def _durable_states(t, context, sessions) -> None:
    """Deferred commit moves a session's state on before its record is durable: what GetSession and
    ListSessions show waits until it is (and is then built before the handler's next await). A
    failed write answers INTERNAL, as a Send would."""
    pending = t.engine.pending
    while True:
        waiting = [s.session_id for s in sessions if pending(s.session_id) is not None]
        if not waiting:
            return
        for session_id in waiting:
            error = await durable(t, session_id)
            if error is not None:
                exc = MacpError(Kind.StorageFailed, detail=str(error))
                await abort(context, t.engine.profile, *error_status(exc), exc.code)


def _once_created(synced: set):
    """A lifecycle renderer that drops a buffered CREATED of a session the initial sync already
    listed (once per id: a later incarnation of the id is announced again)."""
    def render(item):
        event, session, _ = item
        if event == Event.CREATED and session.session_id in synced:
            synced.discard(session.session_id)
            return None
        return lifecycle_response(item)
    return render


def _page_token(session) -> str:
    raw = f"{session.started_at_ms}:{session.session_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_page_token(token: str) -> tuple[int, str] | None:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        started, _, session_id = raw.partition(":")
        return int(started), session_id
    except (ValueError, UnicodeDecodeError):
        return None
