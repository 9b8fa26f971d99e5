"""The full-text index cut into one FTS5 table per block of message ids (SQLite).

FTS5 merges an index's segments level by level as it grows, and a merge step stops
only between two words: when the largest segments of one big table merge, a word found
in most messages has its whole doclist copied in one commit (95 MB, a second of write
lock on ten million messages, measured), in whichever writer's commit FTS5 merges. No
FTS5 option bounds that copy (``automerge``, ``crisismerge``, ``usermerge`` change how
often, not how much). So the index is cut by id into tables of one *block* of
:data:`BLOCK` ids (the same 262,144 ids as search's windows, :data:`sessiondb.search
.HORIZON`): a merge copies at most one block's doclist (about 8 MB for the commonest
word), whatever the store's size.

**The tables.** Each table is named after the first id of its range: ``messages_fts``
(the name the index always had, and that hermes-agent looks for) holds the lowest ids,
``messages_fts_<lo>`` those from ``lo`` up to the next table's ``lo``; the newest table,
the *tail*, every id from its ``lo`` up. Together they cover every id once, and every
``lo`` is the first id of a block (ids 1 to BLOCK, then BLOCK + 1 to 2 x BLOCK, ...), so
search's windows each lie in one table. Each table reads its messages through a view of
its range (``messages_fts_rows_<lo>``), so that FTS5's content check compares it with
them alone; triggers on ``messages`` keep each table in step with the messages of its
range (the v4 triggers, bounded, for ``messages_fts``; three more per table), and leave
pending ids (:mod:`sessiondb.search_index`) alone as before. A store of fewer than
262,144 message ids has ``messages_fts`` alone: the schema it always had.

**Sealing.** When the newest message comes within :data:`MARGIN` ids of the next
block, the tail is *sealed* (:func:`roll`, one short write after the write that got
there): its view and triggers are bounded at that block, and an empty tail is made
from it. No index entry moves, and no table is renamed (a rename rewrites the whole
schema: 33 ms with 40 tables, measured): the tail holds no id of the next block yet (a
writer that bypasses sessiondb and writes past it leaves those ids in the tail, which
is then sealed at the block after the highest id it holds). The rebuild of the index
and the conversion of a hermes-agent file make the tables for the messages' blocks at
once (:func:`lay_out`); the steps that index pending messages seal the tail as they go.
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
#: The tail is sealed once the newest message is this close to the next block.
MARGIN = 4096
#: The table of the lowest ids (the only one below one block).
FIRST = "messages_fts"
_LATER = re.compile(r"messages_fts_(\d+)\Z")
_TRIGGER = re.compile(r"(messages_fts(?:_\d+)?)_(?:insert|delete|update)\Z")
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


def table_name(lo: Optional[int]) -> str:
    """The name of the table whose range starts at ``lo`` (None: the lowest ids)."""
    return FIRST if lo is None else f"{FIRST}_{lo}"


def tables(conn: apsw.Connection) -> list[Table]:
    """The index's tables, newest first (the tail first); kept per connection until the
    schema changes."""
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    kept = _CACHE.get(conn)
    if kept is not None and kept[0] == version:
        return kept[1]
    starts: list[Optional[int]] = [None]
    for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name GLOB "
            "'messages_fts_[0-9]*' AND sql LIKE 'CREATE VIRTUAL TABLE%'"):
        m = _LATER.match(name)
        if m:
            starts.append(int(m.group(1)))
    starts[1:] = sorted(starts[1:])  # type: ignore[type-var]
    found = [Table(table_name(lo), lo, hi) for lo, hi in zip(starts, starts[1:] + [None])]
    found.reverse()
    _CACHE[conn] = (version, found)
    return found


def table_for(conn: apsw.Connection, rowid: int) -> Table:
    """The table that indexes ``rowid``."""
    return next(t for t in tables(conn) if t.covers(rowid))


def on(table: str, sql: str) -> str:
    """``sql``, written for ``messages_fts``, made to read ``table`` instead (the SQL of
    search names ``messages_fts``; each window of a search lies in one table)."""
    return sql if table == FIRST else sql.replace(FIRST, table)


def varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's varint (big-endian 7-bit groups; a ninth byte counts 8 bits) at ``at``,
    and the offset after it."""
    value = 0
    for i in range(8):
        byte = data[at + i]
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + i + 1
    return (value << 8) | data[at + 8], at + 9


def averages(conn: apsw.Connection, table: str) -> tuple[int, int]:
    """The rows and tokens of ``table``, from its averages record (``%_data`` row 1: a
    varint of rows, then one of tokens per column; see SQLite's fts5_index.c). Inside
    a write transaction that changed the table, FTS5's own figures may be ahead of
    these by the changes not flushed yet."""
    blob = conn.execute(f"SELECT block FROM {table}_data WHERE id = 1").fetchone()
    if not blob or not blob[0]:
        return 0, 0
    rows, at = varint(blob[0], 0)
    return rows, varint(blob[0], at)[0]


def tail_max(conn: apsw.Connection) -> Optional[int]:
    """The highest id in the tail (its ``%_docsize`` table's last key), or None."""
    return conn.execute(f"SELECT max(id) FROM {tables(conn)[0].name}_docsize").fetchone()[0]


def _next_seal(conn: apsw.Connection) -> Optional[int]:
    """The block start where the tail is to be sealed, once the newest message comes
    within :data:`MARGIN` of it; None while it is not due."""
    held = tail_max(conn)
    if held is None:
        return None
    boundary = block_start(held) + BLOCK
    top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    if top is None or top < boundary - MARGIN or boundary <= 1:
        return None
    return boundary


def due(conn: apsw.Connection) -> bool:
    """True when the tail is to be sealed (:func:`roll`); read after a write, outside
    its transaction: two lookups of keys' ends and a pragma."""
    return _next_seal(conn) is not None


def roll(conn: apsw.Connection) -> bool:
    """Seal the tail at the next block and make an empty one there, if due (a write
    function); True if it did."""
    boundary = _next_seal(conn)
    if boundary is None:
        return False
    seal(conn, boundary)
    return True


def seal(conn: apsw.Connection, boundary: int) -> None:
    """Bound the tail below ``boundary`` (none of its ids may be at or past it) and make
    an empty tail from there (in the caller's write transaction). The tail's view of its
    messages is bounded too (a table made before 0.8 reads ``messages`` itself: it keeps
    doing so)."""
    tail = tables(conn)[0]
    sealed = Table(tail.name, tail.lo, boundary)
    conn.execute("".join(f"DROP TRIGGER IF EXISTS {tail.name}_{op};"
                         for op in ("insert", "delete", "update")))
    if conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'view' AND name = ?",
                    (rows_view(tail.lo),)).fetchone():
        _view(conn, sealed)
    conn.execute(table_triggers(sealed))
    create(conn, Table(table_name(boundary), boundary, None), index_prefixes(conn))


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
    range (for ``messages_fts``, the v4 triggers, named as they were)."""
    sql = FTS_TRIGGERS
    for row in ("new", "old"):
        if table.lo is not None or table.hi is not None:
            sql = sql.replace(f"WHEN {indexed_condition(row)}",
                              f"WHEN {table.where(row + '.id')} AND {indexed_condition(row)}")
    return on(table.name, sql)


def _triggers(conn: apsw.Connection) -> dict[str, list[str]]:
    """The index triggers found in the schema, by the table they are named after: also
    those of a table that is gone (dropped by hand), which every write to ``messages``
    still compiles, so that none can run until they are dropped too."""
    found: dict[str, list[str]] = {}
    for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger' "
                                "AND name GLOB 'messages_fts*'"):
        m = _TRIGGER.match(name)
        if m:
            found.setdefault(m.group(1), []).append(name)
    return found


def drop_all(conn: apsw.Connection) -> list[str]:
    """Drop every index trigger and view; returns the index tables (to be set aside),
    ``messages_fts`` among them."""
    names = [t for found in _triggers(conn).values() for t in found]
    conn.execute("".join(f"DROP TRIGGER IF EXISTS {t};" for t in names))
    for (view,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'view' AND "
                                "name GLOB 'messages_fts_rows_[0-9]*'").fetchall():
        conn.execute(f"DROP VIEW {view}")
    return [t.name for t in tables(conn)]


def lay_out(conn: apsw.Connection, prefixes: tuple[int, ...]) -> None:
    """Make a new, empty index cut into tables for the messages' blocks (in the
    caller's write transaction): a table for each block below the newest message's that
    holds messages (a run of empty blocks goes with the table above it), the tail above
    the last. Every message must be pending, and no index table, trigger or view left
    (:func:`drop_all`, then the tables set aside)."""
    # Two lookups of the key's ends: max(id) and min(id) in one SELECT read every row.
    top, bottom = conn.execute("SELECT (SELECT max(id) FROM messages), "
                               "(SELECT min(id) FROM messages)").fetchone()
    lo: Optional[int] = None
    if top is not None:
        block = block_start(bottom)
        while block + BLOCK <= block_start(top):
            hi = block + BLOCK
            if hi > 1:  # ids below 1 (only foreign SQL writes them) go with the first
                create(conn, Table(table_name(lo), lo, hi), prefixes)
                lo = hi
            block = block_start(conn.execute("SELECT min(id) FROM messages WHERE id >= ?",
                                             (hi,)).fetchone()[0])
    create(conn, Table(table_name(lo), lo, None), prefixes)


def checks(conn: apsw.Connection) -> list[str]:
    """FTS5's check of each table: with its content compared (rank 1) when it reads its
    own view; a table made before 0.8 and since sealed reads every message, so only its
    own structure is checked. A table that is gone but for its triggers (dropped by
    hand) gets a check too, which fails with "no such table"."""
    out = []
    listed = tables(conn)
    for table in listed:
        row = conn.execute("SELECT sql FROM sqlite_schema WHERE name = ?",
                           (table.name,)).fetchone()
        full = row is not None and (len(listed) == 1 or f"'{rows_view(table.lo)}'" in row[0])
        out.append(f"INSERT INTO {table.name}({table.name}, rank) "
                   f"VALUES('integrity-check', {int(full)})")
    for name in sorted(set(_triggers(conn)) - {t.name for t in listed}):
        out.append(f"INSERT INTO {name}({name}, rank) VALUES('integrity-check', 0)")
    return out
