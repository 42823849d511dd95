"""The browser console (MACP_CONSOLE_ADDR): live sessions, phase diagrams, histories, modes and
policies, served by the daemon itself over HTTP. Read-only: it changes nothing.

`ConsoleServer` runs on the running asyncio loop (`await start()` / `await stop()`); `ConsoleService`
plugs it into the daemon, on the event loop of the gRPC transport.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import TYPE_CHECKING

from ..errors import StartupError
from ..options import parse_bind_addr

if TYPE_CHECKING:   # aiohttp and the hub load when the console starts, not with the daemon
    from aiohttp import web

    from .events import Hub

log = logging.getLogger("macp_runtime.console")


class ConsoleServer:
    def __init__(self, engine, authenticator, addr: str):
        parsed = parse_bind_addr(addr)
        if parsed is None:
            raise ValueError(f"console address must be IP:PORT, got {addr!r}")
        self.host, self.port = parsed
        self.engine = engine
        self.authenticator = authenticator
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._hub: Hub | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> str:
        """Serve on the running loop. Returns the URL. Raises OSError when the address is unusable."""
        from aiohttp import web

        from .app import make_app
        from .events import Hub
        from .facade import ConsoleView

        loop = asyncio.get_running_loop()
        view = ConsoleView(self.engine, self.authenticator)
        self._hub = hub = Hub(self.engine, view, loop)
        self._pool = pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="console")
        self._runner = runner = web.AppRunner(make_app(view, hub, pool), access_log=None,
                                              handle_signals=False, shutdown_timeout=1.0,
                                              handler_cancellation=True)   # a closed tab ends its stream at once
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            pool.shutdown(wait=False)
            raise
        port = runner.addresses[0][1] if runner.addresses else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}/"
        hub.start_bridges()
        return self.url

    async def stop(self) -> None:
        if self._hub is not None:
            self._hub.close()      # event streams end first, so cleanup need not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class ConsoleService:
    """The console as an additional service of the daemon (`Runtime.add_service`): it starts on the
    daemon's event loop, the one the gRPC transport runs on, once the gRPC server serves, and stops
    first when the daemon stops."""

    def __init__(self, addr: str):
        self.addr = addr
        self.server: ConsoleServer | None = None

    async def start(self, runtime) -> None:
        self.server = ConsoleServer(runtime.engine, runtime.authenticator, self.addr)
        try:
            url = await self.server.start()
        except OSError as exc:
            self.server = None
            raise StartupError(f"cannot serve the console on {self.addr}: {exc}") from None
        log.info("console: %s (read-only; sign in with a bearer token%s)", url,
                 ", in dev mode any name" if not runtime.authenticator.resolvers else "")

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()   # its event streams end at once
            self.server = None
