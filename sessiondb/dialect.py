"""SQLite's :class:`~sessiondb.backend.Dialect`: the SQL that differs from PostgreSQL's."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from . import bulk, listing, search
from .backend import Conn, rows
from .schema import MESSAGE_TOTAL_SQL
from .text import NO_LIMIT, sanitize_fts_query


class SQLiteDialect:
    name = "sqlite"
    #: A JSON array parameter as a table: json_each reads it in one pass (a long
    #: ``IN (?, ?, ...)`` list would hit the parameter limit and defeat the statement cache).
    in_list = "(SELECT value FROM json_each(?))"
    in_id_list = in_list  #: the same, of integers
    #: Deleted rows' pages go back to the file system in steps (reclaim_space).
    reclaims_space = True
    #: The number of messages, kept by triggers (see :mod:`sessiondb.schema`).
    message_total = MESSAGE_TOTAL_SQL
    #: Row locks for a checked row, and for passing over rows being changed: none
    #: (BEGIN IMMEDIATE admits one writer at a time).
    #: Whether the database itself refuses an integer or float overflow (SQLite turns
    #: one into an imprecise REAL or Inf: the rules check sums first).
    refuses_overflow = False
    for_update = ""
    skip_locked = ""
    #: Bulk imports defer full-text indexing and catch up in steps (sessiondb.bulk).
    defers_index = True

    def lock(self, conn: Conn, *keys: str) -> None:
        """Nothing: ``BEGIN IMMEDIATE`` already admits one writer at a time."""

    def update_session(self, conn: Conn, key: str, assignments: str, args: list[Any],
                       session_id: str) -> bool:
        """``UPDATE sessions SET <assignments> WHERE id = session_id`` after taking the
        lock ``key`` (nothing to take here); whether the session exists."""
        conn.execute(f"UPDATE sessions SET {assignments} WHERE id = ?", (*args, session_id))
        return conn.changes() > 0

    def insert_for_session(self, conn: Conn, key: str, assignments: str, args: list[Any],
                           session_id: str, table: str, row: dict[str, Any]) -> int | None:
        """:meth:`update_session`, then the INSERT if the session exists: two statements
        (SQLite has no INSERT inside WITH, and a statement costs no round trip here)."""
        if not self.update_session(conn, key, assignments, args, session_id):
            return None
        return conn.execute(f"INSERT INTO {table} ({', '.join(row)}) VALUES "
                            f"({', '.join('?' * len(row))}) RETURNING id",
                            tuple(row.values())).fetchone()[0]

    def now(self, conn: Conn) -> float:
        return time.time()

    def list_arg(self, values: Iterable[Any]) -> Any:
        return json.dumps(list(values))

    def starts_with(self, column: str, prefix: str, fold: bool = False
                    ) -> tuple[str, list[Any]]:
        """SQL true when ``column`` starts with ``prefix`` (ASCII case folded with
        ``fold``), and its arguments. Byte prefixes, not LIKE: LIKE reads pattern and
        value as C strings, so a NUL ended both, and it refuses patterns over 50,000
        bytes; lower() folds ASCII only, as LIKE does."""
        size = len(prefix.encode("utf-8", "surrogatepass"))
        if fold:
            return (f"substr(CAST(lower({column}) AS BLOB), 1, ?) = CAST(lower(?) AS BLOB)",
                    [size, prefix])
        return (f"substr(CAST({column} AS BLOB), 1, ?) = ?",
                [size, prefix.encode("utf-8", "surrogatepass")])

    def list_page(self, conn: Conn, where: list[str], args: list[Any], order: str,
                  limit: int, offset: int, *, columns: str, preview_order: str
                  ) -> list[dict[str, Any]]:
        """One page of sessions (:mod:`sessiondb.listing`)."""
        rowids = listing.page_rowids(conn, where, args, order, limit, offset)
        return listing.describe(conn, rows, rowids, columns=columns,
                                preview_order=preview_order)

    def store_bytes(self, conn: Conn) -> int:
        """Bytes of the database (pages in use and free)."""
        return int(conn.pragma("page_count")) * int(conn.pragma("page_size"))

    def unindexed(self, column: str) -> str:
        """``column`` in a condition the planner must not use an index for."""
        return "+" + column

    def assign_ids(self, conn: Conn, messages: list[tuple], assign: Any) -> list[tuple]:
        """Imported messages with their ids (:func:`sessiondb.bulk._assign_ids`), above
        the highest id AUTOINCREMENT has given."""
        top = conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), "
            "0), coalesce((SELECT max(id) FROM messages), 0))").fetchone()[0]
        return assign(conn, messages, top, self.in_list)

    def ids_used(self, conn: Conn) -> None:
        """After messages were inserted with explicit ids: nothing (AUTOINCREMENT
        records the highest id itself)."""

    def import_context(self, read: Any) -> Any:
        """Around a bulk import: a larger page cache (:func:`sessiondb.bulk.larger_cache`)."""
        return bulk.larger_cache(read)

    def search(self, conn: Conn, path: Any, query: str, filters: search.Filters,
               limit: int, offset: int) -> list[dict[str, Any]]:
        """Full-text search with FTS5 (:mod:`sessiondb.search`)."""
        match = sanitize_fts_query(query)
        if not match:
            return []
        return search.search_messages(conn, path, match, filters,
                                      -1 if limit == NO_LIMIT else limit, offset)


SQLITE = SQLiteDialect()
