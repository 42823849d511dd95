"""The PostgreSQL store: session histories and registry documents shared by several runtime instances.

Selected with MACP_STORAGE_BACKEND=postgres and MACP_DATABASE_URL. Driver psycopg 3 (sync, like the
gRPC server's threads) with a psycopg_pool connection pool; every call borrows a connection for one
statement in autocommit mode, so one append is one round trip and one transaction.

Shared use (`shared = True`): any instance may append to any session, so the engine passes the length
it believes the session has: `append(record, expect=(incarnation, length))`. The append is one
statement that bumps the session row only if it still has that incarnation and length, and inserts
the record in the same transaction; a writer that is behind gets `AppendConflict` (nothing written),
reads what it missed with `since()`, and judges again. The record's (session_id, incarnation,
message_id) key is unique, so a message id can never be stored twice even by a writer that forgot to
look. See pg_migrations.py for the tables.

After each append commits, "session_id incarnation idx" is queued for the `macp_log` channel; one
notifier thread sends whatever is queued as one statement (NOTIFY inside the append would hold
PostgreSQL's notify lock through the commit's WAL flush and serialise all appends). The notifications
only wake other instances, which then read the log by index; one lost with a crash between commit and
notify is made up by the next notification of that session or by their periodic re-read.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from typing import Iterator

from ..base import AppendConflict, DocumentStore, RecoveryReport, SharedStore, StorageError, starts_incarnation
from ..records_pb2 import ENTRY_KIND_INCOMING, LogRecord

log = logging.getLogger(__name__)

LOG_CHANNEL = "macp_log"              # NOTIFY per inserted record (trigger): "session_id incarnation idx"
REGISTRY_CHANNEL = "macp_registry"    # NOTIFY per saved document: "name origin"

_APPEND_EXPECTED = """
WITH s AS (
    UPDATE macp_sessions SET length = length + 1
    WHERE session_id = %(sid)s AND incarnation = %(inc)s AND length = %(len)s
    RETURNING incarnation, length - 1 AS idx)
INSERT INTO macp_records (session_id, incarnation, idx, message_id, message_type, record)
SELECT %(sid)s, s.incarnation, s.idx, %(mid)s, %(mtype)s, %(rec)s FROM s
RETURNING incarnation, idx"""

_START_FIRST = """
WITH s AS (
    INSERT INTO macp_sessions (session_id, incarnation, length) VALUES (%(sid)s, 1, 1)
    ON CONFLICT (session_id) DO NOTHING
    RETURNING incarnation)
INSERT INTO macp_records (session_id, incarnation, idx, message_id, message_type, record)
SELECT %(sid)s, s.incarnation, 0, %(mid)s, %(mtype)s, %(rec)s FROM s
RETURNING incarnation, idx"""

_START_NEXT = """
WITH s AS (
    UPDATE macp_sessions SET incarnation = incarnation + 1, length = 1
    WHERE session_id = %(sid)s AND incarnation = %(inc)s AND length = %(len)s
    RETURNING incarnation)
INSERT INTO macp_records (session_id, incarnation, idx, message_id, message_type, record)
SELECT %(sid)s, s.incarnation, 0, %(mid)s, %(mtype)s, %(rec)s FROM s
RETURNING incarnation, idx"""

# Unconditional appends (the plain Store contract, for a single writer).
_APPEND_ANY = """
WITH s AS (
    INSERT INTO macp_sessions AS t (session_id, incarnation, length) VALUES (%(sid)s, 1, 1)
    ON CONFLICT (session_id) DO UPDATE SET length = t.length + 1
    RETURNING t.incarnation, t.length - 1 AS idx)
INSERT INTO macp_records (session_id, incarnation, idx, message_id, message_type, record)
SELECT %(sid)s, s.incarnation, s.idx, %(mid)s, %(mtype)s, %(rec)s FROM s
RETURNING incarnation, idx"""

_START_ANY = """
WITH s AS (
    INSERT INTO macp_sessions AS t (session_id, incarnation, length) VALUES (%(sid)s, 1, 1)
    ON CONFLICT (session_id) DO UPDATE SET incarnation = t.incarnation + 1, length = 1
    RETURNING t.incarnation)
INSERT INTO macp_records (session_id, incarnation, idx, message_id, message_type, record)
SELECT %(sid)s, s.incarnation, 0, %(mid)s, %(mtype)s, %(rec)s FROM s
RETURNING incarnation, idx"""

_SINCE = """
SELECT incarnation, record FROM macp_records
WHERE session_id = %s AND (incarnation > %s OR (incarnation = %s AND idx >= %s))
ORDER BY incarnation, idx"""

_LATEST = """
SELECT r.incarnation, r.record FROM macp_records r JOIN macp_sessions s USING (session_id, incarnation)
WHERE s.session_id = %s ORDER BY r.idx"""


def _import_driver():
    try:
        import psycopg
        import psycopg_pool
    except ImportError:
        raise StorageError("MACP_STORAGE_BACKEND=postgres needs the postgres extra: "
                           "pip install 'macp-runtime[postgres]' (psycopg[binary], psycopg-pool)") from None
    return psycopg, psycopg_pool


class PostgresStore(SharedStore):
    durable = True
    shared = True

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 10.0):
        if not url:
            raise StorageError("MACP_DATABASE_URL is required with MACP_STORAGE_BACKEND=postgres")
        self.url = url
        self.pool_size = max(2, pool_size)
        self.connect_timeout = connect_timeout
        self.pool = None
        self._psycopg = None
        self._closed = False
        #: statements sent (each one round trip), for benchmarks and tests
        self.round_trips = 0
        self._notes: list[str] = []
        self._notes_cond = threading.Condition(threading.Lock())
        self._notifier: threading.Thread | None = None

    # --- life cycle ------------------------------------------------------------------------------

    def open(self) -> RecoveryReport:
        psycopg, psycopg_pool = _import_driver()
        self._psycopg = psycopg
        from .migrations import MigrationError, migrate

        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=int(self.connect_timeout)) as conn:
                applied = migrate(conn)
                sessions, records = conn.execute(
                    "SELECT count(*), coalesce(sum(length), 0) FROM macp_sessions").fetchone()
        except MigrationError as exc:
            raise StorageError(str(exc)) from None
        except psycopg.Error as exc:
            raise StorageError(f"cannot open the PostgreSQL database: {_describe(exc)}") from None
        if applied:
            log.info("postgres: schema migrations %s applied", applied)
        self.pool = psycopg_pool.ConnectionPool(self.url, min_size=2, max_size=self.pool_size, open=False,
                                                kwargs={"autocommit": True}, timeout=self.connect_timeout,
                                                name="macp-store")
        try:
            self.pool.open(wait=True, timeout=self.connect_timeout)
        except Exception as exc:
            raise StorageError(f"cannot open the connection pool: {exc}") from None
        self._notifier = threading.Thread(target=self._notify_loop, name="pg-notify", daemon=True)
        self._notifier.start()
        return RecoveryReport(sessions=sessions, records=int(records))

    def close(self) -> None:
        if self._closed:
            return
        with self._notes_cond:
            self._closed = True
            self._notes_cond.notify()
        if self._notifier is not None:
            self._notifier.join(5)
        if self.pool is not None:
            self.pool.close()

    def _notify_loop(self) -> None:
        """Send queued record notifications, everything queued at once, until closed (then flush)."""
        while True:
            with self._notes_cond:
                while not self._notes and not self._closed:
                    self._notes_cond.wait()
                notes, self._notes = self._notes, []
                closed = self._closed
            if notes:
                try:
                    with self.pool.connection() as conn:
                        self.round_trips += 1
                        conn.execute("SELECT pg_notify(%s, n) FROM unnest(%s::text[]) AS n", (LOG_CHANNEL, notes))
                except Exception as exc:   # others catch up at their next notification or re-read
                    log.warning("postgres: %d record notifications not sent: %s", len(notes), exc)
            if closed:
                return

    @contextlib.contextmanager
    def _conn(self):
        if self.pool is None or self._closed:
            raise StorageError("store is not open")
        try:
            with self.pool.connection() as conn:
                yield conn
        except StorageError:
            raise
        except AppendConflict:
            raise
        except self._psycopg.Error as exc:
            raise StorageError(f"PostgreSQL: {_describe(exc)}") from None
        except Exception as exc:   # pool timeout, closed pool
            raise StorageError(f"PostgreSQL connection pool: {exc}") from None

    def notify(self, channel: str, payload: str) -> None:
        """NOTIFY `channel` now (one round trip; the notification bus's outgoing signals)."""
        with self._conn() as conn:
            self.round_trips += 1
            conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))

    def _query(self, sql: str, params=None) -> list[tuple]:
        with self._conn() as conn:
            self.round_trips += 1
            return conn.execute(sql, params).fetchall()

    # --- appends ---------------------------------------------------------------------------------

    def append(self, record: LogRecord, expect: tuple[int, int] | None = None) -> int:
        """Append and return the record's index in its incarnation.

        `expect=(incarnation, length)`: only if the session still is at that incarnation and length
        (for a SessionStart: the incarnation it replaces, (0, 0) when the id was never used); the new
        incarnation is then `incarnation + 1`. Otherwise AppendConflict and nothing is written.
        Without `expect` the append is unconditional (a single writer)."""
        start = starts_incarnation(record)
        params = {"sid": record.session_id, "mid": record.message_id if record.kind == ENTRY_KIND_INCOMING else "",
                  "mtype": record.message_type, "rec": record.SerializeToString()}
        if expect is None:
            sql = _START_ANY if start else _APPEND_ANY
        else:
            params["inc"], params["len"] = expect
            sql = (_START_FIRST if expect[0] == 0 else _START_NEXT) if start else _APPEND_EXPECTED
        psycopg = self._psycopg
        with self._conn() as conn:
            self.round_trips += 1
            try:
                row = conn.execute(sql, params, prepare=True).fetchone()
            except psycopg.errors.UniqueViolation:
                if expect is None:
                    raise StorageError(f"message id {record.message_id!r} is already stored for session "
                                       f"{record.session_id!r}") from None
                raise AppendConflict(record.session_id) from None
        if row is None:
            raise AppendConflict(record.session_id)
        incarnation, index = row
        with self._notes_cond:
            self._notes.append(f"{record.session_id} {incarnation} {index}")
            self._notes_cond.notify()
        return index

    # --- reads -----------------------------------------------------------------------------------

    def load(self, session_id: str) -> tuple[int, list[LogRecord]] | None:
        """(incarnation, records) of the session's latest incarnation, or None when the id is unknown."""
        rows = self._query(_LATEST, (session_id,))
        if not rows:
            return None
        return rows[0][0], [LogRecord.FromString(r[1]) for r in rows]

    def since(self, session_id: str, incarnation: int, length: int) -> tuple[int, list[LogRecord], bool]:
        """What a reader at (incarnation, length) missed: (incarnation, records, replaced). Records of
        the same incarnation from index `length` on; when a newer incarnation exists, all its records
        and replaced=True."""
        rows = self._query(_SINCE, (session_id, incarnation, incarnation, length))
        if not rows:
            return incarnation, [], False
        newest = rows[-1][0]
        if newest == incarnation:
            return incarnation, [LogRecord.FromString(r[1]) for r in rows], False
        return newest, [LogRecord.FromString(r[1]) for r in rows if r[0] == newest], True

    def history(self, session_id: str) -> list[LogRecord]:
        loaded = self.load(session_id)
        return loaded[1] if loaded else []

    def history_upto(self, session_id: str, incarnation: int, length: int) -> list[LogRecord]:
        rows = self._query("SELECT record FROM macp_records WHERE session_id = %s AND incarnation = %s "
                           "AND idx < %s ORDER BY idx", (session_id, incarnation, length))
        return [LogRecord.FromString(r[0]) for r in rows]

    def overview(self) -> list[tuple[str, int, int]]:
        """(session_id, incarnation, length) of every session, in first-append order."""
        return [tuple(r) for r in self._query(
            "SELECT session_id, incarnation, length FROM macp_sessions ORDER BY ord")]

    def load_many(self, session_ids: list[str]) -> dict[str, tuple[int, list[LogRecord]]]:
        out: dict[str, tuple[int, list[LogRecord]]] = {}
        if not session_ids:
            return out
        rows = self._query("SELECT r.session_id, r.incarnation, r.record FROM macp_records r "
                           "JOIN macp_sessions s USING (session_id, incarnation) "
                           "WHERE s.session_id = ANY(%s) ORDER BY r.session_id, r.idx", (list(session_ids),))
        for sid, inc, raw in rows:
            out.setdefault(sid, (inc, []))[1].append(LogRecord.FromString(raw))
        return out

    def replay(self) -> Iterator[tuple[str, list[LogRecord]]]:
        for session_id, _incarnation, records in self.replay_shared():
            yield session_id, records

    def replay_shared(self) -> Iterator[tuple[str, int, list[LogRecord]]]:
        """Every session's latest incarnation: (session_id, incarnation, records), first-append order."""
        current: str | None = None
        incarnation = 0
        records: list[LogRecord] = []
        with self._conn() as conn:
            self.round_trips += 1
            with conn.transaction(), conn.cursor(name="macp_replay") as cur:
                cur.itersize = 2000
                cur.execute("SELECT s.session_id, s.incarnation, r.record FROM macp_sessions s "
                            "JOIN macp_records r USING (session_id, incarnation) ORDER BY s.ord, r.idx")
                for sid, inc, raw in cur:
                    if sid != current:
                        if current is not None:
                            yield current, incarnation, records
                        current, incarnation, records = sid, inc, []
                    records.append(LogRecord.FromString(raw))
        if current is not None:
            yield current, incarnation, records

    def release(self, session_id: str) -> None:
        """Nothing is kept in memory per session; the rows stay (other instances may still use them)."""

    # --- registry documents ----------------------------------------------------------------------

    def documents(self) -> "PostgresDocuments":
        return PostgresDocuments(self)


class PostgresDocuments(DocumentStore):
    """Registry documents in `macp_documents`, shared by every instance.

    `save` NOTIFYs `macp_registry` ("name origin") in the same transaction, so other instances reload
    (runtime/storage/postgres/bus.py). `locked(name)` runs a read-modify-write as one transaction under an advisory
    lock, so two instances changing one registry at once cannot lose either change."""

    durable = True
    shared = True

    def __init__(self, store: PostgresStore):
        self.store = store
        self.origin = uuid.uuid4().hex[:12]
        self._tx = threading.local()

    @staticmethod
    def _check(name: str) -> None:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad document name {name!r}")

    @contextlib.contextmanager
    def _conn(self):
        conn = getattr(self._tx, "conn", None)
        if conn is not None:
            yield conn
            return
        with self.store._conn() as conn:
            yield conn

    def load(self, name: str):
        self._check(name)
        with self._conn() as conn:
            self.store.round_trips += 1
            row = conn.execute("SELECT body FROM macp_documents WHERE name = %s", (name,)).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError as exc:
            raise StorageError(f"document {name!r} in the database is damaged: {exc}") from None

    def save(self, name: str, doc) -> None:
        self._check(name)
        body = json.dumps(doc, ensure_ascii=False, sort_keys=True)
        with self._conn() as conn:
            self.store.round_trips += 1
            conn.execute("""
                WITH u AS (
                    INSERT INTO macp_documents AS d (name, body) VALUES (%(name)s, %(body)s)
                    ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, version = d.version + 1,
                                                     updated_at = now()
                    RETURNING version)
                SELECT pg_notify(%(channel)s, %(payload)s) FROM u""",
                         {"name": name, "body": body, "channel": REGISTRY_CHANNEL,
                          "payload": f"{name} {self.origin}"})

    @contextlib.contextmanager
    def locked(self, name: str):
        """Serialise read-modify-write of `name` across instances: load/save inside use one transaction."""
        self._check(name)
        if getattr(self._tx, "conn", None) is not None:
            yield
            return
        with self.store._conn() as conn:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("macp_documents:" + name,))
                self._tx.conn = conn
                try:
                    yield
                finally:
                    self._tx.conn = None


def _describe(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
