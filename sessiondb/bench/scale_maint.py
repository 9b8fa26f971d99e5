"""The maintenance side of the scale benchmark: each operation runs while one other
process keeps writing (:func:`~sessiondb.bench.scale_workers.writer`), and reports its
duration, its progress reports, and the writer's waits and errors during it.

A writer call counts as "during" an operation when it overlaps the operation's time
window (wall clock, which every process on the machine shares): a call that started
before and was held up by it counts too.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import sys
import time
from typing import Any, Callable

import apsw

from ..writes import percentile
from . import scale_api
from .scale_data import Corpus
from .scale_hermes import build_hermes_db, count_messages
from .scale_workers import Progress, export_child, import_child, writer

#: Session ids of the benchmark's own writers start with this (left out of comparisons).
WRITER_PREFIX = "bench-writer-"
_CTX = mp.get_context("spawn")
_QS = (("p50", 50), ("p90", 90), ("p99", 99))


def dist(samples: list[float]) -> dict[str, float]:
    """``p50``, ``p90``, ``p99`` and ``max`` of ``samples`` (seconds)."""
    out = {name: percentile(samples, q) for name, q in _QS}
    out["max"] = max(samples) if samples else 0.0
    return out


def sample_sessions(db_path: str, n: int = 100, seed: int = 1) -> list[str]:
    """Ids of up to ``n`` sessions that have messages, drawn with a seed (read-only)."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM sessions WHERE message_count > 0 ORDER BY id")]
    finally:
        conn.close()
    rng = random.Random(seed)
    return rng.sample(ids, min(n, len(ids)))


def file_sizes(path: str) -> dict[str, int]:
    """Bytes of the database file, its ``-wal``, and the free pages inside the file."""
    def size(p: str) -> int:
        try:
            return os.stat(p).st_size
        except FileNotFoundError:
            return 0
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        free = conn.execute("SELECT (SELECT freelist_count FROM pragma_freelist_count) * "
                            "(SELECT page_size FROM pragma_page_size)").fetchone()[0]
    finally:
        conn.close()
    return {"db_bytes": size(path), "wal_bytes": size(path + "-wal"), "free_bytes": free}


class WriterRun:
    """One writer process (:func:`~sessiondb.bench.scale_workers.writer`) for the length
    of a ``with`` block; :meth:`figures` then summarizes its calls in a time window.

    :param kind: ``"sessiondb"`` or ``"hermes"``.
    :raises RuntimeError: the writer did not start within a minute or crashed.
    """

    def __init__(self, kind: str, path: str, label: str, seed: int) -> None:
        self.kind = kind
        self.session_id = WRITER_PREFIX + label
        self._ready = _CTX.Event()
        self._stop = _CTX.Event()
        self._results: Any = _CTX.Queue()
        self._proc = _CTX.Process(target=writer, daemon=True, args=(
            kind, path, self.session_id, seed, self._ready, self._stop, self._results))
        self.result: dict[str, Any] = {}

    def __enter__(self) -> "WriterRun":
        self._proc.start()
        if not self._ready.wait(60):
            self._proc.kill()
            raise RuntimeError("the writer process did not start within 60 s")
        time.sleep(0.2)  # a few calls before the operation starts
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.1)
        self._stop.set()
        try:
            self.result = self._results.get(timeout=120)
        except queue.Empty:
            self.result = {"calls": [], "errors": [], "crashed": "never reported"}
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()

    @property
    def acknowledged(self) -> int:
        """Writes the writer saw succeed (over its whole life)."""
        return len(self.result.get("calls", []))

    def figures(self, t0: float, t1: float) -> dict[str, Any]:
        """``kind``, ``calls``, ``latency_s`` (``p50``, ``p90``, ``p99``, ``max``),
        ``max_at_s`` (when the longest call began, in seconds from ``t0``: to match
        with the operation's progress), ``errors`` and ``error_samples`` of the calls
        overlapping ``[t0, t1]``."""
        calls = [(s, d) for s, d in self.result.get("calls", []) if s <= t1 and s + d >= t0]
        errs = [e for s, e in self.result.get("errors", []) if t0 <= s <= t1]
        crashed = self.result.get("crashed", "")
        longest = max(calls, key=lambda call: call[1], default=(t0, 0.0))
        return {"kind": self.kind, "calls": len(calls), "latency_s": dist(
                    [d for _, d in calls]), "max_at_s": round(longest[0] - t0, 3),
                "errors": len(errs), "error_samples": errs[:3],
                "crashed": crashed.strip().splitlines()[-1] if crashed else ""}


def timed(fn: Callable[[], Any]) -> tuple[Any, float, str, float, float]:
    """Run ``fn``; return its result, seconds, error text ("" if none) and the wall-clock
    window."""
    t0 = time.time()
    p0 = time.perf_counter()
    try:
        result, error = fn(), ""
    except Exception as exc:  # a failed operation is a figure of the run
        result, error = None, f"{type(exc).__name__}: {exc}"
    return result, time.perf_counter() - p0, error, t0, time.time()


def with_writer(label: str, path: str, fn: Callable[[], Any], seed: int, *,
                kind: str = "sessiondb") -> tuple[dict[str, Any], Any]:
    """Run ``fn`` while a writer appends to ``path``; returns (figures, fn's result)."""
    print(f"  {label} ...", file=sys.stderr, flush=True)
    with WriterRun(kind, path, label, seed) as w:
        result, duration, error, t0, t1 = timed(fn)
    out = {"duration_s": duration, "error": error, "writer": w.figures(t0, t1)}
    wr = out["writer"]
    print(f"  {label}: {duration:.1f} s" + (f", FAILED: {error}" if error else "")
          + f"; writer max wait {wr['latency_s']['max'] * 1000:.0f} ms (at "
          f"{wr['max_at_s']:.1f} s) over {wr['calls']} calls, errors {wr['errors']}",
          file=sys.stderr, flush=True)
    return out, result


def run_child(target: Callable[..., None], args: tuple) -> dict[str, Any]:
    """Run ``target(*args, results)`` in a spawned process and return what it put."""
    results: Any = _CTX.Queue()
    proc = _CTX.Process(target=target, args=(*args, results), daemon=True)
    proc.start()
    while True:
        try:
            out = results.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                out = {"crashed": f"the process ended with exit code {proc.exitcode}"}
                break
    proc.join(timeout=30)
    if out.get("crashed"):
        raise RuntimeError("child process failed: " + out["crashed"].strip().splitlines()[-1])
    return out


# -- the operations ---------------------------------------------------------------------

def rebuild(path: str, seed: int) -> dict[str, Any]:
    """``rebuild_search_index`` of the whole store (``indexed``: the messages it indexed)."""
    from .. import SessionDB

    progress = Progress("rebuild")
    with SessionDB(path) as db:
        out, indexed = with_writer("rebuild_search_index", path,
                                   lambda: scale_api.rebuild_search_index(db, progress), seed)
    out.update(indexed=indexed, progress=progress.figures())
    return out


def export_import(path: str, workdir: str, seed: int) -> dict[str, dict[str, Any]]:
    """Export the store to JSON Lines in one process, import that file into a fresh store
    in another (a writer on each store meanwhile), then compare the two stores.

    :returns: ``export``, ``import`` and ``round_trip`` figures.
    """
    from .. import SessionDB

    lines = os.path.join(workdir, "export.jsonl")
    fresh = os.path.join(workdir, "reimported.db")
    # duration_s: the child's own time for the work; process_s: from spawn to exit.
    exported, child = with_writer("export", path, lambda: run_child(
        export_child, (path, lines)), seed + 1)
    exported["process_s"] = exported["duration_s"]
    exported.update(child or {})
    SessionDB(fresh).close()  # created before two processes race to create it
    imported, child = with_writer("import", fresh, lambda: run_child(
        import_child, (fresh, lines)), seed + 2)
    imported["process_s"] = imported["duration_s"]
    imported.update(child or {})
    if child and child.get("duration_s"):
        imported["messages_per_s"] = exported.get("messages", 0) / child["duration_s"]
    out = {"export": exported, "import": imported,
           "round_trip": compare_stores(path, fresh, seed) if child else {"equal": False}}
    for name in (lines, fresh, fresh + "-wal", fresh + "-shm"):
        if os.path.exists(name):
            os.unlink(name)
    return out


def compare_stores(a: str, b: str, seed: int, sample: int = 20) -> dict[str, Any]:
    """Compare two stores, the benchmark writers' sessions left out: session and message
    counts, and a sample of sessions in full (``export_session``), message ids aside: a
    writer appending while the import ran may have taken an id the import wanted, which
    the import then gives a new one (order kept).

    :returns: ``equal``, ``sessions`` and ``messages`` (a pair: a, b), ``sampled``,
        ``sampled_equal``, ``message_ids_kept`` (of the sampled sessions' messages).
    """
    from .. import SessionDB

    def counts(path: str) -> tuple[int, int]:
        # Totals minus the writers' own rows (found by the session index): a LIKE over
        # every message would read the whole table.
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            conn.set_busy_timeout(10_000)
            conn.execute("BEGIN")
            writers = [r[0] for r in conn.execute(
                "SELECT id FROM sessions WHERE id >= ? AND id < ?",
                (WRITER_PREFIX, WRITER_PREFIX[:-1] + chr(ord(WRITER_PREFIX[-1]) + 1)))]
            sessions, messages = conn.execute(
                "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM messages)"
            ).fetchone()
            for sid in writers:
                messages -= conn.execute("SELECT count(*) FROM messages WHERE session_id = ?",
                                         (sid,)).fetchone()[0]
            conn.execute("COMMIT")
            return sessions - len(writers), messages
        finally:
            conn.close()

    ca, cb = counts(a), counts(b)
    ids = [i for i in sample_sessions(a, sample + 10, seed)
           if not i.startswith(WRITER_PREFIX)][:sample]
    same = kept = total = 0
    with SessionDB(a) as da, SessionDB(b) as db:
        for sid in ids:
            x, y = da.export_session(sid), db.export_session(sid)
            if x is None or y is None:
                continue
            total += len(x["messages"])
            kept += sum(1 for m, n in zip(x["messages"], y["messages"]) if m["id"] == n["id"])
            for m in x["messages"] + y["messages"]:
                m.pop("id")
            same += x == y
    return {"equal": ca == cb and same == len(ids), "sessions": [ca[0], cb[0]],
            "messages": [ca[1], cb[1]], "sampled": len(ids), "sampled_equal": same,
            "message_ids_kept": [kept, total]}


def pick_cutoff(path: str) -> tuple[float, int]:
    """A start time halfway between the median session's and the one before, and how
    many ended sessions started before it: a prune of about half the store. (Halfway, so
    that the moments between this and the prune's own clock reading move no session
    across it.)"""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        starts = [r[0] for r in conn.execute(
            "SELECT started_at FROM sessions ORDER BY started_at LIMIT 2 OFFSET "
            "max(0, (SELECT count(*) / 2 FROM sessions) - 1)")]
        cutoff = sum(starts) / len(starts)
        expected = conn.execute("SELECT count(*) FROM sessions WHERE started_at < ? "
                                "AND ended_at IS NOT NULL", (cutoff,)).fetchone()[0]
    finally:
        conn.close()
    return cutoff, expected


def prune_and_reclaim(path: str, seed: int) -> dict[str, dict[str, Any]]:
    """Prune about half the sessions, then give the space back; file sizes before, after
    the prune and after ``reclaim_space`` (each after a checkpoint, so that the file holds
    what was committed).

    :returns: ``prune_sessions`` and ``reclaim_space`` figures.
    """
    from .. import SessionDB

    with SessionDB(path) as db:
        db.checkpoint(reset=True)
        before = file_sizes(path)
        cutoff, expected = pick_cutoff(path)
        progress = Progress("prune")
        days: list[float] = []

        def prune() -> int:
            days.append((time.time() - cutoff) / 86400)  # the clock read at the call
            return scale_api.prune_sessions(db, days[0], progress)

        pruned, pruned_n = with_writer("prune_sessions", path, prune, seed + 3)
        db.checkpoint(reset=True)
        after = file_sizes(path)
        pruned.update(older_than_days=days[0], expected=expected, pruned=pruned_n,
                      progress=progress.figures(), sizes_before=before, sizes_after=after,
                      sessions_after=db.session_count(), messages_after=db.message_count())
        progress = Progress("reclaim")
        reclaimed, result = with_writer("reclaim_space", path, lambda: scale_api.reclaim_space(
            db, progress), seed + 4)
        db.checkpoint(reset=True)
        final = file_sizes(path)
        reclaimed.update(result=result, progress=progress.figures(), sizes_after=final,
                         given_back_bytes=after["db_bytes"] - final["db_bytes"])
    return {"prune_sessions": pruned, "reclaim_space": reclaimed}


def hermes_conversion(workdir: str, corpus: Corpus, session_count: int,
                      seed: int) -> dict[str, Any]:
    """Build a hermes-agent ``state.db`` of ``session_count`` sessions, then open it with
    :class:`~sessiondb.SessionDB` (which converts it in place, and indexes its messages
    before it returns, as the first process to open it) while a raw "hermes-agent" writer
    inserts into it.

    :returns: the conversion's figures, with ``built`` (the file before it),
        ``converted`` (the file's ``user_version`` is sessiondb's) and ``lost_writes``
        (the writer's acknowledged inserts missing afterwards).
    """
    from .. import SessionDB, schema

    path = os.path.join(workdir, "hermes-state.db")
    print("  hermes-agent state.db: building", file=sys.stderr, flush=True)
    built = build_hermes_db(path, corpus, session_count, seed)
    print(f"  hermes-agent state.db: {built['messages']:,} messages in "
          f"{built['duration_s']:.1f} s", file=sys.stderr, flush=True)
    print("  hermes_conversion ...", file=sys.stderr, flush=True)
    progress = Progress("conversion")
    with WriterRun("hermes", path, "hermes", seed + 5) as w:
        _, duration, error, t0, t1 = timed(lambda: SessionDB(path, progress=progress).close())
    out: dict[str, Any] = {"duration_s": duration, "error": error,
                           "writer": w.figures(t0, t1), "built": built,
                           "progress": progress.figures()}
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        out["converted"] = conn.execute("PRAGMA user_version").fetchone()[0] == \
            schema.SCHEMA_VERSION
    finally:
        conn.close()
    out["lost_writes"] = w.acknowledged - count_messages(path, w.session_id)
    out["messages_after"] = count_messages(path)
    wr = out["writer"]
    print(f"  hermes_conversion: {duration:.1f} s" + (f", FAILED: {error}" if error else "")
          + f"; hermes writer max wait {wr['latency_s']['max'] * 1000:.0f} ms (at "
          f"{wr['max_at_s']:.1f} s) over {wr['calls']} calls, errors {wr['errors']}",
          file=sys.stderr, flush=True)
    for name in (path, path + "-wal", path + "-shm"):
        if os.path.exists(name):
            os.unlink(name)
    return out


__all__ = ["rebuild", "export_import", "prune_and_reclaim", "hermes_conversion",
           "file_sizes", "compare_stores", "WriterRun"]
