"""Gate turns: a process keeps the gate across its own short writes, briefly."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

import workers
from sessiondb import SessionDB
from sessiondb.gate import FifoGate

SPAWN = multiprocessing.get_context("spawn")


def test_a_short_write_keeps_the_turn_and_the_idle_thread_hands_it_on(db_path: Path):
    db = SessionDB(db_path)
    db.create_session("s", "cli")  # the gate is now kept (a short write)
    gate = db._engine._gate
    assert isinstance(gate, FifoGate)
    deadline = time.monotonic() + 5
    while gate._ticket is not None and time.monotonic() < deadline:
        time.sleep(0.001)
    assert gate._ticket is None and not gate._kept  # handed on without another write
    # and another instance (its own descriptor) gets straight in
    other = SessionDB(db_path, write_timeout=1)
    other.append_message("s", "user", "in")
    other.close()
    db.close()


def test_a_turn_ends_after_turn_writes(db_path: Path):
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    gate = db._engine._gate
    tickets = set()
    for i in range(FifoGate.TURN_WRITES * 3):
        db.append_message("s", "user", f"m{i}")
        tickets.add(gate._ticket)
    # at least three turns, each a ticket of its own (a timer may end a turn early)
    assert len(tickets - {None}) >= 3
    db.close()


def test_a_turn_never_outlasts_turn_seconds(db_path: Path):
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    time.sleep(0.05)  # let the idle thread hand the first turn on
    with db.transaction():
        db.append_message("s", "user", "slow")
        time.sleep(FifoGate.TURN_SECONDS * 1.5)
    assert db._engine._gate._ticket is None  # handed on at once, not kept
    db.close()


def test_close_hands_a_kept_turn_on(db_path: Path):
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    db.close()
    other = SessionDB(db_path, write_timeout=1)
    other.append_message("s", "user", "after close")
    other.close()


@pytest.mark.slow
def test_processes_writing_back_to_back_all_get_turns(tmp_path: Path):
    """Four processes append tiny messages back to back: every write lands, every
    process finishes (turns are capped, so none is shut out)."""
    path = tmp_path / "state.db"
    SessionDB(path).close()
    start, results = SPAWN.Event(), SPAWN.Queue()
    workers.run_all(SPAWN, workers.burst_writer_worker,
                    [(str(path), 300, start, results)] * 4, results, start)
    db = SessionDB(path)
    assert db.message_count() == 1200
    assert db._engine._conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()
