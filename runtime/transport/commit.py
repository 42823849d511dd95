"""The commit point as the transport sees it: a kernel call that may append is answered only once
what it appended is durable, without blocking the event loop (see Engine `deferring`)."""
from __future__ import annotations

from functools import partial

from ..vocabulary.errors import Kind, MacpError


async def commit(t, session_id: str, fn, *args):
    """A kernel call that may append to `session_id`'s history, answered only once what it appended
    (and anything before it in that session) is durable: on the loop with deferred commit, else on
    an offload thread (or inline with the memory store)."""
    engine = t.engine
    if not t.offload.blocking:
        return fn(*args)
    if not engine.defers:
        return await t.offload(fn, *args)
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
