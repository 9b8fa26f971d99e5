"""Spawned processes for tests/test_maintenance.py (top-level, so ``spawn`` can import
them), and the store builder those tests share."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import apsw

from sessiondb import SessionDB

DAY = 86400.0
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray").split()


def text(rng: random.Random, words: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def build(path: Path, sessions: int = 200, per: int = 50, seed: int = 1,
          old_share: float = 0.5) -> int:
    """A store of ``sessions`` x ``per`` messages; the first ``old_share`` of the sessions
    started 100+ days ago and ended (prunable at 90 days), the rest recent. Returns the
    message count."""
    rng = random.Random(seed)
    now = time.time()
    data = []
    for s in range(sessions):
        old = s < sessions * old_share
        started = now - (100 + s) * DAY if old else now - s * 60.0
        data.append({
            "id": f"s{s:05d}", "source": rng.choice(["cli", "telegram"]),
            "started_at": started, "ended_at": started + 60.0,
            "messages": [{"role": rng.choice(["user", "assistant", "tool"]),
                          "content": text(rng), "timestamp": started + k,
                          "tool_calls": [{"id": k}] if k % 7 == 0 else None}
                         for k in range(per)]})
    with SessionDB(path) as db:
        db.import_sessions(data)
    return sessions * per


def kill_after(steps: int, task: str):
    """A progress callback that SIGKILLs its own process at the ``steps``-th report of
    ``task``: a crash in the middle of long work, at a chosen point."""
    seen = [0]

    def progress(p: Any) -> None:
        seen[0] += p.task == task
        if seen[0] >= steps:
            os.kill(os.getpid(), signal.SIGKILL)

    return progress


def prune_and_die(path: str, steps: int, hold_timeout: float) -> None:
    with SessionDB(path, hold_timeout=hold_timeout) as db:
        db.prune_sessions(90, progress=kill_after(steps, "prune"))


def rebuild_and_die(path: str, steps: int, hold_timeout: float) -> None:
    with SessionDB(path, hold_timeout=hold_timeout) as db:
        db.rebuild_search_index(progress=kill_after(steps, "index"))


def open_and_die(path: str, steps: int, hold_timeout: float) -> None:
    """Open a hermes-agent file (converting it) and die while its index is being built."""
    SessionDB(path, hold_timeout=hold_timeout, progress=kill_after(steps, "index"))


def appender(path: str, session_id: str, stop: Any, results: Any) -> None:
    """Append to one session until ``stop`` is set; report the acknowledged ids and the
    errors (there must be none)."""
    acked: list[int] = []
    errors: list[str] = []
    with SessionDB(path) as db:
        db.ensure_session(session_id, "probe")
        results.put(("ready", session_id))
        while not stop.is_set():
            try:
                acked.append(db.append_message(session_id, "user", f"probe {len(acked)} kilo"))
            except Exception as exc:  # reported to the test, which fails on any
                errors.append(repr(exc))
            time.sleep(0.002)
    results.put((acked, errors))


def open_and_die_cleaning(path: str, steps: int, hold_timeout: float) -> None:
    """Open a hermes-agent file (converting it) and die while its old full-text index is
    removed: after its old messages table was emptied, before the new index is built
    (``steps`` is unused: the point is fixed)."""
    def progress(p: Any) -> None:
        if p.task != "cleanup":
            return
        # apsw, the library of the process's SessionDB: another SQLite library in the
        # same process (the stdlib sqlite3) would drop its locks on close (POSIX locks
        # are per process) and delete the WAL under it.
        raw = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            names = {r[0] for r in raw.execute("SELECT name FROM sqlite_schema")}
        finally:
            raw.close()
        if "sessiondb_messages_old" not in names and any(
                n.startswith("sessiondb_fts_junk_") for n in names):
            os.kill(os.getpid(), signal.SIGKILL)

    SessionDB(path, hold_timeout=hold_timeout, progress=progress)


def open_and_die_copied(path: str, steps: int, hold_timeout: float) -> None:
    """Open a hermes-agent file (converting it) and die once every message is copied,
    before the tables swap (``steps`` is unused: the point is fixed)."""
    def progress(p: Any) -> None:
        if p.task == "convert" and p.total is not None and p.done >= p.total:
            os.kill(os.getpid(), signal.SIGKILL)

    SessionDB(path, hold_timeout=hold_timeout, progress=progress)


def open_and_die_converting(path: str, steps: int, hold_timeout: float) -> None:
    """Open a hermes-agent file (converting it) and die while its messages are copied."""
    SessionDB(path, hold_timeout=hold_timeout, progress=kill_after(steps, "convert"))


def open_and_die_draining(path: str, steps: int, hold_timeout: float) -> None:
    """Open a hermes-agent file (converting it) and die while its old messages table is
    emptied (the first cleanup, before the full-text index)."""
    SessionDB(path, hold_timeout=hold_timeout, progress=kill_after(steps, "cleanup"))


def hermes_appender(path: str, session_id: str, stop: Any, results: Any) -> None:
    """Append to one session as hermes-agent does (the stdlib sqlite3 module, raw SQL,
    foreign keys on, ``BEGIN IMMEDIATE``, retried while the file is locked) until
    ``stop`` is set; report the acknowledged ids and the errors (there must be none)."""
    import sqlite3

    conn = sqlite3.connect(path, timeout=1.0, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    acked: list[int] = []
    errors: list[str] = []

    def attempt(body: Any) -> Any:
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(random.uniform(0.02, 0.15))
                continue
            try:
                out = body()
                conn.execute("COMMIT")
                return out
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    attempt(lambda: conn.execute("INSERT OR IGNORE INTO sessions (id, source, started_at) "
                                 "VALUES (?, 'cli', ?)", (session_id, time.time())))
    results.put(("ready", session_id))

    def append() -> int:
        cur = conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                           "VALUES (?, 'user', ?, ?)",
                           (session_id, f"hermes {len(acked)} kilo zulu", time.time()))
        conn.execute("UPDATE sessions SET message_count = message_count + 1 WHERE id = ?",
                     (session_id,))
        return cur.lastrowid

    while not stop.is_set():
        try:
            acked.append(attempt(append))
        except Exception as exc:  # reported to the test, which fails on any
            errors.append(repr(exc))
        time.sleep(0.003)
    conn.close()
    results.put((acked, errors))


def prune_vacuuming_and_die(path: str, steps: int, hold_timeout: float) -> None:
    """Prune with pages given back as it goes (a tiny freelist threshold, so that every
    step vacuums first) and die midway."""
    from sessiondb import vacuum

    vacuum.RECLAIM_AT = 16
    with SessionDB(path, hold_timeout=hold_timeout) as db:
        db.prune_sessions(90, progress=kill_after(steps, "prune"))


def few_pages_per_step() -> None:
    """Make every reclaim step one statement of 8 pages (so that even a small store
    takes many steps)."""
    from sessiondb import pruning, vacuum

    real = pruning.reclaim_step
    vacuum._MAX_PAGES = 8
    pruning.reclaim_step = lambda vacuum: (  # type: ignore[assignment]
        lambda conn, deadline: real(vacuum)(conn, 0.0))


def reclaim_and_die(path: str, steps: int, hold_timeout: float) -> None:
    few_pages_per_step()
    with SessionDB(path, hold_timeout=hold_timeout) as db:
        db.reclaim_space(progress=kill_after(steps, "reclaim"))


def delete_without_reclaim(path: str, share: float) -> int:
    """Delete the first ``share`` of the sessions with their messages in one
    transaction, leaving their pages on the freelist; returns the free pages."""
    with SessionDB(path) as db:
        ids = [s["id"] for s in db.list_sessions(limit=None)]
        gone = sorted(ids)[:int(len(ids) * share)]

        def delete(conn: Any) -> int:
            for sid in gone:
                conn.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
                conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
            return 0

        db._execute_write(delete, bounded=False)
        return int(db._read(lambda c: c.pragma("freelist_count")))
