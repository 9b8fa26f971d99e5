"""The ``sessiondb`` command line, run in-process through ``sessiondb.cli.main``."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

from sessiondb import SessionDB
from sessiondb.schema import SCHEMA_VERSION
from sessiondb import cli, doctor

DAY = 86400.0


@pytest.fixture
def cli_db(tmp_path: Path) -> Path:
    """A store with three sessions: an active one, an ended one, and one ended long ago."""
    path = tmp_path / "cli.db"
    with SessionDB(path) as db:
        db.create_session("alpha-1111", "cli", title="Refactor the parser", model="m1")
        db.append_message("alpha-1111", "user", "Split parse() into a lexer and a parser")
        db.append_message("alpha-1111", "assistant", "Done.", tool_calls=[{"id": "c1"}])
        db.create_session("beta-2222", "gateway")
        db.append_message("beta-2222", "user", "what is the weather")
        db.end_session("beta-2222", "user_exit")
        db.import_sessions({"id": "old-3333", "source": "cron",
                            "started_at": time.time() - 40 * DAY,
                            "ended_at": time.time() - 39 * DAY, "message_count": 1,
                            "messages": [
                                {"role": "user", "content": "nightly lexer job",
                                 "timestamp": time.time() - 40 * DAY}]})
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- help and options ------------------------------------------------------------------

COMMANDS = ["path", "list", "show", "search", "export", "import", "prune", "stats", "top", "doctor",
            "demo"]


def test_every_subcommand_has_help_text(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sorted(sub.choices) == sorted(COMMANDS + ["bench", "copy"])
    summaries = {a.dest: a.help for a in sub._choices_actions}
    assert summaries["bench"] and summaries["copy"]
    assert all(action.help for action in sub.choices["copy"]._actions)
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0 and "--quick" in out and "--json FILE" in out
    assert all(action.help for action in sub.choices["bench"]._actions)
    for name in COMMANDS:
        assert summaries[name], f"{name} has no summary"
        code, out, _ = run(capsys, name, "--help")
        assert code == 0
        assert f"usage: sessiondb {name}" in out
        assert "--db PATH" in out and "--json" in out
        for action in sub.choices[name]._actions:
            assert action.help, f"{name}: {action.dest} has no help"


def test_python_m_sessiondb_help_in_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "sessiondb", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in COMMANDS:
        assert name in proc.stdout


def test_db_and_json_work_before_or_after_the_subcommand(capsys, cli_db):
    after = run_json(capsys, "list", "--db", str(cli_db))
    code, out, _ = run(capsys, "--db", str(cli_db), "--json", "list")
    assert code == 0 and json.loads(out) == after
    assert {s["id"] for s in after} == {"alpha-1111", "beta-2222", "old-3333"}


def test_usage_error_exits_2(capsys):
    code, _, err = run(capsys, "list", "--limit", "-1")
    assert code == 2 and "must be >= 0" in err
    assert run(capsys)[0] == 2  # no subcommand


def test_library_error_is_one_line_exit_2(capsys, tmp_path):
    code, out, err = run(capsys, "list", "--db", str(tmp_path))  # a directory
    assert code == 2 and out == ""
    assert err.startswith("sessiondb: error: ") and err.count("\n") == 1
    assert "Traceback" not in err


# -- the read commands -------------------------------------------------------------------

def test_path_does_not_create_the_file(capsys, tmp_path, monkeypatch):
    target = tmp_path / "sub" / "x.db"
    assert run_json(capsys, "path", "--db", str(target)) == {
        "path": str(target), "backend": "sqlite", "exists": False}
    monkeypatch.setenv("SESSIONDB_PATH", str(tmp_path / "env.db"))
    code, out, _ = run(capsys, "path")
    assert code == 0 and out.strip() == str(tmp_path / "env.db")
    assert not target.parent.exists()


def test_list_table_and_filters(capsys, cli_db):
    code, out, _ = run(capsys, "list", "--db", str(cli_db))
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["id", "source", "title", "messages", "started", "ended", "preview"]
    assert "Refactor the parser" in out and "Split parse() into a lexer" in out
    assert [s["id"] for s in run_json(capsys, "list", "--db", str(cli_db), "--active")] == \
        ["alpha-1111"]
    ended = run_json(capsys, "list", "--db", str(cli_db), "--ended", "--source", "gateway")
    assert [s["id"] for s in ended] == ["beta-2222"]
    assert len(run_json(capsys, "list", "--db", str(cli_db), "--limit", "1")) == 1
    assert run(capsys, "list", "--db", str(cli_db), "--active", "--ended")[0] == 2


def test_show_accepts_a_unique_prefix(capsys, cli_db):
    code, out, _ = run(capsys, "show", "alp", "--db", str(cli_db))
    assert code == 0
    assert "alpha-1111" in out and "Split parse() into a lexer and a parser" in out
    assert out.index("Refactor the parser") < out.index("Split parse()")
    data = run_json(capsys, "show", "beta", "--db", str(cli_db))
    assert data["id"] == "beta-2222" and [m["role"] for m in data["messages"]] == ["user"]


def test_show_missing_or_ambiguous_exits_1(capsys, cli_db):
    with SessionDB(cli_db) as db:
        db.create_session("alpha-2222", "cli")
    for prefix in ("alpha", "nope"):
        code, out, err = run(capsys, "show", prefix, "--db", str(cli_db))
        assert code == 1 and out == "" and "no session matches" in err


def test_search_with_filters(capsys, cli_db):
    hits = run_json(capsys, "search", "lexer", "--db", str(cli_db))
    assert {h["session_id"] for h in hits} == {"alpha-1111", "old-3333"}
    hits = run_json(capsys, "search", "lexer", "--source", "cron", "--role", "user",
                    "--db", str(cli_db))
    assert [h["session_id"] for h in hits] == ["old-3333"]
    code, out, _ = run(capsys, "search", 'lexer AND ("unbalanced', "--db", str(cli_db))
    assert code == 0
    code, out, _ = run(capsys, "search", "lexer", "--role", "assistant", "--db", str(cli_db))
    assert code == 0 and out.strip() == "no matches"


def test_stats_adds_counts(capsys, cli_db):
    figures = run_json(capsys, "stats", "--db", str(cli_db))
    assert figures["sessions"] == 3 and figures["messages"] == 4
    assert "lock_wait_max_s" in figures and "wal_bytes" in figures
    code, out, _ = run(capsys, "stats", "--db", str(cli_db))
    assert code == 0 and "checkpoint.passive_runs" in out


def test_stats_shows_what_each_owner_holds(capsys, cli_db):
    with SessionDB(cli_db) as db:
        db.acquire_lease("gateway", "gw-1")
        db.enqueue("turns")
        db.enqueue("turns")
        db.claim("turns", "agent-1")
    figures = run_json(capsys, "stats", "--db", str(cli_db))["coordination"]
    assert figures["leases_held"] == 1
    assert figures["claims"] == {"ready": 1, "claimed": 1, "done": 0, "dead": 0}
    assert figures["owners"] == {"agent-1": {"leases": 0, "claims": 1},
                                 "gw-1": {"leases": 1, "claims": 0}}
    code, out, _ = run(capsys, "stats", "--db", str(cli_db))
    assert "coordination.owners.gw-1.leases" in out
    assert "coordination.caps.max_claims_per_owner" in out


# -- export, import, prune -----------------------------------------------------------------

def test_export_import_round_trip_through_files(capsys, cli_db, tmp_path):
    dump = tmp_path / "dump.json"
    summary = run_json(capsys, "export", "--db", str(cli_db), "-o", str(dump))
    assert summary == {"file": str(dump), "sessions": 3, "messages": 4}
    fresh = tmp_path / "fresh.db"
    assert run_json(capsys, "import", str(dump), "--db", str(fresh)) == {"imported": 3}
    code, out, _ = run(capsys, "export", "--db", str(fresh))
    assert code == 0 and json.loads(out) == json.loads(dump.read_text())
    # importing again fails as a whole; --skip-existing imports nothing new
    code, _, err = run(capsys, "import", str(dump), "--db", str(fresh))
    assert code == 2 and "already exists" in err
    assert run_json(capsys, "import", str(dump), "--db", str(fresh),
                    "--skip-existing") == {"imported": 0}


def test_export_removes_the_temporary_files_of_killed_exports(capsys, cli_db, tmp_path):
    # An export killed while writing (SIGKILL, or SIGTERM: no cleanup runs) left its
    # .NAME.PID.tmp beside the file for good, tens of MB at a time.
    dump = tmp_path / "dump.jsonl"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old_dead = tmp_path / f".dump.jsonl.{dead.pid}.tmp"
    recent_dead = tmp_path / f".dump.jsonl.{dead.pid + 1000000}.tmp"  # no such pid
    mine = tmp_path / f".dump.jsonl.{os.getppid()}.tmp"  # a live process's
    other = tmp_path / ".other.jsonl.1.tmp"
    for left in (old_dead, recent_dead, mine, other):
        left.write_text("partial")
    past = time.time() - 3600
    for left in (old_dead, mine, other):
        os.utime(left, (past, past))
    assert run_json(capsys, "export", "--db", str(cli_db), "--jsonl", "-o", str(dump))
    assert not old_dead.exists()  # dead and untouched for an hour: removed
    assert recent_dead.exists()  # written to lately: perhaps another host's, writing
    assert mine.exists() and other.exists()  # a live process's; another file's
    assert dump.exists()


@pytest.mark.parametrize("fmt", ["jsonl", "list"])
def test_an_export_file_is_synced_as_it_grows_and_before_it_takes_its_name(
        capsys, cli_db, tmp_path, monkeypatch, fmt):
    # Unsynced, a large export went to the disk in one burst when the kernel chose, and
    # the store's writers' commits queued behind it; and its new name could be lost to
    # a power cut.
    from sessiondb import connection, outfile

    with SessionDB(cli_db) as db:  # a line (a write) of about 5,000 characters each
        for i in range(20):
            db.ensure_session(f"big-{i}", "cli")
            db.append_message(f"big-{i}", "user", f"{i} " + "x" * 5_000)
    events: list[tuple[str, int]] = []
    real_sync, real_replace, real_dir = outfile._datasync, outfile._replace, connection.sync_directory
    dump = tmp_path / "dump.out"

    def sync(fd: int) -> None:
        real_sync(fd)  # the real one: this only watches
        events.append(("sync", os.fstat(fd).st_size))

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("replace", dump.stat().st_size))

    def sync_dir(directory: Path) -> None:
        real_dir(directory)
        assert directory == tmp_path
        events.append(("directory", 0))

    monkeypatch.setattr(outfile, "SYNC_CHARS", 10_000)
    monkeypatch.setattr(outfile, "_datasync", sync)
    monkeypatch.setattr(outfile, "_replace", replace)
    monkeypatch.setattr(outfile, "sync_directory", sync_dir)
    flags = ["--jsonl"] if fmt == "jsonl" else []
    assert run_json(capsys, "export", "--db", str(cli_db), *flags, "-o", str(dump))
    size = dump.stat().st_size
    kinds = [kind for kind, _ in events]
    # a sync once 10,000 characters (ASCII: a byte each) were written since the last,
    # one at the end with every byte written, then the rename, then the directory
    assert kinds == ["sync"] * (len(kinds) - 2) + ["replace", "directory"]
    syncs = [at for kind, at in events if kind == "sync"]
    assert syncs == sorted(syncs) and syncs[-1] == size and events[-2] == ("replace", size)
    assert len(syncs) > 5  # no more than 10,000 characters and a line between two:
    assert all(b - a <= 10_000 + 6_000 for a, b in zip([0] + syncs, syncs))
    text = dump.read_text()
    items = json.loads(text) if fmt == "list" else [json.loads(x) for x in text.splitlines()]
    assert len(items) == 23 and sum(len(i["messages"]) for i in items) == 24


def test_export_one_session_by_prefix(capsys, cli_db):
    code, out, _ = run(capsys, "export", "--session", "beta", "--db", str(cli_db))
    assert code == 0 and [s["id"] for s in json.loads(out)] == ["beta-2222"]
    assert run(capsys, "export", "--session", "zzz", "--db", str(cli_db))[0] == 1


def test_export_and_import_refuse_the_database_files(capsys, cli_db):
    before = digest(cli_db)
    for argv in (["export", "-o", str(cli_db)], ["import", str(cli_db)]):
        code, _, err = run(capsys, *argv, "--db", str(cli_db))
        assert code == 2 and "file of the database itself" in err
    assert digest(cli_db) == before


def test_import_bad_file_exits_2(capsys, cli_db, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, "import", str(bad), "--db", str(cli_db))
    assert code == 2 and "not a JSON export" in err
    code, _, err = run(capsys, "import", str(tmp_path / "missing.json"), "--db", str(cli_db))
    assert code == 2 and "cannot read" in err
    deep = tmp_path / "deep.jsonl"  # valid JSON, deeper than Python's decoder goes
    deep.write_text('{"id": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    code, _, err = run(capsys, "import", str(deep), "--db", str(cli_db))
    assert code == 2 and "not a JSON export" in err and "nested too deeply" in err


# -- a store that is not there: read commands refuse it, import creates it only to import

#: The commands that only read a store, and prune (nothing to prune in none).
READERS = [["list"], ["show", "alpha"], ["search", "lexer"], ["export"],
           ["export", "--session", "alpha"], ["export", "--jsonl", "-o", "out.jsonl"],
           ["prune", "--days", "30"], ["prune", "--days", "30", "--yes"], ["stats"],
           ["top", "--once"]]


@pytest.mark.parametrize("argv", READERS, ids=" ".join)
def test_a_read_command_on_a_missing_store_fails_and_creates_nothing(
        capsys, tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)  # where out.jsonl would be written
    for typo in (tmp_path / "typo.db", tmp_path / "sub" / "typo.db"):
        code, out, err = run(capsys, *argv, "--db", str(typo))
        assert code == 2 and out == ""
        assert err == f"sessiondb: error: no sessiondb store at {typo} (nothing was " \
                      "created); check the path\n"
        assert list(tmp_path.iterdir()) == []  # no store, -wal, -shm, sidecars, dir, out
    monkeypatch.setenv("SESSIONDB_PATH", str(tmp_path / "env.db"))
    code, _, err = run(capsys, *argv)
    assert code == 2 and "no sessiondb store at" in err and list(tmp_path.iterdir()) == []


def test_doctor_repair_on_a_missing_store_creates_nothing(capsys, tmp_path):
    code, out, _ = run(capsys, "doctor", "--repair", "--db", str(tmp_path / "typo.db"))
    assert code == 1 and "no database at" in out and list(tmp_path.iterdir()) == []


def test_read_commands_still_refuse_an_empty_file_untouched(capsys, tmp_path):
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    for argv in READERS[:4]:
        code, _, err = run(capsys, *argv, "--db", str(empty))
        assert code == 2 and "an empty file (0 bytes)" in err
    assert [(p.name, p.stat().st_size) for p in tmp_path.iterdir()] == [("empty.db", 0)]


BAD_INPUTS = {
    "not JSON": ("bad.jsonl", "{not json\n", "not a JSON export"),
    "empty": ("empty.json", "", "empty input"),
    "invalid first session": ("inv.jsonl", '{"id": 5, "source": "cli"}\n',
                              "session id must be a str"),
    "not a session": ("list.json", "[[1, 2]]", "must be a dict"),
    "bad first of a list": ("bad.json", '[{"id": "a", "source": "cli", "started_at": '
                            '"noon"}, {"id": "b", "source": "cli", "started_at": 1}]',
                            "started_at"),
    "missing": ("missing.json", None, "cannot read"),
}


@pytest.mark.parametrize("name,text,error", BAD_INPUTS.values(), ids=list(BAD_INPUTS))
def test_an_import_that_fails_at_its_first_session_creates_no_store(
        capsys, tmp_path, name, text, error):
    inputs = tmp_path / "in"
    inputs.mkdir()
    if text is not None:
        (inputs / name).write_text(text)
    where = tmp_path / "stores"
    where.mkdir()
    code, out, err = run(capsys, "import", str(inputs / name), "--db", str(where / "new.db"))
    assert code == 2 and out == "" and error in err and err.count("\n") == 1
    assert list(where.iterdir()) == []


def test_an_import_from_stdin_that_fails_at_once_creates_no_store(capsys, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"not json\n")))
    code, _, err = run(capsys, "import", "-", "--db", str(tmp_path / "new.db"))
    assert code == 2 and "not a JSON export" in err and list(tmp_path.iterdir()) == []


def test_an_import_into_a_new_path_creates_the_store_with_every_session(capsys, tmp_path):
    dump = tmp_path / "dump.jsonl"
    dump.write_text("".join(json.dumps({"id": f"s{i}", "source": "cli", "started_at": i,
                                        "messages": [{"role": "user", "content": "hi",
                                                      "timestamp": i}]})
                            + "\n" for i in range(3)))
    assert run_json(capsys, "import", str(dump), "--db", str(tmp_path / "new.db")) == \
        {"imported": 3}
    with SessionDB(tmp_path / "new.db") as db:
        assert [s["id"] for s in db.iter_export()] == ["s0", "s1", "s2"]  # s0 once
        assert db.message_count() == 3
    # An export of an empty store is a valid input: the import makes the store it names.
    (tmp_path / "none.json").write_text("[]\n")
    assert run_json(capsys, "import", str(tmp_path / "none.json"), "--db",
                    str(tmp_path / "empty.db")) == {"imported": 0}
    assert run_json(capsys, "list", "--db", str(tmp_path / "empty.db")) == []


def test_an_import_that_fails_at_once_leaves_an_existing_store_as_it_was(
        capsys, cli_db, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "source": "cli", "started_at": "noon"}\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, err = run(capsys, "import", str(bad), "--db", str(cli_db))
    assert code == 2 and "started_at" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert len(run_json(capsys, "list", "--db", str(cli_db))) == 3


def test_prune_is_a_dry_run_without_yes(capsys, cli_db):
    result = run_json(capsys, "prune", "--days", "30", "--db", str(cli_db))
    assert result["dry_run"] and result["would_delete"] == 1 and result["deleted"] == 0
    code, out, _ = run(capsys, "prune", "--days", "30", "--db", str(cli_db))
    assert code == 0 and "would delete 1" in out and "--yes" in out
    with SessionDB(cli_db) as db:
        assert db.session_count() == 3 and db.message_count() == 4
    assert run_json(capsys, "prune", "--days", "30", "--source", "gateway",
                    "--db", str(cli_db))["would_delete"] == 0
    result = run_json(capsys, "prune", "--days", "30", "--yes", "--db", str(cli_db))
    assert result["deleted"] == 1 and not result["dry_run"]
    with SessionDB(cli_db) as db:
        assert db.get_session("old-3333") is None and db.session_count() == 2


# -- doctor --------------------------------------------------------------------------------

def test_doctor_on_a_healthy_store(capsys, cli_db):
    code, out, _ = run(capsys, "doctor", "--db", str(cli_db))
    assert code == 0
    assert "integrity        ok" in out and "healthy" in out and "journal mode     wal" in out
    report = run_json(capsys, "doctor", "--db", str(cli_db))
    assert report["ok"] and report["problems"] == []
    assert report["integrity"] == report["fts_index"] == "ok"
    assert report["counters"] == report["foreign_keys"] == "ok"
    assert report["journal_mode"] == "wal" and report["schema_version"] == SCHEMA_VERSION
    assert report["sessions"] == 3 and report["messages"] == 4
    assert set(report["versions"]) == {"sessiondb", "sqlite", "apsw", "python"}
    assert doctor.check(cli_db)["ok"]  # the same as a library call


def test_doctor_on_a_non_sqlite_file_exits_1_and_changes_nothing(capsys, tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(4096))
    before, mtime = digest(junk), junk.stat().st_mtime_ns
    code, out, _ = run(capsys, "doctor", "--db", str(junk))
    assert code == 1 and "not a SQLite database" in out and str(junk) in out
    assert digest(junk) == before and junk.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.db"]  # no -wal, -shm, gate


def test_doctor_on_a_missing_file_creates_nothing(capsys, tmp_path):
    report = json.loads(run(capsys, "doctor", "--json", "--db", str(tmp_path / "no.db"))[1])
    assert not report["ok"] and not report["exists"] and "no database" in report["problems"][0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["newer", "foreign", "empty"])
def test_doctor_leaves_other_files_untouched(capsys, tmp_path, kind):
    path = tmp_path / f"{kind}.db"
    if kind == "empty":
        path.write_bytes(b"")
    else:
        conn = apsw.Connection(str(path))
        conn.execute("CREATE TABLE t(x)")
        if kind == "newer":
            conn.pragma("user_version", 99)
        conn.close()
    before = digest(path)
    code, out, _ = run(capsys, "doctor", "--db", str(path))
    assert code == 1 and str(path) in out
    assert digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    if kind == "newer":
        assert "schema version 99" in out


def test_doctor_finds_and_repairs_a_damaged_search_index(capsys, cli_db):
    with SessionDB(cli_db) as db:
        # Delete an index entry with the wrong content: the index no longer matches.
        db._execute_write(lambda c: c.execute(
            "INSERT INTO messages_fts(messages_fts, rowid, content) "
            "VALUES('delete', 1, 'something else entirely')"))
        before = db.export_all()
    report = json.loads(run(capsys, "doctor", "--json", "--db", str(cli_db))[1])
    assert not report["ok"] and report["fts_index"] != "ok"
    assert any("--repair" in p for p in report["problems"])
    code, out, _ = run(capsys, "doctor", "--repair", "--db", str(cli_db))
    assert code == 0 and "rebuilt the full-text index" in out and "healthy" in out
    with SessionDB(cli_db) as db:
        assert db.export_all() == before  # messages untouched
        assert [h["session_id"] for h in db.search_messages("weather")] == ["beta-2222"]


# -- demo ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_small(capsys, tmp_path):
    path = tmp_path / "demo.db"
    code, out, err = run(capsys, "demo", "--workers", "2", "--messages", "20", "--json",
                         "--db", str(path))
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and result["integrity"] == "ok" and result["kept"]
    assert [p["name"] for p in result["processes"]] == ["gateway", "worker-0", "worker-1"]
    assert all(p["exitcode"] == 0 for p in result["processes"])
    assert result["messages_found"] == 40 and result["counters_exact"]
    assert result["total_writes"] >= 2 * 22  # create + 20 appends + end, per worker
    code, out, _ = run(capsys, "doctor", "--db", str(path))
    assert code == 0 and "healthy" in out


def test_demo_human_output_with_a_temporary_db(capsys):
    code, out, _ = run(capsys, "demo", "--workers", "1", "--messages", "5")
    assert code == 0
    assert "commits" in out and "longest lock wait" in out and "integrity:         ok" in out
    assert "removed" in out


def test_doctor_reports_wrong_message_counters(capsys, cli_db):
    with SessionDB(cli_db) as db:
        db._execute_write(lambda c: c.execute(
            "UPDATE sessions SET message_count = 7 WHERE id = 'beta-2222'"))
    code, out, _ = run(capsys, "doctor", "--db", str(cli_db))
    assert code == 1 and "beta-2222: message_count 7, 1 messages" in out


# -- every command on PostgreSQL (--db URL, or $SESSIONDB_PATH) ----------------------------

@pytest.fixture
def pg_cli_url(pg_url: str) -> str:
    """The three sessions of ``cli_db``, in a PostgreSQL store."""
    with SessionDB(pg_url) as db:
        db.create_session("alpha-1111", "cli", title="Refactor the parser", model="m1")
        db.append_message("alpha-1111", "user", "Split parse() into a lexer and a parser")
        db.append_message("alpha-1111", "assistant", "Done.", tool_calls=[{"id": "c1"}])
        db.create_session("beta-2222", "gateway")
        db.append_message("beta-2222", "user", "what is the weather")
        db.end_session("beta-2222", "user_exit")
        db.import_sessions({"id": "old-3333", "source": "cron",
                            "started_at": time.time() - 40 * DAY,
                            "ended_at": time.time() - 39 * DAY,
                            "messages": [{"role": "user", "content": "nightly lexer job",
                                          "timestamp": time.time() - 40 * DAY}]})
    return pg_url


def test_read_commands_on_postgresql(capsys, pg_cli_url):
    url = pg_cli_url
    assert {s["id"] for s in run_json(capsys, "list", "--db", url)} == \
        {"alpha-1111", "beta-2222", "old-3333"}
    assert [s["id"] for s in run_json(capsys, "list", "--db", url, "--active")] == \
        ["alpha-1111"]
    code, out, _ = run(capsys, "list", "--db", url)
    assert code == 0 and "Refactor the parser" in out
    code, out, _ = run(capsys, "show", "alp", "--db", url)
    assert code == 0 and "Split parse() into a lexer and a parser" in out
    assert run(capsys, "show", "nope", "--db", url)[0] == 1
    hits = run_json(capsys, "search", "lexer", "--db", url)
    assert {h["session_id"] for h in hits} == {"alpha-1111", "old-3333"}
    hits = run_json(capsys, "search", "lexer", "--source", "cron", "--db", url)
    assert [h["session_id"] for h in hits] == ["old-3333"]


def test_path_of_a_url_masks_the_password_and_does_not_connect(capsys, monkeypatch):
    url = "postgresql://me:s3cret@db.invalid:5432/store?schema=team"
    found = run_json(capsys, "path", "--db", url)
    assert found == {"path": "postgresql://me:***@db.invalid:5432/store?schema=team",
                     "backend": "postgresql", "exists": None}
    monkeypatch.setenv("SESSIONDB_PATH", url)
    code, out, _ = run(capsys, "path")
    assert code == 0 and out.strip() == found["path"]


def test_export_import_prune_on_postgresql(capsys, pg_cli_url, tmp_path):
    url = pg_cli_url
    dump = tmp_path / "dump.jsonl"
    summary = run_json(capsys, "export", "--db", url, "--jsonl", "-o", str(dump))
    assert summary == {"file": str(dump), "sessions": 3, "messages": 4}
    # Into SQLite and back into another schema of the same database.
    assert run_json(capsys, "import", str(dump), "--db", str(tmp_path / "x.db")) == \
        {"imported": 3}
    other = url + "?schema=other"
    assert run_json(capsys, "import", str(dump), "--db", other) == {"imported": 3}
    code, _, err = run(capsys, "import", str(dump), "--db", other)
    assert code == 2 and "already exists" in err
    assert run_json(capsys, "import", str(dump), "--db", other, "--skip-existing") == \
        {"imported": 0}
    code, out, _ = run(capsys, "export", "--db", other)
    assert code == 0 and [s["id"] for s in json.loads(out)] == \
        [json.loads(line)["id"] for line in dump.read_text().splitlines()]
    result = run_json(capsys, "prune", "--days", "30", "--db", url)
    assert result["dry_run"] and result["would_delete"] == 1
    assert run_json(capsys, "prune", "--days", "30", "--yes", "--db", url)["deleted"] == 1
    with SessionDB(url) as db:
        assert db.get_session("old-3333") is None and db.session_count() == 2


def test_read_commands_on_a_missing_postgresql_store_create_nothing(
        capsys, pg_url, tmp_path, monkeypatch):
    import psycopg
    monkeypatch.chdir(tmp_path)  # where out.jsonl would be written
    typo = pg_url + "?schema=typo"
    for argv in READERS:
        code, out, err = run(capsys, *argv, "--db", typo)
        assert code == 2 and out == "" and err.count("\n") == 1
        assert "no sessiondb store in" in err and "'typo'" in err
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT to_regnamespace('typo')").fetchone()[0] is None
    assert list(tmp_path.iterdir()) == []


def test_stats_on_postgresql_shows_the_pool(capsys, pg_cli_url):
    figures = run_json(capsys, "stats", "--db", pg_cli_url)
    assert figures["backend"] == "postgresql" and figures["sessions"] == 3
    assert figures["messages"] == 4 and figures["pool"]["size"] == 8
    assert isinstance(figures["server_version"], int)
    code, out, _ = run(capsys, "stats", "--db", pg_cli_url)
    lines = dict(line.split(None, 1) for line in out.splitlines()[2:])
    assert code == 0 and lines["pool.size"] == "8" and lines["backend"] == "postgresql"
    assert lines["server_version"].count(".") in (1, 2)  # e.g. 15.20, not 150020
    assert "wal_bytes" not in lines


def test_sessiondb_path_url_is_used_by_every_command(capsys, pg_cli_url, monkeypatch):
    monkeypatch.setenv("SESSIONDB_PATH", pg_cli_url)
    assert len(run_json(capsys, "list")) == 3
    assert run_json(capsys, "stats")["backend"] == "postgresql"
    assert run_json(capsys, "doctor")["ok"]
    code, out, _ = run(capsys, "export", "--session", "beta")
    assert code == 0 and json.loads(out)[0]["id"] == "beta-2222"


def test_demo_on_postgresql(capsys, pg_url):
    SessionDB(pg_url).close()  # the schema first: the workers then open it at once
    code, out, err = run(capsys, "demo", "--workers", "2", "--messages", "10", "--json",
                         "--db", pg_url)
    result = json.loads(out)
    assert code == 0, (result["problems"], result["processes"])
    assert result["messages_found"] == 20 and result["counters_exact"] and result["kept"]


def test_a_progress_total_passed_shows_one_finished_line_per_task(capsys):
    """A prune's total is an estimate (its sessions' message_count), which the work may
    pass: the bar shows the finish of each task once, then keeps its pace."""
    from sessiondb.maintenance import Progress
    show = cli._progress(argparse.Namespace(json=False))
    assert show is not None
    for done in range(90, 140, 5):  # the total, 100, passed at the third report
        show(Progress("prune", done, 100, "rows", 1.0))
    show(Progress("reclaim", 7, 7, "pages", 0.1))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split()[0] for line in lines] == ["prune", "prune", "reclaim"]
