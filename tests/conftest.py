"""Shared fixtures: servers on a free loopback port. Helpers live in the package `tests.support`.

Protocol profiles (runtime/registries/profile.py): a server started here speaks `v0.4.0` unless told otherwise
(`env={"MACP_PROTOCOL_PROFILE": "current"}`), because most modules assert the v0.4.0 answers. A
module whose behaviour is shared by both profiles sets `PROFILES = ("v0.4.0", "current")` and its
`runtime_server` tests then run once per profile; `PROFILE = "current"` runs a module under `current`
only. The `protocol_profile` fixture names the profile of the module's server.

Most tests talk to the server over gRPC exactly as a client would. `runtime_server` is shared by the
tests of one module (sessions use fresh ids, so they do not interfere) and runs in-process
(tests.support.inprocess: the daemon's own Runtime, its own Config, port 0). Tests that need servers of
their own use `inprocess_factory` where a process adds nothing, and `server_factory` (a real
`macp-runtime serve` process) to kill, signal or restart it, read its exit status or log, pass it
command-line flags, or serve Prometheus metrics (an endpoint that is never stopped).
"""
from __future__ import annotations

import os

import pytest

from tests.support import ServerProcess
from tests.support.inprocess import InProcessServer, shutdown

# PostgreSQL for the multi-instance tests: a session fixture that starts a throw-away server.
pytest_plugins = ["tests.support.pgkit"]


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


@pytest.fixture
def inprocess_factory(tmp_path):
    """`make(env=None, data_dir=None, start=True)`: an in-process server of the test's own (command-line
    flags are the CLI's: a server started with `args` is a process, `server_factory`)."""
    servers = []

    def make(env: dict | None = None, args: list[str] | None = None, data_dir: str | None = None,
             start: bool = True) -> InProcessServer:
        if args:
            raise ValueError(f"flags {args}: use server_factory")
        srv = InProcessServer(data_dir or str(tmp_path / f"data{len(servers)}"), env)
        servers.append(srv)
        return srv.start() if start else srv

    yield make
    for srv in servers:
        srv.kill()


def pytest_sessionfinish(session, exitstatus):
    shutdown()   # the in-process servers' event loop


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
    srv = InProcessServer(str(tmp_path_factory.mktemp("shared") / "data"),
                          {"MACP_PROTOCOL_PROFILE": protocol_profile}).start()
    yield srv
    srv.kill()
