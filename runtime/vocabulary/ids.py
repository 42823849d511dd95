"""Session id policy. v0.4.0 (RT §5.1): a 36-byte id with a hyphen must be a lowercase hyphenated
UUID v4/v7, anything else base64url of at least 22 chars. Current line (current.md §4.2): only
UUID-*shaped* ids must be lowercase v4/v7, anything else base64url of 22..128 chars."""
from __future__ import annotations

import re

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[47][0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]{22,}\Z")
_UUID_SHAPED = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}\Z")
_B64URL_CAPPED = re.compile(r"[A-Za-z0-9_-]{22,128}\Z")   # MAX_SESSION_ID_BYTES = 128 (RFC-MACP-0004 §11.2)


def valid_session_id(session_id: str) -> bool:
    if len(session_id.encode()) == 36 and "-" in session_id:
        # A 36-byte id with a hyphen is judged as a UUID only; it never falls through.
        return _UUID.match(session_id) is not None
    return _B64URL.match(session_id) is not None


def valid_session_id_current(session_id: str) -> bool:
    if _UUID_SHAPED.match(session_id):
        # UUID-shaped: judged as a UUID only (never falls through); variant bits are not checked.
        return _UUID.match(session_id) is not None
    return _B64URL_CAPPED.match(session_id) is not None
