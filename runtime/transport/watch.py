"""The one watch loop: every server-streaming watch (WatchSessions, WatchSignals, WatchModeRegistry,
WatchPolicies) is `first` frames, then one frame per broadcast item, until the client goes (the
call is cancelled), the subscriber falls behind or the broadcaster closes (the stream then ends OK)."""
from __future__ import annotations

from ..broadcast import CLOSED, LAGGED
from .loop import Doorbell


async def watch(bell: Doorbell, sub, render, first=()):
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
                if item is LAGGED or item is CLOSED:
                    return
                frame = render(item)
                if frame is not None:
                    yield frame
    finally:
        sub.cancel()
