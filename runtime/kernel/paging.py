"""ListSessions keyset paging of the current protocol line (../shared/spec/current.md §10).

Sessions are ordered by session id (byte order); a page token is `base64url_nopad("v1:" + <last id
returned>)` and the next page holds the ids strictly after it. A session present for a whole
traversal is returned exactly once; one created meanwhile appears iff its id sorts after the cursor.
"""
from __future__ import annotations

import base64
import binascii

BAD_SIZE = "INVALID_ARGUMENT: page_size must not be negative"
BAD_TOKEN = "INVALID_ARGUMENT: page_token is not a valid continuation token"
MAX_TOKEN_CHARS = 1024
_B64URL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class PageError(ValueError):
    """A request the paging rules refuse (INVALID_ARGUMENT + INVALID_REQUEST); str() is the text."""


def token_for(session_id: str) -> str:
    return base64.urlsafe_b64encode(f"v1:{session_id}".encode()).decode().rstrip("=")


def cursor_of(token: str) -> str:
    """The cursor a non-empty page token carries; PageError (one text for every cause)."""
    if len(token) > MAX_TOKEN_CHARS or not set(token) <= _B64URL or len(token) % 4 == 1:
        raise PageError(BAD_TOKEN)
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise PageError(BAD_TOKEN) from None
    if not text.startswith("v1:") or len(text) == 3:
        raise PageError(BAD_TOKEN)
    return text[3:]


def page(sessions, page_size: int, page_token: str, default_size: int, max_size: int):
    """(the page of sessions, next_page_token) from `sessions` (any order); PageError when refused."""
    if page_size < 0:
        raise PageError(BAD_SIZE)
    cursor = cursor_of(page_token) if page_token else None
    size = default_size if page_size == 0 else min(page_size, max_size)
    key = lambda s: s.session_id.encode()   # noqa: E731  (byte order, not code-point order)
    candidates = sorted(sessions, key=key)
    if cursor is not None:
        after = cursor.encode()
        candidates = [s for s in candidates if s.session_id.encode() > after]
    chosen = candidates[:size]
    token = token_for(chosen[-1].session_id) if len(candidates) > size else ""
    return chosen, token
