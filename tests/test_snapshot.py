"""snapshot(): consistent multi-call reads, no writes inside, cooperation with resets."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

import workers
from sessiondb import ConfigurationError, SessionDB

SPAWN = multiprocessing.get_context("spawn")


def test_reads_inside_a_snapshot_see_one_moment(db_path: Path):
    db = SessionDB(db_path)
    other = SessionDB(db_path)
    db.create_session("s", "cli")
    db.append_message("s", "user", "before")
    with db.snapshot():
        other.append_message("s", "user", "during")  # another connection commits
        assert [m["content"] for m in db.get_messages("s")] == ["before"]
        assert db.get_session("s")["message_count"] == 1
        assert db.message_count() == 1
    assert db.message_count() == 2
    other.close()
    db.close()


def test_writes_inside_a_snapshot_are_refused_and_nothing_is_written(db: SessionDB):
    db.create_session("s", "cli")
    with db.snapshot():
        with pytest.raises(ConfigurationError, match="snapshot"):
            db.append_message("s", "user", "x")
        with pytest.raises(ConfigurationError):
            with db.transaction():
                pass
    assert db.message_count() == 0
    db.append_message("s", "user", "after")  # usable again once the block ends
    assert db.message_count() == 1


def test_snapshots_do_not_nest(db: SessionDB):
    with db.snapshot():
        with pytest.raises(ConfigurationError):
            with db.snapshot():
                pass
    with db.transaction():
        with pytest.raises(ConfigurationError):
            with db.snapshot():
                pass


@pytest.mark.sqlite_only
def test_an_exception_inside_a_snapshot_ends_it(db: SessionDB):
    db.create_session("s", "cli")
    with pytest.raises(KeyError):
        with db.snapshot():
            raise KeyError("x")
    assert db._engine._conn.get_autocommit()
    db.append_message("s", "user", "fine")


@pytest.mark.sqlite_only
def test_a_reset_waits_for_a_snapshot_in_the_room(db_path: Path):
    """A cooperating snapshot is waited for (the reset succeeds once it ends) instead
    of making the reset fail."""
    db = SessionDB(db_path, wal_limit=64 * 1024, checkpoint_every=0)
    reader = SessionDB(db_path)
    db.create_session("s", "cli")
    for i in range(20):
        db.append_message("s", "user", "x" * 500)
    with reader.snapshot():
        reader.message_count()
        for i in range(20):
            db.append_message("s", "user", "y" * 500)
        started = time.monotonic()
        # the reset cannot finish while the snapshot is open: run it from a thread
        import threading
        done = threading.Event()
        result = {}

        def reset():
            result["ok"] = db._engine._checkpoints.reset(wait=True)
            done.set()

        threading.Thread(target=reset).start()
        assert not done.wait(0.3)  # waiting for the room to empty
    assert done.wait(10)
    assert result["ok"] is True
    assert time.monotonic() - started >= 0.3
    assert db.stats()["wal_bytes"] == 0
    reader.close()
    db.close()


@pytest.mark.slow
def test_wal_stays_bounded_with_a_cooperating_long_reader(tmp_path: Path):
    """The benchmark's hardest case in small: a process holds 0.3 s snapshots back to
    back through the library while another writes as fast as it can; the -wal file
    (sampled with os.stat) stays under wal_limit and every write lands."""
    path = tmp_path / "state.db"
    limit = 4 * 1024 * 1024
    SessionDB(path, wal_limit=limit).close()
    stop, ready, results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    reader = SPAWN.Process(target=workers.snapshot_reader_worker,
                           args=(str(path), 0.3, stop, ready, results))
    reader.start()
    assert ready.wait(60)
    db = SessionDB(path, wal_limit=limit)
    db.create_session("w", "test")
    wal = str(path) + "-wal"
    peak = 0
    deadline = time.monotonic() + 4
    written = 0
    while time.monotonic() < deadline:
        db.append_message("w", "assistant", "word " * 200)
        written += 1
        peak = max(peak, os.stat(wal).st_size if os.path.exists(wal) else 0)
    stop.set()
    snapshots = workers.collect(results, [reader], 1, timeout=60)
    reader.join(60)
    assert reader.exitcode == 0 and snapshots and snapshots[0] > 1
    assert peak < limit, f"-wal reached {peak} bytes"
    assert db.message_count("w") == written
    assert db.stats()["checkpoint"]["resets_ok"] >= 1
    db.close()


@pytest.mark.sqlite_only
@pytest.mark.parametrize("fault", ["busy", "interrupt"])
def test_a_snapshot_that_fails_to_start_leaves_no_transaction(db: SessionDB, fault: str):
    """An error right after BEGIN (a busy WAL recovery, Ctrl-C) must not leave the
    connection inside a read transaction: the instance stays fully usable."""
    import apsw
    db.create_session("s", "cli")
    fired: list[int] = []

    def tracer(cursor, sql, bindings):
        if "sqlite_schema" in sql and not fired:
            fired.append(1)
            if fault == "busy":
                raise apsw.BusyError("injected: database is locked")
            raise KeyboardInterrupt
        return True

    db._engine._conn.exec_trace = tracer
    try:
        with db.snapshot():
            pass
    except KeyboardInterrupt:
        assert fault == "interrupt"
    finally:
        db._engine._conn.exec_trace = None
    assert fired and db._engine._conn.get_autocommit()
    db.append_message("s", "user", "writes still work")
    with db.snapshot():
        assert db.message_count() == 1
