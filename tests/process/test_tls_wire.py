"""TLS and the plaintext decision at start-up.

Spec: runtime.md §11 (TLS decision: cert and key both set -> TLS with that identity, no client
certificates, even when insecure is also allowed; otherwise plaintext only with MACP_ALLOW_INSECURE=1;
otherwise abort; a configured cert/key path that does not exist aborts start-up with exit status 1).
A self-signed certificate for 127.0.0.1/localhost is generated for each test module.
"""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

from tests.support import ServerProcess, envelope, new_session_id, start_payload


def self_signed(common_name="localhost"):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    cert, key = self_signed()
    other_cert, other_key = self_signed("someone-else")
    (d / "other-key.pem").write_bytes(other_key)
    (d / "cert.pem").write_bytes(cert)
    (d / "key.pem").write_bytes(key)
    (d / "garbage.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    return {"dir": d, "cert": str(d / "cert.pem"), "key": str(d / "key.pem"), "cert_pem": cert,
            "other_cert_pem": other_cert, "garbage": str(d / "garbage.pem"), "other_key": str(d / "other-key.pem")}


class TlsServer(ServerProcess):
    """The shared ServerProcess, but readiness and the channel go over TLS."""

    root_pem: bytes = b""

    probe_timeout = 0.3   # a TLS handshake per try

    def probe_channel(self) -> grpc.Channel:
        return self.secure_channel()

    def secure_channel(self, root_pem: bytes | None = None) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=root_pem or self.root_pem)
        return grpc.secure_channel(self.target, creds)

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = self.secure_channel()
        return self._channel


def tls_server(tmp_path, pki, env=None, args=None) -> TlsServer:
    srv = TlsServer(str(tmp_path / "data"), env, args)
    srv.root_pem = pki["cert_pem"]
    return srv


def failed_start(tmp_path, env=None, args=None, name="data") -> tuple[int, str]:
    srv = ServerProcess(str(tmp_path / name), env, args)
    srv.start(wait=False)
    try:
        code = srv.proc.wait(20)
    finally:
        srv.kill()
    return code, srv.log()


def roundtrip(stub) -> None:
    init = stub.Initialize(core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), timeout=10)
    assert init.selected_protocol_version == "1.0"
    env = envelope("macp.mode.decision.v1", "SessionStart", new_session_id(), "coord", start_payload(["a", "b"]))
    auth = [("authorization", "Bearer coord")]
    ack = stub.Send(core_pb2.SendRequest(envelope=env), metadata=auth, timeout=10).ack
    assert ack.ok and ack.session_state == envelope_pb2.SESSION_STATE_OPEN, ack
    meta = stub.GetSession(core_pb2.GetSessionRequest(session_id=env.session_id), metadata=auth, timeout=10).metadata
    assert meta.initiator == "coord"


@pytest.mark.parametrize("insecure", ["0", "1"], ids=["tls-only", "tls-even-if-insecure-allowed"])
def test_tls_serves_and_plaintext_clients_are_refused(tmp_path, pki, insecure):
    srv = tls_server(tmp_path, pki, {"MACP_TLS_CERT_PATH": pki["cert"], "MACP_TLS_KEY_PATH": pki["key"],
                                     "MACP_ALLOW_INSECURE": insecure}).start()
    try:
        roundtrip(srv.stub())
        assert " (TLS)" in srv.log()
        # a plaintext client gets nothing
        with grpc.insecure_channel(srv.target) as ch:
            with pytest.raises(grpc.RpcError) as info:
                core_pb2_grpc.MACPRuntimeServiceStub(ch).Initialize(
                    core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # a client that does not trust this certificate gets nothing either
        with srv.secure_channel(pki["other_cert_pem"]) as ch:
            with pytest.raises(grpc.RpcError) as info:
                core_pb2_grpc.MACPRuntimeServiceStub(ch).Initialize(
                    core_pb2.InitializeRequest(supported_protocol_versions=["1.0"]), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.kill()


def test_tls_from_command_line_flags(tmp_path, pki):
    srv = tls_server(tmp_path, pki, {"MACP_ALLOW_INSECURE": "0"},
                     ["--tls-cert", pki["cert"], "--tls-key", pki["key"]]).start()
    try:
        roundtrip(srv.stub())
        assert srv.stop() == 0
    finally:
        srv.kill()


def test_plaintext_refused_without_allow_insecure(tmp_path):
    code, log_text = failed_start(tmp_path, {"MACP_ALLOW_INSECURE": "0"})
    assert code == 1, log_text
    assert "TLS is required unless MACP_ALLOW_INSECURE=1 is set" in log_text
    assert "serving" not in log_text


def test_allow_insecure_must_be_exactly_1(tmp_path):
    code, log_text = failed_start(tmp_path, {"MACP_ALLOW_INSECURE": "true"})
    assert code == 1 and "TLS is required" in log_text


def test_plaintext_with_allow_insecure_logs_a_warning(server_factory):
    srv = server_factory()
    roundtrip(srv.stub())
    assert "WARNING" in srv.log() and "plaintext" in srv.log()


@pytest.mark.parametrize("which", ["cert", "key"])
def test_half_configured_tls_is_not_tls(tmp_path, pki, which):
    var = "MACP_TLS_CERT_PATH" if which == "cert" else "MACP_TLS_KEY_PATH"
    code, log_text = failed_start(tmp_path, {var: pki[which], "MACP_ALLOW_INSECURE": "0"})
    assert code == 1 and "TLS is required" in log_text


@pytest.mark.parametrize("which", ["cert", "key"])
def test_missing_tls_file_aborts(tmp_path, pki, which):
    env = {"MACP_TLS_CERT_PATH": pki["cert"], "MACP_TLS_KEY_PATH": pki["key"]}
    var = "MACP_TLS_CERT_PATH" if which == "cert" else "MACP_TLS_KEY_PATH"
    env[var] = str(tmp_path / f"missing-{which}.pem")
    code, log_text = failed_start(tmp_path, env)
    assert code == 1, log_text
    assert var in log_text and "does not exist" in log_text
    assert "serving" not in log_text


@pytest.mark.parametrize("case", ["garbage-cert", "garbage-key", "key-of-another-cert"])
def test_unusable_tls_identity_aborts_with_a_clear_message(tmp_path, pki, case):
    env = {"MACP_TLS_CERT_PATH": pki["cert"], "MACP_TLS_KEY_PATH": pki["key"]}
    expected = {"garbage-cert": "holds no usable PEM certificate",
                "garbage-key": "holds no usable unencrypted PEM private key",
                "key-of-another-cert": "does not belong to the certificate"}[case]
    if case == "garbage-cert":
        env["MACP_TLS_CERT_PATH"] = pki["garbage"]
    elif case == "garbage-key":
        env["MACP_TLS_KEY_PATH"] = pki["garbage"]
    else:
        env["MACP_TLS_KEY_PATH"] = pki["other_key"]
    code, log_text = failed_start(tmp_path, env)
    assert code == 1, log_text
    assert expected in log_text
    assert "serving" not in log_text
