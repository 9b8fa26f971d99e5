"""Connection discipline: the SQLite version, pragmas, refusals that leave the file
untouched, lifecycle, one instance shared by threads, schema upgrades. (Where files live
and their permissions: tests/museum/test_09_files_and_permissions.py.)"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import apsw
import pytest

from sessiondb import (
    ConfigurationError, DatabaseOpenError, SchemaTooNewError, SessionDB,
)
from sessiondb.connection import (
    MIN_SQLITE_VERSION, check_sqlite_version, sqlite_version,
)
from sessiondb.schema import SCHEMA_VERSION


def fingerprint(path: Path) -> tuple[str, int, int]:
    st = os.stat(path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns


def files_next_to(path: Path) -> set[str]:
    return {p.name for p in path.parent.iterdir()}


# -- pragmas -------------------------------------------------------------------------


def test_connection_pragmas(db: SessionDB):
    conn = db._engine._conn
    assert conn.pragma("journal_mode") == "wal"
    assert conn.pragma("synchronous") == 2  # FULL: durability="full", the default
    assert conn.pragma("fullfsync") == 1    # (macOS: a sync that reaches the platter)
    assert conn.pragma("foreign_keys") == 1
    assert conn.pragma("mmap_size") == 0
    assert conn.pragma("wal_autocheckpoint") == 0  # checkpoints are ours
    assert conn.pragma("journal_size_limit") == 8 * 1024 * 1024
    assert conn.pragma("auto_vacuum") == 2  # incremental: prune gives space back
    assert conn.pragma("user_version") == SCHEMA_VERSION
    assert 0 < conn.pragma("busy_timeout") <= 1000  # short: long waits queue in the gate


def test_auto_vacuum_is_set_only_on_a_brand_new_file(tmp_path: Path):
    path = tmp_path / "old.db"
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", "wal")  # an empty WAL database: page 1 written, no tables
    conn.close()
    with SessionDB(path) as db:
        assert db._engine._conn.pragma("auto_vacuum") == 0  # could not be turned on any more
        db.create_session("s", "cli")


# -- SQLite version --------------------------------------------------------------------


def test_refuses_sqlite_with_the_wal_reset_bug():
    with pytest.raises(ConfigurationError) as caught:
        check_sqlite_version((3, 51, 2))
    assert "3.51.2" in str(caught.value) and "3.51.3" in str(caught.value)
    with pytest.raises(ConfigurationError):
        check_sqlite_version((3, 7, 0))
    check_sqlite_version((3, 51, 3))
    check_sqlite_version((3, 52, 0))
    check_sqlite_version()
    assert sqlite_version() >= MIN_SQLITE_VERSION


# -- refusals leave the file untouched (more bad files: tests/museum/test_07_bad_files.py)


def refused_untouched(path: Path, error: type[Exception]) -> Exception:
    """Opening ``path`` raises ``error``, and neither the file nor its directory changed."""
    before, names = fingerprint(path), files_next_to(path)
    with pytest.raises(error) as caught:
        SessionDB(path)
    assert fingerprint(path) == before
    assert files_next_to(path) == names
    return caught.value


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_schema_newer_than_the_library(tmp_path: Path, journal: str):
    path = tmp_path / "future.db"
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", journal)
    conn.execute("CREATE TABLE sessions(id); CREATE TABLE from_the_future(x);"
                 "PRAGMA user_version = 99")
    conn.close()
    err = refused_untouched(path, SchemaTooNewError)
    assert isinstance(err, DatabaseOpenError)
    assert err.found == 99 and err.supported == SCHEMA_VERSION


def test_sqlite_database_with_foreign_tables(tmp_path: Path):
    path = tmp_path / "app.db"
    conn = apsw.Connection(str(path))
    conn.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, name TEXT);"
                 "INSERT INTO accounts(name) VALUES ('alice')")
    conn.close()
    assert "accounts" in str(refused_untouched(path, DatabaseOpenError))
    conn = apsw.Connection(str(path))
    assert conn.pragma("journal_mode") == "delete"  # never switched to WAL
    conn.close()


def test_open_busy_while_another_connection_holds_an_exclusive_lock(tmp_path: Path):
    """A store held in an EXCLUSIVE transaction by a connection in exclusive locking
    mode (which locks the file itself, not just the WAL): opening waits (bounded by
    write_timeout) and fails with a typed error."""
    from sessiondb import DatabaseBusyError
    path = tmp_path / "locked.db"
    SessionDB(path).close()
    other = apsw.Connection(str(path))
    other.pragma("locking_mode", "exclusive")
    other.execute("BEGIN EXCLUSIVE; DELETE FROM sessions")
    try:
        with pytest.raises(DatabaseBusyError):
            SessionDB(path, write_timeout=0.3)
    finally:
        other.execute("ROLLBACK")
        other.close()
    with SessionDB(path) as db:
        db.create_session("s", "cli")


# -- lifecycle -------------------------------------------------------------------------


def test_close_is_idempotent_and_final(db_path: Path):
    from sessiondb import ClosedError
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    db.close()
    db.close()
    with pytest.raises(ClosedError):
        db.get_session("s")
    with pytest.raises(ClosedError):
        db.append_message("s", "user", "x")
    with SessionDB(db_path) as again:
        assert again.get_session("s") is not None
    assert again._engine._closed


# -- threads ---------------------------------------------------------------------------


def test_threads_share_one_instance(db: SessionDB):
    threads_n, count = 8, 200
    db.create_session("shared", "threads")
    errors: list[BaseException] = []
    acked: dict[int, list[int]] = {}
    start = threading.Barrier(threads_n)

    def work(n: int) -> None:
        try:
            start.wait(30)
            ids = []
            for i in range(count):
                ids.append(db.append_message("shared", "user", f"t{n}-m{i}"))
                if i % 50 == 0:
                    db.create_session(f"t{n}-s{i}", "threads")
                    db.get_messages("shared", limit=5)
            acked[n] = ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    messages = db.get_messages("shared")
    contents = [m["content"] for m in messages]
    assert sorted(contents) == sorted(f"t{n}-m{i}" for n in range(threads_n)
                                      for i in range(count))
    assert db.get_session("shared")["message_count"] == threads_n * count
    by_id = {m["id"]: m["content"] for m in messages}
    for n, ids in acked.items():
        assert [by_id[i] for i in ids] == [f"t{n}-m{i}" for i in range(count)]
    assert db.session_count() == 1 + threads_n * (count // 50)
    assert db.stats()["timeouts"] == 0


# -- schema upgrades ---------------------------------------------------------------------


def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path):
    """v1 (0.1.0) maintained the full-text index unconditionally; v2 adds
    ``sessiondb_meta`` and lets a damaged index be skipped (sessiondb.search_index)."""
    from sessiondb import schema
    path = tmp_path / "v1.db"
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", "wal")
    conn.execute(schema.MIGRATIONS[0])
    conn.pragma("user_version", 1)
    conn.execute("INSERT INTO sessions(id, source, started_at, message_count) "
                 "VALUES ('old', 'cli', 1.0, 1);"
                 "INSERT INTO messages(session_id, role, content, timestamp) "
                 "VALUES ('old', 'user', 'written by 0.1.0', 1.0)")
    conn.close()
    with SessionDB(path) as db:
        assert db._engine._conn.pragma("user_version") == SCHEMA_VERSION == 5
        assert db.get_session("old")["revision"] == 0
        assert [h["session_id"] for h in db.search_messages("written")] == ["old"]
        db.append_message("old", "user", "written by this version")
        assert len(db.search_messages("written")) == 2
        assert db.get_session("old")["message_count"] == 2
