"""Start-up configuration: environment variables (as the reference names them) and matching flags.

Every problem is collected and reported together; the daemon then exits without serving.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os

from ..vocabulary.redact import mask_url  # noqa: F401  (re-exported: the start-up log masks with it)

DEFAULT_BIND = "127.0.0.1:50051"


@dataclasses.dataclass
class Config:
    bind_addr: str = DEFAULT_BIND
    allow_insecure: bool = False
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    data_dir: str = ".macp-data"
    memory_only: bool = False
    storage_backend: str = "file"
    database_url: str | None = None       # MACP_STORAGE_BACKEND=postgres: libpq URL or key=value string
    database_pool_size: int = 10          # connections per instance (plus one that LISTENs)
    strict_recovery: bool = False
    checkpoint_interval: int = 0          # interval checkpoint every N log entries of an open session; 0 = off
    wal_segment_bytes: int = 64 * 1024 * 1024   # file store: a new log segment once one reaches this size
    compact_dead_ratio: float = 0.5       # file store: rewrite a sealed segment at this dead share; 0 = never
    history_retention_secs: float = 0.0   # file store: keep a terminal session's history this long (WhatIfReplay)
    max_payload_bytes: int = 1_048_576
    session_start_limit_per_minute: int = 60
    message_limit_per_minute: int = 600
    specs_dirs: list[str] = dataclasses.field(default_factory=list)
    workers: int = 64
    max_streams: int = 10000
    max_streams_per_identity: int = 0     # open streams per identity; 0 = half of max_streams
    dev_mode_allow_remote: bool = False   # dev-mode auth on a non-loopback bind address
    max_name_length: int = 256            # ids, modes, message types, senders, policy ids (characters)
    max_reason_bytes: int = 4096          # Cancel/Suspend/Resume reason (UTF-8 bytes)
    clock_skew_ms: int = 30_000           # how far an envelope timestamp may move a deadline off the server's clock
    cleanup_interval_secs: float = 60.0
    session_retention_secs: float = 3600.0
    log_level: str = "info"
    log_json: bool = False
    reflection: bool | None = None        # None: on in dev-mode auth, off otherwise
    metrics_addr: str | None = None       # host:port of the Prometheus endpoint; None = off
    protocol_profile: str = "current"     # `current` or `v0.4.0` (runtime/profile.py)
    console_addr: str | None = None       # host:port of the browser console (runtime/console); None = off
    list_sessions_default_page_size: int = 100   # current profile: ListSessions page_size 0
    policies_dir: str | None = None       # file-loaded, read-only policy registry (current.md §11.3)
    policies_dry_run: bool = False        # validate MACP_POLICIES_DIR, print a line per file, exit
    list_sessions_max_page_size: int = 1000      # current profile: larger page_size is clamped to this
    # Decision receipts (runtime/receipt_keys.py). The inline seed MACP_RECEIPT_SIGNING_KEY is read from
    # the environment only (never a flag, never logged).
    receipt_signing_key_file: str | None = None
    receipt_key_id: str | None = None
    receipt_issuer: str = "runtime:macp-runtime"
    warnings: list[str] = dataclasses.field(default_factory=list)   # logged at start-up

    def describe(self) -> dict:
        """For the start-up log line (tokens are read by auth; a database password is masked)."""
        out = dataclasses.asdict(self)
        if out.get("database_url"):
            out["database_url"] = mask_url(out["database_url"])
        return out


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


# (env var, Config field, kind, flag) — the flag of the same meaning is defined in cli.py
ENV_VARS = [
    ("MACP_BIND_ADDR", "bind_addr", "str"),
    ("MACP_ALLOW_INSECURE", "allow_insecure", "flag1"),
    ("MACP_TLS_CERT_PATH", "tls_cert_path", "str"),
    ("MACP_TLS_KEY_PATH", "tls_key_path", "str"),
    ("MACP_DATA_DIR", "data_dir", "str"),
    ("MACP_MEMORY_ONLY", "memory_only", "flag1"),
    ("MACP_STORAGE_BACKEND", "storage_backend", "str"),
    ("MACP_DATABASE_URL", "database_url", "str"),
    ("MACP_DATABASE_POOL_SIZE", "database_pool_size", "posint"),
    ("MACP_STRICT_RECOVERY", "strict_recovery", "flag1"),
    ("MACP_CHECKPOINT_INTERVAL", "checkpoint_interval", "count"),
    ("MACP_WAL_SEGMENT_BYTES", "wal_segment_bytes", "posint"),
    ("MACP_COMPACT_DEAD_RATIO", "compact_dead_ratio", "ratio"),
    ("MACP_HISTORY_RETENTION_SECS", "history_retention_secs", "nonneg_secs"),
    ("MACP_MAX_PAYLOAD_BYTES", "max_payload_bytes", "posint"),
    ("MACP_SESSION_START_LIMIT_PER_MINUTE", "session_start_limit_per_minute", "posint"),
    ("MACP_MESSAGE_LIMIT_PER_MINUTE", "message_limit_per_minute", "posint"),
    ("MACP_SPECS_DIR", "specs_dirs", "pathlist"),
    ("MACP_WORKERS", "workers", "posint"),
    ("MACP_MAX_STREAMS", "max_streams", "posint"),
    ("MACP_MAX_STREAMS_PER_IDENTITY", "max_streams_per_identity", "count"),
    ("MACP_DEV_MODE_ALLOW_REMOTE", "dev_mode_allow_remote", "flag1"),
    ("MACP_MAX_NAME_LENGTH", "max_name_length", "posint"),
    ("MACP_MAX_REASON_BYTES", "max_reason_bytes", "posint"),
    ("MACP_CLOCK_SKEW_MS", "clock_skew_ms", "count"),
    ("MACP_CLEANUP_INTERVAL_SECS", "cleanup_interval_secs", "secs"),
    ("MACP_SESSION_RETENTION_SECS", "session_retention_secs", "secs"),
    ("MACP_LOG_LEVEL", "log_level", "str"),
    ("MACP_LOG_FORMAT", "log_json", "json_flag"),
    ("MACP_REFLECTION", "reflection", "bool01"),
    ("MACP_METRICS_ADDR", "metrics_addr", "str"),
    ("MACP_PROTOCOL_PROFILE", "protocol_profile", "str"),
    ("MACP_CONSOLE_ADDR", "console_addr", "str"),
    ("MACP_LIST_SESSIONS_DEFAULT_PAGE_SIZE", "list_sessions_default_page_size", "posint"),
    ("MACP_POLICIES_DIR", "policies_dir", "str"),
    ("MACP_POLICIES_DRY_RUN", "policies_dry_run", "flag1"),
    ("MACP_LIST_SESSIONS_MAX_PAGE_SIZE", "list_sessions_max_page_size", "posint"),
    ("MACP_RECEIPT_SIGNING_KEY_FILE", "receipt_signing_key_file", "str"),
    ("MACP_RECEIPT_KEY_ID", "receipt_key_id", "str"),
    ("MACP_RECEIPT_ISSUER", "receipt_issuer", "str"),
]


def from_env(environ=None, overrides: dict | None = None) -> Config:
    """Read variables, apply flag overrides (flags win), validate. Raises ConfigError."""
    environ = os.environ if environ is None else environ
    cfg = Config()
    problems: list[str] = []
    for var, field, kind in ENV_VARS:
        if var not in environ:
            continue
        raw = environ[var]
        if kind == "str":
            setattr(cfg, field, raw)
        elif kind == "flag1":
            setattr(cfg, field, raw == "1")
        elif kind == "bool01":
            if raw not in ("0", "1"):
                problems.append(f"{var} must be 0 or 1, got {raw!r}")
            setattr(cfg, field, raw == "1")
        elif kind == "json_flag":
            if raw not in ("json", "text"):
                problems.append(f"{var} must be json or text, got {raw!r}")
            setattr(cfg, field, raw == "json")
        elif kind == "pathlist":
            setattr(cfg, field, [p for p in raw.split(os.pathsep) if p])
        elif kind == "posint":
            try:
                value = int(raw)
                if value <= 0:
                    raise ValueError
                setattr(cfg, field, value)
            except ValueError:
                problems.append(f"{var} must be a positive integer, got {raw!r}")
        elif kind == "count":
            try:
                value = int(raw)
                if value < 0:
                    raise ValueError
                setattr(cfg, field, value)
            except ValueError:
                problems.append(f"{var} must be 0 or a positive integer, got {raw!r}")
        elif kind == "ratio":
            try:
                value = float(raw)
                if not 0 <= value <= 1:
                    raise ValueError
                setattr(cfg, field, value)
            except ValueError:
                problems.append(f"{var} must be a number from 0 to 1, got {raw!r}")
        elif kind == "nonneg_secs":
            try:
                value = float(raw)
                if not 0 <= value < float("inf"):
                    raise ValueError
                setattr(cfg, field, value)
            except ValueError:
                problems.append(f"{var} must be 0 or a positive number of seconds, got {raw!r}")
        elif kind == "secs":
            # As the reference: an unusable value falls back to the default (with a warning).
            try:
                value = float(raw)
                if not 0 < value < float("inf"):
                    raise ValueError
                setattr(cfg, field, value)
            except ValueError:
                cfg.warnings.append(f"{var}={raw!r} is not a positive number of seconds; "
                                    f"using the default {getattr(cfg, field):g}")
    for field, value in (overrides or {}).items():
        if value is not None:
            setattr(cfg, field, value)
    problems.extend(_validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate(cfg: Config) -> list[str]:
    problems = []
    if parse_bind_addr(cfg.bind_addr) is None:
        problems.append(f"MACP_BIND_ADDR must be an IP address and port such as 127.0.0.1:50051 or [::1]:50051, "
                        f"got {cfg.bind_addr!r}")
    for label, path in (("MACP_TLS_CERT_PATH", cfg.tls_cert_path), ("MACP_TLS_KEY_PATH", cfg.tls_key_path)):
        if path and not os.path.isfile(path):
            problems.append(f"{label} points to {path!r}, which does not exist")
    if cfg.metrics_addr and parse_bind_addr(cfg.metrics_addr) is None:
        problems.append(f"MACP_METRICS_ADDR must be an IP address and port such as 127.0.0.1:9464, "
                        f"got {cfg.metrics_addr!r}")
    if cfg.console_addr and parse_bind_addr(cfg.console_addr) is None:
        problems.append(f"MACP_CONSOLE_ADDR must be an IP address and port such as 127.0.0.1:50080, "
                        f"got {cfg.console_addr!r}")
    if cfg.storage_backend not in ("file", "postgres"):
        problems.append(f"unknown storage backend: {cfg.storage_backend}. Valid: file, postgres")
    elif cfg.storage_backend == "postgres":
        if not cfg.database_url:
            problems.append("MACP_STORAGE_BACKEND=postgres needs MACP_DATABASE_URL "
                            "(e.g. postgresql://macp@127.0.0.1:5432/macp)")
        if cfg.memory_only:
            problems.append("MACP_MEMORY_ONLY=1 and MACP_STORAGE_BACKEND=postgres exclude each other")
    if cfg.database_pool_size <= 0:
        problems.append("database_pool_size must be a positive integer")
    for d in cfg.specs_dirs:
        if not os.path.isdir(d):
            problems.append(f"specs directory {d!r} does not exist")
    for name in ("max_payload_bytes", "session_start_limit_per_minute", "message_limit_per_minute", "workers",
                 "max_streams", "max_name_length", "max_reason_bytes"):
        if getattr(cfg, name) <= 0:
            problems.append(f"{name} must be a positive integer")
    for name in ("cleanup_interval_secs", "session_retention_secs"):
        if not getattr(cfg, name) > 0:
            problems.append(f"{name} must be a positive number of seconds")
    if cfg.max_streams_per_identity < 0 or cfg.clock_skew_ms < 0:
        problems.append("max_streams_per_identity and clock_skew_ms must be 0 or positive integers")
    if cfg.checkpoint_interval < 0:
        problems.append("checkpoint_interval must be 0 or a positive integer")
    if cfg.wal_segment_bytes <= 0:
        problems.append("wal_segment_bytes must be a positive integer")
    if not 0 <= cfg.compact_dead_ratio <= 1:
        problems.append("compact_dead_ratio must be a number from 0 to 1")
    from ..registries.profile import PROFILES
    if cfg.protocol_profile not in PROFILES:
        problems.append(f"MACP_PROTOCOL_PROFILE must be one of {', '.join(sorted(PROFILES))}, "
                        f"got {cfg.protocol_profile!r}")
    if cfg.policies_dry_run and not cfg.policies_dir:
        problems.append("MACP_POLICIES_DRY_RUN=1 needs MACP_POLICIES_DIR")
    if cfg.list_sessions_default_page_size > cfg.list_sessions_max_page_size:
        problems.append("MACP_LIST_SESSIONS_DEFAULT_PAGE_SIZE must not exceed MACP_LIST_SESSIONS_MAX_PAGE_SIZE")
    if not cfg.receipt_issuer:
        problems.append("MACP_RECEIPT_ISSUER must not be empty")
    if cfg.receipt_signing_key_file and not os.path.isfile(cfg.receipt_signing_key_file):
        problems.append(f"MACP_RECEIPT_SIGNING_KEY_FILE points to {cfg.receipt_signing_key_file!r}, "
                        "which does not exist")
    if cfg.log_level.lower() not in ("debug", "info", "warning", "error"):
        problems.append(f"log level must be debug, info, warning or error, got {cfg.log_level!r}")
    return problems


def is_loopback(addr: str) -> bool:
    parsed = parse_bind_addr(addr)
    return parsed is not None and ipaddress.ip_address(parsed[0]).is_loopback


def parse_bind_addr(addr: str) -> tuple[str, int] | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            if ipaddress.ip_address(host).version != 6:
                return None
        except ValueError:
            return None
    else:
        try:
            if ipaddress.ip_address(host).version != 4:
                return None
        except ValueError:
            return None
    return host, int(port)
