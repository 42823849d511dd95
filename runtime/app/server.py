"""Assemble and run the daemon: config -> storage + replay -> auth -> TLS decision -> serve on one
asyncio event loop (grpc.aio), with any additional asyncio services started and stopped beside it.

Additional services (for example a web console) plug in as objects with two coroutines:
`async start(runtime)` — called on the loop once the gRPC server serves (`runtime.engine`,
`runtime.store`, `runtime.cfg` are ready) — and `async stop()` — called first when the daemon stops,
before the gRPC drain. Pass them to `serve(cfg, services=[...])` / `run(cfg, services=[...])`, or
`Runtime.add_service(svc)` before `start()`.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import time

from .. import __version__
from ..codegen import SpecError
from ..kernel.access import Limits
from ..kernel.auth import AuthConfigError, AuthSettings, build_authenticator
from ..kernel.engine import Engine
from ..kernel.metrics import NO_METRICS, Metrics
from ..kernel.receipt_keys import DOCUMENT as RECEIPT_KEYS_DOCUMENT
from ..kernel.receipt_keys import KeyConfigError, open_receipt_keys
from ..kernel.receipts import Receipts
from ..registries import profile as profiles
from ..registries.modes import ModeRegistry
from ..registries.policies import PolicyRegistry
from ..registries.spec_archive import SpecArchive
from ..storage import StorageError, open_store
from ..storage.documents import open_documents
from ..transport.server import BindError, GrpcServer
from ..transport.service import SERVICE_NAME
from ..vocabulary.logs import mask
from ..vocabulary.redact import mask_url
from .config import Config, is_loopback
from .errors import StartupError
from .tls import TlsError, server_credentials

log = logging.getLogger("macp_runtime.server")

SHUTDOWN_GRACE_S = 10.0
# The collector's young generation: Python collects it every 700 container allocations by default;
# one RPC through grpc.aio allocates dozens, so it ran every few calls. Measured (sessions workload,
# memory store, 2x32, 10 s): 4.5 % of the server's CPU in collections at the default, 1.9 % at 10,000.
GC_YOUNG_THRESHOLD = 10_000
GIL_SWITCH_S = 0.0005   # measured: durable 2x4 ratio 0.59 at 0.5 ms against 0.44 at the default 5 ms


def _file_loaded_policies(directory: str, prof, modes) -> PolicyRegistry:
    from ..registries.policy_files import load_dir

    policies = PolicyRegistry(None, prof, modes)
    try:
        results = load_dir(policies, directory)
    except OSError as exc:
        raise StartupError(str(exc)) from None
    for name, policy_id, problem in results:
        if problem:
            raise StartupError(problem)
    policies.read_only = True
    log.info("policy registry: %d policies file-loaded from %s (read-only)", len(results), directory)
    return policies


def auth_settings(cfg: Config) -> AuthSettings:
    """The kernel's auth settings from the configuration's auth section."""
    return AuthSettings(issuer=cfg.auth_issuer, audience=cfg.auth_audience, jwks_json=cfg.auth_jwks_json,
                        jwks_url=cfg.auth_jwks_url, jwks_ttl_secs=cfg.auth_jwks_ttl_secs,
                        tokens_json=cfg.auth_tokens_json, tokens_file=cfg.auth_tokens_file,
                        unknown=tuple(cfg.auth_unknown))


class Runtime:
    """One running daemon: holds the engine, the store, the gRPC server and the additional services."""

    def __init__(self, cfg: Config, services=()):
        self.cfg = cfg
        self.store = None
        self.engine = None
        self.grpc = None
        self.bus = None   # the PostgreSQL notification bus (storage/postgres/bus.py) when shared
        self.metrics = None
        self.port = None
        self.authenticator = None
        self.services = list(services)
        if cfg.console_addr:   # the browser console (runtime/console), on the same event loop
            from .console import ConsoleService

            self.services.append(ConsoleService(cfg.console_addr))
        self._started: list = []
        self._stopped: asyncio.Event | None = None
        self._stopping: asyncio.Task | None = None

    def add_service(self, service) -> None:
        """An object with `async start(runtime)` and `async stop()`, run on the daemon's event loop."""
        self.services.append(service)

    def prepare(self) -> None:
        """Everything before serving (blocking: storage, replay, registries, auth, TLS). Raises StartupError."""
        cfg = self.cfg
        t0 = time.perf_counter()
        log.info("starting macp-runtime %s", __version__, extra={"fields": {
            "config": cfg.describe(),
            "env": {k: mask(k, v) for k, v in sorted(os.environ.items()) if k.startswith("MACP_")}}})
        try:   # first: a broken auth configuration stops start-up before anything is opened
            authenticator = build_authenticator(auth_settings(cfg))
        except AuthConfigError as exc:
            raise StartupError(f"auth configuration: {exc}") from None
        if not authenticator.resolvers and not cfg.dev_mode_allow_remote and not is_loopback(cfg.bind_addr):
            raise StartupError(f"dev-mode auth (no MACP_AUTH_* variable set) on the non-loopback address "
                               f"{cfg.bind_addr}: anyone who can connect could act as anyone. Configure "
                               f"MACP_AUTH_* or set MACP_DEV_MODE_ALLOW_REMOTE=1 to allow it")
        prof = profiles.get(cfg.protocol_profile)
        prof.list_sessions_default_page_size = cfg.list_sessions_default_page_size
        prof.list_sessions_max_page_size = cfg.list_sessions_max_page_size
        log.info("protocol profile: %s (semantics_rev %d; Initialize reports reference level %s)",
                 prof.name, prof.semantics_rev, prof.runtime_version)
        try:
            modes = ModeRegistry.from_spec_dirs(cfg.specs_dirs, prof)
        except SpecError as exc:   # one line per problem, every file (codegen/validate.py)
            for problem in getattr(exc, "errors", [exc]):
                log.error("mode spec: %s", problem)
            raise StartupError("the mode specs above have problems (macp-runtime check shows the same)") from None
        postgres = cfg.storage_backend == "postgres" and not cfg.memory_only
        if postgres:
            self.store = open_store(False, backend="postgres", database_url=cfg.database_url,
                                    pool_size=cfg.database_pool_size)
        else:
            self.store = open_store(cfg.memory_only, cfg.data_dir, segment_bytes=cfg.wal_segment_bytes,
                                    compact_dead_ratio=cfg.compact_dead_ratio or None,
                                    history_retention_ms=int(cfg.history_retention_secs * 1000))
        try:
            report = self.store.open()
        except Exception as exc:
            raise StartupError(f"cannot open storage: {exc}") from None
        # Registry documents live beside the sessions: in the shared database for postgres.
        shared_documents = self.store.documents() if postgres else None

        def documents():
            return shared_documents or open_documents(cfg.memory_only, cfg.data_dir)

        try:  # policies first: replay must not depend on them, but new sessions bind against them
            if cfg.policies_dir:   # file-loaded and read-only (current.md §11.3), before recovery
                policies = _file_loaded_policies(cfg.policies_dir, prof, modes)
            else:
                policies = PolicyRegistry(documents(), prof, modes)
        except StorageError as exc:
            raise StartupError(f"cannot load the policy registry: {exc}") from None
        try:  # registered and promoted modes before replay: their sessions replay through them
            restored = modes.attach_documents(documents())
        except StorageError as exc:
            raise StartupError(f"cannot load the mode registry: {exc}") from None
        if restored:
            log.info("mode registry: %d registered or promoted modes restored", restored)
        for warning in cfg.warnings:
            log.warning("configuration: %s", warning)
        try:   # decision receipts: the signing key and the published key set (runtime/receipt_keys.py)
            receipt_keys = open_receipt_keys(memory_only=cfg.memory_only, data_dir=cfg.data_dir,
                                             shared_documents=shared_documents,
                                             inline=cfg.receipt_signing_key,
                                             key_file=cfg.receipt_signing_key_file, kid=cfg.receipt_key_id)
        except (KeyConfigError, StorageError) as exc:
            raise StartupError(f"receipt signing key: {exc}") from None
        bus = None
        if postgres:   # other instances' changes reach this one (fan-out, registries), once recovered
            from ..storage.postgres.bus import PostgresBus

            bus = self.bus = PostgresBus(cfg.database_url, self.store, shared_documents,
                                         {"policies": policies.reload, "modes": modes.reload,
                                          RECEIPT_KEYS_DOCUMENT: receipt_keys.reload})
            where = f"PostgreSQL {mask_url(cfg.database_url)} (shared with other instances)"
        else:
            where = "memory only (nothing survives a restart)" if cfg.memory_only else f"durable log in {cfg.data_dir}"
        self.metrics = Metrics(modes, self.store) if cfg.metrics_addr else None
        engine = Engine(modes, policies, self.store, profile=prof, metrics=self.metrics or NO_METRICS,
                        spec_archive=None if cfg.memory_only else SpecArchive(documents()),
                        receipts=Receipts(receipt_keys, cfg.receipt_issuer), bus=bus,
                        checkpoint_interval=cfg.checkpoint_interval, clock_skew_ms=cfg.clock_skew_ms,
                        retention_ms=int(cfg.session_retention_secs * 1000))
        if self.metrics is not None:
            self.metrics.watch(engine)
        recovered, failed = engine.recover(strict=cfg.strict_recovery)
        if prof.semantics_rev >= 4:   # the current line serves (and advertises) receipts and what-if replay
            prof.enable("decision_receipt")
            prof.enable("decision_receipt_signed", receipt_keys.signed)
            prof.enable("what_if_replay")
        log.info("decision receipts: signed with kid %s", receipt_keys.active.kid)
        log.info("storage: %s; recovered %d sessions from %d records in %.2fs%s", where, recovered,
                 report.records, time.perf_counter() - t0, f"; {failed} sessions could not be recovered" if failed else "")
        if report.dropped_records or report.problems:
            log.warning("storage recovery dropped %d records (%d bytes): %s", report.dropped_records,
                        report.dropped_bytes, "; ".join(report.problems))
        if authenticator.resolvers:
            log.info("auth: %s", authenticator.description)
        else:
            log.warning("auth: %s", authenticator.description)

        credentials = None
        if cfg.tls_cert_path and cfg.tls_key_path:
            try:
                credentials = server_credentials(cfg.tls_cert_path, cfg.tls_key_path)
            except TlsError as exc:
                raise StartupError(str(exc)) from None
        elif not cfg.allow_insecure:
            raise StartupError("TLS is required unless MACP_ALLOW_INSECURE=1 is set "
                               "(or give MACP_TLS_CERT_PATH and MACP_TLS_KEY_PATH)")
        else:
            log.warning("TLS is not configured; serving plaintext because MACP_ALLOW_INSECURE=1")

        reflect = cfg.reflection if cfg.reflection is not None else not authenticator.resolvers
        self.authenticator = authenticator   # additional services authenticate with the same resolvers
        self.engine = engine
        self.modes = modes
        self.grpc = GrpcServer(engine, authenticator, bind_addr=cfg.bind_addr, credentials=credentials,
                               reflect=reflect, blocking=not cfg.memory_only, workers=cfg.workers,
                               max_payload_bytes=cfg.max_payload_bytes,
                               session_start_limit=cfg.session_start_limit_per_minute,
                               message_limit=cfg.message_limit_per_minute, max_streams=cfg.max_streams,
                               max_streams_per_identity=cfg.max_streams_per_identity,
                               limits=Limits(cfg.max_name_length, cfg.max_reason_bytes))
        self._tls = credentials is not None
        log.info("reflection %s", "on" if reflect else "off")

    async def start(self) -> "Runtime":
        """prepare() (off the loop), then serve on the running loop and start the additional services."""
        cfg = self.cfg
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.prepare)
        engine = self.engine
        try:
            self.port = await self.grpc.start()
        except BindError as exc:
            raise StartupError(str(exc)) from None
        if self.metrics is not None:
            try:
                self.metrics.serve(cfg.metrics_addr)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {cfg.metrics_addr}: {exc}") from None
            log.info("metrics: Prometheus endpoint on http://%s/metrics", cfg.metrics_addr)
        engine.start_sweeper(cfg.cleanup_interval_secs, cfg.session_retention_secs)
        log.info("serving %s on %s (%s), modes: %s", SERVICE_NAME, cfg.bind_addr,
                 "TLS" if self._tls else "plaintext, insecure allowed", ", ".join(self.modes.names))
        for service in self.services:
            await service.start(self)
            self._started.append(service)
        return self

    def request_stop(self, grace: float = SHUTDOWN_GRACE_S) -> "asyncio.Task":
        """Begin stopping (idempotent); the task completes when everything has stopped."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace))
        return self._stopping

    async def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        await self.request_stop(grace)

    async def _stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """NOT_SERVING, stop the additional services, stop taking calls, let in-flight calls finish
        (acks included), end streams and watches, then close storage."""
        try:
            if self.grpc is not None:
                await self.grpc.not_serving()
            for service in reversed(self._started):
                try:
                    await service.stop()
                except Exception:
                    log.exception("stopping %r failed", service)
            self._started.clear()
            if self.grpc is not None and self.engine is not None:
                engine = self.engine

                def close_engine():
                    engine.policies.close()   # policy watch streams end (OK) instead of using up the grace
                    engine.close()            # the sweep stops; session streams and the other watches end

                await self.grpc.stop(grace, close_engine)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._close_storage)
            log.info("stopped")
        finally:
            if self._stopped is not None:
                self._stopped.set()

    def _close_storage(self) -> None:
        if self.bus is not None:
            self.bus.close()
        if self.store is not None:
            self.store.close()

    async def wait(self) -> None:
        await self._stopped.wait()


async def run(cfg: Config, services=()) -> int:
    """The daemon on the running loop until SIGTERM/SIGINT: 0 after a clean drain, 1 when start-up failed."""
    runtime = Runtime(cfg, services)
    try:
        await runtime.start()
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        await runtime.stop(grace=0)
        return 1
    gc.freeze()   # what start-up built (specs, registries, recovered sessions) lives on: no collection scans it
    loop = asyncio.get_running_loop()

    def on_signal(signum):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        runtime.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await runtime.wait()
    return 0


def serve(cfg: Config, services=()) -> int:
    # The loop thread is busy nearly all the time under load; the group commit's flusher thread needs
    # the GIL briefly to start a batch and to answer it. At the default 5 ms switch interval each of
    # those waits up to 5 ms for the loop to let go, which is what a Send waits for at low
    # concurrency; a shorter interval hands the GIL over sooner (sys.setswitchinterval is public API).
    sys.setswitchinterval(GIL_SWITCH_S)
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    return asyncio.run(run(cfg, services))
