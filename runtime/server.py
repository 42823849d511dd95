"""Assemble and run the daemon: config -> storage + replay -> auth -> TLS decision -> serve."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from macp.v1 import core_pb2_grpc

from .auth import AuthConfigError, build_authenticator
from . import __version__
from .config import Config
from .logs import mask
from .metrics import Metrics
from .engine import Engine
from .modes import ModeRegistry
from .policies import PolicyRegistry
from .service import MacpService
from .tls import TlsError, server_credentials
from .storage import StorageError, open_store
from .spec_archive import SpecArchive
from .storage.documents import open_documents

log = logging.getLogger("macp_runtime.server")

SERVICE_NAME = "macp.v1.MACPRuntimeService"
SHUTDOWN_GRACE_S = 10.0


class StartupError(Exception):
    pass


class Runtime:
    """One running daemon: holds the engine, the store and the gRPC server."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.store = None
        self.server = None
        self.cluster = None
        self.port = None
        self._stopped = threading.Event()

    def start(self) -> "Runtime":
        cfg = self.cfg
        t0 = time.perf_counter()
        log.info("starting macp-runtime %s", __version__, extra={"fields": {
            "config": cfg.describe(),
            "env": {k: mask(k, v) for k, v in sorted(os.environ.items()) if k.startswith("MACP_")}}})
        modes = ModeRegistry.from_spec_dirs(cfg.specs_dirs)
        postgres = cfg.storage_backend == "postgres" and not cfg.memory_only
        if postgres:
            self.store = open_store(False, backend="postgres", database_url=cfg.database_url,
                                    pool_size=cfg.database_pool_size)
        else:
            self.store = open_store(cfg.memory_only, cfg.data_dir, segment_bytes=cfg.wal_segment_bytes,
                                    compact_dead_ratio=cfg.compact_dead_ratio or None)
        try:
            report = self.store.open()
        except Exception as exc:
            raise StartupError(f"cannot open storage: {exc}") from None
        # Registry documents live beside the sessions: in the shared database for postgres.
        shared_documents = self.store.documents() if postgres else None

        def documents():
            return shared_documents or open_documents(cfg.memory_only, cfg.data_dir)

        try:  # policies first: replay must not depend on them, but new sessions bind against them
            policies = PolicyRegistry(documents())
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
        engine = Engine(modes, policies, self.store)
        engine.checkpoint_interval = cfg.checkpoint_interval
        if not cfg.memory_only:
            engine.spec_archive = SpecArchive(documents())
        recovered, failed = engine.recover(strict=cfg.strict_recovery)
        if postgres:   # other instances' changes reach this one (fan-out, registries)
            from .cluster import ClusterBus
            from .config import mask_url

            self.cluster = ClusterBus(cfg.database_url, engine, shared_documents,
                                      {"policies": policies.reload, "modes": modes.reload})
            self.cluster.start()
            engine.cluster = self.cluster
            where = f"PostgreSQL {mask_url(cfg.database_url)} (shared with other instances)"
        else:
            where = "memory only (nothing survives a restart)" if cfg.memory_only else f"durable log in {cfg.data_dir}"
        log.info("storage: %s; recovered %d sessions from %d records in %.2fs%s", where, recovered,
                 report.records, time.perf_counter() - t0, f"; {failed} sessions could not be recovered" if failed else "")
        if report.dropped_records or report.problems:
            log.warning("storage recovery dropped %d records (%d bytes): %s", report.dropped_records,
                        report.dropped_bytes, "; ".join(report.problems))
        try:
            authenticator = build_authenticator()
        except AuthConfigError as exc:
            raise StartupError(f"auth configuration: {exc}") from None
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

        service = MacpService(engine, authenticator, max_payload_bytes=cfg.max_payload_bytes,
                              session_start_limit=cfg.session_start_limit_per_minute,
                              message_limit=cfg.message_limit_per_minute, max_streams=cfg.max_streams)
        # Every open stream holds a pool thread: MACP_MAX_STREAMS of them on top of the unary workers.
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.workers + cfg.max_streams,
                                                        thread_name_prefix="rpc"))
        core_pb2_grpc.add_MACPRuntimeServiceServicer_to_server(service, server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        # Reflection lets grpcurl list/describe without proto files. Default: on in dev mode only.
        reflect = cfg.reflection if cfg.reflection is not None else not authenticator.resolvers
        if reflect:
            reflection.enable_server_reflection(
                [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        log.info("reflection %s", "on" if reflect else "off")
        try:
            if credentials is None:
                self.port = server.add_insecure_port(cfg.bind_addr)
            else:
                self.port = server.add_secure_port(cfg.bind_addr, credentials)
        except RuntimeError as exc:
            raise StartupError(f"cannot bind {cfg.bind_addr}: {exc}") from None
        if not self.port:
            raise StartupError(f"cannot bind {cfg.bind_addr}")
        if cfg.metrics_addr:
            metrics = Metrics(engine, self.store)
            try:
                metrics.serve(cfg.metrics_addr)
            except OSError as exc:
                raise StartupError(f"cannot serve metrics on {cfg.metrics_addr}: {exc}") from None
            engine.metrics = metrics
            log.info("metrics: Prometheus endpoint on http://%s/metrics", cfg.metrics_addr)
        server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.server = server
        self.engine = engine
        engine.start_sweeper(cfg.cleanup_interval_secs, cfg.session_retention_secs)
        log.info("serving %s on %s (%s), modes: %s", SERVICE_NAME, cfg.bind_addr,
                 "TLS" if credentials else "plaintext, insecure allowed", ", ".join(modes.names))
        return self

    def stop(self, grace: float = SHUTDOWN_GRACE_S) -> None:
        """Stop taking calls, let in-flight calls finish (acks included), then close storage."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.server is not None:
            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
            stopping = self.server.stop(grace)
            self.engine.policies.close()   # policy watch streams end (OK) instead of using up the grace period
            self.engine.close()            # the sweep stops; session streams and the other watches end
            stopping.wait()
        if self.cluster is not None:
            self.cluster.close()
        if self.store is not None:
            self.store.close()
        log.info("stopped")

    def wait(self) -> None:
        self._stopped.wait()


def serve(cfg: Config) -> int:
    runtime = Runtime(cfg)
    try:
        runtime.start()
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        if runtime.store is not None:
            runtime.store.close()
        return 1

    def on_signal(signum, frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        threading.Thread(target=runtime.stop, name="shutdown").start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime.wait()
    while runtime.server is not None and threading.active_count() > 1 and any(
            t.name == "shutdown" for t in threading.enumerate()):
        time.sleep(0.05)
    return 0
