"""Who is calling: identities and the credential resolvers that produce them (runtime.md §4).

The chain is built once at start-up from the auth settings the application read (`AuthSettings`,
`build_authenticator`; this module reads no environment) and tried in order:

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

import dataclasses
import json
import logging
import time
import urllib.parse
import urllib.request
import warnings

import jwt

try:  # PyJWT warns about short HMAC secrets on every verification; the issuer chose the key, not us
    from jwt.warnings import InsecureKeyLengthWarning
    warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)
except ImportError:  # pragma: no cover - older PyJWT
    pass

from ..vocabulary.identity import Identity
from ..vocabulary.redact import mask_url as mask_secret_url
from .jwks import DEFAULT_JWKS_TTL_S, JWT_ALGORITHMS, Pending, StaticKeys, UrlKeys, parse_jwks

log = logging.getLogger("macp_runtime.auth")


BEARER = "Bearer "
NOT_MINE = object()
REJECT = object()

DEFAULT_AUDIENCE = "macp-runtime"
JWT_LEEWAY_S = 60
MAX_JWT_BYTES = 16384
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

def jwt_shape_ok(token: str) -> str | None:
    """The `alg` of a token shaped like a JWS we could verify (three base64url parts, a JSON header
    naming an accepted algorithm), else None. Costs no key lookup and no network."""
    if len(token) > MAX_JWT_BYTES or token.count(".") != 2:
        return None
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return None
    alg = header.get("alg")
    return alg if alg in JWT_ALGORITHMS else None


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
                                          "verify_nbf": True, "verify_sub": False, "verify_jti": False}).decode

    @property
    def description(self) -> str:
        source = f"JWKS from {mask_secret_url(self._keys.url)} (cached {self._keys.ttl:g}s)" if isinstance(self._keys, UrlKeys) \
            else "inline JWKS"
        return f"JWT bearer (issuer {self.issuer!r}, audience {self.audience!r}, {source})"

    def resolve(self, token: str | None):
        if token is None or "." not in token:
            return NOT_MINE
        alg = jwt_shape_ok(token)      # before any key lookup: junk never causes a JWKS fetch
        if alg is None:
            return REJECT
        current = self._keys.current()
        if current is None:
            return REJECT
        if isinstance(current, Pending):
            return current
        keys, generation = current
        hit = self._cache.get(token)
        if hit is not None and hit[2] == generation and time.time() <= hit[1]:
            return hit[0]
        candidates = _select_keys(keys[alg], jwt.get_unverified_header(token).get("kid"))
        claims = None
        for key in candidates:
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
        if not isinstance(sub, str) or not sub.strip():
            return REJECT
        try:
            identity = Identity(sender=sub, **_scopes(claims))
        except ValueError:
            return REJECT
        if len(self._cache) > _CACHE_LIMIT:
            self._cache.clear()
        self._cache[token] = (identity, float(claims["exp"]) + JWT_LEEWAY_S, generation)
        return identity


def _select_keys(entries: list, kid) -> list:
    """The keys a token may be verified with: those whose `kid` equals the token's `kid` header when
    it has one; every key when it has none, or when no key of the JWKS declares a kid at all."""
    if not isinstance(kid, str):
        return [key for _, key in entries]
    matching = [key for k, key in entries if k == kid]
    if matching or any(k is not None for k, _ in entries):
        return matching
    return [key for _, key in entries]


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

    def authenticate_nowait(self, metadata) -> Identity | None:
        return self.authenticate(metadata)

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
        """The identity, or None; waits (blocking) when this call started a JWKS fetch."""
        result = self.authenticate_nowait(metadata)
        if isinstance(result, Pending):
            result.wait()
            result = self.authenticate_nowait(metadata)
            if isinstance(result, Pending):   # pragma: no cover - a second fetch right away
                return None
        return result

    def authenticate_nowait(self, metadata):
        """Like `authenticate`, but a Pending (to wait on off the event loop, then ask again) instead of
        blocking when this call started a JWKS fetch."""
        bearer, fallback = _credentials(metadata)
        if self.jwt is not None:
            result = self.jwt.resolve(bearer)   # JWTs are read from `authorization` only
            if isinstance(result, Pending):
                return result
            if result is not NOT_MINE:
                return None if result is REJECT else result
        if self.static is not None:
            result = self.static.resolve(bearer if bearer is not None else fallback)
            if result is not NOT_MINE:
                return None if result is REJECT else result
        return None


@dataclasses.dataclass(frozen=True)
class AuthSettings:
    """The auth settings as configured (the application reads them: runtime/app/config.py, section auth).

    Each is the text of its variable, None when unset (set but empty is not unset); `unknown` names
    other MACP_AUTH_* variables that were set. Messages name the variables, the only way to set them.
    """

    issuer: str | None = None          # MACP_AUTH_ISSUER
    audience: str | None = None        # MACP_AUTH_AUDIENCE
    jwks_json: str | None = None       # MACP_AUTH_JWKS_JSON
    jwks_url: str | None = None        # MACP_AUTH_JWKS_URL
    jwks_ttl_secs: str | None = None   # MACP_AUTH_JWKS_TTL_SECS
    tokens_json: str | None = None     # MACP_AUTH_TOKENS_JSON
    tokens_file: str | None = None     # MACP_AUTH_TOKENS_FILE
    unknown: tuple[str, ...] = ()

    def configured(self) -> list[str]:
        """The variables set, sorted."""
        named = [f"MACP_AUTH_{f.name.upper()}" for f in dataclasses.fields(self)
                 if f.name != "unknown" and getattr(self, f.name) is not None]
        return sorted([*named, *self.unknown])



def _ttl(raw: str | None) -> float:
    if raw is None:
        return float(DEFAULT_JWKS_TTL_S)
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        raise AuthConfigError(f"MACP_AUTH_JWKS_TTL_SECS must be 0 or a positive number of seconds, got {raw!r}") \
            from None
    return float(value)


def build_authenticator(settings: AuthSettings):
    """The resolver chain from the MACP_AUTH_* settings (runtime.md §4.3, §4.4). Raises AuthConfigError.

    Fails closed: when any MACP_AUTH_* variable is set, the resolver it belongs to must be buildable
    (otherwise the error names the variable); dev mode is only for a configuration without any.
    """
    static = None
    if settings.tokens_json is not None:
        tokens = parse_tokens(settings.tokens_json, "MACP_AUTH_TOKENS_JSON")
        source = "MACP_AUTH_TOKENS_JSON"
    elif settings.tokens_file is not None:
        path = settings.tokens_file
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise AuthConfigError(f"MACP_AUTH_TOKENS_FILE {path!r} cannot be read: "
                                  f"{getattr(exc, 'strerror', None) or exc}") from None
        tokens = parse_tokens(text, f"MACP_AUTH_TOKENS_FILE {path!r}")
        source = f"file {path}"
    else:
        tokens, source = None, ""
    if tokens is not None:
        if not tokens:
            where = "MACP_AUTH_TOKENS_JSON" if source == "MACP_AUTH_TOKENS_JSON" else "MACP_AUTH_TOKENS_FILE"
            raise AuthConfigError(f"{where} holds no token entries (an empty list would leave nobody able to "
                                  f"authenticate; unset it for dev mode)")
        static = StaticTokenResolver(tokens, source)

    jwt_resolver = None
    issuer = settings.issuer
    jwt_vars = [name for name, value in (("MACP_AUTH_JWKS_JSON", settings.jwks_json),
                                         ("MACP_AUTH_JWKS_URL", settings.jwks_url),
                                         ("MACP_AUTH_AUDIENCE", settings.audience),
                                         ("MACP_AUTH_JWKS_TTL_SECS", settings.jwks_ttl_secs)) if value is not None]
    if issuer is None and jwt_vars:
        raise AuthConfigError(f"{jwt_vars[0]} is set but MACP_AUTH_ISSUER is not (JWT authentication needs both)")
    if issuer is not None:
        if not issuer.strip():
            raise AuthConfigError("MACP_AUTH_ISSUER is empty")
        audience = settings.audience or DEFAULT_AUDIENCE
        if settings.jwks_json is not None:
            try:
                keys = StaticKeys(parse_jwks(settings.jwks_json))
            except (ValueError, TypeError, RecursionError) as exc:
                raise AuthConfigError(f"MACP_AUTH_JWKS_JSON cannot be used: {str(exc)[:200]}") from None
        elif settings.jwks_url is not None:
            url = settings.jwks_url
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise AuthConfigError(f"MACP_AUTH_JWKS_URL must be an http(s) URL, got {mask_secret_url(url)!r}")
            keys = UrlKeys(url, _ttl(settings.jwks_ttl_secs))
        else:
            raise AuthConfigError("MACP_AUTH_ISSUER is set but neither MACP_AUTH_JWKS_JSON nor MACP_AUTH_JWKS_URL")
        jwt_resolver = JwtResolver(issuer, audience, keys)

    if jwt_resolver is None and static is None:
        configured = settings.configured()
        if configured:
            raise AuthConfigError(f"{configured[0]} is set but configures no resolver "
                                  f"(unset every MACP_AUTH_* variable for dev mode)")
        return DevAuthenticator()
    return ChainAuthenticator(jwt_resolver, static)
