"""Listing sessions on PostgreSQL: the same two steps as :mod:`sessiondb.listing`.

A page's sessions are picked from the listing index alone (``ORDER BY started_at DESC, id
LIMIT``), then described: last activity, and the first user message read only as far as
the preview needs (``substr`` of a toasted value decompresses and reads only the slices
it returns), never a whole 10 MB message.
"""

from __future__ import annotations

import json
from typing import Any

from ..backend import Conn, rows as fetch_rows
from ..listing import INLINE_BYTES


class Head:
    """The first user message of a listed session, read only as far as asked (the
    interface of :class:`sessiondb.listing.MessageHead`)."""

    def __init__(self, conn: Conn, message_id: int | None, size: int | None,
                 inline: str | None) -> None:
        self.conn, self.message_id, self.size = conn, message_id, size
        self.inline = None if inline is None else inline.encode("utf-8", "surrogatepass")

    def read(self, nbytes: int) -> tuple[bytes | None, bool]:
        if self.message_id is None or self.size is None:
            return None, True
        if self.inline is not None:
            return self.inline[:nbytes], self.size <= nbytes
        # nbytes characters hold at least nbytes bytes
        text = self.conn.execute("SELECT substr(content, 1, ?) FROM messages WHERE id = ?",
                                 (nbytes, self.message_id)).fetchone()[0]
        return text.encode("utf-8", "surrogatepass")[:nbytes], self.size <= nbytes


def page(conn: Conn, where: list[str], args: list[Any], order: str, limit: int,
         offset: int, *, columns: str, preview_order: str) -> list[dict[str, Any]]:
    """One page of sessions ``s`` in ``order``, with ``last_active`` and ``preview`` (a
    :class:`Head`), as :func:`sessiondb.listing.page_rowids` then
    :func:`sessiondb.listing.describe` give them on SQLite."""
    ids = [r[0] for r in conn.execute(
        "SELECT s.id FROM sessions s" + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY {order} LIMIT ? OFFSET ?", (*args, limit, offset))]
    if not ids:
        return []
    rows = fetch_rows(conn, (
        f"SELECT {columns}, COALESCE((SELECT MAX(m.timestamp) FROM messages m "
        "WHERE m.session_id = s.id), s.started_at) AS last_active, "
        "pm.id AS _head_id, octet_length(pm.content) AS _head_size, "
        f"CASE WHEN octet_length(pm.content) <= {INLINE_BYTES} "
        "THEN pm.content END AS _head_inline "
        "FROM json_array_elements_text(?::json) WITH ORDINALITY AS page(id, n) "
        "JOIN sessions s ON s.id = page.id "
        "LEFT JOIN messages pm ON pm.id = (SELECT m.id FROM messages m "
        "WHERE m.session_id = s.id AND m.role = 'user' AND m.content IS NOT NULL "
        f"ORDER BY {preview_order} LIMIT 1) ORDER BY page.n"), (json.dumps(ids),))
    for row in rows:
        row["preview"] = Head(conn, row.pop("_head_id"), row.pop("_head_size"),
                              row.pop("_head_inline"))
    return rows
