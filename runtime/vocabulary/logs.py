"""Logging set-up: one line per event, human-readable by default or JSON (`--log-json`).

Structured fields travel in `extra={"fields": {...}}` on each record, so both formats show them:
human lines append `key=value`, JSON lines carry them as top-level keys.
"""
from __future__ import annotations

import json
import logging
import os
import select
import stat
import sys
import threading
import time
from collections import deque

from .redact import LOG_VALUE_MAX, clean, mask_url

SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "JWKS_JSON", "KEY_PATH", "SIGNING_KEY")


def mask(name: str, value) -> object:
    """Hide values of settings whose names suggest secrets (file paths of keys are fine to show)."""
    upper = name.upper()
    if value in (None, "", [], {}) or upper.endswith("_PATH") or upper.endswith("_FILE"):
        return value
    if upper.endswith("_URL") and isinstance(value, str):
        return mask_url(value)   # the URL is useful in the log, its credentials are not
    if any(m in upper for m in SECRET_MARKERS):
        return "***"
    return value


MESSAGE_MAX = 2000   # characters of one formatted log message (fields are capped separately)


class HumanFormatter(logging.Formatter):
    """One line per record: the message and every field value have control characters escaped and
    are capped, so values taken from requests can neither start a forged line nor grow one unboundedly."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = (-1, "")   # the last second formatted, and its text: strftime once a second

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        at, text = self._second
        if at != second:
            text = time.strftime(self.default_time_format, self.converter(second))
            self._second = (second, text)
        return self.default_msec_format % (text, record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = clean(record.message, MESSAGE_MAX)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{clean(str(k), 64)}={_human(v)}" for k, v in fields.items())
        return line


def _human(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
    s = clean(s, 8000 if isinstance(v, (dict, list)) else LOG_VALUE_MAX)
    if s and " " not in s and '"' not in s and "=" not in s:
        return s
    return '"' + s.replace('"', '\\"') + '"'   # control characters are escaped already (clean)


class RateLimitedLog:
    """At most `per_second` lines per second (a burst of that size), for lines that untrusted traffic
    can cause (rejected messages). Lines over the budget are counted and reported with the next line
    that gets through."""

    def __init__(self, logger: logging.Logger, per_second: float = 20.0):
        self.logger = logger
        self.rate = per_second
        self._tokens = per_second
        self._at = time.monotonic()
        self._suppressed = 0
        self._lock = threading.Lock()

    def info(self, msg: str, fields: dict) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1.0:
                self._suppressed += 1
                return
            self._tokens -= 1.0
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            fields = {**fields, "suppressed_before": suppressed}
        self.logger.info(msg, extra={"fields": fields})


class JsonFormatter(logging.Formatter):
    _second = (-1, "")   # the last second formatted, and its text: strftime once a second

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        at, text = self._second
        if at != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = (second, text)
        doc = {
            "ts": f"{text}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": clean(record.getMessage(), MESSAGE_MAX),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for k, v in fields.items():
                doc.setdefault(k, clean(v, LOG_VALUE_MAX) if isinstance(v, str) else v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


#: Lines waiting for a slow log reader, at most; beyond it new lines are dropped and counted.
BACKLOG_LINES = 10_000
#: How long flush() (at exit: logging.shutdown) waits for the backlog to be written.
FLUSH_WAIT_S = 5.0


class LineWriter(logging.Handler):
    """Writes log lines to a file descriptor and never lets the logging thread wait for its reader.

    A line goes out at once when the descriptor takes it whole without blocking: a regular file, or a
    pipe, terminal or socket that poll() says has room, for lines of at most PIPE_BUF bytes (POSIX
    writes those to a pipe in one piece). Otherwise it joins a backlog that a writer thread empties
    (started when first needed), and the lines after it follow it there, so the order holds. A reader
    that stops reading (a pipe nobody drains, a stalled log collector) thus costs log lines, never the
    event loop: with `capacity` lines waiting, further lines are dropped, and their number is logged
    as soon as the output takes lines again."""

    def __init__(self, fd: int, capacity: int = BACKLOG_LINES):
        super().__init__()
        self.fd = fd
        self.capacity = capacity
        try:   # a regular file never makes a writer wait for a reader: no poll() per line
            self._regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self._regular = False
        self._poll = select.poll()
        self._poll.register(fd, select.POLLOUT)
        self._cond = threading.Condition(threading.Lock())
        # Guarded by _cond:
        self._backlog: deque[bytes] = deque()
        self._busy = False        # the writer thread is writing what it took from the backlog
        self._dropped = 0         # lines dropped since the last notice
        self._thread: threading.Thread | None = None
        self._closed = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            self.handleError(record)
            return
        with self._cond:
            if not self._backlog and not self._busy and (
                    self._regular or (len(data) <= select.PIPE_BUF and self._poll.poll(0))):
                try:
                    written = os.write(self.fd, data)
                except OSError:   # the output is gone (EPIPE, EBADF): nothing can be told about it
                    return
                if written == len(data):
                    return
                data = data[written:]   # a partial write (a socket, a terminal): the rest waits its turn
            if len(self._backlog) >= self.capacity:
                self._dropped += 1
                return
            self._backlog.append(data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="log-writer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _drain(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()   # flush() waits for an empty backlog and an idle writer
                while not self._backlog and not self._dropped:
                    if self._closed:
                        return
                    self._cond.wait()
                data = b"".join(self._backlog)
                self._backlog.clear()
                dropped, self._dropped = self._dropped, 0
                self._busy = True
            if dropped:   # after the lines that were waiting: the dropped ones came after them
                data += self._notice(dropped)
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.fd, view):]
                except OSError:   # the output is gone: so is what waited for it
                    break

    def _notice(self, dropped: int) -> bytes:
        record = logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "%d log lines were dropped: the log output did not keep up", "args": (dropped,)})
        try:
            return (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        except Exception:
            return b""

    def flush(self, timeout: float = FLUSH_WAIT_S) -> None:
        """Wait (at most `timeout` seconds) until every waiting line is written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._thread is not None and (self._backlog or self._busy or self._dropped):
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return
                self._cond.wait(left)

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        super().close()


def _stderr_handler() -> logging.Handler:
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # stderr replaced by an object without a descriptor
        return logging.StreamHandler(sys.stderr)
    if not hasattr(select, "poll"):
        return logging.StreamHandler(sys.stderr)
    sys.stderr.flush()   # what Python wrote there so far comes first
    return LineWriter(fd)


def configure(level: str = "info", as_json: bool = False) -> None:
    # Neither format shows thread or process: records need not look them up (documented switches).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = _stderr_handler()
    handler.setFormatter(JsonFormatter() if as_json else HumanFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
