"""The ``-wal`` and ``-shm`` files of a store in use must stay the ones SQLite opened.

Something other than SQLite deleting them (a cleanup script, ``rm state.db-*``, a sync
tool) while a process has the store open splits it in two: that process keeps writing
into the deleted files, which it still holds open, while a process that opens the store
afterwards starts a fresh ``-wal`` from the database file alone and never sees those
writes; whichever checkpoints last overwrites the other's pages
(https://sqlite.org/howtocorrupt.html#_unlinking_or_renaming_a_database_file_while_in_use).
SQLite does not notice, so sessiondb does:

* :class:`WalGuard` remembers the identity (device, inode) of both files when a
  connection opens, and compares it at the start of every write transaction (two
  ``stat`` calls, about 2 microseconds) and at ``close()``. While any connection is open
  SQLite never deletes them, so a change means someone else did.
* On a change, :func:`handle_lost` stops this instance from writing, saves everything
  its connection can still read (the database plus the orphaned WAL, so its own
  acknowledged writes too) into a rescue copy with ``VACUUM INTO``, makes sure closing
  the connection will not checkpoint the orphaned WAL over the database file, and leaves
  a marker, ``<db>.sessiondb-wal-lost``, saying what happened and what to do.
* While the marker exists, every open of the store is refused (:func:`refuse_marked`),
  so no new process writes into the split store before a person has looked.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import apsw

from .errors import WalDeletedError

MARKER_SUFFIX = ".sessiondb-wal-lost"
_PRIVATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_FILES = ("-wal", "-shm")


class FilesLost(Exception):
    """Raised inside the write path by :meth:`WalGuard.check` (internal: the engine
    turns it into :class:`~sessiondb.errors.WalDeletedError` once the transaction is
    rolled back, since ``VACUUM INTO`` cannot run inside one)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def marker_path(path: Path) -> Path:
    return path.with_name(path.name + MARKER_SUFFIX)


class WalGuard:
    """Remembers which ``-wal``/``-shm`` files a connection to ``path`` opened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ids: list[tuple[int, int] | None] = [None, None]

    def _now(self) -> list[tuple[int, int] | None]:
        ids: list[tuple[int, int] | None] = []
        for suffix in _FILES:
            try:
                st = os.stat(f"{self.path}{suffix}")
                ids.append((st.st_dev, st.st_ino))
            except OSError:
                ids.append(None)
        return ids

    def record(self) -> None:
        """Call right after a connection opened (and so created both files)."""
        self._ids = self._now()

    def lost(self) -> str | None:
        """The name of the first file that is gone or replaced since :meth:`record`."""
        for suffix, then, now in zip(_FILES, self._ids, self._now()):
            if then is not None and now != then:
                return f"{self.path.name}{suffix}"
        return None

    def check(self) -> None:
        """:raises FilesLost: a file is gone or replaced since :meth:`record`."""
        name = self.lost()
        if name is not None:
            raise FilesLost(name)


def handle_lost(conn: apsw.Connection, path: Path, lost: str) -> WalDeletedError:
    """Rescue what ``conn`` can still read, disarm its close-time checkpoint, leave the
    marker; returns the error to raise (now and on every later call)."""
    try:  # closing must never copy the orphaned WAL over the database file
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    except apsw.Error:
        pass
    stamp = time.strftime("%Y%m%dT%H%M%S")
    rescue: str | None = str(path.with_name(
        f"{path.name}.sessiondb-rescue-{os.getpid()}-{stamp}-{secrets.token_hex(2)}.db"))
    try:
        # Created empty and private first (VACUUM INTO fills an empty file): the copy
        # holds every transcript, so it must never be readable by others, not even
        # for a moment.
        os.close(os.open(rescue, _PRIVATE_NEW, 0o600))
        conn.execute("VACUUM INTO ?", (rescue,))
        saved = f"Everything this process could still read, its latest writes included, " \
                f"was saved to {rescue}."
    except (apsw.Error, OSError) as exc:
        saved = f"Saving a rescue copy to {rescue} failed ({exc})."
        rescue = None
    marker = marker_path(path)
    message = (
        f"{lost} of {path} was deleted or replaced while process {os.getpid()} had the "
        "store open (something other than SQLite removed it: a cleanup script, rm, a "
        "sync tool). Writing on would split the store into two histories, so that "
        f"process stopped writing it. {saved} What to do: stop every process using the "
        f"store; move {path.name} and any {path.name}-wal and {path.name}-shm aside (keep "
        "them: a process that opened the store after the loss may have written there); "
        f"move the rescue copy to {path}; delete {marker}. `sessiondb doctor --db FILE` "
        f"reports on either copy. Until then sessiondb refuses to open {path}."
    )
    _write_marker(marker, {"path": str(path), "lost": lost, "pid": os.getpid(),
                           "time": time.time(), "rescue": rescue, "message": message})
    return WalDeletedError(message, str(path), str(marker), rescue)


def _write_marker(marker: Path, record: dict) -> None:
    # Written whole under a private name, then renamed: a reader never sees half of it.
    # A marker that already exists (another process found the loss first) is kept.
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with os.fdopen(os.open(tmp, _PRIVATE_NEW, 0o600), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
    except OSError:
        return
    try:
        if not marker.exists():
            os.replace(tmp, marker)
    except OSError:
        pass
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def refuse_marked(path: Path) -> None:
    """Refuse to open a store whose marker says its WAL was lost.

    :raises WalDeletedError: the marker exists.
    """
    marker = marker_path(path)
    try:
        with open(marker, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        record = {}
    message = record.get("message") or (
        f"{marker} says the -wal or -shm file of {path} was deleted while in use")
    raise WalDeletedError(f"refusing to open {path}: {message}", str(path), str(marker),
                          record.get("rescue"))
