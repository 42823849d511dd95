"""Who is calling: identities and the credential resolvers that produce them (runtime.md §4).

The chain is built once at start-up from the environment (`build_authenticator`) and tried in order:

1. JWT bearer (`MACP_AUTH_ISSUER` plus a JWKS from `MACP_AUTH_JWKS_JSON` or `MACP_AUTH_JWKS_URL`):
   claims tokens with a `.` in `authorization: Bearer`.
2. Static bearer tokens (`MACP_AUTH_TOKENS_JSON` or `MACP_AUTH_TOKENS_FILE`): claims dot-free tokens
   from `authorization: Bearer` or `x-macp-token`.
3. Dev mode, only when neither of the above is configured: the token is the sender.

Each resolver answers an identity (stop), NOT_MINE (ask the next one) or REJECT (stop: a credential
the resolver owns but finds invalid is never passed on). Nobody claiming it is also a rejection.
Verified identities are cached per token, so the hot path is one dict lookup.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import os
import threading
import time
import urllib.request
import warnings

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

try:  # PyJWT warns about short HMAC secrets on every verification; the issuer chose the key, not us
    from jwt.warnings import InsecureKeyLengthWarning
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
except ImportError:  # pragma: no cover - older PyJWT
    pass

log = logging.getLogger("macp_runtime.auth")


@dataclasses.dataclass(frozen=True)
class Identity:
    sender: str
    allowed_modes: frozenset[str] | None = None    # None = every mode
    can_start_sessions: bool = True
    max_open_sessions: int | None = None
    can_manage_mode_registry: bool = False
    is_observer: bool = False


BEARER = "Bearer "
NOT_MINE = object()
REJECT = object()

DEFAULT_AUDIENCE = "macp-runtime"
DEFAULT_JWKS_TTL_S = 300
JWT_LEEWAY_S = 60
JWT_ALGORITHMS = ("RS256", "ES256", "HS256")
JWKS_FETCH_TIMEOUT_S = 5.0
_CACHE_LIMIT = 100_000


class AuthConfigError(Exception):
    """The auth configuration cannot be used; start-up stops with this message."""


def extract_token(metadata) -> str | None:
    """The bearer credential: `authorization: Bearer <t>` (case-sensitive prefix), else `x-macp-token`."""
    bearer, fallback = _credentials(metadata)
    return bearer if bearer is not None else fallback


def _credentials(metadata) -> tuple[str | None, str | None]:
    """(token from `authorization: Bearer`, value of `x-macp-token`), each None when absent/unusable."""
    bearer = fallback = None
    for key, value in metadata:
        if key == "authorization":
            if bearer is None and isinstance(value, str) and value.startswith(BEARER):
                bearer = value[len(BEARER):]
        elif key == "x-macp-token":
            if fallback is None and isinstance(value, str):
                fallback = value
    return bearer, fallback


# --- JWT bearer ------------------------------------------------------------------------------------

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

    `kid`, `alg`, `use` and `crv` are ignored; EC keys are taken as P-256. Unusable keys are skipped;
    no usable key at all is an error.
    """
    data = json.loads(text) if isinstance(text, (str, bytes, bytearray)) else text
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS must be an object with a 'keys' array")
    keys: dict[str, list] = {alg: [] for alg in JWT_ALGORITHMS}
    skipped = 0
    for entry in data["keys"]:
        try:
            kty = entry.get("kty") if isinstance(entry, dict) else None
            if kty == "RSA":
                keys["RS256"].append(rsa.RSAPublicNumbers(_b64url_int(entry.get("e")),
                                                          _b64url_int(entry.get("n"))).public_key())
            elif kty == "EC":
                keys["ES256"].append(ec.EllipticCurvePublicNumbers(
                    _b64url_int(entry.get("x")), _b64url_int(entry.get("y")), ec.SECP256R1()).public_key())
            elif kty == "oct":
                secret = _oct_secret(entry.get("k"))
                if not secret:
                    raise ValueError("empty secret")
                keys["HS256"].append(secret)
            else:
                raise ValueError(f"unsupported kty {kty!r}")
        except (ValueError, TypeError, binascii.Error):
            skipped += 1
    if not any(keys.values()):
        raise ValueError(f"the JWKS has no usable key ({skipped} skipped)")
    if skipped:
        log.warning("auth: %d JWKS key(s) could not be used and were skipped", skipped)
    return keys


class _StaticKeys:
    """An inline JWKS, parsed once at start-up."""

    def __init__(self, keys: dict[str, list]):
        self._keys = keys

    def current(self):
        return self._keys, 0


class _UrlKeys:
    """A JWKS fetched on first use and cached for `ttl` seconds; a failed (re)fetch rejects the request."""

    def __init__(self, url: str, ttl: float, fetch=None):
        self.url = url
        self.ttl = ttl
        self._fetch = fetch or self._http_get
        self._state = None              # (keys, generation, fetched_at), replaced as a whole
        self._generation = 0
        self._lock = threading.Lock()

    def _http_get(self) -> bytes:
        with urllib.request.urlopen(self.url, timeout=JWKS_FETCH_TIMEOUT_S) as resp:
            return resp.read()

    def current(self):
        """(keys, generation), or None when the keys cannot be had right now."""
        state = self._state
        if state is not None and time.monotonic() - state[2] < self.ttl:
            return state[0], state[1]
        with self._lock:
            state = self._state
            now = time.monotonic()
            if state is None or now - state[2] >= self.ttl:
                self._state = None
                try:
                    keys = parse_jwks(self._fetch())
                except Exception as exc:
                    log.warning("auth: cannot fetch the JWKS from %s: %s", self.url, exc)
                    return None
                self._generation += 1
                state = self._state = (keys, self._generation, now)
            return state[0], state[1]


def _scopes(claims: dict) -> dict:
    """The identity fields granted by the optional `macp_scopes` object claim. Raises ValueError."""
    scopes = claims.get("macp_scopes")
    if scopes is None:
        return {}
    if not isinstance(scopes, dict):
        raise ValueError("macp_scopes must be an object")
    out: dict = {}
    modes = scopes.get("allowed_modes")
    if modes is not None:   # present, even [] -> exactly that set
        if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
            raise ValueError("macp_scopes.allowed_modes must be a list of strings")
        out["allowed_modes"] = frozenset(modes)
    for name in ("can_start_sessions", "can_manage_mode_registry", "is_observer"):
        value = scopes.get(name)
        if value is not None:
            if not isinstance(value, bool):
                raise ValueError(f"macp_scopes.{name} must be a boolean")
            out[name] = value
    cap = scopes.get("max_open_sessions")
    if cap is not None:
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            raise ValueError("macp_scopes.max_open_sessions must be a non-negative integer")
        out["max_open_sessions"] = cap
    return out


class JwtResolver:
    """Bearer JWTs signed with RS256, ES256 or HS256 by a key of the configured JWKS."""

    def __init__(self, issuer: str, audience: str, keys):
        self.issuer = issuer
        self.audience = audience
        self._keys = keys
        self._cache: dict[str, tuple[Identity, float, int]] = {}
        self._decode = jwt.PyJWT(options={"require": ["exp", "iss", "aud"], "verify_iat": False,
                                          "verify_nbf": False, "verify_sub": False, "verify_jti": False}).decode

    @property
    def description(self) -> str:
        source = f"JWKS from {self._keys.url} (cached {self._keys.ttl:g}s)" if isinstance(self._keys, _UrlKeys) \
            else "inline JWKS"
        return f"JWT bearer (issuer {self.issuer!r}, audience {self.audience!r}, {source})"

    def resolve(self, token: str | None):
        if token is None or "." not in token:
            return NOT_MINE
        current = self._keys.current()
        if current is None:
            return REJECT
        keys, generation = current
        hit = self._cache.get(token)
        if hit is not None and hit[2] == generation and time.time() <= hit[1]:
            return hit[0]
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError:
            return REJECT
        if alg not in JWT_ALGORITHMS:
            return REJECT
        claims = None
        for key in keys[alg]:
            try:
                claims = self._decode(token, key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                      leeway=JWT_LEEWAY_S)
                break
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue            # not this key: try the next one
            except jwt.PyJWTError:
                return REJECT       # signature fine (or token malformed), claims not
        if claims is None:
            return REJECT
        sub = claims.get("sub")
        if not isinstance(sub, str):
            return REJECT
        try:
            identity = Identity(sender=sub, **_scopes(claims))
        except ValueError:
            return REJECT
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (identity, float(claims["exp"]) + JWT_LEEWAY_S, generation)
        return identity


# --- static bearer tokens --------------------------------------------------------------------------

def parse_tokens(text: str, where: str) -> dict[str, Identity]:
    """Static token JSON (a list of entries or {"tokens": [entries]}) -> token -> Identity.

    Raises AuthConfigError naming `where` and the first problem. Duplicate tokens: the last one wins.
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AuthConfigError(f"{where} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "tokens" in data:
        data = data["tokens"]
    if not isinstance(data, list):
        raise AuthConfigError(f'{where} must be a list of token entries or {{"tokens": [...]}}')
    table: dict[str, Identity] = {}
    for i, entry in enumerate(data):
        at = f"{where}: entry {i}"
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{at} must be an object")
        for name in ("token", "sender"):
            if not isinstance(entry.get(name), str):
                raise AuthConfigError(f"{at}: '{name}' is required and must be a string")
        modes = entry.get("allowed_modes")
        if modes is None:
            modes = []
        if not isinstance(modes, list) or not all(isinstance(m, str) for m in modes):
            raise AuthConfigError(f"{at}: 'allowed_modes' must be a list of strings")
        flags = {}
        for name, default in (("can_start_sessions", True), ("can_manage_mode_registry", False),
                              ("is_observer", False)):
            value = entry.get(name, default)
            if value is None:
                value = default
            if not isinstance(value, bool):
                raise AuthConfigError(f"{at}: '{name}' must be true or false")
            flags[name] = value
        cap = entry.get("max_open_sessions")
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
            raise AuthConfigError(f"{at}: 'max_open_sessions' must be a non-negative integer or null")
        table[entry["token"]] = Identity(sender=entry["sender"], allowed_modes=frozenset(modes) if modes else None,
                                         max_open_sessions=cap, **flags)
    return table


class StaticTokenResolver:
    def __init__(self, tokens: dict[str, Identity], source: str):
        self._tokens = tokens
        self.description = f"static bearer tokens ({len(tokens)} from {source})"

    def resolve(self, token: str | None):
        if token is None or "." in token:
            return NOT_MINE
        return self._tokens.get(token, REJECT)


# --- dev mode and the chain ------------------------------------------------------------------------

class DevAuthenticator:
    """Development mode: the bearer token *is* the sender. Used only when no other resolver is configured."""

    description = "dev mode (bearer token = sender; do not expose beyond localhost)"
    resolvers: tuple = ()

    def __init__(self):
        self._cache: dict[str, Identity] = {}

    def authenticate(self, metadata) -> Identity | None:
        token = extract_token(metadata)
        if not token:
            return None
        identity = self._cache.get(token)
        if identity is None:
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            identity = Identity(sender=token, can_manage_mode_registry=True)
            self._cache[token] = identity
        return identity


class ChainAuthenticator:
    """JWT and/or static resolvers in order; None (UNAUTHENTICATED) when rejected or unclaimed."""

    def __init__(self, jwt_resolver: JwtResolver | None, static: StaticTokenResolver | None):
        self.jwt = jwt_resolver
        self.static = static
        self.resolvers = tuple(r for r in (jwt_resolver, static) if r is not None)
        self.description = "; then ".join(r.description for r in self.resolvers)

    def authenticate(self, metadata) -> Identity | None:
        bearer, fallback = _credentials(metadata)
        if self.jwt is not None:
            result = self.jwt.resolve(bearer)   # JWTs are read from `authorization` only
            if result is not NOT_MINE:
                return None if result is REJECT else result
        if self.static is not None:
            result = self.static.resolve(bearer if bearer is not None else fallback)
            if result is not NOT_MINE:
                return None if result is REJECT else result
        return None


def _ttl(raw: str | None) -> float:
    try:
        value = int(raw) if raw is not None else DEFAULT_JWKS_TTL_S
        return float(value) if value >= 0 else float(DEFAULT_JWKS_TTL_S)
    except ValueError:
        return float(DEFAULT_JWKS_TTL_S)


def build_authenticator(environ=None):
    """The resolver chain from MACP_AUTH_* variables (runtime.md §4.3, §4.4). Raises AuthConfigError."""
    environ = os.environ if environ is None else environ
    static = None
    if "MACP_AUTH_TOKENS_JSON" in environ:
        tokens = parse_tokens(environ["MACP_AUTH_TOKENS_JSON"], "MACP_AUTH_TOKENS_JSON")
        source = "MACP_AUTH_TOKENS_JSON"
    elif "MACP_AUTH_TOKENS_FILE" in environ:
        path = environ["MACP_AUTH_TOKENS_FILE"]
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"MACP_AUTH_TOKENS_FILE {path!r} cannot be read: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        tokens = parse_tokens(text, f"MACP_AUTH_TOKENS_FILE {path!r}")
        source = f"file {path}"
    else:
        tokens, source = {}, ""
    if tokens:
        static = StaticTokenResolver(tokens, source)

    jwt_resolver = None
    issuer = environ.get("MACP_AUTH_ISSUER")
    if issuer:
        audience = environ.get("MACP_AUTH_AUDIENCE") or DEFAULT_AUDIENCE
        keys = None
        if "MACP_AUTH_JWKS_JSON" in environ:
            try:
                keys = _StaticKeys(parse_jwks(environ["MACP_AUTH_JWKS_JSON"]))
            except ValueError as exc:
                log.error("auth: MACP_AUTH_JWKS_JSON cannot be used (%s); JWT authentication is disabled", exc)
        elif environ.get("MACP_AUTH_JWKS_URL"):
            keys = _UrlKeys(environ["MACP_AUTH_JWKS_URL"], _ttl(environ.get("MACP_AUTH_JWKS_TTL_SECS")))
        else:
            log.warning("auth: MACP_AUTH_ISSUER is set but neither MACP_AUTH_JWKS_JSON nor MACP_AUTH_JWKS_URL; "
                        "JWT authentication is disabled")
        if keys is not None:
            jwt_resolver = JwtResolver(issuer, audience, keys)

    if jwt_resolver is None and static is None:
        return DevAuthenticator()
    return ChainAuthenticator(jwt_resolver, static)
