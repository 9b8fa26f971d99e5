"""``sessiondb demo``: several processes write one database at once; nothing stalls or is lost.

:func:`run` spawns N worker processes (``multiprocessing`` *spawn*: fresh interpreters, as
separate programs would be) that open the same file at once, each creating a session and
appending M messages, while a *gateway* process keeps creating short sessions until the
workers are done. Each process reports its own :meth:`SessionDB.stats` through a queue
(not files). The parent then checks that every message is present exactly once with
exact counters, and runs :func:`sessiondb.doctor.check` on the file.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from .backend import is_url
from .doctor import check
from .store import SessionDB

__all__ = ["run"]

_WORDS = ("lexer parser token tree schema index commit rollback writer reader queue "
          "session message gateway worker cron checkpoint journal snapshot page").split()


def run(path: str | os.PathLike[str] | None = None, *, workers: int = 4,
        messages: int = 200, timeout: float = 60.0,
        progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the demo and return what happened (JSON-ready).

    :param path: the database to share; ``None`` uses a new temporary directory, removed
        at the end.
    :param workers: worker processes (each creates one session).
    :param messages: messages each worker appends.
    :param timeout: seconds before unfinished processes are stopped and the demo fails.
    :param progress: called with a line of text as the demo advances.
    :returns: ``processes`` (per-process ``writes`` = commits, ``retries``,
        ``lock_wait_max_s`` ...), ``total_writes``, ``longest_wait_s``, the message check,
        the doctor ``integrity`` result and ``ok``.
    """
    if workers < 1 or messages < 0:
        raise ValueError("workers must be >= 1 and messages >= 0")
    say = progress or (lambda line: None)
    tmpdir = None if path is not None else tempfile.mkdtemp(prefix="sessiondb-demo-")
    db_path: Any = path if is_url(path) else Path(os.path.abspath(
        path if path is not None else Path(tmpdir) / "demo.db"))
    try:
        say(f"{workers} worker processes x {messages} messages + 1 gateway process, "
            f"sharing {db_path}")
        result = _run(db_path, workers, messages, timeout)
        say(f"done in {result['elapsed_s']:.2f}s")
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
    result["kept"] = tmpdir is None
    return result


def _run(db_path: Any, workers: int, messages: int, timeout: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    stop = ctx.Event()
    seed = random.randrange(2**32)
    procs = {"gateway": ctx.Process(target=_gateway, name="gateway",
                                    args=(str(db_path), seed, stop, results))}
    for i in range(workers):
        procs[f"worker-{i}"] = ctx.Process(target=_worker, name=f"worker-{i}",
                                           args=(str(db_path), i, messages, seed + i + 1,
                                                 results))
    started = time.monotonic()
    deadline = started + timeout
    for proc in procs.values():
        proc.start()
    reports: dict[str, dict[str, Any]] = {}
    try:
        while len(reports) < len(procs):
            if all(n in reports or not p.is_alive() for n, p in procs.items()
                   if n != "gateway"):
                stop.set()  # every worker is done: let the gateway finish
            try:
                item = results.get(timeout=max(0.01, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    break
                if all(not p.is_alive() for n, p in procs.items() if n not in reports):
                    break  # died without reporting
                continue
            reports[item["name"]] = item
    finally:
        stop.set()
        for proc in procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    elapsed = time.monotonic() - started

    rows = []
    for name, proc in procs.items():
        rep = reports.get(name) or {"name": name, "pid": proc.pid,
                                    "error": "did not report (timed out or crashed)"}
        rep["exitcode"] = proc.exitcode
        rows.append(rep)
    return _verify(db_path, rows, workers, messages, elapsed)


def _verify(db_path: Any, rows: list[dict[str, Any]], workers: int, messages: int,
            elapsed: float) -> dict[str, Any]:
    worker_sessions = [s for r in rows if r["name"] != "gateway" for s in r.get("sessions", [])]
    gateway_sessions = [s for r in rows if r["name"] == "gateway" for s in r.get("sessions", [])]
    found = 0
    exact = True
    with SessionDB(db_path) as db:
        for sid in worker_sessions:
            n = db.message_count(sid)
            session = db.get_session(sid)
            found += n
            exact &= n == messages and session is not None and session["message_count"] == n
        for sid in gateway_sessions:
            session = db.get_session(sid)
            exact &= session is not None and session["message_count"] == 1
    report = check(db_path)
    slowest = max(rows, key=lambda r: r.get("lock_wait_max_s", 0.0))
    ok = (all(r["exitcode"] == 0 and not r.get("error") for r in rows)
          and len(worker_sessions) == workers and found == workers * messages and exact
          and report["ok"])
    return {
        "path": str(db_path), "workers": workers, "messages_per_worker": messages,
        "elapsed_s": round(elapsed, 3), "processes": rows,
        "total_writes": sum(r.get("writes", 0) for r in rows),
        "longest_wait_s": slowest.get("lock_wait_max_s", 0.0),
        "longest_wait_process": slowest["name"],
        "gateway_sessions": len(gateway_sessions),
        "messages_expected": workers * messages, "messages_found": found,
        # PostgreSQL checks its own pages; doctor reports its indexes instead.
        "counters_exact": exact, "integrity": report.get("integrity", "n/a (PostgreSQL)"),
        "fts_index": report.get("fts_index", report.get("index_health")),
        "problems": report["problems"], "ok": ok,
    }


# -- the child processes (module level, so spawn can import them) ---------------------

def _stats_row(name: str, db: SessionDB, sessions: list[str]) -> dict[str, Any]:
    s = db.stats()
    return {"name": name, "pid": os.getpid(), "writes": s["writes"], "retries": s["retries"],
            "timeouts": s["timeouts"], "lock_wait_p99_s": s["lock_wait_p99_s"],
            "lock_wait_max_s": s["lock_wait_max_s"], "lock_hold_max_s": s["lock_hold_max_s"],
            "sessions": sessions}


def _sentence(rng: random.Random, words: int = 12) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def _worker(path: str, index: int, messages: int, seed: int, results: Any) -> None:
    name = f"worker-{index}"
    try:
        rng = random.Random(seed)
        with SessionDB(path) as db:
            sid = f"demo-{index}-{uuid.uuid4().hex[:8]}"
            db.create_session(sid, "demo-worker", model="demo")
            for n in range(messages):
                db.append_message(sid, "user" if n % 2 == 0 else "assistant",
                                  f"{name} #{n}: {_sentence(rng)}")
            db.end_session(sid, "demo finished")
            results.put(_stats_row(name, db, [sid]))
    except BaseException as exc:  # report, then fail the process
        results.put({"name": name, "pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1)


def _gateway(path: str, seed: int, stop: Any, results: Any) -> None:
    """Creates a short session (one user message) every few milliseconds until stopped."""
    try:
        rng = random.Random(seed)
        sessions: list[str] = []
        with SessionDB(path) as db:
            while not stop.is_set() or not sessions:
                sid = f"gateway-{uuid.uuid4().hex[:8]}"
                db.create_session(sid, "demo-gateway")
                db.append_message(sid, "user", f"gateway: {_sentence(rng, 6)}")
                sessions.append(sid)
                stop.wait(0.005)
            results.put(_stats_row("gateway", db, sessions))
    except BaseException as exc:
        results.put({"name": "gateway", "pid": os.getpid(),
                     "error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1)
