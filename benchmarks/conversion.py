"""The in-place conversion of a hermes-agent ``state.db`` beside two writers, from a
checkout: ``python -m benchmarks.conversion [--hermes-only] PATH``.

``PATH`` is converted in place: give it a copy (``cp`` the file while nobody has it
open), e.g. of the scale benchmark's hermes-agent file. ``SessionDB(PATH)`` (default
options) converts it while hermes-agent's raw writer (the scale benchmark's, an append
every 5-10 ms) writes throughout and a sessiondb writer opens the file 1 s in (its open
waits for the swap) and appends once it is open (not with ``--hermes-only``). Prints, as JSON: the time the open
took (conversion, old table removed, index built), the converting instance's longest
lock hold, each phase's first and last progress report (seconds from the start), and
per writer its calls during the open (p50 / p90 / p99 / max wait, the six longest with
their start), when it was open (the sessiondb writer), its errors and lost writes;
then the store's totals and counters.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
import threading
import time
from typing import Any

import apsw

from sessiondb import SessionDB, __version__
from sessiondb.bench.scale_maint import WRITER_PREFIX, dist
from sessiondb.bench.scale_workers import writer


def run(path: str, sessiondb_writer: bool = True) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    procs: dict[str, tuple[Any, Any, Any, Any]] = {}

    opened: dict[str, float] = {}

    def start(kind: str, seed: int) -> None:
        ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=writer, daemon=True, args=(
            kind, path, WRITER_PREFIX + kind, seed, ready, stop, results))
        proc.start()
        procs[kind] = (proc, ready, stop, results)
        threading.Thread(target=lambda: ready.wait(600) and opened.setdefault(
            kind, time.time()), daemon=True).start()

    start("hermes", 5)
    if not procs["hermes"][1].wait(60):
        raise RuntimeError("the hermes-agent writer did not start within 60 s")
    time.sleep(0.2)
    marks: list[tuple[float, str, int, Any]] = []
    t0 = time.time()
    if sessiondb_writer:
        threading.Timer(1.0, start, ("sessiondb", 6)).start()
    db = SessionDB(path, progress=lambda p: marks.append(
        (time.time() - t0, p.task, p.done, p.total)))
    t1 = time.time()
    hold = db.stats()["lock_hold_max_s"]
    db.close()
    if sessiondb_writer:
        procs["sessiondb"][1].wait(600)
    time.sleep(0.1)
    out: dict[str, Any] = {"sessiondb": __version__, "sqlite": apsw.sqlite_lib_version(),
                           "open_s": t1 - t0, "lock_hold_max_s": hold, "phases": {},
                           "writers": {}}
    for at, task, done, total in marks:
        phase = out["phases"].setdefault(task, {"first_s": at, "reports": 0, "total": total})
        phase.update(last_s=at, done=done, reports=phase["reports"] + 1)
    for kind, (proc, _, stop, results) in procs.items():
        stop.set()
        got = results.get(timeout=300)
        proc.join(60)
        calls = [(s, d) for s, d in got["calls"] if s <= t1 and s + d >= t0]
        out["writers"][kind] = {
            "calls": len(calls), "latency_s": dist([d for _, d in calls]),
            "longest": " ".join(f"{d:.3f}s@{s - t0:.1f}"
                                for s, d in sorted(calls, key=lambda c: -c[1])[:6]),
            "errors": len(got["errors"]), "error_samples": got["errors"][:3],
            "max_by_phase_s": _by_phase(calls, t0, out["phases"]),
            "crashed": got["crashed"][-300:], "acked": len(got["calls"]),
            "opened_at_s": opened[kind] - t0 if kind in opened else None}
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        for kind, figures in out["writers"].items():
            have = conn.execute("SELECT count(*) FROM messages WHERE session_id = ?",
                                (WRITER_PREFIX + kind,)).fetchone()[0]
            figures["lost"] = figures["acked"] - have
        out["messages"], out["message_total"], out["user_version"], out["wrong_counters"] = (
            conn.execute(
                "SELECT (SELECT count(*) FROM messages), (SELECT value FROM sessiondb_totals "
                "WHERE name = 'messages'), (SELECT user_version FROM pragma_user_version), "
                "(SELECT count(*) FROM sessions s WHERE message_count != (SELECT count(*) "
                "FROM messages m WHERE m.session_id = s.id))").fetchone())
    finally:
        conn.close()
    return out


def _by_phase(calls: list[tuple[float, float]], t0: float,
              phases: dict[str, Any]) -> dict[str, float]:
    """The longest wait of the calls that started in each phase (from its first progress
    report to the next phase's; ``begin``: before the first report)."""
    starts = sorted((p["first_s"], task) for task, p in phases.items())
    out: dict[str, float] = {}
    for s, d in calls:
        at, name = s - t0, "begin"
        for first, task in starts:
            if at >= first:
                name = task
        out[name] = max(out.get(name, 0.0), round(d, 3))
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    alone = "--hermes-only" in args
    paths = [a for a in args if a != "--hermes-only"]
    if len(paths) != 1:
        sys.exit(__doc__)
    print(json.dumps(run(paths[0], sessiondb_writer=not alone), indent=1))
