"""The conversion of a hermes-agent file as an online table rebuild (sessiondb.conversion):
what is written to hermes-agent's table while its rows are copied reaches the copy,
whatever the row's place relative to the copy; ids are never handed out twice; what a
hermes-agent file may hold beyond its schema 6 (newer columns, messages whose session is
gone) is kept. The steps are driven by hand here, one chunk at a time; the runs beside
other processes and the kills are in test_maintenance.py."""

from __future__ import annotations

import re
import time
import sqlite3
from pathlib import Path

import apsw

from sessiondb import SessionDB, conversion, doctor, hermes_schema, schema
from test_compat_hermes_file import build_hermes_db, hermes_message
from workers import integrity, read_only

HERMES_COLUMNS = ", ".join(hermes_schema.HERMES_MESSAGE_COLUMNS)


def hermes_file(path: Path, messages: int = 40) -> None:
    """build_hermes_db's file, with ``messages`` more in session x."""
    build_hermes_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    for n in range(messages):
        hermes_message(conn, "x", "user", f"message {n} lima", 300.0 + n)
    conn.close()


def rows(conn: apsw.Connection, table: str = "messages") -> list[tuple]:
    return conn.execute(f"SELECT {HERMES_COLUMNS} FROM {table} ORDER BY id").fetchall()


def copy_some(conn: apsw.Connection) -> None:
    """One chunk of the copy (a deadline already past: the step does its least)."""
    with conn:
        assert conversion.copy_step(conn, 0.0) > 0


def test_writes_to_hermes_agents_table_during_the_copy_reach_the_copy(tmp_path):
    path = tmp_path / "state.db"
    hermes_file(path)
    conn = apsw.Connection(str(path))
    with conn:
        conversion.begin(conn)
    copy_some(conn)
    top = conn.execute(f"SELECT max(id) FROM {conversion.NEW}").fetchone()[0]
    assert 1 < top < 40
    # As hermes-agent would write them (its SQL, on its table), around the copy's edge:
    with conn:
        conn.execute("UPDATE messages SET content = 'edited below kilo' WHERE id = 2")
        conn.execute("UPDATE messages SET content = 'edited above kilo' WHERE id = ?",
                     (top + 5,))
        conn.execute("DELETE FROM messages WHERE id = 3")
        conn.execute("DELETE FROM messages WHERE id = ?", (top,))  # the copy's last row
        conn.execute("UPDATE messages SET id = 1000 WHERE id = 4")  # moves above it all
        conn.execute("INSERT INTO messages (id, session_id, role, content, timestamp) "
                     "VALUES (3, 'x', 'user', 'back in a hole kilo', 9.0)")  # below C
        conn.execute("INSERT OR REPLACE INTO messages (id, session_id, role, content, "
                     "timestamp) VALUES (1, 'x', 'user', 'replaced kilo', 9.5)")
    copy_some(conn)
    with conn:
        conn.execute("DELETE FROM messages WHERE id = 6")
        conn.execute("UPDATE messages SET tool_name = 'grep' WHERE id = 1")
        hermes_message_apsw(conn, "x", "appended during the copy kilo")
        conn.execute("UPDATE sessions SET message_count = (SELECT count(*) FROM messages "
                     "WHERE session_id = sessions.id)")
    truth = rows(conn)
    conn.close()
    with SessionDB(path) as db:
        assert db.message_count() == len(truth)
        assert db._read(rows) == truth
        assert sorted(h["id"] for h in db.search_messages("kilo", limit=None)) == sorted(
            r[0] for r in truth if "kilo" in (r[3] or ""))
        assert db.append_message("x", "user", "next") == truth[-1][0] + 1 == 1002
    assert integrity(path) == [("ok",)]
    assert doctor.check(path)["ok"]


def hermes_message_apsw(conn: apsw.Connection, sid: str, content: str) -> None:
    conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                 "VALUES (?, 'user', ?, 10.0)", (sid, content))
    conn.execute("UPDATE sessions SET message_count = message_count + 1 WHERE id = ?", (sid,))


def test_ids_of_deleted_messages_are_not_handed_out_again(tmp_path):
    path = tmp_path / "state.db"
    hermes_file(path)
    conn = apsw.Connection(str(path))
    with conn:  # hermes-agent deletes its newest messages: AUTOINCREMENT remembers them
        conn.execute("DELETE FROM messages WHERE id > 30")
        conn.execute("UPDATE sessions SET message_count = 26 WHERE id = 'x'")
    conn.close()
    with SessionDB(path) as db:
        assert db.append_message("x", "user", "after") == 45


def test_a_newer_hermes_files_columns_and_orphaned_messages_are_kept(tmp_path):
    path = tmp_path / "state.db"
    build_hermes_db(path, version=7)
    conn = sqlite3.connect(path, isolation_level=None)  # foreign keys off, as by default
    conn.execute("ALTER TABLE messages ADD COLUMN mood TEXT DEFAULT 'calm'")
    conn.execute("INSERT INTO messages (session_id, role, content, timestamp, mood) "
                 "VALUES ('gone', 'user', 'orphan kilo', 1.0, 'lost')")
    conn.close()
    before = read_only(path, "SELECT id, content, mood FROM messages ORDER BY id")
    with SessionDB(path) as db:
        assert db.message_count() == 5
        assert [h["id"] for h in db.search_messages("kubernetes")] == [1]
    assert read_only(path, "SELECT id, content, mood FROM messages ORDER BY id") == before
    columns = [r[1] for r in read_only(path, "PRAGMA table_info(messages)")]
    assert columns[-2:] == ["metadata", "mood"]
    assert integrity(path) == [("ok",)]


def test_a_copy_cut_short_is_still_a_hermes_agent_file_until_the_next_open(tmp_path):
    path = tmp_path / "state.db"
    hermes_file(path)
    conn = apsw.Connection(str(path))
    with conn:
        conversion.begin(conn)
    copy_some(conn)
    conn.close()
    assert read_only(path, "PRAGMA user_version") == [(0,)]
    report = doctor.check(path)
    assert "cut short" in report["open_error"]
    with SessionDB(path) as db:
        assert db.message_count() == 44
    assert read_only(path, "SELECT name FROM sqlite_schema WHERE name GLOB "
                           "'sessiondb_messages_*' OR name GLOB 'sessiondb_copy_*'") == []
    assert doctor.check(path)["ok"]


def total(conn: apsw.Connection) -> int:
    return conn.execute(schema.MESSAGE_TOTAL_SQL).fetchone()[0]


def test_the_message_total_is_kept_from_the_start_of_the_copy(tmp_path):
    """The swap counts nothing (ten million messages: seconds under the lock): the copy's
    total is kept by its triggers from begin(), through every kind of write
    hermes-agent makes meanwhile, and is the store's total after the swap."""
    path = tmp_path / "state.db"
    hermes_file(path)
    conn = apsw.Connection(str(path))
    with conn:
        conversion.begin(conn)
    assert total(conn) == 0
    copy_some(conn)
    top = conn.execute(f"SELECT max(id) FROM {conversion.NEW}").fetchone()[0]
    assert 8 <= top < 44
    with conn:  # below the copy's edge: each reaches the copy, and the total
        conn.execute("DELETE FROM messages WHERE id = 2")
        conn.execute("INSERT OR REPLACE INTO messages (id, session_id, role, content, "
                     "timestamp) VALUES (1, 'x', 'user', 'replaced', 9.5)")
        conn.execute("INSERT INTO messages (id, session_id, role, content, timestamp) "
                     "VALUES (2, 'x', 'user', 'back in its hole', 9.0)")
        conn.execute("UPDATE messages SET id = 9999 WHERE id = ?", (top,))
        # onto a copied id: its row goes by REPLACE's delete, which fires no trigger
        conn.execute("UPDATE OR REPLACE messages SET id = 5 WHERE id = 7")
        conn.execute("UPDATE sessions SET message_count = (SELECT count(*) FROM messages "
                     "WHERE session_id = sessions.id)")
    copied = conn.execute(f"SELECT count(*) FROM {conversion.NEW}").fetchone()[0]
    assert total(conn) == copied == top - 2
    with conn:
        conversion.swap(conn)
    assert total(conn) == conn.execute("SELECT count(*) FROM messages").fetchone()[0] == 43
    conn.close()
    with SessionDB(path) as db:
        assert db.message_count() == 43
    assert doctor.check(path)["ok"]


def test_the_session_indexes_are_made_before_the_swap_one_at_a_time(tmp_path):
    """hermes-agent's session indexes that are sessiondb's are kept; the others are made
    (each a statement of its own), and an index under another name dropped once they
    are there."""
    same, other = tmp_path / "same.db", tmp_path / "other.db"
    build_hermes_db(same)
    build_hermes_db(other, rename=True)
    listing = ["idx_sessions_listing", "idx_sessions_source_listing",
               "idx_sessions_active_listing"]
    for path, made, dropped in ((same, listing, []),
                                (other, ["idx_sessions_source", "idx_sessions_title_unique",
                                         *listing], ["by_source", "idx_title"])):
        conn = apsw.Connection(str(path))
        with conn:
            conversion.begin(conn)
        todo = schema.missing_session_indexes(conn)
        assert [re.findall(r'INDEX "?(\w+)', s)[-1] for s in todo] == made + dropped
        assert [s.startswith("DROP") for s in todo] == [False] * len(made) + [True] * len(
            dropped)
        for ddl in todo:
            with conn:
                conn.execute(ddl)
        assert schema.missing_session_indexes(conn) == []
        conn.close()
        with SessionDB(path) as db:
            assert [r["id"] for r in db.list_sessions()] == ["x", "c", "p"]
        assert doctor.check(path)["ok"]


def test_a_copy_begun_without_the_total_and_session_indexes_is_finished(tmp_path):
    """A file whose copy an older sessiondb began (no total on the copy, hermes-agent's
    session indexes only): its swap counts the messages and makes the indexes."""
    path = tmp_path / "state.db"
    hermes_file(path)
    conn = apsw.Connection(str(path))
    with conn:
        conversion.begin(conn)
        conn.execute("DROP TRIGGER messages_total_insert; DROP TRIGGER messages_total_delete;"
                     "DROP TABLE sessiondb_totals")
    copy_some(conn)
    assert len(schema.missing_session_indexes(conn)) == 3  # the listing ones
    with conn:
        conversion.swap(conn)
    assert schema.missing_session_indexes(conn) == []
    assert total(conn) == 44
    conn.close()
    with SessionDB(path) as db:
        assert db.message_count() == 44
        assert db.append_message("x", "user", "after") == 45
        assert db.message_count() == 45
    fresh = tmp_path / "fresh.db"
    SessionDB(fresh).close()
    names = "SELECT name FROM sqlite_schema WHERE tbl_name IN ('sessions', 'sessiondb_totals')"
    assert sorted(read_only(path, names)) == sorted(read_only(fresh, names))
    assert doctor.check(path)["ok"]


def test_session_indexes_another_process_made_meanwhile_are_not_made_again(tmp_path):
    """The indexes still to make are read inside each write: hermes-agent opening the
    file (CREATE INDEX IF NOT EXISTS) or another copier may have made one."""
    path = tmp_path / "state.db"
    build_hermes_db(path)
    conn = apsw.Connection(str(path))
    with conn:
        conversion.begin(conn)
    first = schema.missing_session_indexes(conn)[0]
    with conn:  # made by someone else between the list and the write
        conn.execute(first)
    while True:
        with conn:
            if not conversion._index_sessions(conn):
                break
    assert schema.missing_session_indexes(conn) == []
    conn.close()


def test_the_warm_up_reads_each_index_that_begin_drops(tmp_path):
    # Each index is read by a scan of that index (count(*) would count the smallest
    # index of the table whatever INDEXED BY names, so one index was read twice and the
    # other dropped cold, its pages read from the disk with the write lock held); then
    # the sessions table, which the session indexes made after begin() are built from
    # (read cold, the first of them held the lock twice as long at ten million messages).
    conn = apsw.Connection(str(tmp_path / "h.db"))
    conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, session_id TEXT, "
                 "timestamp REAL, content TEXT);"
                 "CREATE INDEX idx_messages_session ON messages(session_id, content);"
                 "CREATE INDEX idx_messages_session_ts ON messages(session_id, timestamp);"
                 "CREATE TABLE sessions (id TEXT PRIMARY KEY, source TEXT, "
                 "started_at REAL, ended_at REAL);"
                 "CREATE INDEX idx_sessions_started ON sessions(started_at DESC)")
    statements: list[str] = []
    conn.exec_trace = lambda _cursor, sql, _bindings: statements.append(sql) or True
    conversion._warm(conn)
    conn.exec_trace = None
    plans = [" ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}"))
             for sql in statements if sql.lstrip().upper().startswith("SELECT COUNT")]
    assert plans == [f"SCAN messages USING COVERING INDEX {name}"
                     for name in ("idx_messages_session", "idx_messages_session_ts")] + \
        ["SCAN sessions"]
    conn.close()


def test_a_session_index_longer_than_the_hold_bound_is_made(tmp_path, monkeypatch):
    # An index is one statement: made through the write path exempt from the hold
    # bound, as every step of the migration is, or a store of many sessions could
    # never be converted with a short hold_timeout.
    path = tmp_path / "state.db"
    hermes_file(path)
    real = conversion._index_sessions

    def slow(conn: apsw.Connection, deadline: float = 0.0) -> int:
        time.sleep(0.15)  # as a CREATE INDEX over many sessions takes
        return real(conn, deadline)

    monkeypatch.setattr(conversion, "_index_sessions", slow)
    with SessionDB(path, hold_timeout=0.1) as db:
        assert db.message_count("x") == 40
    conn = apsw.Connection(str(path))
    try:
        assert schema.user_version(conn) == schema.SCHEMA_VERSION
        assert schema.missing_session_indexes(conn) == []
    finally:
        conn.close()
