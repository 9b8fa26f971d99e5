"""The sealed tables of the full-text index merged into one segment each, in short
steps (SQLite): :meth:`sessiondb.SessionDB.optimize_search_index`.

FTS5 keeps a table as a set of segments, merged level by level as it grows: a table
filled by appends is left in 10-16 of them. Every query looks each of its words up in
every segment, so a search that runs one query per range of ids (a rare source's,
:mod:`sessiondb.search`) pays that many seeks per word per query. On the
million-message store of the scale benchmark, in one run: ``a NOT b`` with ``b``
everywhere over the rarest source took 49.2 ms at p50 with its three sealed tables in
10-16 segments, 32.1 ms with each in one.

A sealed table (:mod:`sessiondb.fts_tables`) whose range the newest messages have
passed takes only the deletions of its messages from then on, so one merge lasts. FTS5's ``merge`` command with a negative page count
merges every segment of the table into one, about :data:`STEP_PAGES` pages at a time,
each command in the caller's write transaction; a command also finishes the word it
is in, so one may copy a common word's whole doclist in the block (about 8 MB). Reading
that from the disk with the lock held took 0.7-0.8 s per command on a store of ten
million messages (measured), so a table's pages are read first, outside the lock
(:func:`warm`). The newest table, which takes every new message, is left to FTS5's own
merges: merged into one, it is back to many segments within a few hundred writes, and
each merge of it rewrites the whole table.

Nothing merges on its own: writers that did (a step after a write of their own) held
the lock up to 0.8 s at ten million messages with cold pages, and made their own
callers wait for it. A merge cut short (a kill) leaves a valid index, in more than one
segment: the next ``optimize_search_index`` finishes it."""

from __future__ import annotations

import time
from typing import Callable

import apsw

from . import search_index
from .fts_tables import tables, varint

#: Pages of merge work per ``merge`` command (see the module docstring).
STEP_PAGES = 128
_STRUCTURE = 10  # FTS5_STRUCTURE_ROWID: the row of %_data that lists the segments
_V2 = b"\xff\x00\x00\x01"  # after the 4-byte cookie of a version-2 structure record


def segments(conn: apsw.Connection, table: str) -> int:
    """The segments of ``table``, from its structure record (``%_data`` row 10: a 4-byte
    cookie, a version mark since SQLite 3.45, then varints of levels and segments; see
    SQLite's fts5_index.c)."""
    row = conn.execute(f'SELECT block FROM "{table}_data" WHERE id = ?',
                       (_STRUCTURE,)).fetchone()
    if not row or not row[0]:
        return 0
    data = bytes(row[0])
    at = 8 if data[4:8] == _V2 else 4
    at = varint(data, at)[1]  # levels
    return varint(data, at)[0]


def due(conn: apsw.Connection) -> list[str]:
    """The sealed tables of more than one segment, newest first, but for one whose range
    new messages still reach (a table is sealed up to 4,096 ids before its last); none
    while the index is damaged or being rebuilt (its tables are then remade).

    :returns: the tables' names.
    """
    if _blocked(conn):
        return []
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
    return [t.name for t in tables(conn)[1:]
            if (t.hi is None or top >= t.hi) and segments(conn, t.name) > 1]


def _blocked(conn: apsw.Connection) -> bool:
    return (search_index.damage_note(conn) is not None
            or search_index.rebuilding(conn) is not None)


def pages(conn: apsw.Connection, table: str) -> int:
    """The rows of ``table``'s ``%_data`` (about its pages): a progress total."""
    return int(conn.execute(f'SELECT count(*) FROM "{table}_data"').fetchone()[0])


def warm(conn: apsw.Connection, table: str) -> None:
    """Read every page of ``table``'s index, outside a write: they stay in the OS's cache
    for the merge."""
    for _ in conn.execute(f'SELECT block FROM "{table}_data"'):
        pass


def merge_step(table: str) -> Callable[[apsw.Connection, float], int]:
    """A step that merges ``table`` until ``deadline`` (at least one ``merge`` command);
    it returns the pages of work done (about), 0 once the table is one segment, or while
    the index is damaged or being rebuilt."""
    def step(conn: apsw.Connection, deadline: float) -> int:
        if _blocked(conn) or segments(conn, table) <= 1:
            return 0
        done = 0
        while True:
            conn.execute(f'INSERT INTO "{table}"("{table}", rank) VALUES (\'merge\', ?)',
                         (-STEP_PAGES,))
            done += STEP_PAGES
            if segments(conn, table) <= 1 or time.monotonic() >= deadline:
                return done
    return step
