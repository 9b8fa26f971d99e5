"""sessiondb.adapters.tables: an adapter's own tables, made once through the write path,
versioned, upgraded in steps, refused when newer, and gone with their session."""

from __future__ import annotations

import multiprocessing as mp
import subprocess
import sys

import pytest

from sessiondb import SessionDB
from sessiondb.adapters.tables import AdapterTables, ensure_tables
from sessiondb.errors import ConfigurationError, SchemaTooNewError

from adapter_workers import DEMO, make_tables


def _rows(db: SessionDB, sql: str, args=()) -> list[tuple]:
    return db._read(lambda c: [tuple(r) for r in c.execute(sql, args).fetchall()])


def _insert(db: SessionDB, sid: str, n: int, body: bytes) -> None:
    db._execute_write(lambda c: c.execute(
        "INSERT INTO demo_items (session_id, n, body) VALUES (?, ?, ?)", (sid, n, body)))


def test_made_once_and_versioned(db: SessionDB) -> None:
    ensure_tables(db, DEMO)
    ensure_tables(db, DEMO)
    assert _rows(db, "SELECT value FROM sessiondb_meta WHERE key = ?", ("adapter:demo",)) \
        == [("1",)]
    db.create_session("s", "cli")
    _insert(db, "s", 1, b"\x00\xff")
    assert _rows(db, "SELECT n, body FROM demo_items") == [(1, b"\x00\xff")]


def test_a_second_instance_finds_them(db_path) -> None:
    with SessionDB(db_path) as first:
        ensure_tables(first, DEMO)
        first.create_session("s", "cli")
        _insert(first, "s", 1, b"x")
    with SessionDB(db_path) as second:
        ensure_tables(second, DEMO)  # no second CREATE TABLE
        assert _rows(second, "SELECT n FROM demo_items") == [(1,)]


def test_newer_tables_are_refused_and_left_alone(db: SessionDB, db_path) -> None:
    ensure_tables(db, DEMO)
    older = AdapterTables("demo", 0, {"sqlite": ("DROP TABLE demo_items",),
                                      "postgresql": ("DROP TABLE demo_items",)})
    with SessionDB(db_path) as other:
        with pytest.raises(SchemaTooNewError) as caught:
            ensure_tables(other, older)
    assert (caught.value.found, caught.value.supported) == (1, 0)
    assert _rows(db, "SELECT count(*) FROM demo_items") == [(0,)]


def test_older_tables_are_upgraded_step_by_step(db: SessionDB, db_path) -> None:
    ensure_tables(db, DEMO)
    db.create_session("s", "cli")
    _insert(db, "s", 1, b"a")
    column = {"sqlite": "ALTER TABLE demo_items ADD COLUMN {} TEXT",
              "postgresql": "ALTER TABLE demo_items ADD COLUMN {} text"}
    v3 = AdapterTables("demo", 3, DEMO.ddl, upgrades={
        2: {k: (v.format("note"),) for k, v in column.items()},
        3: {k: (v.format("label"),) for k, v in column.items()},
    })
    with SessionDB(db_path) as newer:
        ensure_tables(newer, v3)
        assert _rows(newer, "SELECT n, note, label FROM demo_items") == [(1, None, None)]
        assert _rows(newer, "SELECT value FROM sessiondb_meta WHERE key = ?",
                     ("adapter:demo",)) == [("3",)]


def test_a_version_without_its_upgrade_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no upgrade to version 2"):
        AdapterTables("demo", 2, DEMO.ddl)


def test_a_failing_statement_leaves_nothing(db: SessionDB) -> None:
    broken = AdapterTables("broken", 1, {
        "sqlite": ("CREATE TABLE broken_a (x INTEGER)", "CREATE TABLE broken_a (x INTEGER)"),
        "postgresql": ("CREATE TABLE broken_a (x bigint)", "CREATE TABLE broken_a (x bigint)"),
    })
    with pytest.raises(Exception):
        ensure_tables(db, broken)
    assert _rows(db, "SELECT count(*) FROM sessiondb_meta WHERE key = ?",
                 ("adapter:broken",)) == [(0,)]
    fixed = AdapterTables("broken", 1, {"sqlite": ("CREATE TABLE broken_a (x INTEGER)",),
                                        "postgresql": ("CREATE TABLE broken_a (x bigint)",)})
    ensure_tables(db, fixed)  # the failed attempt left no table behind
    assert _rows(db, "SELECT count(*) FROM broken_a") == [(0,)]


def test_rows_go_with_their_session(db: SessionDB, make_session) -> None:
    ensure_tables(db, DEMO)
    db.create_session("keep", "cli")
    make_session("old", started_at=1_000.0, ended_at=1_001.0, end_reason="done")
    for sid in ("keep", "old"):
        _insert(db, sid, 1, b"a")
    db.create_session("gone", "cli")
    _insert(db, "gone", 2, b"b")
    assert db.delete_session("gone")
    assert db.prune_sessions(older_than_days=1) == 1
    assert _rows(db, "SELECT session_id FROM demo_items") == [("keep",)]


def test_processes_making_them_at_once(empty_db_path) -> None:
    # Their first opens make the store too (on PostgreSQL, through PgBouncer as well).
    db_path = empty_db_path
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(6)
    procs = [ctx.Process(target=make_tables, args=(str(db_path), barrier)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * 6
    with SessionDB(db_path) as db:
        assert _rows(db, "SELECT value FROM sessiondb_meta WHERE key = ?",
                     ("adapter:demo",)) == [("1",)]


@pytest.mark.sqlite_only
def test_importing_sessiondb_imports_no_framework() -> None:
    code = ("import sys, sessiondb, sessiondb.adapters, sessiondb.adapters.tables, "
            "sessiondb.bench.frameworks, sessiondb.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('agents', 'langgraph', 'google', 'langchain_core', 'openai')]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
