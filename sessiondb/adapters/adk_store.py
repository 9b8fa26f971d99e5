"""What a Google ADK session is in a sessiondb store, and each operation of the session
service (:mod:`sessiondb.adapters.adk`) as one write through the store's write path or
one snapshot read. Plain data in and out: the service turns it into ADK's objects.

What is stored where:

- an ADK session *is* a sessiondb session, with the same id, the service's ``source``
  (``"adk"``) and the ADK user id in ``user_id``: ``sessiondb list``, ``show``,
  ``search``, export and ``delete_session`` see it, and ``prune_sessions`` once it is
  ended (ADK never ends a session: ``end_session`` it when done with it);
- each persisted event is a message of it: ``role`` ``user`` (an event by the user),
  ``tool`` (function responses) or ``assistant`` (anything else an agent wrote),
  ``content`` the text of its parts and the JSON result of its function responses
  (what search finds and a transcript shows), ``tool_calls`` its function
  calls (so ``tool_call_count`` counts them), ``tool_name``/``tool_call_id`` of its
  first function response, ``timestamp`` the event's, and ``metadata`` the event's JSON
  exactly as ADK's own services store it (``model_dump_json(exclude_none=True)``), which
  is what is read back;
- what does not fit a session row goes in this adapter's tables: ``adk_sessions`` (app
  name, session state, create and update time, revision; one row per session),
  ``adk_events`` (the event id of each event message: the key of idempotent re-delivery),
  ``adk_app_states`` and ``adk_user_states`` (state shared by every session of an app,
  and of an app and user, as ADK scopes it). Rows of the first two go with their session
  or message (``ON DELETE CASCADE``); shared state stays, as in ADK's services.

Ids: ADK makes a session id unique per (app, user); a sessiondb id is unique in the
store. The sessiondb id *is* the ADK id (so ``sessiondb show <id>`` takes the id an ADK
app logs), and an id is owned by the app and user that created it: another app or user
creating it gets :class:`~sessiondb.adapters.adk_errors.AdkAlreadyExists`, and reading,
appending to or deleting it under another app or user finds no session. Rejected: a
composite id (``app/user/id``), which every CLI command and log line would then have to
spell out.

Revisions: ``adk_sessions.revision`` grows by one with every append (the sessiondb
session's own ``revision`` counts changes to its fields, which appends are not). A
``Session`` object carries the revision it was read at (``_storage_update_marker``, the
field ADK keeps for exactly this), and :func:`append` compares it inside the same write
transaction that appends, under the session's lock, so two processes can neither both
pass the check nor interleave. ``update_time`` strictly increases too (the event's
time, or a microsecond past the previous update if that is later), so a ``Session``
without a marker is compared by its ``last_update_time`` without ties.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..backend import Conn, first, rows
from ..store import SessionDB
from .adk_errors import AdkAlreadyExists, AdkSessionNotFound, StaleSession
from .tables import AdapterTables, ensure_tables

__all__ = ["TABLES", "Stored", "Appended", "create", "get", "list_for", "delete", "append",
           "user_state", "prepare"]


def _ddl(text: str, real: str, integer: str) -> tuple[str, ...]:
    return tuple(s.strip().format(text=text, real=real, integer=integer)
                 for s in _DDL.split(";") if s.strip())


_DDL = """
CREATE TABLE adk_sessions (
    session_id {text} PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    app_name {text} NOT NULL,
    user_id {text} NOT NULL,
    state {text} NOT NULL,
    create_time {real} NOT NULL,
    update_time {real} NOT NULL,
    revision {integer} NOT NULL DEFAULT 0
);
CREATE INDEX adk_sessions_listing ON adk_sessions (app_name, user_id, update_time);
CREATE TABLE adk_events (
    message_id {integer} PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE,
    session_id {text} NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    event_id {text} NOT NULL
);
CREATE UNIQUE INDEX adk_events_event ON adk_events (session_id, event_id);
CREATE TABLE adk_app_states (
    app_name {text} PRIMARY KEY,
    state {text} NOT NULL,
    update_time {real} NOT NULL
);
CREATE TABLE adk_user_states (
    app_name {text} NOT NULL,
    user_id {text} NOT NULL,
    state {text} NOT NULL,
    update_time {real} NOT NULL,
    PRIMARY KEY (app_name, user_id)
)
"""

TABLES = AdapterTables("adk", 1, {
    "sqlite": _ddl("TEXT", "REAL", "INTEGER"),
    "postgresql": _ddl("text", "double precision", "bigint"),
})

#: How far past the previous update time an append's update time is at least: one
#: microsecond, the resolution of ADK's own database markers (and above a float's
#: spacing at today's epoch seconds, about 0.24 microseconds).
_TICK = 1e-6

# The tables of the shared states and their keys.
_SCOPES = {"app": ("adk_app_states", ("app_name",)),
           "user": ("adk_user_states", ("app_name", "user_id"))}


@dataclass
class Stored:
    """An ADK session as stored: its own state (no prefixes), the app and user state
    (keys without their prefixes), and its events' JSON, oldest first."""

    id: str
    app_name: str
    user_id: str
    state: dict[str, Any]
    app_state: dict[str, Any]
    user_state: dict[str, Any]
    update_time: float
    revision: int
    events: list[str] = field(default_factory=list)


@dataclass
class Appended:
    """What an append left: the session's revision and update time after it; ``stored``
    False when the event was there already (an equal re-delivery: nothing written)."""

    revision: int
    update_time: float
    stored: bool = True


def prepare(db: SessionDB) -> SessionDB:
    """``db`` with this adapter's tables (made once per store and version)."""
    ensure_tables(db, TABLES)
    return db


def _key(session_id: str) -> str:
    # sessiondb's own lock key of a session (sessiondb.store._key): creators, deleters
    # and appenders of the session, ours and the store's, queue on the same lock.
    return "session:" + session_id


def _loads(text: str | None) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _scope_state(conn: Conn, scope: str, key: tuple[str, ...]) -> dict[str, Any]:
    table, columns = _SCOPES[scope]
    where = " AND ".join(f"{c} = ?" for c in columns)
    return _loads(first(conn, f"SELECT state FROM {table} WHERE {where}", key))


def _merge_scope(db: SessionDB, conn: Conn, scope: str, key: tuple[str, ...],
                 delta: dict[str, Any], now: float) -> dict[str, Any]:
    """The shared state of ``scope`` after ``delta`` is merged into it (``dict.update``
    semantics: a key of the delta wins, a None value included, as in ADK's services),
    written only if the delta has keys. On PostgreSQL the state's own lock is held from
    the read to the write, so two sessions updating one app's state lose nothing."""
    if not delta:
        return _scope_state(conn, scope, key)
    db._sql.lock(conn, f"adk-{scope}:" + json.dumps(key))
    state = _scope_state(conn, scope, key)
    state.update(delta)
    table, columns = _SCOPES[scope]
    conn.execute(f"INSERT INTO {table} ({', '.join(columns)}, state, update_time) VALUES "
                 f"({', '.join('?' * len(columns))}, ?, ?) ON CONFLICT ({', '.join(columns)}) "
                 "DO UPDATE SET state = excluded.state, update_time = excluded.update_time",
                 (*key, json.dumps(state), now))
    return state


def create(db: SessionDB, source: str, app_name: str, user_id: str, session_id: str,
           deltas: dict[str, dict[str, Any]], now: float) -> Stored:
    """Create the session with the session part of ``deltas`` as its state and merge
    the app and user parts into the shared states, in one transaction.

    :raises AdkAlreadyExists: the id is taken (by this app and user, or by any other
        session of the store); nothing was written.
    """

    def write(conn: Conn) -> Stored:
        db._sql.lock(conn, _key(session_id))
        owner = conn.execute("SELECT s.source, a.app_name, a.user_id FROM sessions s LEFT "
                             "JOIN adk_sessions a ON a.session_id = s.id WHERE s.id = ?",
                             (session_id,)).fetchone()
        if owner is not None:
            raise AdkAlreadyExists(_taken(session_id, app_name, user_id, tuple(owner)),
                                   session_id)
        conn.execute("INSERT INTO sessions (id, source, user_id, started_at) VALUES "
                     "(?, ?, ?, ?)", (session_id, source, user_id, now))
        conn.execute("INSERT INTO adk_sessions (session_id, app_name, user_id, state, "
                     "create_time, update_time, revision) VALUES (?, ?, ?, ?, ?, ?, 0)",
                     (session_id, app_name, user_id, json.dumps(deltas["session"]), now, now))
        return Stored(session_id, app_name, user_id, dict(deltas["session"]),
                      _merge_scope(db, conn, "app", (app_name,), deltas["app"], now),
                      _merge_scope(db, conn, "user", (app_name, user_id), deltas["user"],
                                   now),
                      now, 0)

    return db._execute_write(write)


def _taken(session_id: str, app_name: str, user_id: str, owner: tuple) -> str:
    if owner[1:] == (app_name, user_id):
        return f"Session with id {session_id} already exists."
    whose = ("another app or user" if owner[1] is not None
             else f"a sessiondb session of source {owner[0]!r}")
    return (f"Session with id {session_id} already exists: the id belongs to {whose} "
            "(sessiondb session ids are unique in the whole store); nothing was written. "
            "Use another id, or let ADK generate one")


def get(db: SessionDB, app_name: str, user_id: str, session_id: str,
        recent: int | None, after: float | None) -> Stored | None:
    """The session with its events (the last ``recent``, of those at or after
    ``after``; in the order they were appended), read as of one moment; None when this
    app and user have no session of this id."""

    def read(conn: Conn) -> Stored | None:
        row = conn.execute("SELECT state, update_time, revision FROM adk_sessions WHERE "
                           "session_id = ? AND app_name = ? AND user_id = ?",
                           (session_id, app_name, user_id)).fetchone()
        if row is None:
            return None
        events: list[str] = []
        if recent != 0:
            where, args = "m.session_id = ?", [session_id]
            if after is not None:
                where += " AND m.timestamp >= ?"
                args.append(after)
            # Driven from messages(session_id, id), the index every store has.
            sql = (f"SELECT m.metadata FROM messages m JOIN adk_events e ON e.message_id "
                   f"= m.id WHERE {where} ORDER BY m.id DESC")
            if recent is not None:
                sql += " LIMIT ?"
                args.append(recent)
            events = [r[0] for r in conn.execute(sql, args).fetchall()][::-1]
        return Stored(session_id, app_name, user_id, _loads(row[0]),
                      _scope_state(conn, "app", (app_name,)),
                      _scope_state(conn, "user", (app_name, user_id)),
                      row[1], row[2], events)

    return db._read(read, snapshot=True)


def list_for(db: SessionDB, app_name: str, user_id: str | None) -> list[Stored]:
    """The sessions of an app (of one user, or of all), without events, least recently
    updated first (then by user and id, as ADK's services order them)."""

    def read(conn: Conn) -> list[Stored]:
        where, args = "app_name = ?", [app_name]
        if user_id is not None:
            where += " AND user_id = ?"
            args.append(user_id)
        found = rows(conn, f"SELECT session_id, user_id, state, update_time, revision FROM "
                           f"adk_sessions WHERE {where} ORDER BY update_time, user_id, "
                           "session_id", args)
        app_state = _scope_state(conn, "app", (app_name,))
        users = {r[0]: _loads(r[1]) for r in conn.execute(
            f"SELECT user_id, state FROM adk_user_states WHERE {where}", args).fetchall()}
        return [Stored(r["session_id"], app_name, r["user_id"], _loads(r["state"]),
                       app_state, users.get(r["user_id"], {}), r["update_time"],
                       r["revision"]) for r in found]

    return db._read(read, snapshot=True)


def user_state(db: SessionDB, app_name: str, user_id: str) -> dict[str, Any]:
    """The state shared by the sessions of this app and user (keys without prefix)."""
    return db._read(lambda conn: _scope_state(conn, "user", (app_name, user_id)))


def delete(db: SessionDB, app_name: str, user_id: str, session_id: str) -> None:
    """Delete the session, its messages and its rows here, if this app and user own it
    (as ``SessionDB.delete_session``, in the same transaction as the check)."""

    def owned(conn: Conn) -> bool:
        db._sql.lock(conn, _key(session_id))
        return first(conn, "SELECT 1 FROM adk_sessions WHERE session_id = ? AND app_name = ? "
                           "AND user_id = ?", (session_id, app_name, user_id)) is not None

    with db.transaction():
        if db._execute_write(owned):
            db.delete_session(session_id)


def append(db: SessionDB, app_name: str, user_id: str, session_id: str, *,
           expected: int | None, seen_time: float, event_id: str, event_json: str,
           timestamp: float, message: dict[str, Any], calls: int,
           deltas: dict[str, dict[str, Any]]) -> Appended:
    """Append one event, in one write transaction under the session's lock: check that
    the session is still at revision ``expected`` (or, without one, not updated after
    ``seen_time``), then write the message, the event's row, the session's new state,
    update time and revision, and the shared states.

    An event whose id the session already holds with the same JSON is not written again
    (a retried append whose first attempt committed); this check comes first, as in
    ADK's in-memory service.

    :param message: the message's ``role``, ``content``, ``tool_calls``, ``tool_name``
        and ``tool_call_id``; ``calls`` the number of tool calls.
    :raises StaleSession: the session changed since (nothing written).
    :raises AdkSessionNotFound: no such session for this app and user.
    :raises AdkAlreadyExists: another event with this id is in the session.
    """

    def write(conn: Conn) -> Appended:
        db._sql.lock(conn, _key(session_id))
        row = conn.execute(
            "SELECT a.app_name, a.user_id, a.revision, a.update_time, a.state, "
            "(SELECT m.metadata FROM adk_events e JOIN messages m ON m.id = e.message_id "
            "WHERE e.session_id = a.session_id AND e.event_id = ?) FROM adk_sessions a "
            "WHERE a.session_id = ?", (event_id, session_id)).fetchone()
        if row is None or (row[0], row[1]) != (app_name, user_id):
            raise AdkSessionNotFound(session_id, app_name, user_id)
        _, _, revision, update_time, state, stored = row
        if stored is not None:
            if stored == event_json:
                return Appended(revision, update_time, stored=False)
            raise AdkAlreadyExists(f"Event {event_id} already exists in session "
                                   f"{session_id}; nothing was written", session_id,
                                   event_id)
        stale = (expected != revision) if expected is not None else update_time > seen_time
        if stale:
            raise StaleSession(session_id, expected, revision)
        now = max(timestamp, update_time + _TICK)
        db._sql.update_session(conn, _key(session_id), "message_count = message_count + 1, "
                               "tool_call_count = tool_call_count + ?", [calls], session_id)
        message_id = first(conn, "INSERT INTO messages (session_id, role, content, "
                                 "tool_calls, tool_name, tool_call_id, timestamp, metadata) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                           (session_id, message["role"], message["content"],
                            message["tool_calls"], message["tool_name"],
                            message["tool_call_id"], timestamp, event_json))
        conn.execute("INSERT INTO adk_events (message_id, session_id, event_id) VALUES "
                     "(?, ?, ?)", (message_id, session_id, event_id))
        if deltas["session"]:
            state = json.dumps({**_loads(state), **deltas["session"]})
        conn.execute("UPDATE adk_sessions SET state = ?, update_time = ?, revision = ? "
                     "WHERE session_id = ?", (state, now, revision + 1, session_id))
        if deltas["app"]:
            _merge_scope(db, conn, "app", (app_name,), deltas["app"], timestamp)
        if deltas["user"]:
            _merge_scope(db, conn, "user", (app_name, user_id), deltas["user"], timestamp)
        return Appended(revision + 1, now)

    return db._execute_write(write)
