"""The writer processes of the benchmark on PostgreSQL (``sessiondb bench --db URL``).

A writer process here runs one or more writer *threads* that share one client, so a
process has one connection pool however many writers it runs: the ``agent-64`` scenario
spreads 64 writers over 4 processes of 16 threads, each process with its own pool. With
one thread per process it is the SQLite benchmark's writer (:func:`.workers.write_turns`
is the loop of both). The clients, each doing the same work per write:

``sessiondb``         the public API, one ``transaction()`` per turn holding
                      ``append_message`` and ``update_token_counts``
                      (:class:`.workers.Library`), on SQLite or PostgreSQL;
``sessiondb-append``  ``append_message`` alone, one call per write (the library's
                      cheapest write; used where nothing is held inside the
                      transaction);
``psycopg``           the same SQL through plain psycopg, a ``psycopg_pool`` pool per
                      process of the library's default size: ``BEGIN``, ``UPDATE`` the
                      session's counters, ``INSERT`` the message ``RETURNING id``, the
                      scenario's hold, ``COMMIT``. The reference for the library's cost.
``psycopg-same``      the statements of the ``sessiondb`` client's turn, recorded from
                      the library once and sent as they are through plain psycopg
                      (:class:`SameSql`): the library's cost beyond its own SQL.

What each sends per write, in round trips (the ``overhead`` scenario compares them):

- ``psycopg``, 4: ``BEGIN``; one ``UPDATE sessions`` (``message_count``,
  ``input_tokens``, ``output_tokens``); ``INSERT INTO messages`` (4 columns)
  ``RETURNING id``; ``COMMIT``. The work of a whole turn (message, counter and tokens)
  in the fewest statements a hand-written client would use: stricter than the library's
  own statements, which update the session row twice in a turn (one call each).
- ``sessiondb-append``, 3: ``BEGIN`` with four ``SET LOCAL`` (one simple query); one
  statement taking the session's advisory lock, updating its counters and inserting
  the message (13 columns) ``RETURNING id``; ``COMMIT``.
- ``sessiondb``, 5: ``BEGIN``, the ``SET LOCAL`` and ``SAVEPOINT`` (one simple
  query); the append's statement as above; ``RELEASE SAVEPOINT`` and ``SAVEPOINT``
  (one simple query); the token call's advisory lock and ``UPDATE sessions`` (one
  statement); ``COMMIT``.

Readers are :mod:`.workers`' (the poller and the 500 ms reader), always through
sessiondb, so every client of a scenario runs beside the same read load. psycopg is
imported only by what talks to PostgreSQL directly.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .workers import Job, Library, Result, _begin, _end, message_text, write_turns

#: The library's default pool size: the plain psycopg client gets a pool this big.
POOL_SIZE = 8


@dataclass
class Group:
    """One writer process: ``jobs`` are its writer threads (one session each, or all
    the same one), sharing one ``client`` of the store at ``path``."""

    client: str               # "sessiondb" | "sessiondb-append" | "psycopg"
    path: str                 # a SQLite file or a postgresql:// URL with ?schema=
    jobs: list[Job]
    index: int


@dataclass
class GroupResult:
    index: int
    writers: list[Result] = field(default_factory=list)
    pool: dict[str, int] = field(default_factory=dict)
    pool_warnings: int = 0
    crashed: str = ""


def with_schema(url: str, schema: str) -> str:
    """``url`` naming the store's schema (sessiondb's ``?schema=`` parameter)."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
    return urlunsplit(parts._replace(query=urlencode(query + [("schema", schema)])))


def split_schema(url: str) -> tuple[str, str]:
    """The libpq URL (without ``schema=``, which libpq refuses) and the schema."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query)
    schema = next((v for k, v in reversed(pairs) if k == "schema"), "sessiondb")
    rest = urlencode([(k, v) for k, v in pairs if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


# -- the clients ------------------------------------------------------------------------

class AppendOnly(Library):
    """One ``append_message`` per write; nothing can be held inside it (``hold`` is
    ignored: use it where the scenario holds nothing)."""

    def write(self, session_id: str, text: str, hold: float) -> float:
        t0 = time.monotonic()
        self.db.append_message(session_id, "assistant", text)
        return time.monotonic() - t0


class PlainPsycopg:
    """The write through plain psycopg and a psycopg_pool pool (no retries, no lock
    timeout, no savepoints: the floor the library is measured against)."""

    def __init__(self, job: Job) -> None:
        import psycopg

        self.pool = _plain_pool(job)
        self.sqlite_version = f"psycopg {psycopg.__version__}"

    def write(self, session_id: str, text: str, hold: float) -> float:
        with self.pool.connection() as conn:
            conn.execute("BEGIN")
            try:
                held_from = time.monotonic()
                conn.execute(
                    "UPDATE sessions SET message_count = message_count + 1, input_tokens = "
                    "input_tokens + %s, output_tokens = output_tokens + %s WHERE id = %s",
                    (120, 40, session_id))
                conn.execute(
                    "INSERT INTO messages (session_id, role, content, timestamp) VALUES "
                    "(%s, %s, %s, %s) RETURNING id",
                    (session_id, "assistant", text, time.time())).fetchone()
                if hold:
                    time.sleep(hold)
                conn.execute("COMMIT")
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    pass  # a broken connection: the pool discards it
                raise
        return time.monotonic() - held_from

    def pool_stats(self) -> dict[str, int]:
        s = self.pool.get_stats()
        return {"size": POOL_SIZE, "waited": s.get("requests_queued", 0),
                "wait_timeouts": s.get("requests_errors", 0),
                "connections_lost": s.get("connections_lost", 0)}

    def close(self) -> None:
        self.pool.close()


class SameSql:
    """The statements of the library's ``transaction()`` turn (:class:`.workers.Library`),
    sent as they are through plain psycopg: what the library costs beyond its SQL.

    They are recorded once, from a turn of the library on a session of this process's
    own, at every ``psycopg.Connection.execute`` (the only way the library sends SQL),
    and replayed for each write with that session's id, lock key, text and timestamp
    replaced by the write's."""

    PROBE_TEXT = "the probe turn of the same-SQL client"

    def __init__(self, job: Job) -> None:
        import psycopg

        probe = f"probe-{job.index}"
        self.sent = _trace_turn(job.path, probe, self.PROBE_TEXT)
        self.probe = probe
        self.probe_key = _lock_arg(probe)
        self.pool = _plain_pool(job)
        self.sqlite_version = f"psycopg {psycopg.__version__}"

    def write(self, session_id: str, text: str, hold: float) -> float:
        swap = {self.probe: session_id, self.probe_key: _lock_arg(session_id),
                self.PROBE_TEXT: text}
        with self.pool.connection() as conn:
            held_from = time.monotonic()
            try:
                for query, args in self.sent:
                    if args is None:
                        if hold and query == "COMMIT":  # held as the library's turn
                            time.sleep(hold)
                        conn.execute(query)
                        continue
                    now = time.time()
                    # The probe's timestamp is the turn's one float argument.
                    conn.execute(query, [now if isinstance(a, float) else swap.get(a, a)
                                         if isinstance(a, (str, int)) else a for a in args])
            except BaseException:
                try:
                    conn.execute("ROLLBACK")
                except Exception:
                    pass
                raise
        return time.monotonic() - held_from

    pool_stats = PlainPsycopg.pool_stats
    close = PlainPsycopg.close


def _plain_pool(job: Job) -> Any:
    """A psycopg_pool pool of the library's default size on the store's schema."""
    from psycopg_pool import ConnectionPool

    url, schema = split_schema(job.path)
    pool = ConnectionPool(url, min_size=1, max_size=POOL_SIZE, timeout=30,
                          kwargs={"autocommit": True, "options": f"-c search_path={schema}"},
                          open=False, name=f"bench-psycopg-{job.index}")
    pool.open(wait=True, timeout=30)
    return pool


def _lock_arg(session_id: str) -> Any:
    """The advisory lock argument the library's statements carry for a session."""
    from ..pg.dialect import lock_key
    from ..backend import session_lock_key

    return lock_key(session_lock_key(session_id))


def _trace_turn(path: str, session_id: str, text: str) -> list[tuple[str, list | None]]:
    """``(query, arguments)`` of every statement a ``transaction()`` turn of the library
    (:meth:`.workers.Library.write`) sends, in order, on a new session ``session_id``."""
    import psycopg

    from .. import SessionDB

    sent: list[tuple[str, list | None]] = []
    original = psycopg.Connection.execute

    def record(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
        sent.append((query, None if params is None else list(params)))
        return original(self, query, params, **kw)

    with SessionDB(path, pool_size=1) as db:
        db.create_session(session_id, "bench")
        psycopg.Connection.execute = record  # type: ignore[method-assign]
        try:
            with db.transaction():
                db.append_message(session_id, "assistant", text)
                db.update_token_counts(session_id, 120, 40)
        finally:
            psycopg.Connection.execute = original  # type: ignore[method-assign]
    return sent


CLIENTS: dict[str, Callable[[Job], Any]] = {
    "sessiondb": Library, "sessiondb-append": AppendOnly, "psycopg": PlainPsycopg,
    "psycopg-same": SameSql,
}


def _pool_stats(runner: Any) -> dict[str, int]:
    if hasattr(runner, "pool_stats"):
        return runner.pool_stats()
    db = getattr(runner, "db", None)
    if db is None:
        return {}
    pool = db.stats().get("pool")  # PostgreSQL only; a SQLite store has no pool
    if not pool:
        return {}
    return {k: pool[k] for k in ("size", "waited", "wait_timeouts", "connections_lost")}


# -- the process body -------------------------------------------------------------------

def run_group(group: Group, start: Any, finish: Any, results: Any) -> None:
    """Entry point of a writer process (spawned); the barriers are those of
    :func:`.workers.run_job`. Puts one :class:`GroupResult` on ``results``."""
    from ..errors import PoolWarning

    out = GroupResult(group.index, [Result("writer", j.index) for j in group.jobs])
    seen = warnings.showwarning

    def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if issubclass(category, PoolWarning):
            out.pool_warnings += 1
        else:
            seen(message, category, *args, **kwargs)

    warnings.showwarning = show
    warnings.filterwarnings("always", category=PoolWarning)
    runner: Any = None
    try:
        runner = CLIENTS[group.client](group.jobs[0])
        for r in out.writers:  # the SQLite library's version, only where it is used
            r.sqlite_version = "" if "://" in group.path else runner.sqlite_version
        rngs = [random.Random(j.seed) for j in group.jobs]
        texts = [[message_text(rng) for _ in range(64)] for rng in rngs]
        end = _begin((start, finish), group.jobs[0].duration)
        try:
            _threads(group, out, runner, rngs, texts, end)
        finally:
            _end((start, finish))
            out.pool = _pool_stats(runner)
    except BaseException:  # report, never hang the parent
        out.crashed = traceback.format_exc()
        start.abort()
        finish.abort()
    finally:
        if runner is not None:
            try:
                runner.close()
            except Exception:
                pass
    results.put(out)


def _threads(group: Group, out: GroupResult, runner: Any, rngs: list[random.Random],
             texts: list[list[str]], end: float) -> None:
    """Every writer of the group at once, one thread each (the only one: this thread)."""
    crashes: list[str] = []

    def body(k: int) -> None:
        try:
            write_turns(group.jobs[k], out.writers[k], runner, rngs[k], texts[k], end)
        except BaseException:
            crashes.append(traceback.format_exc())

    if len(group.jobs) == 1:
        body(0)
    else:
        threads = [threading.Thread(target=body, args=(k,), name=f"writer-{job.index}")
                   for k, job in enumerate(group.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if crashes:
        raise RuntimeError(crashes[0])


# -- the parent's side: schemas and the check of a finished run --------------------------

def drop_schema(url: str) -> None:
    """Drop the store's schema (a benchmark run's own) if it exists."""
    import psycopg
    from psycopg import sql

    base, schema = split_schema(url)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            sql.Identifier(schema)))


def check_store(url: str, tokens: bool = True) -> tuple[str, int]:
    """``("ok", rows)`` when the writers' sessions' counters add up to their messages
    (and, with ``tokens``, their input tokens to 120 per message); otherwise what is off.
    rows: the writers' messages. The PostgreSQL counterpart of the SQLite benchmark's
    ``integrity_check`` and row count."""
    import psycopg

    base, schema = split_schema(url)
    with psycopg.connect(base, autocommit=True,
                         options=f"-c search_path={schema}") as conn:
        rows = conn.execute("SELECT count(*) FROM messages WHERE session_id LIKE 'w-%'"
                            ).fetchone()[0]
        counted, total_tokens = conn.execute(
            "SELECT COALESCE(sum(message_count), 0), COALESCE(sum(input_tokens), 0) "
            "FROM sessions WHERE id LIKE 'w-%'").fetchone()
    if counted != rows:
        return f"message_count {counted} != {rows} rows", rows
    if tokens and total_tokens != 120 * rows:
        return f"input_tokens {total_tokens} != 120 x {rows}", rows
    return "ok", rows


def server_info(url: str) -> dict[str, Any]:
    """The server's version and the settings that decide write throughput."""
    import psycopg

    base, _ = split_schema(url)
    names = ("fsync", "synchronous_commit", "shared_buffers", "max_connections",
             "wal_level", "full_page_writes", "max_wal_size", "commit_delay")
    with psycopg.connect(base, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(conn.execute(
            "SELECT name, setting || COALESCE(unit, '') FROM pg_settings WHERE name = "
            "ANY(%s) ORDER BY name", (list(names),)).fetchall())
    return {"server_version": version, "settings": settings,
            "psycopg": psycopg.__version__, "libpq": psycopg.pq.version(),
            "psycopg_impl": psycopg.pq.__impl__}
