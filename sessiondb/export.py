"""Export: whole stores out a batch of sessions at a time, with bounded memory.

:func:`export_batches` reads sessions oldest first in batches of at most
:data:`EXPORT_BATCH_SESSIONS` sessions or about :data:`EXPORT_BATCH_MESSAGES` messages,
each batch in one short snapshot (a session is read consistently with its messages; the
export as a whole is not one snapshot unless it runs inside ``snapshot()``). One
session is never split, so memory is bounded by the largest session.

A parent comes before its children, as an import needs (it holds a child whose parent
has not come yet in memory, and refuses past a bound: :mod:`sessiondb.bulk`). Oldest
first gives that order unless a parent started after a child (an import may make such
a pair; so may the clocks of two hosts): such a parent is read out of its turn, right
before the first of its children, and skipped at its turn.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from . import records
from .backend import Conn, Dialect, rows as fetch_rows

EXPORT_BATCH_SESSIONS = 200
EXPORT_BATCH_MESSAGES = 5_000

Read = Callable[..., Any]


def export_batch(conn: Conn, source: Optional[str],
                 after: Optional[tuple[float, str]], sql: Dialect) -> list[dict[str, Any]]:
    """The next sessions (oldest first, after ``after`` = ``(started_at, id)``), each
    with its messages: at most :data:`EXPORT_BATCH_SESSIONS`, and no more once
    :data:`EXPORT_BATCH_MESSAGES` messages are read (at least one session). Run it in
    one snapshot."""
    where, args = [], []
    if source is not None:
        # "+source": walk the started_at index and filter, rather than sort all the
        # source's sessions for every batch (quadratic in a source's size).
        where.append(f"{sql.unindexed('source')} = ?")
        args.append(source)
    if after is not None:
        # Spelled out so that SQLite can seek the started_at index to the cursor.
        where.append("started_at >= ? AND (started_at > ? OR id > ?)")
        args += [after[0], after[0], after[1]]
    query = ("SELECT * FROM sessions" + (" WHERE " + " AND ".join(where) if where else "")
             + " ORDER BY started_at, id LIMIT ?")
    out, messages = [], 0
    for row in fetch_rows(conn, query, (*args, EXPORT_BATCH_SESSIONS)):
        item = records.session(row)
        item["messages"] = _messages(conn, item["id"])
        out.append(item)
        messages += len(item["messages"])
        if messages >= EXPORT_BATCH_MESSAGES:
            break
    return out


def export_session(conn: Conn, session_id: str) -> Optional[dict[str, Any]]:
    """The session with its messages (run it in one snapshot), or None."""
    found = fetch_rows(conn, "SELECT * FROM sessions WHERE id = ?", (session_id,))
    if not found:
        return None
    item = records.session(found[0])
    item["messages"] = _messages(conn, session_id)
    return item


def _messages(conn: Conn, session_id: str) -> list[dict[str, Any]]:
    return [records.message(r) for r in fetch_rows(
        conn, f"SELECT {records.MESSAGE_SELECT} FROM messages WHERE session_id = ? "
              "ORDER BY id", (session_id,))]


def export_batches(read: Read, source: Optional[str], first: list[dict[str, Any]],
                   sql: Dialect) -> Iterator[dict[str, Any]]:
    """Every session of ``source`` (None: all), oldest first, with its messages: the
    batch ``first`` (read by the caller, so that errors surface at the call), then one
    :func:`export_batch` after another, each in its own short snapshot; a parent that
    started after its child right before the child (module docstring)."""
    ahead: set[str] = set()  # sessions given out of their turn, skipped at it
    batch = first
    while batch:
        late = read(lambda c, b=batch: _late_parents(c, b, source, sql), snapshot=True)
        for item in batch:
            if item["id"] in ahead:
                ahead.discard(item["id"])
                continue
            if item["id"] in late:
                yield from _ancestors_ahead(read, item, source, ahead)
            yield item
        last = batch[-1]
        del batch  # hold no more than the batch being read
        batch = read(lambda c, a=(last["started_at"], last["id"]): export_batch(
            c, source, a, sql), snapshot=True)


# Whether a session comes after the cursor (started_at, id) in the export's order, as
# the database orders it (export_batch pages the same way: its collation of ids, which
# on PostgreSQL need not be Python's).
_AFTER = "(started_at > ? OR (started_at = ? AND id > ?))"


def _late_parents(conn: Conn, batch: list[dict[str, Any]], source: Optional[str],
                  sql: Dialect) -> set[str]:
    """The sessions of ``batch`` whose parent the export reaches after them."""
    children = [item["id"] for item in batch if item.get("parent_session_id") is not None]
    if not children:
        return set()
    query = ("SELECT c.id FROM sessions c JOIN sessions p ON p.id = c.parent_session_id "
             f"WHERE c.id IN {sql.in_list} AND (p.started_at > c.started_at OR "
             "(p.started_at = c.started_at AND p.id > c.id))")
    args: list[Any] = [sql.list_arg(children)]
    if source is not None:
        query += " AND p.source = ?"
        args.append(source)
    return {r[0] for r in conn.execute(query, args)}


def _ancestors_ahead(read: Read, item: dict[str, Any], source: Optional[str],
                     ahead: set[str]) -> Iterator[dict[str, Any]]:
    """The ancestors of ``item`` that the export has not given yet (after it in the
    order, of ``source``, not given ahead already), oldest generation first, each with
    its messages, read one at a time; each added to ``ahead``."""
    cursor = [item["started_at"], item["started_at"], item["id"]]
    chain: list[str] = []
    parent, seen = item.get("parent_session_id"), {item["id"]}
    while parent is not None and parent not in ahead and parent not in seen:
        seen.add(parent)
        query = f"SELECT parent_session_id FROM sessions WHERE id = ? AND {_AFTER}"
        args = [parent, *cursor]
        if source is not None:
            query += " AND source = ?"
            args.append(source)
        found = read(lambda c, q=query, a=args: fetch_rows(c, q, a), snapshot=True)
        if not found:
            break  # gone meanwhile, not in this export, or given already
        chain.append(parent)
        parent = found[0]["parent_session_id"]
    ahead.update(chain)
    for sid in reversed(chain):
        session = read(lambda c, s=sid: export_session(c, s), snapshot=True)
        if session is not None:  # (deleted meanwhile: nothing to give)
            yield session
