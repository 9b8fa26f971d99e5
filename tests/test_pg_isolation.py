"""Isolation on PostgreSQL, proved with real processes racing on one database.

The rules check, then act; on PostgreSQL at READ COMMITTED each one first takes the
advisory locks of what it checks, with row locks and unique indexes behind them (see
:mod:`sessiondb.pg.dialect`). Eight processes, released at the same moment, race to
create one session id, take one title, update with one expected revision, hold one
lease, claim from one queue, and append to one session; sixteen open an empty database
at once. Asserted: exit codes, exact counts, every acknowledged write present. Never a
timing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest

import coord_workers
import pg_workers
import workers
from sessiondb import LeaseHeld, SchemaTooNewError, SessionDB
from sessiondb.pg.schema import SCHEMA_VERSION

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
RACERS = 8


def race(url: str, phase: str, n: int = RACERS,
         target: Callable[..., None] = pg_workers.race) -> dict[int, Any]:
    """Run ``phase`` in ``n`` spawned processes released together once all have opened
    the store; every exit code 0, one report each."""
    ready, results, start = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    at = SPAWN.Value("d", 0.0)
    args = [(url, i, ready, start, at, results) if target is pg_workers.open_empty
            else (url, phase, i, ready, start, at, results) for i in range(n)]
    procs = [SPAWN.Process(target=target, args=a) for a in args]
    for p in procs:
        p.start()
    try:
        waiting, deadline = n, time.monotonic() + 120
        while waiting:
            try:
                ready.get(timeout=0.5)
                waiting -= 1
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead and time.monotonic() < deadline, f"racers failed: {dead}"
        at.value = time.time() + 0.1
        start.set()
        reports = workers.collect(results, procs, n)
        for p in procs:
            p.join(60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * n
    assert len(reports) == n
    return dict(reports)


def test_eight_processes_creating_one_session_id_create_it_once(pg_url: str) -> None:
    reports = race(pg_url, "create_same_id")
    with SessionDB(pg_url) as db:
        assert db.session_count() == 1
        session = db.get_session("same")
        messages = db.get_messages("same")
    winner = int(session["source"].split("-")[1])
    assert session["model"] == f"model-{winner}"  # one creator's row, whole
    assert sorted(m["id"] for m in messages) == sorted(reports.values())
    assert session["message_count"] == RACERS


def test_eight_processes_taking_one_title_one_gets_it(pg_url: str) -> None:
    taken = race(pg_url, "take_same_title")
    assert Counter(taken.values()) == {"created": 1, "TitleConflict": RACERS - 1}
    [winner] = [r for r, outcome in taken.items() if outcome == "created"]
    with SessionDB(pg_url) as db:
        assert db.session_count() == 1  # a refused create left nothing behind
        assert db.get_session_by_title("The one title")["id"] == f"s{winner}"
        for r in range(RACERS):
            if r != winner:
                db.create_session(f"s{r}", "racer")
    retitled = race(pg_url, "retitle_to_same")
    assert Counter(retitled.values()) == {"set": 1, "TitleConflict": RACERS - 1}
    [second] = [r for r, outcome in retitled.items() if outcome == "set"]
    with SessionDB(pg_url) as db:
        assert db.get_session_by_title("The second title")["id"] == f"s{second}"
        titles = [db.get_session(f"s{r}")["title"] for r in range(RACERS)]
        assert titles.count("The second title") == 1
        first = db.get_session_by_title("The one title")
    # The first title went with the winner's retitle, or stayed where it was.
    assert first is None if second == winner else first["id"] == f"s{winner}"


def test_updates_with_the_same_expected_revision_never_both_win(pg_url: str, exhibit) -> None:
    with SessionDB(pg_url) as db:
        db.create_session("doc", "test")
    reports = race(pg_url, "same_expected_revision")
    attempts: dict[int, list[int | None]] = defaultdict(list)
    for outcomes in reports.values():
        for revision, after in outcomes:
            attempts[revision].append(after)
    wins = {rev: [a for a in afters if a is not None] for rev, afters in attempts.items()}
    assert all(len(w) <= 1 for w in wins.values()), wins  # never two winners
    assert all(w == [rev + 1] for rev, w in wins.items() if w)
    collided = max(len(a) for a in attempts.values())
    assert collided >= 2  # racers did update with the same expected revision
    with SessionDB(pg_url) as db:
        final = db.get_session("doc")
    won = sum(len(w) for w in wins.values())
    assert final["revision"] == won  # every win is one revision, nothing else moved it
    exhibit("8 processes updating with the same expected_revision, 6 rounds",
            "at most one winner per revision, revision == wins",
            rounds=pg_workers.ROUNDS, wins=won,
            stale=sum(len(a) for a in attempts.values()) - won,
            most_racers_on_one_revision=collided)


def test_concurrent_editors_with_expected_revisions_lose_no_update(pg_url: str) -> None:
    editors, edits = RACERS, 10
    with SessionDB(pg_url) as db:
        db.create_session("doc", "test")
    results, start = SPAWN.Queue(), SPAWN.Event()
    workers.run_all(SPAWN, coord_workers.edit_prompt,
                    [(pg_url, "doc", f"e{e}-", edits, start, results)
                     for e in range(editors)], results, start)
    with SessionDB(pg_url) as db:
        session = db.get_session("doc")
    for e in range(editors):
        for i in range(edits):
            assert session["system_prompt"].count(f"[e{e}-{i}]") == 1
    assert session["revision"] == editors * edits


def test_eight_processes_racing_for_one_lease_never_hold_it_together(pg_url: str) -> None:
    racers, rounds = RACERS, 6
    with SessionDB(pg_url) as db:
        db.create_session("ledger", "test")
    results, start = SPAWN.Queue(), SPAWN.Event()
    reports = workers.run_all(SPAWN, coord_workers.race_for_lease,
                              [(pg_url, "the-lease", rounds, start, results)] * racers,
                              results, start)
    with SessionDB(pg_url) as db:
        entries = [json.loads(m["content"]) for m in db.get_messages("ledger")]
        final = db.get_lease("the-lease")
    lost = sorted(t for r in reports for t in r["lost"])
    tokens = [e["token"] for e in entries]
    assert lost == []
    assert sorted(tokens) == list(range(1, racers * rounds + 1))  # each token once
    assert tokens == sorted(tokens)  # strictly increasing in the order of the writes
    for before, after in zip(entries, entries[1:]):
        # Each holding ended before the next began (the server's clock and this host's
        # are one clock here).
        assert before["done_at"] < after["acquired_at"], (before, after)
    assert len({e["pid"] for e in entries}) == racers
    assert final is None


def test_eight_claimers_claim_every_item_exactly_once(pg_url: str, tmp_path: Path) -> None:
    items, claimers = 160, RACERS
    with SessionDB(pg_url) as db:
        db.create_session("results", "test")
        ids = [db.enqueue("jobs", {"n": i}) for i in range(items)]
    ready, results = SPAWN.Queue(), SPAWN.Queue()
    logs = tmp_path / "claims"
    logs.mkdir()
    procs = [SPAWN.Process(target=coord_workers.claim_worker,
                           args=(pg_url, "jobs", str(logs), ready, results))
             for _ in range(claimers)]
    for p in procs:
        p.start()
    reports = workers.collect(results, procs, claimers, timeout=240)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * claimers
    assert len(reports) == claimers and all(r[2] == 0 for r in reports)  # none lost
    claims = [tuple(map(int, line.split())) for log in logs.iterdir()
              for line in log.read_text().splitlines()]
    # Each item claimed exactly once (token 1): nobody was handed an item being claimed.
    assert sorted(claims) == [(i, 1) for i in sorted(ids)]
    with SessionDB(pg_url) as db:
        assert db.queue_counts("jobs") == {"ready": 0, "claimed": 0, "done": items,
                                           "dead": 0}
        completed = Counter(int(m["content"]) for m in db.get_messages("results"))
    assert completed == Counter(ids)


def test_eight_processes_appending_to_one_session_lose_nothing(pg_url: str) -> None:
    with SessionDB(pg_url) as db:
        db.create_session("shared", "test")
    reports = race(pg_url, "append_many")
    with SessionDB(pg_url) as db:
        messages = db.get_messages("shared")
        shared = db.get_session("shared")
        created = [sid for r in reports.values() for sid in r["created"]]
        owned = [db.get_session(sid) for sid in created]
        sessions, total = db.session_count(), db.message_count()
    by_id = {m["id"]: m["content"] for m in messages}
    contents = [m["content"] for m in messages]
    assert len(contents) == len(set(contents)) == RACERS * 150  # each exactly once
    for racer, report in reports.items():
        assert report["timeouts"] == 0
        for mid, content in report["acked"]:
            assert by_id[mid] == content
        own = [m["id"] for m in messages if m["content"].startswith(f"p{racer}-m")]
        assert own == [mid for mid, _ in report["acked"]]  # in the order written
    assert shared["message_count"] == RACERS * 150
    assert shared["tool_call_count"] == RACERS * 50
    assert len(created) == RACERS * 6
    assert all(s["message_count"] == 1 for s in owned)
    assert sessions == 1 + len(created)
    assert total == RACERS * 150 + len(created)


def test_sixteen_processes_opening_an_empty_database_create_the_schema_once(
        pg_url: str) -> None:
    # Every DDL command is logged by an event trigger outside the store's schema.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("""
            CREATE TABLE public.ddl_log (tag text, object text, pid int);
            CREATE FUNCTION public.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO public.ddl_log SELECT command_tag, object_identity,
                    pg_backend_pid() FROM pg_event_trigger_ddl_commands();
            END $$;
            CREATE EVENT TRIGGER log_ddl ON ddl_command_end
                EXECUTE FUNCTION public.log_ddl();""")
    reports = race(pg_url, "open_empty", 16, target=pg_workers.open_empty)
    creators = [r for r, report in reports.items() if report["found"] == [0]]
    assert len(creators) == 1, reports
    assert all(report["found"] in ([0], [SCHEMA_VERSION]) for report in reports.values())
    assert {report["version"] for report in reports.values()} == {SCHEMA_VERSION}
    with psycopg.connect(pg_url, autocommit=True) as conn:
        created = conn.execute("SELECT object, count(*), count(DISTINCT pid) FROM "
                               "public.ddl_log WHERE tag = 'CREATE TABLE' GROUP BY object "
                               "ORDER BY object").fetchall()
        meta = conn.execute("SELECT key, value FROM sessiondb.sessiondb_meta").fetchall()
    assert ("sessiondb.sessions", 1, 1) in created
    assert all(count == 1 for _, count, _ in created)  # every table made once
    assert meta == [("schema_version", str(SCHEMA_VERSION))]
    with SessionDB(pg_url) as db:
        assert db.session_count() == 16


def store_state(url: str, schema: str) -> list[Any]:
    """What a refused open must leave as it was: the tables, the meta rows, the rows."""
    with psycopg.connect(url, autocommit=True) as conn:
        tables = conn.execute("SELECT table_name FROM information_schema.tables WHERE "
                              "table_schema = %s ORDER BY 1", [schema]).fetchall()
        meta = conn.execute(f'SELECT * FROM "{schema}".sessiondb_meta ORDER BY 1').fetchall()
        sessions = conn.execute(f'SELECT id, title, revision FROM "{schema}".sessions '
                                "ORDER BY 1").fetchall()
    return [tables, meta, sessions]


def test_a_newer_schema_is_refused_untouched(pg_url: str) -> None:
    with SessionDB(pg_url) as db:
        db.create_session("kept", "test", title="written by this version")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE sessiondb.sessiondb_meta SET value = %s WHERE key = "
                     "'schema_version'", [str(SCHEMA_VERSION + 1)])
    before = store_state(pg_url, "sessiondb")
    with pytest.raises(SchemaTooNewError) as info:
        SessionDB(pg_url)
    assert info.value.found == SCHEMA_VERSION + 1
    assert store_state(pg_url, "sessiondb") == before


def test_two_stores_in_one_database_do_not_see_each_other(pg_url: str) -> None:
    alpha = SessionDB(pg_url + "?schema=alpha")
    beta = SessionDB(pg_url, schema="beta")
    try:
        for db, who in ((alpha, "alpha"), (beta, "beta")):
            db.create_session("s", who, title="One title")  # same id, same title
            db.append_message("s", "user", f"only in {who}")
            db.enqueue("jobs", who)
        # The same lease name is one lease per store.
        a = alpha.acquire_lease("job", "a")
        b = beta.acquire_lease("job", "b")
        assert a.token == b.token == 1
        assert alpha.get_session("s")["source"] == "alpha"
        assert [m["content"] for m in beta.get_messages("s")] == ["only in beta"]
        assert alpha.claim("jobs", "w").payload == "alpha"
        assert beta.claim("jobs", "w").payload == "beta"
        assert alpha.session_count() == beta.session_count() == 1
        assert alpha.get_lease("job").owner == "a" and beta.get_lease("job").owner == "b"
        assert "schema=alpha" in alpha.path
    finally:
        alpha.close()
        beta.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        schemas = {s for (s,) in conn.execute(
            "SELECT DISTINCT table_schema FROM information_schema.tables WHERE "
            "table_name = 'sessions'")}
    assert schemas == {"alpha", "beta"}


def test_url_options_are_sessiondbs_own_and_checked(pg_url: str) -> None:
    from sessiondb import ConfigurationError
    from sessiondb.pg.urls import split_options

    assert split_options("postgresql://u@h/db?sslmode=disable&schema=a&pooler=1") == (
        "postgresql://u@h/db?sslmode=disable", {"schema": "a", "pooler": "1"})
    with pytest.raises(ConfigurationError):
        SessionDB(pg_url + "?pooler=maybe")
    with SessionDB(pg_url + "?pooler=1&schema=gamma") as db:
        assert db._engine._pooler and db._engine._schema == "gamma"
        assert db.path.endswith("?pooler=1&schema=gamma")  # the same store again
        db.create_session("s", "test")
    with SessionDB(db.path) as again:
        assert again.get_session("s") is not None


# -- fencing and liveness: the server's clock, this host's processes --------------------

def test_a_sigkilled_holder_on_this_host_is_taken_over_before_its_ttl(pg_url: str) -> None:
    ready, go, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=coord_workers.hold_lease,
                           args=(pg_url, "job", 3600, ready, go, results))
    holder.start()
    try:
        token = ready.get(timeout=60)
        with SessionDB(pg_url) as db:
            with pytest.raises(LeaseHeld):  # alive: its lease stands
                db.acquire_lease("job", "successor")
            os.kill(holder.pid, signal.SIGKILL)
            holder.join(30)
            assert holder.exitcode == -signal.SIGKILL
            assert db.acquire_lease("job", "successor", ttl=30).token == token + 1
    finally:
        if holder.is_alive():
            holder.kill()


def test_a_holder_on_another_host_lapses_by_its_ttl_on_the_servers_clock(
        pg_url: str) -> None:
    ttl, results = 2.0, SPAWN.Queue()
    [(token, expires_at)] = workers.run_all(
        SPAWN, pg_workers.acquire_as_host, [(pg_url, "job", "elsewhere", ttl, results)],
        results)
    with SessionDB(pg_url) as db:
        # Its process has exited, but on another host: that cannot be judged from here.
        with pytest.raises(LeaseHeld) as info:
            db.acquire_lease("job", "successor")
        assert info.value.holder == "on-elsewhere"
        server_now = db._engine.read(db._sql.now)
        assert expires_at - ttl <= server_now  # granted on the server's clock
        lease = db.acquire_lease("job", "successor", ttl=30, wait=ttl + 30)
        assert lease.token == token + 1
        assert lease.acquired_at >= expires_at  # not a moment before its TTL ran out


def test_a_heartbeat_on_a_host_whose_clock_is_ahead_keeps_its_lease(pg_url: str) -> None:
    results = SPAWN.Queue()
    [report] = workers.run_all(
        SPAWN, pg_workers.hold_with_skewed_clock, [(pg_url, "job", 60.0, 3.0, 3.0, results)],
        results)
    assert report["lost"] == [] and report["held"], report


def test_two_stores_in_one_database_do_not_queue_on_each_others_locks(pg_url: str) -> None:
    """A session, lease or owner of the same name in two stores is two things: a writer
    of one store never waits for the other's (advisory lock keys include the schema)."""
    with SessionDB(pg_url, schema="alpha") as alpha, \
            SessionDB(pg_url, schema="beta", write_timeout=1.0) as beta:
        for db in (alpha, beta):
            db.create_session("s", "test")
        with alpha.transaction():  # holds alpha's locks of "s", "lease:job", "owner:o"
            alpha.update_session("s", title="alpha's")
            alpha.acquire_lease("job", "o")
            started = time.monotonic()
            beta.update_session("s", title="beta's")  # WriteTimeout if it queued
            assert beta.acquire_lease("job", "o").token == 1
            assert time.monotonic() - started < 1.0
        assert alpha.get_session("s")["title"] == "alpha's"
        assert beta.get_session("s")["title"] == "beta's"
