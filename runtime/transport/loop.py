"""The event loop and the threads around it.

The kernel is synchronous and may be entered from the loop (memory store: nothing in it blocks) or
from worker threads (durable and shared stores: an append waits for its group commit, PostgreSQL for
its round trip). Whatever it publishes (stream envelopes, lifecycle events, signals, registry
changes) reaches coroutines through `Wakeups`: a direct call on the loop's thread, and from other
threads one `call_soon_threadsafe` per burst however many coroutines it wakes.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from functools import partial


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
    """Runs kernel calls: inline when the store never blocks, else on one of up to `workers`
    threads so the loop keeps serving while an append waits for its fdatasync or a database round
    trip. The hand-over is a SimpleQueue one way and `Wakeups` the other (the calls a group
    commit releases together wake the loop once), cheaper than run_in_executor's future chain."""

    def __init__(self, blocking: bool, workers: int, wakeups: Wakeups | None = None):
        self.blocking = blocking
        self.workers = max(1, workers)
        self.wakeups = wakeups
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def attach(self, wakeups: Wakeups) -> None:
        self.wakeups = wakeups

    async def __call__(self, fn, *args):
        if not self.blocking:
            return fn(*args)
        return await self._submit(fn, args)

    async def always(self, fn, *args):
        """Off the loop whatever the store (slow work such as closing the engine)."""
        return await self._submit(fn, args)

    def _submit(self, fn, args) -> asyncio.Future:
        future = self.wakeups.loop.create_future()
        with self._lock:
            if self._idle == 0 and len(self._threads) < self.workers and not self._closed:
                thread = threading.Thread(target=self._work, name=f"kernel-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle -= 1 if self._idle else 0
        self._queue.put((fn, args, future))
        return future

    def _work(self) -> None:
        get, call = self._queue.get, self.wakeups.call
        while True:
            job = get()
            if job is None:
                return
            fn, args, future = job
            try:
                result = fn(*args)
            except BaseException as exc:   # handed to the awaiting coroutine
                call(partial(_settle_error, future, exc))
            else:
                call(partial(_settle, future, result))
            with self._lock:
                self._idle += 1

    def close(self) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)


def _settle(future: asyncio.Future, result) -> None:
    if not future.done():
        future.set_result(result)


def _settle_error(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
