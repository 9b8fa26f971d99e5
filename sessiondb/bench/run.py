"""Scenarios and the orchestration of one benchmark invocation.

Each (scenario, strategy) pair runs on a fresh database file in a temporary directory:
the parent creates the schema and one session per writer, starts every process
(``multiprocessing`` spawn) behind one barrier, samples the ``-wal`` size every 50 ms
(``os.stat`` only), then collects the workers' figures from a queue and checks the file
(``integrity_check``, acknowledged writes all present).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import apsw

from .. import __version__
from ..writes import percentile
from .disk import fsync_probe, load_average
from .workers import Job, Result, RunResult, run_job

#: ``sessiondb`` runs with the default ``durability="full"``; ``sessiondb-normal`` with
#: ``durability="normal"``, for the cost of a sync per commit (see :mod:`.disk`).
STRATEGIES = ("naive", "seedfix", "sessiondb", "sessiondb-normal")
#: Run only when asked for (``--strategy``): sessiondb with the process record off
#: (``$SESSIONDB_PROCS=0`` in its processes), beside ``sessiondb``, to measure what
#: publishing each process's state costs the write path.
UNRECORDED = "sessiondb-unrecorded"
#: Only when asked for (``--strategy``): ``sessiondb-posix``, sessiondb with the portable
#: gate of classic POSIX locks forced, to compare with the default gate (Linux OFD
#: locks) in the same run; and :data:`UNRECORDED`.
EXTRA_STRATEGIES = ("sessiondb-posix", UNRECORDED)
# The async-loop scenario compares ways to call the store from an event loop instead
# (its writers always use sessiondb): AsyncSessionDB, the sync API on the loop, and a
# control whose clients make no call at all (the machine's own noise on the loop).
LOOP_MODES = ("aio", "sync-on-loop", "no-db")


@dataclass
class Scenario:
    name: str
    writers: int
    duration: float
    hold: float = 0.0
    think: float = 0.0
    burst: int = 0
    gateway_rate: float = 0.0
    readers: bool = True
    loop: bool = False        # an asyncio gateway runs beside the writers (LOOP_MODES)
    description: str = ""


_ASYNC_LOOP = Scenario(
    "async-loop", 8, 4.0, hold=0.005, think=0.005, loop=True,
    description="an asyncio gateway serves 4 clients while agents write; loop lag measured")


def scenarios(quick: bool, duration: float | None = None,
              writers: int | None = None) -> list[Scenario]:
    """The scenario set; ``duration``/``writers`` override every scenario's value."""
    if quick:
        chosen = [
            Scenario("convoy", 8, 4.0, hold=0.010, description="10 ms transactions, closed loop"),
            Scenario("fast", 8, 4.0, description="tiny transactions, closed loop"),
            _ASYNC_LOOP,
        ]
    else:
        chosen = [
            Scenario("convoy", 16, 30.0, hold=0.010,
                     description="10 ms transactions, closed loop"),
            *[Scenario(f"agent-{n}", n, 10.0, hold=0.005, think=0.005,
                       description="5 ms transactions, exponential think mean 5 ms")
              for n in (4, 8, 16)],
            Scenario("burst", 16, 10.0, burst=10,
                     description="each second every process fires 10 writes at once"),
            Scenario("fast", 8, 10.0, description="tiny transactions, closed loop"),
            Scenario("gateway", 8, 10.0, hold=0.005, think=0.005, gateway_rate=20.0,
                     description="a gateway creates 20 sessions/s while agents write"),
            replace(_ASYNC_LOOP, duration=10.0),
        ]
    return [replace(s, duration=duration or s.duration, writers=writers or s.writers)
            for s in chosen]


def run_one(scenario: Scenario, strategy: str, workdir: str, seed: int,
            serial: bool = False, loop_mode: str = "") -> RunResult:
    """Run one scenario with one strategy (``serial``: one writer, no readers;
    ``loop_mode``: how the asyncio gateway of a ``loop`` scenario calls the store)."""
    from .. import SessionDB

    label = loop_mode or strategy + ("-serial" if serial else "")
    path = os.path.join(workdir, f"{scenario.name}-{label}.db")
    n = 1 if serial else scenario.writers
    with SessionDB(path) as db:
        for i in range(n):
            db.create_session(f"w-{i}", "bench")
    env = {"SESSIONDB_PROCS": "0"} if strategy == UNRECORDED else {}
    if strategy == UNRECORDED:
        strategy = "sessiondb"  # the same workers, started with the record off
    jobs = [Job("writer", strategy, path, seed * 1000 + i, scenario.duration,
                hold=scenario.hold, think=0.0 if serial else scenario.think,
                burst=0 if serial else scenario.burst, session_id=f"w-{i}", index=i)
            for i in range(n)]
    if not serial:
        if scenario.gateway_rate:
            jobs.append(Job("gateway", strategy, path, seed * 1000 + 900, scenario.duration,
                            rate=scenario.gateway_rate))
        if scenario.loop:
            jobs.append(Job("loop", strategy, path, seed * 1000 + 903, scenario.duration,
                            mode=loop_mode))
        if scenario.readers:
            jobs.append(Job("poller", strategy, path, seed * 1000 + 901, scenario.duration))
            jobs.append(Job("long_reader", strategy, path, seed * 1000 + 902,
                            scenario.duration))
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(len(jobs) + 1)
    finish = ctx.Barrier(len(jobs))
    results: Any = ctx.Queue()
    procs = [ctx.Process(target=run_job, args=(job, start, finish, results), daemon=True)
             for job in jobs]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # a spawned process gets the environment of its start()
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    out = RunResult(scenario.name, strategy, scenario.duration)
    try:
        start.wait(timeout=120)
    except threading.BrokenBarrierError:
        out.failed = "a process failed to start"
    sampler = _WalSampler(path + "-wal")
    sampler.start()
    collected: list[Result] = []
    deadline = time.monotonic() + scenario.duration + 60
    while len(collected) < len(jobs) and time.monotonic() < deadline:
        try:
            collected.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                break
    sampler.stop()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()
    out.wal_peak, out.wal_samples = sampler.peak, sampler.samples
    for r in collected:
        if r.crashed and not out.failed:
            out.failed = r.crashed.strip().splitlines()[-1]
        if r.role == "writer":
            out.writers.append(r)
        else:
            setattr(out, r.role, r)
    out.writers.sort(key=lambda r: r.index)
    if len(collected) < len(jobs) and not out.failed:
        out.failed = f"{len(jobs) - len(collected)} process(es) never reported"
    out.integrity, out.rows = _check_file(path)
    out.load_average = load_average()
    return out


def _alternated(strategies: tuple[str, ...], number: int) -> list[str]:
    """The strategies in their order, except that ``sessiondb`` and ``sessiondb-normal``
    trade places in every other scenario: of two settings compared on a shared machine,
    neither always runs first (after the same neighbour, on the same warm caches)."""
    order = list(strategies)
    pair = ("sessiondb", "sessiondb-normal")
    if number % 2 and all(p in order for p in pair):
        i, j = order.index(pair[0]), order.index(pair[1])
        order[i], order[j] = order[j], order[i]
    return order


class _WalSampler(threading.Thread):
    def __init__(self, wal_path: str) -> None:
        super().__init__(daemon=True)
        self.wal_path = wal_path
        self.peak = 0
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.wait(0.05):
            try:
                size = os.stat(self.wal_path).st_size
            except OSError:
                size = 0
            self.peak = max(self.peak, size)
            self.samples.append((round(time.monotonic() - self._t0, 3), size))

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _check_file(path: str) -> tuple[str, int]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        integrity = conn.execute("PRAGMA integrity_check").fetchall()[0][0]
        # The writers' messages only (sessions w-<i>): the async-loop gateway appends
        # messages of its own, which would hide lost writer commits.
        rows = conn.execute("SELECT COUNT(*) FROM messages WHERE session_id LIKE 'w-%'"
                            ).fetchall()[0][0]
    finally:
        conn.close()
    return integrity, rows


def header(options: dict[str, Any]) -> dict[str, Any]:
    import sqlite3
    return {
        "sessiondb": __version__,
        "python": platform.python_version(),
        "apsw": apsw.apsw_version() if hasattr(apsw, "apsw_version") else apsw.apswversion(),
        "sqlite_apsw": apsw.sqlite_lib_version(),
        "sqlite_stdlib": sqlite3.sqlite_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "options": options,
    }


def benchmark(*, quick: bool = False, duration: float | None = None,
              writers: int | None = None, only: list[str] | None = None,
              strategies: tuple[str, ...] = STRATEGIES, seed: int = 1,
              workdir: str | None = None, rounds: int = 1,
              progress: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
              ) -> dict[str, Any]:
    """Run every scenario with every strategy (plus a serial ceiling) and summarize.
    ``rounds`` > 1 runs each scenario's strategies that many times, their order reversed
    every other round, so that strategies compared in one run share the machine's
    changing load alike; each run records its ``round`` and the load average after it.

    :param workdir: where the stores go (a fresh directory inside it, removed at the
        end; default: the system's temporary directory); it should be a real disk, as
        the header's ``fsync`` figure and file system show.
    :returns: ``{"header": ..., "runs": [...]}``, the JSON document ``--json`` writes.
    """
    from .report import summarize

    chosen = [s for s in scenarios(quick, duration, writers) if not only or s.name in only
              or s.name.split("-")[0] in only]
    options = {"quick": quick, "duration": duration, "writers": writers, "only": only,
               "strategies": list(strategies), "seed": seed, "workdir": workdir,
               "rounds": rounds,
               "scenarios": [s.__dict__ for s in chosen]}
    doc: dict[str, Any] = {"header": header(options), "runs": []}
    total = sum(len(LOOP_MODES) if s.loop else rounds * len(strategies) + 1 for s in chosen)
    step = 0
    workdir = tempfile.mkdtemp(prefix="sessiondb-bench-", dir=workdir)
    try:
        doc["header"]["fsync"] = fsync_probe(workdir)
        doc["header"]["load_average"] = load_average()
        for number, scenario in enumerate(chosen):
            if scenario.loop:
                plan = [(mode, "sessiondb", False) for mode in LOOP_MODES]
            else:
                plan = [("serial", "sessiondb", True)] + [
                    (s, s, False) for r in range(rounds)
                    for s in (_alternated(strategies, number) if r % 2 == 0
                              else _alternated(strategies, number)[::-1])]
            for label, strategy, serial in plan:
                step += 1
                # The serial ceiling runs as long as the contended runs: a short one
                # makes the ratio noisy (a few hundred commits).
                shown = scenario
                progress(f"[{step}/{total}] {scenario.name:<9} {label:<9} "
                         f"{shown.writers if not serial else 1} writer(s), {shown.duration:g} s")
                t0 = time.monotonic()
                run = run_one(shown, strategy, workdir, seed, serial=serial,
                              loop_mode=label if scenario.loop else "")
                summary = summarize(run, label)
                if rounds > 1:
                    summary["round"] = sum(1 for r in doc["runs"] if r["scenario"] ==
                                           scenario.name and r["strategy"] == label)
                summary["load_avg"] = [round(x, 2) for x in os.getloadavg()]
                doc["runs"].append(summary)
                progress(f"    done in {time.monotonic() - t0:.1f} s: "
                         f"{summary['commits']} commits, max {summary['latency_s']['max']:.3f} s, "
                         f"errors {summary['errors']}" + (f", FAILED: {run.failed}"
                                                          if run.failed else ""))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return doc


__all__ = ["benchmark", "scenarios", "run_one", "Scenario", "percentile", "STRATEGIES",
           "EXTRA_STRATEGIES", "UNRECORDED"]
