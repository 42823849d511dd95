"""The PostgreSQL store in-process: migrations, the Store contract, conditional appends, documents."""
from __future__ import annotations

import threading

import pytest

from macp_runtime.storage import ENTRY_KIND_INCOMING, ENTRY_KIND_INTERNAL, LogRecord, StorageError
from macp_runtime.storage.base import AppendConflict


def record(session_id: str, message_type: str, message_id: str = "") -> LogRecord:
    kind = ENTRY_KIND_INCOMING if message_id else ENTRY_KIND_INTERNAL
    return LogRecord(session_id=session_id, kind=kind, message_id=message_id, message_type=message_type)


@pytest.fixture
def store(pg_url):
    from macp_runtime.storage.postgres import PostgresStore

    s = PostgresStore(pg_url, pool_size=4)
    s.open()
    yield s
    s.close()


def test_migrations_are_versioned_applied_once_and_a_newer_schema_is_refused(pg_url):
    import psycopg

    from macp_runtime.storage.postgres.migrations import MIGRATIONS
    from macp_runtime.storage.postgres import PostgresStore

    for _ in range(2):
        s = PostgresStore(pg_url)
        s.open()
        s.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT version FROM macp_schema_migrations ORDER BY version").fetchall()
        assert [r[0] for r in rows] == [v for v, _, _ in MIGRATIONS]
        conn.execute("INSERT INTO macp_schema_migrations (version, name) VALUES (999, 'from the future')")
    with pytest.raises(StorageError, match="newer runtime"):
        PostgresStore(pg_url).open()


def test_unreachable_database_is_a_storage_error():
    from macp_runtime.storage.postgres import PostgresStore

    with pytest.raises(StorageError, match="cannot open"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/none", connect_timeout=2).open()


def test_store_contract_incarnations_and_replay(store):
    assert store.append(record("s1", "SessionStart", "m0")) == 0
    assert store.append(record("s1", "Proposal", "m1")) == 1
    assert store.append(record("s2", "SessionStart", "n0")) == 0
    assert store.append(record("s1", "TtlExpired")) == 2
    assert [r.message_type for r in store.history("s1")] == ["SessionStart", "Proposal", "TtlExpired"]
    # a new incarnation of s1 starts at index 0 and hides the old one
    assert store.append(record("s1", "SessionStart", "m9")) == 0
    assert [r.message_id for r in store.history("s1")] == ["m9"]
    assert [(sid, [r.message_id for r in recs]) for sid, recs in store.replay()] == [("s1", ["m9"]), ("s2", ["n0"])]
    assert store.history("nope") == []
    with pytest.raises(StorageError):
        store.append(record("s2", "Proposal", "n0"))   # a message id is stored once per incarnation


def test_conditional_appends_serialise_writers(store):
    assert store.append(record("s", "SessionStart", "a"), expect=(0, 0)) == 0
    with pytest.raises(AppendConflict):
        store.append(record("s", "SessionStart", "b"), expect=(0, 0))   # the id is taken
    # many writers that all believe the session has one record: exactly one of them appends
    wins, conflicts = [], []
    barrier = threading.Barrier(8)

    def writer(i):
        barrier.wait()
        try:
            wins.append(store.append(record("s", "Proposal", f"p{i}"), expect=(1, 1)))
        except AppendConflict:
            conflicts.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == [1] and len(conflicts) == 7
    incarnation, missed, replaced = store.since("s", 1, 1)
    assert (incarnation, len(missed), replaced) == (1, 1, False)
    with pytest.raises(AppendConflict):   # the same message id again, even at the right length
        store.append(record("s", "Proposal", missed[0].message_id), expect=(1, 2))
    assert store.append(record("s", "SessionStart", "c"), expect=(1, 2)) == 0   # the next incarnation
    incarnation, records, replaced = store.since("s", 1, 2)
    assert (incarnation, [r.message_id for r in records], replaced) == (2, ["c"], True)
    assert store.overview() == [("s", 2, 1)]
    assert store.history_upto("s", 2, 1)[0].message_id == "c"


def test_documents_are_shared_and_changes_serialised(store):
    docs, other = store.documents(), store.documents()
    assert docs.load("policies") is None
    docs.save("policies", {"n": 0})
    assert other.load("policies") == {"n": 0}

    def bump():
        for _ in range(10):
            with other.locked("policies"):
                doc = other.load("policies")
                other.save("policies", {"n": doc["n"] + 1})

    threads = [threading.Thread(target=bump) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert docs.load("policies") == {"n": 30}    # no lost update
