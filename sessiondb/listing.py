"""Session lists at any size: pick the page of sessions first, then describe only it.

A list is a page of sessions in a fixed order, each row with ``last_active`` (the time
of its latest message, else its start) and a ``preview`` of its first user message.
Computing these two for every session that passes the filter and only then sorting and
cutting the page (one statement with correlated subqueries and ``ORDER BY ... LIMIT``,
as SQLite runs it when no index gives the order) cost 53 ms for the first page of a
source with 10,000 sessions, and an ``OFFSET`` of 10,000 cost 45 ms whatever the filter.
So a list is two statements in one read transaction:

1. :func:`page_rowids` picks the page's sessions with an ``ORDER BY ... LIMIT ...
   OFFSET`` over the sessions alone, which the listing indexes of schema v4 answer
   without reading a table row (:data:`sessiondb.schema._V4_LISTING`: the order, the
   source and the ended state are in the index). Skipping rows for an ``OFFSET`` then
   steps over index entries, nothing else.
2. :func:`describe` reads those sessions (by rowid, in the page's order: ``json_each``
   keeps the order of the array it is given) with ``last_active`` (one seek in
   ``messages(session_id, timestamp)``) and their first user message (one seek in
   ``messages(session_id, id)``).

Keyset paging (:func:`after_condition`): ``after=<id of the last session of the previous
page>`` continues right after that session in the same order, however deep, in the time
of a first page. The position is that session's ``(started_at, id)``, read when the next
page is asked for; a session started later than the list's first page was read does not
shift the following pages (an ``OFFSET`` page shifts by one for every session added in
front of it). A cursor that names no session any more raises
:class:`~sessiondb.errors.SessionNotFound`: its position is gone with it.

Previews: SQLite reads a whole value to compute anything of it but its type and size
(``substr(CAST(content AS BLOB), 1, n)`` of a 10 MB message reads all of its 10 MB), so
:func:`describe` returns a message of up to :data:`INLINE_BYTES` whole (it lies on a page
or two anyway) and of a longer one only its id and size; :class:`MessageHead` then reads
the first bytes of that one by incremental BLOB I/O, which reads only the pages those
bytes are on (https://sqlite.org/c3ref/blob_read.html).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import apsw

from .backend import first as _first
from .errors import SessionNotFound
from .text import decode_head, preview

__all__ = ["ORDER", "MessageHead", "after_condition", "describe", "page_rowids",
           "sessiondb_preview"]

#: The order of sessiondb's lists: newest first, ties by id (a total order, so a page
#: boundary and a keyset cursor are exact).
ORDER = "s.started_at DESC, s.id"
#: A first user message of up to this many bytes comes whole with the page.
INLINE_BYTES = 4096
#: Bytes read for a preview, enough for 60 characters of 4 bytes after some whitespace.
HEAD_BYTES = 1024
#: Bytes read when the first :data:`HEAD_BYTES` are mostly whitespace; past them a
#: preview is made of what was read (see :func:`sessiondb.text.preview`).
WIDE_HEAD_BYTES = 65536

RowFetcher = Callable[[apsw.Connection, str, "tuple | list"], list[dict[str, Any]]]


def page_rowids(conn: apsw.Connection, where: list[str], args: list[Any], order: str,
                limit: Any, offset: Any) -> list[int]:
    """The rowids of one page of sessions ``s`` in ``order``.

    :param where: conditions on sessions ``s`` (ANDed), with their ``args``.
    :param limit: SQL LIMIT (negative: no limit); ``offset``: SQL OFFSET.
    """
    sql = ("SELECT s.rowid FROM sessions s" + (" WHERE " + " AND ".join(where) if where
                                                 else "") + f" ORDER BY {order} LIMIT ? OFFSET ?")
    return [r[0] for r in conn.execute(sql, (*args, limit, offset))]


def after_condition(conn: apsw.Connection, after: str) -> tuple[str, list[Any]]:
    """The condition on sessions ``s`` that keeps those after session ``after`` in
    :data:`ORDER` (a range of the listing index: ``started_at <= x`` bounds it).

    :raises SessionNotFound: no session has the id ``after`` (any more).
    """
    started = _first(conn, "SELECT started_at FROM sessions WHERE id = ?", (after,))
    if started is None:
        raise SessionNotFound(after, f"session {after!r}, the cursor (after=) of this "
                                     "page, does not exist (any more); list again from the "
                                     "first page, or page by offset")
    return ("s.started_at <= ? AND (s.started_at < ? OR s.id > ?)",
            [started, started, after])


@dataclass
class MessageHead:
    """The first user message of a listed session, read only as far as asked.

    :ivar message_id: its rowid; None when the session has no user message with content.
    :ivar size: its size in bytes.
    :ivar inline: all of its bytes when it is small (:data:`INLINE_BYTES`), else None.
    """

    conn: apsw.Connection
    message_id: int | None
    size: int | None
    inline: bytes | None

    def read(self, nbytes: int) -> tuple[bytes | None, bool]:
        """Its first ``nbytes`` bytes (None without a message), and whether they are
        all of it. Must run in the read transaction that listed the session."""
        if self.message_id is None or self.size is None:
            return None, True
        if self.inline is not None:
            return self.inline[:nbytes], self.size <= nbytes
        blob = self.conn.blob_open("main", "messages", "content", self.message_id, False)
        try:
            return blob.read(min(nbytes, self.size)), self.size <= nbytes
        finally:
            blob.close()


def describe(conn: apsw.Connection, fetch: RowFetcher, rowids: list[int], *,
             columns: str, preview_order: str) -> list[dict[str, Any]]:
    """The sessions ``rowids`` in that order, as rows of ``columns`` (of sessions ``s``)
    plus ``last_active`` and ``preview``: a :class:`MessageHead` of the first user
    message with content, first in ``preview_order`` (of messages ``m``).

    :param fetch: turns a statement into rows (dicts in column order).
    """
    if not rowids:
        return []
    sql = (
        f"SELECT {columns}, COALESCE((SELECT MAX(m.timestamp) FROM messages m "
        "WHERE m.session_id = s.id), s.started_at) AS last_active, "
        "pm.id AS _head_id, octet_length(pm.content) AS _head_size, "
        f"CASE WHEN octet_length(pm.content) <= {INLINE_BYTES} "
        "THEN CAST(pm.content AS BLOB) END AS _head_inline "
        "FROM json_each(?) AS page JOIN sessions s ON s.rowid = page.value "
        "LEFT JOIN messages pm ON pm.id = (SELECT m.id FROM messages m "
        "WHERE m.session_id = s.id AND m.role = 'user' AND m.content IS NOT NULL "
        f"ORDER BY {preview_order} LIMIT 1) ORDER BY page.key"
    )
    rows = fetch(conn, sql, (json.dumps(rowids),))
    for row in rows:
        row["preview"] = MessageHead(conn, row.pop("_head_id"), row.pop("_head_size"),
                                     row.pop("_head_inline"))
    return rows


def sessiondb_preview(head: MessageHead) -> str:
    """sessiondb's preview of a first user message (:func:`sessiondb.text.preview`),
    from its first :data:`HEAD_BYTES`, or :data:`WIDE_HEAD_BYTES` when those are mostly
    whitespace; ``""`` without one."""
    data, whole = head.read(HEAD_BYTES)
    if data is None:
        return ""
    text = preview(decode_head(data, whole=whole), whole=whole, final=False)
    if text is None:
        data, whole = head.read(WIDE_HEAD_BYTES)
        text = preview(decode_head(data or b"", whole=whole), whole=whole)
    assert text is not None
    return text
