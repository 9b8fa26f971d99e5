"""Staging a JSON Lines import: decoding and validation beside the writes.

``sessiondb import`` spends about as much time decoding and validating the JSON as
SQLite spends writing the rows, and both need the CPU. A :class:`Stage` runs the
decoding and the validation in a thread of its own, which writes each validated
session and its messages into a private staging database (a temporary file, no
durability); the import's steps then copy them into the store with one ``INSERT ...
SELECT`` per run of sessions (:mod:`sessiondb.bulk`). A copy in SQL runs without
Python's lock, so the thread's decoding goes on meanwhile. Binding the rows from
Python in the writing thread instead would take Python's lock back for every row
(apsw does), and the two threads would take turns.

Only an input that is safe to read from another thread is staged: the iterator that
:func:`sessiondb.jsonstream.read_items` returns. The staging thread stays at most
:data:`AHEAD_MESSAGES` messages ahead of the writes, and removes what the writes have
consumed, so the staging file stays small (it is not memory either: a file in the
system's temporary directory, removed at the end; one left by a killed import is
removed by the next import once its process is gone).

What the store receives is what the caller's thread would have written: the same
validated values (the staging table has no types to coerce them), inserted in the same
transactions. A message whose id the step must change, a session held back for its
parent, and a step on a connection that was opened again meanwhile take the rows back
from the staging file into Python (:meth:`Stage.fetch`) and go the ordinary way.
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
from .connection import process_alive
from .errors import SessionDBError, translate

#: Rows (sessions and messages) the staging thread may hold ahead of the writes: two of
#: the largest steps (:data:`sessiondb.bulk.MAX_STEP_ROWS`).
AHEAD_ROWS = 100_000
#: Rows staged per transaction of the staging database.
FLUSH_ROWS = 2_000
#: The name the staging database is attached under on the store's connection.
SCHEMA = "sessiondb_stage"
_PREFIX = "sessiondb-import-"
_STALE_S = 60.0          # a killed import's staging directory is left alone this long
_SLICE_S = 0.1           # waits are sliced so that a stop is seen soon

#: The session columns an import may set (every key :func:`records.import_session`
#: returns but ``messages``), in the staging table's order.
SESSION_COLUMNS = records.IMPORT_SESSION_COLUMNS
_MESSAGE_COLUMNS = records.MESSAGE_COLUMNS


@dataclass
class Staged:
    """A staged session's messages: staging rows ``first .. first + count - 1`` of the
    messages table, their exported ``ids`` (None where none was given) and ``size``,
    the characters of text they carry. ``session`` is the session's staging row."""

    session: int
    first: int
    ids: list[Optional[int]]
    size: int

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def last(self) -> int:
        return self.first + len(self.ids) - 1


_END = object()


class Stage:
    """Reads ``items`` in a thread of its own, validates each session
    (:func:`records.import_session`) and stages it; :meth:`next_row` hands the
    sessions over in order, each with its messages as a :class:`Staged`.

    Close it (:meth:`close`) when the import ends, however it ends.
    """

    def __init__(self, items: Iterator[Any]) -> None:
        sweep_stale()
        self.dir = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-")
        self.path = os.path.join(self.dir, "stage.db")
        self._items = items
        self._conn = apsw.Connection(self.path)
        self._conn.pragma("page_size", 65536)
        self._conn.pragma("journal_mode", "WAL")  # the writes read it while it grows
        self._conn.pragma("synchronous", "OFF")   # a crash loses nothing of the store
        self._conn.execute(
            f"CREATE TABLE s (k INTEGER PRIMARY KEY, {', '.join(SESSION_COLUMNS)});"
            f"CREATE TABLE m (k INTEGER PRIMARY KEY, {', '.join(_MESSAGE_COLUMNS)});")
        self._reader: Optional[apsw.Connection] = None
        self._attached: Optional[apsw.Connection] = None  # the store's connection
        self._defaults: dict[str, str] = {}  # its session columns' defaults, as SQL
        self._out: queue.Queue[Any] = queue.Queue()
        self._cv = threading.Condition()
        self._staged = (0, 0)      # the last session and message rows staged
        self._consumed = (0, 0)    # the last session and message rows the writes used
        self._removed = (0, 0)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sessiondb-import-stage",
                                        daemon=True)
        self._thread.start()

    # -- the writer's side ---------------------------------------------------------------
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

    def attach(self, conn: apsw.Connection) -> None:
        """Attach the staging file to the store's connection, as :data:`SCHEMA`,
        read-only: ``BEGIN IMMEDIATE`` takes the write lock of every database attached
        that can be written, and would stop the staging thread for the length of a
        step."""
        self._defaults = {name: default for _, name, _, _, default, _ in conn.execute(
            "PRAGMA main.table_info(sessions)") if default is not None}
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

    def insert_sessions(self, conn: apsw.Connection, staged: list[int]) -> None:
        """Insert staged sessions (their staging rows, in this order) into the
        store's ``sessions``; a NULL column takes its default, as an absent one would."""
        select = ", ".join(f"coalesce({c}, {self._defaults[c]})" if c in self._defaults
                           else c for c in SESSION_COLUMNS)
        conn.execute(f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS)}) SELECT {select} "
                     f"FROM {SCHEMA}.s WHERE k IN (SELECT value FROM json_each(?)) "
                     "ORDER BY k", (json_list(staged),))

    def consumed(self, session: int, message: int) -> None:
        """The writes are done with staging rows up to these (written, skipped, or
        taken back into memory): the thread may remove them and stage more."""
        with self._cv:
            self._consumed = (max(self._consumed[0], session),
                              max(self._consumed[1], message))
            self._cv.notify_all()

    def fetch(self, staged: Staged) -> list[tuple]:
        """A staged session's messages as tuples in :data:`records.MESSAGE_COLUMNS`
        order (the ordinary way, for the cases the module docstring lists)."""
        if self._reader is None:
            self._reader = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return list(self._reader.execute(
                f"SELECT {', '.join(_MESSAGE_COLUMNS)} FROM m WHERE k BETWEEN ? AND ? "
                "ORDER BY k", (staged.first, staged.last)))
        except apsw.Error as exc:
            raise translate(exc, self.path) from exc

    def close(self) -> None:
        """Stop the thread and remove the staging files (left for a later import's
        sweep if the thread is stuck reading the input)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=5.0)
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if not self._thread.is_alive():
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            try:
                self._stage_all()
            finally:
                self._conn.close()
        except BaseException as exc:  # handed to the writer, raised there
            self._out.put(translate(exc, self.path))
            return
        self._out.put(_END)

    def _stage_all(self) -> None:
        sessions: list[tuple] = []
        messages: list[tuple] = []
        rows: list[dict[str, Any]] = []
        session_k = message_k = 0
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
                    self._flush(sessions, messages, rows, (session_k, message_k))
                raise
            msgs = row["messages"]
            session_k += 1
            sessions.append((session_k,) + tuple(row.get(c) for c in SESSION_COLUMNS))
            first = message_k + 1
            for m in msgs:
                message_k += 1
                messages.append((message_k,) + m)
            row["messages"] = Staged(session_k, first, [m[0] for m in msgs],
                                     records.text_size(msgs))
            rows.append(row)
            if len(messages) + len(sessions) >= FLUSH_ROWS:
                self._flush(sessions, messages, rows, (session_k, message_k))
                sessions, messages, rows = [], [], []
        if rows:
            self._flush(sessions, messages, rows, (session_k, message_k))

    def _flush(self, sessions: list[tuple], messages: list[tuple],
               rows: list[dict[str, Any]], last: tuple[int, int]) -> None:
        with self._cv:
            # Held back while far enough ahead; never while the writer waits for more.
            while not self._stop and sum(self._staged) - sum(self._consumed) > AHEAD_ROWS \
                    and not self._out.empty():
                self._cv.wait(_SLICE_S)
            if self._stop:
                return
            consumed = self._consumed
        conn = self._conn
        with conn:
            if consumed != self._removed:
                conn.execute("DELETE FROM s WHERE k <= ?", (consumed[0],))
                conn.execute("DELETE FROM m WHERE k <= ?", (consumed[1],))
                self._removed = consumed
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


@contextmanager
def staging(items: Iterator[Any], read: Callable[[Callable[[Any], Any]], Any]
            ) -> Iterator[Stage]:
    """A :class:`Stage` reading ``items``, attached to the store's connection
    (through ``read``, the engine's) for the duration of the block."""
    stage = Stage(items)
    try:
        read(stage.attach)
        yield stage
    finally:
        try:
            read(stage.detach)
        except SessionDBError:
            pass  # closed meanwhile: the attachment went with the connection
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
                         f"{SCHEMA}.m WHERE k BETWEEN ? AND ?",
                         (run.first, run.first + run.count - 1))
        else:  # the k-th id of the list goes to the run's k-th row
            conn.execute(f"INSERT INTO messages ({columns}) SELECT j.value, {rest} FROM "
                         f"json_each(?) j JOIN {SCHEMA}.m m ON m.k = ? + j.key",
                         (json_list(run.ids), run.first))


def json_list(values: list[Optional[int]]) -> str:
    return "[" + ",".join("null" if v is None else str(v) for v in values) + "]"


def sweep_stale() -> None:
    """Remove staging directories that killed imports left: their process is gone and
    they have not changed for a minute."""
    for left in glob.glob(os.path.join(tempfile.gettempdir(), _PREFIX + "*")):
        pid = os.path.basename(left)[len(_PREFIX):].split("-", 1)[0]
        try:
            if pid.isdigit() and not process_alive(int(pid)) and \
                    time.time() - os.path.getmtime(left) > _STALE_S:
                shutil.rmtree(left, ignore_errors=True)
        except OSError:
            pass  # removed meanwhile
