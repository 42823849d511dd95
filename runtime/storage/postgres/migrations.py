"""The PostgreSQL schema, as numbered migrations applied by the runtime at start-up.

`migrate(conn)` runs in one transaction under an advisory lock, so instances starting together apply
each migration exactly once; `macp_schema_migrations` records what was applied. A database migrated
by a newer runtime (a version this one does not know) is refused rather than used.

Tables:
* `macp_sessions`: one row per session id: the current incarnation (1, 2, … each SessionStart of a
  reused id begins the next) and how many records it has. Every append updates this row in the same
  statement as it inserts the record, conditionally on the length the writer expects: the row lock
  serialises appends of one session across instances and a stale writer finds 0 rows.
* `macp_records`: the serialized `LogRecord`s, keyed (session_id, incarnation, idx) with idx the
  0-based index in the incarnation (gap-free by construction); message ids are unique per incarnation.
  Migration 1 had an insert trigger NOTIFY `macp_log` per record; migration 2 drops it, because a
  transaction that NOTIFYs holds a database-wide lock through its commit (WAL flush included), which
  serialised every append. The store now NOTIFYs after commit, in batches (storage/postgres.py).
* `macp_documents`: registry documents (policies, modes, archived specs) as JSON text with a version.
"""
from __future__ import annotations

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "sessions, records, documents, record notifications", """
CREATE TABLE macp_sessions (
    session_id  text PRIMARY KEY,
    incarnation integer NOT NULL,
    length      integer NOT NULL,
    ord         bigint GENERATED ALWAYS AS IDENTITY,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX macp_sessions_ord ON macp_sessions (ord);

CREATE TABLE macp_records (
    session_id   text NOT NULL,
    incarnation  integer NOT NULL,
    idx          integer NOT NULL,
    message_id   text NOT NULL,
    message_type text NOT NULL,
    record       bytea NOT NULL,
    PRIMARY KEY (session_id, incarnation, idx)
);
CREATE UNIQUE INDEX macp_records_message_id ON macp_records (session_id, incarnation, message_id)
    WHERE message_id <> '';

CREATE FUNCTION macp_notify_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('macp_log', NEW.session_id || ' ' || NEW.incarnation || ' ' || NEW.idx);
    RETURN NULL;
END $$;
CREATE TRIGGER macp_records_notify AFTER INSERT ON macp_records
    FOR EACH ROW EXECUTE FUNCTION macp_notify_record();

CREATE TABLE macp_documents (
    name       text PRIMARY KEY,
    body       text NOT NULL,
    version    bigint NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT now()
);
"""),
    (2, "notify after commit, not from a trigger inside the append", """
DROP TRIGGER macp_records_notify ON macp_records;
DROP FUNCTION macp_notify_record();
"""),
]

_LOCK_KEY = 0x4D414350   # "MACP": the advisory lock that serialises migrations across instances


class MigrationError(Exception):
    pass


def migrate(conn) -> list[int]:
    """Apply the missing migrations on `conn` (a psycopg connection). Returns the versions applied."""
    applied_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        conn.execute("""CREATE TABLE IF NOT EXISTS macp_schema_migrations (
                            version    integer PRIMARY KEY,
                            name       text NOT NULL,
                            applied_at timestamptz NOT NULL DEFAULT now())""")
        done = {row[0] for row in conn.execute("SELECT version FROM macp_schema_migrations")}
        known = {version for version, _, _ in MIGRATIONS}
        unknown = sorted(done - known)
        if unknown:
            raise MigrationError(f"the database has schema version(s) {unknown} that this runtime does not know "
                                 f"(it knows up to {max(known)}): it was migrated by a newer runtime")
        for version, name, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO macp_schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            applied_now.append(version)
    return applied_now
