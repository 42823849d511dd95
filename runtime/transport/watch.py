"""The one watch loop: every server-streaming watch (WatchSessions, WatchSignals, WatchModeRegistry,
WatchPolicies) is `first` frames, then one frame per broadcast item, until the client goes (the
call is cancelled), the subscriber falls behind or the broadcaster closes (the stream then ends OK).
A subscriber that falls behind ends OK under v0.4.0; under the current profile the stream ends
RESOURCE_EXHAUSTED with macp-error-code STREAM_LAGGED (current.md §9.2): `lagged` raises that."""
from __future__ import annotations

from ..vocabulary.broadcast import CLOSED, LAGGED
from .loop import Doorbell


async def watch(bell: Doorbell, sub, render, first=(), lagged=None):
    """An async generator of frames. `sub` was subscribed with `bell.ring` as its notify."""
    try:
        for frame in first:
            yield frame
        while True:
            items = sub.drain()
            if not items:
                await bell.wait()
                continue
            for item in items:
                if item is LAGGED and lagged is not None:
                    await lagged()
                if item is LAGGED or item is CLOSED:
                    return
                frame = render(item)
                if frame is not None:
                    yield frame
    finally:
        sub.cancel()
