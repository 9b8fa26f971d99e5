"""``sessiondb doctor`` on a PostgreSQL store: versions, counts, counters, index health,
settings as the server applies them, advice; ``--repair`` recounts and reindexes."""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest

from sessiondb import SessionDB, cli, doctor
from sessiondb.pg import doctor as pg_doctor
from sessiondb.pg.bands import BAND_IDS
from sessiondb.pg.schema import SCHEMA_VERSION

OWN_INDEXES = {"idx_sessions_parent", "idx_sessions_title_unique", "idx_sessions_listing",
               "idx_sessions_source_listing", "idx_sessions_active_listing",
               "idx_messages_session", "idx_messages_session_ts",
               # schema 2: the search column's first band and tail (sessiondb.pg.bands)
               f"messages_fts_b0_{BAND_IDS}", f"messages_fts_t{BAND_IDS}",
               "sessiondb_leases_owner", "sessiondb_claims_ready", "sessiondb_claims_held",
               "sessiondb_claims_expiry"}


@pytest.fixture
def store(pg_url: str) -> str:
    """A store with three sessions and five messages."""
    with SessionDB(pg_url) as db:
        for sid, n in (("a-1", 3), ("b-2", 2), ("c-3", 0)):
            db.create_session(sid, "cli")
            for i in range(n):
                db.append_message(sid, "user", f"message {i} of {sid}")
    return pg_url


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def sql(url: str, statement: str, args: Any = None) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else []


def test_a_healthy_store(store, capsys):
    report = doctor.check(store)
    assert report["ok"] and report["problems"] == [], report["problems"]
    assert report["backend"] == "postgresql" and report["path"] == store
    assert set(report["versions"]) == {"sessiondb", "python", "psycopg", "libpq", "server"}
    assert report["versions"]["server"][0].isdigit()
    assert report["schema"] == "sessiondb"
    assert report["schema_version"] == report["schema_supported"] == SCHEMA_VERSION
    assert (report["sessions"], report["messages"]) == (3, 5)
    assert report["counters"] == report["index_health"] == "ok"
    assert OWN_INDEXES <= {i["name"] for i in report["indexes"]}
    assert all(i["valid"] and i["ready"] for i in report["indexes"])
    assert {t["name"] for t in report["tables"]} >= {"sessions", "messages"}
    conns = report["connections"]
    assert conns["max_connections"] > conns["in_use"] >= 1 and conns["pool_size"] == 8

    settings = report["settings"]
    # Writes bound what they hold (hold_timeout 10 s + 1 s) and how long they wait.
    idle = settings["idle_in_transaction_session_timeout"]
    assert (idle["server"], idle["write"]) == ("0", "11s")
    assert settings["statement_timeout"]["write"] != "0"
    assert settings["lock_timeout"]["write"] != "0" and settings["lock_timeout"]["read"] != "0"
    for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count"):
        assert settings[name]["server"] == settings[name]["write"]  # not set per transaction
    client = report["client"]
    assert client["transport"] == "tcp" and client["keepalives"] == "1"
    assert client["keepalives_idle"] == "10" and client["application_name"] == "sessiondb"
    # The test server leaves idle_in_transaction_session_timeout at 0: other clients of
    # the database are unprotected, and doctor says so without calling it a problem.
    assert any("other clients" in a for a in report["advice"])

    code, out, _ = run(capsys, "doctor", "--db", store)
    assert code == 0 and out.rstrip().endswith("healthy")
    assert f"sessiondb doctor: {store} (schema sessiondb)" in out
    assert "PostgreSQL " in out and "psycopg " in out and "libpq " in out
    assert "contents         3 sessions, 5 messages" in out
    assert "idle_in_transaction_session_timeout  0               11s" in out
    assert "advice:" in out
    code, out, _ = run(capsys, "doctor", "--db", store, "--json")
    assert code == 0 and json.loads(out)["ok"] and json.loads(out)["sessions"] == 3


def test_the_url_in_the_environment(store, capsys, monkeypatch):
    monkeypatch.setenv("SESSIONDB_PATH", store)
    code, out, _ = run(capsys, "doctor")
    assert code == 0 and store in out and "healthy" in out


def test_a_database_without_a_store_is_reported_and_left_alone(pg_url, capsys):
    report = doctor.check(pg_url + "?schema=nothing_here")
    assert not report["ok"] and not report["opened"] and report["schema_version"] == 0
    assert "no sessiondb store in schema 'nothing_here'" in report["problems"][0]
    assert report["settings"]  # the server's settings are reported all the same
    assert sql(pg_url, "SELECT to_regnamespace('nothing_here')") == [(None,)]
    code, out, _ = run(capsys, "doctor", "--db", pg_url)
    assert code == 1 and "nothing was created" in out
    assert sql(pg_url, "SELECT to_regnamespace('sessiondb')") == [(None,)]


def test_an_unreachable_server(capsys):
    from pgserver import free_port
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    report = doctor.check(url)
    assert not report["ok"] and not report["connected"]
    assert report["problems"][0].startswith(f"cannot connect to {url}")
    code, out, _ = run(capsys, "doctor", "--db", url)
    assert code == 1 and "cannot connect" in out


def test_the_password_is_never_shown(store):
    url = store.replace("postgres@", "postgres:s3cret@")  # trust auth ignores it
    report = doctor.check(url)
    assert report["ok"] and "s3cret" not in json.dumps(report, default=str)


def test_a_newer_schema_is_refused_untouched(store, capsys):
    sql(store, "UPDATE sessiondb.sessiondb_meta SET value = '99' "
               "WHERE key = 'schema_version'")
    code, out, _ = run(capsys, "doctor", "--db", store)
    assert code == 1 and "99" in out
    assert sql(store, "SELECT value FROM sessiondb.sessiondb_meta") == [("99",)]


def test_prefix_indexes_are_sqlite_only(store, capsys):
    code, _, err = run(capsys, "doctor", "--repair", "--prefix-index", "2,3", "--db", store)
    assert code == 2 and "SQLite" in err


# -- problems and --repair ----------------------------------------------------------------

def test_wrong_counters_are_found_and_recounted(store, capsys):
    sql(store, "UPDATE sessiondb.sessions SET message_count = 7 WHERE id = 'b-2'")
    sql(store, "UPDATE sessiondb.sessions SET message_count = 1 WHERE id = 'c-3'")
    code, out, _ = run(capsys, "doctor", "--db", store)
    assert code == 1 and "b-2: message_count 7, 2 messages" in out
    assert "c-3: message_count 1, 0 messages" in out and "--repair" in out
    code, out, _ = run(capsys, "doctor", "--repair", "--db", store)
    assert code == 0 and "2 counter(s) recounted" in out and "healthy" in out
    assert sql(store, "SELECT id, message_count FROM sessiondb.sessions ORDER BY id") == \
        [("a-1", 3), ("b-2", 2), ("c-3", 0)]


@pytest.mark.slow
def test_recount_misses_no_concurrent_append(pg_url, monkeypatch):
    """The recount locks the sessions' rows before it counts: appends running at the same
    time are counted by it or after it, never lost between the two."""
    sessions = [f"s-{i}" for i in range(40)]
    with SessionDB(pg_url) as db:
        for sid in sessions:
            db.create_session(sid, "cli")
            db.append_message(sid, "user", "first")
    sql(pg_url, "UPDATE sessiondb.sessions SET message_count = message_count + 100")
    monkeypatch.setattr(pg_doctor, "RECOUNT_BATCH", 3)
    stop = threading.Event()
    errors: list[BaseException] = []

    def append() -> None:
        try:
            with SessionDB(pg_url) as db:
                n = 0
                while not stop.is_set():
                    db.append_message(sessions[n % len(sessions)], "user", f"more {n}")
                    n += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=append) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        report = doctor.check(pg_url, repair=True)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors
    assert report["repaired"]["counters_fixed"] >= len(sessions)
    assert sql(pg_url, "SELECT s.id FROM sessiondb.sessions s WHERE message_count <> "
                       "(SELECT count(*) FROM sessiondb.messages m WHERE m.session_id = s.id)"
               ) == []


def test_an_invalid_index_is_found_and_rebuilt_concurrently(store, capsys):
    sql(store, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
               "'sessiondb.idx_messages_session_ts'::regclass")
    report = doctor.check(store)
    assert not report["ok"] and report["index_health"] == "idx_messages_session_ts is not valid"
    assert "--repair" in report["problems"][0]
    code, out, _ = run(capsys, "doctor", "--repair", "--db", store)
    assert code == 0 and "reindexed: idx_messages_session_ts" in out and "healthy" in out
    assert sql(store, "SELECT indisvalid FROM pg_index WHERE indexrelid = "
                      "'sessiondb.idx_messages_session_ts'::regclass") == [(True,)]


def test_a_leftover_of_a_failed_concurrent_rebuild_is_dropped(store):
    sql(store, "CREATE INDEX idx_messages_session_ccnew ON sessiondb.messages(session_id)")
    sql(store, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
               "'sessiondb.idx_messages_session_ccnew'::regclass")
    assert not doctor.check(store)["ok"]
    report = doctor.check(store, repair=True)
    assert report["ok"] and report["repaired"]["dropped"] == ["idx_messages_session_ccnew"]
    assert sql(store, "SELECT to_regclass('sessiondb.idx_messages_session_ccnew')") == [(None,)]


def test_a_missing_index_is_found_and_created(store, capsys):
    sql(store, "DROP INDEX sessiondb.idx_sessions_title_unique")
    code, out, _ = run(capsys, "doctor", "--db", store)
    assert code == 1 and "idx_sessions_title_unique is missing" in out
    report = doctor.check(store, repair=True)
    assert report["ok"] and report["repaired"]["created"] == ["idx_sessions_title_unique"]
    unique = sql(store, "SELECT indisunique, pg_get_expr(indpred, indrelid) FROM pg_index "
                        "WHERE indexrelid = 'sessiondb.idx_sessions_title_unique'::regclass")
    assert unique == [(True, "(title IS NOT NULL)")]


# -- advice ------------------------------------------------------------------------------

def test_advice_follows_the_settings_of_the_database(store):
    db_name = store.rsplit("/", 1)[1]
    sql(store, f"ALTER DATABASE {db_name} SET idle_in_transaction_session_timeout = '60s'")
    sql(store, f"ALTER DATABASE {db_name} SET idle_session_timeout = '30s'")
    report = doctor.check(store)
    assert report["ok"]  # advice is not a problem
    idle = report["settings"]["idle_in_transaction_session_timeout"]
    assert (idle["server"], idle["source"], idle["write"]) == ("1min", "database", "11s")
    assert not any("other clients" in a for a in report["advice"])
    assert any(a.startswith("idle_session_timeout is 30s") for a in report["advice"])


def test_a_pool_larger_than_the_server_allows_is_a_problem(make_pg_server):
    server = make_pg_server({"max_connections": 8, "superuser_reserved_connections": 1})
    url = server.create_database()
    SessionDB(url).close()
    report = doctor.check(url)
    assert not report["ok"]
    assert any("pool_size 8 is more than the 7 connections" in p for p in report["problems"])
