"""The write path: BEGIN IMMEDIATE, bounded jittered retry, rollback, one door for writes.

Contention is made deterministic first: a foreign apsw connection (not sessiondb, so it
bypasses the gate as the ``sqlite3`` shell would) holds the write lock, and the store must
wait or raise exactly as specified.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

import workers
from sessiondb import (
    DatabaseBusyError, IntegrityViolation, SessionDB, SessionNotFound, StorageError,
    WriteTimeout,
)
from sessiondb.checkpoint import CheckpointPolicy


def hold_write_lock(path: Path, how: str = "EXCLUSIVE") -> apsw.Connection:
    """A foreign connection holding SQLite's write lock until it commits."""
    conn = apsw.Connection(str(path))
    conn.execute(f"BEGIN {how}")
    conn.execute("CREATE TABLE IF NOT EXISTS foreign_marker(x)")
    return conn




# -- bounded waiting -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["EXCLUSIVE", "IMMEDIATE"])
def test_write_times_out_while_a_foreign_connection_holds_the_lock(db_path: Path, how: str):
    db = SessionDB(db_path, write_timeout=0.3)
    db.create_session("s", "cli")
    before = db.stats()
    foreign = hold_write_lock(db_path, how)
    try:
        with pytest.raises(WriteTimeout) as caught:
            db.append_message("s", "user", "never written")
    finally:
        foreign.execute("ROLLBACK")
        foreign.close()
    err = caught.value
    assert isinstance(err, DatabaseBusyError)
    assert err.attempts >= 1
    assert err.waited_s >= 0.3
    assert "Nothing was written" in str(err)
    assert isinstance(err.__cause__, (apsw.BusyError, apsw.LockedError))
    after = db.stats()
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["retries"] - before["retries"] == err.attempts
    assert after["writes"] == before["writes"]
    # Nothing was written, the transaction is closed and the gate is free again.
    assert db.message_count("s") == 0
    assert db.get_session("s")["message_count"] == 0
    assert db._engine._conn.get_autocommit()
    other = SessionDB(db_path, write_timeout=1.0)
    other.append_message("s", "user", "after")
    other.close()
    assert db.message_count("s") == 1
    db.close()


def test_write_succeeds_when_the_lock_is_released_during_the_wait(db_path: Path):
    db = SessionDB(db_path, write_timeout=30.0)
    db.create_session("s", "cli")
    foreign = hold_write_lock(db_path)

    def release_once_the_writer_has_retried() -> None:
        workers.wait_for(lambda: db._engine._writes.counters.retries >= 1)
        time.sleep(0.1)
        foreign.execute("ROLLBACK")

    releaser = threading.Thread(target=release_once_the_writer_has_retried)
    releaser.start()
    try:
        mid = db.append_message("s", "user", "eventually")
    finally:
        releaser.join()
        foreign.close()
    assert db.stats()["retries"] >= 1
    assert db.stats()["timeouts"] == 0
    assert [m["id"] for m in db.get_messages("s")] == [mid]
    assert db.get_session("s")["message_count"] == 1
    db.close()


def test_a_write_that_waits_on_the_gate_times_out_as_write_timeout(db_path: Path):
    """Another SessionDB holding a transaction open: the wait is in the gate (kernel
    queue), and it is still bounded by write_timeout."""
    holder = SessionDB(db_path)
    holder.create_session("s", "cli")
    waiter = SessionDB(db_path, write_timeout=0.3)
    with holder.transaction():
        holder.append_message("s", "user", "held")
        with pytest.raises(WriteTimeout) as caught:
            waiter.append_message("s", "user", "too late")
    assert caught.value.waited_s >= 0.3
    assert caught.value.attempts >= 1
    assert waiter.stats()["timeouts"] == 1
    waiter.append_message("s", "user", "now")
    assert [m["content"] for m in waiter.get_messages("s")] == ["held", "now"]
    holder.close()
    waiter.close()


# -- nothing but busy is retried -------------------------------------------------------


def test_non_busy_errors_are_never_retried(db: SessionDB):
    calls = []

    def fails_with_value_error(conn: apsw.Connection) -> None:
        calls.append(1)
        conn.execute("INSERT INTO sessions (id, source, started_at) VALUES ('v', 'x', 0)")
        raise ValueError("boom")

    def violates_a_constraint(conn: apsw.Connection) -> None:
        calls.append(1)
        conn.execute("INSERT INTO sessions (id, source, started_at) VALUES ('dup', 'x', 0)")
        conn.execute("INSERT INTO sessions (id, source, started_at) VALUES ('dup', 'x', 0)")

    def bad_sql(conn: apsw.Connection) -> None:
        calls.append(1)
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    before = db.stats()
    for fn, expected in ((fails_with_value_error, ValueError),
                         (violates_a_constraint, IntegrityViolation),
                         (bad_sql, StorageError)):
        calls.clear()
        with pytest.raises(expected):
            db._execute_write(fn)
        assert len(calls) == 1, fn.__name__
    with pytest.raises(SessionNotFound):
        db.append_message("missing", "user", "x")
    with pytest.raises(SessionNotFound):
        db.create_session("orphan", "cli", parent_session_id="missing")
    after = db.stats()
    assert after["retries"] == before["retries"]
    assert after["failed_writes"] == before["failed_writes"] + 5
    assert after["writes"] == before["writes"]
    assert db.session_count() == 0
    assert db._engine._conn.get_autocommit()


def test_busy_inside_the_body_is_rolled_back_then_retried(db: SessionDB):
    """SQLITE_BUSY raised mid-transaction (here by the body itself on its first run) is
    retried on a clean slate: the first run's INSERT is rolled back, not doubled."""
    calls = []

    def body(conn: apsw.Connection) -> int:
        calls.append(1)
        conn.execute("INSERT INTO sessions (id, source, started_at) VALUES ('b', 'x', 0)")
        if len(calls) == 1:
            raise apsw.BusyError("database is locked")
        return len(calls)

    before = db.stats()["retries"]
    assert db._execute_write(body) == 2
    assert db.stats()["retries"] == before + 1
    assert db.session_count() == 1


# -- rollback on any exception ---------------------------------------------------------


@pytest.mark.parametrize("exc", [ValueError("x"), KeyboardInterrupt(), SystemExit(2)])
def test_any_exception_in_the_body_rolls_back(db: SessionDB, exc: BaseException):
    db.create_session("s", "cli")

    def body(conn: apsw.Connection) -> None:
        conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                     "VALUES ('s', 'user', 'ghost', 0)")
        conn.execute("UPDATE sessions SET message_count = 99 WHERE id = 's'")
        raise exc

    with pytest.raises(type(exc)):
        db._execute_write(body)
    assert db.message_count("s") == 0
    assert db.get_session("s")["message_count"] == 0
    assert db.search_messages("ghost") == []
    assert db._engine._conn.get_autocommit()
    assert not db._engine._writes.active
    # The gate was released: a second instance writes at once.
    other = SessionDB(db.path, write_timeout=1.0)
    other.append_message("s", "user", "real")
    other.close()


def test_transaction_block_rolls_back_everything_on_exception(db: SessionDB):
    db.create_session("s", "cli")
    with pytest.raises(RuntimeError):
        with db.transaction():
            db.append_message("s", "user", "one")
            db.create_session("t", "cli")
            raise RuntimeError("abandon")
    assert db.message_count() == 0
    assert db.get_session("t") is None
    assert db.get_session("s")["message_count"] == 0
    assert db._engine._conn.get_autocommit()


def test_failed_call_inside_transaction_undoes_only_itself(db: SessionDB):
    db.create_session("s", "cli")
    with db.transaction():
        db.append_message("s", "user", "kept")
        with pytest.raises(SessionNotFound):
            db.append_message("missing", "user", "undone")
        db.append_message("s", "user", "kept too")
    assert [m["content"] for m in db.get_messages("s")] == ["kept", "kept too"]
    assert db.get_session("s")["message_count"] == 2


def test_transaction_holds_the_write_lock_for_the_whole_block(db_path: Path):
    a = SessionDB(db_path)
    b = SessionDB(db_path, write_timeout=0.2)
    a.create_session("s", "cli")
    with a.transaction():
        a.append_message("s", "user", "first")
        with pytest.raises(WriteTimeout):
            b.append_message("s", "user", "blocked")
        a.append_message("s", "user", "second")
    b.append_message("s", "user", "third")
    assert [m["content"] for m in b.get_messages("s")] == ["first", "second", "third"]
    a.close()
    b.close()


# -- one door: no mutation outside the write helper ------------------------------------

_MUTATING = re.compile(
    r"^\s*(?:WITH\b.*?\)\s*)?(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER|VACUUM|REINDEX)\b",
    re.IGNORECASE | re.DOTALL)
_PRAGMA = re.compile(r'^\s*PRAGMA\s+(?:"?\w+"?\.)?"?(\w+)"?\s*([=(])?', re.IGNORECASE)
# Per-connection settings applied when a connection is opened (not data changes).
_SETUP_PRAGMAS = {"journal_mode", "synchronous", "foreign_keys", "mmap_size",
                  "journal_size_limit", "auto_vacuum", "page_size", "busy_timeout", "wal_autocheckpoint",
                  "cache_size", "temp_store", "fullfsync"}
_ALWAYS_MUTATING_PRAGMAS = {"incremental_vacuum", "optimize", "user_version",
                            "application_id", "writable_schema"}


def is_mutation(sql: str) -> bool:
    if _MUTATING.match(sql):
        return True
    m = _PRAGMA.match(sql)
    if not m:
        return False
    name, assigns = m.group(1).lower(), m.group(2) is not None
    if name in ("incremental_vacuum", "optimize"):
        return True
    return assigns and name not in _SETUP_PRAGMAS


def test_mutation_classifier():
    assert is_mutation("INSERT INTO x VALUES (1)")
    assert is_mutation("  replace into x values (1)")
    assert is_mutation("WITH a(x) AS (SELECT 1) DELETE FROM t WHERE x IN a")
    assert is_mutation('pragma "user_version"(1)')
    assert is_mutation("PRAGMA incremental_vacuum")
    assert not is_mutation('pragma "user_version"')
    assert not is_mutation('pragma "journal_mode"(\'wal\')')
    assert not is_mutation("SELECT 'INSERT'")


def test_every_mutation_runs_inside_the_write_helper(tmp_path: Path, monkeypatch):
    """apsw's exec tracer sees every statement of every connection the library opens
    (installed through ``apsw.connection_hooks``, so the schema creation is seen too).
    A mutating statement must run inside a ``BEGIN IMMEDIATE`` bracket that the write
    helper opened, with the helper marked active."""
    seen: list[tuple[str, bool, bool | None]] = []
    current: dict[str, SessionDB] = {}

    def hook(conn: apsw.Connection) -> None:
        state = {"immediate": False}

        def trace(cursor: Any, sql: str, bindings: Any) -> bool:
            upper = sql.strip().upper()
            if upper.startswith("BEGIN IMMEDIATE"):
                state["immediate"] = True
            db = current.get("db")
            active = db._engine._writes.active if db is not None and db._engine._conn is conn else None
            seen.append((sql, state["immediate"], active))
            if upper.startswith(("COMMIT", "END")) or (
                    upper.startswith("ROLLBACK") and not upper.startswith("ROLLBACK TO")):
                state["immediate"] = False
            return True

        conn.exec_trace = trace

    monkeypatch.setattr(apsw, "connection_hooks", [*apsw.connection_hooks, hook])
    workers.TOURED.clear()
    workers.tour_api(tmp_path / "tour.db", on_open=lambda db: current.update(db=db))

    public = {n for n, _ in inspect.getmembers(SessionDB) if not n.startswith("_")}
    assert public <= workers.TOURED, f"not exercised: {sorted(public - workers.TOURED)}"

    mutations = [(sql, immediate, active) for sql, immediate, active in seen
                 if is_mutation(sql)]
    outside = [sql for sql, immediate, active in mutations
               if not immediate or active is False]
    assert outside == []
    kinds = {_MUTATING.match(sql).group(1).upper() for sql, _, _ in mutations
             if _MUTATING.match(sql)}
    assert {"INSERT", "UPDATE", "DELETE", "CREATE"} <= kinds
    assert any(sql.strip().upper().startswith("CREATE TABLE SESSIONS") for sql, _, _ in mutations)
    assert any(active is True for _, _, active in mutations)


# -- stats -----------------------------------------------------------------------------


def test_stats_report_actionable_figures(db_path: Path, gate_kind: str):
    db = SessionDB(db_path, checkpoint_every=5)
    db.create_session("s", "cli")
    start = db.stats()
    for i in range(20):
        db.append_message("s", "user", f"m{i}")
    s = db.stats()
    for key in ("writes", "failed_writes", "retries", "timeouts", "contended_writes",
                "lock_wait_p50_s", "lock_wait_p90_s", "lock_wait_p99_s", "lock_wait_max_s",
                "lock_hold_p50_s", "lock_hold_p99_s", "lock_hold_max_s", "checkpoint",
                "wal_bytes", "gate"):
        assert key in s, key
    assert s["writes"] - start["writes"] == 20
    assert s["retries"] == s["timeouts"] == s["failed_writes"] == 0
    assert s["contended_writes"] == 0
    assert 0 <= s["lock_wait_p50_s"] <= s["lock_wait_p90_s"] <= s["lock_wait_p99_s"] \
        <= s["lock_wait_max_s"]
    assert 0 < s["lock_hold_p50_s"] <= s["lock_hold_p99_s"] <= s["lock_hold_max_s"]
    cp = s["checkpoint"]
    for key in ("passive_runs", "passive_busy", "resets_ok", "resets_failed",
                "last_wal_frames", "last_checkpointed_frames", "longest_reset_s"):
        assert key in cp, key
    assert cp["passive_runs"] + cp["passive_busy"] >= 4
    assert s["wal_bytes"] == os.stat(str(db_path) + "-wal").st_size > 0
    assert s["gate"] == gate_kind  # "ofd" or "posix"
    runs = cp["passive_runs"]
    result = db.checkpoint()
    assert result["wal_frames"] >= result["checkpointed_frames"] >= 0
    assert db.stats()["checkpoint"]["passive_runs"] == runs + 1
    db.close()
    assert SessionDB(db_path, gate=False).stats()["gate"] == "none"


def test_wal_bound_is_checked_after_every_write(db_path: Path):
    """Large messages: a handful of writes add more than the whole WAL limit, so the
    bound cannot wait for the periodic (every 50 writes) checkpoint."""
    limit = 512 * 1024
    db = SessionDB(db_path, checkpoint_every=50, wal_limit=limit)
    db.create_session("s", "cli")
    wal = str(db_path) + "-wal"
    peak = 0
    for i in range(30):
        db.append_message("s", "user", f"m{i} " + "z" * 100_000)
        peak = max(peak, os.stat(wal).st_size)
    assert peak < limit
    assert db.stats()["checkpoint"]["resets_ok"] >= 3
    db.close()


def test_wal_reset_truncates_and_counts(db_path: Path):
    db = SessionDB(db_path, checkpoint_every=5, wal_limit=64 * 1024)
    db.create_session("s", "cli")
    for i in range(40):
        db.append_message("s", "user", "x" * 2000)
    cp = db.stats()["checkpoint"]
    assert cp["resets_ok"] >= 1
    assert cp["resets_failed"] == 0
    db.checkpoint(reset=True)
    assert db.stats()["wal_bytes"] == 0  # TRUNCATE leaves an empty -wal file
    db.close()


def _long_step(db: SessionDB) -> None:
    """One transaction that leaves more than an eighth of a 1 MB wal_limit in the WAL,
    as a step of maintenance does of the default limit."""
    with db.transaction():
        for i in range(200):
            db.append_message("s", "user", f"m{i} " + "x" * 1000)
    assert db._engine._checkpoints.over(1 / 8)


def test_after_a_long_step_the_next_write_starts_the_wal_again(db_path: Path):
    """After a step that left an eighth of wal_limit in the WAL, the maintainer has it
    copied and then runs a RESTART checkpoint in the gate: the next write, by any
    process, goes to the beginning of the WAL instead of growing it."""
    with SessionDB(db_path, wal_limit=1 << 20, checkpoint_every=0) as db, \
            SessionDB(db_path, checkpoint_every=0) as other:
        db.create_session("s", "cli")
        _long_step(db)
        size = db.stats()["wal_bytes"]
        db._engine.between_steps()
        cp = db.stats()["checkpoint"]
        assert cp["step_restarts"] == 1
        assert cp["last_checkpointed_frames"] == cp["last_wal_frames"] > 200
        other.append_message("s", "user", "after the step")
        assert 0 < other.checkpoint()["wal_frames"] < cp["last_wal_frames"] / 10
        assert db.stats()["wal_bytes"] == size  # overwritten from its beginning


@pytest.mark.sqlite_only
def test_no_restart_after_a_step_while_a_snapshot_reads(db_path: Path):
    """A snapshot reader in the room is not waited for (writers would queue behind it
    in the gate): the step's copy alone, and the RESTART after the next step."""
    with SessionDB(db_path, wal_limit=1 << 20, checkpoint_every=0) as db, \
            SessionDB(db_path) as reader:
        db.create_session("s", "cli")
        _long_step(db)
        with reader.snapshot():
            assert reader.message_count("s") == 200
            db._engine.between_steps()
            assert db.stats()["checkpoint"]["step_restarts"] == 0
            db.append_message("s", "user", "while it reads")
        db._engine.between_steps()
        assert db.stats()["checkpoint"]["step_restarts"] == 1
        assert db.message_count("s") == 201


def test_a_restart_after_a_step_gives_up_on_a_pinned_reader_and_tries_later(
        db_path: Path, monkeypatch):
    """A reader that does not cooperate makes the RESTART give up at its busy bound
    (busy is not a fault); the next one is tried only after a pause."""
    with SessionDB(db_path, wal_limit=1 << 20, checkpoint_every=0) as db:
        db.create_session("s", "cli")
        _long_step(db)
        reader = apsw.Connection(str(db_path))
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchall()
        db._engine.between_steps()
        cp = db.stats()["checkpoint"]
        assert cp["step_restarts"] == 0 and cp["passive_failed"] == 0
        policy = db._engine._checkpoints
        assert policy._restart_after > time.monotonic()  # the pause
        reader.execute("COMMIT")
        reader.close()
        db._engine.between_steps()
        assert db.stats()["checkpoint"]["step_restarts"] == 0  # still in the pause
        monkeypatch.setattr(policy, "_restart_after", 0.0)
        db._engine.between_steps()
        assert db.stats()["checkpoint"]["step_restarts"] == 1


def test_only_the_writer_that_grew_the_wal_resets_it_inline(db_path: Path, monkeypatch):
    """A write that takes the WAL past 60% of the limit resets it before its call
    returns (it pays for what it wrote); a small write of another instance that finds
    the WAL already past the line, grown by the first one, does not: it only requests
    the background reset. (At ten million messages an appender's small writes each
    reset the WAL inline after a maintainer's large steps, 1.1 s per call.) A foreign
    reader pins the WAL, so the large writer's reset fails and leaves it large."""
    limit = 256 * 1024
    inline: list[str] = []
    reset = CheckpointPolicy.reset

    def spy(self: CheckpointPolicy, wait: bool = False, past: float = 0.0, **kw: object
            ) -> bool:
        if past:
            inline.append(threading.current_thread().name)
        return reset(self, wait, past, **kw)

    monkeypatch.setattr(CheckpointPolicy, "reset", spy)
    with SessionDB(db_path, checkpoint_every=0, wal_limit=limit, reset_timeout=0.05) as big, \
            SessionDB(db_path, checkpoint_every=0, wal_limit=limit,
                      reset_timeout=0.05) as small:
        big.create_session("s", "cli")
        small.append_message("s", "user", "before")
        reader = apsw.Connection(str(db_path))
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchall()
        try:
            inline.clear()
            big.append_message("s", "tool", "z" * (limit * 7 // 10))
            assert inline == [threading.current_thread().name]  # it grew it: it paid
            inline.clear()
            for i in range(5):
                small.append_message("s", "user", f"small {i}")
            assert small._engine._checkpoints.over(0.6)  # past the line, not its doing
            assert inline == []
        finally:
            reader.execute("COMMIT")
            reader.close()
        small.checkpoint(reset=True)
        assert small.stats()["wal_bytes"] == 0
        assert small.message_count("s") == 7


def test_wal_reset_fails_against_a_pinned_reader_but_writes_flow(db_path: Path):
    """A foreign reader that never ends its snapshot defeats the reset (counted as
    failed, bounded by reset_timeout); every write still succeeds."""
    db = SessionDB(db_path, checkpoint_every=5, wal_limit=64 * 1024, reset_timeout=0.1)
    db.create_session("s", "cli")
    reader = apsw.Connection(str(db_path))
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM messages").fetchall()
    before = db.stats()["checkpoint"]
    for i in range(40):
        db.append_message("s", "user", "y" * 2000)
    db.checkpoint()  # resets run in the background: one more, synchronous, to count
    cp = db.stats()["checkpoint"]
    assert cp["resets_failed"] > before["resets_failed"]
    assert cp["resets_ok"] == before["resets_ok"]
    # After a failed reset the next try waits for the periodic checkpoint (every 5
    # writes here), so a pinned reader stalls writers per period, not per write.
    # At most: one before the first periodic checkpoint, one per period, one for the
    # explicit checkpoint() above.
    assert cp["resets_failed"] - before["resets_failed"] <= 40 // 5 + 2
    assert db.message_count("s") == 40
    reader.execute("COMMIT")
    reader.close()
    db.checkpoint()
    assert db.stats()["checkpoint"]["resets_ok"] == before["resets_ok"] + 1
    assert db.stats()["wal_bytes"] == 0
    db.close()


@pytest.mark.slow
def test_wal_reset_gets_through_foreign_readers_that_overlap(db_path: Path):
    """A foreign process always has a read transaction open (two of 0.3 s in turns, a
    half period apart) while a writer keeps appending: every reset gets through, by
    waiting for the readers open when it starts and then for those that began before
    its copy completed. One long checkpoint call could wait, past any busy timeout, for
    a reader slot that the next readers keep taking (``_checkpoint_until`` in
    sessiondb.checkpoint): before it waited in short calls, about a third of these
    resets waited out the whole ``reset_timeout``. The 3 s bound is about five times
    what the readers make a reset wait; it bounds the test, it is not a timing."""
    spawn = multiprocessing.get_context("spawn")
    stop, ready, results = spawn.Event(), spawn.Event(), spawn.Queue()
    reader = spawn.Process(target=workers.overlapping_readers,
                           args=(str(db_path), 0.3, stop, ready, results))
    db = SessionDB(db_path, reset_timeout=3.0)  # the default wal_limit: no reset of its own
    db.create_session("s", "cli")
    reads = None
    try:
        reader.start()
        assert ready.wait(60), "the readers never started"
        for round_ in range(8):
            halt = threading.Event()

            def write() -> None:
                i = 0
                while not halt.is_set():
                    db.append_message("s", "user", f"r{round_}-{i} " + "x" * 3000)
                    i += 1

            writer = threading.Thread(target=write)
            writer.start()
            try:
                time.sleep(0.3)  # the readers' snapshots fall behind the WAL's end
                db.checkpoint(reset=True)
                cp = db.stats()["checkpoint"]
                assert (cp["resets_ok"], cp["resets_failed"]) == (round_ + 1, 0)
            finally:
                halt.set()
                writer.join(60)
    finally:
        stop.set()
        reads = (workers.collect(results, [reader], 1, timeout=60) or [None])[0]
        reader.join(60)
        if reader.is_alive():
            reader.kill()
            reader.join(10)
    assert reader.exitcode == 0 and reads is not None and reads["errors"] == []
    assert min(len(per_reader) for per_reader in reads["intervals"]) >= 2
    db.checkpoint(reset=True)
    assert db.stats()["wal_bytes"] == 0
    assert workers.integrity(db_path) == [("ok",)]
    db.close()
