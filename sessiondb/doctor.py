"""Health checks of a store: what ``sessiondb doctor`` reports, as a library call.

:func:`check` returns a :class:`DoctorReport` (a plain dict, JSON-ready) and never raises
for a damaged or unopenable store: every failure becomes a line in ``problems``. The
files are only ever touched through SQLite; sizes come from ``os.stat`` (opening the
database, ``-wal`` or ``-shm`` file with ``open()`` and closing it again would drop this
process's POSIX locks on the database, see :mod:`sessiondb.connection`).

Before anything opens the file read-write, a read-only connection makes sure that doing
so changes nothing: opening a :class:`SessionDB` switches the file to WAL and creates the
schema, which doctor must not do to a file that is not (yet) a sessiondb store.

Checks, in order: the filesystem of the store's directory (:mod:`sessiondb.filesystems`:
on one where WAL is unsafe, nothing is opened unless the store's processes opted in to
the rollback journal), no marker says the store's ``-wal`` was deleted while in use
(:mod:`sessiondb.walguard`) or that the file was replaced under a live process
(:mod:`sessiondb.replacement`), the file opens as a sessiondb store (not empty, not
another application's, schema not newer than this library), ``PRAGMA integrity_check``,
the FTS5 index against the ``messages`` table (``'integrity-check'`` command with
``rank = 1``,
https://sqlite.org/fts5.html#the_integrity_check_command),
``PRAGMA foreign_key_check``, each session's ``message_count`` against its messages, and
the store's message total (kept by triggers, see :mod:`sessiondb.schema`) against them.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path
from typing import Any, Sequence, TypedDict

import apsw

from . import __version__, filesystems, fts_tables, replacement, search_index
from .backend import is_url
from .connection import ENV_PATH, _open_advice, default_path, refuse_empty_file
from .errors import (
    ConfigurationError, DatabaseOpenError, FilesystemWarning, SchemaTooNewError,
    SessionDBError,
)
from .maintenance import ProgressCallback
from .schema import (
    MESSAGE_TOTAL_SQL, SCHEMA_VERSION, _refuse_foreign, _refuse_newer, application_id,
    refuse_foreign_application, user_version,
)
from .store import SessionDB
from .walguard import refuse_marked

__all__ = ["DoctorReport", "check", "rebuild_search_index"]

# rank = 1 also compares the index with the external content table (the messages); the
# plain command checks only the index's internal structure and passes an index that has
# drifted from the messages (https://sqlite.org/fts5.html#the_integrity_check_command).
_COUNTER_CHECK = (
    "SELECT id, message_count, n FROM (SELECT s.id, s.message_count, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) AS n FROM sessions s) "
    "WHERE message_count IS NOT n LIMIT 5"
)
_TOTAL_CHECK = f"SELECT ({MESSAGE_TOTAL_SQL}), (SELECT COUNT(*) FROM messages)"
_TOTAL_RECOUNT = ("UPDATE sessiondb_totals SET value = (SELECT COUNT(*) FROM messages) "
                  "WHERE name = 'messages'")
_MAX_LINES = 10  # of integrity_check output kept in the report


class DoctorReport(TypedDict):
    """What :func:`check` found. Checks that could not run are ``None``.

    :ivar path: the database path checked.
    :ivar ok: True when ``problems`` is empty.
    :ivar problems: one line per problem, saying what to do where there is something to do.
    :ivar versions: ``sessiondb``, ``sqlite``, ``apsw``, ``python``.
    :ivar exists: whether the file existed (a missing file is reported, not created).
    :ivar opened: whether it opened as a sessiondb store.
    :ivar open_error: the error text when it did not.
    :ivar integrity: ``"ok"`` or the first lines ``PRAGMA integrity_check`` returned.
    :ivar fts_index: ``"ok"`` or why the full-text index does not match the messages.
    :ivar foreign_keys: ``"ok"`` or the violations found.
    :ivar counters: ``"ok"`` or the sessions whose ``message_count`` is wrong, and the
        message total when it is wrong.
    :ivar journal_mode: e.g. ``"wal"``.
    :ivar schema_version: ``PRAGMA user_version`` of the file.
    :ivar schema_supported: the newest schema this library knows.
    :ivar page_size, page_count, freelist_count: from the pragmas of the same names.
    :ivar db_bytes: size of the database file.
    :ivar wal_bytes: size of the ``-wal`` file as found (0 when absent).
    :ivar sidecars: ``{"name", "bytes"}`` of each file next to the database whose name
        starts with the database's name (``-wal``, ``-shm``, the write gate ...), as found.
    :ivar sessions, messages: row counts.
    :ivar gate: the write gate in use (``"ofd"``, ``"posix"`` or ``"none"``).
    :ivar filesystem: the filesystem of the store's directory
        (:meth:`sessiondb.filesystems.Filesystem.as_dict`: ``type``, ``magic``,
        ``mount_point``, ``source``, ``verdict``, ``reason``, ``directory``).
    :ivar application_id: ``PRAGMA application_id`` of the file (sessiondb's is
        :data:`sessiondb.schema.APPLICATION_ID`; 0 until a sessiondb opens it).
    :ivar replaced: the record a process left when the file was replaced while it had
        the store open (:mod:`sessiondb.replacement`), or None.
    :ivar repaired: with ``repair=True``, the full-text index state before the rebuild
        (``fts_index_before``) and the message total before it was recounted
        (``message_total_before``: ``"ok"`` or what was wrong).
    """

    path: str
    ok: bool
    problems: list[str]
    versions: dict[str, str]
    exists: bool
    opened: bool
    open_error: str | None
    integrity: str | None
    fts_index: str | None
    foreign_keys: str | None
    counters: str | None
    journal_mode: str | None
    schema_version: int | None
    schema_supported: int
    page_size: int | None
    page_count: int | None
    freelist_count: int | None
    db_bytes: int | None
    wal_bytes: int
    sidecars: list[dict[str, Any]]
    sessions: int | None
    messages: int | None
    gate: str | None
    filesystem: dict[str, Any]
    application_id: int | None
    replaced: dict[str, Any] | None
    repaired: dict[str, str | None] | None


def check(path: str | os.PathLike[str] | None = None, *, repair: bool = False,
          deep: bool = False, prefixes: Sequence[int] | None = None,
          progress: ProgressCallback | None = None) -> DoctorReport:
    """Check the store at ``path`` (``None``: the default path) and report.

    A PostgreSQL URL (given, or in ``$SESSIONDB_PATH``) is checked by
    :func:`sessiondb.pg.doctor.check`, whose report has its own fields
    (:class:`~sessiondb.pg.doctor.PgDoctorReport`; ``path``, ``ok``, ``problems`` and
    ``versions`` as here); ``deep`` does not apply there.

    A missing file is reported, never created. A file that does not open as a sessiondb
    store (not SQLite, damaged header, schema newer than this library) is reported with
    the reason and left as it was.

    :param repair: rebuild the full-text index from the ``messages`` table and recount the
        message total before checking (messages are not touched; the state found before
        is in ``repaired``); the rebuild runs in short steps while other processes keep
        writing, and finishes one that was cut short; then the index's sealed tables are
        merged (:meth:`SessionDB.optimize_search_index`), in steps too.
    :param deep: compare the full-text index with every message also on a store of
        over 100,000 messages (it holds the write lock while it reads the whole index).
    :param prefixes: with ``repair``, the prefix index lengths of the rebuilt index
        (:meth:`SessionDB.rebuild_search_index`); None keeps the current ones.
    :param progress: called with a :class:`~sessiondb.maintenance.Progress` during long
        work (the rebuild and the merge; finishing a conversion when the store is opened).
    :returns: the report; ``report["ok"]`` is False when any problem was found.
    :raises ConfigurationError: ``prefixes`` given for a PostgreSQL store (they are
        SQLite's full-text index's).
    """
    url = path if path is not None else os.environ.get(ENV_PATH)
    if is_url(url):
        if prefixes is not None:
            raise ConfigurationError("prefix indexes belong to SQLite's full-text index; "
                                     "a PostgreSQL store has none")
        from .pg import doctor as pg_doctor  # psycopg is imported only for a URL
        report = pg_doctor.check(str(url), repair=repair, progress=progress)
        return report  # type: ignore[return-value]
    target = Path(os.path.abspath(Path(path).expanduser() if path is not None
                                  else default_path()))
    report = _empty_report(target)
    _files(target, report)
    fs = filesystems.examine(target)
    report["filesystem"] = fs.as_dict()
    report["replaced"] = replacement.read_marker(target)
    if not report["exists"]:
        report["problems"].append(f"no database at {target} (nothing was created)")
        return _finish(report)
    try:
        with warnings.catch_warnings():  # an unknown filesystem: the report says it
            warnings.simplefilter("ignore", FilesystemWarning)
            # On an unsafe filesystem even a read-only look maps the -shm: refuse first.
            filesystems.use_journal(str(target), fs, filesystems.policy(None))
            refuse_marked(target)
            replacement.refuse_replaced(target)
            _probe(target, report)
            db = SessionDB(target, progress=progress)
    except SchemaTooNewError as exc:
        report["schema_version"] = exc.found
        return _open_failed(report, exc)
    except DatabaseOpenError as exc:
        return _open_failed(report, exc)
    except SessionDBError as exc:  # e.g. a CorruptDatabaseError while reading the schema
        return _open_failed(report, exc)
    report["opened"] = True
    with db:
        if repair:
            report["repaired"] = {"fts_index_before": _fts_state(db, deep),
                                  "message_total_before": _total_state(db)}
            db.rebuild_search_index(prefixes=prefixes, progress=progress)
            db._execute_write(lambda conn: conn.execute(_TOTAL_RECOUNT))
            db.optimize_search_index(progress=progress)
        _inspect(db, report, deep)
    return _finish(report)


def _probe(path: Path, report: DoctorReport) -> None:
    """Refuse, through a read-only connection, what opening a :class:`SessionDB` would
    modify: a file that is not SQLite, a newer schema, another application's database or
    an empty one (opening switches the file to WAL and creates the schema).

    :raises DatabaseOpenError: the file is not a sessiondb store (yet).
    :raises SchemaTooNewError: the schema is newer than this library.
    """
    refuse_empty_file(path)
    try:
        conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.Error as exc:
        raise DatabaseOpenError(_open_advice(path, exc), str(path)) from exc
    try:
        report["application_id"] = application_id(conn)
        refuse_foreign_application(path, report["application_id"])
        found = user_version(conn)
        report["schema_version"] = found
        _refuse_newer(path, found)
        if found == 0:
            _refuse_foreign(conn, path)
            raise DatabaseOpenError(
                f"{path} has no sessiondb schema yet (an empty database); nothing was "
                "changed. Opening it with SessionDB creates the schema", str(path))
    except apsw.Error as exc:
        raise DatabaseOpenError(_open_advice(path, exc), str(path)) from exc
    finally:
        conn.close()


def rebuild_search_index(db: SessionDB) -> None:
    """Rebuild the FTS5 index from the ``messages`` table (which is only read), and clear
    the mark a write left when it found the index damaged (:mod:`sessiondb.search_index`).

    :raises SessionDBError: the rebuild failed (e.g. the messages table itself is damaged).
    """
    db.rebuild_search_index()


# -- the checks -----------------------------------------------------------------------

def _inspect(db: SessionDB, report: DoctorReport, deep: bool) -> None:
    problems = report["problems"]

    def guarded(name: str, fn: Any) -> Any:
        try:
            return fn()
        except SessionDBError as exc:
            problems.append(f"{name}: {exc}")
            return None

    pragmas = guarded("reading the database header", lambda: db._read(_pragmas))
    if pragmas:
        report.update(pragmas)  # type: ignore[typeddict-item]
    gate = guarded("stats", db.stats)
    report["gate"] = gate["gate"] if gate else None

    lines = guarded("integrity check", lambda: db._read(
        lambda c: [str(r[0]) for r in c.execute("PRAGMA integrity_check")]))
    if lines is not None:
        report["integrity"] = "ok" if lines == ["ok"] else "\n".join(lines[:_MAX_LINES])
        if report["integrity"] != "ok":
            problems.append("PRAGMA integrity_check found damage: "
                            + "; ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")
                            + "; restore from a backup or export what still reads")

    report["fts_index"] = _fts_state(db, deep)
    if report["fts_index"] not in ("ok", NOT_CHECKED):
        problems.append(f"full-text index: {report['fts_index']}; messages are intact: run "
                        f"`sessiondb doctor --repair --db {report['path']}` to rebuild it")

    fks = guarded("foreign key check", lambda: db._read(
        lambda c: c.execute("PRAGMA foreign_key_check").fetchall()))
    if fks is not None:
        report["foreign_keys"] = "ok" if not fks else "; ".join(
            f"{table} row {rowid} -> {parent}" for table, rowid, parent, _ in fks[:5])
        if fks:
            problems.append(f"{len(fks)} row(s) reference missing rows: "
                            f"{report['foreign_keys']}")

    wrong = guarded("counter check", lambda: db._read(
        lambda c: c.execute(_COUNTER_CHECK).fetchall()))
    if wrong is not None:
        report["counters"] = "ok" if not wrong else "; ".join(
            f"{sid}: message_count {count}, {n} messages" for sid, count, n in wrong)
        if wrong:
            problems.append(f"message counters disagree with the messages: "
                            f"{report['counters']}")

    total = _total_state(db)
    if total != "ok":
        report["counters"] = total if report["counters"] in (None, "ok") else \
            f"{report['counters']}; {total}"
        problems.append(f"{total}: run `sessiondb doctor --repair --db {report['path']}` "
                        "to recount it")

    report["sessions"] = guarded("counting sessions", db.session_count)
    report["messages"] = guarded("counting messages", db.message_count)


def _pragmas(conn: apsw.Connection) -> dict[str, Any]:
    return {
        "application_id": application_id(conn),
        "journal_mode": str(conn.pragma("journal_mode")),
        "schema_version": int(conn.pragma("user_version")),
        "page_size": int(conn.pragma("page_size")),
        "page_count": int(conn.pragma("page_count")),
        "freelist_count": int(conn.pragma("freelist_count")),
    }


def _total_state(db: SessionDB) -> str:
    """``"ok"``, how the message total differs from the messages, or why it could not
    be read."""
    try:
        total, actual = db._read(lambda c: c.execute(_TOTAL_CHECK).fetchone(),
                                 snapshot=True)
    except SessionDBError as exc:
        return f"the message total could not be read ({exc})"
    return "ok" if total == actual else \
        f"the message total says {total}, the store has {actual} messages"


def _fts_state(db: SessionDB, deep: bool = True) -> str:
    """``"ok"`` or why the index does not match. The check is an FTS5 *command*, which
    SQLite spells as an INSERT, so it runs on the write path like any statement that
    looks like a mutation (it changes nothing) and holds the write lock while it reads
    the whole index: about a second per 100,000 messages. On a larger store it runs only
    when asked (``deep``), exempt from the hold bound; otherwise the index is reported
    as not checked."""
    try:
        note = db._read(search_index.damage_note)
        if note is not None:
            return f"marked damaged ({note}); it misses newer messages"
        why = db._read(search_index.rebuilding)
        pending = db._read(search_index.pending_ids)
        if why is not None:
            return f"being rebuilt ({why}): up to {pending:,} messages still to index"
        if pending:
            return (f"up to {pending:,} messages not indexed yet (a bulk import in "
                    "progress, or one that was cut short)")
        if not deep and db._read(lambda c: c.execute(
                "SELECT count(*) > ? FROM (SELECT 1 FROM messages LIMIT ?)",
                (DEEP_CHECK_AT, DEEP_CHECK_AT + 1)).fetchone()[0]):
            return NOT_CHECKED
        db._execute_write(_check_index, bounded=False)
    except SessionDBError as exc:
        cause = exc.__cause__ or exc
        return f"does not match the messages ({cause})"
    return "ok"


def _check_index(conn: Any) -> None:
    for sql in fts_tables.checks(conn):
        conn.execute(sql)


#: Stores with more messages get the full-text content check only with ``deep``.
DEEP_CHECK_AT = 100_000
NOT_CHECKED = (f"not compared with the messages (over {DEEP_CHECK_AT:,} messages: the "
               "check would stop every writer for seconds; run doctor --deep)")


def _files(path: Path, report: DoctorReport) -> None:
    """Sizes by ``os.stat`` only: nothing here opens a file."""
    try:
        report["db_bytes"] = os.stat(path).st_size
        report["exists"] = path.is_file()
    except OSError:
        report["exists"] = False
    try:
        entries = sorted(os.scandir(path.parent), key=lambda e: e.name)
    except OSError:
        entries = []
    for entry in entries:
        if entry.name.startswith(path.name) and entry.name != path.name:
            try:
                size = entry.stat().st_size
            except OSError:
                continue
            report["sidecars"].append({"name": entry.name, "bytes": size})
            if entry.name == path.name + "-wal":
                report["wal_bytes"] = size


# -- report plumbing ------------------------------------------------------------------

def _empty_report(path: Path) -> DoctorReport:
    return DoctorReport(
        path=str(path), ok=False, problems=[], versions=_versions(), exists=False,
        opened=False, open_error=None, integrity=None, fts_index=None, foreign_keys=None,
        counters=None, journal_mode=None, schema_version=None,
        schema_supported=SCHEMA_VERSION, page_size=None, page_count=None,
        freelist_count=None, db_bytes=None, wal_bytes=0, sidecars=[], sessions=None,
        messages=None, gate=None, filesystem={}, application_id=None, replaced=None,
        repaired=None,
    )


def _versions() -> dict[str, str]:
    return {"sessiondb": __version__, "sqlite": apsw.sqlite_lib_version(),
            "apsw": apsw.apsw_version(), "python": platform.python_version()}


def _open_failed(report: DoctorReport, exc: SessionDBError) -> DoctorReport:
    report["open_error"] = str(exc)
    where = getattr(exc, "path", report["path"])
    text = str(exc)
    report["problems"].append(text if where in text else f"{where}: {text}")
    return _finish(report)


def _finish(report: DoctorReport) -> DoctorReport:
    report["ok"] = not report["problems"]
    return report
