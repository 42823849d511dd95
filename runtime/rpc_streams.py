"""Streams and the session lifecycle on the wire, mixed into `MacpService`:
StreamSession (runtime.md §7), WatchSignals (§6), ListSessions / WatchSessions (§8.7–§8.8) and
SuspendSession / ResumeSession (§5.7).

The mixin expects of its host class: `self.engine`, `self.stream_slots` (a StreamSlots),
`self._identity(context)`, `self._require_identity(context)`, `self._check_shape(env)`,
`self._ambient(env)`, `self.start_window` and `self.message_window`.

Threads. The gRPC server is synchronous: every open stream holds one pool thread for as long as
it is open (it waits for the client's next frame and the session's next live envelope at once; see
SessionStream). The pool is sized MACP_WORKERS (for unary calls) + MACP_MAX_STREAMS (for streams),
and a stream beyond MACP_MAX_STREAMS is refused, so open streams can never starve the unary calls.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import logging
import threading

import grpc
from macp.v1 import core_pb2, envelope_pb2

from .broadcast import CLOSED, LAGGED
from .errors import MacpError, StatusError
from .session import OPEN, now_ms
from .specs.hooks.common import is_blank
from .storage import ENTRY_KIND_INCOMING

log = logging.getLogger("macp_runtime.streams")

LIVE_CAPACITY = 256        # live envelopes queued per StreamSession subscriber (runtime.md §7.5)
REQUEST_BACKLOG = 32       # client frames read ahead of processing (then gRPC flow control holds the client)
LAG_GRACE_S = 5.0          # a lagging stream whose client does not even read is cancelled after this
WATCH_POLL_S = 1.0         # a quiet watch stream re-checks that its client is still there
MAX_PAGE_SIZE = 1000       # ListSessions page_size above this is served as this

# Status codes that end a StreamSession; every other error is an inline frame (runtime.md §7.4).
TERMINAL_CODES = frozenset({
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
})
FORBIDDEN_SUBSCRIBE = "FORBIDDEN: caller is not a declared participant or observer for this session"
ONE_SESSION = "StreamSession may only carry envelopes for one session_id"

_Event = core_pb2.SessionLifecycleEvent


def _metadata(session):
    from .service import session_metadata   # service imports this module; import at call time
    return session_metadata(session)


class StreamSlots:
    """Counts open streams against MACP_MAX_STREAMS."""

    def __init__(self, limit: int):
        self.limit = limit
        self._open = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, context):
        with self._lock:
            full = self._open >= self.limit
            if not full:
                self._open += 1
        if full:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"too many open streams (MACP_MAX_STREAMS={self.limit})")
        try:
            yield
        finally:
            with self._lock:
                self._open -= 1

    def __len__(self) -> int:
        return self._open


class _Terminate(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        self.message = message


# what SessionStream.next_event() returns
LIVE, REQUEST, LAG, HALF_CLOSED, GONE, SHUTDOWN = range(6)


class SessionStream:
    """The state of one StreamSession call, shared by the engine (live envelopes in, via `offer`
    under the session lock), the client's frames and the call's pool thread (everything out, via
    `next_event`). One condition variable covers all of it.

    Client frames are read without a thread of their own when grpc's request iterator allows it:
    the stream then waits on the call's own condition, which grpc notifies when a frame, a
    half-close or a cancellation arrives, and polls the pending receive. (A thread blocked in
    `next(request_iterator)` would be woken by every send completion of the call: measured, that
    quadruples the server's CPU per delivered envelope.) Otherwise a reader thread feeds a queue.
    """

    def __init__(self, context, request_iterator):
        self._context = context
        self._requests: collections.deque = collections.deque()
        self._live: collections.deque = collections.deque()   # (log index, StreamSessionResponse)
        self._dropped = 0          # envelopes that found the live queue full
        self._input_done = False   # the client half-closed
        self._gone = False         # the client cancelled or the call ended
        self._shutdown = False     # the server is stopping
        self._finished = False     # the handler returned: nothing more is accepted
        self._waiting = False      # the pool thread waits in next_event (only then is a notify needed)
        self._receiving = False    # a receive is pending on the call (polled mode)
        self.bound: str | None = None
        self.subscribed = False
        state = getattr(request_iterator, "_state", None)
        condition = getattr(state, "condition", None)
        if isinstance(condition, threading.Condition) and all(
                callable(getattr(request_iterator, name, None))
                for name in ("_raise_or_start_receive_message", "_look_for_request")):
            self._cond = condition
            self._iterator = request_iterator
            self._reader = None
        else:
            self._cond = threading.Condition(threading.Lock())
            self._iterator = None
            self._reader = threading.Thread(target=self.read, args=(request_iterator,), name="stream-reader",
                                            daemon=True)

    def start(self) -> None:
        if self._reader is not None:
            self._reader.start()

    # --- engine side ---------------------------------------------------------------------------

    def offer(self, index: int, item) -> bool:
        """Queue a live envelope; never blocks. False tells the engine to drop this subscriber."""
        with self._cond:
            if self._finished:
                return False
            if self._dropped:              # already cut off: only count, so the message can say how many
                self._dropped += 1
                return True
            if len(self._live) >= LIVE_CAPACITY:
                self._dropped = 1
                self._cond.notify_all()
                # The pool thread may be stuck sending to a client that does not read at all.
                timer = threading.Timer(LAG_GRACE_S, self._cancel_if_running)
                timer.daemon = True
                timer.start()
                return True
            self._live.append((index, item))
            if self._waiting:
                self._cond.notify_all()
            return True

    def discard_before(self, index: int) -> None:
        """A history snapshot of `index` records was just taken: queued envelopes it covers go."""
        with self._cond:
            while self._live and self._live[0][0] < index:
                self._live.popleft()

    def _cancel_if_running(self) -> None:
        with self._cond:
            finished = self._finished
        if not finished:
            self._context.cancel()

    # --- client frames ---------------------------------------------------------------------------

    def read(self, request_iterator) -> None:
        """The reader thread (only when the request iterator cannot be polled)."""
        try:
            for request in request_iterator:
                with self._cond:
                    while len(self._requests) >= REQUEST_BACKLOG and not self._finished:
                        self._cond.wait()
                    if self._finished:
                        return
                    self._requests.append(request)
                    self._cond.notify_all()
            with self._cond:
                self._input_done = True
                self._cond.notify_all()
        except Exception:  # the call was cancelled or failed: the client is gone
            self.client_gone()

    def _next_request(self):
        """With the condition held: the next client frame if one has arrived, else None."""
        if self._iterator is None:
            if self._requests:
                request = self._requests.popleft()
                self._cond.notify_all()   # room for the reader
                return request
            return None
        if self._input_done:
            return None
        try:
            if not self._receiving:
                self._iterator._raise_or_start_receive_message()
                self._receiving = True
            request = self._iterator._look_for_request()
        except StopIteration:
            self._receiving = False
            self._input_done = True
            return None
        except Exception:  # cancelled
            self._receiving = False
            self._gone = True
            return None
        if request is not None:
            self._receiving = False
        return request

    def client_gone(self) -> None:
        with self._cond:
            self._gone = True
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    # --- pool thread ---------------------------------------------------------------------------

    def next_event(self):
        with self._cond:
            while True:
                if self._shutdown:
                    return SHUTDOWN, None
                if self._gone:
                    return GONE, None
                if self._dropped:
                    return LAG, self._dropped
                if self._live:
                    return LIVE, self._live.popleft()[1]
                request = self._next_request()
                if request is not None:
                    return REQUEST, request
                if self._gone:
                    continue
                if self._input_done:
                    return HALF_CLOSED, None
                self._waiting = True
                try:
                    self._cond.wait()
                finally:
                    self._waiting = False

    def finish(self) -> None:
        with self._cond:
            self._finished = True
            self._live.clear()
            self._cond.notify_all()


def _replayed(record) -> envelope_pb2.Envelope:
    """A history entry as the envelope subscribers see (runtime.md §7.2 step 6)."""
    return envelope_pb2.Envelope(
        macp_version=record.macp_version or "1.0", mode=record.mode, message_type=record.message_type,
        message_id=record.message_id, session_id=record.session_id, sender=record.sender,
        timestamp_unix_ms=record.timestamp_unix_ms or record.received_at_ms, payload=record.payload)


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


class StreamRpcs:
    # --- StreamSession (§7) --------------------------------------------------------------------

    def StreamSession(self, request_iterator, context):
        identity = self._identity(context)
        if identity is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Unauthenticated")
        engine = self.engine
        with self.stream_slots.hold(context):
            stream = SessionStream(context, request_iterator)
            engine.register_stream(stream)
            context.add_callback(stream.client_gone)
            stream.start()
            try:
                while True:
                    kind, value = stream.next_event()
                    if kind == LIVE:
                        yield value
                    elif kind == REQUEST:
                        try:
                            yield from self._stream_frame(stream, value, identity)
                        except _Terminate as end:
                            context.set_code(end.code)
                            context.set_details(end.message)
                            return
                    elif kind == LAG:
                        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
                        context.set_details(f"StreamSession receiver fell behind by {value} envelopes")
                        log.info("stream of %s on session %s cut off: fell behind by %d envelopes",
                                 identity.sender, stream.bound, value)
                        return
                    elif kind == SHUTDOWN:
                        context.set_code(grpc.StatusCode.UNAVAILABLE)
                        context.set_details("the server is shutting down")
                        return
                    else:   # HALF_CLOSED (live envelopes already drained) or GONE
                        return
            finally:
                stream.finish()
                if stream.subscribed:
                    engine.unsubscribe(stream.bound, stream)
                engine.unregister_stream(stream)

    def _stream_frame(self, stream: SessionStream, request, identity):
        """One client frame: yields the frames it produces; raises _Terminate to end the stream."""
        if request.subscribe_session_id:
            yield from self._stream_subscribe(stream, request, identity)
            return
        if not request.HasField("envelope"):
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT,
                             "StreamSessionRequest must contain an envelope or subscribe_session_id")
        env = request.envelope
        try:
            self._check_shape(env)
        except MacpError as exc:
            yield _inline_or_end(exc, stream)
            return
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
                session = self.engine.lookup(session_id)
            except StatusError:
                session = None
            if session is not None:
                if env.mode != session.mode:
                    raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT,
                                     "INVALID_ENVELOPE: envelope mode does not match the bound session mode")
                if session.status != OPEN:
                    raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, "SESSION_NOT_OPEN")
        if (is_start and not identity.can_start_sessions) or (
                identity.allowed_modes is not None and env.mode not in identity.allowed_modes):
            yield _inline(stream, "Forbidden")
            return
        window = self.start_window if is_start else self.message_window
        if not window.allow(identity.sender):
            self.engine.metrics.rate_limited("session_start" if is_start else "message")
            raise _Terminate(grpc.StatusCode.RESOURCE_EXHAUSTED, "RateLimited")
        if stream.bound is None:
            stream.bound = session_id
        if not stream.subscribed:
            self.engine.subscribe(session_id, stream)
            stream.subscribed = True
        try:
            if is_start:
                self.engine.start_session(env, identity)
            elif mtype == "Progress":
                self._ambient(env)
            else:
                self.engine.process_message(env, identity)
        except MacpError as exc:
            self.engine.metrics.send_done(env.mode, mtype, exc.code, None)
            yield _inline_or_end(exc, stream)
            return
        self.engine.metrics.send_done(env.mode, mtype, "", None)
        # Success yields nothing here: the accepted envelope comes back through the session's channel.

    def _stream_subscribe(self, stream: SessionStream, request, identity):
        if request.HasField("envelope"):
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT,
                             "StreamSessionRequest must not contain both envelope and subscribe_session_id")
        session_id = request.subscribe_session_id
        if stream.bound is not None and stream.bound != session_id:
            raise _Terminate(grpc.StatusCode.INVALID_ARGUMENT, ONE_SESSION)
        try:
            session = self.engine.lookup(session_id)
        except StatusError as exc:
            raise _Terminate(exc.code, exc.message) from None
        if not self.engine.may_read(session, identity):
            yield _inline(stream, FORBIDDEN_SUBSCRIBE)
            return
        stream.bound = session_id
        try:
            records = self.engine.subscribe_with_history(session, stream)
        except StatusError as exc:     # evicted in between
            raise _Terminate(exc.code, exc.message) from None
        except MacpError as exc:
            raise _Terminate(exc.kind.status, exc.status_message) from None
        stream.subscribed = True
        for i in range(min(request.after_sequence, len(records)), len(records)):
            record = records[i]
            if record.kind == ENTRY_KIND_INCOMING:
                yield core_pb2.StreamSessionResponse(envelope=_replayed(record))

    # --- WatchSignals (§6) -----------------------------------------------------------------------

    def _publish_signal(self, env) -> None:
        """An accepted Signal or Progress goes to every WatchSignals subscriber (never to history)."""
        signals = self.engine.signals
        cluster = self.engine.cluster
        if not len(signals) and cluster is None:
            return
        item = core_pb2.WatchSignalsResponse()
        item.envelope.CopyFrom(env)
        item.envelope.DiscardUnknownFields()
        signals.publish(item)
        if cluster is not None:   # other instances' WatchSignals subscribers (PostgreSQL NOTIFY)
            cluster.publish_signal(item)

    def WatchSignals(self, request, context):
        with self.stream_slots.hold(context):
            yield from self._watch(context, self.engine.signals.subscribe(), lambda item: item)

    def _watch(self, context, sub, render, first=()):
        """Yield `first`, then `render(item)` per broadcast item, until the client goes, the
        subscriber falls behind (the stream then ends OK) or the server stops."""
        context.add_callback(sub.cancel)
        try:
            if self.engine.closing.is_set():
                return
            yield from first
            while True:
                item = sub.get(WATCH_POLL_S)
                if item is None:
                    if not context.is_active():
                        return
                    continue
                if item is LAGGED or item is CLOSED:
                    return
                out = render(item)
                if out is not None:
                    yield out
        finally:
            sub.cancel()

    # --- ListSessions / WatchSessions (§8.7, §8.8) ------------------------------------------------

    def ListSessions(self, request, context):
        """Every session in memory (no lazy expiry). page_size 0 = all of them, as v0.4.0 answers;
        page_size > 0 pages in (started_at, session_id) order with an opaque next_page_token."""
        self._require_identity(context)
        self.engine.refresh_sessions()   # a shared store: sessions other instances hold too
        sessions = self.engine.sessions()
        if request.page_size < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        if request.page_size == 0 and not request.page_token:
            return core_pb2.ListSessionsResponse(sessions=[_metadata(s) for s in sessions])
        sessions.sort(key=lambda s: (s.started_at_ms, s.session_id))
        if request.page_token:
            after = _parse_page_token(request.page_token)
            if after is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not one this server issued")
            sessions = [s for s in sessions if (s.started_at_ms, s.session_id) > after]
        size = min(request.page_size, MAX_PAGE_SIZE) if request.page_size else len(sessions)
        page = sessions[:size]
        token = _page_token(page[-1]) if len(sessions) > size else ""
        return core_pb2.ListSessionsResponse(sessions=[_metadata(s) for s in page], next_page_token=token)

    def WatchSessions(self, request, context):
        self._require_identity(context)
        with self.stream_slots.hold(context):
            self.engine.refresh_sessions()   # a shared store: sessions other instances hold too
            sub = self.engine.lifecycle.subscribe()   # before the snapshot: nothing can fall between
            first = (core_pb2.WatchSessionsResponse(event=_Event(
                event_type=_Event.EVENT_TYPE_CREATED, session=_metadata(s), observed_at_unix_ms=s.started_at_ms))
                for s in self.engine.sessions())
            yield from self._watch(context, sub, _lifecycle_response, first)

    # --- SuspendSession / ResumeSession (§5.7) -----------------------------------------------------

    def SuspendSession(self, request, context):
        return self._control(context, request, self.engine.suspend_session, core_pb2.SuspendSessionResponse)

    def ResumeSession(self, request, context):
        return self._control(context, request, self.engine.resume_session, core_pb2.ResumeSessionResponse)

    def _control(self, context, request, action, response_type):
        identity = self._require_identity(context)
        try:
            outcome = action(request.session_id, identity, request.reason)
        except StatusError as exc:
            context.abort(exc.code, exc.message)
        except MacpError as exc:
            return response_type(ack=envelope_pb2.Ack(
                ok=False, session_id=request.session_id, accepted_at_unix_ms=now_ms(),
                error=envelope_pb2.MACPError(code=exc.code, message=exc.message, session_id=request.session_id,
                                             details=exc.details)))
        return response_type(ack=envelope_pb2.Ack(ok=True, session_id=request.session_id,
                                                  accepted_at_unix_ms=now_ms(), session_state=outcome.state))


def _lifecycle_response(item):
    event, session, observed_at = item
    out = core_pb2.WatchSessionsResponse()
    out.event.event_type = event
    out.event.observed_at_unix_ms = observed_at
    if not session.gone:   # metadata as it is now; absent once the session was evicted
        out.event.session.CopyFrom(_metadata(session))
    return out


def _inline(stream: SessionStream, message: str) -> core_pb2.StreamSessionResponse:
    return core_pb2.StreamSessionResponse(error=envelope_pb2.MACPError(
        code=message, message=message, session_id=stream.bound or ""))


def _inline_or_end(exc: MacpError, stream: SessionStream) -> core_pb2.StreamSessionResponse:
    """runtime.md §7.4: the error as a status; terminal codes end the stream, the rest are frames."""
    code, message = exc.kind.status, exc.status_message
    if code in TERMINAL_CODES:
        raise _Terminate(code, message)
    return _inline(stream, message)
