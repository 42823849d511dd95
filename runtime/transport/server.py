"""The grpc.aio server: the MACP service, health and reflection on one event loop."""
from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .admission import Admission
from .loop import Offload, Wakeups
from .service import SERVICE_NAME, Transport, add_to_server

log = logging.getLogger("macp_runtime.server")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BindError(Exception):
    pass


class GrpcServer:
    """Built and started on the running event loop (`start`), stopped with `stop(grace)`."""

    def __init__(self, engine, authenticator, *, bind_addr: str, credentials, reflect: bool, blocking: bool,
                 workers: int, max_payload_bytes: int, session_start_limit: int, message_limit: int,
                 max_streams: int, max_streams_per_identity: int = 0, limits=None):
        self.engine = engine
        self.bind_addr = bind_addr
        self.credentials = credentials
        self.reflect = reflect
        self.offload = Offload(blocking, workers)
        self.admission = Admission(authenticator, max_payload_bytes=max_payload_bytes,
                                   session_start_limit=session_start_limit, message_limit=message_limit,
                                   max_streams=max_streams, metrics=lambda: engine.metrics,
                                   profile=engine.profile,
                                   max_streams_per_identity=max_streams_per_identity, limits=limits)
        self.server: grpc.aio.Server | None = None
        self.health = None
        self.port = 0

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        wakeups = Wakeups(loop)
        if self.engine.defers:   # group commits answer on the loop, one wakeup per batch
            self.engine.store.settle_via(loop.call_soon_threadsafe)
        self.offload.attach(wakeups)
        self.transport = Transport(self.engine, self.admission, self.offload, wakeups)
        # Thousands of streams share one connection in some clients: no per-connection stream cap
        # below MACP_MAX_STREAMS (grpc's default is unlimited; say so explicitly).
        options = [("grpc.so_reuseport", 0)]
        if self.engine.profile.request_ceiling:   # current.md §4.4: payload limit + 64 KiB envelope allowance
            options.append(("grpc.max_receive_message_length", self.admission.max_payload_bytes + 65_536))
        server = grpc.aio.server(options=options)
        add_to_server(self.transport, server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if self.reflect:
            reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        try:
            if self.credentials is None:
                self.port = server.add_insecure_port(self.bind_addr)
            else:
                self.port = server.add_secure_port(self.bind_addr, self.credentials)
        except RuntimeError as exc:
            raise BindError(f"cannot bind {self.bind_addr}: {exc}") from None
        if not self.port:
            raise BindError(f"cannot bind {self.bind_addr}")
        await server.start()
        self.server = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, _SERVING)
        return self.port

    async def not_serving(self) -> None:
        if self.health is not None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, _NOT_SERVING)

    async def stop(self, grace: float, close_engine) -> None:
        """Refuse new calls, end the engine's streams and watches (`close_engine`, off the loop),
        let the other in-flight calls finish (acks included) for up to `grace` seconds."""
        stopping = asyncio.ensure_future(self.server.stop(grace)) if self.server is not None else None
        await asyncio.sleep(0)   # the server stops taking calls before the streams are told to end
        await self.offload.always(close_engine)
        if stopping is not None:
            await stopping
        self.offload.close()
