"""Bulk in and out at scale: the streaming export of a store to JSON Lines, its import
into a fresh store while another process keeps appending, and the round trip compared.

:func:`measure_bulk` runs each side in its own spawned process, so that each peak RSS
(``VmHWM``) is that process's own, and reports plain figures (seconds, rates, bytes):

- ``export``: ``SessionDB.iter_export`` written with :func:`sessiondb.jsonstream.write_jsonl`
  (what ``sessiondb export --jsonl`` does);
- ``import``: :func:`sessiondb.jsonstream.read_items` fed to ``import_sessions`` (what
  ``sessiondb import`` does), split by its progress reports into the row phase (task
  ``"import"``) and the index catch-up (``"index"``), plus end to end;
- ``writer``: a process appending to its own session every 5-10 ms during the import
  (including the index catch-up): the duration of each call (its wait for the lock
  included; ``lock_wait_*`` is that wait alone, the rest is its own commit and the WAL
  resets it ran), and whether every acknowledged append is in the store afterwards;
- ``round_trip``: both stores read with ``iter_export`` side by side (streamed), each
  session compared. A message whose exported id the writer took meanwhile gets another
  id (ids are kept where free), so sessions are counted equal, equal but for message
  ids, or different; without the writer every session is equal.

Nothing is written outside ``workdir``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import time
import traceback
from itertools import zip_longest
from pathlib import Path
from typing import Any

from .scale_workers import peak_rss

WRITER_SESSION = "bulk-bench-writer"




def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def export_child(db_path: str, out_file: str, results: Any) -> None:
    """Export the store to ``out_file`` as JSON Lines; put the figures on ``results``."""
    out: dict[str, Any] = {"crashed": ""}
    try:
        from sessiondb import SessionDB
        from sessiondb.jsonstream import write_jsonl

        counts = {"sessions": 0, "messages": 0}

        def counted(items: Any) -> Any:
            for item in items:
                counts["sessions"] += 1
                counts["messages"] += len(item["messages"])
                yield item

        with SessionDB(db_path) as db:
            out["baseline_rss_bytes"] = peak_rss()
            t0, c0 = time.perf_counter(), _cpu()
            with open(out_file, "w", encoding="utf-8", buffering=1 << 20) as fh:
                write_jsonl(fh, counted(db.iter_export()))
            out.update(seconds=time.perf_counter() - t0, cpu_s=_cpu() - c0, **counts,
                       file_bytes=os.path.getsize(out_file), peak_rss_bytes=peak_rss())
    except BaseException:
        out["crashed"] = traceback.format_exc()
    results.put(("export", out))


def import_child(db_path: str, in_file: str, results: Any) -> None:
    """Import the JSON Lines (or JSON list) file into the store; put the figures on
    ``results``: the time of the last ``"import"`` report ends the row phase."""
    out: dict[str, Any] = {"crashed": ""}
    try:
        from sessiondb import SessionDB
        from sessiondb.jsonstream import read_items

        marks: dict[str, Any] = {"reports": 0}

        def progress(p: Any) -> None:
            marks["reports"] += 1
            now = (time.perf_counter(), _cpu())
            if p.task == "import":
                marks["rows_end"], marks["rows"] = now, p.done
            elif p.task == "index":
                marks["index_end"], marks["indexed"] = now, p.done

        with SessionDB(db_path) as db:
            out["baseline_rss_bytes"] = peak_rss()
            t0, c0 = time.perf_counter(), _cpu()
            with open(in_file, "rb") as fh:
                out["imported"] = db.import_sessions(read_items(fh), progress=progress)
            t1, c1 = time.perf_counter(), _cpu()
        rows_end = marks.get("rows_end", (t1, c1))
        index_end = marks.get("index_end", rows_end)
        out.update(seconds=t1 - t0, cpu_s=c1 - c0, messages=marks.get("rows", 0),
                   rows_seconds=rows_end[0] - t0, rows_cpu_s=rows_end[1] - c0,
                   indexed=marks.get("indexed", 0), index_seconds=index_end[0] - rows_end[0],
                   index_cpu_s=index_end[1] - rows_end[1], progress_reports=marks["reports"],
                   peak_rss_bytes=peak_rss())
    except BaseException:
        out["crashed"] = traceback.format_exc()
    results.put(("import", out))


def writer_child(db_path: str, seed: int, ready: Any, stop: Any, results: Any) -> None:
    """Append to :data:`WRITER_SESSION` every 5-10 ms until ``stop``; put the duration
    of every acknowledged call and the errors on ``results``."""
    out: dict[str, Any] = {"crashed": "", "waits": [], "errors": [], "acked": []}
    rng = random.Random(seed)
    try:
        from sessiondb import SessionDB

        with SessionDB(db_path) as db:
            db.ensure_session(WRITER_SESSION, "bench-writer")
            ready.set()
            while not stop.is_set():
                text = " ".join(f"w{rng.randrange(5000)}" for _ in range(rng.randint(30, 250)))
                t0 = time.perf_counter()
                try:
                    mid = db.append_message(WRITER_SESSION, "user", text)
                except Exception as exc:  # a figure, not the end of the run
                    out["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                else:
                    out["waits"].append(time.perf_counter() - t0)
                    out["acked"].append(mid)
                stop.wait(rng.uniform(0.005, 0.010))
            figures = db.stats()
            out["lock_wait_max_s"] = figures["lock_wait_max_s"]
            out["lock_wait_p99_s"] = figures["lock_wait_p99_s"]
            out["resets"] = figures["checkpoint"]["resets_ok"]
    except BaseException:
        out["crashed"] = traceback.format_exc()
        ready.set()
    results.put(("writer", out))


def _collect(results: Any, procs: list[Any], kinds: set[str]) -> dict[str, Any]:
    """The figures of ``kinds`` from the queue; a child that died without reporting
    (killed, or crashed before its handler) becomes a figure too, not a hang."""
    got: dict[str, Any] = {}
    while not kinds <= set(got):
        try:
            kind, figures = results.get(timeout=1.0)
            got[kind] = figures
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                for kind in kinds - set(got):
                    got[kind] = {"crashed": "the process ended without reporting"}
    return got


def _percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))]


def compare(source_path: str, imported_path: str) -> dict[str, Any]:
    """Read both stores side by side with ``iter_export`` (bounded memory) and compare
    every session; the benchmark writer's session is left out of the imported side."""
    from sessiondb import SessionDB

    def without_ids(session: dict[str, Any]) -> dict[str, Any]:
        return {**session, "messages": [{k: v for k, v in m.items() if k != "id"}
                                        for m in session["messages"]]}

    figures = {"sessions": 0, "messages": 0, "equal": 0, "equal_but_message_ids": 0,
               "different": 0, "missing": 0, "extra": 0, "first_difference": None}
    with SessionDB(source_path) as src, SessionDB(imported_path) as dst:
        imported = (s for s in dst.iter_export() if s["id"] != WRITER_SESSION)
        for a, b in zip_longest(src.iter_export(), imported):
            if a is None:
                figures["extra"] += 1
                continue
            figures["sessions"] += 1
            figures["messages"] += len(a["messages"])
            if b is None:
                figures["missing"] += 1
            elif a == b:
                figures["equal"] += 1
            elif without_ids(a) == without_ids(b):
                figures["equal_but_message_ids"] += 1
            else:
                figures["different"] += 1
                figures["first_difference"] = figures["first_difference"] or a["id"]
        figures["counts"] = {
            "source": [src.session_count(), src.message_count()],
            "imported": [dst.session_count() - (dst.get_session(WRITER_SESSION) is not None),
                         dst.message_count() - dst.message_count(WRITER_SESSION)]}
    figures["counts_equal"] = figures["counts"]["source"] == figures["counts"]["imported"]
    return figures


def measure_bulk(db_path: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                 writer: bool = True, seed: int = 1) -> dict[str, Any]:
    """Export the store at ``db_path`` (not written to) to ``workdir/export.jsonl``,
    import that into a fresh ``workdir/imported.db`` (with a concurrent appender unless
    ``writer=False``), and compare the two stores.

    :returns: ``export``, ``import``, ``writer`` (None without one) and ``round_trip``
        figures (see the module docstring); rates in messages per second.
    """
    from sessiondb import SessionDB

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    export_file, imported = work / "export.jsonl", work / "imported.db"
    for name in (imported.name, imported.name + "-wal", imported.name + "-shm"):
        (work / name).unlink(missing_ok=True)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    doc: dict[str, Any] = {"db": str(db_path), "writer": None,
                           "load_before": os.getloadavg()}

    child = ctx.Process(target=export_child, args=(str(db_path), str(export_file), results))
    child.start()
    doc["export"] = _collect(results, [child], {"export"})["export"]
    child.join()
    e = doc["export"]
    if not e["crashed"]:
        e["messages_per_s"] = e["messages"] / e["seconds"] if e["seconds"] else None
        # Flushed to disk before the import starts: otherwise the kernel writes the
        # 1.4 GB file back while the import runs, and the import's own writes and
        # checkpoints queue behind it (measured: 43,000 instead of 51,000 rows/s).
        started = time.perf_counter()
        fd = os.open(export_file, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        e["flush_seconds"] = time.perf_counter() - started

    SessionDB(imported).close()  # the fresh store, so that the writer can start first
    stop, ready = ctx.Event(), ctx.Event()
    appender = None
    if writer:
        appender = ctx.Process(target=writer_child,
                               args=(str(imported), seed, ready, stop, results))
        appender.start()
        ready.wait(60)
    child = ctx.Process(target=import_child, args=(str(imported), str(export_file), results))
    child.start()
    procs = [child] + ([appender] if appender is not None else [])
    got = _collect(results, procs, {"import"})
    stop.set()
    if appender is not None:
        got.update(_collect(results, procs, {"writer"} - set(got)))
        appender.join()
    child.join()
    i = doc["import"] = got["import"]
    if not i["crashed"]:
        i["rows_per_s"] = i["messages"] / i["rows_seconds"] if i["rows_seconds"] else None
        i["rows_per_cpu_s"] = i["messages"] / i["rows_cpu_s"] if i["rows_cpu_s"] else None
        i["index_per_s"] = i["indexed"] / i["index_seconds"] if i["index_seconds"] else None
        i["end_to_end_per_s"] = i["messages"] / i["seconds"] if i["seconds"] else None
    if appender is not None:
        w = {"waits": [], "acked": [], "errors": [], **got["writer"]}
        with SessionDB(imported) as db:
            present = {m["id"] for m in db.get_messages(WRITER_SESSION, limit=None)}
            counter = db.get_session(WRITER_SESSION)["message_count"]
        doc["writer"] = {
            "appends": len(w["waits"]), "errors": w["errors"][:5], "error_count":
            len(w["errors"]), "crashed": w["crashed"],
            "wait_p50_s": _percentile(w["waits"], 50), "wait_p99_s": _percentile(w["waits"], 99),
            "wait_max_s": max(w["waits"], default=0.0),
            # Of which waiting for the write lock (the rest: its own commit and the WAL
            # resets it ran, see sessiondb.checkpoint):
            "lock_wait_p99_s": w.get("lock_wait_p99_s"), "lock_wait_max_s":
            w.get("lock_wait_max_s"), "wal_resets_run": w.get("resets"),
            "lost": len(set(w["acked"]) - present), "counter_exact": counter == len(present)}
    doc["load_after"] = os.getloadavg()  # the machine's own noise: other work on it
    doc["round_trip"] = compare(str(db_path), str(imported))
    return doc
