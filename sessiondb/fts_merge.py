"""The sealed tables of the full-text index merged into one segment each, in short
steps (SQLite).

FTS5 keeps a table as a set of segments, merged level by level as it grows: a table
filled by appends is left in 10-16 of them. Every query looks each of its words up in
every segment, so a search that runs one query per range of ids (a rare source's,
:mod:`sessiondb.search`) pays that many seeks per word per query. On the
million-message store of the scale benchmark, measured in one run: ``a NOT b`` with
``b`` everywhere over the rarest source 48.8 ms p50 and 85.1 ms p99 with 9-16
segments per table, 28.4 and 31.2 ms with one; a prefix of two letters over it 47.1 and
56.8 ms against 33.5 and 40.6.

A sealed table (:mod:`sessiondb.fts_tables`) takes only the deletions and rewrites of
its messages from then on, so one merge lasts: FTS5's ``merge`` command with a negative
page count merges every segment of the table into one, :data:`STEP_PAGES` pages at a
time, each in the caller's write transaction (a command also finishes the word it is
in: at most one word's doclist of one block, as any merge). A table is merged once it
has more than :data:`MERGE_AT` segments, and then down to one; the deletions of a prune
add segments again, and when they are more than :data:`MERGE_AT` the table is merged
again (one merge reads and writes the whole table: tens of MB for a block of long
messages). The table being merged is named in ``sessiondb_meta`` (:data:`KEY`) until
it is one segment, so a merge cut short by a crash is finished, not left half-way.

Who merges: every process that writes, one step after a write of its own at most every
:data:`EVERY_S` seconds (:class:`Merger`, in the engine), as the tail's seal is done;
:meth:`sessiondb.SessionDB.optimize_search_index` merges every sealed table of more than
one segment at once, in steps. Nothing is merged while the index is damaged, rebuilt or
converted (its tables are then remade)."""

from __future__ import annotations

import time
import weakref
from typing import Optional

import apsw

from .fts_tables import tables, varint
from .schema import REBUILDING

#: A sealed table with more segments than this is merged into one.
MERGE_AT = 4
#: Pages of merge work per ``merge`` command (about 10 ms; see the module docstring).
STEP_PAGES = 128
#: The shortest time between two steps run after a process's own writes.
EVERY_S = 2.0
#: The time such a step merges for (one command more at most).
STEP_S = 0.05
#: ``sessiondb_meta`` key naming the table being merged.
KEY = "fts_merging"
_STRUCTURE = 10  # FTS5_STRUCTURE_ROWID: the row of %_data that lists the segments
_V2 = b"\xff\x00\x00\x01"  # after the 4-byte cookie of a version-2 structure record
_BLOCKED = ("fts_damaged", REBUILDING)  # search_index's keys: damaged, being rebuilt
#: When each connection last ran a merge step (an optimize's steps are not followed by
#: a writer's step of its own).
_STEPPED: "weakref.WeakKeyDictionary[apsw.Connection, float]" = weakref.WeakKeyDictionary()


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


def due_table(conn: apsw.Connection, at: int = MERGE_AT) -> Optional[str]:
    """The sealed table to merge next: the one a merge was left in, else the first of
    more than ``at`` segments; None when there is none, or while the index is damaged,
    rebuilt or converted."""
    keys = dict(conn.execute(
        "SELECT key, value FROM sessiondb_meta WHERE key IN (?, ?, ?)",
        (KEY,) + _BLOCKED).fetchall())
    if any(k in keys for k in _BLOCKED):
        return None
    sealed = [t.name for t in tables(conn)[1:]]
    going = keys.get(KEY)
    if going in sealed and segments(conn, going) > 1:
        return going
    return next((name for name in sealed if segments(conn, name) > at), None)


def merge_step(conn: apsw.Connection, deadline: float, at: int = MERGE_AT) -> int:
    """Merge the table :func:`due_table` names until ``deadline`` (a write function, in
    a write transaction): ``merge`` commands of :data:`STEP_PAGES` pages, at least one;
    the table is named in ``sessiondb_meta`` until it is one segment. Returns the
    pages of work done (about), 0 when no table is due."""
    name = due_table(conn, at)
    if name is None:
        if conn.execute("SELECT 1 FROM sessiondb_meta WHERE key = ?", (KEY,)).fetchone():
            conn.execute("DELETE FROM sessiondb_meta WHERE key = ?", (KEY,))
        return 0
    _STEPPED[conn] = time.monotonic()
    done = 0
    while True:
        conn.execute(f'INSERT INTO "{name}"("{name}", rank) VALUES (\'merge\', ?)',
                     (-STEP_PAGES,))
        done += STEP_PAGES
        left = segments(conn, name)
        if left <= 1 or time.monotonic() >= deadline:
            break
    if left > 1:
        conn.execute("INSERT OR REPLACE INTO sessiondb_meta (key, value) VALUES (?, ?)",
                      (KEY, name))
    else:
        conn.execute("DELETE FROM sessiondb_meta WHERE key = ?", (KEY,))
    return done


def after_write(conn: apsw.Connection) -> int:
    """The step an engine runs after a write of its own (:class:`Merger`): merge
    commands for about :data:`STEP_S` seconds."""
    return merge_step(conn, time.monotonic() + STEP_S)


def pages_due(conn: apsw.Connection, at: int = MERGE_AT) -> int:
    """The pages of the sealed tables :func:`merge_step` would merge (each is read and
    written once): a progress total."""
    if due_table(conn, at) is None:
        return 0
    return sum(conn.execute(f'SELECT count(*) FROM "{t.name}_data"').fetchone()[0]
               for t in tables(conn)[1:] if segments(conn, t.name) > 1)


class Merger:
    """When an engine runs a merge step after one of its own writes: at most every
    :data:`EVERY_S` seconds, and only when a table is due (read outside the write's
    transaction, like the tail's seal)."""

    def __init__(self) -> None:
        self._next = 0.0

    def due(self, conn: apsw.Connection) -> bool:
        now = time.monotonic()
        if now < max(self._next, _STEPPED.get(conn, -EVERY_S) + EVERY_S):
            return False
        self._next = now + EVERY_S
        try:
            return due_table(conn) is not None
        except apsw.Error:  # busy (a commit in the rollback journal): the next write
            return False
