"""Shared fixtures: a real server process on a free loopback port, and small envelope helpers.

Protocol profiles (runtime/registries/profile.py): a server started here speaks `v0.4.0` unless told otherwise
(`env={"MACP_PROTOCOL_PROFILE": "current"}`), because most modules assert the v0.4.0 answers. A
module whose behaviour is shared by both profiles sets `PROFILES = ("v0.4.0", "current")` and its
`runtime_server` tests then run once per profile; `PROFILE = "current"` runs a module under `current`
only. The `protocol_profile` fixture names the profile of the module's server.

Most tests talk to the server over gRPC exactly as a client would. `runtime_server` is shared by the
tests of one module (sessions use fresh ids, so they do not interfere); tests that kill or restart
the server use `server_factory` for servers of their own.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from macp.v1 import core_pb2, core_pb2_grpc, envelope_pb2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PostgreSQL for the multi-instance tests: a session fixture that starts a throw-away server.
pytest_plugins = ["pgkit"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: str, env: dict | None = None, args: list[str] | None = None):
        self.data_dir = data_dir
        self.extra_env = env or {}
        self.args = args or []
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(data_dir + "-logs", f"server-{self.port}.log")
        self._channel = None

    def start(self, wait: bool = True) -> "ServerProcess":
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MACP_")}
        env.update({
            "MACP_ALLOW_INSECURE": "1",
            "MACP_BIND_ADDR": self.target,
            "MACP_DATA_DIR": self.data_dir,
            "MACP_SESSION_START_LIMIT_PER_MINUTE": "1000000",
            "MACP_MESSAGE_LIMIT_PER_MINUTE": "1000000",
            "MACP_PROTOCOL_PROFILE": "v0.4.0",
        })
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "macp_runtime", "serve", *self.args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with grpc.insecure_channel(self.target) as ch:
                    grpc.channel_ready_future(ch).result(timeout=0.2)
                return
            except grpc.FutureTimeoutError:
                continue
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()
        except OSError:
            return ""

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target)
        return self._channel

    def stub(self) -> core_pb2_grpc.MACPRuntimeServiceStub:
        return core_pb2_grpc.MACPRuntimeServiceStub(self.channel())

    def _close_channel(self):
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        self._close_channel()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> int:
        self._close_channel()
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        return self.proc.returncode if self.proc else 0

    def restart(self) -> "ServerProcess":
        self.stop()
        return self.start()


@pytest.fixture
def server_factory(tmp_path):
    servers = []

    def make(env: dict | None = None, args: list[str] | None = None, data_dir: str | None = None,
             start: bool = True) -> ServerProcess:
        srv = ServerProcess(data_dir or str(tmp_path / f"data{len(servers)}"), env, args)
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.kill()


def pytest_generate_tests(metafunc):
    profiles = getattr(metafunc.module, "PROFILES", None)
    if profiles and "protocol_profile" in metafunc.fixturenames:
        metafunc.parametrize("protocol_profile", profiles, indirect=True, scope="module")


@pytest.fixture(scope="module")
def protocol_profile(request) -> str:
    # TEST_PROTOCOL_PROFILE re-runs single-profile modules under another profile (to see what differs).
    return (getattr(request, "param", None) or os.environ.get("TEST_PROTOCOL_PROFILE")
            or getattr(request.module, "PROFILE", "v0.4.0"))


@pytest.fixture(scope="module")
def runtime_server(tmp_path_factory, protocol_profile):
    srv = ServerProcess(str(tmp_path_factory.mktemp("shared") / "data"),
                        {"MACP_PROTOCOL_PROFILE": protocol_profile}).start()
    yield srv
    srv.kill()


# --- envelope helpers ------------------------------------------------------------------------------

def new_session_id() -> str:
    return str(uuid.uuid4())


def envelope(mode: str, message_type: str, session_id: str, sender: str, payload=b"", message_id: str | None = None,
             **fields) -> envelope_pb2.Envelope:
    raw = payload if isinstance(payload, (bytes, bytearray)) else payload.SerializeToString()
    env = envelope_pb2.Envelope(macp_version="1.0", mode=mode, message_type=message_type,
                                message_id=message_id or str(uuid.uuid4()), session_id=session_id, sender=sender,
                                timestamp_unix_ms=int(time.time() * 1000), payload=bytes(raw))
    for k, v in fields.items():
        setattr(env, k, v)
    return env


def send(stub, env: envelope_pb2.Envelope, as_sender: str | None = None) -> envelope_pb2.Ack:
    """Send with dev auth as `as_sender` (default: the envelope's sender)."""
    who = as_sender if as_sender is not None else env.sender
    metadata = [("authorization", f"Bearer {who}")] if who else []
    return stub.Send(core_pb2.SendRequest(envelope=env), metadata=metadata).ack


def start_payload(participants, ttl_ms=60_000, mode_version="1.0.0", configuration_version="config.default",
                  policy_version="policy.default", **fields) -> core_pb2.SessionStartPayload:
    return core_pb2.SessionStartPayload(intent="test", participants=list(participants), mode_version=mode_version,
                                        configuration_version=configuration_version, policy_version=policy_version,
                                        ttl_ms=ttl_ms, **fields)


def commitment(action="decision.selected", outcome_positive=True, mode_version="1.0.0",
               configuration_version="config.default", policy_version="policy.default", **fields):
    return core_pb2.CommitmentPayload(commitment_id=fields.pop("commitment_id", "c1"), action=action,
                                      authority_scope=fields.pop("authority_scope", "test"),
                                      reason=fields.pop("reason", "done"), mode_version=mode_version,
                                      policy_version=policy_version, configuration_version=configuration_version,
                                      outcome_positive=outcome_positive, **fields)


def bearer(sender: str):
    return [("authorization", f"Bearer {sender}")]


def display_name(error) -> str:
    """The display name at the head of `MACPError.message` (issue 15: `<display name>: <reason>`),
    after checking that a reason in the message is the one `details` carries as `{"reason": ...}`."""
    import json

    name, sep, reason = error.message.partition(": ")
    if sep and error.details:
        assert json.loads(error.details).get("reason") == reason, error
    return name
