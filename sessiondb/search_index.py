"""A damaged full-text index must not stop messages from being written.

``messages_fts`` is kept in step with ``messages`` by triggers, so with its shadow
tables damaged every insert, delete or update of a message failed with
``SQLITE_CORRUPT_VTAB``: one bad index page and an agent could no longer save a single
turn. Now:

* a write that fails with that error (:func:`is_damage`) marks the index damaged
  (:func:`mark_damaged`, a row in ``sessiondb_meta``) and runs again; from then on the
  triggers skip the index (their ``WHEN`` clause reads that row, so every process and
  connection sees it at once), and the write succeeds;
* a search finds the mark (:func:`raise_if_damaged`) and raises
  :class:`~sessiondb.errors.SearchIndexError`, rather than answer from an index that no
  longer covers every message;
* ``sessiondb doctor --repair`` (:func:`rebuild`) rebuilds the index from the messages,
  which it only reads, recreating the index table if its shadow tables are beyond the
  ``'rebuild'`` command, and removes the mark.
"""

from __future__ import annotations

import time

import apsw

from .errors import SearchIndexError
from .schema import FTS_TABLE

_KEY = "fts_damaged"
_CORRUPT_VTAB = getattr(apsw, "SQLITE_CORRUPT_VTAB", 267)


def is_damage(exc: BaseException) -> bool:
    """True if ``exc`` (or the apsw error it was translated from) says the full-text
    index, and not the tables, is corrupt: fts5 reports that as SQLITE_CORRUPT_VTAB."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return isinstance(cause, apsw.CorruptError) and (
        getattr(cause, "extendedresult", None) == _CORRUPT_VTAB or "fts5" in str(cause))


def mark_damaged(conn: apsw.Connection) -> None:
    """Record that the index is damaged (a write function for the write path)."""
    conn.execute("INSERT OR REPLACE INTO sessiondb_meta(key, value) VALUES (?, ?)",
                 (_KEY, f"found by a write at {time.strftime('%Y-%m-%d %H:%M:%S')}"))


def damage_note(conn: apsw.Connection) -> str | None:
    """When the index is marked damaged, the mark's text; else None."""
    row = conn.execute("SELECT value FROM sessiondb_meta WHERE key = ?", (_KEY,)).fetchone()
    return None if row is None else str(row[0])


def raise_if_damaged(conn: apsw.Connection, path: object) -> None:
    """:raises SearchIndexError: the index is marked damaged."""
    note = damage_note(conn)
    if note is not None:
        raise SearchIndexError(
            f"the full-text index of {path} is damaged ({note}); messages are intact and "
            f"still being written: run `sessiondb doctor --repair --db {path}` to rebuild it")


def is_search_damage(exc: BaseException) -> bool:
    """True if a search failed (``exc``, or the apsw error it was translated from)
    because the index is damaged, not for a reason of the query."""
    cause = exc.__cause__ if exc.__cause__ is not None else exc
    return isinstance(cause, (apsw.CorruptError, apsw.SQLError)) and (
        "fts5" in str(cause).lower() or "malformed" in str(cause).lower()
        or "corrupt" in str(cause).lower())


def search_damage_error(exc: BaseException, path: object) -> SearchIndexError:
    """The error a search that failed with ``exc`` raises (chain it with ``from``)."""
    return SearchIndexError(
        f"the full-text index of {path} is damaged ({exc.__cause__ or exc}); messages are "
        f"intact: run `sessiondb doctor --repair --db {path}`")


def rebuild(conn: apsw.Connection) -> None:
    """Rebuild the index from ``messages`` and clear the mark (a write function).

    The ``'rebuild'`` command rewrites the index in place; when the shadow tables are too
    damaged for it (one missing, say), the index table is dropped and created again
    (https://sqlite.org/fts5.html#the_rebuild_command).
    """
    conn.execute("SAVEPOINT sessiondb_rebuild")
    try:
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES('rebuild')")
    except apsw.Error:
        conn.execute("ROLLBACK TO sessiondb_rebuild")
        conn.execute("DROP TABLE messages_fts")
        conn.execute(FTS_TABLE)
        conn.execute("INSERT INTO messages_fts(messages_fts) VALUES('rebuild')")
    conn.execute("RELEASE sessiondb_rebuild")
    conn.execute("DELETE FROM sessiondb_meta WHERE key = ?", (_KEY,))
