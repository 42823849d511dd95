"""Logging set-up: one line per event, human-readable by default or JSON (`--log-json`).

Structured fields travel in `extra={"fields": {...}}` on each record, so both formats show them:
human lines append `key=value`, JSON lines carry them as top-level keys.
"""
from __future__ import annotations

import json
import logging
import sys
import time

SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "JWKS_JSON", "KEY_PATH", "SIGNING_KEY")


def mask(name: str, value) -> object:
    """Hide values of settings whose names suggest secrets (file paths of keys are fine to show)."""
    upper = name.upper()
    if value in (None, "", [], {}) or upper.endswith("_PATH") or upper.endswith("_FILE"):
        return value
    if upper.endswith("DATABASE_URL") and isinstance(value, str):
        from .config import mask_url   # the URL is useful in the log, its password is not

        return mask_url(value)
    if any(m in upper for m in SECRET_MARKERS):
        return "***"
    return value


class HumanFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={_human(v)}" for k, v in fields.items())
        return line


def _human(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v, separators=(",", ":"), default=str)
    return s if s and " " not in s else json.dumps(s)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            for k, v in fields.items():
                doc.setdefault(k, v)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def configure(level: str = "info", as_json: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else HumanFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
