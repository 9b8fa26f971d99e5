"""The processes of the contention benchmark: writers, a gateway, and two readers.

Every strategy does the same work per write (one agent turn): insert a 200-2000 byte
message (indexed by the FTS5 trigger) and add to the session's token counters, then hold
the transaction open for the scenario's extra lock-hold time (a sleep, identical in every
strategy). What differs is only how the transaction is run:

``naive``     stdlib ``sqlite3``, ``timeout=30``, implicit DEFERRED transactions, no manual
              checkpoints (the setup that froze).
``seedfix``   stdlib ``sqlite3``, ``timeout=1``, ``BEGIN IMMEDIATE`` with up to 15 retries
              sleeping 20-150 ms, PASSIVE checkpoint every 50 writes and at close.
``sessiondb`` the public API: ``with db.transaction(): append_message; update_token_counts``
              (``durability="full"``, the default: each commit syncs the ``-wal``).
``sessiondb-normal`` the same with ``durability="normal"`` (no sync at commit).
``sessiondb-posix`` the same with the portable write gate forced (``gate="posix"``: classic
              fcntl locks instead of Linux OFD locks), readers included.

The ``async-loop`` scenario adds a gateway that serves clients from an asyncio event loop
(:func:`_loop_gateway`) while a monitor measures how late the loop wakes up: through
:class:`~sessiondb.AsyncSessionDB` (``aio``), calling :class:`~sessiondb.SessionDB` on
the loop itself (``sync-on-loop``, the baseline), or not at all (``no-db``, the control).

Workers are seeded, measure every call end to end (waits and retries included) and send
their figures back through a queue; they never write files of their own.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

_WORDS = ("deploy parser lexer gateway token session agent model cache retry socket "
          "kernel tool search index commit rollback schema docker build test queue "
          "lease claim timeout convoy reader writer snapshot checkpoint").split()


@dataclass
class Job:
    """What one worker process does (picklable; sent to a spawned process)."""

    role: str                 # "writer" | "gateway" | "poller" | "long_reader" | "loop"
    strategy: str             # "naive" | "seedfix" | "sessiondb" | "sessiondb-normal"
    path: str
    seed: int
    duration: float
    hold: float = 0.0         # extra seconds each write transaction holds the lock
    think: float = 0.0        # mean of the exponential think time between writes (0: none)
    burst: int = 0            # >0: fire this many writes at each second boundary
    rate: float = 0.0         # gateway: sessions created per second
    session_id: str = ""
    index: int = 0
    mode: str = ""            # loop: "aio" | "sync-on-loop" | "no-db"


@dataclass
class Result:
    role: str
    index: int
    latencies: list[float] = field(default_factory=list)
    holds: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    commits: int = 0
    sqlite_version: str = ""
    crashed: str = ""
    lags: list[float] = field(default_factory=list)  # loop: how late each wake-up was
    gate: str = ""            # the write gate sessiondb used ("ofd", "posix", "none")


@dataclass
class RunResult:
    """One scenario run with one strategy: every process's result, and the store's
    figures (WAL, integrity, rows)."""
    scenario: str
    strategy: str
    duration: float
    writers: list[Result] = field(default_factory=list)
    gateway: Result | None = None
    poller: Result | None = None
    long_reader: Result | None = None
    loop: Result | None = None
    wal_peak: int = 0
    wal_samples: list[tuple[float, int]] = field(default_factory=list)
    integrity: str = ""
    rows: int = 0
    failed: str = ""
    load_average: list[float] = field(default_factory=list)  # at the end of the run


def message_text(rng: random.Random) -> str:
    """200-2000 bytes of words, so the FTS index does real work."""
    target = rng.randint(200, 2000)
    words: list[str] = []
    size = 0
    while size < target:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


# -- the three ways to run one write -------------------------------------------------

class _Stdlib:
    """Shared by naive and seedfix: the same statements sessiondb runs."""

    def __init__(self, job: Job, timeout: float, isolation: str | None) -> None:
        self.job = job
        self.conn = sqlite3.connect(job.path, timeout=timeout, isolation_level=isolation)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.sqlite_version = sqlite3.sqlite_version

    def statements(self, session_id: str, text: str, hold: float) -> float:
        """Run the turn's statements; return when the write lock was known to be held
        (after BEGIN IMMEDIATE, or for DEFERRED once the INSERT got the lock)."""
        held_from = time.monotonic()
        self.conn.execute(
            "INSERT INTO messages (session_id, role, content, timestamp) VALUES (?, ?, ?, ?)",
            (session_id, "assistant", text, time.time()))
        if self.conn.isolation_level is not None:  # naive: the INSERT took the lock
            held_from = time.monotonic()
        self.conn.execute(
            "UPDATE sessions SET message_count = message_count + 1, input_tokens = "
            "input_tokens + ?, output_tokens = output_tokens + ? WHERE id = ?",
            (120, 40, session_id))
        if hold:
            time.sleep(hold)
        return held_from

    def create(self, session_id: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.conn.close()


class Naive(_Stdlib):
    def __init__(self, job: Job) -> None:
        super().__init__(job, timeout=30, isolation="")  # "" = implicit DEFERRED BEGIN

    def write(self, session_id: str, text: str, hold: float) -> float:
        try:
            held_from = self.statements(session_id, text, hold)
            self.conn.commit()
            return time.monotonic() - held_from
        except BaseException:
            self.conn.rollback()
            raise

    def create(self, session_id: str) -> None:
        try:
            self.conn.execute("INSERT OR IGNORE INTO sessions (id, source, started_at) "
                              "VALUES (?, 'gateway', ?)", (session_id, time.time()))
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise


class SeedFix(_Stdlib):
    ATTEMPTS = 15

    def __init__(self, job: Job) -> None:
        super().__init__(job, timeout=1, isolation=None)
        self.rng = random.Random(job.seed ^ 0x5EED)
        self.writes = 0

    def _retrying(self, body: Callable[[], float | None]) -> float | None:
        for attempt in range(self.ATTEMPTS):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    result = body()
                    self.conn.execute("COMMIT")
                except BaseException:
                    self.conn.execute("ROLLBACK")
                    raise
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if attempt == self.ATTEMPTS - 1:
                    raise
                time.sleep(self.rng.uniform(0.020, 0.150))
        self.writes += 1
        if self.writes % 50 == 0:
            try:
                self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error:
                pass
        return result

    def write(self, session_id: str, text: str, hold: float) -> float:
        started: list[float] = []

        def body() -> None:
            started.append(self.statements(session_id, text, hold))

        self._retrying(body)
        return time.monotonic() - started[-1]

    def create(self, session_id: str) -> None:
        self._retrying(lambda: self.conn.execute(
            "INSERT OR IGNORE INTO sessions (id, source, started_at) VALUES (?, 'gateway', ?)",
            (session_id, time.time())) and None)

    def close(self) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        finally:
            super().close()


#: The strategies that run sessiondb itself, and the options each one opens it with.
LIBRARY_OPTIONS: dict[str, dict[str, Any]] = {"sessiondb": {},
                                              "sessiondb-normal": {"durability": "normal"},
                                              "sessiondb-posix": {"gate": "posix"}}


def open_library(job: Job) -> Any:
    from sessiondb import SessionDB

    return SessionDB(job.path, **LIBRARY_OPTIONS.get(job.strategy, {}))


class Library:
    def __init__(self, job: Job) -> None:
        from sessiondb.connection import sqlite_version

        self.db = open_library(job)
        self.sqlite_version = ".".join(map(str, sqlite_version()))
        self.gate = self.db.stats().get("gate", "")

    def write(self, session_id: str, text: str, hold: float) -> float:
        with self.db.transaction():
            held_from = time.monotonic()
            self.db.append_message(session_id, "assistant", text)
            self.db.update_token_counts(session_id, 120, 40)
            if hold:
                time.sleep(hold)
        return time.monotonic() - held_from

    def create(self, session_id: str) -> None:
        self.db.create_session(session_id, "gateway")

    def close(self) -> None:
        self.db.close()


STRATEGIES: dict[str, Callable[[Job], Any]] = {
    "naive": Naive, "seedfix": SeedFix, "sessiondb": Library, "sessiondb-normal": Library,
    "sessiondb-posix": Library,
}


# -- process bodies -----------------------------------------------------------------

def run_job(job: Job, start: Any, finish: Any, results: Any) -> None:
    """Entry point of every benchmark process (spawned). ``start`` is a Barrier shared
    by all processes of a run and the parent, so everyone starts at the same moment;
    ``finish`` one shared by the processes, so nobody closes its connection (and runs
    its closing checkpoint) while others are still measuring."""
    result = Result(job.role, job.index)
    try:
        body = {"writer": _writer, "gateway": _gateway, "poller": _poller,
                "long_reader": _long_reader, "loop": _loop_gateway}[job.role]
        body(job, result, (start, finish))
    except BaseException:  # report, never hang the parent
        result.crashed = traceback.format_exc()
        start.abort()
        finish.abort()
    results.put(result)


def _begin(barriers: Any, duration: float) -> float:
    barriers[0].wait()
    return time.monotonic() + duration


def _end(barriers: Any) -> None:
    try:
        barriers[1].wait(timeout=120)
    except threading.BrokenBarrierError:
        pass


def _record_error(result: Result, exc: BaseException) -> None:
    result.errors += 1
    if len(result.error_samples) < 3:
        result.error_samples.append(f"{type(exc).__name__}: {exc}")


def _record_success(result: Result, started: float) -> None:
    """Count a call that began at ``started`` (monotonic) and has just succeeded."""
    result.latencies.append(time.monotonic() - started)
    result.commits += 1


def _writer(job: Job, result: Result, barriers: Any) -> None:
    rng = random.Random(job.seed)
    runner = STRATEGIES[job.strategy](job)
    result.sqlite_version = runner.sqlite_version
    result.gate = getattr(runner, "gate", "")
    texts = [message_text(rng) for _ in range(64)]
    end = _begin(barriers, job.duration)
    try:
        write_turns(job, result, runner, rng, texts, end)
    finally:
        _end(barriers)
        runner.close()


def write_turns(job: Job, result: Result, runner: Any, rng: random.Random,
                texts: list[str], end: float) -> None:
    """A writer's loop until ``end`` (monotonic): one write per turn, or ``job.burst``
    writes at each second boundary, then the think time; every write timed end to end.
    Shared with the PostgreSQL benchmark's writer threads (:mod:`.pg_workers`)."""
    while time.monotonic() < end:
        if job.burst:
            # Synchronized bursts: every process fires at the same wall-clock second.
            time.sleep(max(0.0, 1.0 - time.time() % 1.0))
            count = job.burst
        else:
            count = 1
        for _ in range(count):
            t0 = time.monotonic()
            try:
                hold = runner.write(job.session_id, rng.choice(texts), job.hold)
            except Exception as exc:
                _record_error(result, exc)
            else:
                result.latencies.append(time.monotonic() - t0)
                result.holds.append(hold)
                result.commits += 1
        if job.think:
            time.sleep(rng.expovariate(1.0 / job.think))


def _gateway(job: Job, result: Result, barriers: Any) -> None:
    runner = STRATEGIES[job.strategy](job)
    result.sqlite_version = runner.sqlite_version
    end = _begin(barriers, job.duration)
    period = 1.0 / job.rate
    next_at = time.monotonic()
    n = 0
    try:
        while time.monotonic() < end:
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += period
            t0 = time.monotonic()
            try:
                runner.create(f"gw-{job.seed}-{n}")
            except Exception as exc:
                _record_error(result, exc)
            else:
                _record_success(result, t0)
            n += 1
    finally:
        _end(barriers)
        runner.close()


def _poller(job: Job, result: Result, barriers: Any) -> None:
    """A TUI: every 20 ms list the newest sessions and run a search."""
    rng = random.Random(job.seed)
    if job.strategy in LIBRARY_OPTIONS:
        db = open_library(job)

        def poll() -> None:
            db.list_sessions(limit=20)
            db.search_messages(rng.choice(_WORDS), limit=10)
        close = db.close
    else:
        conn = sqlite3.connect(job.path, timeout=30)

        def poll() -> None:
            conn.execute("SELECT id, title, message_count FROM sessions "
                         "ORDER BY started_at DESC LIMIT 20").fetchall()
            conn.execute("SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? "
                         "ORDER BY rank LIMIT 10", (rng.choice(_WORDS),)).fetchall()
        close = conn.close
    _repeat(poll, close, 0.020, job, result, barriers)


def _long_reader(job: Job, result: Result, barriers: Any) -> None:
    """A reader that holds a read transaction open 500 ms at a time, back to back."""
    if job.strategy in LIBRARY_OPTIONS:
        db = open_library(job)

        def read_500ms() -> None:
            with db.snapshot():
                db.message_count()
                time.sleep(0.5)
        close = db.close
    else:
        conn = sqlite3.connect(job.path, timeout=30, isolation_level=None)

        def read_500ms() -> None:
            conn.execute("BEGIN")
            try:
                conn.execute("SELECT COUNT(*) FROM messages").fetchall()
                time.sleep(0.5)
            finally:
                conn.execute("COMMIT")
        close = conn.close
    _repeat(read_500ms, close, 0.0, job, result, barriers)


def _repeat(op: Callable[[], None], close: Callable[[], None], pause: float, job: Job,
            result: Result, barriers: Any) -> None:
    """A reader's loop: time ``op`` back to back (``pause`` between) for the run."""
    end = _begin(barriers, job.duration)
    try:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                op()
            except Exception as exc:
                _record_error(result, exc)
            else:
                result.latencies.append(time.monotonic() - t0)
            if pause:
                time.sleep(pause)
    finally:
        _end(barriers)
        close()


# -- the gateway on an event loop (async-loop) ----------------------------------------

LOOP_CLIENTS = 4          # coroutines, each a client: create a session, append, think
LOOP_THINK = 0.020        # mean think time of a client between requests (exponential)
LAG_TICK = 0.001          # the monitor's sleep: every wake-up later than this is lag
CONTROL_CALL = 0.040      # no-db: a client's "call" sleeps this long (a contended write)


def _loop_gateway(job: Job, result: Result, barriers: Any) -> None:
    """An asyncio gateway: ``LOOP_CLIENTS`` client coroutines each create a session and
    append a message, think, and again; a monitor coroutine sleeps ``LAG_TICK`` over and
    over and records how late each wake-up is (the time the loop was blocked). With
    ``mode == "aio"`` the clients go through AsyncSessionDB; with ``"sync-on-loop"`` they
    call SessionDB directly on the loop, which blocks it for every call; with ``"no-db"``
    (the control) they only sleep, so its lag is the machine's own scheduling noise."""
    asyncio.run(_serve(job, result, barriers))


async def _serve(job: Job, result: Result, barriers: Any) -> None:
    from sessiondb import AsyncSessionDB, SessionDB
    from sessiondb.connection import sqlite_version

    result.sqlite_version = ".".join(map(str, sqlite_version()))
    if job.mode == "aio":
        adb = await AsyncSessionDB.open(job.path)
        call: Callable[..., Any] = lambda name, *a: getattr(adb, name)(*a)
        close = adb.close
    elif job.mode == "no-db":  # the control: what the machine alone does to the loop
        call = lambda name, *a: asyncio.sleep(CONTROL_CALL)
        close = lambda: asyncio.sleep(0)
    else:
        db = SessionDB(job.path)

        async def call(name: str, *a: Any) -> Any:
            return getattr(db, name)(*a)

        async def close() -> None:
            db.close()
    rng = random.Random(job.seed)
    texts = [message_text(rng) for _ in range(16)]
    end = await asyncio.to_thread(_begin, barriers, job.duration)
    stop = asyncio.Event()

    async def monitor() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            await asyncio.sleep(LAG_TICK)
            result.lags.append(max(0.0, time.monotonic() - t0 - LAG_TICK))

    async def client(k: int) -> None:
        n = 0
        while time.monotonic() < end:
            sid = f"loop-{k}-{n}"
            for name, args in (("create_session", (sid, "gateway")),
                               ("append_message", (sid, "user", rng.choice(texts)))):
                t0 = time.monotonic()
                try:
                    await call(name, *args)
                except Exception as exc:
                    _record_error(result, exc)
                else:
                    _record_success(result, t0)
            n += 1
            await asyncio.sleep(rng.expovariate(1.0 / LOOP_THINK))

    watcher = asyncio.ensure_future(monitor())
    try:
        await asyncio.gather(*[client(k) for k in range(LOOP_CLIENTS)])
    finally:
        stop.set()
        await watcher
        await asyncio.to_thread(_end, barriers)
        await close()
