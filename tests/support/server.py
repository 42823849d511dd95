"""Servers for the tests: a real `macp-runtime serve` process on a free loopback port (`ServerProcess`);
the in-process kind is in inprocess.py."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from macp.v1 import core_pb2_grpc

# The repository root: the working directory of server processes, and where tests find docs and specs.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What every test server starts with (before the test's own variables): plaintext, no practical rate
# limit, the v0.4.0 profile (conftest.py says why).
SERVER_ENV = {
    "MACP_ALLOW_INSECURE": "1",
    "MACP_SESSION_START_LIMIT_PER_MINUTE": "1000000",
    "MACP_MESSAGE_LIMIT_PER_MINUTE": "1000000",
    "MACP_PROTOCOL_PROFILE": "v0.4.0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Client:
    """The test's channel to a server (`target`), opened on first use and closed when the server stops."""

    target = ""
    _channel = None

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


class ServerProcess(_Client):
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
        env.update(SERVER_ENV, MACP_BIND_ADDR=self.target, MACP_DATA_DIR=self.data_dir)
        env.update(self.extra_env)
        self._log = self.output()
        self.proc = subprocess.Popen([sys.executable, "-m", "macp_runtime", "serve", *self.args],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if wait:
            self.wait_ready()
        return self

    def output(self):
        """Where the server's stdout and stderr go: its log file (a test may hand it a pipe instead)."""
        return open(self.log_path, "ab")

    #: How wait_ready reaches the server (a subclass serving TLS probes over TLS) and how long one try waits.
    probe_timeout = 0.2

    def probe_channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with self.probe_channel() as ch:
                    grpc.channel_ready_future(ch).result(timeout=self.probe_timeout)
                return
            except grpc.FutureTimeoutError:
                continue
        raise RuntimeError(f"server did not become ready:\n{self.log()}")

    def log(self) -> str:
        return read_log(self.log_path)

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


def read_log(path) -> str:
    """A log file's text so far ("" when there is none yet)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""
