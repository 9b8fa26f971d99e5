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
* ``sessiondb doctor --repair`` (``SessionDB.rebuild_search_index``) rebuilds the index
  from the messages, which it only reads, in short steps (below), and removes the mark.
"""

from __future__ import annotations

import bisect
import re
import time
from typing import Callable

import apsw

from . import fts_tables
from .errors import SearchIndexError
from .maintenance import ProgressCallback, Step, Tracker, byte_budget, fit_bytes
from .schema import (
    CONVERSION, MESSAGE_TOTAL_SQL, PEND_EVERY_MESSAGE, REBUILDING, TOTALS,
    index_prefixes, junk_tables, set_aside_index,
)

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
    """:raises SearchIndexError: the index is marked damaged, or is being rebuilt (a
    search would miss the messages not indexed yet)."""
    note = damage_note(conn)
    if note is not None:
        raise SearchIndexError(
            f"the full-text index of {path} is damaged ({note}); messages are intact and "
            f"still being written: run `sessiondb doctor --repair --db {path}` to rebuild it")
    why = rebuilding(conn)
    if why is not None:
        left = pending_ids(conn)
        raise SearchIndexError(
            f"the full-text index of {path} is being rebuilt ({why}; up to {left:,} "
            "messages still to index); search answers again when it is done. If no process is "
            f"rebuilding it, run `sessiondb doctor --repair --db {path}` to finish it")


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


# -- building the index in short steps ---------------------------------------------
#
# Messages whose ids lie in a range of ``sessiondb_fts_pending`` are not in the index and
# the triggers leave them alone (see sessiondb.schema, v4); everything else is. So every
# commit leaves the index consistent with the messages outside the ranges, and
# :func:`index_step` shrinks the ranges a chunk at a time. A full rebuild sets the old
# index table aside (renamed: dropping a large one is one long statement), starts an
# empty one with every message pending, and empties the old one in steps too
# (:func:`junk_step`, before the indexing, which reuses its pages). While it runs, the
# ``fts_rebuilding`` mark makes search refuse to answer from a partial index; a bulk
# import defers only its own messages and leaves search answering (its messages become
# searchable as they are indexed).

_CHUNK = 100  # messages indexed per statement: a few ms each, so steps end on time
_PER_SECOND = 4000  # a cautious indexing rate (20,000/s measured for 1 KB messages)
_JUNK_ROWS = 500  # rows of an old index deleted per statement at most
_JUNK_PER_SECOND = 40_000  # a cautious rate (230,000/s measured at ten million messages)


def begin_rebuild(conn: apsw.Connection, reason: str,
                  prefixes: tuple[int, ...] | None = None) -> None:
    """Start a full rebuild (a write function): the index tables set aside, empty ones
    for the messages' blocks in their place (:func:`sessiondb.fts_tables.lay_out`) with
    every message pending, the damage mark replaced by the
    ``fts_rebuilding`` mark. Finish it with :func:`index_step` and :func:`junk_step`.

    :param prefixes: prefix index lengths of the new table; None keeps the old table's.
    """
    if prefixes is None:
        prefixes = index_prefixes(conn)
    for name in fts_tables.drop_all(conn):
        set_aside_index(conn, name)
    conn.execute("DELETE FROM sessiondb_fts_pending")
    conn.execute(PEND_EVERY_MESSAGE)
    fts_tables.lay_out(conn, prefixes)
    conn.execute("DELETE FROM sessiondb_meta WHERE key = ?", (_KEY,))
    conn.execute("INSERT OR REPLACE INTO sessiondb_meta (key, value) VALUES (?, ?)",
                 (REBUILDING, reason))


def defer(conn: apsw.Connection, lo: int, hi: int) -> None:
    """Leave the messages with ids ``lo..hi`` out of the index for now (a bulk import
    calls this before inserting them; no message may exist in that range yet, or its
    index entry could never be deleted). Joins a range that ends at ``lo - 1``."""
    before = conn.execute("SELECT lo FROM sessiondb_fts_pending WHERE hi = ?",
                          (lo - 1,)).fetchone()
    if before is not None:
        conn.execute("UPDATE sessiondb_fts_pending SET hi = ? WHERE lo = ?", (hi, before[0]))
    else:
        conn.execute("INSERT INTO sessiondb_fts_pending (lo, hi) VALUES (?, ?)", (lo, hi))


def defer_ids(conn: apsw.Connection, ids: list[int]) -> bool:
    """Leave the messages about to be inserted with ``ids`` (sorted, distinct, none of
    them taken) out of the index for now; a bulk import calls this in the transaction
    that inserts them, so that they are indexed later, in steps, at the stepper's
    speed rather than the triggers'.

    Every id ends up in a pending range: one that covers it already, or a new one that
    spans ids of the list with no message in between (a range may only be made where no
    message exists yet, see :func:`defer`); a new range is joined with its neighbours
    when no message lies between them, so that an import keeps one range, not one per
    step. Returns True if any id is pending now (then :func:`catch_up` indexes them),
    that is whenever ``ids`` is not empty: every one of them is pending then
    (:func:`insert_pending` relies on it).
    """
    pending = False
    i, n = 0, len(ids)
    while i < n:
        first = ids[i]
        below = conn.execute("SELECT lo, hi FROM sessiondb_fts_pending WHERE lo <= ? "
                             "ORDER BY lo DESC LIMIT 1", (first,)).fetchone()
        if below is not None and below[1] >= first:  # covered already
            i = bisect.bisect_right(ids, below[1], i)
            pending = True
            continue
        # None of ``ids`` exists yet, so the next message after ``first`` is someone
        # else's: the range stops before it, and before the next range.
        after = conn.execute("SELECT (SELECT min(id) FROM messages WHERE id > ?), "
                             "(SELECT min(lo) FROM sessiondb_fts_pending WHERE lo > ?)",
                             (first, first)).fetchone()
        stop = min((v for v in after if v is not None), default=None)
        j = n if stop is None else bisect.bisect_left(ids, stop, i)
        lo, hi = first, ids[j - 1]
        if below is not None and not conn.execute(
                "SELECT 1 FROM messages WHERE id > ? AND id < ? LIMIT 1",
                (below[1], lo)).fetchone():
            lo = below[0]
            conn.execute("DELETE FROM sessiondb_fts_pending WHERE lo = ?", (lo,))
        above, next_message = after[1], after[0]
        if above is not None and (next_message is None or next_message >= above):
            hi = conn.execute("SELECT hi FROM sessiondb_fts_pending WHERE lo = ?",
                              (above,)).fetchone()[0]
            conn.execute("DELETE FROM sessiondb_fts_pending WHERE lo = ?", (above,))
        conn.execute("INSERT INTO sessiondb_fts_pending (lo, hi) VALUES (?, ?)", (lo, hi))
        pending = True
        i = j
    return pending


#: The triggers sessiondb keeps on ``messages``: the message total's and the index's.
_OWN_TRIGGER = re.compile(r"messages_total_(?:insert|delete)\Z"
                          r"|messages_fts(?:_\d+)?_(?:insert|delete|update)\Z")
_TOTAL_INSERT = "messages_total_insert"


def insert_pending(conn: apsw.Connection, insert: Callable[[], None]) -> None:
    """Run ``insert``, INSERTs of messages whose ids are all pending (:func:`defer_ids`,
    in the same transaction), with ``conn``'s triggers off, when the only triggers on
    ``messages`` are sessiondb's (known by their names). For those rows the index's
    triggers do nothing (the ids are pending) and the total's adds one per row, which
    this adds once at the end instead. Any trigger costs SQLite a subprogram per row: a
    bulk import's rows went in about 20% faster without (200,000 rows of 1 KB,
    measured). ``SQLITE_DBCONFIG_ENABLE_TRIGGER`` is a setting of the connection alone:
    other connections, and this one after the call (also after an error or an
    interrupt), fire them as always. With a trigger of anyone else's on ``messages``,
    or any TEMP trigger (which the setting does not turn off), ``insert`` runs as it
    is."""
    names = [name for (name,) in conn.execute(
        "SELECT name FROM sqlite_schema WHERE type = 'trigger' "
        "AND tbl_name = 'messages' COLLATE NOCASE")]
    if not all(_OWN_TRIGGER.match(name) for name in names) or _temp_triggers(conn):
        insert()
        return
    was = conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, -1)
    before = conn.total_changes()
    try:
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
        insert()
    finally:
        conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, was)
    if _TOTAL_INSERT in names:
        conn.execute(f"UPDATE {TOTALS} SET value = value + ? WHERE name = 'messages'",
                     (conn.total_changes() - before,))


def _temp_triggers(conn: apsw.Connection) -> bool:
    """Whether ``conn`` has TEMP triggers (its temp schema is looked at only when it has
    one: reading ``sqlite_temp_schema`` would make it)."""
    return conn.execute("SELECT 1 FROM pragma_database_list WHERE name = 'temp'").fetchone(
        ) is not None and conn.execute("SELECT 1 FROM sqlite_temp_schema WHERE type = "
                                       "'trigger' LIMIT 1").fetchone() is not None


def index_step(conn: apsw.Connection, deadline: float) -> int:
    """Index pending messages, lowest ids first, until ``deadline`` (``time.monotonic``;
    at least one chunk); clears the ``fts_rebuilding`` mark with the last one (a write
    function for :func:`sessiondb.maintenance.run_steps`). Returns how many were
    indexed; 0 when nothing is pending."""
    done = 0
    while True:
        row = conn.execute("SELECT lo, hi FROM sessiondb_fts_pending "
                           "ORDER BY lo LIMIT 1").fetchone()
        if row is None:
            conn.execute("DELETE FROM sessiondb_meta WHERE key = ?", (REBUILDING,))
            return done
        lo, hi = row
        # From the range's first message: a range may span empty blocks (an import of
        # ids far apart), which would otherwise be walked one block per loop.
        first = conn.execute("SELECT min(id) FROM messages WHERE id >= ? AND id <= ?",
                             (lo, hi)).fetchone()[0]
        if first is None:
            conn.execute("DELETE FROM sessiondb_fts_pending WHERE lo = ?", (lo,))
            continue
        if first != lo:
            conn.execute("UPDATE sessiondb_fts_pending SET lo = ? WHERE lo = ?", (first, lo))
            lo = first
        table = _table_for(conn, lo)
        # A smaller chunk when little time is left (a small hold bound), in messages
        # and in bytes: FTS5 tokenizes every byte, so a count alone let a chunk of large
        # messages (100 of 1 MB) hold the lock for seconds, past any hold bound.
        chunk = max(10, min(_CHUNK, int((deadline - time.monotonic()) * _PER_SECOND)))
        rows = conn.execute(
            "SELECT id, octet_length(content) FROM messages WHERE id >= ? AND id <= ? "
            "ORDER BY id LIMIT ?", (lo, hi, chunk)).fetchall()
        ids = fit_bytes(rows, byte_budget(deadline))
        upto = ids[-1] if len(ids) < len(rows) or len(rows) == chunk else hi
        upto = min(upto, table.hi - 1 if table.hi is not None
                   else fts_tables.block_start(lo) + fts_tables.BLOCK - 1)
        ids = [i for i in ids if i <= upto]
        conn.execute(f"INSERT INTO {table.name} (rowid, content) SELECT id, content "
                     "FROM messages WHERE id >= ? AND id <= ?", (lo, upto))
        if upto >= hi:
            conn.execute("DELETE FROM sessiondb_fts_pending WHERE lo = ?", (lo,))
        else:  # the key moves: a range is keyed by its first id
            conn.execute("UPDATE sessiondb_fts_pending SET lo = ? WHERE lo = ?",
                         (upto + 1, lo))
        done += len(ids)
        # Not on nothing done: run_steps takes 0 for "finished", and a range whose
        # messages were all deleted meanwhile indexes none (the next one is cheap).
        if done and time.monotonic() >= deadline:
            return done


def _table_for(conn: apsw.Connection, rowid: int) -> fts_tables.Table:
    """The table to index ``rowid`` into: the one whose range holds it; the tail is
    first sealed below ``rowid``'s block if it holds ids of an earlier block (so that a
    table holds one block's ids, as the triggers' roll keeps it)."""
    table = fts_tables.table_for(conn, rowid)
    if table.hi is None:
        held = fts_tables.tail_max(conn)
        start = fts_tables.block_start(rowid)
        # Never at or below id 1: ids <= 0 (imported id 0, foreign SQL) go with the
        # first table, as the triggers' roll and the rebuild's layout keep them.
        if held is not None and held < start and start > 1:
            fts_tables.seal(conn, start)
            table = fts_tables.table_for(conn, rowid)
    return table


def junk_step(conn: apsw.Connection, deadline: float) -> int:
    """Empty the set-aside index tables a batch of rows at a time until ``deadline``,
    dropping each once empty (a write function). Returns the rows and tables removed; 0
    when there is nothing left."""
    done = 0
    for table in junk_tables(conn):
        # Not the config table: dropping the virtual table reads it.
        for shadow in ("data", "docsize", "idx", "content"):
            name = f"{table}_{shadow}"
            if not conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?",
                                (name,)).fetchone():
                continue
            while True:
                # Every shadow table has a rowid except idx (WITHOUT ROWID), which is
                # small (a row per leaf page): it goes in one statement.
                if shadow == "idx":
                    conn.execute(f'DELETE FROM "{name}"')
                    done += conn.changes()
                    break
                # Fewer rows when little time is left: a statement cannot stop midway,
                # and a step retried with half its budget after overrunning the hold
                # bound must get a smaller one.
                rows = max(16, min(_JUNK_ROWS, int((deadline - time.monotonic())
                                                   * _JUNK_PER_SECOND)))
                conn.execute(f'DELETE FROM "{name}" WHERE rowid IN (SELECT rowid FROM '
                             f'"{name}" LIMIT {rows})')
                removed = conn.changes()
                done += removed
                if not removed:
                    break
                if time.monotonic() >= deadline:
                    return done
        conn.execute(f'DROP TABLE "{table}"')
        done += 1
        if time.monotonic() >= deadline:
            return done
    return done


def pending_ids(conn: apsw.Connection) -> int:
    """How many message ids the pending ranges span: an upper bound of the messages
    waiting to be indexed, read at once (counting them reads every one)."""
    return int(conn.execute("SELECT coalesce(sum(hi - lo + 1), 0) "
                            "FROM sessiondb_fts_pending").fetchone()[0])


def pending_total(conn: apsw.Connection) -> int:
    """How many messages wait to be indexed, at most, read at once: the ids the pending
    ranges span, or every message when that is fewer (a rebuild or a conversion: every
    message is pending). For the total of a progress bar: counting them
    (:func:`pending_messages`) reads every pending message, which on ten million
    messages held a read transaction open for about half a minute, so that no
    checkpoint could reset the WAL meanwhile and every other process's write waited
    for its reset (1 s each, measured)."""
    total = conn.execute(MESSAGE_TOTAL_SQL).fetchone()
    spanned = pending_ids(conn)
    return spanned if total is None else min(spanned, int(total[0]))


def pending_messages(conn: apsw.Connection) -> int:
    """How many messages wait to be indexed."""
    return int(conn.execute(
        "SELECT coalesce(sum((SELECT count(*) FROM messages WHERE id >= lo AND id <= hi)), 0) "
        "FROM sessiondb_fts_pending").fetchone()[0])


def rebuilding(conn: apsw.Connection) -> str | None:
    """Why the whole index is being rebuilt, or None when it is not."""
    row = conn.execute("SELECT value FROM sessiondb_meta WHERE key = ?",
                       (REBUILDING,)).fetchone()
    return None if row is None else str(row[0])


def finish_on_open(conn: apsw.Connection) -> bool:
    """True when the store holds work that any process opening it finishes: the index of
    a converted hermes-agent file, or set-aside index tables that a run cut short (a
    kill while they were being emptied) left behind. Without the second, nothing would
    ever remove them: the rebuild's mark is gone with its last index step, so no rerun
    knows that it was cut short, and the old index keeps its space for good. (A
    requested rebuild cut short earlier is left to its rerun, which removes them too.)"""
    why = rebuilding(conn)
    return why == CONVERSION or (why is None and bool(junk_tables(conn)))


def catch_up(run: Callable[[Step, Tracker], int], progress: ProgressCallback | None = None,
             total: int | None = None) -> int:
    """Remove set-aside index tables, then index every pending message, in short steps;
    returns the messages indexed.

    The old index goes first so that the new one is written into its pages: SQLite
    takes free pages before it grows the file. Removed last, it left them all free: 7.7
    million pages after a rebuild of ten million messages (the file grew by the new
    index meanwhile), after which a prune crawled, every page it gave back looked for
    along that freelist (measured). Giving them back as they were freed instead made a
    rebuild of 100,000 messages take 43 s rather than 23 s (each page moved from the
    end of the file into the hole); written into, they cost nothing.

    :param run: runs a step function to the end (the engine's ``_run_steps``).
    :param total: the pending count for progress reports, if the caller knows it.
    """
    run(junk_step, Tracker("cleanup", "rows", None, progress))
    return run(index_step, Tracker("index", "messages", total, progress))
