"""The browser console (MACP_CONSOLE_ADDR): live sessions, phase diagrams, histories, modes and
policies, served by the daemon itself over HTTP. Read-only: it changes nothing.

`ConsoleServer` runs on an asyncio loop (`await start()` / `await stop()`); `start_console` gives it
a loop thread of its own for a transport that has no loop to share.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading

log = logging.getLogger("macp_runtime.console")


class ConsoleServer:
    def __init__(self, engine, authenticator, addr: str):
        from ..config import parse_bind_addr

        parsed = parse_bind_addr(addr)
        if parsed is None:
            raise ValueError(f"console address must be IP:PORT, got {addr!r}")
        self.host, self.port = parsed
        self.engine = engine
        self.authenticator = authenticator
        self.url = ""
        self._runner = None
        self._hub = None
        self._pool = None

    async def start(self) -> str:
        """Serve on the running loop. Returns the URL. Raises OSError when the address is unusable."""
        from aiohttp import web

        from .app import make_app
        from .events import Hub
        from .facade import ConsoleView

        loop = asyncio.get_running_loop()
        view = ConsoleView(self.engine, self.authenticator)
        self._hub = Hub(self.engine, view, loop)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="console")
        self._runner = web.AppRunner(make_app(view, self._hub, self._pool), access_log=None,
                                     handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._pool.shutdown(wait=False)
            raise
        port = self._runner.addresses[0][1] if self._runner.addresses else self.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{port}/"
        self._hub.start_bridges()
        return self.url

    async def stop(self) -> None:
        if self._hub is not None:
            self._hub.close()      # event streams end first, so cleanup need not wait for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class ConsoleThread:
    """A ConsoleServer on a dedicated event-loop thread (for the synchronous gRPC transport)."""

    def __init__(self, server: ConsoleServer):
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="console", daemon=True)

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "ConsoleThread":
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            raise
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        except Exception as exc:
            log.warning("console: stop: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def start_console(engine, authenticator, addr: str) -> ConsoleThread:
    """Serve the console on `addr` from a loop thread of its own; returns the running handle (`url`,
    `stop()`). Raises OSError when the address cannot be bound."""
    return ConsoleThread(ConsoleServer(engine, authenticator, addr)).start()
