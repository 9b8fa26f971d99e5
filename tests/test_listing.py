"""Session lists at any size (sessiondb.listing): every filter pages exactly by offset and
by keyset, the page is picked from an index alone, previews read only a message's first
bytes, and the counts stay exact (schema v4)."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import sqlite3
from pathlib import Path
from typing import Any

import apsw
import pytest

from sessiondb import SessionDB, doctor, schema
from sessiondb.compat.hermes import SessionDB as HermesSessionDB
from sessiondb.errors import InvalidArgument, InvalidArgumentType, SessionNotFound
from test_compat_hermes_file import build_hermes_db, hermes_message, hermes_open
from workers import integrity, read_only, run_all

SPAWN = multiprocessing.get_context("spawn")
SOURCES = ("cli", "telegram", "slack")


def expected_preview(content: str) -> str:
    """The rule as it was when a list read whole messages: one line, trimmed, 60 chars."""
    text = content.replace("\r", " ").replace("\n", " ").strip()
    return text[:60] + ("..." if len(text) > 60 else "")


@pytest.fixture
def many(db: SessionDB) -> list[dict[str, Any]]:
    """120 sessions: three sources, some active, runs of equal start times (the id breaks
    the tie), imported at once; the sessions as dicts, in no particular order."""
    sessions = []
    for i in range(120):
        sessions.append({
            "id": f"s{(i * 37) % 120:03d}",  # ids not in start order
            "source": SOURCES[i % 7 % 3],
            "started_at": 1000.0 + i // 4,   # four sessions per start time
            "ended_at": None if i % 5 == 0 else 2000.0,
            "messages": [{"role": "user", "content": f"hello {i}", "timestamp": 1.0}],
        })
    db.import_sessions(sessions)
    return sessions


FILTERS = [
    {}, {"source": "cli"}, {"source": "slack"}, {"exclude_sources": ["cli"]},
    {"exclude_sources": ["cli", "telegram"]}, {"active": True}, {"active": False},
    {"source": "telegram", "active": True}, {"exclude_sources": ["slack"], "active": False},
    {"source": "nothing"},
]


def matching(sessions: list[dict[str, Any]], f: dict[str, Any]) -> list[str]:
    keep = [s for s in sessions
            if (f.get("source") is None or s["source"] == f["source"])
            and s["source"] not in f.get("exclude_sources", [])
            and (f.get("active") is None or (s["ended_at"] is None) == f["active"])]
    return [s["id"] for s in sorted(keep, key=lambda s: (-s["started_at"], s["id"]))]


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in
                                                               f.items()) or "all")
def test_every_filter_pages_every_session_once_in_order(db, many, f):
    expected = matching(many, f)
    assert [r["id"] for r in db.list_sessions(**f, limit=None)] == expected
    by_offset, by_keyset, after = [], [], None
    for offset in itertools.count(0, 7):
        page = db.list_sessions(**f, limit=7, offset=offset)
        by_offset += [r["id"] for r in page]
        if not page:
            break
    while True:
        page = db.list_sessions(**f, limit=7, after=after)
        if not page:
            break
        by_keyset += [r["id"] for r in page]
        after = page[-1]["id"]
    assert by_offset == expected
    assert by_keyset == expected


def test_keyset_pages_do_not_shift_when_sessions_are_added_in_front(db, make_session):
    for i in range(6):
        make_session(f"s{i}", started_at=100.0 + i)
    first = [r["id"] for r in db.list_sessions(limit=3)]
    make_session("newer", started_at=500.0)
    assert first == ["s5", "s4", "s3"]
    assert [r["id"] for r in db.list_sessions(limit=3, after=first[-1])] == ["s2", "s1", "s0"]
    assert [r["id"] for r in db.list_sessions(limit=3, offset=3)] == ["s3", "s2", "s1"]
    # offset counts from the cursor; the cursor need not match the filter
    assert [r["id"] for r in db.list_sessions(limit=2, offset=1, after="s4")] == ["s2", "s1"]
    make_session("other", started_at=103.5, source="tg")
    assert [r["id"] for r in db.list_sessions("cli", after="other")] == ["s3", "s2", "s1", "s0"]


def test_a_cursor_that_is_gone_or_bad_is_a_typed_error(db, make_session):
    make_session("a", 1.0)
    make_session("b", 2.0)
    page = db.list_sessions(limit=1)
    db.delete_session(page[-1]["id"])
    with pytest.raises(SessionNotFound) as err:
        db.list_sessions(after=page[-1]["id"])
    assert err.value.session_id == "b" and "after=" in str(err.value)
    with pytest.raises(InvalidArgument):
        db.list_sessions(after="")
    with pytest.raises(InvalidArgumentType):
        db.list_sessions(after=3)  # type: ignore[arg-type]


@pytest.mark.sqlite_only
def test_the_page_is_picked_from_an_index_alone(db, many):
    """Whatever the filter, the statement that picks the page reads only a covering
    index, in the list's order (no sort of every matching session first)."""
    statements: list[tuple[str, tuple]] = []

    def trace(cursor: Any, sql: str, bindings: Any) -> bool:
        if sql.startswith("SELECT s.rowid FROM sessions s"):
            statements.append((sql, tuple(bindings or ())))
        return True

    db._engine._conn.exec_trace = trace
    try:
        for f in FILTERS:
            db.list_sessions(**f, limit=5, offset=3)
            db.list_sessions(**f, limit=5, after="s007")
    finally:
        db._engine._conn.exec_trace = None
    assert len(statements) == 2 * len(FILTERS)
    for sql, args in statements:
        plan = " | ".join(r[3] for r in db._engine._conn.execute("EXPLAIN QUERY PLAN " + sql, args))
        assert "USING COVERING INDEX idx_sessions_" in plan, (sql, plan)
        assert "TEMP B-TREE" not in plan, (sql, plan)


# -- previews ----------------------------------------------------------------------------

LONG = 5000  # past what comes whole with the page (listing.INLINE_BYTES)


@pytest.mark.parametrize("content", [
    "", "  padded  ", "a\r\nb\nc\rd\te  f", "x" * 60, "x" * 61,
    "a" + "é" * LONG,                      # the first head cuts an é in two
    "ab" + "\N{GRINNING FACE}" * LONG,     # ... or a 4-byte character
    "y" * 60 + " " * LONG + "z",           # whitespace after 60 characters, then more
    "y" * 60 + " " * LONG,                 # ... and nothing more: no "..."
    " " * 3000 + "late start" + " " * LONG,  # the first head is all whitespace
    "\n" * 2000 + "q" * 70,
    "x\x00y" + "z" * LONG,                 # a NUL does not end the text
])
def test_preview_of_long_messages_is_as_from_the_whole(db, make_session, content):
    if "\x00" in content and db.backend != "sqlite":
        pytest.skip("PostgreSQL text cannot hold U+0000")
    make_session("s")
    db.append_message("s", "assistant", "not this one")
    db.append_message("s", "user", content)
    db.append_message("s", "user", "nor this one")
    assert db.list_sessions()[0]["preview"] == expected_preview(content)


def test_preview_past_the_widest_head_is_cut_there(db, make_session):
    """A message whose first 64 KiB are whitespace previews as those 64 KiB: the
    rest is not read, so "..." says that more follows."""
    make_session("s")
    db.append_message("s", "user", " " * 70_000 + "hidden")
    assert db.list_sessions()[0]["preview"] == "..."


@pytest.mark.sqlite_only
def test_preview_of_bytes_that_are_not_utf8(db, make_session):
    make_session("s")
    db._execute_write(lambda c: c.execute(
        "INSERT INTO messages (session_id, role, content, timestamp) "
        "VALUES ('s', 'user', CAST(X'61ff62' AS TEXT), 1.0)"))
    assert db.list_sessions()[0]["preview"] == "a\ufffdb"


class CountingVFS(apsw.VFS):
    """Counts the bytes read from every file it opens (database and WAL)."""

    def __init__(self, name: str) -> None:
        self.name, self.read = name, 0
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        return CountingFile(self, name, flags)


class CountingFile(apsw.VFSFile):
    def __init__(self, vfs: CountingVFS, name: Any, flags: list[int]) -> None:
        self.vfs = vfs
        super().__init__("", name, flags)

    def xRead(self, amount: int, offset: int) -> bytes:
        self.vfs.read += amount
        return super().xRead(amount, offset)


@pytest.fixture
def counting_vfs():
    vfs = CountingVFS("sessiondb-test-counting")
    try:
        yield vfs
    finally:
        vfs.unregister()


@pytest.mark.sqlite_only
def test_a_10_mb_message_is_never_read_whole(db_path, counting_vfs):
    big = "Ünïcode " + "é" * 5_000_000  # 10 MB
    with SessionDB(db_path) as writer:
        writer.create_session("s", "cli")
        writer.append_message("s", "user", big)
        writer.create_session("h", "cli")
        writer.append_message("h", "user", big)
        writer.checkpoint()
    with SessionDB(db_path, vfs=counting_vfs.name) as db:
        counting_vfs.read = 0
        rows = db.list_sessions()
        listed = counting_vfs.read
        # the same two messages read by substr() in SQL: SQLite reads them whole
        db._read(lambda c: c.execute("SELECT substr(CAST(content AS BLOB), 1, 100) "
                                     "FROM messages").fetchall())
        whole = counting_vfs.read - listed
    assert [r["preview"] for r in rows] == [expected_preview(big)] * 2
    assert whole > 20_000_000
    assert listed < 200_000


@pytest.mark.sqlite_only  # counts the bytes read through a SQLite VFS
def test_the_hermes_facade_reads_only_the_head_of_a_10_mb_message(db_path, counting_vfs):
    big = "  Ünïcode\n" + "é" * 5_000_000
    with HermesSessionDB(db_path) as writer:
        writer.create_session("s", "cli")
        writer.append_message("s", "user", big)
        writer.checkpoint()
    with HermesSessionDB(db_path, vfs=counting_vfs.name) as hdb:
        counting_vfs.read = 0
        (row,) = hdb.list_sessions_rich()
        assert counting_vfs.read < 200_000
    window = big[:63].replace("\n", " ").replace("\r", " ").strip()
    assert row["preview"] == window[:60] + "..."
    assert list(row)[-2:] == ["last_active", "preview"]


# -- counts --------------------------------------------------------------------------------

def counted(path: Path) -> tuple[int, int]:
    """(the store's message total, the messages there), read without sessiondb."""
    ((total, actual),) = read_only(path, "SELECT (SELECT value FROM sessiondb_totals), "
                                         "(SELECT COUNT(*) FROM messages)")
    return total, actual


@pytest.mark.sqlite_only
def test_message_total_exact_through_every_kind_of_write(db, db_path, make_session):
    for i in range(5):
        make_session(f"s{i}", started_at=100.0 + i)
        for k in range(4):
            db.append_message(f"s{i}", "user", f"m{k}")
    assert db.message_count() == 20 == db.session_count() * 4
    db.delete_session("s0")
    db.clear_messages("s1")
    assert db.message_count() == 12 and db.message_count("s1") == 0
    db.end_session("s2")
    db.end_session("s3")
    assert db.prune_sessions(older_than_days=0) == 2
    assert db.message_count() == 4
    exported = db.export_session("s4")
    db.import_sessions({**exported, "id": "copy", "title": None})
    assert db.message_count() == 8 and db.message_count("copy") == 4
    with db.transaction():
        db.append_message("copy", "user", "in a block")
        db.delete_session("s4")
    assert db.message_count() == 5
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.append_message("copy", "user", "rolled back")
            raise RuntimeError
    # a foreign writer, not sessiondb: the triggers count its rows too
    conn = apsw.Connection(str(db_path))
    conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                 "VALUES ('copy', 'user', 'raw', 1.0);"
                 "UPDATE sessions SET message_count = message_count + 1 WHERE id = 'copy'")
    conn.close()
    assert db.message_count() == 6 == counted(db_path)[1]
    assert db.session_count() == 2 == db.session_count("cli")  # s1 (cleared) and copy
    assert doctor.check(db_path)["ok"]


@pytest.mark.sqlite_only
def test_doctor_reports_and_repairs_a_wrong_message_total(db, db_path, make_session):
    make_session("s")
    db.append_message("s", "user", "one")
    db._execute_write(lambda c: c.execute("UPDATE sessiondb_totals SET value = 7"))
    report = doctor.check(db_path)
    assert not report["ok"] and "message total says 7" in report["counters"]
    assert any("--repair" in p for p in report["problems"])
    report = doctor.check(db_path, repair=True)
    assert report["ok"], report["problems"]
    assert report["repaired"]["message_total_before"].startswith("the message total says 7")
    assert db.message_count() == 1


def churn_worker(path: str, worker: int, rounds: int, start: Any, results: Any) -> None:
    """Create, append to, clear, prune and delete sessions of its own."""
    db = SessionDB(path)
    start.wait(60)
    for i in range(rounds):
        sid = f"w{worker}-{i}"
        db.create_session(sid, "mp")
        for k in range(3):
            db.append_message(sid, "user", f"{sid} {k}")
        if i % 3 == 0:
            db.clear_messages(sid)
        elif i % 3 == 1:
            db.delete_session(sid)
        else:
            db.end_session(sid)
    db.prune_sessions(older_than_days=0, source="mp")
    db.close()
    results.put(worker)


@pytest.mark.sqlite_only
def test_message_total_exact_across_two_processes(db, db_path):
    db.create_session("kept", "cli")
    results, start = SPAWN.Queue(), SPAWN.Event()
    run_all(SPAWN, churn_worker, [(str(db_path), w, 30, start, results) for w in (1, 2)],
            results, start)
    total, actual = counted(db_path)
    assert total == actual == db.message_count()
    assert actual == sum(db.message_count(s["id"]) for s in db.list_sessions(limit=None))
    assert integrity(db_path) == [("ok",)]
    assert doctor.check(db_path)["ok"]


# -- schema v4 -------------------------------------------------------------------------------

@pytest.mark.sqlite_only
def test_a_version_3_store_is_migrated_keeping_its_data(db_path):
    conn = apsw.Connection(str(db_path))
    conn.pragma("journal_mode", "wal")
    for step in schema.MIGRATIONS[:3]:
        conn.execute(step)
    conn.pragma("user_version", 3)
    for i in range(30):
        conn.execute("INSERT INTO sessions (id, source, started_at, ended_at, "
                     "message_count) VALUES (?, ?, ?, ?, 2)",
                     (f"s{i:02d}", SOURCES[i % 3], 100.0 + i, None if i % 4 else 150.0))
        for k in range(2):
            conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                         "VALUES (?, 'user', ?, ?)", (f"s{i:02d}", f"v3 message {k}", 1.0))
    before = conn.execute("SELECT * FROM sessions ORDER BY id").fetchall(), \
        conn.execute("SELECT * FROM messages ORDER BY id").fetchall()
    conn.close()
    with SessionDB(db_path) as db:
        assert db._engine._conn.pragma("user_version") == schema.SCHEMA_VERSION == 5
        assert db.message_count() == 60
        assert [r["id"] for r in db.list_sessions(limit=3)] == ["s29", "s28", "s27"]
        assert [r["id"] for r in db.list_sessions("cli", active=False)] == [
            f"s{i:02d}" for i in (24, 12, 0)]
        assert db.list_sessions(limit=1)[0]["preview"] == "v3 message 0"
        assert len(db.search_messages("message")) == 20
    after = read_only(db_path, "SELECT * FROM sessions ORDER BY id"), \
        read_only(db_path, "SELECT * FROM messages ORDER BY id")
    assert after == before
    names = {r[0] for r in read_only(db_path, "SELECT name FROM sqlite_schema")}
    assert {"idx_sessions_listing", "idx_sessions_source_listing",
            "idx_sessions_active_listing", "sessiondb_totals", "messages_total_insert",
            "messages_total_delete"} <= names
    assert doctor.check(db_path)["ok"]


def test_a_converted_hermes_file_gets_the_listing_indexes_and_total(tmp_path):
    path = tmp_path / "state.db"
    build_hermes_db(path)
    with SessionDB(path) as db:
        assert db.message_count() == 4
        assert [r["id"] for r in db.list_sessions()] == ["x", "c", "p"]
    conn = sqlite3.connect(path, isolation_level=None)
    assert hermes_open(conn) == 6  # hermes-agent's own opening steps
    hermes_message(conn, "x", "user", "written by hermes-agent", 301.0)
    conn.close()
    with HermesSessionDB(path) as hdb:
        assert hdb.message_count() == 5 == hdb.message_count("x") + 4
        assert [r["id"] for r in hdb.list_sessions_rich()] == ["x", "c", "p"]
        assert hdb.list_sessions_rich()[0]["preview"] == "written by hermes-agent"
    assert counted(path) == (5, 5)
    names = {r[0] for r in read_only(path, "SELECT name FROM sqlite_schema")}
    assert {"idx_sessions_listing", "idx_sessions_source_listing",
            "idx_sessions_active_listing", "messages_total_insert"} <= names


def test_cli_list_pages_with_after(db, db_path, make_session, capsys):
    from sessiondb import cli
    for i in range(5):
        make_session(f"s{i}", started_at=100.0 + i)

    def listed(*argv: str) -> tuple[int, Any]:
        code = cli.main(["list", "--db", str(db_path), "--json", *argv])
        out, err = capsys.readouterr()
        return code, (json.loads(out) if code == 0 else err)

    code, rows = listed("--limit", "2", "--after", "s3")
    assert code == 0 and [r["id"] for r in rows] == ["s2", "s1"]
    code, err = listed("--after", "gone")
    assert code != 0 and "gone" in err


def test_measure_listing_runs_and_reports_every_case(db, db_path, many, tmp_path):
    """The measuring code the scale benchmark calls (figures never asserted)."""
    from sessiondb.bench import scale_listing
    for s in many[:3]:
        db.append_message(s["id"], "assistant", "more")
    doc = scale_listing.measure_listing(str(db_path), repeats=3)
    assert doc["store"]["sessions"] == 120 and doc["options"]["keyset"]
    assert {"list_sessions", "message_count", "get_messages 50 after_id",
            "list_sessions after=<random session>"} <= set(doc["calls"])
    for fig in doc["calls"].values():
        assert fig["n"] == 3 and fig["max_ms"] >= fig["p50_ms"] >= 0
    out = tmp_path / "listing.json"
    assert scale_listing.main([str(db_path), "--repeats", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["calls"].keys() == doc["calls"].keys()
