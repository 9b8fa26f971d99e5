"""The full-text index cut into one FTS5 table per block of message ids
(sessiondb.fts_tables), write side: rolling the tail, deletes and updates in sealed
tables, rebuilds (with a writer in another process, and killed midway), bulk imports,
foreign writers, doctor, and stores made before the cut (schema v4).

Ids in later blocks cost nothing: an import keeps the exported ids that are free, and
raising the AUTOINCREMENT sequence makes the next append land where a test wants it.
Every test ends by checking that each message is indexed in exactly the table whose
range holds its id, and FTS5's own check of every table (:func:`fts_tables.checks`).
Search across several tables is not tested here.
"""

from __future__ import annotations

import multiprocessing
import re
import time
from pathlib import Path
from typing import Any, Optional

import apsw
import pytest

import fts_workers as fw
from fts_workers import block
from sessiondb import SessionDB, doctor, fts_tables, schema, search_index
from sessiondb.fts_tables import BLOCK, FIRST, table_name

SPAWN = multiprocessing.get_context("spawn")
TINY_HOLD = 0.05
B = BLOCK

Layout = list[tuple[str, Optional[int], Optional[int]]]


# -- helpers ------------------------------------------------------------------------------

def layout(db: SessionDB) -> Layout:
    """``(name, lo, hi)`` of the index's tables, lowest ids first."""
    return db._read(lambda c: [(t.name, t.lo, t.hi) for t in reversed(fts_tables.tables(c))])


def sealed(lo: Optional[int], hi: int) -> tuple[str, Optional[int], int]:
    """A sealed table: named after the first id of its range, whatever its bound."""
    return (table_name(lo), lo, hi)


def tail(lo: Optional[int]) -> tuple[str, Optional[int], None]:
    return (table_name(lo), lo, None)


def held(db: SessionDB) -> dict[str, set[int]]:
    """The message ids each table indexes (its ``%_docsize`` keys)."""
    return db._read(lambda c: {t.name: {r[0] for r in c.execute(
        f"SELECT id FROM {t.name}_docsize")} for t in fts_tables.tables(c)}, snapshot=True)


def bump(db: SessionDB, seq: int) -> None:
    """The next message appended gets id ``seq + 1``."""
    db._execute_write(lambda c: c.execute(
        "UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", (seq,)))


def run_checks(db: SessionDB) -> None:
    """FTS5's integrity-check of every table (raises if one does not match)."""
    def check(conn: Any) -> None:
        for sql in fts_tables.checks(conn):
            conn.execute(sql)
    db._execute_write(check, bounded=False)


def assert_indexed(db: SessionDB) -> set[int]:
    """Nothing pending; each message indexed exactly in the table whose range holds its
    id, nothing else indexed; the ranges cover every id once; every table passes FTS5's
    check. Returns the message ids."""
    def look(c: Any) -> tuple[set[int], list[fts_tables.Table], int]:
        return ({r[0] for r in c.execute("SELECT id FROM messages")},
                fts_tables.tables(c),
                c.execute("SELECT count(*) FROM sessiondb_fts_pending").fetchone()[0])
    ids, tables, pending = db._read(look, snapshot=True)
    assert pending == 0
    assert db._read(search_index.rebuilding) is None
    bounds = sorted((t.lo or 0, t.hi) for t in tables)
    assert bounds[0][0] == 0 and bounds[-1][1] is None
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), bounds  # no gap, no overlap
    for t in tables:
        # Bounds are block starts, none at or below id 1 (ids <= 0 go with the first).
        assert t.lo is None or ((t.lo - 1) % B == 0 and t.lo > 1), t
    index = held(db)
    for t in tables:
        want = {i for i in ids if t.covers(i)}
        assert index[t.name] == want, (t, sorted(index[t.name] ^ want)[:10])
    run_checks(db)
    return ids


def blocks_of(ids: set[int]) -> set[int]:
    return {(i - 1) // B for i in ids}


def junk(conn: Any) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_schema WHERE name LIKE 'sessiondb_fts_junk%'")]


def schema_rows(db: SessionDB) -> list[tuple[str, str, str]]:
    return db._read(lambda c: c.execute(
        "SELECT type, name, sql FROM sqlite_schema WHERE name LIKE 'messages_fts%' "
        "ORDER BY name").fetchall())


# -- 1. appends roll the tail -----------------------------------------------------------

def test_a_store_below_one_block_keeps_the_one_table_it_always_had(tmp_path: Path) -> None:
    with SessionDB(tmp_path / "fresh.db") as db:
        fresh = schema_rows(db)
    with SessionDB(tmp_path / "s.db") as db:
        db.create_session("s", "cli")
        for i in range(50):
            db.append_message("s", "user", fw.text(i))
        bump(db, B - fts_tables.MARGIN - 10)  # close to the next block, not within MARGIN
        for i in range(5):
            db.append_message("s", "user", fw.text(i))
        assert layout(db) == [tail(None)]
        assert schema_rows(db) == fresh
        names = {r[1] for r in fresh}
        assert {"messages_fts", "messages_fts_rows_0", "messages_fts_insert",
                "messages_fts_delete", "messages_fts_update"} <= names
        assert not any(re.fullmatch(r"messages_fts_\d+", n) for n in names)
        assert len(assert_indexed(db)) == 55
        assert [h["id"] for h in db.search_messages("note 49")] == [50]


def test_appends_across_block_boundaries_roll_the_tail(tmp_path: Path) -> None:
    with SessionDB(tmp_path / "s.db") as db:
        db.create_session("s", "cli")
        for i in range(3):
            db.append_message("s", "user", fw.text(i))
        bump(db, B - 10)
        # The first append within MARGIN of the next block rolls the tail there; the
        # ids still below that block go to the sealed table, the next ones to the tail.
        ids = [db.append_message("s", "user", fw.text(i)) for i in range(20)]
        assert ids[0] == B - 9 and ids[-1] == B + 10
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        index = held(db)
        assert index[FIRST] == {1, 2, 3, *range(B - 9, B + 1)}
        assert index[table_name(block(1))] == set(range(B + 1, B + 11))
        assert_indexed(db)

        # A jump over empty blocks: the tail holds blocks 1 and 3 and rolls at the
        # block after its highest id, once the newest message is within MARGIN of it.
        bump(db, 3 * B + 100)
        db.append_message("s", "user", "far")
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        bump(db, 4 * B - 5)
        for i in range(10):
            db.append_message("s", "user", fw.text(i))
        assert layout(db) == [sealed(None, block(1)), sealed(block(1), block(4)),
                              tail(block(4))]
        ids = assert_indexed(db)
        assert len(ids) == 34
        assert held(db)[table_name(block(4))] == set(range(4 * B + 1, 4 * B + 6))


def test_a_transaction_block_crossing_a_boundary_is_rolled_at_the_block_after(
        tmp_path: Path) -> None:
    """The roll is checked once a transaction block commits, not after each call in it:
    a block whose appends cross a boundary leaves ids of both blocks in the tail, which
    is sealed at the block after its highest id (as for a foreign writer)."""
    with SessionDB(tmp_path / "s.db") as db:
        db.create_session("s", "cli")
        db.append_message("s", "user", "first")
        bump(db, 2 * B - 3)
        with db.transaction():
            ids = [db.append_message("s", "user", fw.text(i)) for i in range(8)]
        assert ids == list(range(2 * B - 2, 2 * B + 6))
        assert layout(db) == [tail(None)]
        assert held(db)[FIRST] == {1, *ids}
        assert_indexed(db)
        with pytest.raises(RuntimeError):
            with db.transaction():
                bump(db, 3 * B - 3)
                for i in range(8):
                    db.append_message("s", "user", fw.text(i))
                raise RuntimeError("rolled back")
        assert layout(db) == [tail(None)]
        assert db.append_message("s", "user", "after the rollback") == 2 * B + 6
        bump(db, 3 * B - 10)
        db.append_message("s", "user", "near block 3")
        assert layout(db) == [sealed(None, block(3)), tail(block(3))]
        assert len(assert_indexed(db)) == 11


def test_a_roll_by_another_connection_is_seen_by_this_one(tmp_path: Path) -> None:
    """Each connection keeps its list of tables until the schema changes: one that
    another connection rolled is read again."""
    path = tmp_path / "s.db"
    with SessionDB(path) as one, SessionDB(path) as two:
        one.create_session("s", "cli")
        one.append_message("s", "user", "first")
        assert layout(one) == layout(two) == [tail(None)]  # both lists cached
        bump(two, B - 5)
        two.append_message("s", "user", "rolls")
        assert layout(one) == [sealed(None, block(1)), tail(block(1))]
        ids = [one.append_message("s", "user", fw.text(i)) for i in range(10)]
        assert ids[-1] == B + 6
        assert held(one)[table_name(block(1))] == set(range(B + 1, B + 7))
        assert_indexed(two)


def test_a_roll_that_fails_does_not_fail_the_write_that_committed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seal runs after the caller's write committed: its failure is not the
    caller's, who would retry a write that is done. It is tried again at a write a
    second later; meanwhile every write returns and the tail only grows."""
    with SessionDB(tmp_path / "s.db") as db:
        db.create_session("s", "cli")
        db.append_message("s", "user", "first")
        bump(db, B - 10)

        def full(conn: Any, boundary: int) -> None:  # a disk full, say, while sealing
            raise apsw.FullError("database or disk is full")
        monkeypatch.setattr(fts_tables, "seal", full)
        assert db.append_message("s", "user", "written") == B - 9
        assert db.append_message("s", "user", "also written") == B - 8
        assert layout(db) == [tail(None)]  # not sealed: the tail holds them
        monkeypatch.undo()

        # Writes that add no message, so that the tail stays below its block however
        # long the retry takes to come round.
        waits = 0
        while layout(db) == [tail(None)]:
            assert waits < 600, "the seal was never tried again"
            time.sleep(0.1)
            waits += 1
            db.create_session(f"wait {waits}", "cli")
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        got = db._read(lambda c: c.execute(
            "SELECT id, content FROM messages WHERE id > 1 ORDER BY id").fetchall())
        assert got == [(B - 9, "written"), (B - 8, "also written")]  # each once
        assert db.append_message("s", "user", "next") == B - 7
        assert len(assert_indexed(db)) == 4


def test_a_seal_slower_than_the_hold_bound_is_done(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A seal's DDL cannot be split, so it is exempt from the hold bound: one that takes
    longer (a loaded machine, a store of many tables) is done, not interrupted and
    tried again forever."""
    real = fts_tables.seal

    def slow(conn: Any, boundary: int) -> None:
        real(conn, boundary)
        time.sleep(4 * TINY_HOLD)
    monkeypatch.setattr(fts_tables, "seal", slow)
    with SessionDB(tmp_path / "s.db", hold_timeout=TINY_HOLD) as db:
        db.create_session("s", "cli")
        db.append_message("s", "user", "first")
        bump(db, B - 10)
        assert db.append_message("s", "user", "rolls") == B - 9
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        assert len(assert_indexed(db)) == 2


# -- 2. deletes and updates in sealed tables ------------------------------------------------

def test_deletes_and_updates_in_sealed_tables_keep_every_table_consistent(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "s.db"
    data = fw.spread([(block(0) + 1, 30)], ended=True)  # "old": prunable
    data[0]["messages"] += fw.spread([(block(1) + 5, 30)])[0]["messages"]
    data += fw.spread([(block(1) + 100, 20), (block(2) + 7, 20), (block(3) + 3, 20)],
                      started_at=1e10)
    data[1]["messages"] += fw.spread([(block(3) + 50, 20)])[0]["messages"]
    with SessionDB(path) as db:
        db.import_sessions(data)
        db.create_session("live", "cli")
        db.append_message("live", "user", "live message")
        assert layout(db) == [sealed(None, block(1)), sealed(block(1), block(2)),
                              sealed(block(2), block(3)), tail(block(3))]
        assert_indexed(db)

        db.delete_session(f"s{block(1) + 100}")  # messages in block 1 and block 3
        assert_indexed(db)
        popped = db.pop_message(f"s{block(2) + 7}")  # its last message: a sealed table
        assert popped is not None and popped["id"] == block(2) + 26
        assert_indexed(db)
        db.clear_messages(f"s{block(2) + 7}")
        assert_indexed(db)

        def edit(conn: Any) -> None:  # no API edits a message: as a foreign writer would
            conn.execute("UPDATE messages SET content = 'rewritten zulu' WHERE id IN (?, ?)",
                         (block(0) + 3, block(1) + 8))
            conn.execute("UPDATE messages SET content = NULL WHERE id = ?", (block(0) + 4,))
        db._execute_write(edit)
        assert_indexed(db)
        assert db.prune_sessions(90) == 1  # "old", across the first two tables
        ids = assert_indexed(db)
        assert blocks_of(ids) == {3}
        assert all(not index for name, index in held(db).items()
                   if name != table_name(block(3)))  # the tail


# -- 3. rebuilds ----------------------------------------------------------------------------

def test_a_rebuild_lays_out_a_table_per_block_that_holds_messages(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fw.build(path, [(block(0), 300), (block(2), 300), (block(3), 300), (block(6), 300)])
    with SessionDB(path) as db:
        assert db.rebuild_search_index() == 1200
        # A run of empty blocks goes with the table above it; the tail starts above the
        # last sealed table.
        assert layout(db) == [sealed(None, block(1)), sealed(block(1), block(3)),
                              sealed(block(3), block(4)), tail(block(4))]
        index = held(db)
        assert all(len(blocks_of(ids)) == 1 for ids in index.values())
        assert len(assert_indexed(db)) == 1200
        assert db._read(junk) == []  # the tables set aside are gone


def test_a_rebuild_with_prefix_indexes_gives_them_to_every_table_and_the_next_tail(
        tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fw.build(path, [(block(0), 50), (block(1), 50), (block(2) - 5000, 50)])
    with SessionDB(path) as db:
        db.rebuild_search_index(prefixes=[2, 3])
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        assert all("prefix='2 3'" in table_sql(db, name) for name, _, _ in layout(db))
        db.create_session("w", "cli")
        bump(db, block(2) - 30)
        for i in range(60):  # crosses into block 2: the tail rolls
            db.append_message("w", "user", fw.text(i))
        assert layout(db) == [sealed(None, block(1)), sealed(block(1), block(2)),
                              tail(block(2))]
        assert all("prefix='2 3'" in table_sql(db, name) for name, _, _ in layout(db))
        assert_indexed(db)
        db.rebuild_search_index(prefixes=[])
        assert not any("prefix" in table_sql(db, name) for name, _, _ in layout(db))
        assert_indexed(db)


def test_a_rebuild_of_a_store_in_one_block_keeps_one_table(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fw.build(path, [(block(3) + 10, 100)])  # the lowest block holding messages is 3
    with SessionDB(path) as db:
        db.rebuild_search_index()
        assert layout(db) == [tail(None)]
        assert_indexed(db)


def test_a_rebuild_in_many_steps_beside_a_writer_indexes_every_message(tmp_path: Path
                                                                       ) -> None:
    path = tmp_path / "s.db"
    # The last run ends 300 ids before block 5: the writer's appends cross it while the
    # rebuild runs, so the tail rolls midway.
    fw.build(path, [(block(0), 1000), (block(2), 1000), (block(5) - 1300, 1000)])
    go, did, stop = SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=fw.appender, daemon=True,
                         args=(str(path), go, did, stop, results, 400))
    proc.start()
    try:
        assert results.get(timeout=120) == "ready"
        reports: list[Any] = []

        def progress(p: Any) -> None:
            reports.append(p)
            if p.task == "index" and not go.is_set():
                go.set()  # the writer appends between the rebuild's steps
                assert did.wait(120), "the writer made no progress"

        with SessionDB(path, hold_timeout=TINY_HOLD) as db:
            indexed = db.rebuild_search_index(progress=progress)
            stop.set()
            acked, errors = results.get(timeout=120)
            proc.join(60)
        assert proc.exitcode == 0 and errors == []
    finally:
        stop.set()
        go.set()
        proc.join(60)
    assert indexed == 3000
    assert len([p for p in reports if p.task == "index"]) > 2, \
        "a tiny hold bound must make it several steps"
    assert len(acked) >= 400 and acked[-1] > block(5)
    with SessionDB(path) as db:
        ids = assert_indexed(db)
        assert set(acked) <= ids and len(ids) == 3000 + len(acked)
        assert layout(db) == [sealed(None, block(1)), sealed(block(1), block(3)),
                              sealed(block(3), block(5)), tail(block(5))]


# -- 4. a foreign writer --------------------------------------------------------------------

def test_a_foreign_writer_past_the_next_block_lands_in_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SessionDB(path) as db:
        db.create_session("s", "cli")
        for i in range(20):
            db.append_message("s", "user", fw.text(i))
        raw = apsw.Connection(str(path))  # apsw: no second SQLite library in the process
        raw.set_busy_timeout(10_000)
        try:
            def insert(mid: int) -> None:
                raw.execute("INSERT INTO messages (id, session_id, role, content, timestamp) "
                            "VALUES (?, 's', 'user', ?, 1.0)", (mid, fw.text(mid)))

            insert(2 * B + 10)  # past the next block, far from the end of its own
            assert layout(db) == [tail(None)]
            assert db.append_message("s", "user", "next") == 2 * B + 11
            assert layout(db) == [tail(None)]  # not within MARGIN of block 3 yet
            assert held(db)[FIRST] >= {1, 20, 2 * B + 10, 2 * B + 11}

            insert(3 * B - 5)  # near the end of the tail's highest block
            assert layout(db) == [tail(None)]
            db.append_message("s", "user", "rolls")  # 3B - 4
            assert layout(db) == [sealed(None, block(3)), tail(block(3))]
            assert_indexed(db)

            # After the roll, the foreign writer's deletes, updates and inserts reach
            # the right tables through the triggers.
            raw.execute("DELETE FROM messages WHERE id IN (5, ?)", (2 * B + 10,))
            raw.execute("UPDATE messages SET content = 'rewritten' WHERE id = 6")
            insert(5 * B + 3)
            insert(4 * B + 2)
            ids = assert_indexed(db)
            assert held(db)[table_name(block(3))] == {4 * B + 2, 5 * B + 3}
            assert 5 not in ids
        finally:
            raw.close()
        db.append_message("s", "user", "last")
        assert layout(db) == [sealed(None, block(3)), tail(block(3))]
        assert_indexed(db)


def test_a_foreign_writer_crossing_a_block_seals_at_the_block_after_its_highest_id(
        tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with SessionDB(path) as db:
        db.create_session("s", "cli")
        db.append_message("s", "user", "first")
    raw = apsw.Connection(str(path))
    try:
        raw.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", (B - 2,))
        for i in range(6):  # ids B-1 .. B+4: AUTOINCREMENT, no sessiondb
            raw.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                        "VALUES ('s', 'user', ?, 1.0)", (fw.text(i),))
    finally:
        raw.close()
    with SessionDB(path) as db:
        assert layout(db) == [tail(None)]
        assert held(db)[FIRST] == {1, *range(B - 1, B + 5)}
        db.append_message("s", "user", "next")  # B + 5: the tail is not due until 2B
        assert layout(db) == [tail(None)]
        bump(db, 2 * B - 100)
        db.append_message("s", "user", "near")
        assert layout(db) == [sealed(None, block(2)), tail(block(2))]
        assert_indexed(db)


# -- 5. a rebuild killed midway -------------------------------------------------------------

@pytest.mark.parametrize("task, steps", [("index", 2), ("cleanup", 1)])
def test_a_rebuild_killed_midway_is_finished_by_the_next_one(tmp_path: Path, task: str,
                                                              steps: int) -> None:
    path = tmp_path / "s.db"
    fw.build(path, [(block(0), 1200), (block(1), 1200), (block(3), 1200),
                    (block(4) - 400, 300)])
    proc = SPAWN.Process(target=fw.rebuild_and_die, args=(str(path), task, steps, TINY_HOLD),
                         daemon=True)
    proc.start()
    proc.join(120)
    assert proc.exitcode == -9, "the worker was to die by SIGKILL midway"
    with SessionDB(path) as db:
        assert db._read(search_index.rebuilding) is not None
        assert db._read(search_index.pending_messages) > 0
        # A writer meanwhile, crossing into the next block.
        db.create_session("w", "cli")
        for i in range(150):
            db.append_message("w", "user", fw.text(i))
        db.rebuild_search_index()
        ids = assert_indexed(db)
        assert len(ids) == 3900 + 150 and max(ids) > block(4)
        assert db._read(junk) == []


# -- 6. bulk imports ------------------------------------------------------------------------

@pytest.mark.parametrize("hold", [None, TINY_HOLD], ids=["one-step", "many-steps"])
def test_an_import_across_blocks_is_indexed_in_a_table_per_block(tmp_path: Path,
                                                                 hold: Optional[float]) -> None:
    path = tmp_path / "s.db"
    runs = [(block(0) + 5, 300), (block(1) + 10, 300), (block(3), 300), (block(6) - 150, 100)]
    with SessionDB(path, hold_timeout=hold) as db:
        assert db.import_sessions(fw.spread(runs)) == 4
        ids = assert_indexed(db)
        assert len(ids) == 1000
        index = held(db)
        assert all(len(blocks_of(v)) <= 1 for v in index.values()), \
            {k: blocks_of(v) for k, v in index.items()}
        assert {frozenset(blocks_of(v)) for v in index.values() if v} == {
            frozenset({0}), frozenset({1}), frozenset({3}), frozenset({5})}

        # Free ids below the tail: indexed into the sealed tables that cover them.
        more = fw.spread([(block(0) + 400, 20), (block(2) + 1, 20)], started_at=5000.0)
        assert db.import_sessions(more) == 2
        ids = assert_indexed(db)
        assert len(ids) == 1040
        db.create_session("live", "cli")
        db.append_message("live", "user", "after the imports")
        assert_indexed(db)


def test_an_import_with_ids_far_apart_is_indexed_in_steps_that_end(tmp_path: Path) -> None:
    """A pending range across empty blocks is indexed from its first message on, not
    walked one empty block at a time (2**61 ids apart: forever). (An import keeps ids
    up to 2**62 - 1.)"""
    with SessionDB(tmp_path / "s.db", hold_timeout=TINY_HOLD) as db:
        assert db.import_sessions(fw.spread([(5, 3), (2**61, 3)])) == 2
        far = fts_tables.block_start(2**61)  # 2**61 ends a block: the run spans two
        assert layout(db) == [sealed(None, far), sealed(far, 2**61 + 1), tail(2**61 + 1)]
        assert len(assert_indexed(db)) == 6


def test_ids_at_or_below_zero_go_with_the_first_table(tmp_path: Path) -> None:
    """Id 0 (which an import keeps) and negative ids (foreign SQL) lie in no block of
    their own: no table is bounded at or below id 1 for them, by an import's steps or
    a rebuild's."""
    with SessionDB(tmp_path / "s.db", hold_timeout=TINY_HOLD) as db:
        assert db.import_sessions(fw.spread([(0, 5)])) == 1
        assert layout(db) == [tail(None)]
        assert len(assert_indexed(db)) == 5
        db.append_message("s0", "user", "appended")
        assert layout(db) == [tail(None)]
        assert len(assert_indexed(db)) == 6

        def foreign(conn: Any) -> None:  # as a writer bypassing sessiondb would
            for mid in (-3 * B, -B - 5, -2):
                conn.execute("INSERT INTO messages (id, session_id, role, content, "
                             "timestamp) VALUES (?, 's0', 'user', ?, 1.0)",
                             (mid, fw.text(mid)))
        db._execute_write(foreign)
        assert len(assert_indexed(db)) == 9
        db.rebuild_search_index()
        assert layout(db) == [tail(None)]
        assert len(assert_indexed(db)) == 9

        assert db.import_sessions(fw.spread([(block(1) + 3, 5)], started_at=5000.0)) == 1
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        assert len(assert_indexed(db)) == 14
        db.rebuild_search_index()
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        assert len(assert_indexed(db)) == 14


# -- 7. doctor ------------------------------------------------------------------------------

def test_doctor_checks_every_table_and_finds_a_damaged_sealed_one(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    fw.build(path, [(block(0), 100), (block(1), 100), (block(2), 100)])
    with SessionDB(path) as db:
        tables = layout(db)
        assert len(tables) == 3
        assert_indexed(db)
    report = doctor.check(path)
    assert report["ok"] and report["fts_index"] == "ok", report["problems"]

    victim = tables[1][0]  # a sealed table in the middle
    raw = apsw.Connection(str(path))
    try:
        raw.execute(f"DELETE FROM {victim}_docsize WHERE id IN "
                    f"(SELECT id FROM {victim}_docsize LIMIT 3)")
    finally:
        raw.close()
    report = doctor.check(path)
    assert not report["ok"]
    assert report["fts_index"] != "ok"
    assert any(p.startswith("full-text index") for p in report["problems"])

    report = doctor.check(path, repair=True)
    assert report["ok"] and report["fts_index"] == "ok", report["problems"]
    with SessionDB(path) as db:
        assert len(assert_indexed(db)) == 300


@pytest.mark.parametrize("gone", ["tail", "sealed", "first"])
def test_doctor_reports_an_index_table_dropped_by_hand_and_repair_remakes_it(
        tmp_path: Path, gone: str) -> None:
    """Its triggers stay behind (they are on ``messages``), so every write fails until
    a rebuild: doctor says so (it does not crash, nor call the index ok) and its repair
    drops them with the rest."""
    path = tmp_path / "s.db"
    fw.build(path, [(block(0), 50), (block(1), 50), (block(2), 50)])
    with SessionDB(path) as db:
        tables = layout(db)
    victim = {"tail": tables[-1][0], "sealed": tables[1][0], "first": FIRST}[gone]
    raw = apsw.Connection(str(path))
    try:
        raw.execute(f"DROP TABLE {victim}")
    finally:
        raw.close()
    report = doctor.check(path)
    assert not report["ok"]
    assert f"no such table: {victim}" in report["fts_index"]
    report = doctor.check(path, repair=True)
    assert report["ok"] and report["fts_index"] == "ok", report["problems"]
    with SessionDB(path) as db:
        assert layout(db) == tables
        db.create_session("w", "cli")
        db.append_message("w", "user", "after the repair")
        assert db.delete_session(f"s{block(1)}")
        assert len(assert_indexed(db)) == 101


# -- 8. a store made before the cut (schema v4) -----------------------------------------

def v4_store(path: Path, messages: int) -> None:
    """A store as 0.7 made it: schema v4, its one index table reading ``messages``
    itself (no view)."""
    v1 = schema.MIGRATIONS[0]
    assert f"{schema.FTS_ROWS};" in v1 and "content='messages_fts_rows_0'" in v1
    v1 = v1.replace(f"{schema.FTS_ROWS};", "").replace("content='messages_fts_rows_0'",
                                                       "content='messages'")
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", "wal")
    with conn:
        conn.execute(v1)
        for step in schema.MIGRATIONS[1:4]:
            conn.execute(step)
        conn.pragma("user_version", 4)
    with conn:
        conn.execute("INSERT INTO sessions (id, source, started_at, message_count) "
                     "VALUES ('old', 'cli', 1.0, ?)", (messages,))
        for i in range(messages):
            conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                         "VALUES ('old', 'user', ?, 1.0)", (f"written by 0.7 {fw.text(i)}",))
    conn.close()


def table_sql(db: SessionDB, name: str) -> str:
    return db._read(lambda c: c.execute("SELECT sql FROM sqlite_schema WHERE name = ?",
                                        (name,)).fetchone()[0])


def test_a_v4_store_is_migrated_searched_and_rolled(tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    v4_store(path, 30)
    with SessionDB(path) as db:
        assert db._read(schema.user_version) == schema.SCHEMA_VERSION == 5
        assert layout(db) == [tail(None)]
        assert "content='messages'" in table_sql(db, FIRST)
        assert len(db.search_messages("written", limit=None)) == 30
        assert [h["id"] for h in db.search_messages('"note 7"')] == [8]
        assert_indexed(db)

        db.append_message("old", "user", "written by 0.8")
        assert len(db.search_messages("written", limit=None)) == 31
        bump(db, B - 10)
        for i in range(20):
            db.append_message("old", "user", fw.text(i))
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        old = FIRST  # sealed in place: still the table 0.7 made
        assert "content='messages'" in table_sql(db, old)  # still reads messages itself
        assert f"content='{fts_tables.rows_view(block(1))}'" in table_sql(
            db, table_name(block(1)))
        checks = db._read(fts_tables.checks)
        assert [c.endswith("'integrity-check', 1)") for c in checks] == [True, False]
        ids = assert_indexed(db)
        assert len(ids) == 51

        # A rebuild gives every table a view of its own range: all fully checked.
        assert db.rebuild_search_index() == 51
        assert layout(db) == [sealed(None, block(1)), tail(block(1))]
        assert f"content='{fts_tables.rows_view(None)}'" in table_sql(db, old)
        assert all(c.endswith("'integrity-check', 1)") for c in db._read(fts_tables.checks))
        assert_indexed(db)


def test_a_v4_store_already_past_a_block_seals_at_the_block_after_its_highest_id(
        tmp_path: Path) -> None:
    path = tmp_path / "v4.db"
    v4_store(path, 5)
    raw = apsw.Connection(str(path))
    with raw:
        raw.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", (2 * B - 50,))
        raw.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                    "VALUES ('old', 'user', 'far', 1.0)")
    raw.close()
    with SessionDB(path) as db:
        db.append_message("old", "user", "rolls")
        assert layout(db) == [sealed(None, block(2)), tail(block(2))]
        assert_indexed(db)


# -- a hermes-agent file ------------------------------------------------------------------

def test_a_hermes_file_with_ids_in_several_blocks_is_converted_to_a_table_per_block(
        tmp_path: Path) -> None:
    from test_compat_hermes_file import build_hermes_db
    path = tmp_path / "state.db"
    build_hermes_db(path)
    raw = apsw.Connection(str(path))
    with raw:
        for mid in [*range(block(1) + 5, block(1) + 205), *range(block(3), block(3) + 200),
                    *range(block(5) - 50, block(5) - 10)]:
            raw.execute("INSERT INTO messages (id, session_id, role, content, timestamp) "
                        "VALUES (?, 'x', 'user', ?, 1.0)", (mid, fw.text(mid)))
    raw.close()
    with SessionDB(path, hold_timeout=TINY_HOLD) as db:
        ids = assert_indexed(db)
        assert len(ids) == 4 + 440
        index = held(db)
        assert all(len(blocks_of(v)) <= 1 for v in index.values())
        assert {frozenset(blocks_of(v)) for v in index.values() if v} == {
            frozenset({0}), frozenset({1}), frozenset({3}), frozenset({4})}
        db.append_message("x", "user", "after the conversion")
        assert_indexed(db)
