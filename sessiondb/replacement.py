"""The database file of a store in use must stay the one its connection opened.

Replacing it while a process has it open (``mv new.db state.db``, a restore from a
backup, a sync tool that writes a copy and renames it over) leaves that process
writing into the old file, which no longer has a name: every write it acknowledges from
then on is lost, and nothing says so. Moving the file away does the same. SQLite does not
notice, so sessiondb does, as :mod:`sessiondb.walguard` does for the ``-wal`` and
``-shm`` files:

* :class:`StoreIdentity` remembers the identity (device, inode) of the file when the
  instance opens it, confirmed against the file SQLite itself holds open
  (``SQLITE_FCNTL_HAS_MOVED``, https://sqlite.org/c3ref/c_fcntl_begin_atomic_write.html),
  and compares it with what the path names now (one ``stat``, about a microsecond)
  right after ``BEGIN IMMEDIATE`` of every write transaction, so a write that finds the
  file replaced is rolled back having written nothing; again after its ``COMMIT``, so a
  replacement that lands while a write runs is reported (that write went to the old
  file); before a checkpoint; and at ``close()``.
* On a change, :func:`handle_replaced` stops the instance (every later call raises
  :class:`~sessiondb.errors.StoreReplacedError`), makes sure closing its connection
  will not checkpoint into the old file, and leaves a marker,
  ``<db>.sessiondb-replaced``, which ``sessiondb doctor`` reports. Opening the store
  again is allowed (a restore is usually meant): a new instance opens the file that is
  there now.

Why the replacement is dangerous beyond this process: the ``-wal`` and ``-shm`` files are
found by name, so a process that opens the new file shares them with the processes
still holding the old one, and reads the old file's pages from the WAL on top of the new
file (a "restored" backup then shows the data it was meant to replace, or a mix of the
two). So this instance never writes or checkpoints again; and the safe way to restore a
backup is with every process stopped, the ``-wal`` and ``-shm`` removed along with the
old file (which the marker's advice says).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import apsw

from .errors import StoreReplacedError
from .walguard import _write_marker

MARKER_SUFFIX = ".sessiondb-replaced"
Identity = tuple[int, int]


class StoreMoved(Exception):
    """Raised inside the write path by :meth:`StoreIdentity.check` (internal: the engine
    turns it into :class:`~sessiondb.errors.StoreReplacedError`)."""

    def __init__(self, now: Identity | None, committed: bool) -> None:
        super().__init__(now)
        self.now = now
        self.committed = committed


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


def _identity(path: Path) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def sqlite_file_moved(conn: apsw.Connection) -> bool | None:
    """Whether the file ``conn`` holds open is no longer the one its path names, as
    SQLite sees it (its own record of the inode it opened); None if the VFS cannot say."""
    moved = ctypes.c_int(0)
    try:
        if not conn.file_control("main", apsw.SQLITE_FCNTL_HAS_MOVED,
                                 ctypes.addressof(moved)):
            return None
    except apsw.Error:
        return None
    return bool(moved.value)


class StoreIdentity:
    """Remembers which file a connection to ``path`` opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.was: Identity = (-1, -1)

    def record(self, conn: apsw.Connection) -> None:
        """Call once, right after the instance's first connection opened. If the path
        was replaced in the moment between SQLite's open and this ``stat``, the file
        recorded would not be SQLite's: then the first write reports the replacement."""
        now = _identity(self.path)
        if now is not None and sqlite_file_moved(conn) is not True:
            self.was = now

    def now(self) -> Identity | None:
        return _identity(self.path)

    def intact(self) -> bool:
        return self.now() == self.was

    def check(self, committed: bool = False) -> None:
        """:param committed: called after a COMMIT (said so in the error).
        :raises StoreMoved: the path names another file (or none) since :meth:`record`."""
        now = _identity(self.path)
        if now != self.was:
            raise StoreMoved(now, committed)


def handle_replaced(conn: apsw.Connection | None, path: Path, was: Identity,
                    now: Identity | None, committed: bool = False) -> StoreReplacedError:
    """Disarm ``conn``'s close-time checkpoint, leave the marker; returns the error to
    raise (now and on every later call).

    :param committed: the write that found out had just committed (into the old file).
    """
    if conn is not None:
        try:  # closing must never checkpoint into the old file (module docstring)
            conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        except apsw.Error:
            pass
    marker = marker_path(path)
    what = ("moved away or deleted" if now is None else
            "replaced by another file (renamed over it, or restored from a backup)")
    lost = ("The write that found this had just committed into the old file, which no "
            "longer has a name: it is not in the store at the path. " if committed else
            "Nothing was written to the old file after the replacement. ")
    message = (
        f"{path} was {what} while process {os.getpid()} had the store open (inode "
        f"{was[1]}, now {'none' if now is None else now[1]}). That process's connection "
        f"still holds the old file, so it stopped using the store. {lost}Open a new "
        "SessionDB to use "
        "the file that is there now. Processes that opened the new file while one still "
        f"had the old one read {path.name}-wal, which may hold the old file's pages: "
        "stop every process using the store and run `sessiondb doctor` on it. To restore "
        f"a backup safely: stop every process, then replace {path.name} and delete "
        f"{path.name}-wal and {path.name}-shm together. Delete {marker} once checked."
    )
    _write_marker(marker, {"path": str(path), "pid": os.getpid(), "time": time.time(),
                           "was": list(was), "now": None if now is None else list(now),
                           "committed": committed, "message": message})
    return StoreReplacedError(message, str(path), str(marker), was, now)


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker's record, if the store has one (``{}`` if it is unreadable)."""
    try:
        with open(marker_path(path), encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
