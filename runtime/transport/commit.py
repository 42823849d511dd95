"""The commit point as the transport sees it: a kernel call that may append is answered only once
what it appended is durable, without blocking the event loop (see Engine `deferring`)."""
from __future__ import annotations

from functools import partial

from ..storage import StorageError
from ..vocabulary.errors import Kind, MacpError


async def commit(t, session_id: str, fn, *args, starts_mode: str | None = None):
    """A kernel call that may append to `session_id`'s history, answered only once what it appended
    (and anything before it in that session) is durable: on the loop with deferred commit, else on
    an offload thread (or inline with the memory store). `starts_mode`: the call is a SessionStart
    of that mode (its spec text is archived first, off the loop, the first time it is used)."""
    engine = t.engine
    if not t.offload.blocking:
        return fn(*args)
    if not engine.defers:
        return await t.offload(fn, *args)
    await _off_loop_first(t, session_id, starts_mode)
    engine.set_deferring(True)
    try:
        result = fn(*args)
    except MacpError:
        engine.set_deferring(False)
        await _durable(t, session_id)   # a refusal judged on state not yet durable waits for it too
        raise
    engine.set_deferring(False)
    error = await _durable(t, session_id)
    if error is not None:
        raise MacpError(Kind.StorageFailed, detail=str(error))
    return result


async def _off_loop_first(t, session_id: str, starts_mode: str | None) -> None:
    """What would block the loop inside the kernel call, waited for on a kernel thread instead: the
    session's lock while a kernel thread holds it across an fdatasync (the checkpointer, the sweeper,
    a control RPC), and the first archiving of a mode's spec text (a durable document write)."""
    engine = t.engine
    session = engine.peek(session_id)
    if session is not None:
        lock = session.lock
        while lock.locked():
            await t.offload.always(_wait_for, lock)
    if starts_mode is not None:
        archive = engine.spec_archive
        compiled = engine.modes.get(starts_mode) if archive is not None else None
        if compiled is not None and not archive.archived(compiled):
            try:
                await t.offload.always(archive.ensure, compiled)
            except StorageError:   # the kernel call tries again and answers StorageFailed
                pass


def _wait_for(lock) -> None:
    with lock:
        pass


async def durable(t, session_id: str):
    """Wait until nothing appended to `session_id` is still waiting for its fdatasync: afterwards
    (until the caller's next await) the session's in-memory state is durable. The write error, or None."""
    while True:
        error = await _durable(t, session_id)
        if error is not None or t.engine.pending(session_id) is None:
            return error


async def _durable(t, session_id: str):
    pending = t.engine.pending(session_id)
    if pending is None:
        return None
    future = t.wakeups.loop.create_future()
    call = t.wakeups.call
    pending.when_settled(lambda error: call(partial(_settle, future, error)))
    return await future


def _settle(future, error) -> None:
    if not future.done():
        future.set_result(error)
