"""The contention benchmark on PostgreSQL beside SQLite, in one run (``sessiondb bench
--db postgresql://...``).

The scenarios are the SQLite benchmark's (:func:`.run.scenarios`: the same writers,
transaction lengths, think times, bursts and readers), plus three that only make sense
with row locks or several pools:

``convoy-row``  ``convoy`` with every writer on one session row (on SQLite the same
                thing as ``convoy``: one write lock for the file; on PostgreSQL the
                writers of one row queue in its lock queue, which is not strictly FIFO);
``agent-64``    ``agent-16``'s turns from 64 writers, 4 processes of 16 threads, each
                process one store instance with the default pool (8 connections), so
                threads wait for a connection as well as for locks;
``overhead``    one writer, tiny transactions, no readers: the library's cost per write
                against plain psycopg sending the turn's work in the fewest
                statements, and sending the library's own statements
                (:mod:`.pg_workers`).

Each (scenario, backend, client) runs on a fresh store: a file in a temporary directory,
or a schema ``sessiondb_bench_<scenario>_<client>`` in the given database, created and
dropped by the run. The parent creates the sessions, starts the processes (spawn) behind
one barrier, collects their figures from a queue, and checks the store (SQLite:
``integrity_check``; PostgreSQL: the sessions' counters add up to their messages).
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from .pg_workers import (GroupResult, Group, check_store, drop_schema, run_group,
                         server_info, with_schema)
from .run import RunResult, Scenario, _check_file, _WalSampler, header, scenarios
from .workers import Job, Result, run_job

BACKENDS = ("sqlite", "postgresql")


@dataclass
class Shape(Scenario):
    """A scenario and how its writers are laid out, per backend and client."""

    one_row: bool = False         # every writer on session w-0
    processes: int = 0            # writers spread over this many processes (0: one each)
    clients: tuple[str, ...] = ("sessiondb", "psycopg")  # on PostgreSQL; SQLite: sessiondb
    rounds: int = 1               # >1: the clients take turns, duration/rounds each


def shapes(quick: bool = False, duration: float | None = None,
           writers: int | None = None) -> list[Shape]:
    """The scenario set of ``--db``; ``duration``/``writers`` override every scenario's
    value (``overhead`` keeps its one writer; ``agent-64`` keeps at most 4 processes)."""
    base = {s.name: s for s in scenarios(quick=False)}

    def like(existing: str, **kw: Any) -> Shape:
        return Shape(**{**base[existing].__dict__, **kw})

    chosen = [
        like("convoy"),
        like("convoy", name="convoy-row", one_row=True,
             description="10 ms transactions, closed loop, every writer on one session"),
        like("agent-16"),
        like("burst"),
        like("fast"),
        like("agent-16", name="agent-64", writers=64, processes=4,
             description="5 ms transactions, think mean 5 ms; 4 processes x 16 threads, "
                         "one store (pool) per process"),
        # The clients take turns in rounds, so that a change in the machine's load
        # during the run does not land on one client only.
        Shape("overhead", 1, 10.0, readers=False, rounds=5,
              clients=("psycopg", "psycopg-same", "sessiondb", "sessiondb-append"),
              description="one writer, tiny transactions, no readers; the clients take "
                          "turns in 5 rounds"),
    ]
    if quick:
        chosen = [replace(s, duration=4.0) for s in chosen]
    out = []
    for s in chosen:
        n = s.writers if s.name == "overhead" else writers or s.writers
        out.append(replace(s, duration=duration or s.duration, writers=n,
                           processes=min(s.processes, n)))
    return out


def _store(backend: str, scenario: str, client: str, workdir: str, url: str) -> str:
    label = re.sub(r"[^a-z0-9]+", "_", f"{scenario}_{client}".lower())
    if backend == "sqlite":
        return os.path.join(workdir, f"{label}.db")
    return with_schema(url, f"sessiondb_bench_{label}")


@dataclass
class Outcome:
    """One run of one client: its figures, its writer processes' pools, and the
    machine's 1-minute load average when it ended."""

    run: RunResult
    groups: list[GroupResult]
    load: float = 0.0


def run_case(shape: Shape, backend: str, client: str, store: str, seed: int) -> Outcome:
    """Run one scenario with one client on one fresh store (a file, or a URL naming a
    schema that this drops before and after)."""
    from .. import SessionDB

    if backend == "postgresql":
        drop_schema(store)
    else:  # a file of an earlier round of this client
        for leftover in glob.glob(glob.escape(store) + "*"):
            os.remove(leftover)
    n = shape.writers
    sids = [f"w-{0 if shape.one_row else i}" for i in range(n)]
    with SessionDB(store) as db:
        for sid in sorted(set(sids)):
            db.create_session(sid, "bench")
    jobs = [Job("writer", "sessiondb", store, seed * 1000 + i, shape.duration,
                hold=shape.hold, think=shape.think, burst=shape.burst,
                session_id=sids[i], index=i) for i in range(n)]
    procs_n = shape.processes or n
    groups = [Group(client, store, jobs[k::procs_n], k) for k in range(procs_n)]
    readers = []
    if shape.readers:  # always through sessiondb: the same read load for every client
        readers = [Job(role, "sessiondb", store, seed * 1000 + 901 + k, shape.duration)
                   for k, role in enumerate(("poller", "long_reader"))]
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(groups) + len(readers) + 1)
    finish = ctx.Barrier(len(groups) + len(readers))
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=run_group, args=(g, start, finish, results), daemon=True)
             for g in groups]
    procs += [ctx.Process(target=run_job, args=(j, start, finish, results), daemon=True)
              for j in readers]
    for p in procs:
        p.start()
    out = RunResult(shape.name, client, shape.duration)
    try:
        start.wait(timeout=120)
    except threading.BrokenBarrierError:
        out.failed = "a process failed to start"
    sampler = _WalSampler(store + "-wal") if backend == "sqlite" else None
    if sampler:
        sampler.start()
    collected: list[Any] = []
    deadline = time.monotonic() + shape.duration + 60
    while len(collected) < len(procs) and time.monotonic() < deadline:
        try:
            collected.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    if sampler:
        sampler.stop()
        out.wal_peak, out.wal_samples = sampler.peak, sampler.samples
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    done: list[GroupResult] = []
    for r in collected:
        if r.crashed and not out.failed:
            out.failed = r.crashed.strip().splitlines()[-1]
        if isinstance(r, GroupResult):
            done.append(r)
            out.writers.extend(r.writers)
        else:
            setattr(out, r.role, r)
    out.writers.sort(key=lambda r: r.index)
    if len(collected) < len(procs) and not out.failed:
        out.failed = f"{len(procs) - len(collected)} process(es) never reported"
    load = os.getloadavg()[0]
    if backend == "sqlite":
        out.integrity, out.rows = _check_file(store)
    else:
        out.integrity, out.rows = check_store(store, tokens=client != "sessiondb-append")
        drop_schema(store)
    return Outcome(out, done, load)


def summarize_case(done: Outcome, shape: Shape, backend: str) -> dict[str, Any]:
    """:func:`.report.summarize`'s figures plus the backend, the client and the pools."""
    from .report import summarize

    run, groups = done.run, done.groups
    doc = summarize(run, run.strategy)
    if len(run.writers) < shape.writers:  # a process that never reported counts as 0
        seen = {r.index for r in run.writers}
        missing = [Result("writer", i) for i in range(shape.writers) if i not in seen]
        doc = summarize(replace(run, writers=sorted(run.writers + missing,
                                                    key=lambda r: r.index)), run.strategy)
    doc.update(backend=backend, client=run.strategy, processes=shape.processes or
               shape.writers, one_row=shape.one_row)
    pools = [g.pool for g in groups if g.pool]
    doc["pool"] = {k: sum(p.get(k, 0) for p in pools)
                   for k in ("waited", "wait_timeouts", "connections_lost")} if pools else {}
    if pools:
        doc["pool"]["size"] = pools[0].get("size", 0)
        doc["pool"]["pools"] = len(pools)
    doc["pool_warnings"] = sum(g.pool_warnings for g in groups)
    return doc


def benchmark(url: str, *, quick: bool = False, duration: float | None = None,
              writers: int | None = None, only: list[str] | None = None, seed: int = 1,
              progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
              ) -> dict[str, Any]:
    """Run every chosen scenario on sessiondb-SQLite and on PostgreSQL (each client),
    one after the other.

    :param url: a ``postgresql://`` URL of a database the benchmark may create and drop
        schemas ``sessiondb_bench_*`` in.
    :returns: ``{"header": ..., "runs": [...], "goals": [...]}``, the JSON document
        ``--json`` writes.
    """
    from .pg_report import goals

    chosen = [s for s in shapes(quick, duration, writers) if not only or s.name in only
              or s.name.split("-")[0] in only]
    options = {"db": _masked(url), "quick": quick, "duration": duration, "writers": writers,
               "only": only, "seed": seed, "scenarios": [_plain(s) for s in chosen]}
    head = header(options)
    head["postgresql"] = server_info(url)
    head["loadavg_start"] = os.getloadavg()[0]  # the machine may be shared: say so
    doc: dict[str, Any] = {"header": head, "runs": []}
    total = sum(s.rounds * (1 + len(s.clients)) for s in chosen)
    step = 0
    workdir = tempfile.mkdtemp(prefix="sessiondb-bench-pg-")
    try:
        for shape in chosen:
            cases = [("sqlite", "sessiondb")] + [("postgresql", c) for c in shape.clients]
            parts: dict[tuple[str, str], list[Outcome]] = {case: [] for case in cases}
            part = replace(shape, duration=shape.duration / shape.rounds)
            for k in range(shape.rounds):
                for backend, client in (cases if k % 2 == 0 else cases[::-1]):
                    step += 1
                    progress(f"[{step}/{total}] {shape.name:<10} {backend:<10} {client:<16} "
                             f"{shape.writers} writer(s), {part.duration:g} s")
                    store = _store(backend, shape.name, client, workdir, url)
                    t0 = time.monotonic()
                    done = run_case(part, backend, client, store, seed)
                    parts[(backend, client)].append(done)
                    progress(f"    {_rate(done.run):.0f} writes/s, errors "
                             f"{sum(w.errors for w in done.run.writers)} "
                             f"({time.monotonic() - t0:.0f} s, load {done.load:.1f})"
                             + (f" FAILED: {done.run.failed}" if done.run.failed else ""))
            for backend, client in cases:
                summary = summarize_case(_merge(parts[(backend, client)]), shape, backend)
                summary["loadavg_1m"] = [round(p.load, 2) for p in parts[(backend, client)]]
                doc["runs"].append(summary)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    doc["goals"] = goals(doc["runs"])
    return doc


def _rate(run: RunResult) -> float:
    return sum(w.commits for w in run.writers) / run.duration if run.duration else 0.0


def _merge(parts: list[Outcome]) -> Outcome:
    """The rounds of one client as one run: every writer's figures joined."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0].run
    out = RunResult(first.scenario, first.strategy, sum(p.run.duration for p in parts))
    joined: dict[tuple[str, int], Result] = {}
    for run in (p.run for p in parts):
        for r in [*run.writers, run.poller, run.long_reader]:
            if r is None:
                continue
            m = joined.setdefault((r.role, r.index), Result(r.role, r.index,
                                                            sqlite_version=r.sqlite_version))
            m.latencies += r.latencies
            m.holds += r.holds
            m.errors += r.errors
            m.error_samples += r.error_samples
            m.commits += r.commits
        out.failed = out.failed or run.failed
        out.rows += run.rows
        out.wal_peak = max(out.wal_peak, run.wal_peak)
        if run.integrity != "ok" or not out.integrity:
            out.integrity = out.integrity if out.integrity not in ("", "ok") else \
                run.integrity
    out.writers = sorted((r for r in joined.values() if r.role == "writer"),
                         key=lambda r: r.index)
    out.poller = joined.get(("poller", 0))
    out.long_reader = joined.get(("long_reader", 1))
    return Outcome(out, [g for p in parts for g in p.groups], max(p.load for p in parts))


def _plain(shape: Shape) -> dict[str, Any]:
    d = dict(shape.__dict__)
    d["clients"] = list(shape.clients)
    return d


def _masked(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(
        f":{parts.password}@", ":***@", 1)))
