"""Start-up configuration: THE option table. Each setting is declared once, below, as a field of `Config`
(runtime/app/options.py explains `option`); the environment, the `serve` flags, `--help` and the README's
Configuration and Authentication tables are all read from it (`macp-runtime config --markdown` prints
the tables; tests/test_options.py fails when the README's copy differs).

Every problem is collected and reported together; the daemon then exits without serving. A flag wins
over its variable.
"""
from __future__ import annotations

import dataclasses
import os

from ..vocabulary.logs import mask
from . import options
from .options import (
    BOOL01,
    COUNT,
    FILE,
    NOT_EMPTY,
    PATHS,
    POSITIVE,
    RATIO,
    SECONDS,
    SECONDS_OR_0,
    SWITCH,
    TEXT,
    Kind,
    address,
    choice,
    is_loopback,  # noqa: F401  (re-exported: the daemon checks its bind address with it)
    option,
    parse_bind_addr,  # noqa: F401  (re-exported: the console parses its address with it)
)

DEFAULT_BIND = "127.0.0.1:50051"
LOG_FORMAT = Kind(lambda raw: choice("json", "text").convert(raw) == "json", "json or text", flag="switch", const=True,
                  env_value="json")
AUTH_PREFIX = "MACP_AUTH_"


@dataclasses.dataclass
class Config:
    # --- serve: the Configuration table, in the README's order -----------------------------------------
    bind_addr: str = option(
        "MACP_BIND_ADDR", address("127.0.0.1:50051 or [::1]:50051"), DEFAULT_BIND, flag="--bind", metavar="IP:PORT",
        help="listen address: an IP literal and port (`[::1]:50051` for IPv6)")
    allow_insecure: bool = option(
        "MACP_ALLOW_INSECURE", SWITCH, False, flag="--allow-insecure",
        help="serve plaintext when no TLS certificate and key are configured (`scripts/serve` sets it)")
    tls_cert_path: str | None = option(
        "MACP_TLS_CERT_PATH", FILE, None, flag="--tls-cert", metavar="PEM",
        help="PEM server certificate; with `MACP_TLS_KEY_PATH` the server speaks TLS only")
    tls_key_path: str | None = option(
        "MACP_TLS_KEY_PATH", FILE, None, flag="--tls-key", metavar="PEM",
        help="PEM private key of that certificate")
    data_dir: str = option(
        "MACP_DATA_DIR", TEXT, ".macp-data", flag="--data-dir", metavar="DIR",
        help="where the durable log lives")
    memory_only: bool = option(
        "MACP_MEMORY_ONLY", SWITCH, False, flag="--memory-only",
        help="keep everything in memory; nothing survives a restart")
    storage_backend: str = option(
        "MACP_STORAGE_BACKEND", choice("file", "postgres", message=lambda name, raw: (
            f"{name}: unknown storage backend: {raw}. Valid: file, postgres")),
        "file", flag="--storage-backend",
        help="where sessions and registries live: `file` is the embedded durable log; `postgres` a PostgreSQL "
             "database shared by several instances (see *Several instances on PostgreSQL*)")
    database_url: str | None = option(
        "MACP_DATABASE_URL", TEXT, None, flag="--database-url", metavar="URL",
        help="the PostgreSQL database of `postgres`, a libpq URL such as `postgresql://macp@127.0.0.1:5432/macp` "
             "(its password is masked in the log)")
    database_pool_size: int = option(
        "MACP_DATABASE_POOL_SIZE", POSITIVE, 10, flag="--database-pool-size", metavar="N",
        help="PostgreSQL connections per instance (one more listens for the other instances' changes)")
    strict_recovery: bool = option(
        "MACP_STRICT_RECOVERY", SWITCH, False, flag="--strict-recovery",
        help="refuse to start if any stored session fails to replay")
    checkpoint_interval: int = option(
        "MACP_CHECKPOINT_INTERVAL", COUNT, 0, flag="--checkpoint-interval", metavar="N", default_doc="`0` (off)",
        help="also checkpoint an open session whenever its log length reaches a multiple of N, so a restart "
             "replays less (see *Durability*)")
    wal_segment_bytes: int = option(
        "MACP_WAL_SEGMENT_BYTES", POSITIVE, 64 * 1024 * 1024, flag="--wal-segment-bytes", metavar="N",
        help="file backend: a new log segment once one reaches this size (only sealed segments are compacted)")
    compact_dead_ratio: float = option(
        "MACP_COMPACT_DEAD_RATIO", RATIO, 0.5, flag="--compact-dead-ratio", metavar="R",
        help="file backend: rewrite a sealed segment once this share of its records is covered by checkpoints; "
             "`0` = never compact")
    history_retention_secs: float = option(
        "MACP_HISTORY_RETENTION_SECS", SECONDS_OR_0, 0.0, flag="--history-retention", metavar="SECS",
        default_doc="`0`",
        help="file backend: compaction keeps a terminal session's whole history this many seconds after it "
             "ended, so `WhatIfReplay` can still replay it (see *What-if replay*)")
    max_payload_bytes: int = option(
        "MACP_MAX_PAYLOAD_BYTES", POSITIVE, 1_048_576, flag="--max-payload-bytes", metavar="N",
        help="largest envelope payload (`PAYLOAD_TOO_LARGE` above)")
    session_start_limit_per_minute: int = option(
        "MACP_SESSION_START_LIMIT_PER_MINUTE", POSITIVE, 60, flag="--session-start-limit", metavar="N",
        help="SessionStarts per sender per sliding minute (`RATE_LIMITED`)")
    message_limit_per_minute: int = option(
        "MACP_MESSAGE_LIMIT_PER_MINUTE", POSITIVE, 600, flag="--message-limit", metavar="N",
        help="other messages per sender per sliding minute")
    specs_dirs: list[str] = option(
        "MACP_SPECS_DIR", PATHS, [], flag="--specs-dir", metavar="DIR",
        help="extra directories of mode specs (`*.yaml`; the variable is `:`-separated, the flag repeats)")
    workers: int = option(
        "MACP_WORKERS", POSITIVE, 64, flag="--workers", metavar="N",
        help="threads for kernel calls that block (PostgreSQL round trips, the rarer RPCs that may write with "
             "the file store); every RPC runs on one asyncio event loop, and Send/StreamSession with the memory "
             "or the file store call the kernel on the loop itself (the file store's commit point is awaited, "
             "see *Threads*)")
    max_streams: int = option(
        "MACP_MAX_STREAMS", POSITIVE, 10000, flag="--max-streams", metavar="N",
        help="open streams at most (StreamSession and every `Watch*`); a stream is a coroutine with bounded "
             "queues, not a thread (see *Streams and memory*); one more is refused with `RESOURCE_EXHAUSTED`")
    max_streams_per_identity: int = option(
        "MACP_MAX_STREAMS_PER_IDENTITY", COUNT, 0, flag="--max-streams-per-identity", metavar="N",
        default_doc="`0` = half of `MACP_MAX_STREAMS`",
        help="open streams one identity (sender) may hold; one more is refused with `RESOURCE_EXHAUSTED` "
             "naming the setting, so no caller can take every slot")
    max_name_length: int = option(
        "MACP_MAX_NAME_LENGTH", POSITIVE, 256, flag="--max-name-length", metavar="N",
        help="longest session id, message id, mode, message type and sender of an envelope (`INVALID_ENVELOPE` "
             "above); mode names at registration are capped the same way")
    max_reason_bytes: int = option(
        "MACP_MAX_REASON_BYTES", POSITIVE, 4096, flag="--max-reason-bytes", metavar="N",
        help="longest `reason` of CancelSession, SuspendSession and ResumeSession (`INVALID_ENVELOPE` above)")
    clock_skew_ms: int = option(
        "MACP_CLOCK_SKEW_MS", COUNT, 30_000, flag="--clock-skew-ms", metavar="MS",
        help="how far an envelope's `timestamp_unix_ms` may move a session's TTL start away from the server's "
             "receive time (deadlines come from the server's clock)")
    dev_mode_allow_remote: bool = option(
        "MACP_DEV_MODE_ALLOW_REMOTE", SWITCH, False, flag="--dev-mode-allow-remote",
        help="let dev-mode auth (no `MACP_AUTH_*` set) serve on a non-loopback address, where anyone who can "
             "connect may then act as anyone; without it start-up refuses")
    cleanup_interval_secs: float = option(
        "MACP_CLEANUP_INTERVAL_SECS", SECONDS, 60.0, flag="--cleanup-interval", metavar="SECS",
        help="period of the background pass that expires overdue sessions and evicts old ones (first pass at "
             "start-up; fractions allowed; an unusable variable falls back to the default with a warning)")
    session_retention_secs: float = option(
        "MACP_SESSION_RETENTION_SECS", SECONDS, 3600.0, flag="--session-retention", metavar="SECS",
        help="RESOLVED/EXPIRED sessions that *started* longer ago than this leave memory at the next pass")
    log_level: str = option(
        "MACP_LOG_LEVEL", choice("debug", "info", "warning", "error", fold=True, message=lambda name, raw: (
            f"{name} must be debug, info, warning or error, got {raw!r}")),
        "info", flag="--log-level",
        help="log verbosity: `debug`, `info`, `warning`, `error`")
    log_json: bool = option(
        "MACP_LOG_FORMAT", LOG_FORMAT, False, flag="--log-json", default_doc="`text`",
        help="one JSON object per log line instead of text")
    metrics_addr: str | None = option(
        "MACP_METRICS_ADDR", address("127.0.0.1:9464", optional=True), None, flag="--metrics-addr",
        metavar="IP:PORT", default_doc="unset (off)",
        help="`IP:PORT` of a Prometheus endpoint (`http://IP:PORT/metrics`)")
    console_addr: str | None = option(
        "MACP_CONSOLE_ADDR", address("127.0.0.1:50080", optional=True), None, flag="--console-addr",
        metavar="IP:PORT", default_doc="unset (off; `scripts/serve`: `127.0.0.1:50080`)",
        help="`IP:PORT` of the read-only browser console (`http://IP:PORT/`, see *The console*)")
    reflection: bool | None = option(
        "MACP_REFLECTION", BOOL01, None, flag="--reflection", default_doc="on in dev-mode auth, else off",
        help="gRPC server reflection (`1`/`0`), for `grpcurl list/describe` without proto files")
    protocol_profile: str = option(
        "MACP_PROTOCOL_PROFILE", choice("current", "v0.4.0"), "current", flag="--protocol-profile",
        help="which protocol line to speak: `current` (what macp-sdk-python 0.22 expects) or `v0.4.0` (the "
             "Rust reference v0.4.0, exactly); see *Protocol profiles*")
    list_sessions_default_page_size: int = option(
        "MACP_LIST_SESSIONS_DEFAULT_PAGE_SIZE", POSITIVE, 100,
        help="`current`: ListSessions page size for `page_size` 0 (at most the largest below)")
    list_sessions_max_page_size: int = option(
        "MACP_LIST_SESSIONS_MAX_PAGE_SIZE", POSITIVE, 1000,
        help="`current`: the largest ListSessions page served (a larger `page_size` is clamped to it)")
    receipt_signing_key: str | None = option(
        "MACP_RECEIPT_SIGNING_KEY", TEXT, None, secret=True,
        help="Ed25519 seed (32 bytes, base64url or base64) that signs decision receipts; never logged (see "
             "*Decision receipts*)")
    receipt_signing_key_file: str | None = option(
        "MACP_RECEIPT_SIGNING_KEY_FILE", FILE, None, flag="--receipt-signing-key-file", metavar="FILE",
        help="file with that seed, or a PKCS#8 PEM Ed25519 private key; without either, a key is generated at "
             "first start and kept with the data")
    receipt_key_id: str | None = option(
        "MACP_RECEIPT_KEY_ID", TEXT, None, flag="--receipt-key-id", metavar="KID",
        default_doc="the key's RFC 7638 thumbprint",
        help="`kid` of the configured key")
    receipt_issuer: str = option(
        "MACP_RECEIPT_ISSUER", NOT_EMPTY, "runtime:macp-runtime", flag="--receipt-issuer", metavar="TEXT",
        help="`issuer` member of every receipt")
    policies_dir: str | None = option(
        "MACP_POLICIES_DIR", TEXT, None,
        help="a directory of `*.json` policy files (`{policy_id, mode, description, rules, schema_version}` "
             "each), registered at start-up through RegisterPolicy's admission (the first rejection stops "
             "start-up, naming the file); the policy registry is then read-only (`REGISTRY_READ_ONLY`)")
    policies_dry_run: bool = option(
        "MACP_POLICIES_DRY_RUN", SWITCH, False,
        help="validate every file of `MACP_POLICIES_DIR`, print `OK <file> <policy_id>` or "
             "`REJECTED <file>: <reason>` per file, exit 0/1 without serving")

    # --- auth: the Authentication table; read as they are set, judged by kernel/auth.py --------------
    auth_issuer: str | None = option(
        "MACP_AUTH_ISSUER", TEXT, None, section="auth",
        help="enables **JWT bearer** (with a JWKS below): RS256, ES256 or HS256; `exp` required and `nbf` "
             "honoured (60 s leeway each), `iss` must equal this, `aud` must be or contain the audience, `sub` "
             "(non-blank) is the sender; a `kid` header selects the JWKS key of that `kid`")
    auth_audience: str | None = option(
        "MACP_AUTH_AUDIENCE", TEXT, None, section="auth", default_doc="`macp-runtime`",
        help="expected `aud`")
    auth_jwks_json: str | None = option(
        "MACP_AUTH_JWKS_JSON", TEXT, None, section="auth", secret=True,
        help="inline JWKS (`{\"keys\": [...]}`; `RSA`, `EC` P-256, `oct`); wins over the URL. Without a usable "
             "key start-up fails")
    auth_jwks_url: str | None = option(
        "MACP_AUTH_JWKS_URL", TEXT, None, section="auth",
        help="JWKS fetched on the first well-formed JWT and cached; one fetch at a time, at most 3 s and 1 MiB, "
             "in a thread of its own; while it runs other JWT callers are refused at once; a failed fetch "
             "refuses the request (no stale keys) and is retried only after a back-off (1 s, 2 s, … 60 s)")
    auth_jwks_ttl_secs: str | None = option(
        "MACP_AUTH_JWKS_TTL_SECS", TEXT, None, section="auth", default_doc="`300`",
        help="cache lifetime of the fetched JWKS")
    auth_tokens_json: str | None = option(
        "MACP_AUTH_TOKENS_JSON", TEXT, None, section="auth", secret=True,
        help="**static bearer tokens** (wins over the file): `[{\"token\", \"sender\", ...}]` or "
             "`{\"tokens\": [...]}`")
    auth_tokens_file: str | None = option(
        "MACP_AUTH_TOKENS_FILE", TEXT, None, section="auth",
        help="the same JSON in a file; invalid JSON or an unreadable file aborts start-up")

    # --- not settings ------------------------------------------------------------------------------------
    auth_unknown: list[str] = dataclasses.field(default_factory=list)   # other MACP_AUTH_* variables set
    warnings: list[str] = dataclasses.field(default_factory=list)       # logged at start-up

    def describe(self) -> dict:
        """For the start-up log line: every setting, secrets as `***`, URL passwords masked."""
        out: dict = {}
        for opt in options.declared(Config):
            value = getattr(self, opt.field)
            out[opt.field] = "***" if opt.secret and value else mask(opt.env, value)
        return out


class ConfigError(Exception):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def from_env(environ=None, overrides: dict | None = None) -> Config:
    """Read the variables, apply the flags' values (`overrides`, by field; a flag wins), validate.
    Raises ConfigError with every problem."""
    environ = os.environ if environ is None else environ
    cfg, problems, warnings = options.read(Config, environ, overrides)
    cfg.warnings = warnings
    known = {opt.env for opt in options.declared(Config)}
    cfg.auth_unknown = sorted(k for k in environ if k.startswith(AUTH_PREFIX) and k not in known)
    problems.extend(_validate(cfg))
    if problems:
        raise ConfigError(problems)
    return cfg


def _validate(cfg: Config) -> list[str]:
    """What no single setting can judge alone (each value was checked as it was read)."""
    problems = []
    if cfg.storage_backend == "postgres":
        if not cfg.database_url:
            problems.append("MACP_STORAGE_BACKEND=postgres needs MACP_DATABASE_URL "
                            "(e.g. postgresql://macp@127.0.0.1:5432/macp)")
        if cfg.memory_only:
            problems.append("MACP_MEMORY_ONLY=1 and MACP_STORAGE_BACKEND=postgres exclude each other")
    for d in cfg.specs_dirs:
        if not os.path.isdir(d):
            problems.append(f"specs directory {d!r} does not exist")
    if cfg.policies_dry_run and not cfg.policies_dir:
        problems.append("MACP_POLICIES_DRY_RUN=1 needs MACP_POLICIES_DIR")
    if cfg.list_sessions_default_page_size > cfg.list_sessions_max_page_size:
        problems.append("MACP_LIST_SESSIONS_DEFAULT_PAGE_SIZE must not exceed MACP_LIST_SESSIONS_MAX_PAGE_SIZE")
    return problems
