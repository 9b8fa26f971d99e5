"""Bulk in and out: streamed export and import (API and CLI), imports in short steps beside
another writer, a kill midway and the rerun that finishes it, the JSON stream formats."""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import apsw
import pytest

import bulk_workers
from sessiondb import (
    AsyncSessionDB, IntegrityViolation, InvalidArgument, InvalidArgumentType, SessionDB, bulk,
    cli, export,
)
from sessiondb.jsonstream import ExportFormatError, read_items, write_json_list, write_jsonl

SPAWN = multiprocessing.get_context("spawn")


def check_store(path: Path) -> None:
    """Integrity, foreign keys, exact message counters, the full-text index complete and
    consistent with the messages, nothing left pending."""
    conn = apsw.Connection(str(path))
    try:
        conn.set_busy_timeout(5000)
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES('integrity-check', 1)")
        assert conn.execute(
            "SELECT id FROM sessions s WHERE message_count != "
            "(SELECT count(*) FROM messages m WHERE m.session_id = s.id)").fetchall() == []
        assert conn.execute("SELECT * FROM sessiondb_fts_pending").fetchall() == []
        count = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        assert conn.execute("SELECT count(*) FROM messages_fts_docsize").fetchone()[0] == count
        assert conn.execute("SELECT value FROM sessiondb_totals WHERE name = 'messages'"
                            ).fetchone()[0] == count
    finally:
        conn.close()


def generated(count: int, messages: int, seed: int = 1) -> list[dict[str, Any]]:
    return list(bulk_workers.sessions(count, messages, seed))


@pytest.fixture
def source(tmp_path: Path) -> Iterator[SessionDB]:
    """A store of 60 sessions x 20 messages, a parent and child among them, two sessions
    starting at the same time, and some messages appended later (ids out of session
    order)."""
    store = SessionDB(tmp_path / "source.db")
    data = generated(60, 20)
    data[5]["parent_session_id"] = data[4]["id"]
    data[7]["started_at"] = data[8]["started_at"]
    store.import_sessions(data)
    for item in data[:3]:
        store.append_message(item["id"], "assistant", "later words", metadata={"k": [1]})
    yield store
    store.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[SessionDB]:
    store = SessionDB(tmp_path / "fresh.db")
    yield store
    store.close()


@pytest.fixture(params=["caller", "thread"])
def reading(request, monkeypatch) -> str:
    """A stream read in the caller's thread, or in a staging thread
    (``read_in_thread=True``, sessiondb.bulk_stage): each test runs both ways."""
    if request.param == "thread":
        real = SessionDB.import_sessions

        def threaded(self: SessionDB, data: Any, **kw: Any) -> int:
            if not isinstance(data, (dict, list)):
                kw.setdefault("read_in_thread", True)
            return real(self, data, **kw)

        monkeypatch.setattr(SessionDB, "import_sessions", threaded)
    return request.param


# -- export ---------------------------------------------------------------------------

def test_iter_export_streams_in_batches_oldest_first(source: SessionDB, monkeypatch) -> None:
    expected = [source.export_session(sid) for (sid,) in apsw.Connection(
        str(source.path)).execute("SELECT id FROM sessions ORDER BY started_at, id")]
    monkeypatch.setattr(export, "EXPORT_BATCH_SESSIONS", 7)  # ties across batch edges too
    assert list(source.iter_export()) == expected
    monkeypatch.setattr(export, "EXPORT_BATCH_MESSAGES", 30)  # two sessions per batch
    assert list(source.iter_export()) == expected
    assert source.export_all() == expected
    assert [s["id"] for s in source.iter_export("telegram")] == \
        [s["id"] for s in expected if s["source"] == "telegram"]
    assert list(source.iter_export("nobody")) == []


def test_iter_export_reads_batch_by_batch(source: SessionDB, monkeypatch) -> None:
    """A session created while an export runs shows up if it starts after the last one
    read: no snapshot is held between batches."""
    monkeypatch.setattr(export, "EXPORT_BATCH_SESSIONS", 10)
    sessions = source.iter_export()
    first = [next(sessions) for _ in range(10)]
    source.import_sessions({"id": "late", "source": "cli", "started_at": 9e9})
    rest = list(sessions)
    assert len(first) + len(rest) == 61 and rest[-1]["id"] == "late"


def test_iter_export_checks_at_the_call(source: SessionDB) -> None:
    with pytest.raises(InvalidArgumentType):
        source.iter_export(5)  # type: ignore[arg-type]


# -- import: round trips ----------------------------------------------------------------

def test_stream_round_trip_into_fresh_store_is_equal(source: SessionDB,
                                                     fresh: SessionDB) -> None:
    reports: list[Any] = []
    assert fresh.import_sessions(source.iter_export(), progress=reports.append) == 60
    assert list(fresh.iter_export()) == list(source.iter_export())
    assert {r.task for r in reports} == {"import", "index"}
    last_import = [r for r in reports if r.task == "import"][-1]
    assert last_import.done == source.message_count() and last_import.unit == "messages"
    check_store(fresh.path)


@pytest.mark.parametrize("fmt", ["jsonl", "json"])
def test_cli_round_trip_through_a_file(source: SessionDB, tmp_path: Path, capsys,
                                       fmt: str) -> None:
    dump, target = tmp_path / f"dump.{fmt}", tmp_path / "target.db"
    assert cli.main(["export", "--db", str(source.path), "--format", fmt, "-o", str(dump),
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"file": str(dump), "sessions": 60, "messages": 1203}
    text = dump.read_text(encoding="utf-8")
    if fmt == "json":  # the same text as the JSON list of before, written item by item
        assert text == json.dumps(source.export_all(), indent=2, ensure_ascii=False) + "\n"
    else:
        assert [json.loads(line) for line in text.splitlines()] == source.export_all()
    assert cli.main(["import", str(dump), "--db", str(target), "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"imported": 60} and err == ""  # --json: no progress bar
    with SessionDB(target) as db:
        assert list(db.iter_export()) == list(source.iter_export())
    check_store(target)


def test_cli_jsonl_to_stdout_and_import_from_stdin(source: SessionDB, tmp_path: Path,
                                                   capsys, monkeypatch) -> None:
    assert cli.main(["export", "--db", str(source.path), "--jsonl"]) == 0
    exported = capsys.readouterr().out
    assert len(exported.splitlines()) == 60
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(exported.encode())))
    target = tmp_path / "target.db"
    assert cli.main(["import", "-", "--db", str(target)]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "imported 60 session(s)"
    assert "import " in err and "index " in err  # the progress bar
    with SessionDB(target) as db:
        assert db.export_all() == source.export_all()


def test_cli_import_of_a_file_broken_midway(source: SessionDB, tmp_path: Path,
                                            capsys, monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 100)
    exported = list(source.iter_export())
    lines = [json.dumps(s) for s in exported]
    lines[40] = lines[40][:-5]  # cut short
    dump, target = tmp_path / "dump.jsonl", tmp_path / "target.db"
    dump.write_text("\n".join(lines) + "\n")
    code = cli.main(["import", str(dump), "--db", str(target)])
    err = capsys.readouterr().err
    assert code == 2 and "is not a JSON export" in err and "line 41" in err
    with SessionDB(target) as db:
        imported = db.session_count()
        assert 0 < imported <= 40
    check_store(target)  # what came before is complete and indexed
    lines[40] = json.dumps(exported[40])
    dump.write_text("\n".join(lines) + "\n")
    assert cli.main(["import", str(dump), "--db", str(target), "--skip-existing",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"imported": 60 - imported}
    with SessionDB(target) as db:
        assert db.export_all() == source.export_all()


def test_search_finds_imported_messages_as_in_a_store_built_by_appends(
        tmp_path: Path) -> None:
    built, imported = SessionDB(tmp_path / "built.db"), SessionDB(tmp_path / "imported.db")
    try:
        for item in generated(20, 12, seed=3):
            built.create_session(item["id"], item["source"], title=item["title"])
            for m in item["messages"]:
                built.append_message(item["id"], m["role"], m["content"],
                                     tool_calls=m["tool_calls"])
        imported.import_sessions(built.iter_export())
        assert imported.export_all() == built.export_all()
        for query in ("alpha", "bravo charlie", "kil*", "alpha OR zulu", "marker3x4",
                      '"echo foxtrot"', "tango NOT lima"):
            assert imported.search_messages(query, limit=50) == \
                built.search_messages(query, limit=50), query
            assert imported.search_messages(query, sources=["cli"], offset=3) == \
                built.search_messages(query, sources=["cli"], offset=3), query
    finally:
        built.close()
        imported.close()
    check_store(tmp_path / "imported.db")


# -- import: streams, batches and order ---------------------------------------------------

def test_a_generator_is_consumed_lazily(db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 200)
    store, other = SessionDB(db_path), SessionDB(db_path)
    seen_at: list[int] = []

    def sessions() -> Iterator[dict[str, Any]]:
        for i, item in enumerate(bulk_workers.sessions(50, 20)):
            if not seen_at and other.session_count() > 0:
                seen_at.append(i)  # another connection sees what was committed
            yield item

    try:
        assert store.import_sessions(sessions()) == 50
        # The first batch (about 200 messages: 10 sessions) was committed long before
        # the generator was exhausted.
        assert seen_at and seen_at[0] <= 12
    finally:
        store.close()
        other.close()
    check_store(db_path)


@pytest.mark.usefixtures("reading")
def test_a_conflict_midway_in_a_stream_says_what_was_imported(fresh: SessionDB,
                                                               monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 100)
    data = generated(40, 10)
    fresh.import_sessions({"id": data[25]["id"], "source": "mine", "started_at": 1.0})
    with pytest.raises(IntegrityViolation) as info:
        fresh.import_sessions(iter(data))
    message = str(info.value)
    assert "already exists" in message and "skip_existing=True" in message
    assert "were imported" in message
    before = fresh.session_count() - 1
    assert 0 < before <= 25 and f"{before:,} session(s)" in message
    assert fresh.import_sessions(iter(data), skip_existing=True) == 39 - before
    assert fresh.session_count() == 40
    assert fresh.get_session(data[25]["id"])["source"] == "mine"
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_a_child_waits_for_its_parent_later_in_the_stream(fresh: SessionDB,
                                                          monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 50)
    data = generated(30, 5)
    data[2]["parent_session_id"] = data[20]["id"]   # several batches later
    data[3]["parent_session_id"] = data[2]["id"]    # a grandchild, waiting too
    data[21]["parent_session_id"] = data[21]["id"]  # its own parent: fine
    assert fresh.import_sessions(iter(data)) == 30
    assert [fresh.get_session(data[i]["id"])["parent_session_id"] for i in (2, 3, 21)] == \
        [data[20]["id"], data[2]["id"], data[21]["id"]]
    assert fresh.message_count() == 150
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_a_child_whose_parent_never_comes_is_refused_at_the_end(fresh: SessionDB,
                                                                monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 50)
    data = generated(20, 5)
    data[4]["parent_session_id"] = "nowhere"
    with pytest.raises(IntegrityViolation) as info:
        fresh.import_sessions(iter(data))
    assert "'nowhere'" in str(info.value) and "neither in the store" in str(info.value)
    assert fresh.session_count() == 19 and fresh.get_session(data[4]["id"]) is None
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_waiting_children_go_in_when_someone_else_creates_the_parent(
        fresh: SessionDB, monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 20)
    data = generated(12, 3)
    data[3]["parent_session_id"] = data[2]["id"]  # grandchild first, then child
    data[2], data[3] = data[3], data[2]
    data[3]["parent_session_id"] = "created-meanwhile"

    def sessions() -> Iterator[dict[str, Any]]:
        yield from data
        with SessionDB(fresh.path) as other:  # before the stream ends
            other.create_session("created-meanwhile", "cli")

    assert fresh.import_sessions(sessions()) == 12
    assert fresh.get_session(data[2]["id"])["parent_session_id"] == data[3]["id"]
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_too_many_children_waiting_is_refused(fresh: SessionDB, monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 20)
    monkeypatch.setattr(bulk, "WAITING_SESSIONS", 5)
    data = [dict(s, parent_session_id="later") for s in generated(10, 2)]
    with pytest.raises(IntegrityViolation, match="wait for a parent"):
        fresh.import_sessions(iter(data))
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_bad_input_in_a_stream(fresh: SessionDB, monkeypatch) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 50)
    for data, error in [("text", InvalidArgumentType), (b"x", InvalidArgumentType),
                        (42, InvalidArgumentType), (iter([1]), InvalidArgumentType),
                        ({"id": "s"}.keys(), InvalidArgumentType)]:
        with pytest.raises(error):
            fresh.import_sessions(data)
    data = generated(20, 5)
    data[12]["messages"][3]["timestamp"] = float("nan")
    with pytest.raises(InvalidArgument) as info:
        fresh.import_sessions(iter(data))
    assert 0 < fresh.session_count() < 12  # the batch with the bad session: not written
    assert "timestamp" in str(info.value)
    assert f"{fresh.session_count()} session(s) were imported before it" in str(info.value)
    assert fresh.get_session(data[12]["id"]) is None

    def broken() -> Iterator[dict[str, Any]]:
        yield from generated(3, 2, seed=9)[2:]
        raise OSError("the disk went away")

    with pytest.raises(OSError):
        fresh.import_sessions(broken())
    check_store(fresh.path)


def test_a_list_is_checked_as_a_whole_before_anything_is_written(db_path: Path) -> None:
    """A conflict at the end of a list that takes many steps: nothing is written, and
    SQLite's own refusal is what is raised (as when the import was one transaction;
    for a missing parent, in words that name the session)."""
    with SessionDB(db_path, hold_timeout=0.05) as db:
        db.create_session("taken-title", "cli", title="taken")
        for bad in ({"parent_session_id": "nowhere"}, {"title": "taken"},
                    {"title": "bulk title 3"}):
            data = generated(300, 20)
            data[-1].update(bad)
            with pytest.raises(IntegrityViolation) as info:
                db.import_sessions(data)
            assert isinstance(info.value.__cause__, apsw.ConstraintError)
            assert db.session_count() == 1 and db.message_count() == 0
        assert db.import_sessions(generated(300, 20)[:-1]) == 299
    check_store(db_path)


@pytest.mark.usefixtures("reading")
def test_taken_message_ids_keep_each_session_in_order(fresh: SessionDB) -> None:
    # Previously the taken id moved past the store's last and the free one stayed.
    fresh.import_sessions({"id": "mine", "source": "cli", "started_at": 1.0, "messages": [
        {"id": i, "role": "user", "content": "x", "timestamp": 1.0} for i in (1, 100)]})
    fresh.import_sessions({"id": "s0", "source": "cli", "started_at": 2.0, "messages": [
        {"id": i, "role": "user", "content": f"n{i}", "timestamp": 2.0} for i in (1, 2)]})
    assert [(m["id"], m["content"]) for m in fresh.get_messages("s0")] == \
        [(101, "n1"), (102, "n2")]
    fresh.delete_session("s0")
    fresh.delete_session("mine")
    fresh.import_sessions({"id": "mine", "source": "cli", "started_at": 1.0,
                           "messages": [{"id": 2, "role": "user", "content": "x",
                                         "timestamp": 1.0}]})
    data = {"id": "s", "source": "cli", "started_at": 2.0, "messages": [
        {"id": i, "role": "user", "content": f"m{i}", "timestamp": 2.0} for i in (1, 2, 3)]}
    fresh.import_sessions(iter([data]))
    got = fresh.get_messages("s")
    assert [m["content"] for m in got] == ["m1", "m2", "m3"]
    # 1 kept; 2 taken: it and the rest move past the highest id ever given (102)
    assert [m["id"] for m in got] == [1, 103, 104]
    assert [h["session_id"] for h in fresh.search_messages("m3")] == ["s"]
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_a_fresh_import_keeps_one_pending_range_then_none(fresh: SessionDB) -> None:
    reader = apsw.Connection(str(fresh.path), flags=apsw.SQLITE_OPEN_READONLY)
    ranges: list[int] = []

    def progress(p: Any) -> None:
        if p.task == "import":
            ranges.append(reader.execute("SELECT count(*) FROM sessiondb_fts_pending")
                          .fetchone()[0])

    try:
        fresh.import_sessions(iter(generated(200, 50)), progress=progress)
    finally:
        reader.close()
    assert len(ranges) > 1 and set(ranges) == {1}
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_an_import_counts_its_rows_and_leaves_the_triggers_on(fresh: SessionDB) -> None:
    # Its deferred rows go in with the connection's triggers off (they would only have
    # counted them): the total is kept by the import itself, and every later write of
    # the connection fires them again.
    fresh.create_session("before", "cli")
    fresh.append_message("before", "user", "zebra before")
    fresh.import_sessions(iter(generated(80, 30)))
    fresh.append_message("before", "user", "zebra after")
    assert [h["snippet"] for h in fresh.search_messages("zebra")] == [
        ">>>zebra<<< after", ">>>zebra<<< before"]
    assert fresh.message_count() == 1 + 80 * 30 + 1  # "zebra after" counted
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
@pytest.mark.parametrize("table", ["messages", "Messages"])
def test_a_trigger_of_someone_elses_on_messages_fires_for_imported_rows(
        fresh: SessionDB, table: str) -> None:
    conn = apsw.Connection(str(fresh.path))
    conn.execute(f"CREATE TABLE audit (id INTEGER); CREATE TRIGGER audit_insert AFTER "
                 f"INSERT ON {table} BEGIN INSERT INTO audit VALUES (new.id); END")
    conn.close()
    fresh.import_sessions(iter(generated(40, 25)))
    conn = apsw.Connection(str(fresh.path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] == 40 * 25
        assert conn.execute("SELECT count(*) FROM audit WHERE id NOT IN "
                            "(SELECT id FROM messages)").fetchone()[0] == 0
    finally:
        conn.close()
    check_store(fresh.path)


def test_the_triggers_are_on_again_after_a_failed_insert(db_path: Path) -> None:
    from sessiondb import search_index

    SessionDB(db_path).close()
    conn = apsw.Connection(str(db_path))

    def insert() -> None:
        assert conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1) == 0
        conn.execute("INSERT INTO messages (session_id, role, timestamp) "
                     "VALUES ('none', NULL, 1)")

    with pytest.raises(apsw.ConstraintError):
        with conn:
            search_index.insert_pending(conn, insert)
    assert conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1) == 1
    conn.close()


def test_a_temp_trigger_keeps_the_triggers_on(db_path: Path) -> None:
    # The setting does not turn TEMP triggers off, and their changes would be counted
    # into the total: with one, the rows go in the ordinary way.
    from sessiondb import search_index

    with SessionDB(db_path) as db:
        db.create_session("s", "cli")
    conn = apsw.Connection(str(db_path))
    conn.execute("CREATE TEMP TABLE seen (id INTEGER); CREATE TEMP TRIGGER seen_insert "
                 "AFTER INSERT ON main.messages BEGIN INSERT INTO seen VALUES (new.id); END")
    with conn:
        conn.execute("INSERT INTO sessiondb_fts_pending (lo, hi) VALUES (1, 100)")
        search_index.insert_pending(conn, lambda: conn.executemany(
            "INSERT INTO messages (id, session_id, role, content, timestamp) "
            "VALUES (?, 's', 'user', 'x', 1)", [(i,) for i in range(1, 4)]))
    assert conn.execute("SELECT count(*) FROM seen").fetchone()[0] == 3
    assert conn.execute("SELECT value FROM sessiondb_totals").fetchone()[0] == 3
    conn.close()


@pytest.mark.usefixtures("reading")
def test_a_rerun_that_stops_at_once_still_indexes_what_a_cut_import_left(
        tmp_path: Path) -> None:
    # Cut during its indexing (as by a kill), an import leaves its messages pending,
    # unsearchable. A rerun without skip_existing stopped at the first session already
    # there, and left them so; it now indexes them before it raises.
    data = generated(100, 50)

    def cut(p: Any) -> None:
        if p.task == "index" and p.done < (p.total or 0):
            raise KeyboardInterrupt

    fresh = SessionDB(tmp_path / "cut.db", hold_timeout=0.05)
    with pytest.raises(KeyboardInterrupt):
        fresh.import_sessions(iter(data), progress=cut)
    reader = apsw.Connection(str(fresh.path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert reader.execute("SELECT count(*) FROM sessiondb_fts_pending").fetchone()[0]
    finally:
        reader.close()
    with pytest.raises(IntegrityViolation, match="already exists"):
        fresh.import_sessions(iter(data))
    fresh.close()
    check_store(fresh.path)


@pytest.mark.usefixtures("reading")
def test_import_in_a_transaction_block_is_one_call(fresh: SessionDB) -> None:
    fresh.create_session("taken", "cli")
    data = generated(5, 3) + [{"id": "taken", "source": "x", "started_at": 1.0}]
    counts: list[int] = []
    with fresh.transaction():
        fresh.append_message("taken", "user", "kept")
        with pytest.raises(IntegrityViolation):
            fresh.import_sessions(iter(data))
        assert fresh.import_sessions(iter(data[:5]), progress=lambda p: counts.append(
            fresh.message_count())) == 5  # the callback may use the store
    assert counts == [16]
    assert fresh.session_count() == 6 and fresh.message_count() == 16
    check_store(fresh.path)


def test_async_iter_export(source: SessionDB) -> None:
    async def main() -> list[dict[str, Any]]:
        async with AsyncSessionDB(source.path) as adb:
            return [s async for s in adb.iter_export()]

    assert asyncio.run(main()) == source.export_all()


# -- import beside another writer, with a tiny hold bound; and a kill ------------------------

@pytest.mark.slow
@pytest.mark.usefixtures("reading")
def test_import_in_short_steps_beside_another_writer(db_path: Path) -> None:
    SessionDB(db_path).close()
    results, ready, stop = SPAWN.Queue(), SPAWN.Event(), SPAWN.Event()
    writer = SPAWN.Process(target=bulk_workers.appender,
                           args=(str(db_path), "appender", ready, stop, results))
    writer.start()
    assert ready.wait(60)
    reports: list[Any] = []
    try:
        with SessionDB(db_path, hold_timeout=0.05) as db:
            assert db.import_sessions(bulk_workers.sessions(400, 50),
                                      progress=reports.append) == 400
    finally:
        stop.set()
        acked, error = results.get(timeout=60)
        writer.join(60)
    assert error == "" and writer.exitcode == 0
    assert len([r for r in reports if r.task == "import"]) >= 5  # several steps
    assert len([r for r in reports if r.task == "index"]) >= 5
    with SessionDB(db_path) as db:
        assert {m["id"] for m in db.get_messages("appender", limit=None)} == set(acked)
        assert db.get_session("appender")["message_count"] == len(acked)
        assert db.message_count() == 400 * 50 + len(acked)
        assert db.search_messages("marker399x49")[0]["session_id"] == "bulk-00399"
    check_store(db_path)


@pytest.mark.slow
def test_a_killed_import_loses_nothing_committed_and_a_rerun_finishes(tmp_path: Path
                                                                      ) -> None:
    dump, path = tmp_path / "dump.jsonl", tmp_path / "state.db"
    bulk_workers.write_jsonl(dump, 400, 50)
    SessionDB(path).close()
    child = SPAWN.Process(target=bulk_workers.importer, args=(str(path), str(dump), 0.05))
    child.start()
    reader = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        deadline = time.monotonic() + 60
        while reader.execute("SELECT count(*) FROM sessions").fetchone()[0] < 30:
            assert child.is_alive() and time.monotonic() < deadline
            time.sleep(0.002)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
    finally:
        reader.close()
    # Counted on a connection opened after the kill: a commit whose frames reached the
    # WAL just before the SIGKILL, but not the WAL index, is invisible to a reader that
    # was open all along and is found by the next opener's recovery (the rerun's).
    reader = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        counts = reader.execute(
            "SELECT s.message_count, (SELECT count(*) FROM messages m "
            "WHERE m.session_id = s.id) FROM sessions s").fetchall()
    finally:
        reader.close()
    assert child.exitcode == -signal.SIGKILL
    assert 30 <= len(counts) < 400
    assert all(c == (50, 50) for c in counts)  # each session complete, none half-written
    with SessionDB(path) as db, open(dump, "rb") as fh:
        assert db.import_sessions(read_items(fh), skip_existing=True) == 400 - len(counts)
        assert db.session_count() == 400 and db.message_count() == 400 * 50
        # Messages committed by the killed run and by the rerun are all searchable.
        for i in (0, len(counts) - 1, 399):
            assert [h["session_id"] for h in db.search_messages(f"marker{i}x7")] == \
                [f"bulk-{i:05d}"]
    check_store(path)


# -- the JSON stream formats ------------------------------------------------------------

ITEMS = [{"id": "a", "messages": [{"content": "x\ny \u00e9\u4e2d \U0001f600", "n": 10**20}]},
         {"id": "b", "v": [1.5e300, None, True, False, -0.0]}, {}]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 1 << 20])
@pytest.mark.parametrize("writer", [write_json_list, write_jsonl])
def test_formats_read_back_whatever_the_chunks(chunk: int, writer) -> None:
    out = io.StringIO()
    writer(out, iter(ITEMS))
    text = out.getvalue()
    for source in (io.BytesIO(text.encode()), io.BytesIO(b"\xef\xbb\xbf" + text.encode()),
                   io.StringIO(text)):
        assert list(read_items(source, chunk)) == ITEMS


@pytest.mark.parametrize("text, items", [
    ("[]", []), ("  [ ]\n", []), ('{"a": 1}', [{"a": 1}]),
    ('{"a":\n 1}\n\n{"b": 2}\n', [{"a": 1}, {"b": 2}]), ("[1, 22, 333]", [1, 22, 333]),
])
def test_formats_told_apart_by_the_first_character(text: str, items: list) -> None:
    for chunk in (1, 3, 1 << 20):
        assert list(read_items(io.BytesIO(text.encode()), chunk)) == items


@pytest.mark.parametrize("text, where", [
    ("", (1, 1)), ("{not json", (1, 2)), ("[1, 2", (1, 6)), ("[1 2]", (1, 4)),
    ("[1] x", (1, 5)), ('{"a": tru}', (1, 7)), ('{"a": 1}\n{', (2, 2)), ("[1,]", (1, 4)),
    ('[\n  1,\n  2 3]', (3, 5)), ('["abc', (1, 2)),
])
def test_bad_input_is_located(text: str, where: tuple[int, int]) -> None:
    for chunk in (1, 3, 1 << 20):
        with pytest.raises(ExportFormatError) as info:
            list(read_items(io.BytesIO(text.encode()), chunk))
        assert (info.value.line, info.value.column) == where
    with pytest.raises(ExportFormatError, match="not UTF-8"):
        list(read_items(io.BytesIO(b'{"a": "\xff"}')))


@pytest.mark.parametrize("text, message", [
    # Valid JSON that Python's decoder will not read: an integer of more than 4,300
    # digits (ValueError), values nested 100,000 deep (RecursionError). Previously these
    # reached the CLI as a traceback and exit 1.
    ('{"a": 1}\n{"n": ' + "9" * 5000 + "}", "a value Python cannot read"),
    ('{"a": 1}\n{"n": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
])
def test_json_python_cannot_read_is_bad_input(text: str, message: str) -> None:
    with pytest.raises(ExportFormatError, match=message) as info:
        list(read_items(io.BytesIO(text.encode())))
    assert (info.value.line, info.value.column) == (2, 1)


def test_a_long_value_is_read_in_linear_time() -> None:
    """A 4 MB session read in 1 KB chunks: the buffer grows geometrically, so the value
    is decoded a handful of times, not once per chunk."""
    item = {"id": "big", "content": "word " * 800_000}
    reads = []

    class Counting(io.BytesIO):
        def read(self, size: int = -1) -> bytes:
            reads.append(size)
            return super().read(size)

    assert list(read_items(Counting(json.dumps(item).encode()), 1024)) == [item]
    assert len(reads) < 30

