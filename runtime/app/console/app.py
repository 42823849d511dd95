"""The console's HTTP side (aiohttp): the pages, the JSON API and the event stream.

    GET /                                   the single page (static/index.html; needs no credential)
    GET /static/...                         its script and style sheet
    GET /api/whoami                         the identity of the bearer credential
    GET /api/sessions?state=&mode=          sessions this identity may read, newest first
    GET /api/sessions/{id}                  metadata, phase, path taken, diagram, history (decoded)
    GET /api/sessions/{id}/envelopes/{i}    raw log entry i (JSON; `?format=proto` = macp.v1.Envelope bytes)
    GET /api/events[?session=ID]            server-sent events: ready, lifecycle, envelope, modes, policies
    GET /api/modes, /api/modes/{name}       modes; one mode's generated documentation with its diagram
    GET /api/policies[?mode=]               registered governance policies and their rules

Every /api answer needs `Authorization: Bearer <token>`, resolved by the same resolvers as gRPC
(401 without or with an invalid credential). A session the identity may not read answers 404, as an
unknown one does. Nothing here changes anything: only GET and HEAD are routed.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import os

from aiohttp import web

from ...vocabulary.identity import Identity
from .events import END, Hub, sse
from .facade import ConsoleView, NotVisible

log = logging.getLogger("macp_runtime.console")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
KEEPALIVE_S = 15.0
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
VIEW = web.AppKey("view", ConsoleView)
HUB = web.AppKey("hub", Hub)
POOL = web.AppKey("pool", concurrent.futures.ThreadPoolExecutor)
IDENTITY = web.RequestKey("identity", Identity)   # the authenticated caller of one /api/ request


def _json(data, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data, separators=(",", ":")), status=status,
                        content_type="application/json", headers={"Cache-Control": "no-store"})


def _error(status: int, message: str, **headers) -> web.Response:
    response = _json({"error": message}, status)
    response.headers.update(headers)
    return response


@web.middleware
async def _headers(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        # aiohttp answers a raised HTTPException itself (returning one is deprecated): it gets the headers too
        _secure(exc)
        raise
    if not response.prepared:   # the event stream set its own before it started
        _secure(response)
    return response


def _secure(response: web.StreamResponse) -> None:
    for key, value in SECURITY_HEADERS.items():
        response.headers.setdefault(key, value)


@web.middleware
async def _authenticate(request: web.Request, handler):
    """/api/*: the bearer credential through the gRPC resolvers (off the loop: a JWKS may be fetched)."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    header = request.headers.get("Authorization", "")
    identity = None
    if header.startswith("Bearer ") and len(header) > len("Bearer "):
        identity = await _off_loop(request, request.app[VIEW].identity, header)
    if identity is None:
        return _error(401, "unauthenticated: send Authorization: Bearer <token>", **{"WWW-Authenticate": "Bearer"})
    request[IDENTITY] = identity
    return await handler(request)


async def _off_loop(request: web.Request, fn, *args):
    """Kernel reads may touch the disk or a database: they run on the console's own small pool."""
    return await asyncio.get_running_loop().run_in_executor(request.app[POOL], functools.partial(fn, *args))


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(os.path.join(STATIC, "index.html"), headers={"Cache-Control": "no-cache"})


async def whoami(request: web.Request) -> web.Response:
    identity = request[IDENTITY]
    return _json({"sender": identity.sender, "is_observer": identity.is_observer})


async def sessions(request: web.Request) -> web.Response:
    view = request.app[VIEW]
    data = await _off_loop(request, view.sessions, request[IDENTITY], request.query.get("state", ""),
                           request.query.get("mode", ""))
    return _json(data)


async def session(request: web.Request) -> web.Response:
    try:
        data = await _off_loop(request, request.app[VIEW].session, request.match_info["session_id"],
                               request[IDENTITY])
    except NotVisible:
        return _error(404, "session not found")
    return _json(data)


async def envelope(request: web.Request) -> web.Response:
    try:
        index = int(request.match_info["index"])
        data, raw = await _off_loop(request, request.app[VIEW].envelope, request.match_info["session_id"], index,
                                    request[IDENTITY])
    except (ValueError, NotVisible):
        return _error(404, "entry not found")
    if request.query.get("format") == "proto":
        return web.Response(body=raw, content_type="application/x-protobuf",
                            headers={"Cache-Control": "no-store", "X-Protobuf-Message": "macp.v1.Envelope"})
    return _json(data)


async def modes(request: web.Request) -> web.Response:
    return _json({"modes": await _off_loop(request, request.app[VIEW].modes)})


async def mode(request: web.Request) -> web.Response:
    doc = await _off_loop(request, request.app[VIEW].mode, request.match_info["name"])
    if doc is None:
        return _error(404, "mode not found")
    return _json(doc)


async def policies(request: web.Request) -> web.Response:
    return _json({"policies": await _off_loop(request, request.app[VIEW].policies, request.query.get("mode", ""))})


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events. `ready` once the stream is attached (a page loads its snapshot after it,
    so nothing falls between), then `lifecycle`, `envelope`, `modes`, `policies`; a client that
    falls behind gets `lagged` and the stream ends; at shutdown `bye`. At most MAX_CLIENTS streams
    are open, MAX_CLIENTS_PER_IDENTITY of them per identity (429 beyond)."""
    hub = request.app[HUB]
    refused = hub.refusal(request[IDENTITY])
    if refused is not None:
        return _error(429, refused)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    for key, value in SECURITY_HEADERS.items():
        response.headers[key] = value
    await response.prepare(request)
    client = hub.attach(request[IDENTITY], request.query.get("session") or None)
    try:
        await response.write(sse("ready", {"sender": request[IDENTITY].sender}))
        while True:
            try:
                item = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is END:
                break
            await response.write(item)
    except ConnectionResetError:
        pass
    finally:   # also when the handler is cancelled because the client went away
        hub.detach(client)
    return response


def make_app(view: ConsoleView, hub: Hub, pool) -> web.Application:
    app = web.Application(middlewares=[_headers, _authenticate])
    app[VIEW] = view
    app[HUB] = hub
    app[POOL] = pool
    app.router.add_get("/", index)
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    app.router.add_get("/api/whoami", whoami)
    app.router.add_get("/api/sessions", sessions)
    app.router.add_get("/api/sessions/{session_id}", session)
    app.router.add_get("/api/sessions/{session_id}/envelopes/{index}", envelope)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/modes", modes)
    app.router.add_get("/api/modes/{name}", mode)
    app.router.add_get("/api/policies", policies)
    return app
