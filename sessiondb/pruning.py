"""Pruning old sessions and giving the space back, as step functions
(:mod:`sessiondb.maintenance`).

A session goes with all its messages in one step, so no step leaves a session half
deleted -- unless it has more than :data:`BIG_SESSION` messages or
:data:`BIG_SESSION_BYTES` of content: then its messages go oldest first, a chunk per
step (as many as the step's time allows, by their bytes), with ``message_count`` and
``tool_call_count`` lowered exactly in the same transaction, and the session row with
its last chunk. A parent is
pruned only once no remaining session names it (its children went in earlier steps).

A prune gives the pages it frees back as it goes (:func:`sessiondb.vacuum.give_back`):
a long freelist makes every page slow to give back.
"""

from __future__ import annotations

import time
from typing import Any

from . import records
from .backend import Conn, Dialect, session_lock_key
from .maintenance import Step, byte_budget, fit_bytes
from .text import from_json
from .vacuum import Vacuum, give_back

#: Sessions with more messages than this, or more bytes of content than
#: :data:`BIG_SESSION_BYTES`, are deleted in chunks (see the module docstring).
BIG_SESSION = 2000
#: Deleting a message from the full-text index tokenizes it again (about 20 MB/s): a
#: session this large goes whole in about 0.2 s.
BIG_SESSION_BYTES = 4_000_000
_CHUNK = 500  # messages at most per chunk; fewer when they are large (maintenance.fit_bytes)
_PICK = 200  # candidates read per query

# What a prunable session is: ended, started before the cutoff, of the source if given,
# and no other session names it as its parent.
_CANDIDATE = "started_at < ? AND ended_at IS NOT NULL"
_CHILDLESS = ("NOT EXISTS (SELECT 1 FROM sessions c WHERE c.parent_session_id = s.id "
              "AND c.id != s.id)")


def _where(source: str | None) -> str:
    return _CANDIDATE + (" AND source = ?" if source else "")


def _args(cutoff: float, source: str | None) -> tuple[Any, ...]:
    return (cutoff, source) if source else (cutoff,)


def count(conn: Conn, cutoff: float, source: str | None) -> tuple[int, int]:
    """``(sessions, messages)`` that a prune with these options would delete, without
    deleting anything: the candidates that no remaining session keeps as an ancestor
    (a session that stays blocks its parent, and so on up the chain). The messages are
    their sessions' ``message_count`` (a progress total): counting them by the index
    read 3.4 million entries in 25 s on a store of 6.9 million messages, a read that
    kept every checkpoint from resetting the WAL meanwhile (writers waited 1 s each,
    measured)."""
    where, args = _where(source), _args(cutoff, source)
    row = conn.execute(
        "WITH RECURSIVE blocked(id) AS ("
        f" SELECT parent_session_id FROM sessions WHERE NOT ({where}) "
        "  AND parent_session_id IS NOT NULL AND parent_session_id != id"
        " UNION SELECT s.parent_session_id FROM sessions s JOIN blocked b ON s.id = b.id"
        "  WHERE s.parent_session_id IS NOT NULL AND s.parent_session_id != s.id) "
        f"SELECT count(*), coalesce(sum(s.message_count), 0) FROM sessions s WHERE {where} "
        "AND s.id NOT IN (SELECT id FROM blocked WHERE id IS NOT NULL)",
        (*args, *args)).fetchone()
    return int(row[0]), int(row[1])


class Tally:
    """Sessions deleted by a prune. A step counts into ``attempt``; the count is kept
    (:meth:`commit`) only once the step's transaction committed, since a step that the
    hold bound rolled back is run again and would count its sessions twice."""

    def __init__(self) -> None:
        self.total = 0
        self.attempt = 0

    def commit(self) -> None:
        self.total += self.attempt
        self.attempt = 0


def prune_step(cutoff: float, source: str | None, deleted: Tally, sql: Dialect,
               vacuum: Vacuum | None = None) -> Step:
    """A step function deleting prunable sessions with their messages; it returns the
    rows (sessions + messages) deleted and counts the sessions in ``deleted``. With
    ``vacuum``, a step first gives pages back (:func:`sessiondb.vacuum.give_back`; it
    deletes at least one session or chunk all the same)."""
    pick = (f"SELECT id FROM sessions s WHERE {_where(source)} AND {_CHILDLESS} "
            f"ORDER BY started_at, id LIMIT {_PICK}")
    args = _args(cutoff, source)
    still = f"SELECT 1 FROM sessions s WHERE s.id = ? AND {_where(source)} AND {_CHILDLESS}"

    def step(conn: Conn, deadline: float) -> int:
        rows = 0
        deleted.attempt = 0
        give_back(vacuum, conn, deadline)
        while True:
            ids = [r[0] for r in conn.execute(pick, args)]
            if not ids:
                return rows
            for sid in ids:
                # PostgreSQL: its writers (a reopen, an append, a child's creation) wait
                # for us from here, or went first: then it may be no longer prunable.
                sql.lock(conn, session_lock_key(sid))
                if conn.execute(still, (sid, *args)).fetchone() is None:
                    continue
                rows += _delete_some(conn, sql, sid, deleted, deadline)
                if time.monotonic() >= deadline:
                    return rows

    return step


def _delete_some(conn: Conn, sql: Dialect, sid: str, deleted: Tally, deadline: float
                 ) -> int:
    """Delete the session with its messages, or, for a big one, its oldest chunk of
    messages with the counters lowered to match; returns the rows deleted."""
    # octet_length at the top level of a query is answered without loading the value.
    sizes = [r[0] or 0 for r in conn.execute(
        "SELECT octet_length(content) FROM messages WHERE session_id = ? LIMIT ?",
        (sid, BIG_SESSION + 1))]
    if len(sizes) > BIG_SESSION or sum(sizes) > BIG_SESSION_BYTES:
        ids = fit_bytes(conn.execute(
            "SELECT id, octet_length(content) FROM messages WHERE session_id = ? "
            "ORDER BY id LIMIT ?", (sid, _CHUNK)).fetchall(), byte_budget(deadline))
        chunk = (sql.list_arg(ids),)
        # Tool calls counted as records.count_tool_calls counted them on the way in.
        calls = [records.count_tool_calls(from_json(r[0])) for r in conn.execute(
            f"SELECT tool_calls FROM messages WHERE id IN {sql.in_id_list}", chunk)]
        gone, called = len(calls), sum(calls)
        conn.execute(f"DELETE FROM messages WHERE id IN {sql.in_id_list}", chunk)
        conn.execute("UPDATE sessions SET message_count = CASE WHEN message_count > ? "
                     "THEN message_count - ? ELSE 0 END, tool_call_count = CASE WHEN "
                     "tool_call_count > ? THEN tool_call_count - ? ELSE 0 END WHERE id = ?",
                     (gone, gone, called, called, sid))
        return gone
    conn.execute("DELETE FROM messages WHERE session_id = ?", (sid,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
    deleted.attempt += conn.changes()  # 0 if another prune took it meanwhile
    return len(sizes) + 1


def reclaim_step(vacuum: Vacuum) -> Step:
    """A step function giving free pages back to the file system until its deadline
    (``PRAGMA incremental_vacuum``, for stores made with incremental auto-vacuum, as
    sessiondb makes them); it returns the pages freed, 0 when none are left or the
    store cannot (https://sqlite.org/pragma.html#pragma_incremental_vacuum)."""

    def step(conn: Any, deadline: float) -> int:
        return vacuum.run(conn, deadline)

    return step
