"""A runtime inside the test process: the daemon's own `Runtime` (config, storage and replay, auth, the
grpc.aio server) on a free loopback port, for wire tests where a separate process adds nothing (no
kill -9, signal, exit status, command-line flag or start-up log check).

Every in-process server gets its own `Config`, read from the environment a `ServerProcess` would be
started with (`SERVER_ENV` + the test's `env`, auth included), never from `os.environ`; its own storage, engine,
registries and gRPC server. All of them run on one asyncio loop in a background thread (grpc.aio
binds one completion-queue poller to the loops that use it: one loop keeps that simple), stopped at
the end of the test session (`shutdown`). The interface is `ServerProcess`'s: `target`, `port`,
`stub()`, `channel()`, `stop()`, `restart()`, `kill()` (here: stop with no grace: in-flight calls
are cancelled; a real SIGKILL needs `ServerProcess`), `log()` (the start-up log lines).
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading

from macp_runtime.app.config import ConfigError, from_env
from macp_runtime.app.server import GIL_SWITCH_S, SHUTDOWN_GRACE_S, Runtime, StartupError

from .server import SERVER_ENV, _Client

START_TIMEOUT_S = 60.0


def _from_grpc_poller(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_handle_events":
            return True
        tb = tb.tb_next
    return False


def _exception_handler(loop, context) -> None:
    # grpc.aio wakes every loop it is bound to from one socket (the server's loop here, a test's
    # asyncio.run loop there): the loop that finds the byte already read, or the socket closed when
    # the last grpc.aio object went away, gets BlockingIOError/EBADF (grpc/grpc#25364). Harmless.
    exc = context.get("exception")
    if isinstance(exc, OSError) and _from_grpc_poller(exc):
        return
    loop.default_exception_handler(context)


class _Loop:
    """The one event loop of the in-process servers, on a daemon thread, started on first use."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(_exception_handler)
        self.thread = threading.Thread(target=self.loop.run_forever, name="inprocess-servers", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def drain():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(drain(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()


_loop: _Loop | None = None
_lock = threading.Lock()
_running: set = set()


def _shared_loop() -> _Loop:
    global _loop
    with _lock:
        if _loop is None:
            # as `serve()` does: the group commit's flusher thread gets the GIL back from the loop sooner
            sys.setswitchinterval(GIL_SWITCH_S)
            _loop = _Loop()
        return _loop


def shutdown() -> None:
    """Stop every in-process server still running and the loop (end of the test session)."""
    global _loop
    for srv in list(_running):
        srv.kill()
    with _lock:
        loop, _loop = _loop, None
    if loop is not None:
        loop.close()


class _Capture(logging.Handler):
    def __init__(self, lines: list):
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        self.lines.append(self.format(record))


class InProcessServer(_Client):
    def __init__(self, data_dir: str, env: dict | None = None):
        env = dict(env or {})
        if "MACP_METRICS_ADDR" in env:   # the Prometheus endpoint is never stopped: a process
            raise ValueError("MACP_METRICS_ADDR: use ServerProcess (server_factory)")
        self.data_dir = data_dir
        self.env = {**SERVER_ENV, "MACP_DATA_DIR": data_dir, **env}
        self.port = 0            # a free one, chosen when the gRPC server binds; kept across restart()
        self.target = ""
        self.runtime: Runtime | None = None
        self._lines: list[str] = []

    def start(self, wait: bool = True) -> "InProcessServer":
        """Start and serve (always ready on return; `wait` is accepted for ServerProcess's signature)."""
        try:
            cfg = from_env({"MACP_BIND_ADDR": f"127.0.0.1:{self.port}", **self.env})
        except ConfigError as exc:
            raise RuntimeError(f"configuration: {exc}") from None
        loop = _shared_loop()
        runtime = Runtime(cfg)
        logger = logging.getLogger("macp_runtime")
        capture, level = _Capture(self._lines), logger.level
        logger.addHandler(capture)
        logger.setLevel(logging.INFO)   # what `serve` logs at start-up, as the process's log would hold it
        try:
            loop.run(runtime.start(), START_TIMEOUT_S)
        except BaseException as exc:
            try:
                loop.run(runtime.stop(grace=0), START_TIMEOUT_S)
            except Exception:
                pass
            if isinstance(exc, StartupError):
                raise RuntimeError(f"server start-up failed: {exc}\n{self.log()}") from None
            raise
        finally:
            logger.removeHandler(capture)
            logger.setLevel(level)
        self.runtime = runtime
        self.port = runtime.port
        self.target = f"127.0.0.1:{self.port}"
        _running.add(self)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        return None   # start() returns once serving

    def log(self) -> str:
        return "\n".join(self._lines) + ("\n" if self._lines else "")

    def stop(self, grace: float = SHUTDOWN_GRACE_S) -> int:
        """The daemon's shutdown (as on SIGTERM): drain, end streams, close storage. Returns 0 as a
        clean exit does."""
        self._close_channel()
        runtime, self.runtime = self.runtime, None
        _running.discard(self)
        if runtime is not None and _loop is not None:
            _loop.run(runtime.stop(grace), grace + START_TIMEOUT_S)
        return 0

    def kill(self) -> None:
        """Stop at once: in-flight calls are cancelled (storage is still closed cleanly)."""
        self.stop(grace=0)

    def restart(self) -> "InProcessServer":
        self.stop()
        return self.start()
