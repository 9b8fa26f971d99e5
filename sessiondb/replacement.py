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
  ``<db>.sessiondb-replaced``, saying what happened and what to do.
* While the marker exists, every open of the store is refused (:func:`refuse_replaced`;
  ``sessiondb doctor`` reports it).

Why refuse the new file, which someone put there on purpose: the ``-wal`` and ``-shm``
files are found by name, and the ``-wal`` left by the old file holds its pages. SQLite
cannot tell that they belong to another file: a process that opens the new one reads
the old file's pages from the WAL on top of it, and the last one to close copies them
into it (seen here: a backup restored under a live process came back as the store it was
meant to replace). So the new file is not opened until a person has moved the old
``-wal`` and ``-shm`` aside. The safe way to restore a backup is with every process
stopped, replacing the file and removing its ``-wal`` and ``-shm`` together; then no
process sees the replacement and no marker is left.
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


def _identity(path: str) -> Identity | None:
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
        self._name = str(path)  # os.stat of a str: a third cheaper than of a Path
        self.was: Identity = (-1, -1)

    def record(self, conn: apsw.Connection) -> None:
        """Call once, right after the instance's first connection opened. If the path
        was replaced in the moment between SQLite's open and this ``stat``, the file
        recorded would not be SQLite's: then the first write reports the replacement."""
        now = _identity(self._name)
        if now is not None and sqlite_file_moved(conn) is not True:
            self.was = now

    def now(self) -> Identity | None:
        return _identity(self._name)

    def intact(self) -> bool:
        return self.now() == self.was

    def check(self, committed: bool = False) -> None:
        """:param committed: called after a COMMIT (said so in the error).
        :raises StoreMoved: the path names another file (or none) since :meth:`record`."""
        now = _identity(self._name)
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
        f"still holds the old file, so it stopped using the store. {lost}"
        f"{path.name}-wal and {path.name}-shm, if present, belong to the old file: "
        f"SQLite would apply the old file's pages in them to the new one. What to do: "
        f"stop every process using the store; move {path.name}-wal and {path.name}-shm "
        f"aside (keep them: a process that opened the new file before this was noticed "
        f"may have written there); delete {marker}; run `sessiondb doctor --db {path}`. "
        f"Until then sessiondb refuses to open {path}. (To restore a backup safely, stop "
        f"every process first and replace {path.name} and remove its -wal and -shm "
        "together.)"
    )
    _write_marker(marker, {"path": str(path), "pid": os.getpid(), "time": time.time(),
                           "was": list(was), "now": None if now is None else list(now),
                           "committed": committed, "message": message})
    return StoreReplacedError(message, str(path), str(marker), was, now)


def refuse_replaced(path: Path) -> None:
    """Refuse to open a store whose marker says its file was replaced under a live
    process.

    :raises StoreReplacedError: the marker exists.
    """
    record = read_marker(path)
    if record is None:
        return
    message = record.get("message") or (
        f"{marker_path(path)} says {path} was replaced while a process had it open")
    was, now = record.get("was") or (-1, -1), record.get("now")
    raise StoreReplacedError(f"refusing to open {path}: {message}", str(path),
                             str(marker_path(path)), tuple(was),  # type: ignore[arg-type]
                             None if now is None else tuple(now))  # type: ignore[arg-type]


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
