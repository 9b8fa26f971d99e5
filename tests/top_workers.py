"""Processes for the process-record tests (``tests/test_top.py``): importable by name, as
``multiprocessing`` spawn needs. Each reports through a queue and waits for the test's
``release`` event before it closes its stores, so that the test reads the record while
they are open."""

from __future__ import annotations

import os
import time
from typing import Any

from sessiondb import SessionDB

FIGURES = ("writes", "failed_writes", "retries", "timeouts", "hold_timeouts",
           "contended_writes", "lock_wait_max_s", "lock_hold_max_s")


def holder(path: str, holding: Any, release: Any) -> None:
    """Hold the write lock in a transaction() block until ``release`` is set."""
    with SessionDB(path, hold_timeout=None) as db:
        db.create_session(f"h-{os.getpid()}", "test")
        with db.transaction():
            db.append_message(f"h-{os.getpid()}", "assistant", "holding")
            holding.set()
            release.wait(60)


def writer(path: str, results: Any, release: Any) -> None:
    """One write (it waits behind a holder, if any), then report and stay open."""
    with SessionDB(path) as db:
        db.append_message("shared", "user", f"from {os.getpid()}")
        results.put(os.getpid())
        release.wait(60)


def counted(path: str, instances: int, writes: int, results: Any, release: Any) -> None:
    """Write through ``instances`` instances of one store, ``writes`` calls each (some in
    transaction() blocks, one that fails), then report each instance's own stats() and
    stay open until released."""
    dbs = [SessionDB(path, hold_timeout=None) for _ in range(instances)]
    try:
        sid = f"c-{os.getpid()}"
        dbs[0].create_session(sid, "test")
        for i in range(writes):
            db = dbs[i % instances]
            if i % 5 == 0:
                with db.transaction():
                    db.append_message(sid, "assistant", "a turn")
                    db.update_token_counts(sid, output_tokens=3)
            else:
                db.append_message(sid, "user", f"message {i}")
        try:
            dbs[-1].append_message("no-such-session", "user", "refused")
        except Exception:  # noqa: BLE001 - SessionNotFound: a failed write, counted
            pass
        reports = []
        for db in dbs:
            figures = db.stats()
            reports.append({k: figures[k] for k in FIGURES} | {"slot": figures["procs"]["slot"]})
        results.put((os.getpid(), reports))
        release.wait(60)
    finally:
        for db in dbs:
            db.close()


def idle(path: str, results: Any, release: Any) -> None:
    """Open the store, report, and sleep until released (or killed)."""
    with SessionDB(path):
        results.put(os.getpid())
        release.wait(60)
        time.sleep(0)
