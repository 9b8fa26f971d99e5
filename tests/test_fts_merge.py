"""The sealed tables of the full-text index merged into one segment each, in short
steps, by ``optimize_search_index`` (sessiondb.fts_merge): searches answer the same
before and after, FTS5's integrity check passes, the newest table is left alone (and
a sealed one that new messages still reach), writers go on meanwhile, and a merge
killed midway is finished by the next call. Stores of a few thousand messages cut into tables of 200 ids stand in for
the real blocks of 262,144; each table is split into many segments by rewriting its
rows one transaction at a time with FTS5's merges off, in pages of 128 bytes."""

from __future__ import annotations

import multiprocessing
import random
from pathlib import Path
from typing import Any, Iterator

import apsw
import pytest
from test_search_horizon import FILTERS, _fill
from test_search_scale import found
from test_search_tables import small_tables, small_windows

from sessiondb import ConfigurationError, SessionDB, fts_merge, fts_tables
from sessiondb.schema import REBUILDING

QUERIES = ["needle", "early", "zz NOT zy", "needle OR late", "w1*", "w1* needle"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SessionDB]:
    """2,000 messages in tables of 200 ids (windows of 5 within blocks of 100), each
    sealed table in many segments; the tail is empty."""
    small_windows(monkeypatch)
    small_tables(monkeypatch)
    db = SessionDB(tmp_path / "state.db")
    _fill(db, random.Random(7), 2000)
    db.rebuild_search_index()
    for table in names(db):
        fragment(db.path, table, 8)
    db.append_message("s1", "user", "quiet tail")  # past the last sealed table's ids
    try:
        yield db
    finally:
        db.close()


def names(db: SessionDB) -> list[str]:
    """The index's tables, the newest (the tail) first."""
    return [t.name for t in db._engine.read(fts_tables.tables)]


def fragment(path: Path, table: str, rows: int) -> None:
    """Add ``rows`` segments to ``table``: its FTS5 merges off, ``rows`` of its messages
    each deleted from it and indexed again in a transaction of its own (what it holds
    stays the same)."""
    conn = apsw.Connection(str(path))
    conn.set_busy_timeout(5000)
    try:
        conn.execute(f"INSERT INTO {table}({table}, rank) VALUES ('automerge', 0);"
                     f"INSERT INTO {table}({table}, rank) VALUES ('crisismerge', 1000);"
                     # pages of 128 bytes: a merge of the table takes many pages
                     f"INSERT INTO {table}({table}, rank) VALUES ('pgsz', 128)")
        lo = 1 if table == fts_tables.FIRST else int(table.rsplit("_", 1)[1])
        for rowid, content in conn.execute(
                "SELECT id, content FROM messages WHERE id >= ? AND content IS NOT NULL "
                "ORDER BY id LIMIT ?", (lo, rows)).fetchall():
            with conn:
                conn.execute(f"INSERT INTO {table}({table}, rowid, content) "
                             "VALUES ('delete', ?, ?)", (rowid, content))
                conn.execute(f"INSERT INTO {table}(rowid, content) VALUES (?, ?)",
                             (rowid, content))
        conn.execute(f"INSERT INTO {table}({table}, rank) VALUES ('automerge', 4);"
                     f"INSERT INTO {table}({table}, rank) VALUES ('crisismerge', 16)")
    finally:
        conn.close()


def segments(db: SessionDB) -> dict[str, int]:
    """Each table's segments, read two ways: FTS5's structure record (as fts_merge
    reads it) and the segment ids of its ``%_idx`` table."""
    def read(conn: apsw.Connection) -> dict[str, int]:
        out = {}
        for t in fts_tables.tables(conn):
            out[t.name] = fts_merge.segments(conn, t.name)
            ids = conn.execute(f"SELECT count(DISTINCT segid) FROM {t.name}_idx").fetchone()[0]
            assert ids == out[t.name], t.name
        return out
    return db._engine.read(read)


def answers(db: SessionDB) -> list[list[int]]:
    return [found(db, q, limit=None, **kw) for q in QUERIES for kw in FILTERS]


def intact(db: SessionDB) -> None:
    """FTS5's own check of every table against its messages, and SQLite's."""
    def check(conn: apsw.Connection) -> None:
        for t in fts_tables.tables(conn):
            conn.execute(f"INSERT INTO {t.name}({t.name}, rank) VALUES ('integrity-check', 1)")
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db._engine.read(check)


def test_optimize_merges_each_sealed_table_into_one_segment(store: SessionDB) -> None:
    before = segments(store)
    tail, *sealed = names(store)
    assert len(sealed) == 10 and all(before[t] > 4 for t in sealed)
    fragment(store.path, tail, 3)
    before = segments(store)
    expected = answers(store)
    reports: list[Any] = []
    merged = store.optimize_search_index(progress=reports.append)
    after = segments(store)
    assert {t: after[t] for t in sealed} == {t: 1 for t in sealed}
    assert after[tail] == before[tail]  # the newest table is left to FTS5
    assert answers(store) == expected
    intact(store)
    assert merged > 0 and reports and {r.task for r in reports} == {"merge"}
    assert reports[-1].done == merged and reports[0].total > 0
    assert store.optimize_search_index() == 0  # nothing left to merge


def test_a_writer_goes_on_while_tables_are_merged(store: SessionDB,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Steps of one command of one page: the merge of each table takes many
    # transactions, and another process writes between them.
    real = fts_merge.merge_step
    monkeypatch.setattr(fts_merge, "STEP_PAGES", 1)
    monkeypatch.setattr(fts_merge, "merge_step",
                        lambda table: lambda conn, deadline: real(table)(conn, 0.0))
    store.close()
    ctx = multiprocessing.get_context("spawn")
    stop, ready = ctx.Event(), ctx.Event()
    results = ctx.Queue()
    writer = ctx.Process(target=appender, args=(str(store.path), "s1", stop, ready, results))
    writer.start()
    db = SessionDB(store.path, hold_timeout=0.05)
    try:
        assert ready.wait(60)
        before, sealed = db.message_count("s1"), names(db)[1:]
        steps: list[Any] = []
        db.optimize_search_index(progress=steps.append)
        stop.set()
        written = results.get(timeout=60)
        writer.join(30)
        assert len(steps) > 3 * len(sealed)
        assert db.message_count("s1") > before  # written between the steps
        assert {segments(db)[t] for t in sealed} == {1}
        assert db.message_count("s1") >= written  # every acknowledged write is there
        assert writer.exitcode == 0
        intact(db)
    finally:
        stop.set()
        db.close()


def appender(path: str, session_id: str, stop: Any, ready: Any, results: Any) -> None:
    """Append to ``session_id`` until ``stop`` (``ready`` set after the first); put the
    number acknowledged."""
    done = 0
    with SessionDB(path) as db:
        while not stop.is_set():
            db.append_message(session_id, "user", f"quiet {done}")  # matches no query
            done += 1
            ready.set()
            stop.wait(0.005)
    results.put(done)


def test_nothing_is_merged_while_the_index_is_being_rebuilt(store: SessionDB) -> None:
    def mark(conn: apsw.Connection) -> None:
        conn.execute("INSERT INTO sessiondb_meta (key, value) VALUES (?, 'a test')",
                     (REBUILDING,))
    store._engine.execute_write(mark)
    assert store._engine.read(fts_merge.due) == []
    assert store.optimize_search_index() == 0
    store._engine.execute_write(
        lambda c: c.execute("DELETE FROM sessiondb_meta WHERE key = ?", (REBUILDING,)))
    assert len(store._engine.read(fts_merge.due)) == 10


def optimize_and_die(path: str) -> None:
    from maintenance_workers import kill_after
    real = fts_merge.merge_step  # steps of one command of one page
    fts_merge.STEP_PAGES = 1
    fts_merge.merge_step = lambda table: (  # type: ignore[assignment]
        lambda conn, deadline: real(table)(conn, 0.0))
    with SessionDB(path, hold_timeout=0.05) as db:
        db.optimize_search_index(progress=kill_after(5, "merge"))


def test_a_merge_killed_midway_is_finished_by_the_next_process(store: SessionDB) -> None:
    expected = answers(store)
    store.close()
    proc = multiprocessing.get_context("spawn").Process(target=optimize_and_die,
                                                         args=(str(store.path),))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -9
    db = SessionDB(store.path)
    try:
        cut = segments(db)
        assert max(cut[t] for t in names(db)[1:]) > 1  # cut short
        assert answers(db) == expected
        intact(db)
        db.optimize_search_index()
        assert {segments(db)[t] for t in names(db)[1:]} == {1}
        assert answers(db) == expected
        intact(db)
    finally:
        db.close()


def test_a_sealed_table_new_messages_still_reach_is_left(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A table is sealed 20 ids (here; 4,096 for real) before its last: appends go on
    # reaching it, and a merge would start over with each of them.
    small_tables(monkeypatch)
    with SessionDB(tmp_path / "state.db") as db:
        _fill(db, random.Random(7), 1990)
        db.rebuild_search_index()  # the tables laid out per block
        db.append_message("s1", "user", "quiet")  # 1,991: the tail is sealed
        last = names(db)[1]
        assert last == "messages_fts_1801"
        fragment(db.path, last, 8)
        assert last not in db._engine.read(fts_merge.due)
        for n in range(10):
            db.append_message("s1", "user", f"quiet {n}")
        assert last in db._engine.read(fts_merge.due)


def test_optimize_refuses_a_transaction_block(store: SessionDB) -> None:
    with pytest.raises(ConfigurationError, match="outside transaction"):
        with store.transaction():
            store.optimize_search_index()
    assert len(store._engine.read(fts_merge.due)) == 10
