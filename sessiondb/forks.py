"""fork() and SQLite: what every :class:`~sessiondb.engine.Engine` of a process does
around a fork.

Just before ``fork()`` every engine waits for its call in progress (up to
``write_timeout``) and closes its idle connection, because SQLite's per-process lock
state would otherwise be copied into the child (see
:func:`sessiondb.connection.close_for_fork`); parent and child reopen at their next call,
the child with a new gate descriptor. A connection that was inside a transaction at fork
time is never touched, not even closed, in the child (:func:`keep_forever`), and the
child refuses its file (:func:`refuse_if_forked_busy`).
"""

from __future__ import annotations

import ctypes
import os
import weakref
from pathlib import Path
from typing import Protocol

import apsw

from .errors import DatabaseOpenError


class Forkable(Protocol):
    """What an engine does around a fork (see :class:`~sessiondb.engine.Engine`)."""

    path: Path

    def _park_for_fork(self) -> None: ...
    def _unpark(self) -> None: ...
    def _in_child(self) -> list[apsw.Connection]: ...


# Connections inherited across fork(): kept referenced forever so that garbage collection
# never closes them in the child (closing would touch files and locks the parent owns).
_INHERITED: list[apsw.Connection] = []
_ENGINES: "weakref.WeakSet[Forkable]" = weakref.WeakSet()
# Files that had a connection in use (mid-transaction) when this process was forked: no
# connection to them is safe in this process (see connection.close_for_fork).
_FORKED_BUSY: set[Path] = set()


def register(engine: Forkable) -> None:
    """Have ``engine`` parked before each fork and reset in the child."""
    _ENGINES.add(engine)


def refuse_if_forked_busy(path: Path) -> None:
    """:raises DatabaseOpenError: this process was forked while a connection to
    ``path`` was mid-transaction."""
    if path in _FORKED_BUSY:
        raise DatabaseOpenError(
            f"this process was forked while another thread of its parent was writing "
            f"to {path}; SQLite's lock state for that file was copied mid-write, "
            "so no connection to it is safe here. Fork while no thread is inside a "
            "transaction (sessiondb waits up to write_timeout for one to finish)",
            str(path))


def inherit(conn: apsw.Connection) -> None:
    """Keep a connection the parent opened referenced, never closed here."""
    _INHERITED.append(conn)


def keep_forever(conn: apsw.Connection) -> None:
    """Make sure a connection inherited mid-transaction is never closed in this process,
    not even when the interpreter shuts down: closing it would roll the parent's
    transaction back through the shared WAL index, under other processes' writes (seen
    as "database disk image is malformed" in a concurrent writer). The extra reference
    is never released; the OS reclaims the memory when the process exits."""
    _INHERITED.append(conn)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


def _before_fork() -> None:
    # Wait for calls in progress (bounded by write_timeout), then close idle connections
    # so the child inherits no SQLite lock state; both sides reopen at their next call.
    for engine in list(_ENGINES):
        engine._park_for_fork()


def _after_fork_in_parent() -> None:
    for engine in list(_ENGINES):
        engine._unpark()


def _after_fork_in_child() -> None:
    for engine in list(_ENGINES):
        busy = engine._in_child()
        if busy:
            _FORKED_BUSY.add(engine.path)
            for conn in busy:
                keep_forever(conn)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
