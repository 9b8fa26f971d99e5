"""PostgreSQL under faults, with real processes and real sockets.

1. A client SIGKILLed, and one SIGSTOPped, while it holds a session's row lock in the
   middle of a transaction: the other writers of that session go on within the bound
   (at once after a kill, the socket closes; ``hold_timeout`` plus the server's grace
   after a stop, ``idle_in_transaction_session_timeout``), nothing acknowledged is lost.
2. A network partition (a loopback proxy that stops forwarding without closing anything)
   in the middle of a transaction: the server ends the session, the client gets a typed
   error within its bound (the hold watchdog shuts a socket it cannot cancel through),
   the others go on.
3. PgBouncer in transaction mode recycling its server connections every second:
   heartbeats keep renewing, nobody's lease or claim lapses, fenced writes go through.
4. An instance's pool filled by hung holders (deadline-bounded work hung inside
   transaction() blocks): the same instance's other calls get a typed error within
   ``write_timeout``; the server frees the hung sessions' locks; claim() elsewhere, at
   its owner's cap, still reaps the hung claims.
5. The server restarted (immediate shutdown, crash recovery) under load: typed errors,
   then writes resume in every process; every acknowledged write is there.

Every test records its figures with ``exhibit`` (printed at the end of the run) and
asserts bounds with a slack for a shared, noisy machine, never a tight timing.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

import pg_workers
import workers
from sessiondb import (
    CapExceeded, CapWarning, HoldTimeout, IntegrityViolation, SessionDB, StorageError,
    WriteTimeout,
)
from sessiondb.pg.engine import CANCEL_GRACE, IDLE_GRACE

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")
#: Seconds of scheduling slack on top of a bound (two cores, other tests running).
SLACK = 2.0


def lock_waiters(url: str) -> int:
    """Backends of this database waiting for a lock right now."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                            "current_database() AND wait_event_type = 'Lock'").fetchone()[0]


def backend_alive(url: str, pid: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            [pid]).fetchone()[0] > 0


def start_writers(url: str, session_id: str, n: int, **options: Any
                  ) -> tuple[list[Any], Any, Any]:
    stop, results = SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=pg_workers.append_until,
                           args=(url, session_id, w, stop, results, options))
             for w in range(n)]
    for p in procs:
        p.start()
    return procs, stop, results


def stop_writers(procs: list[Any], stop: Any, results: Any) -> list[dict[str, Any]]:
    stop.set()
    reports = workers.collect(results, procs, len(procs), timeout=120)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert len(reports) == len(procs)
    return reports


def check_acknowledged(db: SessionDB, session_id: str, reports: list[dict[str, Any]]
                       ) -> tuple[int, int]:
    """Every acknowledged (id, content) is in the session, its counter is exact; returns
    (acknowledged, lost)."""
    stored = {m["id"]: m["content"] for m in db.get_messages(session_id)}
    acked = [a for r in reports for a in r["acked"]]
    lost = [a for a in acked if stored.get(a[0]) != a[1]]
    assert lost == []
    assert db.get_session(session_id)["message_count"] == len(stored)
    return len(acked), len(lost)


def writing(db: SessionDB, session_id: str, since: float = 0.0) -> set[str]:
    """The writers whose messages (written after ``since``) are in the session."""
    return {m["content"].split("-")[0] for m in db.get_messages(session_id)
            if m["timestamp"] > since}


def calls_spanning(reports: list[dict[str, Any]], moment: float) -> list[tuple]:
    """The calls that were waiting at ``moment``."""
    return [c for r in reports for c in r["calls"] if c[0] <= moment <= c[1]]


# -- 0. transient failures: what is retried, and what is not --------------------------

def raising(sqlstate: str, times: int) -> Any:
    """A write function that fails with ``sqlstate`` (raised by the server) on its first
    ``times`` runs, then writes; ``calls`` counts the runs."""
    def write(conn: Any) -> int:
        write.calls += 1  # type: ignore[attr-defined]
        conn.execute("INSERT INTO sessiondb_meta (key, value) VALUES (?, 'x') "
                     "ON CONFLICT (key) DO NOTHING", (f"run-{write.calls}",))
        if write.calls <= times:
            conn.execute(f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = "
                         f"'{sqlstate}'; END $$")
        return write.calls
    write.calls = 0  # type: ignore[attr-defined]
    return write


@pytest.mark.parametrize("sqlstate", ["40001", "40P01"])  # serialization, deadlock
def test_serialization_failures_and_deadlocks_are_retried_within_write_timeout(
        pg_url: str, sqlstate: str) -> None:
    with SessionDB(pg_url, write_timeout=1.0) as db:
        assert db._engine.execute_write(raising(sqlstate, 3)) == 4
        assert db.stats()["retries"] == 3
        rows = db._engine.read(lambda c: c.execute(
            "SELECT key FROM sessiondb_meta WHERE key LIKE 'run-%' ORDER BY key").fetchall())
        assert rows == [("run-4",)]  # each failed run was rolled back whole
        forever = raising(sqlstate, 10**9)
        started = time.monotonic()
        with pytest.raises(WriteTimeout) as info:
            db._engine.execute_write(forever)
        assert time.monotonic() - started < 1.0 + SLACK
        assert info.value.attempts == forever.calls > 1


@pytest.mark.parametrize("sqlstate, error", [("23505", IntegrityViolation),
                                             ("57014", HoldTimeout),
                                             ("XX000", StorageError)])
def test_nothing_else_is_retried(pg_url: str, sqlstate: str, error: type) -> None:
    with SessionDB(pg_url, write_timeout=5.0) as db:
        write = raising(sqlstate, 1)
        with pytest.raises(error):
            db._engine.execute_write(write)
        assert write.calls == 1 and db.stats()["retries"] == 0


# -- 1. a holder SIGKILLed or SIGSTOPped mid-transaction -------------------------------

@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_holder_killed_or_stopped_mid_transaction_holds_up_the_session_only_briefly(
        pg_url: str, sig: str, exhibit) -> None:
    # A killed client's socket closes at once: a long hold_timeout shows that nothing
    # else freed the lock. A stopped one holds it until the server's bound.
    hold = 30.0 if sig == "SIGKILL" else 1.5
    with SessionDB(pg_url) as db:
        db.create_session("s", "test")
    procs, stop, wresults = start_writers(pg_url, "s", 3, write_timeout=20)
    ready, go, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=pg_workers.hold_row_lock,
                           args=(pg_url, "s", hold, ready, go, results))
    try:
        with SessionDB(pg_url) as db:  # the writers are writing
            workers.wait_for(lambda: db.message_count("s") >= 30, timeout=60)
        holder.start()
        info = ready.get(timeout=60)
        workers.wait_for(lambda: lock_waiters(pg_url) >= 3, timeout=30)
        if sig == "SIGKILL":
            time.sleep(1.0)  # the writers queue behind the holder a while
        signalled = time.time()
        os.kill(holder.pid, getattr(signal, sig))
        with SessionDB(pg_url) as db:
            before = db.message_count("s")
            workers.wait_for(lambda: db.message_count("s") > before + 3, timeout=60)
        released = time.time()
        time.sleep(0.5)  # writers go on a little after the release
        reports = stop_writers(procs, stop, wresults)
        outcome = "killed"
        if sig == "SIGSTOP":
            # The server ended the stopped client's session; resumed, it learns so.
            assert not backend_alive(pg_url, info["backend"])
            os.kill(holder.pid, signal.SIGCONT)
            go.set()
            [report] = workers.collect(results, [holder], 1, timeout=60)
            holder.join(60)
            assert holder.exitcode == 0
            outcome = report["outcome"]
            assert outcome in ("HoldTimeout", "ConnectionLost"), outcome
        else:
            holder.join(60)
            assert holder.exitcode == -signal.SIGKILL
    finally:
        for p in [holder, *procs]:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
    blocked = calls_spanning(reports, signalled)
    assert len(blocked) == 3  # every writer was waiting for the holder
    errors = [c for r in reports for c in r["calls"] if isinstance(c[2], str)]
    assert errors == []  # nobody timed out: the wait stayed under write_timeout
    # The kill frees the lock at once (the kernel closes the socket); a stopped client
    # holds it until the server's idle-in-transaction bound, counted from its last
    # statement.
    bound_from = signalled if sig == "SIGKILL" else info["ready_at"]
    bound = 0.0 if sig == "SIGKILL" else hold + IDLE_GRACE
    freed = max(c[1] for c in blocked) - bound_from
    assert freed < bound + SLACK, (freed, bound)
    with SessionDB(pg_url) as db:
        acknowledged, lost = check_acknowledged(db, "s", reports)
        contents = [m["content"] for m in db.get_messages("s")]
    assert "written by the stalled holder" not in contents
    what = "SIGKILLed" if sig == "SIGKILL" else "SIGSTOPped"
    exhibit(f"a holder {what} holding a session's row lock mid-transaction",
            "the other writers went on within the bound, the holder's write rolled back",
            writers=3, hold_timeout=hold, bound_s=round(bound, 2),
            released_after_s=round(freed, 2),
            longest_wait_s=round(max(c[1] - c[0] for c in blocked), 2),
            holder_outcome=outcome, acknowledged=acknowledged, lost=lost,
            watch_s=round(released - signalled, 2))


# -- 2. a network partition mid-transaction ---------------------------------------------

@pytest.mark.parametrize("when", ["mid-block", "past-the-bound"])
def test_a_partition_mid_transaction_ends_in_a_typed_error_and_frees_the_session(
        pg_url: str, freezable_proxy, when: str, exhibit) -> None:
    """``past-the-bound``: the partition begins after the watchdog has cut the block off
    (its statement cancelled, the socket not shut yet); the block must end at once, not
    wait on a ROLLBACK sent into the partition."""
    hold = 2.0
    with SessionDB(pg_url) as db:
        db.create_session("s", "test")
    proxy = freezable_proxy(pg_url)
    procs, stop, wresults = start_writers(pg_url, "s", 2, write_timeout=20)
    ready, go, thawed, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=pg_workers.partitioned_holder,
                           args=(proxy.url(pg_url), "s", hold, ready, go, thawed, results))
    try:
        with SessionDB(pg_url) as db:  # the writers are writing
            workers.wait_for(lambda: db.message_count("s") >= 20, timeout=60)
        holder.start()
        info = ready.get(timeout=60)
        if when == "past-the-bound":
            pg_workers.sleep_until(info["ready_at"] + hold + 0.3)
        proxy.freeze()
        frozen = time.time()
        go.set()  # the holder's next statement goes into the partition
        workers.wait_for(lambda: lock_waiters(pg_url) >= 2, timeout=30)
        # The server ends the partitioned session at its idle-in-transaction bound.
        workers.wait_for(lambda: not backend_alive(pg_url, info["backend"]), timeout=60)
        reaped = time.time()
        [report] = workers.collect(results, [holder], 1, timeout=60)
        proxy.thaw()
        thawed.set()
        [after] = workers.collect(results, [holder], 1, timeout=60)
        holder.join(60)
        reports = stop_writers(procs, stop, wresults)
    finally:
        for p in [holder, *procs]:
            if p.is_alive():
                p.kill()
    assert holder.exitcode == 0
    assert report["outcome"] in ("HoldTimeout", "ConnectionLost"), report
    if when == "mid-block":
        # The client's bound: the hold watchdog fires at hold_timeout, tries to cancel
        # (CANCEL_GRACE), waits CANCEL_GRACE for the statement to end, shuts the socket.
        client_bound = hold + 2 * CANCEL_GRACE
        client_s = report["failed_at"] - report["began"]
    else:  # already cut off: at once
        client_bound, client_s = 0.0, report["failed_at"] - report["sent"]
    assert client_s < client_bound + SLACK, (client_s, client_bound)
    server_bound = hold + IDLE_GRACE
    server_s = reaped - info["ready_at"]
    assert server_s < server_bound + SLACK, (server_s, server_bound)
    blocked = calls_spanning(reports, frozen + 0.1)
    assert len(blocked) == 2
    assert [c for r in reports for c in r["calls"] if isinstance(c[2], str)] == []
    freed = max(c[1] for c in blocked) - info["ready_at"]
    assert freed < server_bound + SLACK
    with SessionDB(pg_url) as db:
        acknowledged, lost = check_acknowledged(db, "s", reports)
        contents = [m["content"] for m in db.get_messages("s")]
    assert "before the partition" not in contents and "into the partition" not in contents
    assert "after the thaw" in contents and after["after_thaw"] > 0
    exhibit(f"a network partition (frozen proxy) mid-transaction, {when}",
            f"the server ended the session, the client got {report['outcome']}, "
            "the others went on",
            hold_timeout=hold, client_error_after_s=round(client_s, 2),
            client_bound_s=client_bound, server_reaped_after_s=round(server_s, 2),
            server_bound_s=server_bound, others_released_after_s=round(freed, 2),
            first_write_after_thaw_s=round(after["took"], 2),
            acknowledged=acknowledged, lost=lost)


# -- 3. PgBouncer recycling server connections under heartbeats -------------------------

@pytest.mark.parametrize("seconds", [pytest.param(30, id="30s"),
                                     pytest.param(300, id="5min", marks=pytest.mark.soak)])
def test_heartbeats_through_pgbouncer_recycling_connections_keep_every_holding(
        pg_url: str, make_pgbouncer, seconds: int, exhibit) -> None:
    bouncer = make_pgbouncer(server_lifetime=1, server_idle_timeout=1)
    dbname = pg_url.rsplit("/", 1)[1]
    url = bouncer.url(dbname) + "?pooler=1"
    holders, ttl = 4, 3.0
    with SessionDB(url) as db:
        db.create_session("ledger", "test")
    results = SPAWN.Queue()
    procs = [SPAWN.Process(target=pg_workers.hold_through_pooler,
                           args=(url, f"lease-{i}", ttl, seconds, "ledger", results))
             for i in range(holders)]
    for p in procs:
        p.start()
    backends: set[int] = set()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the server itself
        while any(p.is_alive() for p in procs) and results.qsize() < holders:
            backends.update(pid for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid != pg_backend_pid()"))
            time.sleep(0.25)
    reports = workers.collect(results, procs, holders, timeout=seconds + 120)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * holders
    assert len(reports) == holders
    for r in reports:
        assert r["lost"] == [] and r["refused"] == 0, r
        assert r["held_at_end"] and r["released"], r
        # A renewal is due every ttl/3: at least half of them happened.
        assert min(r["renewals"]) >= seconds / (ttl / 3) / 2, r
    with SessionDB(url) as db:
        ledger = [m["content"] for m in db.get_messages("ledger")]
        counts = db.queue_counts()
    assert len(ledger) == sum(r["fenced"] for r in reports)
    assert counts["done"] == holders and counts["ready"] == counts["claimed"] == 0
    # Tokens never moved: nobody's holding lapsed and was taken again.
    assert {r["token"] for r in reports} == {1} and {r["claim_token"] for r in reports} == {1}
    assert len(backends) > seconds / 2  # the pooler did recycle its server connections
    exhibit(f"PgBouncer (transaction mode) recycling server connections every 1 s, "
            f"{seconds} s of heartbeats",
            "no holding lost, tokens unchanged, every fenced write there",
            holders=holders, ttl=ttl, seconds=seconds,
            renewals=sum(sum(r["renewals"]) for r in reports),
            fenced_writes=len(ledger), lost=0,
            typed_errors=sum(len(r["errors"]) for r in reports),
            server_backends_seen=len(backends))


# -- 4. the pool filled by hung holders --------------------------------------------------

def test_a_pool_filled_by_hung_holders_gives_typed_errors_and_the_reaper_still_runs(
        pg_url: str, exhibit) -> None:
    holders = 2
    with SessionDB(pg_url, max_claims_per_owner=1) as db:
        for n in range(holders):
            db.create_session(f"s-{n}", "test")
            db.enqueue("jobs", {"n": n})
        db.enqueue("reaper's own")
        with pytest.warns(CapWarning):
            assert db.claim("reaper's own", "reaper", ttl=600) is not None  # at its cap
        ready, release, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
        hung = SPAWN.Process(target=pg_workers.hung_holders,
                             args=(pg_url, "s", holders, ready, release, results))
        hung.start()
        try:
            info = ready.get(timeout=60)
            # Another process writes the session the hung blocks hold: the server ends
            # their sessions at hold_timeout + grace.
            started = time.time()
            db.append_message("s-0", "user", "another process's turn")
            other_wait = time.time() - started
            # claim() at the cap raises CapExceeded, and has reaped the expired claims.
            ids = [i for i, _, _ in info["claims"]]
            expires = max(e for _, _, e in info["claims"])
            refused = 0
            while any(db.get_claim(i)["state"] == "claimed" for i in ids):
                with pytest.raises(CapExceeded):
                    db.claim("jobs", "reaper")
                refused += 1
                assert time.time() < expires + 30, "the hung claims were never reaped"
                time.sleep(0.05)
            reaped_after = time.time() - expires
            [report] = workers.collect(results, [hung], 1, timeout=120)
            release.set()
            [after] = workers.collect(results, [hung], 1, timeout=120)
            hung.join(60)
        finally:
            release.set()
            if hung.is_alive():
                hung.kill()
        assert hung.exitcode == 0
        states = [db.get_claim(i) for i in ids]
    assert info["pool"]["in_use"] == info["pool"]["size"] == holders
    assert report["pool_warnings"] >= 1
    write_timeout = report["write_timeout"]
    for what, waited, outcome in report["calls"]:
        assert outcome == "WriteTimeout", (what, outcome)
        assert waited < write_timeout + SLACK, (what, waited)
    assert sorted(report["outcomes"]) == ["DeadlineExceeded"] * holders
    assert all(s["state"] == "ready" and s["attempts"] == 1 for s in states), states
    assert after["recovered"] > 0
    exhibit("the pool filled by hung holders (work hung inside transaction() blocks, "
            "under deadlines)",
            "the instance's other calls got WriteTimeout within write_timeout; the "
            "server freed the locks; claim() at its cap elsewhere reaped the claims",
            pool_size=holders, in_use=info["pool"]["in_use"],
            write_timeout=write_timeout,
            calls=", ".join(f"{w} {o} in {t:.2f}s" for w, t, o in report["calls"]),
            other_process_wait_s=round(other_wait, 2),
            reaped_after_expiry_s=round(reaped_after, 2), cap_refusals=refused,
            pool_warnings=report["pool_warnings"],
            instance_recovered=bool(after["recovered"]))


# -- 5. the server restarted under load --------------------------------------------------

def test_a_server_restarted_under_load_gives_typed_errors_then_writes_resume(
        make_pg_server, exhibit) -> None:
    server = make_pg_server()
    url = server.create_database()
    writers_n = 4
    with SessionDB(url) as db:
        db.create_session("s", "test")
    procs, stop, results = start_writers(url, "s", writers_n, write_timeout=2,
                                         pool_size=2)
    try:
        with SessionDB(url) as db:  # every writer is writing
            workers.wait_for(lambda: len(writing(db, "s")) == writers_n, timeout=60)
        stopped = time.time()
        server.stop("immediate")  # no checkpoint: crash recovery at the start
        time.sleep(3.0)  # longer than write_timeout: calls wait for a connection in vain
        server.start()
        started = time.time()
        with SessionDB(url) as db:  # every writer writes again
            workers.wait_for(lambda: len(writing(db, "s", started)) == writers_n, timeout=60)
        reports = stop_writers(procs, stop, results)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    errors = Counter(c[2] for r in reports for c in r["calls"] if isinstance(c[2], str))
    assert errors, "no writer noticed the restart"
    # Down: the connection in use is lost, and no new one can be made (not "the pool is
    # busy": it had room).
    assert set(errors) == {"ConnectionLost"}, errors
    resumed = []
    for r in reports:
        after = [c for c in r["calls"] if c[1] > started and not isinstance(c[2], str)]
        assert after, f"writer {r['writer']} never wrote again"
        resumed.append(after[0][1] - started)
    longest_error = max((c[1] - c[0] for r in reports for c in r["calls"]
                         if isinstance(c[2], str)), default=0.0)
    assert longest_error < 2 + SLACK  # every failed call ended within write_timeout
    with SessionDB(url) as db:
        acknowledged, lost = check_acknowledged(db, "s", reports)
        stored = db.message_count("s")
    ambiguous = stored - acknowledged  # committed, but the answer was cut off
    exhibit("the server restarted (immediate shutdown, crash recovery) under 4 writers",
            "typed errors, then every writer wrote again; nothing acknowledged lost",
            writers=writers_n, down_s=round(started - stopped, 2),
            errors=dict(errors), longest_failed_call_s=round(longest_error, 2),
            write_timeout=2, resumed_within_s=round(max(resumed), 2),
            acknowledged=acknowledged, lost=lost, committed_unacknowledged=ambiguous)
