"""Worker functions of the failure museum's multi-process exhibits.

Spawned children import their target by name, so every worker lives at the top level of
this importable module (``tests/museum`` is on ``sys.path`` under pytest, and spawn
hands ``sys.path`` to its children). A worker reports failure by raising (the test
asserts ``exitcode == 0``); results travel back through a queue, a pipe, or (for workers
that may be SIGKILLed) an append-only ledger file of their own.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import traceback
from typing import Any

import apsw

from sessiondb import SessionDB

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


# -- exhibit 1: SIGKILL chaos ----------------------------------------------------------


def chaos_writer(path: str, writer: int, ledger_path: str, sessions: list[str],
                 seed: int, stop_path: str, in_call: Any) -> None:
    """Append messages to randomly chosen shared sessions until ``stop_path`` exists.

    This process may be SIGKILLed at any instruction, so it shares no lock with anyone
    but SQLite and the write gate: no multiprocessing Event or Queue (a process killed
    inside ``Event.is_set()`` would leave its semaphore taken, and every other process
    would hang on it). It reports through its own ledger, one ``os.write`` of one line
    per acknowledged write, made only after ``append_message`` returned::

        ack <token> <message id> <session> <seconds the call took>
        end <writes> <longest lock wait>      (a clean stop)
        err <traceback on one line>           (anything raised)

    The token ``w<writer>-<seq>`` is also the first word of the message's content.
    ``in_call[writer]`` (a lock-free shared byte array) is 1 from just before the call
    until its ledger line is written, so the killer can tell where its kill landed.
    """
    fd = os.open(ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        rng = random.Random(seed)
        db = SessionDB(path)
        seq = 0
        while not os.path.exists(stop_path):
            seq += 1
            token = f"w{writer}-{seq}"
            sid = rng.choice(sessions)
            body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30)))
            in_call[writer] = 1
            began = time.monotonic()
            mid = db.append_message(sid, "user", f"{token} {body}")
            took = time.monotonic() - began
            os.write(fd, f"ack {token} {mid} {sid} {took:.6f}\n".encode())
            in_call[writer] = 0
            time.sleep(rng.uniform(0, 0.0005))
        stats = db.stats()
        db.close()
        os.write(fd, f"end {seq} {stats['lock_wait_max_s']:.6f}\n".encode())
    except BaseException:
        os.write(fd, ("err " + traceback.format_exc().replace("\n", " | ") + "\n").encode())
        raise
    finally:
        os.close(fd)


# -- exhibit 3: readers that never stop ----------------------------------------------
# Its foreign readers, ``workers.overlapping_readers``, live in ``tests/workers.py``:
# the checkpoint tests use them too.


def bounded_wal_writer(path: str, count: int, size: int, wal_limit: int,
                       results: Any) -> None:
    """Write ``count`` messages of about ``size`` bytes as fast as possible; report the
    -wal size seen after every write (``os.stat``), the longest call, and stats()."""
    rng = random.Random(7)
    db = SessionDB(path, wal_limit=wal_limit)
    db.ensure_session("big", "wal")
    wal = path + "-wal"
    peak, longest, ids = 0, 0.0, []
    began = time.monotonic()
    for i in range(count):
        body = " ".join(rng.choice(WORDS[:8]) for _ in range(size // 6))
        t0 = time.monotonic()
        ids.append(db.append_message("big", "assistant", f"w{i} {body}"))
        longest = max(longest, time.monotonic() - t0)
        try:
            peak = max(peak, os.stat(wal).st_size)
        except FileNotFoundError:
            pass
    ended = time.monotonic()
    stats = db.stats()
    db.close()
    results.put({"began": began, "ended": ended, "ids": ids, "wal_peak": peak,
                 "longest_call_s": longest, "lock_wait_max_s": stats["lock_wait_max_s"],
                 "checkpoint": stats["checkpoint"], "timeouts": stats["timeouts"],
                 "writes": stats["writes"]})


# -- exhibit 10: many handles ----------------------------------------------------------


def steady_writer(path: str, worker: int, stop: Any, ready: Any, results: Any) -> None:
    """Append ``f<worker>-m<i>`` to a session of its own until ``stop``; report every
    acknowledged (id, content)."""
    db = SessionDB(path)
    sid = f"foreign-{worker}"
    db.ensure_session(sid, "foreign")
    ready.set()
    acked: list[tuple[int, str]] = []
    i = 0
    while not stop.is_set():
        content = f"f{worker}-m{i}"
        acked.append((db.append_message(sid, "user", content), content))
        i += 1
        time.sleep(0.001)
    stats = db.stats()
    db.close()
    results.put({"worker": worker, "session": sid, "acked": acked,
                 "timeouts": stats["timeouts"], "failed": stats["failed_writes"]})


def lock_probe(path: str, pipe: Any) -> None:
    """Answer each ``"probe"`` received on ``pipe`` with what ``BEGIN IMMEDIATE`` (busy
    timeout 0, so no waiting) does on a plain apsw connection kept open, and on a fresh
    one: ``"busy"`` (someone holds the write lock), ``"acquired"`` (rolled back at
    once), or the repr of any other error. ``"quit"`` ends it."""
    kept = apsw.Connection(path)
    kept.set_busy_timeout(0)

    def attempt(conn: apsw.Connection) -> str:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except apsw.BusyError:
            return "busy"
        except apsw.Error as exc:
            return repr(exc)
        conn.execute("ROLLBACK")
        return "acquired"

    while True:
        if pipe.recv() == "quit":
            break
        fresh = apsw.Connection(path)
        fresh.set_busy_timeout(0)
        try:
            pipe.send((attempt(kept), attempt(fresh)))
        finally:
            fresh.close()
    kept.close()
    pipe.send("bye")


# -- exhibit 12: power loss ---------------------------------------------------------------


def power_writer(path: str, journal: str, ledger_path: str, session_id: str, seed: int,
                 durability: str, psow: bool, options: dict[str, Any]) -> None:
    """Append messages and ``transaction()`` turns to ``session_id`` through the
    power-loss simulator's VFS (every write recorded in the shared ``journal``,
    ``crashvfs.Journal``) until the test stops and kills this process: its power cut.
    The ledger gets ``ready`` once the store is open, then ``ack <content>`` per message,
    one ``os.write`` per call, only after the call returned."""
    from crashjournal import Journal
    from crashvfs import CrashVFS

    fd = os.open(ledger_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    vfs = CrashVFS(Journal(journal, psow))
    db = SessionDB(path, vfs=vfs.name, durability=durability, **options)
    os.write(fd, b"ready\n")
    rng = random.Random(seed)
    for n in itertools.count():
        contents = [f"{session_id}-{n}-{k}" for k in range(1 if rng.random() < 0.6 else 3)]
        if len(contents) == 1:
            db.append_message(session_id, "user", contents[0])
        else:
            with db.transaction():
                for content in contents:
                    db.append_message(session_id, "assistant", content)
                db.update_token_counts(session_id, input_tokens=5, output_tokens=7)
        os.write(fd, "".join(f"ack {c}\n" for c in contents).encode())
