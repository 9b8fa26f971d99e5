"""The frameworks benchmark: 8 processes writing one conversation at once through an
agent framework, with sessiondb's adapter and with the framework's own SQLite backend,
side by side (``sessiondb bench --only frameworks [--db postgresql://...]``).

A framework case is a module (:mod:`.fw_openai`, :mod:`.fw_langgraph`, :mod:`.fw_adk`)
with:

``NAME``                       the framework's name, for the table;
``BACKENDS``                   the backends it runs with: ``"sessiondb"`` (a SQLite file),
                               ``"sessiondb-pg"`` (a PostgreSQL URL) and the framework's
                               own SQLite backend (its name, e.g. ``"SQLiteSession"``);
``load(backend)``             optional, in each spawned process before the writers
                               start together: import what the backend needs (no write
                               waits for an import);
``prepare(backend, target)``   in the parent, before the writers start: whatever must
                               exist first (nothing, for most);
``work(backend, target, writer, count) -> dict``
                               in a spawned process: ``count`` writes of this writer
                               (each tagged with ``writer`` and its sequence number),
                               recorded with :class:`Writes`; returns its ``result()``;
``verify(backend, target, acked) -> dict``
                               in the parent, after: ``acked[writer]`` is the sequence
                               numbers of that writer's acknowledged writes; returns
                               :func:`tally`'s figures for what the store holds (``lost``
                               counts acknowledged writes missing), and optionally
                               ``notes``, a short text for the table.

``target`` is a file path in a fresh temporary directory for the SQLite backends, and a
URL naming a fresh schema (``?schema=``) for ``sessiondb-pg``.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Iterable, Iterator

from ..writes import percentile

CASES = ("fw_openai", "fw_langgraph", "fw_adk")
WRITERS = 8


def case(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


class Writes:
    """One writer's record: every write attempt's time, the errors, the sequence
    numbers acknowledged::

        writes = Writes()
        for seq in range(count):
            with writes.attempt(seq):
                session.add(...)       # an exception is recorded, and the writer goes on
        return writes.result()
    """

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.waits: list[float] = []
        self.acked: list[int] = []
        #: The last attempt raised one of its ``again`` exceptions: make it again.
        self.again = False

    @contextmanager
    def attempt(self, seq: int, again: tuple[type[Exception], ...] = ()) -> Iterator[None]:
        """Time one write attempt; acknowledge ``seq`` if it returns. An exception in
        ``again`` (say, a stale-session refusal that the app meets by reading again) is
        neither an error nor an acknowledgement: it sets :attr:`again`."""
        started = time.monotonic()
        self.again = False
        try:
            yield
        except again:
            self.again = True
        except Exception as exc:  # the table counts it; the writer goes on
            self.error(exc)
        else:
            self.acked.append(seq)
        finally:
            self.waits.append(time.monotonic() - started)

    def error(self, exc: BaseException, what: str = "") -> None:
        self.errors.append(f"{what}{type(exc).__name__}: {exc}"[:300])

    def result(self) -> dict[str, Any]:
        return {"ok": len(self.acked), "errors": self.errors, "waits": self.waits,
                "acked": self.acked}


def tally(tags: Iterable[tuple[int, int]], acked: dict[int, list[int]],
          newest_first: bool = False) -> dict[str, int]:
    """The figures of what a store holds: ``tags`` are the (writer, seq) of its writes in
    the store's order (``newest_first``: reversed). ``out_of_order`` counts the writers
    whose writes are not in the order they made them."""
    tags = list(tags)
    present = set(tags)
    wanted = {(w, s) for w, seqs in acked.items() for s in seqs}
    order = {}
    for w, s in tags:
        order.setdefault(w, []).append(s)
    return {"present": len(tags), "lost": len(wanted - present),
            "duplicated": len(tags) - len(present),
            "out_of_order": sum(seqs != sorted(seqs, reverse=newest_first)
                                for seqs in order.values())}


def _writer(case_name: str, backend: str, target: str, writer: int, count: int,
            barrier: Any, out: Any) -> None:
    try:
        module = case(case_name)
        if hasattr(module, "load"):
            module.load(backend)
        barrier.wait(timeout=120)
        started = time.monotonic()
        result = module.work(backend, target, writer, count)
        result["wall"] = time.monotonic() - started
    except BaseException:  # reported, never lost: the table shows it as an error
        result = {"ok": 0, "errors": [traceback.format_exc(limit=3)], "waits": [],
                  "acked": []}
    out.put((writer, result))


def run_case(case_name: str, backend: str, target: str, writers: int = WRITERS,
             count: int = 50, timeout: float = 600.0) -> dict[str, Any]:
    """Run one framework case on one fresh target with ``writers`` spawned processes
    of ``count`` writes each; the figures of one row of the table."""
    module = case(case_name)
    module.prepare(backend, target)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(writers)
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(case_name, backend, target, w, count,
                                               barrier, out), daemon=True)
             for w in range(writers)]
    started = time.monotonic()
    for p in procs:
        p.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        while len(results) < writers:
            writer, result = out.get(timeout=max(1.0, timeout - (time.monotonic() - started)))
            results[writer] = result
    except queue.Empty:
        pass
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    wall = time.monotonic() - started
    errors = [e for r in results.values() for e in r["errors"]]
    errors += [f"writer {w} never reported" for w in range(writers) if w not in results]
    waits = sorted(w for r in results.values() for w in r["waits"])
    checked = module.verify(backend, target,
                            {w: r["acked"] for w, r in results.items()})
    return {
        "framework": module.NAME, "backend": backend, "writers": writers, "count": count,
        "acknowledged": sum(r["ok"] for r in results.values()),
        "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "lost": checked["lost"], "duplicated": checked["duplicated"],
        "out_of_order": checked["out_of_order"], "present": checked["present"],
        "notes": checked.get("notes", ""),
        "worst_wait": waits[-1] if waits else 0.0,
        "p99_wait": percentile(waits, 99) if waits else 0.0,
        "wall": wall,
    }


def targets(backend: str, workdir: str, label: str, url: str | None) -> str | None:
    """Where one run's store lives: a file, or a fresh schema of ``url`` (None: the run
    needs PostgreSQL and no URL was given)."""
    if backend != "sessiondb-pg":
        return os.path.join(workdir, f"{label}.db")
    if url is None:
        return None
    from .pg_workers import drop_schema, with_schema

    target = with_schema(url, f"sessiondb_bench_fw_{label}")
    drop_schema(target)
    return target


def benchmark(url: str | None = None, count: int = 50, writers: int = WRITERS,
              cases: tuple[str, ...] = CASES) -> list[dict[str, Any]]:
    """Every case with every backend it has (``sessiondb-pg`` only with ``url``)."""
    rows = []
    workdir = tempfile.mkdtemp(prefix="sessiondb-bench-fw-")
    try:
        for name in cases:
            module = case(name)
            for backend in module.BACKENDS:
                label = f"{name}_{backend}".lower().replace("-", "_")
                target = targets(backend, workdir, label, url)
                if target is None:
                    continue
                rows.append(run_case(name, backend, target, writers, count))
                if backend == "sessiondb-pg":
                    from .pg_workers import drop_schema

                    drop_schema(target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The side-by-side table (Markdown)."""
    lines = ["| framework | backend | writes acknowledged | errors | lost | duplicated | "
             "out of order | worst wait | p99 wait | notes |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['backend']} | {r['acknowledged']} of "
            f"{r['writers'] * r['count']} | {r['errors']} | {r['lost']} | {r['duplicated']} | "
            f"{r['out_of_order']} | {r['worst_wait'] * 1000:.0f} ms | "
            f"{r['p99_wait'] * 1000:.0f} ms | {r['notes']} |")
    return "\n".join(lines)
