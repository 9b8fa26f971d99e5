"""Staging an import: decoding and validation in a thread beside the writes.

``sessiondb import`` spends about as much time decoding and validating the JSON as
SQLite spends writing the rows, and both need the CPU. A :class:`Stage` runs the
decoding and the validation in a thread of its own, which writes each validated
session and its messages into a private staging database (a temporary file, no
durability); the import's steps then copy them into the store with one ``INSERT ...
SELECT`` per run of sessions (:mod:`sessiondb.bulk`). A copy in SQL runs without
Python's lock, so the thread's decoding goes on meanwhile. Binding the rows from
Python in the writing thread instead would take Python's lock back for every row
(apsw does), and the two threads would take turns.

Only an input that may be read from another thread is staged: the iterator that
:func:`sessiondb.jsonstream.read_items` returns, and any iterable the caller vouches
for (``read_in_thread=True``; ``sessiondb import`` does). The staging thread stays at
most :data:`AHEAD_ROWS` rows (sessions and messages) and :data:`AHEAD_CHARS` characters
of text ahead of the writes (plus the batch it is staging), and removes what the writes
have consumed. The file is in the system's temporary directory (``TMPDIR``; on a tmpfs
that is memory, within those bounds), removed at the end; one that a killed import
left is removed by a later import (its lock is free). If the file cannot be made, the
import reads in the caller's thread as before.

What the store receives is what the caller's thread would have written: the same
validated values (the staging tables have no column types to coerce them), inserted in
the same transactions, in the same order; ids that the step changes are set in the
copy. A session held back for its parent, and a step on a connection that was opened
again meanwhile, take their rows back from the staging file into Python
(:meth:`Stage.fetch`) and go the ordinary way.
"""

from __future__ import annotations

import glob
import os
import queue
import shutil
import tempfile
import threading
import time
import urllib.parse
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import apsw

from . import records
from .errors import SessionDBError, translate

try:
    import fcntl
except ImportError:  # no flock: staging directories of killed imports stay
    fcntl = None  # type: ignore[assignment]

#: Rows (sessions and messages) the staging thread may hold ahead of the writes: two of
#: the largest steps (:data:`sessiondb.bulk.MAX_STEP_ROWS`).
AHEAD_ROWS = 100_000
#: Characters of message text the staging thread may hold ahead of the writes.
AHEAD_CHARS = 64 * 1024 * 1024
#: Rows staged per transaction of the staging database.
FLUSH_ROWS = 2_000
#: The name the staging database is attached under on the store's connection.
SCHEMA = "sessiondb_stage"
_PREFIX = "sessiondb-import-"
_LOCK = "lock"           # held (flock) by the importing process while it runs
_STALE_S = 60.0          # a directory younger than this is left alone (being made)
_SLICE_S = 0.1           # waits are sliced so that a stop is seen soon
_JOIN_S = 1.0            # how long close() waits for a thread stuck reading its input

#: The session columns an import may set (every key :func:`records.import_session`
#: returns but ``messages``), in the staging table's order.
SESSION_COLUMNS = records.IMPORT_SESSION_COLUMNS
_MESSAGE_COLUMNS = records.MESSAGE_COLUMNS


@dataclass
class Staged:
    """A staged session's messages: staging rows ``first .. first + count - 1`` of the
    messages table, their exported ``ids`` (None where none was given) and ``size``,
    the characters of text they carry. ``session`` is the session's staging row;
    ``chars`` the characters staged up to and with this session."""

    session: int
    first: int
    ids: list[Optional[int]]
    size: int
    chars: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def last(self) -> int:
        return self.first + len(self.ids) - 1


_END = object()


class Stage:
    """Reads ``items`` in a thread of its own (from :meth:`start`), validates each
    session (:func:`records.import_session`) and stages it; :meth:`next_row` hands the
    sessions over in order, each with its messages as a :class:`Staged`.

    Use it through :func:`staging`, which attaches it and closes it.

    :raises OSError, apsw.Error: the staging file cannot be made.
    """

    def __init__(self, items: Iterator[Any]) -> None:
        sweep_stale()
        self.dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
        self.path = os.path.join(self.dir, "stage.db")
        self._lock: Any = None
        self._conn: Optional[apsw.Connection] = None
        try:
            self._lock = open(os.path.join(self.dir, _LOCK), "w")
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            conn = self._conn = apsw.Connection(self.path)
            conn.pragma("page_size", 65536)
            conn.pragma("journal_mode", "WAL")  # the writes read it while it grows
            # Never synced: a crash loses nothing of the store. The kernel then writes
            # its pages back in bursts (up to 250 MB for the million-message import,
            # 30 s after they were first dirtied), and the store's commits meanwhile
            # wait for their fsync behind it: an appender's longest call 119-158 ms in
            # the rows phase, measured. Tried: synced 4 MiB at a time (NORMAL, a WAL of
            # 64 pages), 59-77 ms, but the rows 1-20% slower (median 6%, ten alternated
            # runs); both within the 0.5 s bar of a writer's wait, the rate under its bar.
            conn.pragma("synchronous", "OFF")
            conn.execute(
                f"CREATE TABLE s (k INTEGER PRIMARY KEY, {', '.join(SESSION_COLUMNS)});"
                f"CREATE TABLE m (k INTEGER PRIMARY KEY, {', '.join(_MESSAGE_COLUMNS)});")
        except BaseException:
            self._remove()
            raise
        self._items = items
        self._reader: Optional[apsw.Connection] = None
        self._attached: Optional[apsw.Connection] = None  # the store's connection
        self._defaults: dict[str, str] = {}  # its session columns' defaults, as SQL
        self._out: queue.Queue[Any] = queue.Queue()
        self._cv = threading.Condition()
        # The last session and message rows staged, and the characters staged, ...
        self._staged = (0, 0, 0)
        # ... and as far as the writes consumed them.
        self._consumed = (0, 0, 0)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sessiondb-import-stage",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the writer's side ---------------------------------------------------------------
    def attach(self, conn: apsw.Connection) -> None:
        """Attach the staging file to the store's connection, as :data:`SCHEMA`,
        read-only: ``BEGIN IMMEDIATE`` takes the write lock of every database attached
        that can be written, and would stop the staging thread for the length of a
        step. (Checkpoints of that connection name ``main``: :mod:`sessiondb.checkpoint`.)
        """
        self._defaults = {name: default for _, name, _, _, default, _ in conn.execute(
            "PRAGMA main.table_info(sessions)") if default is not None}
        if any(r[1] == SCHEMA for r in conn.execute("PRAGMA database_list")):
            conn.execute(f"DETACH DATABASE {SCHEMA}")  # left by an import cut short
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
        conn.execute(f"ATTACH DATABASE ? AS {SCHEMA}", (uri,))
        self._attached = conn

    def detach(self, conn: apsw.Connection) -> None:
        if conn is self._attached:
            conn.execute(f"DETACH DATABASE {SCHEMA}")
        self._attached = None

    def attached(self, conn: apsw.Connection) -> bool:
        """Whether the staging file is attached to ``conn`` (a connection opened
        again meanwhile has it not: then the rows come back through :meth:`fetch`)."""
        return conn is self._attached

    def next_row(self) -> Optional[dict[str, Any]]:
        """The next validated session (None at the end of the input), its
        ``messages`` a :class:`Staged`.

        :raises Exception: what reading or validating the input raised, at the session
            where it did (the ones before it are handed over first).
        """
        got = self._out.get()
        if got is _END:
            self._out.put(_END)  # asked again after the end: still the end
            return None
        if isinstance(got, BaseException):
            self._out.put(got)
            raise got
        return got

    def insert_sessions(self, conn: apsw.Connection, staged: list[int]) -> None:
        """Insert staged sessions (their staging rows, in this order) into the
        store's ``sessions``; a NULL column takes its default, as an absent one would
        (:func:`records.import_session` leaves out every None)."""
        select = ", ".join(f"coalesce({c}, {self._defaults[c]})" if c in self._defaults
                           else c for c in SESSION_COLUMNS)
        conn.execute(f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) SELECT {select} "
                     f"FROM {SCHEMA}.s WHERE k IN (SELECT value FROM json_each(?)) "
                     "ORDER BY k", (json_list(staged),))

    def consumed(self, staged: Staged) -> None:
        """The writes are done with the staging rows up to this session's (written,
        skipped, or taken back into memory): the thread may remove them and stage
        more."""
        with self._cv:
            self._consumed = max(self._consumed, (staged.session, staged.last, staged.chars))
            self._cv.notify_all()

    def fetch(self, staged: Staged) -> list[tuple]:
        """A staged session's messages as tuples in :data:`records.MESSAGE_COLUMNS`
        order (the ordinary way, for the cases the module docstring lists)."""
        try:
            if self._reader is None:
                self._reader = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
            return list(self._reader.execute(
                f"SELECT {', '.join(_MESSAGE_COLUMNS)} FROM m WHERE k BETWEEN ? AND ? "
                "ORDER BY k", (staged.first, staged.last)))
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    def close(self) -> None:
        """Stop the thread and remove the staging files (a thread stuck reading its
        input keeps them until it ends; a later import removes them then)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.ident is not None:
            self._thread.join(timeout=_JOIN_S)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if not self._thread.is_alive():
            self._remove()

    def _remove(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._lock is not None:
            self._lock.close()  # the flock goes with it
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._stage_all()
        except BaseException as exc:  # handed to the writer, raised there
            typed = translate(exc, self.path)
            if typed is not exc:
                typed.__cause__ = exc
            self._out.put(typed)
            return
        self._out.put(_END)

    def _stage_all(self) -> None:
        sessions: list[tuple] = []
        messages: list[tuple] = []
        rows: list[dict[str, Any]] = []
        session_k = message_k = chars = 0
        items = iter(self._items)
        while not self._stop:
            try:
                item = next(items)
                row = records.import_session(item)
            except StopIteration:
                break
            except BaseException:
                # The sessions validated before the bad one are handed over first.
                if rows:
                    self._flush(sessions, messages, rows, (session_k, message_k, chars))
                raise
            msgs = row["messages"]
            session_k += 1
            sessions.append((session_k,) + tuple(row.get(c) for c in SESSION_COLUMNS))
            first = message_k + 1
            for m in msgs:
                message_k += 1
                messages.append((message_k,) + m)
            size = records.text_size(msgs)
            chars += size
            row["messages"] = Staged(session_k, first, [m[0] for m in msgs], size, chars)
            rows.append(row)
            # Python's lock to the writer's thread now, if it waits for it: it needs the
            # lock between its statements, and would wait out the switch interval
            # (5 ms) each time (measured: 15-30% more messages a second).
            time.sleep(0)
            if len(messages) + len(sessions) >= FLUSH_ROWS:
                self._flush(sessions, messages, rows, (session_k, message_k, chars))
                sessions, messages, rows = [], [], []
        if rows:
            self._flush(sessions, messages, rows, (session_k, message_k, chars))

    def _flush(self, sessions: list[tuple], messages: list[tuple],
               rows: list[dict[str, Any]], last: tuple[int, int, int]) -> None:
        with self._cv:
            # Held back while far enough ahead; never while the writer waits for more.
            while not self._stop and self._ahead() and not self._out.empty():
                self._cv.wait(_SLICE_S)
            if self._stop:
                return
            consumed = self._consumed
        conn = self._conn
        assert conn is not None
        with conn:
            conn.execute("DELETE FROM s WHERE k <= ?", (consumed[0],))
            conn.execute("DELETE FROM m WHERE k <= ?", (consumed[1],))
            conn.executemany(
                f"INSERT INTO s VALUES ({', '.join('?' * (1 + len(SESSION_COLUMNS)))})",
                sessions)
            if messages:
                conn.executemany(
                    f"INSERT INTO m VALUES ({', '.join('?' * (1 + len(_MESSAGE_COLUMNS)))})",
                    messages)
        with self._cv:
            self._staged = last
        for row in rows:
            self._out.put(row)

    def _ahead(self) -> bool:
        staged, consumed = self._staged, self._consumed
        return (staged[0] + staged[1] - consumed[0] - consumed[1] > AHEAD_ROWS
                or staged[2] - consumed[2] > AHEAD_CHARS)


@contextmanager
def staging(items: Iterator[Any], read: Callable[[Callable[[Any], Any]], Any]
            ) -> Iterator[Optional[Stage]]:
    """A started :class:`Stage` reading ``items``, attached to the store's connection
    (through ``read``, the engine's) for the duration of the block; None if the staging
    file cannot be made or attached (the caller then reads ``items`` itself: nothing
    was read from it yet)."""
    try:
        stage = Stage(items)
    except (OSError, apsw.Error):
        yield None
        return
    try:
        try:
            read(stage.attach)
        except SessionDBError:
            stage.close()
            yield None
            return
        stage.start()
        try:
            yield stage
        finally:
            try:
                read(stage.detach)
            except SessionDBError:
                pass  # closed meanwhile (the attachment went with it), or left to the
                # next import's attach, which detaches it first
    finally:
        stage.close()


@dataclass
class Run:
    """Consecutive staging rows of messages, from ``first``, ``count`` of them, that
    keep their staged ids (``ids`` None) or take these."""

    first: int
    count: int
    ids: Optional[list[Optional[int]]]


def add_run(runs: list[Run], staged: Staged, ids: list[Optional[int]]) -> None:
    """Add a staged session's messages, with the ids the step gave them, to ``runs``
    (merged into the last run when they follow it alike)."""
    if not staged.ids:
        return
    new = None if ids == staged.ids else ids
    last = runs[-1] if runs else None
    if last is not None and last.first + last.count == staged.first and \
            (last.ids is None) == (new is None):
        last.count += len(ids)
        if last.ids is not None and new is not None:
            last.ids.extend(new)
        return
    runs.append(Run(staged.first, len(ids), None if new is None else list(new)))


def insert_messages(conn: apsw.Connection, runs: list[Run]) -> None:
    """Insert the staged messages of these runs into the store's ``messages``."""
    columns = ", ".join(_MESSAGE_COLUMNS)
    rest = ", ".join(f"m.{c}" for c in _MESSAGE_COLUMNS[1:])
    for run in runs:
        if run.ids is None:
            conn.execute(f"INSERT INTO messages ({columns}) SELECT {columns} FROM "
                         f"{SCHEMA}.m WHERE k BETWEEN ? AND ? ORDER BY k",
                         (run.first, run.first + run.count - 1))
        else:  # the k-th id of the list goes to the run's k-th row
            conn.execute(f"INSERT INTO messages ({columns}) SELECT j.value, {rest} FROM "
                         f"json_each(?) j JOIN {SCHEMA}.m m ON m.k = ? + j.key "
                         "ORDER BY j.key", (json_list(run.ids), run.first))


def json_list(values: list[Optional[int]]) -> str:
    return "[" + ",".join("null" if v is None else str(v) for v in values) + "]"


def sweep_stale() -> None:
    """Remove the staging directories that killed imports left: older than a minute,
    and their lock free (the process that held it is gone). Never raises."""
    if fcntl is None:
        return
    for left in glob.glob(os.path.join(glob.escape(tempfile.gettempdir()), _PREFIX + "*")):
        try:
            if time.time() - os.lstat(left).st_mtime <= _STALE_S or os.path.islink(left):
                continue
            with open(os.path.join(left, _LOCK), "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # an import runs
                shutil.rmtree(left, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours (another user's), or removed meanwhile
