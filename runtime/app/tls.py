"""Server TLS identity: read and check the PEM certificate chain and key before gRPC sees them.

gRPC only reports a bad certificate as "cannot bind"; checking here lets start-up say what is wrong.
No client certificates are requested (runtime.md §11).
"""
from __future__ import annotations

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization


class TlsError(Exception):
    pass


def _read(label: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TlsError(f"{label} {path!r} cannot be read: {exc.strerror}") from None


def load_identity(cert_path: str, key_path: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM), checked: the chain parses and its first certificate matches the key."""
    cert_pem = _read("MACP_TLS_CERT_PATH", cert_path)
    key_pem = _read("MACP_TLS_KEY_PATH", key_path)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TlsError(f"MACP_TLS_CERT_PATH {cert_path!r} holds no usable PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TlsError(f"MACP_TLS_KEY_PATH {key_path!r} holds no usable unencrypted PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsError(f"the private key in {key_path!r} does not belong to the certificate in {cert_path!r}")
    return key_pem, cert_pem


def server_credentials(cert_path: str, key_path: str) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([load_identity(cert_path, key_path)], require_client_auth=False)
