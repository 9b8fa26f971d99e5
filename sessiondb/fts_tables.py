"""The full-text index cut into one FTS5 table per block of message ids (SQLite).

FTS5 merges an index's segments level by level as it grows, and a merge step stops
only between two words: when the largest segments of one big table merge, a word found
in most messages has its whole doclist copied in one commit (95 MB, a second of write
lock on ten million messages, measured), in whichever writer's commit FTS5 merges. No
FTS5 option bounds that copy (``automerge``, ``crisismerge``, ``usermerge`` change how
often, not how much). So the index is cut by id into tables of at most one *block* of
:data:`BLOCK` ids (the same 262,144 ids as search's windows, :data:`sessiondb.search
.HORIZON`): a merge copies at most one block's doclist (about 8 MB for the commonest
word), whatever the store's size.

**The tables.** The *tail*, ``messages_fts`` (the name the index always had, and that
hermes-agent looks for), indexes every id from its lower bound up; each *sealed* table
``messages_fts_b<lo>_<hi>`` the ids ``lo <= id < hi`` (``lo`` 0: every id below
``hi``). Together they cover every id once, and every bound is the first id of a block
(ids 1 to BLOCK, then BLOCK + 1 to 2 x BLOCK, ...), so search's windows each lie in one
table. Triggers on ``messages`` keep each table in step with the messages of its range
(the v4 triggers for the tail, with its lower bound; three more per sealed table), and
leave pending ids (:mod:`sessiondb.search_index`) alone as before. A store of fewer
than 262,144 message ids has the tail alone: the schema it always had.

**Rolling.** When the newest message comes within :data:`MARGIN` ids of the next
block, the tail is *rolled* (:func:`roll`, one short write after the write that got
there): renamed to a sealed table ending at that block, and an empty tail started at
it. No index entry moves: the tail holds no id of the next block yet (a writer that
bypasses sessiondb and writes past it leaves those ids in the tail, and the tail is
sealed at the block after the highest id it holds). The rebuild of the index and the
conversion of a hermes-agent file make the tables for the messages' blocks at once
(:func:`lay_out`), and the steps that fill them roll the tail as they go.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Optional

import apsw

from .schema import FTS_TRIGGERS, fts_table, index_prefixes, indexed_condition

#: Message ids per index table (search's windows lie within these blocks too).
BLOCK = 1 << 18
#: The tail is rolled once the newest message is this close to the next block.
MARGIN = 4096
#: The tail's name.
TAIL = "messages_fts"
_SEALED = re.compile(r"messages_fts_b(\d+)_(\d+)\Z")
_SEALED_TRIGGER = re.compile(r"(messages_fts_b\d+_\d+)_(?:insert|delete|update)\Z")
_TAIL_TRIGGERS = ("messages_fts_insert", "messages_fts_delete", "messages_fts_update")
_CACHE: "weakref.WeakKeyDictionary[apsw.Connection, tuple[int, list[Table]]]" = (
    weakref.WeakKeyDictionary())


@dataclass(frozen=True)
class Table:
    """One table of the index: the ids ``lo <= id < hi`` (None: unbounded)."""

    name: str
    lo: Optional[int]
    hi: Optional[int]

    def covers(self, rowid: int) -> bool:
        return (self.lo is None or rowid >= self.lo) and (self.hi is None or rowid < self.hi)

    def where(self, column: str) -> str:
        """The table's range as an SQL condition on ``column`` ("1" when unbounded)."""
        parts = ([] if self.lo is None else [f"{column} >= {self.lo}"]) + (
            [] if self.hi is None else [f"{column} < {self.hi}"])
        return " AND ".join(parts) or "1"


def block_start(rowid: int) -> int:
    """The first id of ``rowid``'s block."""
    return (rowid - 1) // BLOCK * BLOCK + 1


def sealed_name(lo: Optional[int], hi: int) -> str:
    return f"messages_fts_b{lo or 0}_{hi}"


def tables(conn: apsw.Connection) -> list[Table]:
    """The index's tables, newest first (the tail, then the sealed ones by their ranges
    downwards); kept per connection until the schema changes."""
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    kept = _CACHE.get(conn)
    if kept is not None and kept[0] == version:
        return kept[1]
    sealed = []
    for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name GLOB "
            "'messages_fts_b[0-9]*' AND sql LIKE 'CREATE VIRTUAL TABLE%'"):
        m = _SEALED.match(name)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            sealed.append(Table(name, lo or None, hi))
    sealed.sort(key=lambda t: t.hi or 0, reverse=True)
    found = [Table(TAIL, sealed[0].hi if sealed else None, None)] + sealed
    _CACHE[conn] = (version, found)
    return found


def table_for(conn: apsw.Connection, rowid: int) -> Table:
    """The table that indexes ``rowid``."""
    return next(t for t in tables(conn) if t.covers(rowid))


def on(table: str, sql: str) -> str:
    """``sql``, written for the tail, made to read ``table`` instead (the SQL of search
    names ``messages_fts``; each window of a search lies in one table)."""
    return sql if table == TAIL else sql.replace(TAIL, table)


def tail_max(conn: apsw.Connection) -> Optional[int]:
    """The highest id in the tail (its ``%_docsize`` table's last key), or None."""
    return conn.execute(f"SELECT max(id) FROM {TAIL}_docsize").fetchone()[0]


def _next_roll(conn: apsw.Connection) -> Optional[int]:
    """The block start where the tail is to be sealed, once the newest message comes
    within :data:`MARGIN` of it; None while it is not due."""
    held = tail_max(conn)
    if held is None:
        return None
    boundary = block_start(held) + BLOCK
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    if top is None or top < boundary - MARGIN:
        return None
    return boundary


def due(conn: apsw.Connection) -> bool:
    """True when the tail is to be rolled (:func:`roll`); read outside a transaction
    after a write: two lookups of keys' ends. False for a store without the tail (its
    index dropped by hand: doctor reports that)."""
    try:
        return _next_roll(conn) is not None
    except apsw.SQLError:
        return False


def roll(conn: apsw.Connection) -> bool:
    """Seal the tail at the next block and start an empty one there, if due (a write
    function); True if it rolled. Nothing is reindexed: the tail holds no id of that
    block."""
    boundary = _next_roll(conn)
    if boundary is None:
        return False
    seal(conn, boundary)
    return True


def seal(conn: apsw.Connection, boundary: int) -> None:
    """Rename the tail to the sealed table of its ids below ``boundary`` (none of its
    ids may be at or past it) and start an empty tail from there (in the caller's write
    transaction). The tail's view of its messages ends at ``boundary`` too (a tail
    made before 0.8 reads ``messages`` itself: it keeps doing so)."""
    lo = tables(conn)[0].lo
    prefixes = index_prefixes(conn)
    sealed = Table(sealed_name(lo, boundary), lo, boundary)
    conn.execute("".join(f"DROP TRIGGER IF EXISTS {t};" for t in _TAIL_TRIGGERS))
    conn.execute(f"ALTER TABLE {TAIL} RENAME TO {sealed.name}")
    if conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'view' AND name = ?",
                    (rows_view(lo),)).fetchone():
        _view(conn, sealed)
    conn.execute(table_triggers(sealed))
    create(conn, Table(TAIL, boundary, None), prefixes)


def rows_view(lo: Optional[int]) -> str:
    """The view a table whose ids start at ``lo`` reads its messages' text through."""
    return f"messages_fts_rows_{lo or 0}"


def _view(conn: apsw.Connection, table: Table) -> None:
    view = rows_view(table.lo)
    conn.execute(f"DROP VIEW IF EXISTS {view}")
    where = "" if table.lo is None and table.hi is None else f" WHERE {table.where('id')}"
    conn.execute(f"CREATE VIEW {view} AS SELECT id, content FROM messages{where}")


def create(conn: apsw.Connection, table: Table, prefixes: tuple[int, ...]) -> None:
    """Make an empty index table for ``table``'s range: its view of the messages, the
    FTS5 table over it, its triggers."""
    _view(conn, table)
    conn.execute(fts_table(prefixes, table.name, rows_view(table.lo)))
    conn.execute(table_triggers(table))


def table_triggers(table: Table) -> str:
    """The DDL of the triggers that keep ``table`` in step with the messages of its
    range (the v4 triggers, named as they were, for the tail)."""
    sql = FTS_TRIGGERS
    for row in ("new", "old"):
        if table.lo is not None or table.hi is not None:
            sql = sql.replace(f"WHEN {indexed_condition(row)}",
                              f"WHEN {table.where(row + '.id')} AND {indexed_condition(row)}")
    if table.name != TAIL:
        sql = sql.replace("messages_fts", table.name)
    return sql


def _sealed_triggers(conn: apsw.Connection) -> dict[str, list[str]]:
    """The sealed tables' triggers found in the schema, by the table they are named
    after: also those of a table that is gone (dropped by hand), which every write to
    ``messages`` still compiles, so that none can run until they are dropped too."""
    found: dict[str, list[str]] = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger' "
                                "AND name GLOB 'messages_fts_b[0-9]*'"):
        m = _SEALED_TRIGGER.match(name)
        if m:
            found.setdefault(m.group(1), []).append(name)
    return found


def drop_all(conn: apsw.Connection) -> list[str]:
    """Drop every index trigger and view; returns the sealed tables (to be set
    aside)."""
    sealed = [t.name for t in tables(conn)[1:]]
    names = list(_TAIL_TRIGGERS) + [t for found in _sealed_triggers(conn).values()
                                    for t in found]
    conn.execute("".join(f"DROP TRIGGER IF EXISTS {t};" for t in names))
    for (view,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'view' AND "
                                "name GLOB 'messages_fts_rows_[0-9]*'").fetchall():
        conn.execute(f"DROP VIEW {view}")
    return sealed


def lay_out(conn: apsw.Connection, prefixes: tuple[int, ...]) -> None:
    """Make a new, empty index cut into tables for the messages' blocks (in the
    caller's write transaction): a sealed table ending at the end of each block below
    the newest message's that holds messages (a run of empty blocks goes with the table
    above it), the tail above the last. Every message must be pending, and no index
    table, trigger or view left (:func:`drop_all`, then the tables set aside)."""
    # Two lookups of the key's ends: max(id) and min(id) in one SELECT read every row.
    top, bottom = conn.execute("SELECT (SELECT max(id) FROM messages), "
                               "(SELECT min(id) FROM messages)").fetchone()
    lo: Optional[int] = None
    if top is not None:
        block = block_start(bottom)
        while block + BLOCK <= block_start(top):
            hi = block + BLOCK
            create(conn, Table(sealed_name(lo, hi), lo, hi), prefixes)
            lo = hi
            block = block_start(conn.execute("SELECT min(id) FROM messages WHERE id >= ?",
                                             (hi,)).fetchone()[0])
    create(conn, Table(TAIL, lo, None), prefixes)


def checks(conn: apsw.Connection) -> list[str]:
    """FTS5's check of each table: with its content compared (rank 1) when it reads its
    own view; a table made before 0.8 and since sealed reads every message, so only its
    own structure is checked."""
    out = []
    listed = tables(conn)
    for table in listed:
        row = conn.execute("SELECT sql FROM sqlite_schema WHERE name = ?",
                           (table.name,)).fetchone()
        # A table that is gone (the tail dropped by hand) is checked all the same: the
        # check fails with "no such table", which doctor reports.
        full = row is not None and (len(listed) == 1 or f"'{rows_view(table.lo)}'" in row[0])
        out.append(f"INSERT INTO {table.name}({table.name}, rank) "
                   f"VALUES('integrity-check', {int(full)})")
    # So is a sealed table that is gone but for its triggers, which every write to the
    # messages still compiles: all of them fail until a rebuild.
    for name in sorted(set(_sealed_triggers(conn)) - {t.name for t in listed}):
        out.append(f"INSERT INTO {name}({name}, rank) VALUES('integrity-check', 0)")
    return out
