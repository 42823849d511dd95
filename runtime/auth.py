"""Who is calling: identities and the credential resolvers that produce them."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Identity:
    sender: str
    allowed_modes: frozenset[str] | None = None    # None = every mode
    can_start_sessions: bool = True
    max_open_sessions: int | None = None
    can_manage_mode_registry: bool = False
    is_observer: bool = False


BEARER = "Bearer "


def extract_token(metadata) -> str | None:
    """The bearer credential: `authorization: Bearer <t>` (case-sensitive prefix), else `x-macp-token`."""
    fallback = None
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER):]
        if key == "x-macp-token" and isinstance(value, str) and fallback is None:
            fallback = value
    return fallback


class DevAuthenticator:
    """Development mode: the bearer token *is* the sender. Used only when no other resolver is configured."""

    description = "dev mode (bearer token = sender; do not expose beyond localhost)"

    def __init__(self):
        self._cache: dict[str, Identity] = {}

    def authenticate(self, metadata) -> Identity | None:
        token = extract_token(metadata)
        if not token:
            return None
        identity = self._cache.get(token)
        if identity is None:
            if len(self._cache) > 100_000:
                self._cache.clear()
            identity = Identity(sender=token, can_manage_mode_registry=True)
            self._cache[token] = identity
        return identity
