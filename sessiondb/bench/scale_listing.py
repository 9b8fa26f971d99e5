"""Latency of listing, counting and reading on a large existing store.

:func:`measure_listing` times the read calls of :class:`~sessiondb.SessionDB` that a
session browser makes (``list_sessions`` with every filter and page kind,
``session_count``, ``message_count``, ``get_messages`` pages) on a store built
beforehand, e.g. the million-message one of the scale benchmark, and returns p50 / p99 /
max per call. It only reads (opening the store may migrate it to the current schema:
measure a copy). Run it on its own with::

    python -m sessiondb.bench.scale_listing STORE.db [--repeats 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import random
import sys
import time
from typing import Any, Callable

import apsw

from .. import __version__
from ..store import SessionDB
from ..writes import percentile

__all__ = ["measure_listing"]

#: Sessions skipped by the deep-page cases (by ``offset`` and by keyset).
DEEP_OFFSET = 10_000


def measure_listing(db_path: str, repeats: int = 200, *, seed: int = 1) -> dict[str, Any]:
    """Time each listing/reading call ``repeats`` times on the store at ``db_path``.

    Every call runs once untimed first (a warm cache, as in an application that keeps
    its store open). Calls whose target varies (a random session for per-session counts
    and message pages) draw it from a seeded generator.

    :param db_path: an existing store (opening it migrates an older schema: use a copy).
    :param repeats: timed calls per case.
    :param seed: seed of the random choice of sessions.
    :returns: ``{"versions", "options", "store", "open_s", "loadavg", "calls"}``;
        ``calls`` maps a case name to ``{"n", "p50_ms", "p99_ms", "max_ms", "cpu_p50_ms",
        "cpu_p99_ms"}`` (wall-clock time, and this thread's CPU time, which a busy
        machine's preemptions do not inflate); a case the library cannot run (keyset
        paging before it existed) is absent. ``loadavg``: the 1-minute load average
        before and after (a p99 on a loaded machine includes waits for a core).
    """
    rng = random.Random(seed)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    db = SessionDB(db_path)
    open_s = time.perf_counter() - started
    try:
        doc = _measure(db, repeats, rng, open_s)
    finally:
        db.close()
    doc["loadavg"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return doc


def _measure(db: SessionDB, repeats: int, rng: random.Random,
             open_s: float) -> dict[str, Any]:
    everything = db.list_sessions(limit=None)  # newest first
    ids = [r["id"] for r in everything]
    sources = sorted({r["source"] for r in everything})
    by_count = {s: db.session_count(s) for s in sources}
    common = max(by_count, key=by_count.__getitem__)
    rare = min(by_count, key=by_count.__getitem__)
    keyset = "after" in inspect.signature(db.list_sessions).parameters
    deep = ids[min(DEEP_OFFSET, len(ids) - 1) - 1] if ids else None

    def pick() -> str:
        return rng.choice(ids)

    def after_id(sid: str) -> int:
        page = db.get_messages(sid, limit=50)
        return page[len(page) // 2]["id"] if page else 0

    cases: dict[str, Callable[[], Any]] = {
        "list_sessions": lambda: db.list_sessions(),
        f"list_sessions source={common}": lambda: db.list_sessions(common),
        f"list_sessions source={rare}": lambda: db.list_sessions(rare),
        f"list_sessions exclude=[{common}]": lambda: db.list_sessions(
            exclude_sources=[common]),
        f"list_sessions exclude=all but {rare}": lambda: db.list_sessions(
            exclude_sources=[s for s in sources if s != rare]),
        "list_sessions active=True": lambda: db.list_sessions(active=True),
        "list_sessions active=False": lambda: db.list_sessions(active=False),
        f"list_sessions source={rare} active=True": lambda: db.list_sessions(
            rare, active=True),
        f"list_sessions offset={DEEP_OFFSET}": lambda: db.list_sessions(
            offset=DEEP_OFFSET),
        f"list_sessions source={common} offset={DEEP_OFFSET // 2}": lambda: db.list_sessions(
            common, offset=DEEP_OFFSET // 2),
        "list_sessions random offset": lambda: db.list_sessions(
            offset=rng.randrange(max(1, len(ids)))),
        "session_count": lambda: db.session_count(),
        f"session_count source={common}": lambda: db.session_count(common),
        f"session_count source={rare}": lambda: db.session_count(rare),
        "message_count": lambda: db.message_count(),
        "message_count session": lambda: db.message_count(pick()),
        "get_messages 50 first": lambda: db.get_messages(pick(), limit=50),
    }
    if keyset and deep is not None:
        cases[f"list_sessions after=<session {DEEP_OFFSET}>"] = lambda: db.list_sessions(
            after=deep)
        cases["list_sessions after=<random session>"] = lambda: db.list_sessions(
            after=pick())
        cases[f"list_sessions source={common} after=<random session>"] = (
            lambda: db.list_sessions(common, after=pick()))
    # The message id to page after is found beforehand: only the page itself is timed.
    anchors = iter([(sid, after_id(sid)) for sid in (pick() for _ in range(repeats + 1))])

    def page_after() -> Any:
        sid, after = next(anchors)
        return db.get_messages(sid, after_id=after, limit=50)

    cases["get_messages 50 after_id"] = page_after
    calls = {}
    for name, call in cases.items():
        call()  # warm-up, untimed
        samples, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.thread_time()
            call()
            samples.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
        calls[name] = {**_summary(samples), "cpu_p50_ms": _ms(percentile(cpu, 50)),
                       "cpu_p99_ms": _ms(percentile(cpu, 99))}
    return {
        "versions": {"sessiondb": __version__, "sqlite": apsw.sqlite_lib_version(),
                     "apsw": apsw.apsw_version(), "python": platform.python_version()},
        "options": {"repeats": repeats, "deep_offset": DEEP_OFFSET, "keyset": keyset},
        "store": {"path": str(db.path), "sessions": len(ids), "sources": by_count},
        "open_s": round(open_s, 3),
        "calls": calls,
    }


def _summary(samples: list[float]) -> dict[str, Any]:
    return {"n": len(samples), "p50_ms": _ms(percentile(samples, 50)),
            "p99_ms": _ms(percentile(samples, 99)), "max_ms": _ms(max(samples))}


def _ms(seconds: float) -> float:
    return round(1000 * seconds, 3)


def table(doc: dict[str, Any]) -> str:
    """The figures of :func:`measure_listing` as a text table."""
    width = max(len(name) for name in doc["calls"])
    keys = ("p50_ms", "p99_ms", "max_ms", "cpu_p50_ms", "cpu_p99_ms")
    lines = [f"{'call':<{width}}" + "".join(f"  {k.replace('_ms', ' ms'):>10}" for k in keys)]
    for name, fig in doc["calls"].items():
        lines.append(f"{name:<{width}}" + "".join(f"  {fig[k]:>10.3f}" for k in keys))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sessiondb.bench.scale_listing",
        description="Time listing, counting and reading calls on an existing store "
                    "(opening it migrates an older schema: give it a copy).")
    parser.add_argument("db", help="the store to measure")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per case")
    parser.add_argument("--seed", type=int, default=1, help="seed of the session choice")
    parser.add_argument("--json", dest="json_file", metavar="FILE",
                        help="also write the figures as JSON to FILE")
    args = parser.parse_args(argv)
    doc = measure_listing(args.db, args.repeats, seed=args.seed)
    print(json.dumps(doc["versions"]), f"open {doc['open_s']} s, load average "
          f"{doc['loadavg']}", file=sys.stderr)
    print(table(doc))
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
