"""stdout for examples that print from two threads: each thread's line goes out whole (a helper,
not an example: files starting with `_` are not run by the example tests)."""
from __future__ import annotations

import sys
import threading


class LineAtATime:
    def __init__(self, out):
        self._out = out
        self._lock = threading.Lock()
        self._pending = threading.local()

    def write(self, text: str) -> int:
        buffered = getattr(self._pending, "text", "") + text
        *lines, rest = buffered.split("\n")
        self._pending.text = rest
        if lines:
            with self._lock:
                self._out.write("".join(line + "\n" for line in lines))
                self._out.flush()
        return len(text)

    def flush(self) -> None:
        self._out.flush()


def install() -> None:
    if not isinstance(sys.stdout, LineAtATime):
        sys.stdout = LineAtATime(sys.stdout)
