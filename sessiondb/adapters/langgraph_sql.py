"""The LangGraph checkpointer's tables and SQL, as functions of a connection.

:class:`~sessiondb.adapters.langgraph.SessionDBSaver` keeps a thread as a sessiondb
session and what does not fit the message model in three tables of its own, laid out
like LangGraph's PostgreSQL saver (a channel's value is stored once per version, not
once per checkpoint, so a checkpoint that changed one channel writes one blob):

``langgraph_checkpoints``  one row per checkpoint: the serialized checkpoint without its
                           channel values, its metadata (JSON), its parent, the run that
                           made it, and its channel versions (JSON, for SQL to follow);
``langgraph_blobs``        one row per (thread, namespace, channel, version): the value
                           (``type`` ``"empty"`` and no blob: the channel had no value);
``langgraph_writes``       the pending writes of a checkpoint, per (task, index).

Every row references ``sessions(id)`` with ``ON DELETE CASCADE``, so ``delete_session``
and ``prune_sessions`` remove a thread's checkpoints with it. The primary keys are the
lookups: a thread's checkpoints of one namespace newest first (``list``, ``get_tuple``),
a checkpoint's blobs by channel and version, its writes by id; ``run_id`` has an index
of its own for ``delete_for_runs``.

Writes take the thread's session lock first (an advisory lock on PostgreSQL, nothing on
SQLite, where ``BEGIN IMMEDIATE`` admits one writer), then create the session if it is
missing, so concurrent writers of one thread queue instead of colliding. This module
imports no LangGraph: it stores what the saver serialized.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Sequence

from ..backend import Conn, Dialect, fetch, first, session_lock_key
from .tables import AdapterTables

__all__ = ["TABLES", "BLOBS", "WRITES_BETWEEN", "CheckpointRow", "Loaded", "ensure_thread",
           "put_checkpoint", "put_writes", "delete_thread", "copy_thread", "delete_for_runs",
           "keep_latest", "page", "page_sql", "load"]


def _ddl(text: str, blob: str, integer: str) -> tuple[str, ...]:
    """The tables in one dialect's types (the SQL is otherwise the same)."""
    thread = f"thread_id {text} NOT NULL REFERENCES sessions(id) ON DELETE CASCADE"
    return tuple(s.format(text=text, blob=blob, integer=integer, thread=thread) for s in (
        "CREATE TABLE langgraph_checkpoints ({thread}, checkpoint_ns {text} NOT NULL, "
        "checkpoint_id {text} NOT NULL, parent_checkpoint_id {text}, run_id {text}, "
        "type {text} NOT NULL, checkpoint {blob} NOT NULL, metadata {text} NOT NULL, "
        "channel_versions {text} NOT NULL, "
        "PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id))",
        "CREATE INDEX langgraph_checkpoints_run ON langgraph_checkpoints(run_id) "
        "WHERE run_id IS NOT NULL",
        "CREATE TABLE langgraph_blobs ({thread}, checkpoint_ns {text} NOT NULL, "
        "channel {text} NOT NULL, version {text} NOT NULL, type {text} NOT NULL, "
        "blob {blob}, PRIMARY KEY (thread_id, checkpoint_ns, channel, version))",
        "CREATE TABLE langgraph_writes ({thread}, checkpoint_ns {text} NOT NULL, "
        "checkpoint_id {text} NOT NULL, task_id {text} NOT NULL, idx {integer} NOT NULL, "
        "channel {text} NOT NULL, type {text} NOT NULL, blob {blob}, "
        "task_path {text} NOT NULL DEFAULT '', "
        "PRIMARY KEY (thread_id, checkpoint_ns, checkpoint_id, task_id, idx))",
    ))


TABLES = AdapterTables("langgraph", 1, {
    "sqlite": _ddl("TEXT", "BLOB", "INTEGER"),
    "postgresql": _ddl("text", "bytea", "bigint"),
})

#: A JSON array parameter as rows ``j.value`` (``j.value ->> 0`` is an element's first
#: item on both databases), and a JSON object column as rows ``j.key``, ``j.value``.
_ELEMENTS = {"sqlite": "json_each(?) AS j", "postgresql": "json_array_elements(?::json) AS j"}
_EACH = {"sqlite": "json_each({}) AS j", "postgresql": "json_each_text({}::json) AS j"}
#: The blobs named by a JSON array of ``[channel, version]`` pairs, one primary key
#: lookup per pair however many versions the thread has. SQLite's CROSS JOIN keeps the
#: pairs in the outer loop; PostgreSQL would hash all the thread's blobs instead (it
#: guesses 100 pairs), unless each lookup is a LATERAL subquery it cannot flatten
#: (LIMIT 1: a pair names one row).
_BLOB_MATCH = ("{b}thread_id = ? AND {b}checkpoint_ns = ? AND {b}channel = j.value ->> 0 "
               "AND {b}version = j.value ->> 1")
BLOBS = {
    "sqlite": "SELECT b.channel, b.version, b.type, b.blob FROM json_each(?) AS j "
              "CROSS JOIN langgraph_blobs AS b WHERE " + _BLOB_MATCH.format(b="b."),
    "postgresql": "SELECT b.* FROM json_array_elements(?::json) AS j CROSS JOIN LATERAL "
                  "(SELECT channel, version, type, blob FROM langgraph_blobs WHERE "
                  + _BLOB_MATCH.format(b="") + " LIMIT 1) AS b",
}

_CHECKPOINT_COLUMNS = ("thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, "
                       "type, checkpoint, metadata, channel_versions")
_WRITE_COLUMNS = ("thread_id, checkpoint_ns, checkpoint_id, task_id, idx, channel, type, "
                  "blob, task_path")
_PUT_CHECKPOINT = (
    f"INSERT INTO langgraph_checkpoints ({_CHECKPOINT_COLUMNS}, run_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id) "
    "DO UPDATE SET parent_checkpoint_id = excluded.parent_checkpoint_id, "
    "type = excluded.type, checkpoint = excluded.checkpoint, metadata = excluded.metadata, "
    "channel_versions = excluded.channel_versions, run_id = excluded.run_id")
# A version names one value: a second put of it (the same checkpoint again) keeps the
# first, as LangGraph's PostgreSQL saver does; versions carry a random part, so two
# forks never share one.
_PUT_BLOB = ("INSERT INTO langgraph_blobs (thread_id, checkpoint_ns, channel, version, "
             "type, blob) VALUES (?, ?, ?, ?, ?, ?) "
             "ON CONFLICT (thread_id, checkpoint_ns, channel, version) DO NOTHING")
_PUT_WRITE = (f"INSERT INTO langgraph_writes ({_WRITE_COLUMNS}) VALUES "
              "(?, ?, ?, ?, ?, ?, ?, ?, ?) "
              "ON CONFLICT (thread_id, checkpoint_ns, checkpoint_id, task_id, idx) ")
_KEEP_WRITE = _PUT_WRITE + "DO NOTHING"
_REPLACE_WRITE = (_PUT_WRITE + "DO UPDATE SET channel = excluded.channel, "
                  "type = excluded.type, blob = excluded.blob, task_path = excluded.task_path")
#: The pending writes of a range of a thread's checkpoints (of one namespace).
WRITES_BETWEEN = ("SELECT checkpoint_id, task_id, channel, type, blob, task_path, idx FROM "
                  "langgraph_writes WHERE thread_id = ? AND checkpoint_ns = ? AND "
                  "checkpoint_id BETWEEN ? AND ?")
_TABLES = ("langgraph_writes", "langgraph_checkpoints", "langgraph_blobs")
_PAIRS_PER_QUERY = 500  # (channel, version) pairs per blob query: far below both limits

#: ``(thread_id, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint,
#: metadata JSON, channel_versions JSON)``, as stored.
CheckpointRow = tuple


# -- writes (each runs inside one ``db._execute_write``) -------------------------------

def ensure_thread(conn: Conn, sql: Dialect, thread_id: str, source: str) -> None:
    """Take the thread's session lock and create its session if it is missing."""
    sql.lock(conn, session_lock_key(thread_id))
    conn.execute("INSERT INTO sessions (id, source, started_at) VALUES (?, ?, ?) "
                 "ON CONFLICT (id) DO NOTHING", (thread_id, source, time.time()))


def put_checkpoint(conn: Any, sql: Dialect, source: str, row: Sequence[Any],
                   run_id: str | None, blobs: list[tuple]) -> None:
    """Store a checkpoint (``row`` as :data:`CheckpointRow`) and its new blobs
    ``(thread_id, checkpoint_ns, channel, version, type, blob)``."""
    ensure_thread(conn, sql, row[0], source)
    if blobs:
        conn.executemany(_PUT_BLOB, blobs)
    conn.execute(_PUT_CHECKPOINT, (*row, run_id))


def put_writes(conn: Any, sql: Dialect, source: str, thread_id: str, rows: list[tuple],
               replace: bool) -> None:
    """Store pending writes (rows in ``_WRITE_COLUMNS`` order): replacing those of the
    same task and index when ``replace``, else keeping the first."""
    ensure_thread(conn, sql, thread_id, source)
    conn.executemany(_REPLACE_WRITE if replace else _KEEP_WRITE, rows)


def delete_thread(conn: Conn, sql: Dialect, source: str, thread_id: str) -> None:
    """Delete the thread's checkpoints, blobs and writes, and its session if this
    adapter made it (its source) and nothing else lives in it (no message, no child)."""
    sql.lock(conn, session_lock_key(thread_id))
    for table in _TABLES:
        conn.execute(f"DELETE FROM {table} WHERE thread_id = ?", (thread_id,))
    conn.execute("DELETE FROM sessions WHERE id = ? AND source = ? AND NOT EXISTS "
                 "(SELECT 1 FROM messages WHERE session_id = ?) AND NOT EXISTS "
                 "(SELECT 1 FROM sessions c WHERE c.parent_session_id = ? AND c.id != ?)",
                 (thread_id, source, thread_id, thread_id, thread_id))


def copy_thread(conn: Conn, sql: Dialect, source: str, source_id: str, target_id: str
                ) -> int:
    """Copy every checkpoint, blob and write of one thread to another (rows the target
    already has are kept); returns the checkpoints the source has (0: nothing done)."""
    sql.lock(conn, session_lock_key(source_id), session_lock_key(target_id))
    count = first(conn, "SELECT count(*) FROM langgraph_checkpoints WHERE thread_id = ?",
                  (source_id,))
    if not count:
        return 0
    ensure_thread(conn, sql, target_id, source)
    columns = {
        "langgraph_checkpoints": _CHECKPOINT_COLUMNS + ", run_id",
        "langgraph_blobs": "thread_id, checkpoint_ns, channel, version, type, blob",
        "langgraph_writes": _WRITE_COLUMNS,
    }
    for table, cols in columns.items():
        rest = cols.split(", ", 1)[1]
        # WHERE before ON CONFLICT: SQLite would read ON as a join's otherwise.
        conn.execute(f"INSERT INTO {table} ({cols}) SELECT ?, {rest} FROM {table} "
                     "WHERE thread_id = ? ON CONFLICT DO NOTHING", (target_id, source_id))
    return int(count)


def _collect_blobs(conn: Conn, sql: Dialect, thread_id: str) -> None:
    """Delete the thread's blobs that no checkpoint of it names any more."""
    conn.execute(
        "DELETE FROM langgraph_blobs WHERE thread_id = ? AND (checkpoint_ns, channel, "
        "version) NOT IN (SELECT c.checkpoint_ns, j.key, j.value FROM "
        f"langgraph_checkpoints c CROSS JOIN {_EACH[sql.name].format('c.channel_versions')} "
        "WHERE c.thread_id = ?)", (thread_id, thread_id))


def _drop_orphan_writes(conn: Conn, thread_id: str) -> None:
    conn.execute("DELETE FROM langgraph_writes WHERE thread_id = ? AND (checkpoint_ns, "
                 "checkpoint_id) NOT IN (SELECT checkpoint_ns, checkpoint_id FROM "
                 "langgraph_checkpoints WHERE thread_id = ?)", (thread_id, thread_id))


def delete_for_runs(conn: Conn, sql: Dialect, run_ids: list[str]) -> None:
    """Delete the checkpoints these runs made, with their writes, and the blobs no
    remaining checkpoint names."""
    runs = (sql.list_arg(run_ids),)
    threads = sorted(r[0] for r in fetch(
        conn, "SELECT DISTINCT thread_id FROM langgraph_checkpoints "
              f"WHERE run_id IN {sql.in_list}", runs))
    if not threads:
        return
    sql.lock(conn, *(session_lock_key(t) for t in threads))
    for thread_id in threads:
        conn.execute("DELETE FROM langgraph_writes WHERE thread_id = ? AND (checkpoint_ns, "
                     "checkpoint_id) IN (SELECT checkpoint_ns, checkpoint_id FROM "
                     "langgraph_checkpoints WHERE thread_id = ? AND run_id IN "
                     f"{sql.in_list})", (thread_id, thread_id, *runs))
        conn.execute("DELETE FROM langgraph_checkpoints WHERE thread_id = ? AND run_id IN "
                     f"{sql.in_list}", (thread_id, *runs))
        _collect_blobs(conn, sql, thread_id)


def keep_latest(conn: Conn, sql: Dialect, thread_id: str) -> None:
    """Keep each namespace's latest checkpoint of the thread, with its writes and blobs,
    and the ancestors its delta channels are rebuilt from (see :func:`_delta_chain`);
    delete the rest."""
    sql.lock(conn, session_lock_key(thread_id))
    keep: list[list[str]] = []
    for ns, checkpoint_id, parent, metadata in fetch(
            conn, "SELECT c.checkpoint_ns, c.checkpoint_id, c.parent_checkpoint_id, "
                  "c.metadata FROM langgraph_checkpoints c WHERE c.thread_id = ? AND "
                  "c.checkpoint_id = (SELECT max(l.checkpoint_id) FROM "
                  "langgraph_checkpoints l WHERE l.thread_id = c.thread_id AND "
                  "l.checkpoint_ns = c.checkpoint_ns)", (thread_id,)):
        keep.append([ns, checkpoint_id])
        deltas = set(json.loads(metadata).get("counters_since_delta_snapshot") or ())
        keep += [[ns, c] for c in _delta_chain(conn, thread_id, ns, parent, deltas)]
    conn.execute("DELETE FROM langgraph_checkpoints WHERE thread_id = ? AND (checkpoint_ns, "
                 "checkpoint_id) NOT IN (SELECT j.value ->> 0, j.value ->> 1 FROM "
                 f"{_ELEMENTS[sql.name]})", (thread_id, json.dumps(keep)))
    _drop_orphan_writes(conn, thread_id)
    _collect_blobs(conn, sql, thread_id)


def _delta_chain(conn: Conn, thread_id: str, ns: str, parent: str | None,
                 channels: set[str]) -> list[str]:
    """The ancestors a kept checkpoint's delta channels are rebuilt from: LangGraph
    replays a delta channel's writes from the nearest ancestor that stores a value for
    it (a snapshot), so those ancestors and their writes must stay. ``channels`` are
    the checkpoint's delta channels not snapshotted since (its metadata's
    ``counters_since_delta_snapshot``); none: no ancestor is needed."""
    chain: list[str] = []
    while channels and parent is not None and parent not in chain:
        row = conn.execute("SELECT parent_checkpoint_id, channel_versions FROM "
                           "langgraph_checkpoints WHERE thread_id = ? AND checkpoint_ns = ? "
                           "AND checkpoint_id = ?", (thread_id, ns, parent)).fetchone()
        if row is None:
            break
        chain.append(parent)
        versions = json.loads(row[1])
        for channel in [c for c in channels if c in versions]:
            stored = first(conn, "SELECT type FROM langgraph_blobs WHERE thread_id = ? AND "
                                 "checkpoint_ns = ? AND channel = ? AND version = ?",
                           (thread_id, ns, channel, versions[channel]))
            if stored not in (None, "empty"):
                channels.discard(channel)
        parent = row[0]
    return chain


# -- reads ----------------------------------------------------------------------------

def page(conn: Conn, *, thread_id: str | None, ns: str | None, checkpoint_id: str | None,
         before: str | None, after: tuple[str, str, str] | None, size: int
         ) -> list[CheckpointRow]:
    """Up to ``size`` checkpoint rows, newest first (checkpoint id, then thread and
    namespace descending), past the ``after`` row ``(checkpoint_id, thread_id, ns)``."""
    return fetch(conn, *page_sql(thread_id=thread_id, ns=ns, checkpoint_id=checkpoint_id,
                                 before=before, after=after, size=size))


def page_sql(*, thread_id: str | None, ns: str | None, checkpoint_id: str | None,
             before: str | None, after: tuple[str, str, str] | None, size: int
             ) -> tuple[str, list[Any]]:
    """The statement of :func:`page` and its arguments."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("thread_id", thread_id), ("checkpoint_ns", ns),
                          ("checkpoint_id", checkpoint_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if before is not None:
        where.append("checkpoint_id < ?")
        args.append(before)
    one_series = thread_id is not None and ns is not None
    if after is not None and one_series:  # the primary key's order: a plain range
        where.append("checkpoint_id < ?")
        args.append(after[0])
    elif after is not None:
        where.append("(checkpoint_id, thread_id, checkpoint_ns) < (?, ?, ?)")
        args += after
    order = "checkpoint_id DESC" + ("" if one_series else ", thread_id DESC, "
                                                          "checkpoint_ns DESC")
    return (f"SELECT {_CHECKPOINT_COLUMNS} FROM langgraph_checkpoints"
            f"{' WHERE ' + ' AND '.join(where) if where else ''} "
            f"ORDER BY {order} LIMIT ?", [*args, size])


class Loaded:
    """What :func:`load` read for some checkpoint rows: ``blobs[(thread_id, ns, channel,
    version)] = (type, blob)`` and ``writes[(thread_id, ns, checkpoint_id)] = [(task_id,
    channel, type, blob, task_path, idx), ...]``."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, str, str, str], tuple[str, bytes | None]] = {}
        self.writes: dict[tuple[str, str, str], list[tuple]] = {}


def load(conn: Conn, sql: Dialect, rows: Iterable[CheckpointRow]) -> Loaded:
    """The blobs and pending writes of these checkpoints, each blob read once however
    many of them name it."""
    loaded = Loaded()
    series: dict[tuple[str, str], tuple[set[tuple[str, str]], list[str]]] = {}
    for row in rows:
        pairs, ids = series.setdefault((row[0], row[1]), (set(), []))
        pairs.update(json.loads(row[7]).items())
        ids.append(row[2])
    for (thread_id, ns), (pairs, ids) in series.items():
        wanted = sorted(pairs)
        for start in range(0, len(wanted), _PAIRS_PER_QUERY):
            chunk = json.dumps(wanted[start:start + _PAIRS_PER_QUERY])
            for channel, version, type_, blob in conn.execute(
                    BLOBS[sql.name], (chunk, thread_id, ns)):
                loaded.blobs[(thread_id, ns, channel, version)] = (type_, blob)
        # A range of the primary key (the page's ids are a slice of the thread's in
        # this order), then the page's own: an IN list read every write of the thread
        # on PostgreSQL, which hashes the list.
        chosen = set(ids)
        for checkpoint_id, *write in conn.execute(WRITES_BETWEEN,
                                                  (thread_id, ns, min(ids), max(ids))):
            if checkpoint_id in chosen:
                loaded.writes.setdefault((thread_id, ns, checkpoint_id), []).append(
                    tuple(write))
    return loaded
