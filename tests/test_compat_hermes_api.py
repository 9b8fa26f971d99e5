"""sessiondb.compat.hermes against the hermes-agent SessionDB specification (March 2026):
module surface, session lifecycle, accounting, titles, lookups and lists, messages,
export and cleanup, errors (#6). Search: test_compat_hermes_search.py; the file
(conversion of a hermes-agent state.db, other processes, the CLI): test_compat_hermes_file.py.

A contract file (tests/conftest.py): the tests taking ``hdb`` or ``db_path`` run on SQLite
and on PostgreSQL (#12); where PostgreSQL differs by design, a test says so by
``backend``.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit, urlunsplit

import apsw
import pytest

import sessiondb
from sessiondb.compat import hermes
from sessiondb.compat.hermes import SessionDB

SESSION_KEYS = [
    "id", "source", "user_id", "model", "model_config", "system_prompt",
    "parent_session_id", "started_at", "ended_at", "end_reason", "message_count",
    "tool_call_count", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "billing_provider", "billing_base_url",
    "billing_mode", "estimated_cost_usd", "actual_cost_usd", "cost_status", "cost_source",
    "pricing_version", "title"]
MESSAGE_KEYS = [
    "id", "session_id", "role", "content", "tool_call_id", "tool_calls", "tool_name",
    "timestamp", "token_count", "finish_reason", "reasoning", "reasoning_details",
    "codex_reasoning_items"]


def raw(db: SessionDB, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows straight from the store (through its read path)."""
    return db._read(lambda conn: conn.execute(sql, args).fetchall())


# -- module surface and construction (spec 1) ------------------------------------------


def test_default_path_when_none_is_given(monkeypatch, tmp_path):
    monkeypatch.setattr(hermes, "DEFAULT_DB_PATH", tmp_path / "home" / "state.db")
    with SessionDB() as db:
        assert db.db_path == tmp_path / "home" / "state.db"
        db.ensure_session("s")
    assert (tmp_path / "home" / "state.db").exists()


def test_module_names():
    assert hermes.SCHEMA_VERSION == 6
    assert SessionDB.MAX_TITLE_LENGTH == 100
    assert SessionDB.sanitize_title("  a  ") == "a"  # static: no instance needed
    assert SessionDB._sanitize_fts5_query("a*") == "a*"


@pytest.mark.parametrize("home", [None, "custom-home"])
def test_default_db_path_is_computed_at_import(tmp_path, home):
    env = {k: v for k, v in os.environ.items() if k != "HERMES_HOME"}
    env["HOME"] = str(tmp_path)
    if home:
        env["HERMES_HOME"] = str(tmp_path / home)
    out = subprocess.run(
        [sys.executable, "-c", "from sessiondb.compat.hermes import DEFAULT_DB_PATH as p; "
                               "print(type(p).__name__, p)"],
        env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["PosixPath", str(tmp_path / (home or ".hermes") / "state.db")]


@pytest.mark.parametrize("as_type", [Path, str])
def test_path_or_str_and_missing_parents_are_created(tmp_path, as_type):
    path = tmp_path / "a" / "b" / "state.db"
    given = as_type(path)
    with SessionDB(given) as db:
        assert db.db_path == path and isinstance(db.db_path, Path)
        assert as_type is str or db.db_path is given
        db.create_session("s", "cli")
    with SessionDB(path) as db:
        assert db.get_session("s")["source"] == "cli"


def test_close_is_idempotent_and_every_method_then_raises_attribute_error(db_path):
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    db.close()
    db.close()
    calls = [
        lambda: db.create_session("t", "cli"), lambda: db.ensure_session("t"),
        lambda: db.end_session("s", "x"), lambda: db.reopen_session("s"),
        lambda: db.update_system_prompt("s", "p"), lambda: db.get_session("s"),
        lambda: db.update_token_counts("s", 1), lambda: db.set_token_counts("s", 1),
        lambda: db.set_session_title("s", "t"), lambda: db.get_session_title("s"),
        lambda: db.get_session_by_title("t"), lambda: db.resolve_session_by_title("t"),
        lambda: db.get_next_title_in_lineage("t"), lambda: db.resolve_session_id("s"),
        lambda: db.list_sessions_rich(), lambda: db.search_sessions(),
        lambda: db.session_count(), lambda: db.message_count(),
        lambda: db.append_message("s", "user", "x"), lambda: db.get_messages("s"),
        lambda: db.get_messages_as_conversation("s"), lambda: db.search_messages("x"),
        lambda: db.export_session("s"), lambda: db.export_all(),
        lambda: db.clear_messages("s"), lambda: db.delete_session("s"),
        lambda: db.prune_sessions(),
    ]
    for call in calls:
        with pytest.raises(AttributeError) as caught:
            call()
        assert isinstance(caught.value, sessiondb.ClosedError)


@contextmanager
def write_locked(db_path: Any, backend: str) -> Iterator[None]:
    """Another client holds the write lock of the store (SQLite) or of its sessions
    table (PostgreSQL) until the block ends."""
    if backend == "sqlite":
        # apsw, not the sqlite3 module: two SQLite libraries in one process do not see
        # each other's POSIX locks.
        blocker = apsw.Connection(str(db_path))
        blocker.execute("BEGIN IMMEDIATE")
    else:
        import psycopg
        # without sessiondb's own URL parameters (?pooler=1), which libpq refuses
        blocker = psycopg.connect(db_path.split("?")[0], autocommit=True)
        blocker.execute("BEGIN; LOCK TABLE sessiondb.sessions IN EXCLUSIVE MODE")
    try:
        yield
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()


def test_lock_exhaustion_is_an_operational_error(db_path, backend):
    with SessionDB(db_path, write_timeout=0.2) as db:
        db.create_session("s", "cli")
        with write_locked(db_path, backend), \
                pytest.raises(sqlite3.OperationalError) as caught:
            db.end_session("s", "x")
        assert isinstance(caught.value, sessiondb.WriteTimeout)
        assert isinstance(caught.value, hermes.LockTimeout)
        assert db.get_session("s")["ended_at"] is None  # nothing written


# -- session lifecycle (spec 4) --------------------------------------------------------


def test_create_session_row(hdb, clock):
    clock.now = 1234.5
    assert hdb.create_session("s", "cli", model="m", model_config={"t": 1},
                              system_prompt="p", user_id="u") == "s"
    row = hdb.get_session("s")
    assert list(row) == SESSION_KEYS
    assert row == dict.fromkeys(SESSION_KEYS) | {
        "id": "s", "source": "cli", "user_id": "u", "model": "m",
        "model_config": '{"t": 1}', "system_prompt": "p", "started_at": 1234.5,
        "message_count": 0, "tool_call_count": 0, "input_tokens": 0, "output_tokens": 0,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0}


@pytest.mark.parametrize("config", [{}, None, [], ""])
def test_falsy_model_config_is_null(hdb, config):
    hdb.create_session("s", "cli", model_config=config)
    assert hdb.get_session("s")["model_config"] is None


def test_create_existing_id_changes_nothing(hdb, clock):
    hdb.create_session("s", "cli", model="m")
    clock.now += 50
    assert hdb.create_session("s", "other", model="n", system_prompt="p",
                              parent_session_id="missing") == "s"
    row = hdb.get_session("s")
    assert (row["source"], row["model"], row["system_prompt"], row["started_at"]) == (
        "cli", "m", None, 1000.0)


def test_create_not_null_violation_is_silently_skipped(hdb):
    assert hdb.create_session("s", None) == "s"
    assert hdb.get_session("s") is None
    assert hdb.session_count() == 0


@pytest.mark.parametrize("parent", ["missing", ""])
def test_create_with_missing_parent_raises_integrity_error(hdb, parent):
    with pytest.raises(sqlite3.IntegrityError) as caught:
        hdb.create_session("s", "cli", parent_session_id=parent)
    assert isinstance(caught.value, sessiondb.IntegrityViolation)
    assert "FOREIGN KEY" in str(caught.value)
    assert hdb.get_session("s") is None


def test_create_with_parent_or_itself_as_parent(hdb):
    hdb.create_session("p", "cli")
    hdb.create_session("c", "cli", parent_session_id="p")
    hdb.create_session("self", "cli", parent_session_id="self")
    assert hdb.get_session("c")["parent_session_id"] == "p"
    assert hdb.get_session("self")["parent_session_id"] == "self"


def test_create_with_unserializable_config_is_a_type_error(hdb):
    with pytest.raises(TypeError):
        hdb.create_session("s", "cli", model_config={"x": object()})
    assert hdb.get_session("s") is None


def test_ensure_session(hdb, clock):
    assert hdb.ensure_session("s") is None
    row = hdb.get_session("s")
    assert (row["source"], row["model"], row["started_at"], row["message_count"]) == (
        "unknown", None, 1000.0, 0)
    hdb.create_session("t", "cli", model="m", system_prompt="p")
    clock.now += 5
    hdb.ensure_session("t", "tg", "n")
    hdb.ensure_session("s", "tg", "n")
    row = hdb.get_session("t")
    assert (row["source"], row["model"], row["system_prompt"], row["started_at"]) == (
        "cli", "m", "p", 1000.0)
    assert hdb.get_session("s")["source"] == "unknown"
    hdb.ensure_session("u", "gw", "m2")
    assert (hdb.get_session("u")["source"], hdb.get_session("u")["model"]) == ("gw", "m2")


def test_end_reopen_and_system_prompt(hdb, clock):
    hdb.create_session("s", "cli", system_prompt="old")
    clock.now = 2000.0
    assert hdb.end_session("s", "user_exit") is None
    assert (hdb.get_session("s")["ended_at"], hdb.get_session("s")["end_reason"]) == (
        2000.0, "user_exit")
    clock.now = 3000.0
    hdb.end_session("s", None)  # ending again overwrites both
    assert (hdb.get_session("s")["ended_at"], hdb.get_session("s")["end_reason"]) == (
        3000.0, None)
    assert hdb.reopen_session("s") is None
    assert (hdb.get_session("s")["ended_at"], hdb.get_session("s")["end_reason"]) == (
        None, None)
    assert hdb.update_system_prompt("s", "new") is None
    assert hdb.get_session("s")["system_prompt"] == "new"
    hdb.update_system_prompt("s", None)
    assert hdb.get_session("s")["system_prompt"] is None


def test_updates_of_a_missing_session_are_silent_no_ops(hdb):
    for call in (lambda: hdb.end_session("nope", "x"), lambda: hdb.reopen_session("nope"),
                 lambda: hdb.update_system_prompt("nope", "p"),
                 lambda: hdb.update_token_counts("nope", 1, 2),
                 lambda: hdb.set_token_counts("nope", 1, 2),
                 lambda: hdb.clear_messages("nope")):
        assert call() is None
    assert hdb.session_count() == 0
    assert hdb.get_session("nope") is None


def test_returned_rows_are_fresh_copies(hdb):
    hdb.create_session("s", "cli")
    hdb.get_session("s")["source"] = "changed"
    hdb.list_sessions_rich()[0]["source"] = "changed"
    assert hdb.get_session("s")["source"] == "cli"


# -- token and cost accounting (spec 5) ------------------------------------------------

TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
          "reasoning_tokens")


def accounting(db: SessionDB, sid: str = "s") -> dict:
    row = db.get_session(sid)
    return {k: row[k] for k in SESSION_KEYS[12:25] + ["model"]}


def test_increment_adds_tokens_and_costs(hdb):
    hdb.create_session("s", "cli")
    hdb.update_token_counts("s", 10, 20, cache_read_tokens=3, cache_write_tokens=4,
                            reasoning_tokens=5)
    hdb.update_token_counts("s", 1, 2, None, 1, 1, 1)
    got = accounting(hdb)
    assert [got[k] for k in TOKENS] == [11, 22, 4, 5, 6]
    assert got["estimated_cost_usd"] == 0.0  # never NULL after a call without a cost
    assert got["actual_cost_usd"] is None  # unchanged while no actual cost is given
    hdb.update_token_counts("s", estimated_cost_usd=1, actual_cost_usd=2)
    hdb.update_token_counts("s", estimated_cost_usd=0.5, actual_cost_usd=0.25)
    hdb.update_token_counts("s")
    got = accounting(hdb)
    assert (got["estimated_cost_usd"], got["actual_cost_usd"]) == (1.5, 2.25)
    assert isinstance(got["estimated_cost_usd"], float)


def test_integer_costs_come_back_as_floats(hdb):
    hdb.create_session("s", "cli")
    hdb.set_token_counts("s", estimated_cost_usd=1, actual_cost_usd=2)
    got = accounting(hdb)
    assert (got["estimated_cost_usd"], got["actual_cost_usd"]) == (1.0, 2.0)
    assert isinstance(got["estimated_cost_usd"], float)
    assert isinstance(got["actual_cost_usd"], float)


def test_absolute_mode(hdb):
    hdb.create_session("s", "cli")
    hdb.update_token_counts("s", 10, 10, estimated_cost_usd=5, actual_cost_usd=5)
    hdb.update_token_counts("s", 3, 4, cache_read_tokens=1, absolute=True)
    got = accounting(hdb)
    assert [got[k] for k in TOKENS] == [3, 4, 1, 0, 0]
    assert got["estimated_cost_usd"] == 0.0  # None -> 0.0
    assert got["actual_cost_usd"] == 5.0  # None -> unchanged
    hdb.update_token_counts("s", estimated_cost_usd=2.5, actual_cost_usd=1.5, absolute=True)
    got = accounting(hdb)
    assert (got["estimated_cost_usd"], got["actual_cost_usd"]) == (2.5, 1.5)
    assert [got[k] for k in TOKENS] == [0, 0, 0, 0, 0]


def test_set_token_counts(hdb):
    hdb.create_session("s", "cli")
    hdb.update_token_counts("s", 10, 10, reasoning_tokens=7, estimated_cost_usd=5,
                            actual_cost_usd=5)
    hdb.set_token_counts("s", 1, 2, reasoning_tokens=3)
    got = accounting(hdb)
    assert [got[k] for k in TOKENS] == [1, 2, 0, 0, 3]
    assert got["estimated_cost_usd"] is None  # None sets NULL
    assert got["actual_cost_usd"] == 5.0  # None leaves it
    hdb.set_token_counts("s", estimated_cost_usd=0.5, actual_cost_usd=0.75)
    got = accounting(hdb)
    assert (got["estimated_cost_usd"], got["actual_cost_usd"]) == (0.5, 0.75)


@pytest.mark.parametrize("method", ["add", "absolute", "set"])
def test_latest_wins_and_first_wins_fields(hdb, method):
    def call(**kw):
        if method == "set":
            hdb.set_token_counts("s", **kw)
        else:
            hdb.update_token_counts("s", absolute=method == "absolute", **kw)

    hdb.create_session("s", "cli")
    first = dict(cost_status="estimated", cost_source="table", pricing_version="v1",
                 billing_provider="openai", billing_base_url="https://a", billing_mode="api",
                 model="gpt")
    call(**first)
    call(cost_status="final", cost_source=None, pricing_version="v2",
         billing_provider="other", billing_base_url="https://b", billing_mode="sub",
         model="other")
    got = accounting(hdb)
    assert {k: got[k] for k in first} == first | {"cost_status": "final",
                                                  "pricing_version": "v2"}


def test_model_backfill_only_while_null(hdb):
    hdb.create_session("s", "cli")
    hdb.update_token_counts("s", 1, 1, "first")  # model is the fourth positional parameter
    assert hdb.get_session("s")["model"] == "first"
    hdb.create_session("e", "cli", model="")
    hdb.update_token_counts("e", model="later")
    assert hdb.get_session("e")["model"] == ""  # "" is not NULL: never backfilled


def test_none_counter_in_increment_mode_becomes_null(hdb):
    hdb.create_session("s", "cli")
    hdb.update_token_counts("s", None, 5)
    got = accounting(hdb)
    assert (got["input_tokens"], got["output_tokens"]) == (None, 5)


# -- titles (spec 6) --------------------------------------------------------------------

@pytest.mark.parametrize("title, expected", [
    (None, None), ("", None), ("   ", None), ("\t\n\r ", None),
    ("a\x0bb", "ab"), ("a\x0cb", "ab"), ("a\x00b\x08c\x7f", "abc"), ("a\x1fb", "ab"),
    ("a\tb\nc\rd", "a b c d"), ("  My   Title  ", "My Title"),
    ("a\u200bb\u200c\u200d\u200e\u200f", "ab"), ("a\u2028b\u2029c", "abc"),
    ("a\u202a\u202b\u202c\u202d\u202eb", "ab"), ("a\u2060\u2064\u2065\u2066\u2069b", "ab"),
    ("\ufeffa", "a"), ("a\ufff9\ufffa\ufffb\ufffcb", "ab"),
    ("a\u00adb\u034fc\u061cd\u180ee\ufffd", "a\u00adb\u034fc\u061cd\u180ee\ufffd"),
    ("a\u00a0\u3000b\u2003\u205fc\u0085d", "a b c d"), ("a \u200b b", "a b"),
    ("Case Kept — ünïcode", "Case Kept — ünïcode"), ("x" * 100, "x" * 100),
    ("x" * 100 + "\u200b" * 5 + "   ", "x" * 100),
])
def test_sanitize_title(title, expected):
    assert SessionDB.sanitize_title(title) == expected


@pytest.mark.parametrize("title, n", [("x" * 101, 101), ("a" + " " * 5 + "b" * 150, 152)])
def test_sanitize_title_too_long(title, n):
    with pytest.raises(ValueError) as caught:
        SessionDB.sanitize_title(title)
    assert str(caught.value) == f"Title too long ({n} chars, max 100)"


def test_set_session_title(hdb):
    hdb.create_session("a", "cli")
    hdb.create_session("b", "cli")
    assert hdb.set_session_title("a", "  My\tTitle ") is True
    assert hdb.get_session_title("a") == "My Title"
    assert hdb.set_session_title("a", "My Title") is True  # unchanged
    assert hdb.set_session_title("b", "my title") is True  # case differs: allowed
    with pytest.raises(ValueError) as caught:
        hdb.set_session_title("b", "My  Title")
    assert str(caught.value) == "Title 'My Title' is already in use by session a"
    assert isinstance(caught.value, sessiondb.TitleConflict)
    assert hdb.get_session_title("b") == "my title"
    assert hdb.set_session_title("a", "   ") is True  # cleared
    assert hdb.get_session_title("a") is None
    assert hdb.set_session_title("b", None) is True
    assert hdb.get_session_title("b") is None


def test_set_session_title_on_a_missing_session(hdb):
    hdb.create_session("a", "cli")
    hdb.set_session_title("a", "Taken")
    assert hdb.set_session_title("missing", "Free") is False
    with pytest.raises(ValueError, match="already in use by session a"):
        hdb.set_session_title("missing", "Taken")  # checked even for a missing session
    with pytest.raises(ValueError, match="Title too long"):
        hdb.set_session_title("missing", "x" * 101)
    assert hdb.get_session_title("missing") is None
    assert hdb.get_session_by_title("Free") is None


def test_too_long_title_never_touches_the_store(hdb):
    hdb.create_session("a", "cli")
    hdb.set_session_title("a", "Kept")
    writes = hdb.stats()["writes"]
    with pytest.raises(ValueError):
        hdb.set_session_title("a", "y" * 101)
    assert hdb.stats()["writes"] == writes
    assert hdb.get_session_title("a") == "Kept"


def test_title_lookups(hdb):
    hdb.create_session("a", "cli")
    hdb.set_session_title("a", "Exact Title")
    assert hdb.get_session_title("missing") is None
    assert hdb.get_session_by_title("Exact Title")["id"] == "a"
    assert list(hdb.get_session_by_title("Exact Title")) == SESSION_KEYS
    assert hdb.get_session_by_title("exact title") is None  # case-sensitive
    assert hdb.get_session_by_title(" Exact Title") is None  # not sanitized
    assert hdb.resolve_session_by_title(" Exact Title") is None


def test_resolve_session_by_title(hdb, clock):
    def titled(sid: str, title: str, started: float) -> None:
        clock.now = started
        hdb.create_session(sid, "cli")
        hdb.set_session_title(sid, title)

    assert hdb.resolve_session_by_title("X") is None
    titled("exact", "X", 500)
    assert hdb.resolve_session_by_title("X") == "exact"
    titled("two", "X #2", 100)  # older than the exact match, still wins: a variant
    assert hdb.resolve_session_by_title("X") == "two"
    titled("nine", "X #9", 200)
    titled("three", "X #3", 300)  # newest variant wins, not the highest number
    assert hdb.resolve_session_by_title("X") == "three"
    titled("bar", "x #bar", 400)  # any text after "#", ASCII case folded
    assert hdb.resolve_session_by_title("X") == "bar"
    titled("nested", "X #2 #3", 450)
    assert hdb.resolve_session_by_title("X") == "nested"
    assert hdb.resolve_session_by_title("X #2") == "nested"
    titled("pct", "100% #1", 1)
    titled("pct2", "1000 #1", 2)
    assert hdb.resolve_session_by_title("10%") is None  # % is literal
    assert hdb.resolve_session_by_title("100%") == "pct"
    titled("u", "a_b #1", 3)
    titled("u2", "axb #2", 4)
    assert hdb.resolve_session_by_title("a_b") == "u"  # _ is literal
    titled("é", "É #1", 5)
    assert hdb.resolve_session_by_title("é") is None  # only ASCII is folded


@pytest.mark.parametrize("existing, base, expected", [
    ([], "Nope #5", "Nope"),
    ([], "Fresh", "Fresh"),
    (["My Proj"], "My Proj", "My Proj #2"),
    (["My Proj", "My Proj #2"], "My Proj", "My Proj #3"),
    (["My Proj", "My Proj #2"], "My Proj #2", "My Proj #3"),
    (["My Proj", "My Proj #2", "my proj #7"], "My Proj", "My Proj #8"),
    (["X #bar"], "X", "X #2"),
    (["X #007"], "X", "X #8"),
    (["a #1 #2"], "a #1 #2", "a #1 #3"),
    (["a #1"], "a #1 #2", "a #1 #2"),
    (["Y #4"], "Y", "Y #5"),
    (["my proj"], "My Proj", "My Proj"),  # the exact base is case-sensitive
])
def test_get_next_title_in_lineage(hdb, existing, base, expected):
    for i, title in enumerate(existing):
        hdb.create_session(f"s{i}", "cli")
        hdb.set_session_title(f"s{i}", title)
    assert hdb.get_next_title_in_lineage(base) == expected


# -- lookup, listing, counts (spec 7) ---------------------------------------------------


def test_resolve_session_id(hdb):
    assert hdb.resolve_session_id("") is None
    hdb.create_session("ABC123", "cli")
    assert hdb.resolve_session_id("") == "ABC123"  # "" matches the only session
    assert hdb.resolve_session_id("abc") == "ABC123"  # ASCII case folded
    hdb.create_session("abc", "cli")
    assert hdb.resolve_session_id("abc") == "abc"  # an exact id wins
    assert hdb.resolve_session_id("ab") is None  # ambiguous
    assert hdb.resolve_session_id("") is None
    assert hdb.resolve_session_id("zzz") is None
    hdb.create_session("a%c", "cli")
    hdb.create_session("a_d", "cli")
    hdb.create_session("q\\x", "cli")
    assert hdb.resolve_session_id("a%") == "a%c"
    assert hdb.resolve_session_id("a_") == "a_d"
    assert hdb.resolve_session_id("q\\") == "q\\x"
    assert hdb.resolve_session_id("AB") is None


def listed(db: SessionDB, **kw) -> list[str]:
    return [r["id"] for r in db.list_sessions_rich(**kw)]


def test_list_sessions_rich_filters_order_and_paging(hdb, clock):
    for i, source in enumerate(["cli", "tg", "cron", "cli", "tg"]):
        clock.now = 100.0 + i
        hdb.create_session(f"s{i}", source)
    assert listed(hdb) == ["s4", "s3", "s2", "s1", "s0"]
    assert listed(hdb, source="cli") == ["s3", "s0"]
    assert listed(hdb, exclude_sources=["tg", "cron"]) == ["s3", "s0"]
    assert listed(hdb, source="cli", exclude_sources=["cli"]) == []
    assert listed(hdb, source="", exclude_sources=[]) == listed(hdb)
    assert listed(hdb, limit=2, offset=1) == ["s3", "s2"]
    assert listed(hdb, limit=-1, offset=3) == ["s1", "s0"]
    assert listed(hdb, limit=0) == []
    with pytest.raises(sqlite3.IntegrityError):
        hdb.list_sessions_rich(limit=None)


def test_list_sessions_rich_row_shape_and_last_active(hdb, clock):
    hdb.create_session("s", "cli")
    hdb.create_session("empty", "cli")
    clock.now = 1500.0
    hdb.append_message("s", "user", "hi")
    clock.now = 1200.0  # an earlier timestamp appended later: the largest one counts
    hdb.append_message("s", "assistant", "yo")
    rows = {r["id"]: r for r in hdb.list_sessions_rich()}
    assert list(rows["s"]) == SESSION_KEYS + ["last_active", "preview"]
    assert rows["s"]["last_active"] == 1500.0
    assert rows["empty"]["last_active"] == 1000.0
    assert rows["empty"]["preview"] == ""


@pytest.mark.parametrize("messages, preview", [
    ([("user", "hello")], "hello"),
    ([("assistant", "first"), ("user", "second")], "second"),
    ([("user", None), ("user", "after null")], "after null"),
    ([("user", ""), ("user", "not tried")], ""),  # "" counts: no later message is tried
    ([("system", "s"), ("tool", "t")], ""),
    ([("user", "a\r\nb\nc\rd\te  f")], "a  b c d\te  f"),
    ([("user", "  padded  ")], "padded"),
    ([("user", "x" * 60)], "x" * 60),
    ([("user", "x" * 61)], "x" * 60 + "..."),
    ([("user", "x" * 63)], "x" * 60 + "..."),
    ([("user", " " * 5 + "y" * 60)], "y" * 58),  # the 63 window precedes the strip
    ([("user", "y" * 59 + "      z")], "y" * 59),
    ([("user", "é" * 70)], "é" * 60 + "..."),
    ([("User", "case matters"), ("user", "this")], "this"),
])
def test_preview(hdb, messages, preview):
    hdb.create_session("s", "cli")
    for role, content in messages:
        hdb.append_message("s", role, content)
    assert hdb.list_sessions_rich()[0]["preview"] == preview


def test_preview_takes_the_earliest_user_message_by_timestamp_then_id(hdb, clock):
    hdb.create_session("s", "cli")
    clock.now = 2000.0
    hdb.append_message("s", "user", "later")
    clock.now = 1500.0
    hdb.append_message("s", "user", "earlier b")
    hdb.append_message("s", "user", "earlier c")
    assert hdb.list_sessions_rich()[0]["preview"] == "earlier b"


def test_search_sessions_and_counts(hdb, clock):
    for i, source in enumerate(["cli", "tg", "cli"]):
        clock.now = 100.0 + i
        hdb.create_session(f"s{i}", source)
    rows = hdb.search_sessions()
    assert [r["id"] for r in rows] == ["s2", "s1", "s0"]
    assert list(rows[0]) == SESSION_KEYS
    assert [r["id"] for r in hdb.search_sessions("cli")] == ["s2", "s0"]
    assert [r["id"] for r in hdb.search_sessions(None, 1, 1)] == ["s1"]
    assert [r["id"] for r in hdb.search_sessions(limit=-1)] == ["s2", "s1", "s0"]
    with pytest.raises(sqlite3.IntegrityError):
        hdb.search_sessions(limit=None)
    assert hdb.session_count() == 3
    assert hdb.session_count("cli") == 2
    assert hdb.session_count("") == 3
    assert hdb.session_count("none") == 0
    hdb.append_message("s0", "user", "a")
    hdb.append_message("s0", "assistant", "b")
    hdb.append_message("s1", "user", "c")
    assert hdb.message_count() == 3
    assert hdb.message_count("s0") == 2
    assert hdb.message_count("") == 3
    assert hdb.message_count("missing") == 0


# -- messages (spec 8) --------------------------------------------------------------------


def test_append_message_stores_and_counts(hdb, clock):
    hdb.create_session("s", "cli")
    clock.now = 1100.0
    mid = hdb.append_message("s", "assistant", "text", tool_name="t", tool_calls=[{"a": 1}],
                             tool_call_id="c1", token_count=7, finish_reason="stop",
                             reasoning="why", reasoning_details=[{"r": 1}],
                             codex_reasoning_items=[{"c": 2}])
    assert isinstance(mid, int)
    msg = hdb.get_messages("s")[0]
    assert list(msg) == MESSAGE_KEYS
    assert msg == {"id": mid, "session_id": "s", "role": "assistant", "content": "text",
                   "tool_call_id": "c1", "tool_calls": [{"a": 1}], "tool_name": "t",
                   "timestamp": 1100.0, "token_count": 7, "finish_reason": "stop",
                   "reasoning": "why", "reasoning_details": '[{"r": 1}]',
                   "codex_reasoning_items": '[{"c": 2}]'}


@pytest.mark.parametrize("tool_calls, counted, stored", [
    (None, 0, None), ([], 0, None), ({}, 1, None), ("", 1, None),
    ([{"id": 1}, {"id": 2}, {"id": 3}], 3, '[{"id": 1}, {"id": 2}, {"id": 3}]'),
    ((1, 2, 3), 1, "[1, 2, 3]"), ({"id": "x"}, 1, '{"id": "x"}'), ("call", 1, '"call"'),
])
def test_tool_call_counting_and_storage(hdb, tool_calls, counted, stored):
    hdb.create_session("s", "cli")
    hdb.append_message("s", "tool", "r", tool_calls=tool_calls)
    row = hdb.get_session("s")
    assert (row["message_count"], row["tool_call_count"]) == (1, counted)
    assert raw(hdb, "SELECT tool_calls FROM messages") == [(stored,)]


def test_every_role_counts_one_message_and_tool_role_adds_no_call(hdb):
    hdb.create_session("s", "cli")
    for role in ("user", "assistant", "tool", "system", "anything"):
        hdb.append_message("s", role, "x")
    assert (hdb.get_session("s")["message_count"], hdb.get_session("s")["tool_call_count"]
            ) == (5, 0)


@pytest.mark.parametrize("value, stored", [
    (None, None), ([], None), ({}, None), ("", None), ([1], "[1]"), ("é", '"\\u00e9"'),
])
def test_json_fields_stored_when_truthy(hdb, value, stored):
    hdb.create_session("s", "cli")
    hdb.append_message("s", "assistant", None, reasoning_details=value,
                       codex_reasoning_items=value)
    assert raw(hdb, "SELECT reasoning_details, codex_reasoning_items FROM messages") == [
        (stored, stored)]


def test_reasoning_is_stored_for_any_role_and_empty_is_kept(hdb):
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "u", reasoning="r1")
    hdb.append_message("s", "tool", "t", reasoning="")
    assert [m["reasoning"] for m in hdb.get_messages("s")] == ["r1", ""]


def test_message_ids_increase_and_are_never_reused(hdb):
    hdb.create_session("a", "cli")
    hdb.create_session("b", "cli")
    ids = [hdb.append_message(s, "user", "x") for s in ("a", "b", "a")]
    assert ids == sorted(ids) and len(set(ids)) == 3
    hdb.clear_messages("a")
    hdb.delete_session("b")
    assert hdb.append_message("a", "user", "y") > ids[-1]


def test_append_message_errors_change_nothing(hdb):
    hdb.create_session("s", "cli")
    with pytest.raises(sqlite3.ProgrammingError) as caught:
        hdb.append_message("s", "user", ["multimodal", "content"])
    assert isinstance(caught.value, sessiondb.SessionDBError)
    with pytest.raises(sqlite3.IntegrityError):
        hdb.append_message("s", None, "x")
    with pytest.raises(sqlite3.IntegrityError) as missing:
        hdb.append_message("missing", "user", "x")
    assert "FOREIGN KEY" in str(missing.value)
    with pytest.raises(TypeError) as caught:
        hdb.append_message("s", "assistant", "x", tool_calls=[object()])
    assert isinstance(caught.value, sessiondb.InvalidArgumentType)
    with pytest.raises(TypeError):
        hdb.append_message("s", "assistant", "x", reasoning_details={"x": {1, 2}})
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError):
        hdb.append_message("s", "assistant", "x", codex_reasoning_items=circular)
    row = hdb.get_session("s")
    assert (row["message_count"], row["tool_call_count"]) == (0, 0)
    assert hdb.message_count() == 0


def test_get_messages_order_and_decoding(hdb, clock):
    hdb.create_session("s", "cli")
    clock.now = 3000.0
    late = hdb.append_message("s", "user", "late")
    clock.now = 2000.0
    first = hdb.append_message("s", "user", "tie 1", tool_calls={"k": "v"})
    second = hdb.append_message("s", "user", "tie 2", tool_calls="plain")
    broken = hdb.append_message("s", "user", "broken", tool_calls=[1])
    hdb._execute_write(lambda c: c.execute(
        "UPDATE messages SET tool_calls = '{not json' WHERE id = ?", (broken,)))
    msgs = hdb.get_messages("s")
    assert [m["id"] for m in msgs] == [first, second, broken, late]
    assert [m["tool_calls"] for m in msgs] == [{"k": "v"}, "plain", "{not json", None]
    assert hdb.get_messages("missing") == []


def test_get_messages_as_conversation(hdb):
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "q", reasoning="hidden for users",
                       reasoning_details=[1])
    hdb.append_message("s", "assistant", None, tool_calls=[{"id": "c"}], tool_call_id="",
                       reasoning="think", reasoning_details=[{"d": 1}],
                       codex_reasoning_items={"i": 2}, token_count=5, finish_reason="x")
    hdb.append_message("s", "tool", "out", tool_name="grep", tool_call_id="c")
    hdb.append_message("s", "assistant", "done", reasoning="")
    bad = hdb.append_message("s", "assistant", "bad", tool_calls=[1], reasoning_details=[1])
    hdb._execute_write(lambda c: c.execute(
        "UPDATE messages SET tool_calls = 'nope', reasoning_details = '{' WHERE id = ?",
        (bad,)))
    conv = hdb.get_messages_as_conversation("s")
    assert conv == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}],
         "reasoning": "think", "reasoning_details": [{"d": 1}],
         "codex_reasoning_items": {"i": 2}},
        {"role": "tool", "content": "out", "tool_call_id": "c", "tool_name": "grep"},
        {"role": "assistant", "content": "done"},
        {"role": "assistant", "content": "bad"},
    ]
    assert list(conv[1]) == ["role", "content", "tool_calls", "reasoning",
                             "reasoning_details", "codex_reasoning_items"]
    assert list(conv[2]) == ["role", "content", "tool_call_id", "tool_name"]
    assert hdb.get_messages_as_conversation("missing") == []


# -- export and cleanup (spec 9) ----------------------------------------------------------


def test_export(hdb, clock):
    assert hdb.export_session("missing") is None
    assert hdb.export_all() == []
    for i, source in enumerate(["cli", "tg"]):
        clock.now = 100.0 + i
        hdb.create_session(f"s{i}", source)
        hdb.append_message(f"s{i}", "assistant", "x", tool_calls=[{"n": i}])
    one = hdb.export_session("s0")
    assert list(one) == SESSION_KEYS + ["messages"]
    assert one["messages"] == hdb.get_messages("s0")
    assert one["messages"][0]["tool_calls"] == [{"n": 0}]
    everything = hdb.export_all()
    assert [s["id"] for s in everything] == ["s1", "s0"]  # newest first
    assert everything[1] == one
    assert [s["id"] for s in hdb.export_all("tg")] == ["s1"]


def test_clear_messages(hdb):
    hdb.create_session("s", "cli")
    hdb.create_session("other", "cli")
    hdb.append_message("s", "user", "findable words", tool_calls=[1, 2])
    hdb.append_message("other", "user", "findable too")
    hdb.update_token_counts("s", 5, 5, estimated_cost_usd=1)
    hdb.set_session_title("s", "Kept")
    hdb.end_session("s", "done")
    last = hdb.append_message("s", "user", "x")
    before = hdb.get_session("s")
    assert hdb.clear_messages("s") is None
    after = hdb.get_session("s")
    assert after == before | {"message_count": 0, "tool_call_count": 0}
    assert hdb.get_messages("s") == []
    assert [h["session_id"] for h in hdb.search_messages("findable")] == ["other"]
    assert hdb.append_message("s", "user", "y") > last


def test_delete_session(hdb):
    assert hdb.delete_session("missing") is False
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "bye")
    assert hdb.delete_session("s") is True
    assert hdb.get_session("s") is None and hdb.message_count() == 0
    hdb.create_session("self", "cli", parent_session_id="self")
    assert hdb.delete_session("self") is True


def test_delete_a_referenced_parent_raises_and_rolls_back(hdb):
    hdb.create_session("p", "cli")
    hdb.append_message("p", "user", "keep me")
    hdb.create_session("c", "cli", parent_session_id="p")
    with pytest.raises(sqlite3.IntegrityError) as caught:
        hdb.delete_session("p")
    assert isinstance(caught.value, sessiondb.IntegrityViolation)
    assert hdb.get_session("p") is not None
    assert [m["content"] for m in hdb.get_messages("p")] == ["keep me"]
    assert hdb.get_session("c")["parent_session_id"] == "p"  # not re-parented


DAY = 86400.0


def aged(db: SessionDB, clock, sid: str, started_days_ago: float, ended: bool = True,
         source: str = "cli", parent: str | None = None) -> None:
    clock.now = 100 * DAY - started_days_ago * DAY
    db.create_session(sid, source, parent_session_id=parent)
    db.append_message(sid, "user", "m")
    if ended:
        db.end_session(sid, "done")


def test_prune_sessions(hdb, clock):
    aged(hdb, clock, "old", 95)
    aged(hdb, clock, "old-active", 95, ended=False)
    aged(hdb, clock, "old-tg", 95, source="tg")
    aged(hdb, clock, "young", 10)
    clock.now = 100 * DAY
    assert hdb.prune_sessions(200) == 0
    assert hdb.prune_sessions(source="tg") == 1
    assert hdb.prune_sessions() == 1  # 90 days
    assert {r["id"] for r in hdb.search_sessions()} == {"old-active", "young"}
    assert hdb.message_count() == 2
    assert hdb.prune_sessions(9.5) == 1  # fractional days
    aged(hdb, clock, "now", 0)
    clock.now = 100 * DAY + 1
    assert hdb.prune_sessions(0) == 1
    assert [r["id"] for r in hdb.search_sessions()] == ["old-active"]


def test_prune_parent_and_later_child_together(hdb, clock):
    aged(hdb, clock, "parent", 95)
    aged(hdb, clock, "child", 94, parent="parent")
    clock.now = 100 * DAY
    assert hdb.prune_sessions() == 2
    assert hdb.session_count() == 0


@pytest.mark.parametrize("child", [
    dict(started_days_ago=94, ended=False),      # the child stays: still active
    dict(started_days_ago=10),                    # too new
    dict(started_days_ago=94, source="tg"),       # another source (prune of cli only)
    dict(started_days_ago=96),                    # started before its parent
])
def test_prune_of_a_referenced_parent_deletes_nothing(hdb, clock, child):
    aged(hdb, clock, "parent", 95)
    aged(hdb, clock, "child", parent="parent", **child)
    aged(hdb, clock, "other", 99)
    clock.now = 100 * DAY
    with pytest.raises(sqlite3.IntegrityError):
        hdb.prune_sessions(source="cli")
    assert hdb.session_count() == 3 and hdb.message_count() == 3


def engine_write_timeout(db: SessionDB) -> float:
    engine = db._engine
    return engine._options["write_timeout"] if db.backend == "sqlite" else \
        engine.write_timeout


def test_write_timeout_defaults_to_about_the_originals_longest_wait(hdb, db_path):
    assert engine_write_timeout(hdb) == hermes.WRITE_TIMEOUT == 16.0
    with SessionDB(db_path, write_timeout=3) as db:
        assert engine_write_timeout(db) == 3.0


def test_one_instance_is_shared_by_threads(hdb):
    hdb.create_session("s", "cli")

    def append(n: int) -> list[int]:
        return [hdb.append_message("s", "user", f"thread {n} message {i}", tool_calls=[n])
                for i in range(25)]

    with ThreadPoolExecutor(4) as pool:
        ids = [i for chunk in pool.map(append, range(4)) for i in chunk]
    assert len(set(ids)) == 100
    row = hdb.get_session("s")
    assert (row["message_count"], row["tool_call_count"]) == (100, 100)


def test_sessiondb_transaction_groups_facade_calls(hdb):
    with hdb.transaction():
        hdb.create_session("s", "cli")
        hdb.append_message("s", "user", "kept")
    with pytest.raises(RuntimeError):
        with hdb.transaction():
            hdb.append_message("s", "user", "rolled back")
            raise RuntimeError("the turn failed")
    assert [m["content"] for m in hdb.get_messages("s")] == ["kept"]
    assert hdb.get_session("s")["message_count"] == 1


# -- the same facade on PostgreSQL: a URL, errors, concurrent writers (#12) ---------------


def test_a_url_opens_a_postgresql_store(pg_url, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = urlsplit(pg_url)
    url = urlunsplit(parts._replace(
        netloc=f"{parts.username}:secret@{parts.hostname}:{parts.port}"))
    with SessionDB(url) as db:
        # The argument itself, so that it opens the same store again; what is shown
        # hides the password.
        assert db.db_path == url and isinstance(db.db_path, str)
        assert db.backend == "postgresql"
        assert "secret" not in str(db.path) and "secret" not in repr(db)
        db.create_session("s", "cli")
        with SessionDB(db.db_path) as again:
            assert again.get_session("s")["source"] == "cli"
    assert list(tmp_path.iterdir()) == []  # no file made of the URL


def test_errors_chain_the_backend_error_in_sqlite_words(hdb, backend):
    with pytest.raises(hermes.IntegrityError) as caught:
        hdb.append_message("missing", "user", "x")
    engine_error = caught.value.__cause__
    assert isinstance(engine_error, sessiondb.IntegrityViolation)
    assert type(engine_error.__cause__).__module__.split(".")[0] == (
        "apsw" if backend == "sqlite" else "psycopg")
    assert str(caught.value).startswith("FOREIGN KEY constraint failed")
    hdb.create_session("s", "cli")
    with pytest.raises(hermes.IntegrityError) as caught:
        hdb.append_message("s", None, "x")
    assert str(caught.value).startswith("NOT NULL constraint failed: messages.role")


def test_values_of_another_type_than_the_column(hdb, backend):
    """SQLite's columns take any type (text affinity makes 5 the id "5"); PostgreSQL's
    have one: ProgrammingError, as for a value SQLite cannot store; a NUL in text
    cannot be stored there (InvalidArgument, a ValueError)."""
    hdb.create_session("5", "cli")
    if backend == "sqlite":
        assert hdb.get_session(5)["id"] == "5"
        assert hdb.create_session(None, "cli") is None  # a row with a NULL id
        assert hdb.session_count() == 2
        hdb.append_message("5", "user", "a\x00b")
        return
    with pytest.raises(hermes.ProgrammingError) as caught:
        hdb.get_session(5)
    assert isinstance(caught.value, sqlite3.ProgrammingError)
    assert hdb.create_session(None, "cli") is None  # not stored: a primary key
    assert hdb.session_count() == 1
    with pytest.raises(sessiondb.InvalidArgument):
        hdb.append_message("5", "user", "a\x00b")
    assert hdb.get_session("5")["message_count"] == 0
    with pytest.raises(hermes.ProgrammingError):
        hdb.update_token_counts("5", "abc")
    assert hdb.get_session("5")["input_tokens"] == 0


def test_core_and_facade_share_a_store(db_path):
    with SessionDB(db_path) as facade, sessiondb.SessionDB(db_path) as core:
        facade.create_session("f", "cli")
        facade.append_message("f", "user", "from the facade")
        core.create_session("c", "cli")
        core.append_message("c", "user", "from the core")
        assert {s["id"] for s in core.list_sessions()} == {"f", "c"}
        assert [m["content"] for m in facade.get_messages("c")] == ["from the core"]
        assert [m["content"] for m in core.get_messages("f")] == ["from the facade"]
        assert facade.message_count() == core.message_count() == 2


def test_appends_racing_clears_keep_the_counters_exact(hdb):
    hdb.create_session("s", "cli")

    def append(n: int) -> None:
        for i in range(30):
            hdb.append_message("s", "tool", f"{n}/{i}", tool_calls=[1, 2])

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(append, n) for n in range(3)]
        for _ in range(10):
            hdb.clear_messages("s")
        for future in futures:
            future.result()
    left = len(hdb.get_messages("s"))
    row = hdb.get_session("s")
    assert (row["message_count"], row["tool_call_count"]) == (left, 2 * left)
    assert hdb.message_count() == hdb.message_count("s") == left


def test_a_delete_racing_appends_leaves_no_message_behind(hdb):
    hdb.create_session("s", "cli")
    started = threading.Event()

    def append() -> int:
        done = 0
        for _ in range(100):
            try:
                hdb.append_message("s", "user", "x")
            except sqlite3.IntegrityError:
                continue  # the session is gone: nothing written
            done += 1
            started.set()
        return done

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(append) for _ in range(2)]
        assert started.wait(30)
        assert hdb.delete_session("s") is True  # a racing append does not fail it
        written = sum(future.result() for future in futures)
    assert written > 0
    assert raw(hdb, "SELECT count(*) FROM messages") == [(0,)]
    assert hdb.message_count() == 0 and hdb.session_count() == 0


def test_racing_title_setters_one_wins_the_other_hears_who(db_path):
    with SessionDB(db_path) as a, SessionDB(db_path) as b:
        a.create_session("x", "cli")
        a.create_session("y", "cli")
        for round_ in range(5):
            title = f"Same {round_}"
            barrier = threading.Barrier(2)

            def set_title(db: SessionDB, sid: str) -> Exception | None:
                barrier.wait()
                try:
                    db.set_session_title(sid, title)
                except ValueError as exc:
                    return exc
                return None

            with ThreadPoolExecutor(2) as pool:
                errors = [e for e in pool.map(set_title, (a, b), ("x", "y")) if e]
            winner = a.get_session_by_title(title)["id"]
            assert [str(e) for e in errors] == [
                f"Title '{title}' is already in use by session {winner}"]
            assert isinstance(errors[0], hermes.TitleInUse)
