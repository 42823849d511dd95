"""StreamSession (runtime.md §7): one coroutine per call, no thread.

Each call is a `SessionStream`: the engine offers it live envelopes (from the loop or a kernel
thread, under the session's lock: never blocking, bounded at LIVE_CAPACITY), a reader task queues
the client's frames (bounded at REQUEST_BACKLOG, then HTTP/2 flow control holds the client), and the
call's coroutine writes everything out in order. Accepted envelopes arrive pre-encoded (one encoding
per envelope whatever the number of subscribers). A subscriber that falls LIVE_CAPACITY envelopes
behind is cut off with RESOURCE_EXHAUSTED; if it does not even read, its call is cancelled after
LAG_GRACE_S so it cannot hold the server's memory.
"""
from __future__ import annotations

import asyncio
import collections
import logging

import grpc
from macp.v1 import core_pb2

from ..kernel import access
from ..specs.hooks.common import is_blank
from ..storage import ENTRY_KIND_INCOMING
from ..vocabulary.errors import Kind, MacpError, StatusError
from ..vocabulary.session import OPEN
from .commit import commit
from .convert import accepted_frame, history_frame, inline_error, inline_macp_error
from .loop import Doorbell
from .status import error_status, status_of

log = logging.getLogger("macp_runtime.streams")

LIVE_CAPACITY = 256        # live envelopes queued per StreamSession subscriber (runtime.md §7.5)
REQUEST_BACKLOG = 32       # client frames read ahead of processing
LAG_GRACE_S = 5.0          # a lagging stream whose client does not even read is cancelled after this

# Status codes that end a StreamSession; every other error is an inline frame (runtime.md §7.4).
TERMINAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
})
FORBIDDEN_SUBSCRIBE = "FORBIDDEN: caller is not a declared participant or observer for this session"
ONE_SESSION = "StreamSession may only carry envelopes for one session_id"
_Request = core_pb2.StreamSessionRequest


class _Terminate(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, macp_code: str | None = None):
        self.code = code
        self.message = message
        self.macp_code = macp_code   # the macp-error-code trailer under the current profile


class SessionStream:
    """One StreamSession call as the engine sees it (`offer`, `discard_before`, `shutdown`)."""

    __slots__ = ("bell", "live", "floor", "dropped", "finished", "closing", "requests", "input_done", "room",
                 "bound", "subscribed", "task", "wakeups")

    def __init__(self, wakeups):
        self.wakeups = wakeups
        self.bell = Doorbell(wakeups)
        self.live: collections.deque = collections.deque()   # (log index, Accepted)
        self.floor = 0            # envelopes below this log index were in the history snapshot
        self.dropped = 0          # envelopes that found the live queue full
        self.finished = False     # the call ended: nothing more is accepted
        self.closing = False      # the server is stopping
        self.requests: collections.deque = collections.deque()
        self.input_done = False   # the client half-closed (or its side failed)
        self.room = asyncio.Event()
        self.bound: str | None = None
        self.subscribed = False
        self.task: asyncio.Task | None = None

    # --- engine side (any thread) ------------------------------------------------------------

    def offer(self, index: int, item) -> bool:
        """Queue a live envelope; never blocks. False tells the engine to drop this subscriber."""
        if self.finished:
            return False
        if not self.subscribed:       # a withdrawn provisional subscription: a late delivery is dropped
            return True
        if index < self.floor:        # covered by the history snapshot already sent
            return True
        if self.dropped:              # already cut off: only count, so the status can say how many
            self.dropped += 1
            return True
        if len(self.live) >= LIVE_CAPACITY:
            self.dropped = 1
            self.bell.ring()
            self.wakeups.call(self._start_lag_timer)
            return True
        self.live.append((index, item))
        self.bell.ring()
        return True

    def discard_before(self, index: int) -> None:
        """A history snapshot of `index` records was just taken: queued envelopes it covers go.
        (The call's coroutine is waiting for that snapshot, so nothing else takes from `live`.)"""
        if index > self.floor:
            self.floor = index
        live = self.live
        while live and live[0][0] < index:
            live.popleft()

    def shutdown(self) -> None:
        self.closing = True
        self.bell.ring()

    def _start_lag_timer(self) -> None:
        asyncio.get_running_loop().call_later(LAG_GRACE_S, self._cancel_if_running)

    def _cancel_if_running(self) -> None:
        if not self.finished and self.task is not None:
            self.task.cancel()   # stuck writing to a client that does not read

    # --- the client's frames --------------------------------------------------------------------

    async def read(self, context) -> None:
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                self.requests.append(request)
                self.bell.ring()
                while len(self.requests) >= REQUEST_BACKLOG and not self.finished:
                    self.room.clear()
                    await self.room.wait()
        except asyncio.CancelledError:
            raise
        except Exception:   # the call failed or was cancelled: nothing more comes from the client
            pass
        self.input_done = True
        self.bell.ring()


class StreamHandler:
    def __init__(self, t):
        self.t = t

    async def StreamSession(self, request_iterator, context):
        t = self.t
        admission = t.admission
        identity = await admission.identity(context)
        if identity is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")
        await admission.streams.acquire(context, identity)
        engine = t.engine
        stream = SessionStream(t.wakeups)
        stream.task = asyncio.current_task()
        engine.register_stream(stream)
        reader = asyncio.ensure_future(stream.read(context))
        try:
            await self._serve(stream, context, identity)
        finally:
            stream.finished = True
            stream.live.clear()
            reader.cancel()
            if stream.subscribed:
                engine.unsubscribe(stream.bound, stream)
            engine.unregister_stream(stream)
            admission.streams.release(identity)

    async def _serve(self, stream: SessionStream, context, identity) -> None:
        live, requests = stream.live, stream.requests
        while True:
            if stream.closing:
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details("the server is shutting down")
                return
            if stream.dropped:
                context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.set_details(f"StreamSession receiver fell behind by {stream.dropped} envelopes")
                trailers = self.t.engine.profile.trailers("STREAM_LAGGED")
                if trailers:
                    context.set_trailing_metadata(trailers)
                log.info("stream of %s on session %s cut off: fell behind by %d envelopes",
                         identity.sender, stream.bound, stream.dropped)
                return
            if live:
                await context.write(accepted_frame(live.popleft()[1]))
                continue
            if requests:
                request = requests.popleft()
                stream.room.set()
                try:
                    for frame in await self._frame(stream, request, identity):
                        await context.write(frame)
                except _Terminate as end:
                    context.set_code(end.code)
                    context.set_details(end.message)
                    trailers = self.t.engine.profile.trailers(end.macp_code)
                    if trailers:
                        context.set_trailing_metadata(trailers)
                    return
                continue
            if stream.input_done:   # half-closed, live envelopes drained
                return
            await stream.bell.wait()

    async def _frame(self, stream: SessionStream, request, identity) -> list:
        """One client frame: the frames it produces; raises _Terminate to end the stream."""
        if request.__class__ is not _Request:   # a frame that did not parse
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, "the StreamSessionRequest frame does not decode")
        if request.subscribe_session_id:
            return await self._subscribe(stream, request, identity)
        if not request.HasField("envelope"):
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT,
                             "StreamSessionRequest must contain an envelope or subscribe_session_id", "INVALID_REQUEST")
        t = self.t
        engine = t.engine
        env = request.envelope
        if engine.profile.stream_inline_errors:
            return await self._frame_current(stream, env, identity)
        try:
            t.admission.check_shape(env)
        except MacpError as exc:
            return [_inline_or_end(exc, stream, engine.profile)]
        if is_blank(env.session_id):
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, "StreamSession requires a non-empty session_id")
        if is_blank(env.mode):
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, "StreamSession requires a non-empty mode")
        session_id = env.session_id
        if stream.bound is not None and stream.bound != session_id:
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, ONE_SESSION)
        if env.sender and env.sender != identity.sender:
            raise _Terminate(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")
        env.sender = identity.sender
        mtype = env.message_type
        is_start = mtype == "SessionStart"
        if not is_start:
            try:
                session = await t.offload(engine.lookup, session_id)
            except StatusError:
                session = None
            if session is not None:
                if env.mode != session.mode:
                    raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT,
                                     "INVALID_ENVELOPE: envelope mode does not match the bound session mode")
                if session.status != OPEN:
                    raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, "SESSION_NOT_OPEN")
        if not t.admission.may_send(identity, env, is_start):
            return [inline_error("Forbidden", stream.bound or "")]
        if not t.admission.rate_allows(identity, is_start):
            raise _Terminate(grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimited")
        if stream.bound is None:
            stream.bound = session_id
        try:
            provisional = await self._commit_provisionally(stream, is_start, env, identity)
        except MacpError as exc:
            engine.metrics.send_done(env.mode, mtype, exc.code, None)
            return [_inline_or_end(exc, stream, engine.profile)]
        engine.metrics.send_done(env.mode, mtype, "", None)
        return await self._settle(stream, provisional, env, identity)

    async def _frame_current(self, stream: SessionStream, env, identity) -> list:
        """current.md §8.4: everything Send would answer in an Ack comes back inline with the Ack's
        error fields and the stream stays open; only a frame for another session (T4) and a storage
        failure (T7) end it (T2, T3, T5, T6 end it elsewhere)."""
        t = self.t
        engine = t.engine
        profile = engine.profile
        session_id = env.session_id
        if stream.bound is not None and session_id and stream.bound != session_id:
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, ONE_SESSION, "INVALID_REQUEST")
        mtype = env.message_type
        try:
            t.admission.check_shape(env)
            if is_blank(session_id) or is_blank(env.mode):
                raise MacpError(Kind.InvalidEnvelope, detail="a stream envelope needs session_id and mode")
            is_start = t.admission.admit_send(env, identity)
            if stream.bound is None:
                stream.bound = session_id
            provisional = await self._commit_provisionally(stream, is_start, env, identity)
        except MacpError as exc:
            engine.metrics.send_done(env.mode, mtype, exc.code, None)
            if exc.kind is Kind.StorageFailed:
                raise _Terminate(grpc.StatusCode.INTERNAL, exc.status_message, "INTERNAL_ERROR") from None
            return [inline_macp_error(exc, stream.bound or session_id, env.message_id, profile)]
        engine.metrics.send_done(env.mode, mtype, "", None)
        return await self._settle(stream, provisional, env, identity)

    async def _commit_provisionally(self, stream: SessionStream, is_start: bool, env, identity) -> bool:
        """Commit a frame's envelope with the stream subscribed to its session, provisionally: so the
        accepted envelope itself comes back through the channel, in log order. A refused frame
        withdraws the subscription with everything it queued (and re-raises), so a refused frame never
        lets a stream read a session. Returns whether the subscription was made by this frame."""
        t = self.t
        engine = t.engine
        session_id = env.session_id
        provisional = not stream.subscribed
        if provisional:
            engine.subscribe(session_id, stream)
            stream.subscribed = True
        try:
            if is_start:
                await commit(t, session_id, engine.start_session, env, identity, starts_mode=env.mode)
            elif env.message_type == "Progress":
                await t.messages.ambient(env, identity)
            else:
                await commit(t, session_id, engine.process_message, env, identity)
        except MacpError:
            if provisional:
                await _withdraw(t, stream, session_id)
            raise
        return provisional

    async def _settle(self, stream: SessionStream, provisional: bool, env, identity) -> list:
        """After an accepted frame: a subscription this frame made is kept only if the caller may read
        the session (access.may_read); otherwise (a mode open to anyone) only its own envelope comes back."""
        if provisional:
            session = self.t.engine.peek(env.session_id)
            if session is None or not access.may_read(session, identity):
                await _withdraw(self.t, stream, env.session_id)
                return [core_pb2.StreamSessionResponse(envelope=env)]
        return []   # the accepted envelope comes back through the session's channel

    async def _subscribe(self, stream: SessionStream, request, identity) -> list:
        if request.HasField("envelope"):
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT,
                             "StreamSessionRequest must not contain both envelope and subscribe_session_id",
                             "INVALID_REQUEST")
        engine = self.t.engine
        session_id = request.subscribe_session_id
        if stream.bound is not None and stream.bound != session_id:
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, ONE_SESSION, "INVALID_REQUEST")
        try:
            session = await self.t.offload(engine.lookup, session_id)
        except StatusError as exc:
            raise _Terminate(status_of(exc), exc.message, exc.macp_code) from None
        if not engine.may_read(session, identity):
            if engine.profile.stream_inline_errors:
                return [_MACPFrame("FORBIDDEN", FORBIDDEN_SUBSCRIBE, stream.bound or "")]
            return [inline_error(FORBIDDEN_SUBSCRIBE, stream.bound or "")]
        stream.bound = session_id
        stream.subscribed = True   # before the snapshot: live offers made meanwhile are kept
        try:
            records = await self.t.offload(engine.subscribe_with_history, session, stream)
        except StatusError as exc:     # evicted in between
            raise _Terminate(status_of(exc), exc.message) from None
        except MacpError as exc:
            raise _Terminate(*error_status(exc)) from None
        if engine.profile.after_sequence_ordinals:
            return _replay_after_ordinal(records, request.after_sequence, session, session_id)
        return [history_frame(records[i]) for i in range(min(request.after_sequence, len(records)), len(records))
                if records[i].kind == ENTRY_KIND_INCOMING]


def _MACPFrame(code: str, message: str, session_id: str, message_id: str = "") -> core_pb2.StreamSessionResponse:
    frame = core_pb2.StreamSessionResponse()
    frame.error.code = code
    frame.error.message = message
    frame.error.session_id = session_id
    frame.error.message_id = message_id
    return frame


def _replay_after_ordinal(records, after: int, session, session_id: str) -> list:
    """current.md §8.1–§8.2: accepted envelopes carry 1-based ordinals (SessionStart = 1, internal
    records and checkpoints none); replay those with ordinal > `after`. When the history held no
    longer starts at the SessionStart (restored from a terminal checkpoint), the envelopes before
    it are gone: a resume below that base is refused inline, naming it."""
    accepted = [r for r in records if r.kind == ENTRY_KIND_INCOMING]
    complete = bool(accepted) and accepted[0].message_type == "SessionStart"
    base = 0 if complete else max(len(session.seen) - len(accepted), 0)
    if after < base:
        return [_MACPFrame("INVALID_ENVELOPE", f"session history before ordinal {base} was compacted; resume with "
                           f"after_sequence >= {base} or re-read state via GetSession", session_id)]
    return [history_frame(r) for r in accepted[max(after - base, 0):]]


async def _withdraw(t, stream: SessionStream, session_id: str) -> None:
    """Take back a provisional subscription and everything it queued (once no publish to the session
    is in flight any more: publishes run under the session's lock)."""
    stream.subscribed = False
    await t.offload(t.engine.unsubscribe_settled, session_id, stream)
    stream.live.clear()
    stream.dropped = 0


def _inline_or_end(exc: MacpError, stream: SessionStream, profile=None):
    """runtime.md §7.4: the error as a status; terminal codes end the stream, the rest are frames
    (with the Ack's details when the profile sends refusal reasons)."""
    code, message = error_status(exc)
    if code in TERMINAL_CODES:
        raise _Terminate(code, message)
    details = profile.error_details(exc, inline=True) if profile is not None else b""
    return inline_error(message, stream.bound or "", details)
