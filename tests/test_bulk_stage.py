"""Imports read in a staging thread (sessiondb.bulk_stage): the store gets what the
caller's thread would have written, the thread stays a bounded way ahead, and its files
go away however the import ends. (tests/test_bulk.py runs its stream tests both ways.)"""

from __future__ import annotations

import fcntl
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import apsw
import pytest

import bulk_workers
from sessiondb import (
    IntegrityViolation, InvalidArgumentType, SessionDB, bulk, bulk_stage, records,
)
from sessiondb.jsonstream import ExportFormatError, read_items


def varied(count: int) -> list[dict[str, Any]]:
    """Sessions with every kind of value an export holds: absent and present counters,
    JSON columns, non-ASCII text, NULL content, kept, missing and repeated message ids,
    a parent later in the stream, sessions without messages."""
    out = []
    for i in range(count):
        item: dict[str, Any] = {"id": f"v{i:04d}", "source": ("cli", "slack", "é")[i % 3],
                                "started_at": 1000.0 + i}
        if i % 2:
            item.update(ended_at=2000.0 + i, title=f"título {i}", model="m",
                        model_config={"t": [i, None]}, input_tokens=i, revision=i % 4,
                        estimated_cost_usd=0.25 * i, end_reason="done")
        if i % 5 == 3 and i + 4 < count:
            item["parent_session_id"] = f"v{i + 4:04d}"  # comes later in the stream
        messages = []
        for k in range(i % 7):
            m: dict[str, Any] = {"role": ("user", "assistant", "tool")[k % 3],
                                 "content": None if k == 4 else f"текст {i} {k} \U0001f600",
                                 "timestamp": 1000.0 + i + k / 10}
            if i % 4 == 0:
                m["id"] = 10_000 + i * 10 + k  # kept
            elif i % 4 == 1 and k == 1:
                m["id"] = 10_000 + (i - 1) * 10  # taken by an earlier session: moves on
            if k % 3 == 1:
                m.update(tool_calls=[{"id": f"c{k}"}], reasoning="why", token_count=k,
                         metadata={"k": k}, finish_reason="stop", tool_name="t")
            messages.append(m)
        item["messages"] = messages
        out.append(item)
    return out


def dump(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode()


def table(path: Path, name: str) -> list[tuple]:
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()
    finally:
        conn.close()


@pytest.fixture
def staging_dir(tmp_path: Path, monkeypatch) -> Path:
    """The system's temporary directory, as the staging thread sees it."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def attached(db: SessionDB) -> list[str]:
    return [r[1] for r in db._read(lambda c: c.execute("PRAGMA database_list").fetchall())]


@pytest.mark.parametrize("step_rows", [7, 50_000])
def test_a_staged_import_writes_what_the_callers_thread_writes(
        tmp_path: Path, monkeypatch, staging_dir: Path, step_rows: int) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", step_rows)
    monkeypatch.setattr(bulk_stage, "FLUSH_ROWS", 10)
    data = dump(varied(120))
    copies: list[bool] = []  # per run of staged messages: did its ids change?
    real = bulk_stage.insert_messages

    def spy(conn: Any, runs: list[bulk_stage.Run]) -> None:
        copies.extend(r.ids is not None for r in runs)
        real(conn, runs)

    monkeypatch.setattr(bulk_stage, "insert_messages", spy)
    paths = {}
    for how in (False, True):
        paths[how] = tmp_path / f"{how}.db"
        with SessionDB(paths[how]) as db:
            # A message there first: the ids it takes move.
            db.import_sessions({"id": "other", "source": "cli", "started_at": 1.0,
                                "messages": [{"id": 10_040, "role": "user",
                                              "content": "first", "timestamp": 1.0}]})
            assert db.import_sessions(read_items(io.BytesIO(data)),
                                      read_in_thread=how) == 120
            assert attached(db) == ["main"]
            assert db.search_messages("текст")
    for name in ("sessions", "messages", "sessiondb_totals", "sqlite_sequence"):
        assert table(paths[True], name) == table(paths[False], name), name
    assert list(staging_dir.iterdir()) == []
    assert True in copies and False in copies  # copied in SQL, with new ids and without


@pytest.mark.parametrize("step_rows", [1, 3, 7, 40])
def test_the_order_of_an_import_does_not_depend_on_its_step_sizes(
        tmp_path: Path, monkeypatch, step_rows: int) -> None:
    # A child read before its parent goes in right after the parent, whether the parent
    # comes in a later step or in the same one; the ids its messages take follow.
    data = dump(varied(120))
    paths = {}
    for rows in (step_rows, 50_000):
        monkeypatch.setattr(bulk, "MAX_STEP_ROWS", rows)
        paths[rows] = tmp_path / f"{rows}.db"
        with SessionDB(paths[rows]) as db:
            assert db.import_sessions(read_items(io.BytesIO(data)),
                                      read_in_thread=False) == 120
    for name in ("sessions", "messages", "sqlite_sequence"):
        assert table(paths[step_rows], name) == table(paths[50_000], name), name


def test_every_key_of_an_imported_session_is_a_staged_column() -> None:
    full = {c: None for c in records.IMPORT_SESSION_COLUMNS}
    full.update(id="s", source="cli", started_at=1.0, ended_at=2.0, title="t", model="m",
                model_config={"a": 1}, estimated_cost_usd=0.5, actual_cost_usd=0.5,
                **{c: 1 for c in ("input_tokens", "output_tokens", "cache_read_tokens",
                                  "cache_write_tokens", "reasoning_tokens", "revision")},
                **{c: "x" for c in ("user_id", "system_prompt", "end_reason",
                                    "billing_provider", "billing_base_url", "billing_mode",
                                    "cost_status", "cost_source", "pricing_version")},
                parent_session_id="p", messages=[{"role": "user", "content": "x",
                                                  "timestamp": 1.0}])
    row = records.import_session(full)
    assert set(row) - {"messages"} == set(bulk_stage.SESSION_COLUMNS)


def test_checkpoints_of_the_store_go_on_while_the_staging_file_is_attached(
        fresh_path: Path, staging_dir: Path) -> None:
    # Without a name, a checkpoint covers every attached database, and the read-only
    # staging file made it fail ("disk I/O error"), counted as a disk fault.
    data = dump(list(bulk_workers.sessions(100, 20)))
    with SessionDB(fresh_path, checkpoint_every=1) as db:
        seen: list[dict[str, Any]] = []

        def progress(p: Any) -> None:
            if p.task == "import":
                seen.append(db.checkpoint())

        db.import_sessions(read_items(io.BytesIO(data)), progress=progress)
        assert seen and db.stats()["checkpoint"]["passive_failed"] == 0
        assert db.stats()["checkpoint"]["last_error"] in (None, "")


def test_a_connection_opened_again_midway_takes_the_rows_back(
        fresh_path: Path, monkeypatch, staging_dir: Path) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 100)
    fetched: list[int] = []
    real = bulk_stage.Stage.fetch

    def spy(self: bulk_stage.Stage, staged: bulk_stage.Staged) -> list[tuple]:
        fetched.append(staged.session)
        return real(self, staged)

    monkeypatch.setattr(bulk_stage.Stage, "fetch", spy)
    data = dump(varied(60))
    with SessionDB(fresh_path) as db:
        reopened: list[int] = []

        def progress(p: Any) -> None:
            if p.task == "import" and len(reopened) < 3:
                db._engine._park_for_fork()  # closes the idle connection, as a fork does
                db._engine._unpark()
                reopened.append(p.done)

        assert db.import_sessions(read_items(io.BytesIO(data)), progress=progress) == 60
        assert len(reopened) == 3 and attached(db) == ["main"]
        assert len(fetched) > 20  # the sessions after the first reopening, and waiting ones
    with SessionDB(fresh_path.with_name("plain.db")) as db:
        db.import_sessions(read_items(io.BytesIO(data)), read_in_thread=False)
    for name in ("sessions", "messages"):
        assert table(fresh_path, name) == table(fresh_path.with_name("plain.db"), name)


def test_an_import_reads_in_the_callers_thread_when_no_staging_file_can_be_made(
        fresh_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing" / "dir"))
    with SessionDB(fresh_path) as db:
        assert db.import_sessions(read_items(io.BytesIO(dump(varied(20))))) == 20
        assert db.session_count() == 20


def test_read_items_is_read_in_a_thread_unless_told_otherwise(
        fresh_path: Path, monkeypatch, staging_dir: Path) -> None:
    started: list[bool] = []
    real = bulk_stage.Stage.__init__

    def spy(self: bulk_stage.Stage, items: Iterator[Any]) -> None:
        started.append(True)
        real(self, items)

    monkeypatch.setattr(bulk_stage.Stage, "__init__", spy)
    data = dump(varied(10))
    with SessionDB(fresh_path) as db:
        db.import_sessions(read_items(io.BytesIO(data)))
        assert started == [True]
        db.import_sessions(read_items(io.BytesIO(data)), read_in_thread=False,
                           skip_existing=True)
        db.import_sessions(iter(varied(12)), skip_existing=True)  # any other iterable
        assert started == [True]
        with pytest.raises(InvalidArgumentType, match="read_in_thread"):
            db.import_sessions(iter([]), read_in_thread="yes")


def test_the_staging_files_go_away_however_the_import_ends(
        fresh_path: Path, staging_dir: Path) -> None:
    good = dump(varied(30))
    other = dump(list(bulk_workers.sessions(50, 20)))

    def cut(p: Any) -> None:
        raise KeyboardInterrupt

    with SessionDB(fresh_path) as db:
        db.create_session("v0007", "cli")
        for data, error, kw in [
                (good + b"{not json\n", ExportFormatError, {}),   # bad input
                (good, IntegrityViolation, {}),                  # a conflict midway
                (other, KeyboardInterrupt, {"progress": cut})]:  # the caller stops it
            with pytest.raises(error):
                db.import_sessions(read_items(io.BytesIO(data)), **kw)
            assert list(staging_dir.iterdir()) == [], error
            assert attached(db) == ["main"]
        assert db.import_sessions(read_items(io.BytesIO(other)), skip_existing=True) > 0
        assert db.session_count() == 51
        assert list(staging_dir.iterdir()) == []


def test_a_killed_imports_staging_directory_is_removed_by_the_next_import(
        fresh_path: Path, staging_dir: Path) -> None:
    old = time.time() - 3600
    names = ["sessiondb-import-1-killed",   # old, its lock free: removed
             "sessiondb-import-2-nolock",   # old, no lock file (as an older version's)
             "sessiondb-import-3-running",  # old, its lock held: an import runs
             "sessiondb-import-4-new",      # made just now (its lock not taken yet)
             "unrelated"]
    for name in names:
        (staging_dir / name).mkdir()
        (staging_dir / name / "stage.db").write_bytes(b"x")
        if name != "sessiondb-import-2-nolock":
            (staging_dir / name / "lock").touch()
    (staging_dir / "sessiondb-import-5-link").symlink_to(staging_dir / "unrelated")
    held = open(staging_dir / "sessiondb-import-3-running" / "lock", "a")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for name in names + ["sessiondb-import-5-link"]:
        if name != "sessiondb-import-4-new":
            os.utime(staging_dir / name, (old, old), follow_symlinks=False)
    try:
        with SessionDB(fresh_path) as db:
            db.import_sessions(read_items(io.BytesIO(dump(varied(3)))))
    finally:
        held.close()
    assert sorted(p.name for p in staging_dir.iterdir()) == [
        "sessiondb-import-3-running", "sessiondb-import-4-new", "sessiondb-import-5-link",
        "unrelated"]
    assert (staging_dir / "unrelated" / "stage.db").exists()


def test_the_staging_thread_stays_a_bounded_way_ahead(fresh_path: Path, monkeypatch,
                                                      staging_dir: Path) -> None:
    monkeypatch.setattr(bulk, "MAX_STEP_ROWS", 100)
    monkeypatch.setattr(bulk_stage, "AHEAD_ROWS", 200)
    monkeypatch.setattr(bulk_stage, "AHEAD_CHARS", 10**12)
    monkeypatch.setattr(bulk_stage, "FLUSH_ROWS", 40)
    pulled: list[int] = []
    seen: list[tuple[int, int]] = []

    def sessions() -> Iterator[dict[str, Any]]:
        for i, item in enumerate(bulk_workers.sessions(300, 20)):
            pulled.append(i)
            yield item

    def progress(p: Any) -> None:
        if p.task == "import":
            seen.append((p.done, len(pulled)))

    with SessionDB(fresh_path) as db:
        assert db.import_sessions(sessions(), read_in_thread=True, progress=progress) == 300
    # Never more than the bound, a flush and a step's intake ahead of the writes: (200 +
    # 40 + 100) rows, 16 sessions of 20 messages; counted here in messages, and the
    # session the generator is on.
    assert len(seen) > 10
    assert all((taken - 1) * 20 - done <= 200 + 40 + 100 for done, taken in seen), seen


@pytest.fixture
def fresh_path(tmp_path: Path) -> Path:
    return tmp_path / "fresh.db"
