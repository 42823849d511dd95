"""A throw-away PostgreSQL server for the tests: initdb into a temporary directory, start it on a free
loopback port, hand out one fresh database per test, stop it at the end of the session.

The server binaries are looked up on PATH and in /usr/lib/postgresql/<version>/bin (Debian keeps them
there). initdb and postgres refuse to run as root, so as root the server runs as the `postgres` user
when it exists, else as a `macp-pg` user created with useradd. Without binaries the PostgreSQL tests
are skipped, except under CI (CI=true), where a missing server is a failure.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

from .server import read_log

PG_USER = "macp-pg"


def find_bin_dir() -> str | None:
    """The directory holding initdb, pg_ctl and postgres, or None."""
    found = shutil.which("initdb")
    if found and os.path.exists(os.path.join(os.path.dirname(found), "pg_ctl")):
        return os.path.dirname(found)

    def version(path: str) -> float:
        try:
            return float(path.split("/")[-3])
        except ValueError:
            return 0.0

    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version, reverse=True):
        return os.path.dirname(initdb)
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """The account the server runs as: None = the current one (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", PG_USER):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                   check=True, capture_output=True)
    return pwd.getpwnam(PG_USER)


class PostgresServer:
    def __init__(self, bin_dir: str):
        self.bin_dir = bin_dir
        self.user = _server_user()
        self.root = tempfile.mkdtemp(prefix="macp-pg-")
        os.chmod(self.root, 0o755)
        self.data = os.path.join(self.root, "data")
        self.sockets = os.path.join(self.root, "sock")
        self.log_path = os.path.join(self.root, "server.log")
        os.makedirs(self.sockets)
        if self.user is not None:
            for path in (self.root, self.sockets):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.port = _free_port()
        self.superuser = "macp"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        kwargs = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["HOME"] = self.root
        return subprocess.run([os.path.join(self.bin_dir, args[0]), *args[1:]], capture_output=True, text=True,
                              env=env, cwd=self.root, timeout=timeout, **kwargs)

    def start(self) -> "PostgresServer":
        done = self._run("initdb", "-D", self.data, "-U", self.superuser, "--auth=trust", "--no-sync",
                         "-E", "UTF8", "--locale=C")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{done.stdout}\n{done.stderr}")
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.sockets} "
                   f"-c max_connections=200 -c shared_buffers=64MB")
        done = self._run("pg_ctl", "-D", self.data, "-l", self.log_path, "-o", options, "-w", "-t", "60", "start")
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{done.stderr}\n{self.log()}")
        return self

    def log(self) -> str:
        return read_log(self.log_path)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            self._run("pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


_server: PostgresServer | None = None


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the whole test session (skipped or failed when there is none)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        message = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in "
                   "/usr/lib/postgresql/*/bin: install PostgreSQL (Debian: apt-get install postgresql)")
        if _in_ci():
            pytest.fail(f"CI is set and {message}", pytrace=False)
        pytest.skip(message)
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        message = f"the postgres extra is not installed ({exc}): pip install -e '.[postgres]'"
        if _in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    server = PostgresServer(bin_dir)
    t0 = time.monotonic()
    try:
        server.start()
    except Exception:
        server.stop()
        raise
    server.started_in = time.monotonic() - t0
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server) -> str:
    """A fresh, empty database for one test."""
    return postgres_server.create_database()
