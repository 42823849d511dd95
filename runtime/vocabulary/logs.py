"""Logging set-up: one line per event, human-readable by default or JSON (`--log-json`).

Structured fields travel in `extra={"fields": {...}}` on each record, so both formats show them:
human lines append `key=value`, JSON lines carry them as top-level keys.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time

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


def configure(level: str = "info", as_json: bool = False) -> None:
    # Neither format shows thread or process: records need not look them up (documented switches).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else HumanFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
