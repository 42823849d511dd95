"""JSON Web Key Sets for JWT bearer auth: parsing a JWKS into usable keys, and the two key sources (an inline
JWKS parsed once; a JWKS URL fetched on first use, cached, refetched one at a time with back-off)."""
from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
import urllib.request

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..vocabulary.redact import mask_url as mask_secret_url

log = logging.getLogger("macp_runtime.auth")

JWT_ALGORITHMS = ("RS256", "ES256", "HS256")
DEFAULT_JWKS_TTL_S = 300
JWKS_FETCH_TIMEOUT_S = 3.0       # the whole JWKS download, not per socket operation
JWKS_MAX_BYTES = 1 << 20
JWKS_MAX_BACKOFF_S = 60.0


def _b64url_int(value) -> int:
    if not isinstance(value, str) or not value:
        raise ValueError("missing")
    raw = base64.urlsafe_b64decode(value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4))
    return int.from_bytes(raw, "big")


def _oct_secret(k) -> bytes:
    """`k` as standard padded base64 (canonical); if it is not, the raw UTF-8 bytes of the string."""
    if not isinstance(k, str):
        raise ValueError("k must be a string")
    try:
        decoded = base64.b64decode(k, validate=True)
        if base64.b64encode(decoded).decode("ascii") == k:
            return decoded
    except (binascii.Error, ValueError):
        pass
    return k.encode("utf-8")


def parse_jwks(text) -> dict[str, list]:
    """JWKS JSON -> usable keys grouped by the algorithm that can use them. Raises ValueError.

    Each key is kept as (kid or None, key) so a token's `kid` header can select it; `alg`, `use` and
    `crv` are ignored; EC keys are taken as P-256. Unusable keys are skipped; no usable key at all is
    an error.
    """
    data = json.loads(text) if isinstance(text, (str, bytes, bytearray)) else text
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS must be an object with a 'keys' array")
    keys: dict[str, list] = {alg: [] for alg in JWT_ALGORITHMS}
    skipped = 0
    for entry in data["keys"]:
        try:
            kty = entry.get("kty") if isinstance(entry, dict) else None
            kid = entry.get("kid") if isinstance(entry, dict) and isinstance(entry.get("kid"), str) else None
            if kty == "RSA":
                keys["RS256"].append((kid, rsa.RSAPublicNumbers(_b64url_int(entry.get("e")),
                                                                _b64url_int(entry.get("n"))).public_key()))
            elif kty == "EC":
                keys["ES256"].append((kid, ec.EllipticCurvePublicNumbers(
                    _b64url_int(entry.get("x")), _b64url_int(entry.get("y")), ec.SECP256R1()).public_key()))
            elif kty == "oct":
                secret = _oct_secret(entry.get("k"))
                if not secret:
                    raise ValueError("empty secret")
                keys["HS256"].append((kid, secret))
            else:
                raise ValueError(f"unsupported kty {kty!r}")
        except (ValueError, TypeError, binascii.Error):
            skipped += 1
    if not any(keys.values()):
        raise ValueError(f"the JWKS has no usable key ({skipped} skipped)")
    if skipped:
        log.warning("auth: %d JWKS key(s) could not be used and were skipped", skipped)
    return keys


class StaticKeys:
    """An inline JWKS, parsed once at start-up."""

    def __init__(self, keys: dict[str, list]):
        self._keys = keys

    def current(self):
        return self._keys, 0


class Pending:
    """The JWKS is being fetched for this caller (the one that started the fetch): `wait()` (off any
    event loop) until it is done or JWKS_FETCH_TIMEOUT_S has passed, then authenticate again."""

    __slots__ = ("_done",)

    def __init__(self, done: threading.Event):
        self._done = done

    def wait(self) -> None:
        self._done.wait(JWKS_FETCH_TIMEOUT_S + 0.5)


class UrlKeys:
    """A JWKS fetched on first use and cached for `ttl` seconds.

    Only one fetch runs at a time, in a thread of its own, and it is bounded (JWKS_FETCH_TIMEOUT_S for
    the whole download, JWKS_MAX_BYTES of body). The caller that starts it gets a `Pending` to wait
    on; callers that find a fetch under way, or a failed fetch still in its back-off, are answered at
    once (None: the JWT is rejected) instead of queueing behind it. A failure is cached: the next
    attempt waits 1 s, then 2, 4 … up to JWKS_MAX_BACKOFF_S. Expired keys are never used (a failed
    refetch rejects JWTs until the endpoint answers again).
    """

    def __init__(self, url: str, ttl: float, fetch=None):
        self.url = url
        self.ttl = ttl
        self._fetch = fetch or self._http_get
        self._state = None              # (keys, generation, fetched_at), replaced as a whole
        self._generation = 0
        self._lock = threading.Lock()   # held by the one fetch in flight, never waited for
        self._failures = 0
        self._retry_at = 0.0            # monotonic time before which no new fetch is tried

    def _http_get(self) -> bytes:
        deadline = time.monotonic() + JWKS_FETCH_TIMEOUT_S
        with urllib.request.urlopen(self.url, timeout=JWKS_FETCH_TIMEOUT_S) as resp:
            chunks: list[bytes] = []
            size = 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the JWKS took longer than {JWKS_FETCH_TIMEOUT_S:g}s")
                chunk = resp.read(16384)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > JWKS_MAX_BYTES:
                    raise ValueError(f"the JWKS is larger than {JWKS_MAX_BYTES} bytes")
                chunks.append(chunk)

    def current(self):
        """(keys, generation); a Pending for the caller that just started a fetch; None when the keys
        cannot be had right now (fetch failing recently, or under way for somebody else)."""
        state = self._state
        now = time.monotonic()
        if state is not None and now - state[2] < self.ttl:
            return state[0], state[1]
        if now < self._retry_at or not self._lock.acquire(blocking=False):
            return None                 # failing recently, or somebody else is fetching: fail fast
        state = self._state
        if state is not None and time.monotonic() - state[2] < self.ttl:
            self._lock.release()
            return state[0], state[1]
        self._state = None
        done = threading.Event()
        threading.Thread(target=self._refresh, args=(done,), name="jwks-fetch", daemon=True).start()
        return Pending(done)

    def _refresh(self, done: threading.Event) -> None:
        """The fetch thread (holds `_lock` from `current` until it is done)."""
        try:
            keys = parse_jwks(self._fetch())
        except Exception as exc:
            self._failures += 1
            backoff = min(JWKS_MAX_BACKOFF_S, 2.0 ** (self._failures - 1))
            self._retry_at = time.monotonic() + backoff
            log.warning("auth: cannot fetch the JWKS from %s: %s (next attempt in %gs)",
                        mask_secret_url(self.url), str(exc)[:200], backoff)
        else:
            self._failures = 0
            self._retry_at = 0.0
            self._generation += 1
            self._state = (keys, self._generation, time.monotonic())
        finally:
            self._lock.release()
            done.set()
