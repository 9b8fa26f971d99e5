"""Exhibit 2: a writer that stops while holding the write lock.

In public: a sibling process held SQLite's write lock for seconds (a slow callback inside
its transaction, a runaway statement, a process paused in a debugger), and every other
process's turn was aborted with "database is locked".

(a) The holder is alive but slow. ``hold_timeout`` bounds how long a transaction may hold
    the lock: past it a watchdog thread interrupts the running statement, rolls the
    transaction back and hands the gate on; the holder gets
    :class:`~sessiondb.HoldTimeout`, nothing of its transaction is written, and every
    other process waits about the bound, not the holder's whole stall.
(b) The holder is SIGSTOPped mid-transaction: it cannot time itself out. The others get
    :class:`~sessiondb.WriteTimeout` after their own ``write_timeout`` (never a hang,
    never corruption), and write again as soon as it is killed, because the kernel
    drops a dead process's locks (SQLite's and the gate's alike).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

import workers
from sessiondb import HoldTimeout, SessionDB, WriteTimeout

SPAWN = multiprocessing.get_context("spawn")
pytestmark = pytest.mark.slow


def holder_worker(path: str, hold_timeout: float | None, stall: float, ready, results) -> None:
    """Open a transaction() block, write one message, report ready, then stall inside the
    block (a slow model call, say) and try to write again."""
    db = SessionDB(path, hold_timeout=hold_timeout)
    outcome = "finished"
    try:
        with db.transaction():
            db.append_message("s", "assistant", "written inside the stuck block")
            ready.set()
            time.sleep(stall)
            db.append_message("s", "assistant", "after the stall")
    except HoldTimeout as exc:
        outcome = f"HoldTimeout after {exc.held_s:.2f}s"
    # The instance is usable again at once.
    db.append_message("s", "user", "holder writes again")
    results.put(outcome)
    db.close()


def start_holder(db_path: Path, hold_timeout: float | None, stall: float):
    """Spawn :func:`holder_worker`; returns (process, ready event, results queue)."""
    ready, results = SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=holder_worker,
                           args=(str(db_path), hold_timeout, stall, ready, results))
    holder.start()
    return holder, ready, results


def test_a_transaction_block_that_stalls_is_rolled_back_at_the_bound(db_path: Path,
                                                                     exhibit):
    bound = 1.0
    db = SessionDB(db_path, write_timeout=30)
    db.create_session("s", "cli")
    holder, ready, results = start_holder(db_path, bound, 8.0)
    try:
        assert ready.wait(60)
        started = time.monotonic()
        db.append_message("s", "user", "a sibling's turn")  # waits for the bound, not 8 s
        waited = time.monotonic() - started
        outcome = workers.collect(results, [holder], 1, timeout=60)
        holder.join(60)
    finally:
        if holder.is_alive():
            holder.kill()
    assert holder.exitcode == 0
    assert outcome and outcome[0].startswith("HoldTimeout"), outcome
    contents = [m["content"] for m in db.get_messages("s")]
    assert contents == ["a sibling's turn", "holder writes again"]
    assert db.get_session("s")["message_count"] == 2
    db.close()
    assert workers.integrity(db_path) == [("ok",)]
    exhibit("a sibling stalls 8 s inside transaction() (hold_timeout=1 s)",
            "watchdog rolled it back; holder got HoldTimeout; block left no trace",
            sibling_wait_s=round(waited, 2), bound_s=bound)


def test_a_runaway_statement_is_interrupted_and_rolled_back(db_path: Path, exhibit):
    """One call whose SQL runs past the bound (a huge import inside a transaction()
    block, where it is one write; outside one it runs in short steps): the watchdog
    interrupts the statement itself, not just the gaps between statements."""
    bound = 0.2
    db = SessionDB(db_path, hold_timeout=bound)
    db.create_session("keep", "cli")
    db.append_message("keep", "user", "acknowledged before")
    big = [{"id": f"bulk-{i}", "source": "import", "started_at": 1000.0 + i,
            "messages": [{"role": "user", "content": f"message {j} " * 40,
                          "timestamp": 1000.0 + i}
                         for j in range(40)]}
           for i in range(2000)]
    started = time.monotonic()
    with pytest.raises(HoldTimeout) as info:
        with db.transaction():
            db.import_sessions(big)
    took = time.monotonic() - started
    assert info.value.hold_timeout == bound
    assert db.session_count() == 1 and db.message_count() == 1  # nothing half-written
    db.append_message("keep", "user", "the next write works")
    assert db.stats()["hold_timeouts"] == 1
    db.close()
    assert workers.integrity(db_path) == [("ok",)]
    exhibit("one call's SQL runs past hold_timeout=0.2 s (80,000-message import)",
            "statement interrupted, transaction rolled back, HoldTimeout",
            call_returned_after_s=round(took, 2), rows_left_behind=0)


def test_a_transaction_block_that_overstays_raises_at_its_end(db: SessionDB):
    """No call after the bound: the block's end raises, and nothing of it is written."""
    db = SessionDB(db.path, hold_timeout=0.1)
    db.create_session("s", "cli")
    with pytest.raises(HoldTimeout):
        with db.transaction():
            db.append_message("s", "user", "never committed")
            time.sleep(0.5)
    assert db.message_count("s") == 0
    with db.transaction():  # the instance goes on normally
        db.append_message("s", "user", "committed")
    assert db.message_count("s") == 1
    db.close()


def test_a_user_exception_is_not_masked_by_the_hold_bound(db: SessionDB):
    db = SessionDB(db.path, hold_timeout=0.1)
    db.create_session("s", "cli")
    with pytest.raises(KeyError):
        with db.transaction():
            time.sleep(0.4)
            raise KeyError("the caller's own error")
    assert db.message_count("s") == 0
    db.close()


def test_hold_timeout_none_means_no_bound_and_bad_values_are_refused(db_path: Path):
    from sessiondb import ConfigurationError
    for bad in (0, -1, "5", True, float("nan")):
        with pytest.raises(ConfigurationError):
            SessionDB(db_path, hold_timeout=bad)
    db = SessionDB(db_path, hold_timeout=None)
    db.create_session("s", "cli")
    with db.transaction():
        db.append_message("s", "user", "slow but unbounded")
        time.sleep(0.3)
    assert db.message_count("s") == 1
    db.close()


def test_a_sigstopped_holder_gives_write_timeout_then_recovery_when_killed(db_path: Path,
                                                                          exhibit):
    db = SessionDB(db_path, write_timeout=1.0)
    db.create_session("s", "cli")
    db.append_message("s", "user", "acknowledged before")
    holder, ready, results = start_holder(db_path, None, 60.0)
    try:
        assert ready.wait(60)
        os.kill(holder.pid, signal.SIGSTOP)
        timeouts = 0
        started = time.monotonic()
        for _ in range(3):  # every try ends in a typed error after its budget
            with pytest.raises(WriteTimeout) as info:
                db.append_message("s", "user", "blocked")
            timeouts += 1
            assert info.value.waited_s >= 1.0
        blocked_for = time.monotonic() - started
        reads = db.get_messages("s")  # readers are never blocked by a writer
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(60)
        started = time.monotonic()
        db.append_message("s", "user", "after the kill")
        recovered_in = time.monotonic() - started
    finally:
        if holder.is_alive():
            holder.kill()
    assert [m["content"] for m in reads] == ["acknowledged before"]
    assert [m["content"] for m in db.get_messages("s")] == ["acknowledged before",
                                                            "after the kill"]
    assert db.get_session("s")["message_count"] == 2
    db.close()
    assert workers.integrity(db_path) == [("ok",)]
    exhibit("the lock holder is SIGSTOPped mid-transaction, then SIGKILLed",
            "WriteTimeout after each 1 s budget, no hang; writes resume after the kill",
            write_timeouts=timeouts, blocked_s=round(blocked_for, 2),
            first_write_after_kill_s=round(recovered_in, 3))


def test_reads_in_a_block_the_watchdog_ends_raise_only_hold_timeout(db_path: Path):
    """The watchdog rolls back from its own thread while the owner keeps calling: the
    owner sees HoldTimeout, never apsw's refusal of a connection busy in another thread."""
    db = SessionDB(db_path, hold_timeout=0.02)
    db.create_session("s", "cli")
    for _ in range(20):
        with pytest.raises(HoldTimeout):
            with db.transaction():
                db.append_message("s", "user", "x" * 100_000)
                while True:
                    time.sleep(0.0002)
                    db.session_count()
    assert db.message_count("s") == 0
    db.append_message("s", "user", "fine afterwards")
    db.close()
    assert workers.integrity(db_path) == [("ok",)]
