"""The event loop and the threads around it.

The kernel is synchronous and may be entered from the loop (memory store: nothing in it blocks) or
from worker threads (durable and shared stores: an append waits for its group commit, PostgreSQL for
its round trip). Whatever it publishes (stream envelopes, lifecycle events, signals, registry
changes) reaches coroutines through `Wakeups`: a direct call on the loop's thread, and from other
threads one `call_soon_threadsafe` per burst however many coroutines it wakes.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor


class Wakeups:
    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.thread = threading.get_ident()   # built on the loop's thread
        self._pending: list = []
        self._lock = threading.Lock()
        self._scheduled = False

    def call(self, fn) -> None:
        """Run `fn()` on the loop: now when called there, else soon."""
        if threading.get_ident() == self.thread:
            fn()
            return
        with self._lock:
            self._pending.append(fn)
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:   # the loop is closed: nobody is waiting any more
            pass

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
            self._scheduled = False
        for fn in pending:
            fn()


class Doorbell:
    """Wakes one waiting coroutine; `ring` from any thread, `wait` on the loop. A ring while nobody
    waits is remembered, so a wait after it returns at once."""

    __slots__ = ("_wakeups", "_future", "_rung")

    def __init__(self, wakeups: Wakeups):
        self._wakeups = wakeups
        self._future: asyncio.Future | None = None
        self._rung = False

    def ring(self) -> None:
        self._rung = True
        if self._future is not None:
            self._wakeups.call(self._fire)

    def _fire(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self) -> None:
        if not self._rung:
            self._future = future = self._wakeups.loop.create_future()
            try:
                if not self._rung:   # rung between the check and the future: ring saw no future
                    await future
            finally:
                self._future = None
        self._rung = False


class Offload:
    """Runs kernel calls: inline when the store never blocks, else on a worker thread so the loop
    keeps serving while an append waits for its fdatasync or a database round trip."""

    def __init__(self, blocking: bool, workers: int):
        self.blocking = blocking
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernel") if blocking else None

    async def __call__(self, fn, *args):
        if self.executor is None:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def always(self, fn, *args):
        """Off the loop whatever the store (slow work such as closing the engine)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False)
