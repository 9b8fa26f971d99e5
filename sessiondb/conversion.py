"""Opening a store: the migration ladder, and the in-place conversion of a hermes-agent
``state.db`` as an online table rebuild in short steps.

:func:`ensure_schema` brings a store to :data:`~sessiondb.schema.SCHEMA_VERSION`. A
``filelock`` sidecar (``<db>.sessiondb-migrate.lock``) makes the processes that open
the same file at once take turns at its structural steps: the first makes them, the
others find them done. ``filelock`` polls, which is right for a once-per-file event and
wrong for the hot write path (that is what :mod:`sessiondb.gate` is for).

A hermes-agent file gets sessiondb's messages table by a copy, not by altering its own:
sessiondb's message indexes cannot be added to a table of a million messages without
one statement that scans it all (SQLite builds an index in one go: 1.2-2.2 s under the
write lock, measured), and every writer would wait that long. Instead, each step a
short write transaction:

1. :func:`begin`: hermes-agent's own column steps (an older file), then a new, empty
   table (``sessiondb_messages_new``, sessiondb's columns and indexes, the message total
   kept by its triggers) and triggers on hermes-agent's table that keep the rows copied
   so far equal to their originals (below). hermes-agent's ``idx_messages_session`` is
   dropped, since the new table's index takes its name (SQLite cannot rename an index;
   rejected: editing the schema table with ``PRAGMA writable_schema``, which SQLite
   documents as a way to corrupt a file). Dropping it reads every page it frees: they
   are read first, outside the write lock (:func:`_warm`).
2. sessiondb's indexes of ``sessions``, one per transaction, as the steps of long work
   are run: with pauses between them that hermes-agent's writers, polling for the
   lock, get in by (:func:`sessiondb.schema.missing_session_indexes`); such a pause
   also follows :func:`begin` and precedes :func:`swap`.
3. :func:`copy_step`, repeated: the next rows, in id order, a chunk bounded by time and
   bytes per step.
4. :func:`swap`: the last rows, then the tables trade names (hermes-agent's becomes
   ``sessiondb_messages_old``), its sequence carried over, and the rest of sessiondb's
   schema (:func:`sessiondb.schema.complete_conversion`). Nothing in it reads every
   message or session: on ten million messages a count and the session indexes made
   here held the lock 5.2 s (measured), hence the total and the indexes made before
   (a copy that an older sessiondb began, without them, still gets them here).
5. :func:`drain_step`, repeated (by the engine, on open): the old table emptied a chunk
   at a time and dropped once empty (dropping a full table frees every page in one
   statement: seconds on a million messages); then the full-text index is built in
   steps (:mod:`sessiondb.search_index`).

The copy needs no bookkeeping of its own: the rows copied are those up to the new
table's largest id, ``C``. The triggers keep the invariant *for every id up to C, the new
table holds exactly the row hermes-agent's table holds (or neither does)*: an insert at
or below ``C`` is copied at once (ids above it are the copy's to take), a delete is
applied to both, an update replaces the copy (deleting it first, so a copy that now lies
above ``C`` is left to the steps). hermes-agent's own writers, which know nothing of
this, keep writing its table throughout, and the triggers are in the file, so a process
that is killed leaves them working: the next open carries on from ``C``.

Until the swap the file is a hermes-agent file with two more tables (the copy and its
total), five more triggers (three on its table, two on the copy) and more session
indexes: hermes-agent opens and writes it (its reads of a session scan the table
meanwhile: its message index is gone), and sessiondb's open resumes the copy: the
process elected by the engine (the first to open it, or the next one if that one died)
copies, and another one waits for the swap. After the swap it is a sessiondb store.
Every kill leaves one of those two states, and the next open finishes the job. The copy
needs free disk space about the size of the messages; the old table's pages are reused
afterwards (hermes-agent files have no auto-vacuum). While the old table is emptied,
deleting a session scans what is left of it (it still references ``sessions``, without
an index), so the engine empties it before building the full-text index. A copy begun
by this version is finished by this version or a later one: an older sessiondb's swap
knows nothing of the copy's total, and fails (rolled back) each time it tries.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import apsw
import filelock

from . import fts_tables, schema
from .errors import DatabaseOpenError
from .maintenance import (
    POLL_GAP_S, ProgressCallback, Step, Tracker, fit_bytes, run_steps, step_budget,
)
from .hermes_schema import hermes_ladder, hermes_version
from .schema import (
    COPY_TABLE, MESSAGE_COLUMNS, MESSAGE_INDEX_NAMES, SCHEMA_VERSION, WriteRunner, _refuse_newer,
    message_indexes, message_totals, messages_table, migrate_from, missing_session_indexes,
    refuse_unusable, set_aside_index, stamp, user_version,
)

NEW = COPY_TABLE
OLD = "sessiondb_messages_old"
_MIRROR = ("sessiondb_copy_insert", "sessiondb_copy_delete", "sessiondb_copy_update")
_CHUNK = 500  # rows per statement: a few ms each, so a step ends on time
_ROWS_PER_SECOND = 40_000
# Bytes of message a step may copy or delete per second of its budget. A statement
# copies about 400 MB/s, but its commit writes every page it touched to the WAL: 22 MB
# took 161 ms in all (measured on the million-message file). So the bytes of a whole
# step are bounded, not only its statements' time.
_BYTES_PER_SECOND = 50_000_000
_MIN_BYTES = 65536
_LOWEST = -(2 ** 63)
_WAIT_S = 0.1  # between two looks at another process's copy
INDEX_LOCK = ".sessiondb-index.lock"  # the sidecar electing the builder (elect)

#: Runs a step function to the end with a progress tracker (the engine's ``run_steps``).
StepRunner = Callable[[Step, Tracker], int]


def ensure_schema(conn: apsw.Connection, path: Path, run_write: WriteRunner,
                  lock_timeout: float, run: Optional[StepRunner] = None,
                  progress: Optional[ProgressCallback] = None,
                  elect: Callable[[], bool] = lambda: True) -> int:
    """Bring the store at ``path`` to :data:`SCHEMA_VERSION`; return the version found.
    A hermes-agent file is converted (above) by one process at a time, the one
    ``elect`` chooses; another one opening it meanwhile waits for the swap, so that
    writers that bypass the gate find the pauses of one copier, not the steps of two in
    turn (and the process that opened the file first does the rest too).

    :param run_write: the instance's ``_execute_write`` (DDL is a mutation too).
    :param lock_timeout: the longest wait for the migration lock, and for a copy by
        another process that makes no progress.
    :param run: runs the copy's steps (the engine's ``run_steps``; default: through
        ``run_write`` with the default step budget).
    :param progress: gets the copy's progress (task ``"convert"``, unit ``"ids"``).
    :param elect: True if this process is to copy (it keeps being so until the open
        ends): the engine's election of the process that finishes a conversion.
    :raises SchemaTooNewError: the file is newer than this library; it is not touched.
    :raises DatabaseOpenError: the file holds tables that are not a sessiondb store, or
        another process converting it has made no progress for ``lock_timeout``.
    """
    found = user_version(conn)
    if found == SCHEMA_VERSION:
        stamp(conn, run_write)
        return found
    _refuse_newer(path, found)
    with _migrate_lock(path, lock_timeout):
        found = refuse_unusable(conn, path)
        if not (found == 0 and hermes_version(conn, path) is not None):
            _ladder(conn, run_write)
            return found
        fresh = not _exists(conn, NEW)
        if fresh:
            _warm(conn)
        run_write(begin)
    if run is None:
        run = lambda step, tracker: run_steps(run_write, step,  # noqa: E731
                                              step_budget(None), tracker)
    # Copied with foreign keys off, as hermes-agent's table holds them: a message whose
    # session is gone (hermes-agent may write without enforcing them) is kept, not
    # refused by the copy, which could then never finish.
    enforced = bool(conn.pragma("foreign_keys"))
    conn.pragma("foreign_keys", False)
    try:
        seen, since = None, time.monotonic()
        while _copying(conn):
            if elect():
                # hermes-agent's writers poll for the lock, sleeping up to 100 ms: begin()
                # (the drop of a 10-million-entry index: 0.3 s) and each session index
                # are followed by a pause (run_steps': 0.11 s after a step of 0.25 s or
                # more), or a writer waits out two or three of them back to back (0.74 s,
                # measured at ten million messages).
                if fresh:
                    time.sleep(POLL_GAP_S)
                # Through run_write: an index is one statement, exempt from the hold bound.
                run_steps(run_write, _index_sessions, step_budget(None),
                          Tracker("convert", "indexes", None, None))
                run(copy_step, Tracker("convert", "ids", _ids_left(conn), progress))
                time.sleep(POLL_GAP_S)
                with _migrate_lock(path, lock_timeout):
                    run_write(swap)
                break
            try:
                mark = conn.execute(f"SELECT max(id) FROM {NEW}").fetchone()[0]
            except apsw.SQLError:  # swapped since _copying() looked: the loop ends
                continue
            if mark != seen:
                seen, since = mark, time.monotonic()
            elif time.monotonic() - since > lock_timeout:
                raise DatabaseOpenError(
                    f"another process converting {path} has copied nothing for over "
                    f"{lock_timeout:.0f}s; if none is running, retry", str(path))
            time.sleep(_WAIT_S)
        with _migrate_lock(path, lock_timeout):
            _ladder(conn, run_write)
    finally:
        conn.pragma("foreign_keys", enforced)
    return found


def builder_lock(path: Path) -> filelock.FileLock:
    """The lock that elects the process converting and indexing the store at ``path``
    (:func:`elect`): on the sidecar ``<db>.sessiondb-index.lock``, taken without
    waiting."""
    return filelock.FileLock(str(path.with_name(path.name + INDEX_LOCK)), timeout=0,
                             mode=0o600)


def elect(builder: filelock.FileLock) -> bool:
    """True if this process is (now) the one that converts and indexes the store: it
    holds ``builder`` (:func:`builder_lock`; the engine keeps it until the open ends).
    The kernel frees it if that process dies, so work cut short is carried on by the
    next process that opens the store. An unusable sidecar elects everyone (work in
    steps may be shared)."""
    if builder.is_locked:
        return True
    try:
        builder.acquire()
    except filelock.Timeout:
        return False
    except OSError:
        return True
    return True


def _ladder(conn: apsw.Connection, run_write: WriteRunner) -> None:
    for version in range(user_version(conn), SCHEMA_VERSION):
        run_write(migrate_from(version))
    stamp(conn, run_write)


@contextmanager
def _migrate_lock(path: Path, timeout: float) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".sessiondb-migrate.lock")
    try:
        with filelock.FileLock(str(lock_path), timeout=timeout):
            yield
    except filelock.Timeout as exc:
        raise DatabaseOpenError(
            f"another process has been migrating {path} for over {timeout:.0f}s; "
            f"if none is running, remove the stale lock file {lock_path}",
            str(path),
        ) from exc
    except OSError as exc:  # e.g. ELOOP: the sidecar is a symlink, never followed
        raise DatabaseOpenError(
            f"cannot open the migration lock sidecar {lock_path}: {exc.strerror}; "
            "remove it (it holds no data) or fix its permissions, then retry",
            str(path),
        ) from exc


def _exists(conn: apsw.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def _copying(conn: apsw.Connection) -> bool:
    """True while the copy is under way (begun, not swapped yet)."""
    return user_version(conn) == 0 and _exists(conn, NEW)


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _columns(conn: apsw.Connection) -> list[str]:
    """The columns of hermes-agent's messages table, in its order, quoted."""
    return [_quote(r[1]) for r in conn.execute("PRAGMA table_info(messages)")]


def _first_uncopied(conn: apsw.Connection) -> int:
    """The lowest id the copy has not passed: just above the new table's largest."""
    top = conn.execute(f"SELECT max(id) FROM {NEW}").fetchone()[0]
    return _LOWEST if top is None else top + 1


def _ids_left(conn: apsw.Connection) -> Optional[int]:
    """The ids the copy has still to pass (for progress), or None if none is under way."""
    if not _copying(conn):
        return None
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    if top is None:
        return 0
    lo = _first_uncopied(conn)
    if lo == _LOWEST:
        lo = conn.execute("SELECT min(id) FROM messages").fetchone()[0]
    return max(0, top - lo + 1)


def _warm(conn: apsw.Connection) -> None:
    """Read every page of the message indexes that :func:`begin` drops, before it takes
    the write lock: dropping an index reads each of its pages to free it, and from the
    disk when the file is not in memory (an index of ten million entries, measured:
    4.4 s cold, 0.13 s once read); and the sessions' columns that the session indexes
    are made of. A read (no lock held): the pages stay in the OS's cache for the drop
    and the index builds."""
    for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'messages' "
            f"AND name IN ({', '.join('?' * len(MESSAGE_INDEX_NAMES))})",
            MESSAGE_INDEX_NAMES).fetchall():
        try:  # a scan of the index alone: count(*) would count the smallest index
            conn.execute(f"SELECT count(session_id) FROM messages "
                         f"INDEXED BY {_quote(name)}").fetchall()
        except apsw.SQLError:
            pass  # an index that cannot answer it (a partial one): dropped unread
    # The session indexes made right after begin() (each one statement, holding the lock)
    # read these columns of every session; read cold, the first of them held the lock
    # twice as long (a writer waited 0.84 s, measured at ten million messages).
    try:
        conn.execute("SELECT count(started_at), count(ended_at) FROM sessions NOT INDEXED"
                     ).fetchall()
    except apsw.SQLError:
        pass  # no such table or column: nothing to make an index of either


def begin(conn: apsw.Connection) -> None:
    """Start the conversion of a hermes-agent file (a write function; nothing if it has
    begun or is done): hermes-agent's own column steps, the new messages table with
    sessiondb's indexes and the message total kept by its triggers (from 0: counting ten
    million messages at the swap held the lock for seconds), and the triggers that keep
    the copied rows equal to their originals. hermes-agent's full-text index and its
    triggers stay until the swap, so hermes-agent's search keeps working meanwhile."""
    if user_version(conn) != 0 or _exists(conn, NEW):
        return
    hermes_ladder(conn)
    for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'index' AND name IN "
            f"({', '.join('?' * len(MESSAGE_INDEX_NAMES))})", MESSAGE_INDEX_NAMES).fetchall():
        conn.execute(f"DROP INDEX {_quote(name)}")
    known = {c.split()[0] for c in MESSAGE_COLUMNS}
    extra = tuple(_definition(r) for r in conn.execute("PRAGMA table_info(messages)")
                  if r[1] not in known)  # a newer hermes-agent's columns, kept
    conn.execute(messages_table(NEW, extra))
    conn.execute(message_indexes(NEW))
    conn.execute(message_totals(NEW, count=False))
    conn.execute(_mirror_triggers(_columns(conn)))


def _index_sessions(conn: apsw.Connection, deadline: float = 0.0) -> int:
    """Make or drop the first of the session indexes that
    :func:`~sessiondb.schema.missing_session_indexes` lists (a step, each index its own:
    one statement that cannot stop at ``deadline``; the list is read in its transaction,
    as another process, or hermes-agent opening the file, may have made one meanwhile);
    0 when none is left."""
    todo = missing_session_indexes(conn)
    if todo:
        conn.execute(todo[0])
    return int(bool(todo))


def _definition(info: tuple) -> str:
    """A column definition from a row of ``PRAGMA table_info``."""
    _, name, kind, notnull, default, _ = info
    return (f"{_quote(name)} {kind}".rstrip() + (" NOT NULL" if notnull else "")
            + ("" if default is None else f" DEFAULT {default}"))


def _mirror_triggers(columns: list[str]) -> str:
    cols = ", ".join(columns)
    new = ", ".join(f"new.{c}" for c in columns)
    below = f"new.id <= (SELECT max(id) FROM {NEW})"
    return f"""
CREATE TRIGGER {_MIRROR[0]} AFTER INSERT ON messages WHEN {below} BEGIN
    DELETE FROM {NEW} WHERE id = new.id;
    INSERT INTO {NEW} ({cols}) VALUES ({new});
END;
CREATE TRIGGER {_MIRROR[1]} AFTER DELETE ON messages BEGIN
    DELETE FROM {NEW} WHERE id = old.id;
END;
CREATE TRIGGER {_MIRROR[2]} AFTER UPDATE ON messages BEGIN
    DELETE FROM {NEW} WHERE id = old.id;
    DELETE FROM {NEW} WHERE id = new.id;
    INSERT INTO {NEW} ({cols}) SELECT {new} WHERE {below};
END;
"""


def _sizes(columns: list[str]) -> str:
    """The bytes of a row's values (``octet_length``, which SQLite answers from the
    record header for text and blobs)."""
    return " + ".join(f"coalesce(octet_length({c}), 0)" for c in columns if c != '"id"')


def copy_step(conn: apsw.Connection, deadline: float) -> int:
    """Copy the next rows of hermes-agent's messages table, lowest ids first, until
    ``deadline`` (``time.monotonic``) or the step's bytes are spent (at least one
    chunk); a write function for :func:`sessiondb.maintenance.run_steps`. Returns how
    many ids it passed; 0 when the copy is complete (or not under way)."""
    if not _copying(conn):
        return 0
    columns = _columns(conn)
    cols, sizes = ", ".join(columns), _sizes(columns)
    budget = max(_MIN_BYTES, int((deadline - time.monotonic()) * _BYTES_PER_SECOND))
    spent = passed = 0
    lo = _first_uncopied(conn)
    while True:
        chunk = max(10, min(_CHUNK, int((deadline - time.monotonic()) * _ROWS_PER_SECOND)))
        rows = conn.execute(f"SELECT id, {sizes} FROM messages WHERE id >= ? ORDER BY id "
                            "LIMIT ?", (lo, chunk)).fetchall()
        if not rows:
            return passed
        ids = fit_bytes(rows, budget - spent)
        upto = ids[-1]
        _copy(conn, cols, lo, upto)
        passed += upto - (rows[0][0] if lo == _LOWEST else lo) + 1
        spent += sum(size or 0 for _, size in rows[:len(ids)])
        lo = upto + 1
        if time.monotonic() >= deadline or spent >= budget:
            return passed


def _copy(conn: apsw.Connection, cols: str, lo: int, hi: int) -> None:
    """Copy hermes-agent's rows of ids ``lo`` to ``hi``. By the invariant no copy lies
    above C; were one there, hermes-agent's row is the one to keep: it is deleted first
    (not by ``OR REPLACE``, whose delete fires no trigger, so the total would keep it)."""
    conn.execute(f"DELETE FROM {NEW} WHERE id >= ? AND id <= ?", (lo, hi))
    conn.execute(f"INSERT INTO {NEW} ({cols}) SELECT {cols} FROM messages "
                 "WHERE id >= ? AND id <= ?", (lo, hi))


def swap(conn: apsw.Connection) -> None:
    """End the copy (a write function; nothing if no copy is under way): the rows
    written since the last step, then the new table takes the name ``messages`` with
    hermes-agent's sequence, and the store gets the rest of sessiondb's schema with every
    message pending for the full-text index (:func:`sessiondb.schema.complete_conversion`).
    """
    if not _copying(conn):
        return
    _copy(conn, ", ".join(_columns(conn)), _first_uncopied(conn), 2 ** 63 - 1)
    # Whatever hermes-agent named its index triggers: none may survive to feed the new
    # index twice. Other triggers and the views are made again once the tables have
    # swapped: a rename rewrites those naming the table to name its new name. The copy's
    # own (its total's) go with it.
    dropped = conn.execute(
        "SELECT type, name, sql FROM sqlite_schema WHERE type IN ('trigger', 'view') "
        "AND sql IS NOT NULL AND tbl_name != ? ORDER BY rowid", (NEW,)).fetchall()
    for kind, name, _ in dropped:
        conn.execute(f"DROP {kind.upper()} {_quote(name)}")
    conn.execute(f"ALTER TABLE messages RENAME TO {OLD}")
    conn.execute(f"ALTER TABLE {NEW} RENAME TO messages")
    _carry_sequence(conn)
    set_aside_index(conn)
    schema.complete_conversion(conn)  # through the module: a test replaces its DDL
    for name in fts_tables.drop_all(conn):  # one, empty: made again, cut by id block
        conn.execute(f"DROP TABLE {name}")
    fts_tables.lay_out(conn, ())
    for _, name, sql in dropped:
        if name not in _MIRROR and "messages_fts" not in sql:
            conn.execute(sql)


def _carry_sequence(conn: apsw.Connection) -> None:
    """Give ``messages`` hermes-agent's AUTOINCREMENT sequence when it is ahead (the ids
    of deleted messages are never handed out again)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (OLD,)).fetchone()
    if row is None:
        return
    mine = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    if mine is None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', ?)", row)
    elif mine[0] < row[0]:
        conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'messages'", row)


def leftover(conn: apsw.Connection) -> bool:
    """True when a converted store still holds hermes-agent's old messages table."""
    return user_version(conn) != 0 and _exists(conn, OLD)


def drain_step(conn: apsw.Connection, deadline: float) -> int:
    """Empty hermes-agent's old messages table, lowest ids first, until ``deadline`` or
    the step's bytes are spent, and drop it once empty (a write function). Returns the
    rows (and table) removed; 0 when there is nothing left."""
    if not leftover(conn):
        return 0
    sizes = _sizes([_quote(r[1]) for r in conn.execute(f"PRAGMA table_info({OLD})")])
    budget = max(_MIN_BYTES, int((deadline - time.monotonic()) * _BYTES_PER_SECOND))
    spent = done = 0
    while True:
        chunk = max(10, min(_CHUNK, int((deadline - time.monotonic()) * _ROWS_PER_SECOND)))
        rows = conn.execute(f"SELECT id, {sizes} FROM {OLD} ORDER BY id LIMIT ?",
                            (chunk,)).fetchall()
        if not rows:
            conn.execute(f"DROP TABLE {OLD}")
            return done + 1
        ids = fit_bytes(rows, budget - spent)
        conn.execute(f"DELETE FROM {OLD} WHERE id <= ?", (ids[-1],))
        done += len(ids)
        spent += sum(size or 0 for _, size in rows[:len(ids)])
        if time.monotonic() >= deadline or spent >= budget:
            return done
