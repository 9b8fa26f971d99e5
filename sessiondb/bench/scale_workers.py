"""The processes of the scale benchmark (spawned; every function here runs in a child).

- :func:`writer`: one other process that keeps writing while a maintenance operation
  runs, an append every 5-10 ms to its own session, through :class:`~sessiondb.SessionDB`
  (``kind="sessiondb"``) or as hermes-agent writes its ``state.db`` (``kind="hermes"``: raw
  SQL, a 1 s busy timeout, ``BEGIN IMMEDIATE`` with up to 15 attempts 20-150 ms apart). It
  records the start and duration of every call, waits and retries included.
- :func:`export_child` and :func:`import_child`: the streaming export to JSON Lines and
  the import of that file into a fresh store, each alone in its process so that its peak
  RSS is its own.

Figures go back through a queue as plain dicts; nothing is written to the working
directory.
"""

from __future__ import annotations

import json
import os
import random
import resource
import sys
import time
import traceback
from typing import Any, Iterator

from ..outfile import SyncedText
from . import scale_api

#: Seconds between two progress lines on stderr.
PROGRESS_EVERY_S = 2.0
# hermes-agent's write path (its spec, section 1): attempts and the sleep between them.
_HERMES_ATTEMPTS = 15
_HERMES_SLEEP_S = (0.020, 0.150)


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM`` on Linux, else
    ``ru_maxrss``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss() -> int:
    """This process's resident set size now in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Progress:
    """A progress callback that prints one line to stderr at most every
    :data:`PROGRESS_EVERY_S` seconds, and remembers how often it was called and the last
    report of each task (an operation may run several: an import, then its indexing).

    :param label: what the lines start with.
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.calls = 0
        self.last: dict[str, Any] = {}
        self.tasks: dict[str, dict[str, Any]] = {}
        self._printed = 0.0

    def __call__(self, p: Any) -> None:
        self.calls += 1
        self.last = {"task": p.task, "done": p.done, "total": p.total, "unit": p.unit,
                     "elapsed_s": round(p.elapsed_s, 3)}
        self.tasks[p.task] = self.last
        now = time.monotonic()
        if now - self._printed >= PROGRESS_EVERY_S or (p.total and p.done >= p.total):
            self._printed = now
            of = f"/{p.total:,}" if p.total else ""
            print(f"    {self.label}: {p.task} {p.done:,}{of} {p.unit}, {p.elapsed_s:.1f} s",
                  file=sys.stderr, flush=True)

    def figures(self) -> dict[str, Any]:
        """``calls``, ``last`` (the last report) and ``tasks`` (the last report of each
        task, by name)."""
        return {"calls": self.calls, "last": self.last, "tasks": self.tasks}


def _text(rng: random.Random) -> str:
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(30, 250)))


def writer(kind: str, path: str, session_id: str, seed: int, ready: Any, stop: Any,
           results: Any) -> None:
    """Append a message every 5-10 ms until ``stop`` is set; put the figures on
    ``results``: ``calls`` as ``[start (time.time()), seconds]`` of each successful call,
    ``errors`` as ``[start, "Type: message"]``, ``crashed`` (a traceback, or "")."""
    calls: list[list[float]] = []
    errors: list[list[Any]] = []
    crashed = ""
    rng = random.Random(seed)
    try:
        write, close = _sessiondb_writer(path, session_id) if kind == "sessiondb" \
            else _hermes_writer(path, session_id, rng)
        ready.set()
        while not stop.is_set():
            text = _text(rng)
            t0 = time.time()
            try:
                write(text)
                calls.append([t0, time.time() - t0])
            except Exception as exc:  # every failure is a figure, none ends the run
                errors.append([t0, f"{type(exc).__name__}: {exc}"[:300]])
            stop.wait(rng.uniform(0.005, 0.010))
        close()
    except BaseException:
        crashed = traceback.format_exc()
        ready.set()
    results.put({"kind": kind, "session_id": session_id, "calls": calls, "errors": errors,
                 "crashed": crashed})


def _sessiondb_writer(path: str, session_id: str) -> tuple[Any, Any]:
    from sessiondb import SessionDB

    db = SessionDB(path)
    db.ensure_session(session_id, "bench-writer")

    def write(text: str) -> None:
        db.append_message(session_id, "user", text)

    return write, db.close


def _hermes_writer(path: str, session_id: str, rng: random.Random) -> tuple[Any, Any]:
    """hermes-agent's own write: raw SQL on its tables, the triggers it made (or
    sessiondb's, once converted) keeping the full-text index."""
    import apsw

    conn = apsw.Connection(path)
    conn.set_busy_timeout(1000)
    conn.execute("PRAGMA foreign_keys = ON")

    def attempt(body: Any) -> None:
        for n in range(_HERMES_ATTEMPTS):
            try:
                conn.execute("BEGIN IMMEDIATE")
            except apsw.BusyError:
                if n == _HERMES_ATTEMPTS - 1:
                    raise
                time.sleep(rng.uniform(*_HERMES_SLEEP_S))
                continue
            try:
                body()
                conn.execute("COMMIT")
                return
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    attempt(lambda: conn.execute(
        "INSERT OR IGNORE INTO sessions (id, source, started_at) VALUES (?, 'cli', ?)",
        (session_id, time.time())))

    def write(text: str) -> None:
        def body() -> None:
            conn.execute("INSERT INTO messages (session_id, role, content, timestamp) "
                         "VALUES (?, 'user', ?, ?)", (session_id, text, time.time()))
            conn.execute("UPDATE sessions SET message_count = message_count + 1 "
                         "WHERE id = ?", (session_id,))
        attempt(body)

    return write, conn.close


def export_child(path: str, out_file: str, results: Any) -> None:
    """Stream ``iter_export()`` of the store at ``path`` to ``out_file`` as JSON Lines (one
    session per line); put the figures on ``results``."""
    out: dict[str, Any] = {"crashed": ""}
    try:
        from sessiondb import SessionDB

        db = SessionDB(path)
        out["baseline_rss_bytes"] = peak_rss()
        sessions = messages = 0
        shown = time.monotonic()
        t0 = time.perf_counter()
        # Synced as it grows, as `sessiondb export -o FILE` writes (sessiondb.outfile):
        # left to the kernel, the file went to the disk in one burst during the import
        # that follows, whose writers' commits queued behind it.
        with open(out_file, "w", encoding="utf-8") as raw:
            fh = SyncedText(raw)
            for session in scale_api.iter_export(db):
                fh.write(json.dumps(session, ensure_ascii=False))
                fh.write("\n")
                sessions += 1
                messages += len(session["messages"])
                if time.monotonic() - shown >= PROGRESS_EVERY_S:
                    shown = time.monotonic()
                    print(f"    export: {sessions:,} sessions, {messages:,} messages, "
                          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            fh.sync(last=True)
        out.update(duration_s=time.perf_counter() - t0, sessions=sessions,
                   messages=messages, file_bytes=os.path.getsize(out_file),
                   peak_rss_bytes=peak_rss())
        db.close()
    except BaseException:
        out["crashed"] = traceback.format_exc()
    results.put(out)


def read_lines(path: str) -> Iterator[dict[str, Any]]:
    """The sessions of a JSON Lines export, one at a time."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def import_child(path: str, in_file: str, results: Any) -> None:
    """Import the JSON Lines file ``in_file`` into the store at ``path`` with
    ``import_sessions``, reading it line by line; put the figures on ``results``."""
    out: dict[str, Any] = {"crashed": ""}
    try:
        from sessiondb import SessionDB

        db = SessionDB(path)
        out["baseline_rss_bytes"] = peak_rss()
        progress = Progress("import")
        t0 = time.perf_counter()
        out["imported"] = scale_api.import_sessions(db, read_lines(in_file), progress)
        out.update(duration_s=time.perf_counter() - t0, peak_rss_bytes=peak_rss(),
                   progress=progress.figures())
        db.close()
    except BaseException:
        out["crashed"] = traceback.format_exc()
    results.put(out)
