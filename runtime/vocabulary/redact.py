"""Hiding secrets and taming untrusted text before it reaches a log line or a terminal.

* `mask_url`: a URL or libpq connection string with its password, URL user-info and credential-like
  query parameters replaced by `***` (for start-up logs: MACP_DATABASE_URL, MACP_AUTH_JWKS_URL).
* `clean`: a string with control characters escaped and its length capped, so a client-chosen value
  (a message id with a newline, a megabyte-long reason) cannot forge or flood a log line.
"""
from __future__ import annotations

import re

# query parameters whose values are credentials
_SECRET_PARAMS = re.compile(
    r"(?i)([?&;](?:[a-z0-9_.-]*(?:token|secret|password|passwd|pwd|key|sig|signature|auth|credential|"
    r"session)[a-z0-9_.-]*)=)([^&;#\s]*)")
_USERINFO = re.compile(r"(://)([^/@\s]*)@")
_LIBPQ_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

LOG_VALUE_MAX = 200


def _userinfo(match: re.Match) -> str:
    user, sep, _password = match.group(2).partition(":")
    if sep:
        return f"{match.group(1)}{user}:***@"
    return f"{match.group(1)}{user}@" if user and len(user) <= 32 and user.isidentifier() else f"{match.group(1)}***@"


def mask_url(url: str) -> str:
    """URL passwords (`user:***@`), token-like user-info (`***@`), credential query parameters and libpq
    `password=` values (quoted or not) hidden."""
    url = _USERINFO.sub(_userinfo, url)
    url = _SECRET_PARAMS.sub(r"\1***", url)
    return _LIBPQ_PASSWORD.sub(r"\1***", url)


_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    ch = match.group(0)
    named = _NAMED.get(ch)
    if named is not None:
        return named
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def clean(value: str, limit: int = LOG_VALUE_MAX) -> str:
    """Control characters escaped; longer than `limit` characters -> cut, with how much was cut."""
    if len(value) > limit:
        value = f"{value[:limit]}…(+{len(value) - limit} chars)"
    if value.isprintable():   # no control character (every one _CONTROL matches is unprintable)
        return value
    return _CONTROL.sub(_escape, value)
