"""The runtime's receipt signing keys (current.md §14.5): one active Ed25519 key that signs, and every
public key it has ever signed with, published by GetReceiptKeys so older receipts keep verifying.

Where the keys come from:

* **Configured**: `MACP_RECEIPT_SIGNING_KEY` (a 32-byte Ed25519 seed as base64url or base64) or
  `MACP_RECEIPT_SIGNING_KEY_FILE` (a file holding that text, or a PKCS#8 PEM Ed25519 private key); the
  inline variable wins. The configured private key is never written anywhere by the runtime.
* **Generated**: otherwise the first start generates a key and keeps it in the *key set*:
  `<data dir>/receipt-keys.json` (mode 0600, replaced atomically) for the file backend, the shared
  document `receipt-keys` in the database for PostgreSQL (so every instance signs with the same key;
  the first instance to start creates it under the document's lock), or memory only with
  `MACP_MEMORY_ONLY=1` (a new key per process: receipts of a memory-only runtime do not outlive it).

The key set also remembers the public key of every configured key it has seen, so replacing the
configured key keeps the old public key published. `rotate()` (the `macp-runtime receipts rotate-key`
command) generates a new active key and keeps the old one's public part. A running file-backend
daemon notices a rotated key file at its next receipt call (one stat); PostgreSQL instances reload on
the document's change notification.

The `kid` of a key is its RFC 7638 JWK thumbprint unless `MACP_RECEIPT_KEY_ID` names the configured one.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import threading
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from ..storage.base import StorageError, write_private_atomic

log = logging.getLogger("macp_runtime.receipt_keys")

DOCUMENT = "receipt-keys"
FILE_NAME = "receipt-keys.json"
FORMAT = 1


class KeyConfigError(ValueError):
    """A configured key cannot be used (start-up refuses)."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 public JWK (members crv, kty, x in that order, no whitespace)."""
    canonical = '{"crv":"Ed25519","kty":"OKP","x":' + json.dumps(x) + "}"
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


class SigningKey:
    """An Ed25519 private key with its kid; `sign` is deterministic (RFC 8032)."""

    __slots__ = ("kid", "seed", "x", "_private")

    def __init__(self, seed: bytes, kid: str | None = None):
        if len(seed) != 32:
            raise KeyConfigError("an Ed25519 seed is exactly 32 bytes")
        self._private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        self.seed = seed
        self.x = b64url(self._private.public_key().public_bytes(serialization.Encoding.Raw,
                                                                 serialization.PublicFormat.Raw))
        self.kid = kid or thumbprint(self.x)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(os.urandom(32))

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def parse_seed_text(text: str) -> bytes:
    """A 32-byte seed from base64url (padding optional) or standard base64 text."""
    text = text.strip()
    for decode in (_b64url_decode, lambda t: base64.b64decode(t, validate=True)):
        try:
            seed = decode(text)
        except (binascii.Error, ValueError):
            continue
        if len(seed) == 32:
            return seed
    raise KeyConfigError("the receipt signing key must be a 32-byte Ed25519 seed in base64url or base64")


def parse_key_file(data: bytes) -> bytes:
    """A seed from a key file: a PKCS#8 PEM Ed25519 private key, or seed text."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyConfigError(f"the receipt signing key file is not a usable PEM private key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise KeyConfigError("the receipt signing key file holds a PEM key that is not Ed25519")
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    try:
        return parse_seed_text(data.decode("ascii"))
    except UnicodeDecodeError:
        raise KeyConfigError("the receipt signing key file is neither PEM nor base64 text") from None


def configured_key(inline: str | None, path: str | None, kid: str | None) -> SigningKey | None:
    """The configured key (inline seed text wins over the file), or None. Raises KeyConfigError."""
    kid = kid or None
    if inline:
        return SigningKey(parse_seed_text(inline), kid)
    if path:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise KeyConfigError(f"cannot read MACP_RECEIPT_SIGNING_KEY_FILE {path!r}: {exc.strerror}") from None
        return SigningKey(parse_key_file(data), kid)
    if kid:
        raise KeyConfigError("MACP_RECEIPT_KEY_ID names the kid of a configured key; "
                             "set MACP_RECEIPT_SIGNING_KEY or MACP_RECEIPT_SIGNING_KEY_FILE too")
    return None


# --- key set storage -------------------------------------------------------------------------------
#
# The document: {"format": 1, "active": kid | null, "keys": [{"kid", "x", "added_at_ms", "seed"?}]},
# where only the active generated key has its "seed" (base64url); retired and configured keys are
# public only.


class FileKeySet:
    """`<data dir>/receipt-keys.json`, mode 0600, written to a temporary file, fsynced and renamed."""

    def __init__(self, data_dir: str):
        self.path = os.path.join(data_dir, FILE_NAME)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def locked(self):
        with self._lock:
            yield

    def stamp(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def load(self):
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode & 0o777
            if mode & 0o077:
                log.warning("%s was readable by others (mode %o); tightened to 0600", self.path, mode)
                os.fchmod(fd, 0o600)
            with os.fdopen(fd, "rb") as fh:
                fd = -1
                return json.loads(fh.read())
        except (OSError, ValueError) as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from None
        finally:
            if fd >= 0:
                os.close(fd)

    def save(self, doc) -> None:
        data = json.dumps(doc, sort_keys=True, indent=1).encode("utf-8")
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            write_private_atomic(self.path, data)
        except OSError as exc:
            raise StorageError(f"cannot write {self.path}: {exc.strerror}") from None


class DocumentKeySet:
    """The key set as a registry document (PostgreSQL's shared `macp_documents`, or memory)."""

    def __init__(self, documents):
        self.documents = documents

    def locked(self):
        return self.documents.locked(DOCUMENT)   # a DocumentStore (storage/base.py)

    def stamp(self):
        return None   # changes arrive as notifications (runtime/storage/postgres/bus.py), not by polling

    def load(self):
        return self.documents.load(DOCUMENT)

    def save(self, doc) -> None:
        self.documents.save(DOCUMENT, doc)


def _empty() -> dict:
    return {"format": FORMAT, "active": None, "keys": []}


def _checked(doc) -> dict:
    if doc is None:
        return _empty()
    try:
        if doc["format"] != FORMAT or not isinstance(doc["keys"], list):
            raise ValueError("unknown format")
        for entry in doc["keys"]:
            if not (isinstance(entry["kid"], str) and entry["kid"] and isinstance(entry["x"], str) and entry["x"]):
                raise ValueError("a key without kid or x")
    except (KeyError, TypeError, ValueError) as exc:
        raise StorageError(f"the receipt key set is damaged: {exc}") from None
    return doc


def _entry(key: SigningKey, *, with_seed: bool) -> dict:
    entry = {"kid": key.kid, "x": key.x, "added_at_ms": time.time_ns() // 1_000_000}
    if with_seed:
        entry["seed"] = b64url(key.seed)
    return entry


def _active_from(doc: dict) -> SigningKey | None:
    for entry in doc["keys"]:
        if entry["kid"] == doc.get("active") and entry.get("seed"):
            try:
                return SigningKey(_b64url_decode(entry["seed"]), entry["kid"])
            except (binascii.Error, ValueError) as exc:
                raise StorageError(f"the receipt key set's active key is damaged: {exc}") from None
    return None


def rotate(keyset) -> tuple[str, str | None]:
    """A new generated active key; the previous one stays published (public part only).
    Returns (new kid, previous active kid)."""
    with keyset.locked():
        doc = _checked(keyset.load())
        previous = doc.get("active")
        for entry in doc["keys"]:
            entry.pop("seed", None)
        key = SigningKey.generate()
        doc["keys"].append(_entry(key, with_seed=True))
        doc["active"] = key.kid
        keyset.save(doc)
    return key.kid, previous


class ReceiptKeys:
    """What the receipt RPCs use: the active key (None: receipts are unsigned) and the published set."""

    def __init__(self, active: SigningKey | None, published: list[tuple[str, str]], *, keyset=None,
                 configured: SigningKey | None = None):
        self._keyset = keyset
        self._configured = configured
        self._lock = threading.Lock()
        self._stamp = keyset.stamp() if keyset is not None else None
        self._set(active, published)

    def _set(self, active, published) -> None:
        seen: dict[str, str] = {}
        for kid, x in published:
            if kid not in seen:       # a kid is unique in a JWK Set (the verifier drops duplicates)
                seen[kid] = x
        self.active = active
        self.jwks_json = json.dumps(
            {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"}
                      for kid, x in seen.items()]}, separators=(",", ":"))

    @property
    def signed(self) -> bool:
        return self.active is not None

    def current(self) -> "ReceiptKeys":
        """Picks up a key set file rotated while running (one stat per call)."""
        keyset = self._keyset
        if keyset is not None:
            stamp = keyset.stamp()
            if stamp is not None and stamp != self._stamp:
                self.reload()
        return self

    def reload(self) -> None:
        """Read the key set again (rotation by another process or instance)."""
        if self._keyset is None:
            return
        with self._lock:
            try:
                stamp = self._keyset.stamp()
                doc = _checked(self._keyset.load())
            except StorageError as exc:
                log.warning("receipt keys not reloaded: %s", exc)
                return
            active = self._configured or _active_from(doc) or self.active
            published = [(e["kid"], e["x"]) for e in doc["keys"]]
            if active is not None:
                published.append((active.kid, active.x))
            self._set(active, published)
            self._stamp = stamp
        log.info("receipt keys reloaded: active kid %s, %d published", active.kid if active else "-", len(published))


def open_receipt_keys(*, memory_only: bool, data_dir: str, shared_documents=None, inline: str | None = None,
                      key_file: str | None = None, kid: str | None = None) -> ReceiptKeys:
    """The runtime's receipt keys at start-up. Raises KeyConfigError or StorageError."""
    configured = configured_key(inline, key_file, kid)
    if shared_documents is not None:
        keyset = DocumentKeySet(shared_documents)
    elif memory_only:
        keyset = None
    else:
        keyset = FileKeySet(data_dir)
    if keyset is None:
        key = configured or SigningKey.generate()
        return ReceiptKeys(key, [(key.kid, key.x)])
    with keyset.locked():
        doc = _checked(keyset.load())
        known = {e["kid"]: e["x"] for e in doc["keys"]}
        changed = False
        if configured is not None:
            if known.get(configured.kid) != configured.x:
                if configured.kid in known:   # a kid now naming another key: keep the newer one only
                    doc["keys"] = [e for e in doc["keys"] if e["kid"] != configured.kid]
                doc["keys"].append(_entry(configured, with_seed=False))
                changed = True
            active = configured
        else:
            active = _active_from(doc)
            if active is None:
                active = SigningKey.generate()
                doc["keys"].append(_entry(active, with_seed=True))
                doc["active"] = active.kid
                changed = True
                log.info("receipt signing key generated (kid %s)", active.kid)
        if changed:
            keyset.save(doc)
    published = [(e["kid"], e["x"]) for e in doc["keys"]]
    return ReceiptKeys(active, published, keyset=keyset, configured=configured)
