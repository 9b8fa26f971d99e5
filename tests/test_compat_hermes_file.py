"""The file behind sessiondb.compat.hermes (#6): an existing hermes-agent ``state.db``
(schema 6, built here with the stdlib sqlite3 module as the specification's schema section
describes it) is converted in place without losing anything and stays usable by
hermes-agent; other hermes-agent versions are refused untouched; a facade store is a normal
sessiondb store for sessiondb.SessionDB in another process and for the CLI."""

from __future__ import annotations

import json
import multiprocessing
import re
import sqlite3
from pathlib import Path

import pytest

import sessiondb
from sessiondb import cli, doctor, schema
from sessiondb.compat.hermes import SessionDB
from test_compat_hermes_api import MESSAGE_KEYS, SESSION_KEYS
from test_connection import refused_untouched
from workers import hermes_facade_worker, integrity, read_only, run_all

# hermes-agent's schema-1 tables, and what each of its migrations added (spec, section 2).
_V1_SESSIONS = ("id TEXT PRIMARY KEY, source TEXT NOT NULL, user_id TEXT, model TEXT, "
                "model_config TEXT, system_prompt TEXT, parent_session_id TEXT, "
                "started_at REAL NOT NULL, ended_at REAL, end_reason TEXT, "
                "message_count INTEGER DEFAULT 0, tool_call_count INTEGER DEFAULT 0, "
                "input_tokens INTEGER DEFAULT 0, output_tokens INTEGER DEFAULT 0")
_V1_MESSAGES = ("id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL "
                "REFERENCES sessions(id), role TEXT NOT NULL, content TEXT, "
                "tool_call_id TEXT, tool_calls TEXT, tool_name TEXT, "
                "timestamp REAL NOT NULL, token_count INTEGER")
_TITLE = "title TEXT"
_COSTS = ("cache_read_tokens INTEGER DEFAULT 0", "cache_write_tokens INTEGER DEFAULT 0",
          "reasoning_tokens INTEGER DEFAULT 0", "billing_provider TEXT",
          "billing_base_url TEXT", "billing_mode TEXT", "estimated_cost_usd REAL",
          "actual_cost_usd REAL", "cost_status TEXT", "cost_source TEXT",
          "pricing_version TEXT")
_REASONING = ("reasoning TEXT", "reasoning_details TEXT", "codex_reasoning_items TEXT")
_FK = ", FOREIGN KEY (parent_session_id) REFERENCES sessions(id)"
_INDEXES = """
CREATE INDEX IF NOT EXISTS idx_sessions_source ON sessions(source);
CREATE INDEX IF NOT EXISTS idx_sessions_parent ON sessions(parent_session_id);
CREATE INDEX IF NOT EXISTS idx_sessions_started ON sessions(started_at DESC);
CREATE INDEX IF NOT EXISTS idx_messages_session ON messages(session_id, timestamp);
"""
_TITLE_INDEX = ("CREATE UNIQUE INDEX IF NOT EXISTS idx_sessions_title_unique "
                "ON sessions(title) WHERE title IS NOT NULL;")
_FTS = """
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content=messages, content_rowid=id);
CREATE TRIGGER IF NOT EXISTS messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES('delete', old.id, old.content);
END;
CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""


def hermes_ddl(migrated: bool) -> str:
    """hermes-agent's schema 6: created fresh (columns in table order), or grown from
    schema 1 by its migrations (added columns at the end)."""
    if migrated:
        return (f"CREATE TABLE sessions ({_V1_SESSIONS}{_FK});"
                f"CREATE TABLE messages ({_V1_MESSAGES});"
                "ALTER TABLE messages ADD COLUMN finish_reason TEXT;"
                f"ALTER TABLE sessions ADD COLUMN {_TITLE};"
                + "".join(f"ALTER TABLE sessions ADD COLUMN {c};" for c in _COSTS)
                + "".join(f"ALTER TABLE messages ADD COLUMN {c};" for c in _REASONING))
    return (f"CREATE TABLE sessions ({_V1_SESSIONS}, {', '.join(_COSTS)}, {_TITLE}{_FK});"
            f"CREATE TABLE messages ({_V1_MESSAGES}, finish_reason TEXT, "
            f"{', '.join(_REASONING)});")


def hermes_open(conn: sqlite3.Connection) -> int:
    """What hermes-agent does when it opens a file (spec, section 2): create what is
    missing, read the version. Returns the version."""
    conn.executescript("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);"
                       + _INDEXES + _TITLE_INDEX)
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'messages_fts'").fetchone():
        conn.executescript(_FTS)
    return conn.execute("SELECT version FROM schema_version").fetchone()[0]


def hermes_message(conn: sqlite3.Connection, sid: str, role: str, content: str | None,
                   ts: float, **extra) -> None:
    cols = ["session_id", "role", "content", "timestamp", *extra]
    conn.execute(f"INSERT INTO messages ({', '.join(cols)}) VALUES "
                 f"({', '.join('?' * len(cols))})", (sid, role, content, ts, *extra.values()))
    conn.execute("UPDATE sessions SET message_count = message_count + 1 WHERE id = ?", (sid,))


# Other names hermes-agent could have given its triggers and indexes (the spec names none).
_RENAMED = {"messages_fts_insert": "messages_ai", "messages_fts_delete": "messages_ad",
            "messages_fts_update": "messages_au", "idx_sessions_title_unique": "idx_title",
            "idx_messages_session": "idx_msg_session_ts", "idx_sessions_source": "by_source"}


def renamed(ddl: str) -> str:
    for old, new in _RENAMED.items():
        ddl = ddl.replace(old, new)
    return ddl


def build_hermes_db(path: Path, migrated: bool = False, version: int = 6,
                    rename: bool = False) -> None:
    """A hermes-agent state.db with sessions, titles, a parent, counters, costs, and
    messages from before its full-text index existed (never indexed by hermes-agent)."""
    names = renamed if rename else (lambda ddl: ddl)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.executescript(hermes_ddl(migrated) + names(_INDEXES + _TITLE_INDEX)
                       + "CREATE TABLE schema_version (version INTEGER NOT NULL);")
    conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute("INSERT INTO sessions (id, source, model, model_config, started_at, "
                 "ended_at, end_reason, title, input_tokens, output_tokens, "
                 "cache_read_tokens, estimated_cost_usd, actual_cost_usd, cost_status, "
                 "billing_provider) VALUES ('p', 'cli', 'gpt', '{\"t\": 1}', 100.0, 150.0, "
                 "'user_exit', 'Parent work', 10, 20, 3, 0.5, 0.25, 'final', 'openai')")
    conn.execute("INSERT INTO sessions (id, source, parent_session_id, started_at, title) "
                 "VALUES ('c', 'telegram', 'p', 200.0, 'Parent work #2')")
    conn.execute("INSERT INTO sessions (id, source, started_at) VALUES ('x', 'cron', 300.0)")
    hermes_message(conn, "p", "user", "legacy message about kubernetes", 101.0)
    hermes_message(conn, "p", "assistant", "legacy answer", 102.0, tool_calls='[{"id": 1}]',
                   finish_reason="stop", reasoning="r", reasoning_details='[{"d": 1}]')
    conn.execute("UPDATE sessions SET tool_call_count = 1 WHERE id = 'p'")
    conn.executescript(names(_FTS))
    hermes_message(conn, "c", "user", "indexed message about terraform", 201.0)
    hermes_message(conn, "c", "tool", None, 202.0, tool_name="grep", token_count=7)
    conn.close()


def snapshot_rows(path: Path) -> dict[str, list[tuple]]:
    """Every session and message, by the spec's columns, through a read-only connection."""
    return {
        "sessions": read_only(path, f"SELECT {', '.join(SESSION_KEYS)} FROM sessions "
                                    "ORDER BY id"),
        "messages": read_only(path, f"SELECT {', '.join(MESSAGE_KEYS)} FROM messages "
                                    "ORDER BY id"),
    }


@pytest.mark.parametrize("migrated, rename", [(False, False), (True, False), (False, True)],
                         ids=["created-at-6", "migrated-to-6", "other-index-names"])
def test_a_hermes_state_db_is_converted_in_place_losing_nothing(tmp_path, migrated, rename):
    path = tmp_path / "state.db"
    build_hermes_db(path, migrated, rename=rename)
    before = snapshot_rows(path)
    with SessionDB(path) as db:
        assert snapshot_rows(path) == before
        # in the file's column order, as hermes-agent's SELECT * gave them
        assert list(db.get_session("p")) == file_order(path, "sessions", SESSION_KEYS)
        assert list(db.get_messages("p")[0]) == file_order(path, "messages", MESSAGE_KEYS)
        assert list(db.list_sessions_rich()[0])[-2:] == ["last_active", "preview"]
        assert db.get_session("p")["title"] == "Parent work"
        assert db.resolve_session_by_title("Parent work") == "c"
        assert (db.get_session("p")["message_count"], db.get_session("p")["tool_call_count"],
                db.get_session("p")["estimated_cost_usd"]) == (2, 1, 0.5)
        # hermes-agent never indexed the messages older than its index: now they are
        assert [h["id"] for h in db.search_messages("kubernetes")] == [1]
        assert [h["id"] for h in db.search_messages("terraform")] == [3]
        assert db.append_message("x", "user", "after the conversion") == 5
        assert [h["session_id"] for h in db.search_messages("conversion")] == ["x"]
    assert read_only(path, "PRAGMA user_version") == [(schema.SCHEMA_VERSION,)]
    assert read_only(path, "SELECT version FROM schema_version") == [(6,)]  # kept
    fresh = tmp_path / "fresh.db"
    sessiondb.SessionDB(fresh).close()
    assert layout(path) == layout(fresh)  # sessiondb's indexes and triggers, none other
    assert integrity(path) == [("ok",)]
    report = doctor.check(path)
    assert report["ok"], report["problems"]
    assert (report["sessions"], report["messages"]) == (3, 5)


def layout(path: Path) -> list[tuple]:
    """The indexes and triggers of the two tables, as SQL. The converted messages table
    was renamed to ``messages`` (sessiondb.conversion), and SQLite writes a renamed
    table's name quoted into the SQL of its indexes and triggers: the same either way."""
    return [(kind, name, table, re.sub(r' ON "messages"([( ])', r" ON messages\1", sql))
            for kind, name, table, sql in read_only(
                path, "SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE "
                      "type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY name")]


def test_hermes_agent_can_still_open_and_write_a_converted_file(tmp_path):
    path = tmp_path / "state.db"
    build_hermes_db(path)
    SessionDB(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    assert hermes_open(conn) == 6
    conn.execute("INSERT INTO sessions (id, source, started_at) VALUES ('h', 'cli', 400.0)")
    hermes_message(conn, "h", "user", "written by hermes-agent itself", 401.0)
    conn.close()
    with SessionDB(path) as db:
        assert db.get_session("h")["message_count"] == 1
        assert [h["session_id"] for h in db.search_messages("itself")] == ["h"]
    assert doctor.check(path)["ok"]


def file_order(path: Path, table: str, keys: list[str]) -> list[str]:
    """The file's column order (through apsw, whose SQLite is the store's: closing a
    stdlib sqlite3 connection to a file open in this process would drop its locks)."""
    return [r[1] for r in read_only(path, f"PRAGMA table_info({table})") if r[1] in keys]


@pytest.mark.parametrize("version", [1, 2, 4])
def test_an_older_hermes_file_gets_hermes_agents_own_steps_first(tmp_path, version):
    """Spec, open sequence: "step the stored version up"; added columns go at the end."""
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    title = ", title TEXT" if version >= 3 else ""
    finish = ", finish_reason TEXT" if version >= 2 else ""
    conn.executescript(
        f"CREATE TABLE sessions ({_V1_SESSIONS}{title}{_FK}); CREATE TABLE messages "
        f"({_V1_MESSAGES}{finish}); CREATE TABLE schema_version (version INTEGER NOT NULL);"
        f"INSERT INTO schema_version VALUES ({version});"
        "INSERT INTO sessions (id, source, started_at, message_count) VALUES ('a', 'cli', 1, 1);"
        "INSERT INTO messages (session_id, role, content, timestamp) "
        "VALUES ('a', 'user', 'legacy words', 2)")
    conn.close()
    with SessionDB(path) as db:
        session = db.get_session("a")
        assert list(session) == file_order(path, "sessions", SESSION_KEYS)
        assert set(session) == set(SESSION_KEYS) and session["cache_read_tokens"] == 0
        assert db.get_messages("a")[0]["content"] == "legacy words"
        db.update_token_counts("a", 1, 2, estimated_cost_usd=0.5)
        db.append_message("a", "assistant", "new", reasoning="r", finish_reason="stop")
        assert [h["id"] for h in db.search_messages("legacy")] == [1]
    assert read_only(path, "SELECT version FROM schema_version") == [(6,)]


def test_a_newer_hermes_file_is_converted_and_keeps_its_version(tmp_path):
    """Spec: "A version above 6 is left alone."""
    path = tmp_path / "state.db"
    build_hermes_db(path, version=7)
    with SessionDB(path) as db:
        assert db.get_session("p")["title"] == "Parent work"
    assert read_only(path, "SELECT version FROM schema_version") == [(7,)]


def test_a_hermes_file_lacking_columns_is_refused_untouched(tmp_path):
    path = tmp_path / "state.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(f"CREATE TABLE sessions ({_V1_SESSIONS}); CREATE TABLE messages "
                       f"({_V1_MESSAGES}); CREATE TABLE schema_version (version INTEGER);"
                       "INSERT INTO schema_version VALUES (6)")
    conn.close()
    err = refused_untouched(path, sessiondb.HermesSchemaError)
    assert "sessions table lacks cache_read_tokens" in str(err)


def test_a_failed_conversion_leaves_the_hermes_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "state.db"
    build_hermes_db(path)
    before = snapshot_rows(path)
    monkeypatch.setattr(schema, "_V2_TRIGGERS", "CREATE TRIGGER broken")  # the last step
    with pytest.raises(sessiondb.SessionDBError):
        SessionDB(path)
    assert read_only(path, "PRAGMA user_version") == [(0,)]
    assert "metadata" not in {r[1] for r in read_only(path, "PRAGMA table_info(messages)")}
    assert read_only(path, "SELECT count(*) FROM sqlite_master WHERE name = "
                           "'sessiondb_meta'") == [(0,)]
    assert snapshot_rows(path) == before
    monkeypatch.undo()
    with SessionDB(path) as db:
        assert db.session_count() == 3


def test_doctor_names_an_unconverted_hermes_file_and_leaves_it(tmp_path, capsys):
    path = tmp_path / "state.db"
    build_hermes_db(path)
    code = cli.main(["doctor", "--db", str(path)])
    out = capsys.readouterr().out
    assert code == 1 and "hermes-agent state.db (schema version 6)" in out
    assert read_only(path, "PRAGMA user_version") == [(0,)]


def test_core_and_facade_in_two_processes_see_the_same_sessions(tmp_path):
    path = tmp_path / "state.db"
    with sessiondb.SessionDB(path) as core:
        core.create_session("core-1", "cli", model="m", title="From the core")
        core.append_message("core-1", "user", "written by sessiondb", tool_calls=[{"id": 1}])
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    [report] = run_all(spawn, hermes_facade_worker, [(str(path), results)], results)
    assert report["seen"]["title"] == "From the core"
    assert list(report["seen"]) == SESSION_KEYS
    assert report["messages"][0]["tool_calls"] == [{"id": 1}]
    with sessiondb.SessionDB(path) as core:
        got = core.get_session("hermes-1")
        assert (got["title"], got["model_config"], got["message_count"],
                got["tool_call_count"], got["input_tokens"]) == (
            "From the facade", {"t": 0.2}, 1, 1, 10)
        assert [h["session_id"] for h in core.search_messages("facade")] == ["hermes-1"]


def test_the_cli_works_on_a_facade_store(tmp_path, capsys):
    path = tmp_path / "state.db"
    with SessionDB(path) as db:
        db.create_session("hermes-abc", "cli", model="m")
        db.set_session_title("hermes-abc", "Facade session")
        db.append_message("hermes-abc", "user", "searchable through the cli")

    def run(*argv: str):
        assert cli.main([*argv, "--db", str(path), "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    assert [s["id"] for s in run("list")] == ["hermes-abc"]
    assert run("show", "hermes")["title"] == "Facade session"
    assert [h["session_id"] for h in run("search", "searchable")] == ["hermes-abc"]
    assert run("doctor")["ok"]
