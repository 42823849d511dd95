"""Session id policy (§5.1): lowercase hyphenated UUID v4/v7, or base64url of at least 22 chars."""
from __future__ import annotations

import re

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[47][0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]{22,}\Z")


def valid_session_id(session_id: str) -> bool:
    if len(session_id.encode()) == 36 and "-" in session_id:
        # A 36-byte id with a hyphen is judged as a UUID only; it never falls through.
        return _UUID.match(session_id) is not None
    return _B64URL.match(session_id) is not None
