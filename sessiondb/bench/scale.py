"""The scale benchmark: ``sessiondb bench --only scale [--messages N]``.

In a fresh working directory, in this order:

1. **Build** a store of N messages (sessions of 50) through the public API: most of it
   with the bulk path, ``import_sessions`` fed by a generator of session dicts (streamed,
   never all in memory), then a sample of up to 20,000 messages through ``transaction()``
   blocks of 50 ``append_message`` calls; the rate of each path; then
   ``optimize_search_index`` (the sealed index tables merged, as advised after an import).
2. **Read**: every search shape (:func:`~sessiondb.bench.scale_search.measure_search`)
   and every listing, count and page shape
   (:func:`~sessiondb.bench.scale_listing.measure_listing`), timed.
3. **Maintain**, each while one other process keeps writing
   (:mod:`sessiondb.bench.scale_maint`): the full-text rebuild, the streaming export to
   JSON Lines and its import into a fresh store (peak RSS of each process; the round trip
   compared), a prune of about half the sessions and ``reclaim_space`` (file sizes), and
   the in-place conversion of a hermes-agent ``state.db`` of N messages while a
   hermes-agent writer inserts into it.
4. **Report**: the benchmark process's RSS, versions, every figure as JSON
   (``{"header": ..., "runs": [one run]}``, like the contention benchmark) and a table
   (:mod:`sessiondb.bench.scale_report`).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Any

import apsw

from . import scale_api
from .run import header
from .scale_data import PER_SESSION, Corpus, Timed, sessions
from .scale_listing import measure_listing
from .scale_maint import (
    export_import, file_sizes, hermes_conversion, prune_and_reclaim, rebuild,
)
from .scale_search import measure_search
from .scale_workers import Progress, current_rss, peak_rss

DEFAULT_MESSAGES = 1_000_000
DEFAULT_REPEATS = 100
MIN_MESSAGES = 1_000
#: Messages ingested through ``transaction()`` blocks (at most; a tenth of a small store).
TRANSACTION_SAMPLE = 20_000


def plan(messages: int) -> dict[str, int]:
    """How a store of ``messages`` messages is made: ``sessions`` of 50 messages, of
    which ``transaction_sessions`` through ``transaction()`` and ``import_sessions``
    through the bulk path (``messages`` is rounded down to a multiple of 50)."""
    total = messages // PER_SESSION
    sample = min(TRANSACTION_SAMPLE // PER_SESSION, max(1, total // 10))
    return {"messages": total * PER_SESSION, "sessions": total,
            "import_sessions": total - sample, "transaction_sessions": sample}


def build(path: str, corpus: Corpus, shape: dict[str, int], seed: int) -> dict[str, Any]:
    """Make the store at ``path`` (step 1).

    :returns: ``import`` and ``transaction`` figures: ``sessions``, ``messages``,
        ``duration_s`` and ``messages_per_s`` (for ``import``, the time spent generating
        the data left out; ``generate_s`` and ``wall_messages_per_s`` include it), and
        for ``import`` the rows phase (up to the last ``"import"`` progress report):
        ``rows_s`` and ``rows_messages_per_s`` (generation left out); then
        ``optimize``: ``optimize_search_index``'s ``pages`` and ``duration_s``.
    """
    from .. import SessionDB

    with SessionDB(path) as db:
        print(f"  import_sessions: {shape['import_sessions']:,} sessions", file=sys.stderr,
              flush=True)
        progress = Progress("import")
        stream = Timed(sessions(corpus, shape["import_sessions"], seed))
        t0 = time.perf_counter()
        done = scale_api.import_sessions(db, stream, progress)
        wall = time.perf_counter() - t0
        imported = {"sessions": done, "messages": stream.messages, "duration_s": wall,
                    "generate_s": stream.spent_s,
                    "messages_per_s": stream.messages / max(wall - stream.spent_s, 1e-9),
                    "wall_messages_per_s": stream.messages / wall,
                    "progress": progress.figures()}
        # The rows phase ends at the last "import" report; the data is generated
        # during it (the stream is used up by then), so its time is left out here too.
        rows_s = imported["progress"]["tasks"].get("import", {}).get("elapsed_s")
        if rows_s:
            imported["rows_s"] = rows_s
            imported["rows_messages_per_s"] = stream.messages / max(rows_s - stream.spent_s,
                                                                    1e-9)
        print(f"  import_sessions: {imported['messages_per_s']:,.0f} messages/s",
              file=sys.stderr, flush=True)
        in_txn = 0.0
        messages = 0
        shown = time.monotonic()
        for item in sessions(corpus, shape["transaction_sessions"], seed + 1,
                             first=shape["import_sessions"]):
            sid = item["id"]
            db.create_session(sid, item["source"], model=item["model"], title=item["title"])
            t1 = time.perf_counter()
            with db.transaction():
                for m in item["messages"]:
                    db.append_message(sid, m["role"], m["content"])
            in_txn += time.perf_counter() - t1
            messages += len(item["messages"])
            if item["ended_at"] is not None:
                db.end_session(sid)
            if time.monotonic() - shown >= 2.0:
                shown = time.monotonic()
                print(f"    transaction(): {messages:,} messages", file=sys.stderr,
                      flush=True)
        txn = {"sessions": shape["transaction_sessions"], "messages": messages,
               "duration_s": in_txn, "messages_per_s": messages / max(in_txn, 1e-9),
               "messages_per_transaction": PER_SESSION}
        print(f"  transaction(): {txn['messages_per_s']:,.0f} messages/s", file=sys.stderr,
              flush=True)
        # The sealed index tables merged (sessiondb.fts_merge), as the README advises
        # after a large import: the reads measure the store as its user keeps it.
        progress = Progress("optimize")
        t0 = time.perf_counter()
        pages = db.optimize_search_index(progress=progress)
        merged = {"pages": pages, "duration_s": time.perf_counter() - t0,
                  "progress": progress.figures()}
    return {"import": imported, "transaction": txn, "optimize": merged}


def store_figures(path: str) -> dict[str, Any]:
    """Sessions, messages, file sizes, and the page size of the store."""
    out: dict[str, Any] = dict(file_sizes(path))
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        out["sessions"], out["messages"], out["page_size"] = conn.execute(
            "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM messages), "
            "(SELECT page_size FROM pragma_page_size)").fetchone()
    finally:
        conn.close()
    return out


def measure_reads(db_path: str, repeats: int, seed: int) -> dict[str, Any]:
    """Time every search shape, then every listing, count and page shape.

    :returns: ``search`` and ``listing``, each the document its measuring function
        returns.
    """
    print("  search ...", file=sys.stderr, flush=True)
    search = measure_search(db_path, repeats, seed=seed)
    print("  listing ...", file=sys.stderr, flush=True)
    listing = measure_listing(db_path, repeats, seed=seed)
    return {"search": search, "listing": listing}


def scale_benchmark(*, messages: int = DEFAULT_MESSAGES, repeats: int = DEFAULT_REPEATS,
                    seed: int = 1, workdir: str | None = None) -> dict[str, Any]:
    """Run the scale benchmark (progress on stderr).

    :param messages: size of the store (rounded down to a multiple of 50; at least 1,000).
    :param repeats: timed rounds of every read shape.
    :param workdir: where the temporary files go (a new directory inside it, removed at
        the end); default the system's temporary directory.
    :returns: ``{"header": ..., "runs": [run]}``; the keys of ``run`` are listed in the
        README ("The scale benchmark").
    :raises ValueError: ``messages`` below 1,000 or ``repeats`` below 1.
    """
    if messages < MIN_MESSAGES:
        raise ValueError(f"messages must be at least {MIN_MESSAGES:,}")
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    shape = plan(messages)
    options = {"only": ["scale"], "messages": shape["messages"], "sessions": shape["sessions"],
               "per_session": PER_SESSION, "transaction_messages":
               shape["transaction_sessions"] * PER_SESSION, "repeats": repeats, "seed": seed,
               "workdir": workdir}
    doc: dict[str, Any] = {"header": header(options), "runs": []}
    run: dict[str, Any] = {"scenario": "scale", "strategy": "sessiondb", **shape,
                           "failed": ""}
    doc["runs"].append(run)
    base = tempfile.mkdtemp(prefix="sessiondb-scale-", dir=workdir)
    path = os.path.join(base, "scale.db")
    t_start = time.perf_counter()
    step = "build"
    try:
        say(f"[1/4] build: {shape['messages']:,} messages in {shape['sessions']:,} sessions")
        corpus = Corpus(seed, shape["messages"])
        run["ingest"] = build(path, corpus, shape, seed)
        run["store"] = store_figures(path)
        step = "read"
        say(f"[2/4] read: {repeats} rounds of every shape")
        run.update(measure_reads(path, repeats, seed))
        step = "maintain"
        say("[3/4] maintain, each while another process writes")
        maint: dict[str, Any] = {"rebuild_search_index": rebuild(path, seed)}
        maint.update(export_import(path, base, seed))
        maint.update(prune_and_reclaim(path, seed))
        maint["hermes_conversion"] = hermes_conversion(base, corpus, shape["sessions"], seed)
        run["maintenance"] = maint
        run["store_after"] = store_figures(path)
    except Exception as exc:  # what was measured so far is still reported
        run["failed"] = f"{step}: {type(exc).__name__}: {exc}"
        say(f"FAILED in {step}: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    say("[4/4] report")
    run["rss"] = {"peak_bytes": peak_rss(), "current_bytes": current_rss()}
    run["duration_s"] = time.perf_counter() - t_start
    if not run["failed"]:
        run["failed"] = "; ".join(problems(run))
    return doc


def problems(run: dict[str, Any]) -> list[str]:
    """What went wrong in a run that completed: failed operations, an unequal round trip,
    lost or unconverted writes."""
    out = [f"{name}: {m['error']}" for name, m in run.get("maintenance", {}).items()
           if isinstance(m, dict) and m.get("error")]
    maint = run.get("maintenance", {})
    if maint and not maint.get("round_trip", {}).get("equal"):
        out.append("export/import: the round trip is not equal")
    hermes = maint.get("hermes_conversion", {})
    if hermes and not hermes.get("error"):
        if not hermes.get("converted"):
            out.append("hermes_conversion: the file was not converted")
        if hermes.get("lost_writes"):
            out.append(f"hermes_conversion: {hermes['lost_writes']} acknowledged writes lost")
    return out


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


__all__ = ["scale_benchmark", "plan", "DEFAULT_MESSAGES", "DEFAULT_REPEATS"]
