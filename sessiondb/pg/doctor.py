"""Health checks of a store in PostgreSQL: what ``sessiondb doctor`` reports for a URL.

:func:`check` returns a :class:`PgDoctorReport` (a plain dict, JSON-ready) and never raises
for a server it cannot reach or a store it cannot open: every failure becomes a line in
``problems``. Before anything opens the store through :class:`~sessiondb.SessionDB`
(which creates the schema when it is missing), a plain connection looks whether there is
a store at all, so doctor never creates one.

What it reports:

- versions: the server's, psycopg's and the libpq it is built on;
- the store: schema name and version, sessions and message rows, and each session's
  ``message_count`` against its rows (the message total is the sum of the counters, see
  :mod:`sessiondb.pg.schema`, so this also checks the total);
- indexes: each index of the store's schema valid and ready (``pg_index.indisvalid``,
  ``indisready``: an index a failed ``CREATE INDEX CONCURRENTLY`` or ``REINDEX
  CONCURRENTLY`` left behind is neither used nor trustworthy), sessiondb's own indexes
  all present; tables: live and dead rows (how far behind autovacuum is), sizes;
- settings as the server sees them, twice: the default a new session of this role and
  database gets (``postgresql.conf``, ``ALTER DATABASE/ROLE ... SET``), and the values
  inside sessiondb's own write and read transactions, which set their timeouts with
  ``SET LOCAL`` (:meth:`sessiondb.pg.engine.PgEngine._begin`), so the server defaults do
  not apply to them but do to every other client of the database;
- connections: in use (and sessiondb's) against ``max_connections``, and the pool size
  of one sessiondb instance;
- ``advice``: settings that are unsafe for other clients or for capacity; advice is not a
  problem (the exit status stays 0).

``repair=True`` recounts the counters that disagree with the rows (each batch of
sessions in one short transaction that first locks their rows, so appends wait for it
and none is missed), rebuilds invalid indexes with ``REINDEX INDEX CONCURRENTLY``
(writes go on meanwhile; a leftover ``_ccnew``/``_ccold`` index of a failed concurrent
rebuild is dropped instead, as the PostgreSQL documentation recommends) and creates
missing sessiondb indexes with ``CREATE INDEX CONCURRENTLY``.
https://www.postgresql.org/docs/current/sql-reindex.html
"""

from __future__ import annotations

import platform
import re
from typing import Any, TypedDict

import psycopg

from .. import __version__
from ..errors import SessionDBError
from ..maintenance import ProgressCallback, Tracker
from ..backend import mask
from .urls import split_schema
from .bands import LEGACY as LEGACY_FTS_INDEX
from .schema import MIGRATIONS, SCHEMA_VERSION, check_schema_name, found_version

__all__ = ["PgDoctorReport", "check", "store_version"]

#: Settings reported, in the order shown.
SETTINGS = ("idle_in_transaction_session_timeout", "statement_timeout", "lock_timeout",
            "idle_session_timeout", "tcp_keepalives_idle", "tcp_keepalives_interval",
            "tcp_keepalives_count", "tcp_user_timeout")
#: Sessions whose counters are recounted per transaction by ``repair``.
RECOUNT_BATCH = 200
#: Dead rows above this share of live rows (and above DEAD_ROWS_AT) get advice.
DEAD_SHARE = 0.2
DEAD_ROWS_AT = 10_000
#: Share of max_connections in use above which doctor advises.
CONNECTIONS_WARN_AT = 0.8
#: Seconds after which the server's keepalives notice a vanished client too late to
#: be of use (Linux's default is 7,200).
KEEPALIVE_IDLE_ADVISED = 300

_INDEX_DDL = re.compile(r"CREATE (UNIQUE )?INDEX (\w+) ON (\w+)(.*?);", re.S)
_OWN_INDEXES = {m.group(2): m for ddl in MIGRATIONS for m in _INDEX_DDL.finditer(ddl)}
_WRONG_COUNTERS = (
    "SELECT s.id, s.message_count, coalesce(m.n, 0) FROM sessions s "
    "LEFT JOIN (SELECT session_id, count(*) AS n FROM messages GROUP BY session_id) m "
    "ON m.session_id = s.id WHERE s.message_count IS DISTINCT FROM coalesce(m.n, 0) "
    "AND s.id > ? ORDER BY s.id LIMIT ?")


class PgDoctorReport(TypedDict):
    """What :func:`check` found. Checks that could not run are ``None``.

    :ivar path: the URL checked, without its password.
    :ivar backend: ``"postgresql"``.
    :ivar ok: True when ``problems`` is empty.
    :ivar problems: one line per problem, saying what to do.
    :ivar advice: settings worth changing; not problems.
    :ivar versions: ``sessiondb``, ``python``, ``psycopg``, ``libpq``, ``server``.
    :ivar connected: whether the server answered.
    :ivar opened: whether the store opened.
    :ivar open_error: why not.
    :ivar schema: the PostgreSQL schema holding the store.
    :ivar schema_version: the store's (0: there is none), ``schema_supported`` this
        library's.
    :ivar sessions, messages: row counts.
    :ivar counters: ``"ok"`` or the sessions whose ``message_count`` is wrong.
    :ivar indexes: ``{"name", "table", "valid", "ready", "bytes"}`` per index of the schema.
    :ivar index_health: ``"ok"`` or what is wrong with them.
    :ivar tables: ``{"name", "live_rows", "dead_rows", "bytes", "last_autovacuum"}``.
    :ivar settings: per setting, ``server`` (the default a new session gets, with its
        ``source``) and ``write``/``read`` (inside sessiondb's transactions).
    :ivar client: the connection parameters sessiondb connects with (keepalives ...),
        and ``transport`` (``"tcp"`` or ``"unix"``).
    :ivar connections: ``max_connections``, ``reserved``, ``in_use``, ``sessiondb`` (of
        them, with sessiondb's application name) and ``pool_size`` (one instance's).
    :ivar repaired: with ``repair=True``: ``counters_fixed`` (sessions recounted),
        ``reindexed``, ``dropped``, ``created`` (index names).
    """

    path: str
    backend: str
    ok: bool
    problems: list[str]
    advice: list[str]
    versions: dict[str, str]
    connected: bool
    opened: bool
    open_error: str | None
    schema: str
    schema_version: int | None
    schema_supported: int
    sessions: int | None
    messages: int | None
    counters: str | None
    indexes: list[dict[str, Any]]
    index_health: str | None
    tables: list[dict[str, Any]]
    settings: dict[str, dict[str, Any]]
    client: dict[str, Any]
    connections: dict[str, Any]
    repaired: dict[str, Any] | None


def store_version(url: str) -> tuple[str, int]:
    """Where a URL's store is (the URL without password, and its schema) and its schema
    version (0: there is no store), looked up without creating anything.

    :raises DatabaseOpenError: the server cannot be reached.
    """
    from ..errors import DatabaseOpenError
    plain, schema = _target(url)
    where = f"{mask(plain)} (schema {schema!r})"
    try:
        with _connect(plain) as raw:
            return where, found_version(raw, schema)
    except psycopg.Error as exc:
        raise DatabaseOpenError(f"cannot connect to {where}: {str(exc).strip()}",
                                where) from exc


def check(url: str, *, repair: bool = False, progress: ProgressCallback | None = None
          ) -> PgDoctorReport:
    """Check the store at ``url`` (a ``postgresql://`` URL, ``?schema=`` honoured) and
    report; see the module docstring.

    :param repair: recount wrong counters, rebuild invalid indexes, create missing ones.
    :param progress: called during the recount (task ``"recount"``, unit ``"sessions"``).
    :returns: the report; ``report["ok"]`` is False when any problem was found.
    """
    from ..store import SessionDB  # the store imports the engine, not the other way
    plain, schema = _target(url)
    report = _empty_report(mask(plain), schema)
    try:
        with _connect(plain) as raw:
            report["connected"] = True
            _server(raw, report)
            found = found_version(raw, schema)
    except psycopg.Error as exc:
        report["problems"].append(f"cannot connect to {report['path']}: "
                                  f"{str(exc).strip()}")
        return _finish(report)
    report["schema_version"] = found
    if found == 0:
        report["problems"].append(
            f"no sessiondb store in schema {schema!r} of {report['path']} (nothing was "
            "created; opening it with SessionDB creates one)")
        return _finish(report)
    try:
        db = SessionDB(url)
    except SessionDBError as exc:
        report["open_error"] = str(exc)
        report["problems"].append(str(exc))
        return _finish(report)
    report["opened"] = True
    with db:
        report["connections"]["pool_size"] = db.stats()["pool"]["size"]
        if repair:
            report["repaired"] = _repair(db, plain, schema, progress)
        _inspect(db, report)
    _advise(report)
    return _finish(report)


# -- connecting ------------------------------------------------------------------------

def _target(url: str) -> tuple[str, str]:
    plain, in_url = split_schema(url)
    return plain, check_schema_name(in_url or "sessiondb")


def _connect(url: str) -> psycopg.Connection:
    """A plain connection of doctor's own (autocommit: ``REINDEX CONCURRENTLY`` cannot
    run in a transaction block), nothing set in its session."""
    return psycopg.connect(url, autocommit=True, connect_timeout=10,
                           application_name="sessiondb doctor")


def _libpq() -> str:
    return _version(psycopg.pq.version())


def _version(number: int) -> str:
    """PostgreSQL's version number as text (150020 -> 15.20; 90624 -> 9.6.24)."""
    if number >= 100000:
        return f"{number // 10000}.{number % 100}"
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


# -- the checks -------------------------------------------------------------------------

_SETTINGS_SQL = ("SELECT name, setting, unit, current_setting(name), source FROM pg_settings "
                 "WHERE name = ANY(%s)")


def _server(raw: psycopg.Connection, report: PgDoctorReport) -> None:
    """What a new session of this role and database gets, and the connections."""
    report["versions"]["server"] = _version(raw.info.server_version)
    found = {row[0]: row for row in raw.execute(_SETTINGS_SQL, [list(SETTINGS)])}
    for name in SETTINGS:  # in this order; a setting the server lacks is left out
        if name in found:
            _, setting, unit, shown, source = found[name]
            report["settings"][name] = {"server": shown, "server_ms": _ms(setting, unit),
                                        "source": source, "write": None, "read": None}
    names = ["max_connections", "superuser_reserved_connections", "reserved_connections"]
    values = {n: int(v) for n, v in raw.execute(
        "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", [names])}
    in_use, ours = raw.execute(
        "SELECT count(*), count(*) FILTER (WHERE application_name = 'sessiondb') "
        "FROM pg_stat_activity WHERE backend_type = 'client backend'").fetchone()
    report["connections"].update(
        max_connections=values.get("max_connections"),
        reserved=values.get("superuser_reserved_connections", 0)
        + values.get("reserved_connections", 0),
        in_use=in_use, sessiondb=ours)


def _inspect(db: Any, report: PgDoctorReport) -> None:
    problems = report["problems"]

    def guarded(name: str, fn: Any) -> Any:
        try:
            return fn()
        except SessionDBError as exc:
            problems.append(f"{name}: {exc}")
            return None

    def applied(conn: Any) -> tuple[dict[str, str], dict[str, Any]]:
        shown = {name: value for name, _, _, value, _ in conn.raw.execute(
            _SETTINGS_SQL, [list(SETTINGS)])}
        info = conn.raw.info
        params = {k: v for k, v in info.get_parameters().items()
                  if k.startswith(("keepalives", "connect_timeout", "application_name"))}
        params["transport"] = "unix" if (info.host or "").startswith("/") else "tcp"
        return shown, params

    # A write that writes nothing: the settings as every write transaction has them.
    written = guarded("reading the settings of a write", lambda: db._execute_write(applied))
    read = guarded("reading the settings of a read", lambda: db._read(applied))
    for kind, found in (("write", written), ("read", read)):
        for name, value in (found[0] if found else {}).items():
            report["settings"].setdefault(name, {})[kind] = value
    if read:
        report["client"] = read[1]

    counts = guarded("counting", lambda: db._read(lambda c: c.execute(
        "SELECT (SELECT count(*) FROM sessions), (SELECT count(*) FROM messages)"
    ).fetchone(), snapshot=True))
    if counts:
        report["sessions"], report["messages"] = int(counts[0]), int(counts[1])
    wrong = guarded("counter check", lambda: db._read(
        lambda c: c.execute(_WRONG_COUNTERS, ("", 5)).fetchall()))
    if wrong is not None:
        report["counters"] = "ok" if not wrong else "; ".join(
            f"{sid}: message_count {count}, {n} messages" for sid, count, n in wrong)
        if wrong:
            problems.append(f"message counters disagree with the messages: "
                            f"{report['counters']}; run `sessiondb doctor --repair` to "
                            "recount them")

    schema = report["schema"]
    indexes = guarded("index check", lambda: db._read(lambda c: _indexes(c, schema)))
    if indexes is not None:
        report["indexes"] = indexes
        bad = [f"{i['name']} is {'not valid' if not i['valid'] else 'not ready'}"
               for i in indexes if not (i["valid"] and i["ready"])]
        missing = _missing(indexes)
        bad += [f"{name} is missing" for name in missing]
        report["index_health"] = "ok" if not bad else "; ".join(bad)
        if bad:
            problems.append(f"indexes: {report['index_health']}; run `sessiondb doctor "
                            "--repair` to rebuild them (writes go on meanwhile)")
    tables = guarded("table statistics", lambda: db._read(lambda c: _tables(c, schema)))
    report["tables"] = tables or []


def _missing(indexes: list[dict[str, Any]]) -> list[str]:
    """sessiondb's own indexes absent from ``indexes``; ``idx_messages_fts`` is not
    missing where the bands that replace it are (a tail, see
    :mod:`sessiondb.pg.bands`)."""
    names = {i["name"] for i in indexes}
    if any(re.match(r"messages_fts_t\d+$", name) for name in names):
        names.add(LEGACY_FTS_INDEX)
    return sorted(set(_OWN_INDEXES) - names)


def _indexes(conn: Any, schema: str) -> list[dict[str, Any]]:
    rows = conn.raw.execute(
        "SELECT c.relname, t.relname, i.indisvalid, i.indisready, pg_relation_size(c.oid) "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s ORDER BY t.relname, c.relname", [schema]).fetchall()
    return [{"name": name, "table": table, "valid": valid, "ready": ready, "bytes": size}
            for name, table, valid, ready, size in rows]


def _tables(conn: Any, schema: str) -> list[dict[str, Any]]:
    rows = conn.raw.execute(
        "SELECT relname, n_live_tup, n_dead_tup, pg_total_relation_size(relid), "
        "greatest(last_autovacuum, last_vacuum)::text FROM pg_stat_user_tables "
        "WHERE schemaname = %s ORDER BY relname", [schema]).fetchall()
    return [{"name": name, "live_rows": live, "dead_rows": dead, "bytes": size,
             "last_autovacuum": vacuumed} for name, live, dead, size, vacuumed in rows]


# -- advice -----------------------------------------------------------------------------

def _advise(report: PgDoctorReport) -> None:
    advice, settings = report["advice"], report["settings"]

    def server_ms(name: str) -> int | None:
        return settings.get(name, {}).get("server_ms")

    if server_ms("idle_in_transaction_session_timeout") == 0:
        write = settings["idle_in_transaction_session_timeout"].get("write")
        advice.append(
            "idle_in_transaction_session_timeout is 0 (off) for this database: sessiondb "
            f"sets it in each write transaction ({write}), but other clients (psql, "
            "scripts, ORMs) are unprotected: one that stops mid-transaction holds its "
            "locks, and sessiondb's writers wait for them, until it is killed. Consider "
            "ALTER DATABASE ... SET idle_in_transaction_session_timeout = '60s'")
    idle_session = server_ms("idle_session_timeout")
    if idle_session:
        advice.append(
            f"idle_session_timeout is {settings['idle_session_timeout']['server']}: the "
            "server ends connections idle that long, and sessiondb's pool keeps idle "
            "connections open (up to 10 minutes), so the first call after a quiet spell "
            "fails with ConnectionLost. Set it to 0 for sessiondb's role (ALTER ROLE ... "
            "SET idle_session_timeout = 0), or above 10 minutes")
    idle = server_ms("tcp_keepalives_idle")
    if report["client"].get("transport") == "tcp" and idle is not None \
            and idle > KEEPALIVE_IDLE_ADVISED * 1000:
        interval = settings.get("tcp_keepalives_interval", {}).get("server", "?")
        count = settings.get("tcp_keepalives_count", {}).get("server", "?")
        advice.append(
            f"the server's TCP keepalives start after {idle // 1000:,}s idle (interval "
            f"{interval}, {count} probes): a client host that vanishes keeps its "
            "connections (and max_connections slots) for hours. sessiondb's own "
            "connections find a dead server within ~20 s (client keepalives), and its "
            "transactions are ended by idle_in_transaction_session_timeout; for the "
            "slots, consider tcp_keepalives_idle = 60, tcp_keepalives_interval = 10, "
            "tcp_keepalives_count = 6 (or tcp_user_timeout)")
    conns = report["connections"]
    top, pool = conns.get("max_connections"), conns.get("pool_size")
    if top and pool:
        usable = top - (conns.get("reserved") or 0)
        if (conns.get("in_use") or 0) >= CONNECTIONS_WARN_AT * usable:
            advice.append(f"{conns['in_use']} of {usable} usable connections are in use "
                          "(max_connections less reserved): new processes may be refused; "
                          "put a pooler (PgBouncer, transaction mode, pooler=True) in "
                          "front or raise max_connections")
        if pool > usable:
            report["problems"].append(
                f"pool_size {pool} is more than the {usable} connections the server "
                "allows: lower pool_size")
    for table in report["tables"]:
        live, dead = table["live_rows"] or 0, table["dead_rows"] or 0
        if dead > DEAD_ROWS_AT and dead > DEAD_SHARE * max(live, 1):
            advice.append(f"table {table['name']} has {dead:,} dead rows for {live:,} live "
                          "ones: autovacuum is behind (a long transaction holding old "
                          "snapshots, or autovacuum settings too lax)")


# -- repair -----------------------------------------------------------------------------

def _repair(db: Any, url: str, schema: str, progress: ProgressCallback | None
            ) -> dict[str, Any]:
    done: dict[str, Any] = {"counters_fixed": _recount(db, progress), "reindexed": [],
                            "dropped": [], "created": []}
    indexes = db._read(lambda c: _indexes(c, schema))
    broken = [i["name"] for i in indexes if not (i["valid"] and i["ready"])]
    missing = _missing(indexes)
    if not broken and not missing:
        return done
    with _connect(url) as raw:
        for name in broken:
            if re.search(r"_cc(new|old)\d*$", name):
                # What a failed REINDEX CONCURRENTLY leaves: the original is still there.
                raw.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{schema}"."{name}"')
                done["dropped"].append(name)
            else:
                raw.execute(f'REINDEX INDEX CONCURRENTLY "{schema}"."{name}"')
                done["reindexed"].append(name)
        for name in missing:
            m = _OWN_INDEXES[name]
            raw.execute(f"CREATE {m.group(1) or ''}INDEX CONCURRENTLY IF NOT EXISTS "
                        f'"{name}" ON "{schema}"."{m.group(3)}"{m.group(4)}')
            done["created"].append(name)
    return done


def _recount(db: Any, progress: ProgressCallback | None) -> int:
    """Set each wrong ``message_count`` to its rows, a batch of sessions per short
    transaction; returns the sessions fixed."""
    tracker = Tracker("recount", "sessions", None, progress)
    after, fixed = "", 0
    while True:
        wrong = db._read(lambda c: c.execute(_WRONG_COUNTERS, (after, RECOUNT_BATCH))
                         .fetchall())
        if not wrong:
            return fixed
        ids = [row[0] for row in wrong]

        def fix(conn: Any) -> int:
            # Lock the rows first, then count in the next statement: under READ
            # COMMITTED it sees every append that held a lock before ours (an append
            # updates the counter, locking the row, before it inserts). Counting in the
            # UPDATE itself would count with the snapshot from before the lock wait.
            conn.execute("SELECT id FROM sessions WHERE id IN "
                         f"{db._sql.in_list} ORDER BY id FOR UPDATE",
                         (db._sql.list_arg(ids),))
            conn.execute("UPDATE sessions s SET message_count = (SELECT count(*) FROM "
                         f"messages m WHERE m.session_id = s.id) WHERE s.id IN "
                         f"{db._sql.in_list}", (db._sql.list_arg(ids),))
            return conn.changes()

        fixed += db._execute_write(fix)
        tracker.add(len(ids))
        after = ids[-1]


# -- report plumbing --------------------------------------------------------------------

def _ms(setting: str | None, unit: str | None) -> int | None:
    """A time setting in milliseconds (None for others)."""
    factor = {"ms": 1, "s": 1000, "min": 60_000}.get(unit or "")
    try:
        return int(float(setting or 0) * factor) if factor else None
    except ValueError:
        return None


def _empty_report(path: str, schema: str) -> PgDoctorReport:
    return PgDoctorReport(
        path=path, backend="postgresql", ok=False, problems=[], advice=[],
        versions={"sessiondb": __version__, "python": platform.python_version(),
                  "psycopg": psycopg.__version__, "libpq": _libpq()},
        connected=False, opened=False, open_error=None, schema=schema,
        schema_version=None, schema_supported=SCHEMA_VERSION, sessions=None,
        messages=None, counters=None, indexes=[], index_health=None, tables=[],
        settings={}, client={}, connections={}, repaired=None)


def _finish(report: PgDoctorReport) -> PgDoctorReport:
    report["ok"] = not report["problems"]
    return report
