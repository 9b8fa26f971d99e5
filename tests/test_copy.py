"""``sessiondb copy`` and :func:`sessiondb.copy.copy_store`: SQLite to PostgreSQL and back,
streamed, verified, and finished by a rerun after a SIGKILL midway."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from sessiondb import DatabaseOpenError, SessionDB, cli, copy, doctor
from sessiondb.copy import CopyConflict, CopyMismatch, SameStoreError, copy_store

SESSIONS, PER_SESSION = 48, 60  # 2,880 messages, and a few made through the API
WORDS = "lexer parser token tree commit rollback héllo 日本語 queue snapshot".split()


def items(sessions: int = SESSIONS, per: int = PER_SESSION, seed: int = 7
          ) -> list[dict[str, Any]]:
    """Sessions as an export has them: titles, tool calls, metadata, costs, ended and
    active ones, continuations, and one parent (s-007) that started after its child
    (s-008), so that the export, oldest first, lists the child first."""
    rng = random.Random(seed)
    base = 1_700_000_000.0
    out = []
    for i in range(sessions):
        sid = f"s-{i:03d}"
        started = base + i * 1000
        parent = f"s-{i - 1:03d}" if i % 10 == 5 else "s-007" if i == 8 else None
        if i == 7:
            started = base + 8 * 1000 + 500
        out.append({
            "id": sid, "source": "cli" if i % 3 else "gateway", "started_at": started,
            "ended_at": started + 60 if i % 2 else None,
            "end_reason": "done" if i % 2 else None,
            "title": f"Work item {i}" if i % 4 == 0 else None, "model": "m1",
            "model_config": {"temperature": 0.5, "i": i}, "input_tokens": 10 * i,
            "output_tokens": i, "estimated_cost_usd": 0.25 * i, "revision": i % 3,
            "parent_session_id": parent,
            "messages": [{
                "id": i * 1000 + j + 1, "role": "user" if j % 2 == 0 else "assistant",
                "content": f"{sid} #{j}: " + " ".join(rng.choice(WORDS) for _ in range(15)),
                "timestamp": started + j, "token_count": j,
                "tool_calls": [{"id": f"call-{j}", "name": "grep"}] if j % 7 == 3 else None,
                "tool_name": "grep" if j % 7 == 4 else None,
                "metadata": {"j": j} if j % 5 == 0 else None,
                "reasoning": "because" if j % 9 == 1 else None,
            } for j in range(per)],
        })
    return out


def make_store(where: Any, **kw: Any) -> None:
    with SessionDB(where) as db:
        db.import_sessions(items(**kw))
        db.create_session("api-1", "cli", title="Made through the API")
        for n in range(20):
            db.append_message("api-1", "user", f"api message {n} about the lexer")
        db.end_session("api-1", "user_exit")


def export(where: Any) -> list[dict[str, Any]]:
    with SessionDB(where) as db:
        return db.export_all()


def total_messages() -> int:
    return SESSIONS * PER_SESSION + 20


@pytest.fixture
def sqlite_src(tmp_path: Path) -> Path:
    path = tmp_path / "src.db"
    make_store(path)
    return path


# -- both directions ---------------------------------------------------------------------

def test_sqlite_to_postgresql_and_back_is_exact(sqlite_src, pg_url, tmp_path):
    seen: list[Any] = []
    report = copy_store(sqlite_src, pg_url, progress=seen.append)
    assert report["sessions"] == report["copied"] == SESSIONS + 1
    assert report["messages"] == report["copied_messages"] == total_messages()
    assert report["present"] == report["skipped_count"] == 0 and report["verified"]
    assert (report["src_backend"], report["dst_backend"]) == ("sqlite", "postgresql")
    assert report["dst_sessions"] == SESSIONS + 1
    assert report["dst_messages"] == total_messages()
    assert seen and {p.task for p in seen} == {"copy"} and seen[-1].done == total_messages()
    assert [p.done for p in seen] == sorted(p.done for p in seen)
    original = export(sqlite_src)
    assert export(pg_url) == original  # ids included: the destination was empty

    back = tmp_path / "back.db"
    report = copy_store(pg_url, back)
    assert report["copied"] == SESSIONS + 1 and report["verified"]
    assert (report["src_backend"], report["dst_backend"]) == ("postgresql", "sqlite")
    assert export(back) == original
    with SessionDB(back) as db, SessionDB(pg_url) as pg:
        for store in (db, pg):
            assert {h["session_id"] for h in store.search_messages("api message lexer")} \
                == {"api-1"}
        db.append_message("api-1", "assistant", "the copy takes new writes")
        pg.append_message("api-1", "assistant", "the copy takes new writes")


def test_small_chunks_and_a_parent_that_comes_after_its_child(sqlite_src, pg_url,
                                                              monkeypatch):
    monkeypatch.setattr(copy, "CHUNK_ROWS", 100)  # s-008 comes chunks before s-007
    report = copy_store(sqlite_src, pg_url)
    assert report["copied"] == SESSIONS + 1 and report["verified"]
    assert export(pg_url) == export(sqlite_src)


def test_a_rerun_of_a_complete_copy_changes_nothing(sqlite_src, pg_url):
    copy_store(sqlite_src, pg_url)
    before = export(pg_url)
    report = copy_store(sqlite_src, pg_url)
    assert report["copied"] == report["copied_messages"] == 0
    assert report["present"] == SESSIONS + 1 and report["verified"]
    assert export(pg_url) == before


# -- killed midway, then rerun -------------------------------------------------------------

KILLER = """
import os, signal, sys
from sessiondb import copy
copy.CHUNK_ROWS = 700
def progress(p):
    if p.done >= int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a kill -9
copy.copy_store(sys.argv[1], sys.argv[2], progress=progress)
raise SystemExit("not killed")
"""


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["sqlite->postgresql", "postgresql->sqlite"])
def test_rerun_after_sigkill_midway_finishes_with_everything_once(direction, tmp_path,
                                                                  pg_url, monkeypatch):
    if direction == "sqlite->postgresql":
        src, dst = tmp_path / "src.db", pg_url
    else:
        src, dst = pg_url, tmp_path / "dst.db"
    make_store(src)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(src), str(dst),
                           str(total_messages() // 2)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with SessionDB(dst) as db:
        left = db.session_count()
    assert 0 < left < SESSIONS + 1  # killed midway, whole sessions committed

    monkeypatch.setattr(copy, "CHUNK_ROWS", 700)
    report = copy_store(src, dst)
    assert report["present"] == left and report["copied"] == SESSIONS + 1 - left
    assert report["present"] + report["copied"] == SESSIONS + 1
    assert report["verified"] and report["skipped_count"] == 0
    assert report["dst_messages"] == total_messages()
    assert export(dst) == export(src)  # everything once, ids and all
    # A SQLite destination's search index was left pending by the kill: the rerun
    # finished it (doctor compares the index with the messages).
    assert doctor.check(dst)["ok"]
    with SessionDB(dst) as db:
        assert {h["session_id"] for h in db.search_messages("api message")} == {"api-1"}


# -- conflicts and verification ------------------------------------------------------------

def test_sessions_with_other_content_are_skipped_and_reported(sqlite_src, pg_url, capsys):
    with SessionDB(pg_url) as db:
        db.create_session("s-003", "elsewhere")  # the same id, other content
        db.append_message("s-003", "user", "written in the destination")
        db.create_session("other", "cli", title="Work item 4")  # s-004's title
    with pytest.raises(CopyConflict) as info:
        copy_store(sqlite_src, pg_url)
    report = info.value.report
    assert report is not None
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"s-003", "s-004", "s-005"}  # s-005 continues s-004
    assert "other content" in reasons["s-003"]
    assert "'Work item 4'" in reasons["s-004"] and "'other'" in reasons["s-004"]
    assert "s-004" in reasons["s-005"] and "not copied" in reasons["s-005"]
    assert report["copied"] == SESSIONS + 1 - 3 and report["verified"]
    with SessionDB(pg_url) as db:
        mine = db.export_session("s-003")
        assert mine["source"] == "elsewhere" and len(mine["messages"]) == 1  # untouched
        assert db.get_session("s-004") is None
    code = cli.main(["copy", str(sqlite_src), pg_url])
    out = capsys.readouterr().out
    assert code == 1 and "skipped s-003: it is in the destination with other content" in out
    assert "INCOMPLETE" in out


def test_verification_says_what_differs(sqlite_src, pg_url, monkeypatch, capsys):
    real = SessionDB.import_sessions

    def lossy(self, data, **kw):  # a broken import: drops the last message of s-010
        data = [dict(item, messages=item["messages"][:-1]) if item["id"] == "s-010"
                else item for item in data]
        return real(self, data, **kw)

    monkeypatch.setattr(SessionDB, "import_sessions", lossy)
    with pytest.raises(CopyMismatch) as info:
        copy_store(sqlite_src, pg_url)
    assert info.value.differences == [
        f"session 's-010': {PER_SESSION} message(s) read from the source, "
        f"{PER_SESSION - 1} in the destination (its message_count says {PER_SESSION - 1})"]
    assert info.value.report is not None and not info.value.report["verified"]
    assert "s-010" in str(info.value)
    code = cli.main(["copy", str(sqlite_src), pg_url + "?schema=second"])
    out = capsys.readouterr().out
    assert code == 1 and "verified           NO: 1 difference(s)" in out
    assert "differs: session 's-010'" in out and "INCOMPLETE" in out
    # Run again, the short session is found in the destination with other content.
    code, out = cli.main(["copy", str(sqlite_src), pg_url, "--json"]), capsys.readouterr().out
    assert code == 1 and [s["id"] for s in json.loads(out)["skipped"]] == ["s-010"]


# -- which stores ----------------------------------------------------------------------

def test_the_same_store_is_refused(sqlite_src, tmp_path, pg_url, monkeypatch, capsys):
    link = tmp_path / "link.db"
    link.symlink_to(sqlite_src)
    monkeypatch.chdir(tmp_path)
    for dst in (sqlite_src, "src.db", link):
        with pytest.raises(SameStoreError):
            copy_store(sqlite_src, dst)
    copy_store(sqlite_src, pg_url)
    for dst in (pg_url + "?schema=sessiondb", pg_url.replace("127.0.0.1", "localhost")):
        with pytest.raises(SameStoreError, match="same store"):
            copy_store(pg_url, dst)
    # Another schema of the same database is another store (a profile).
    assert copy_store(pg_url, pg_url + "?schema=profile_b")["copied"] == SESSIONS + 1
    code = cli.main(["copy", str(sqlite_src), "./src.db"])
    err = capsys.readouterr().err
    assert code == 2 and "same store" in err and err.count("\n") == 1


def test_a_missing_source_is_refused_and_nothing_is_created(tmp_path, pg_url, capsys):
    with pytest.raises(DatabaseOpenError, match="no sessiondb store"):
        copy_store(tmp_path / "missing.db", tmp_path / "dst.db")
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(DatabaseOpenError):
        copy_store(tmp_path / "empty.db", tmp_path / "dst.db")
    with pytest.raises(DatabaseOpenError, match="schema 'sessiondb'"):
        copy_store(pg_url, tmp_path / "dst.db")
    assert cli.main(["copy", str(tmp_path / "missing.db"), pg_url]) == 2
    assert "no sessiondb store" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regnamespace('sessiondb')").fetchone()[0] is None


# -- the command line -----------------------------------------------------------------

def test_cli_copy_prints_a_summary_and_json(sqlite_src, pg_url, capsys, monkeypatch):
    code = cli.main(["copy", str(sqlite_src), pg_url])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"copy {sqlite_src} -> {pg_url}" in out
    assert f"copied now         {SESSIONS + 1} sessions, {total_messages():,} messages" in out
    assert "verified           yes" in out and out.rstrip().endswith("ok")
    assert "copy " in err and "messages" in err  # the progress bar, on stderr
    code = cli.main(["copy", str(sqlite_src), pg_url, "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""  # no progress bar with --json
    report = json.loads(out)
    assert report["present"] == SESSIONS + 1 and report["copied"] == 0
    assert report["verified"] and report["skipped"] == []


def test_cli_copy_help(capsys):
    assert cli.main(["copy", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: sessiondb copy" in out and "SRC" in out and "DST" in out
    assert "--json" in out and "--db" not in out


def test_chunks_hold_whole_sessions_within_the_bound(monkeypatch):
    monkeypatch.setattr(copy, "CHUNK_ROWS", 130)
    chunks = list(copy._chunks(iter(items(sessions=10, per=50))))
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert [s["id"] for c in chunks for s in c] == [f"s-{i:03d}" for i in range(10)]
    # A chunk stops at the first session that reaches the bound: never more than one
    # session past it.
    assert all(sum(1 + len(s["messages"]) for s in c[:-1]) < 130 for c in chunks)


def test_the_source_is_read_as_the_copy_goes(sqlite_src, pg_url, monkeypatch):
    """Streamed: the destination has the first chunks before the source's last
    sessions are read."""
    monkeypatch.setattr(copy, "CHUNK_ROWS", 300)
    real = SessionDB.iter_export
    stored_when_read: list[int] = []

    def watched(self, source=None):
        with SessionDB(pg_url) as dst:
            for item in real(self, source):
                if item["id"] == "api-1":
                    stored_when_read.append(dst.session_count())
                yield item

    monkeypatch.setattr(SessionDB, "iter_export", watched)
    copy_store(sqlite_src, pg_url)
    assert stored_when_read and stored_when_read[0] > SESSIONS // 2


def test_a_session_postgresql_refuses_is_skipped_with_the_reason(tmp_path, pg_url):
    """SQLite stores U+0000 in text, PostgreSQL cannot: that session (and its child)
    is reported, every other one copied."""
    src = tmp_path / "src.db"
    make_store(src)
    with SessionDB(src) as db:
        db.create_session("nul-1", "cli")
        db.append_message("nul-1", "user", "before\x00after")
        db.create_session("nul-child", "cli", parent_session_id="nul-1")
    with pytest.raises(CopyConflict) as info:
        copy_store(src, pg_url)
    report = info.value.report
    assert report is not None and report["verified"]
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert set(reasons) == {"nul-1", "nul-child"}
    assert reasons["nul-1"].startswith("the destination refused it: a value PostgreSQL")
    assert report["copied"] == SESSIONS + 1
    assert report["dst_messages"] == total_messages()
    with SessionDB(pg_url) as db:
        assert db.get_session("nul-1") is None and db.session_count() == SESSIONS + 1
