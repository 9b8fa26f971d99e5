"""What a Google ADK session is in a sessiondb store, and each operation of the session
service (:mod:`sessiondb.adapters.adk`) as one write through the store's write path or
one snapshot read. Plain data in and out: the service turns it into ADK's objects.

What is stored where:

- an ADK session *is* a sessiondb session (its id: see *Ids* below), with the service's
  ``source`` (``"adk"``) and the ADK user id in ``user_id``: ``sessiondb list``,
  ``show``, ``search``, export and ``delete_session`` see it, and ``prune_sessions``
  once it is ended (ADK never ends a session: ``end_session`` it when done with it);
- each persisted event is a message of it: ``role`` ``user`` (an event by the user),
  ``tool`` (function responses) or ``assistant`` (anything else an agent wrote),
  ``content`` the text of its parts and the JSON result of its function responses
  (what search finds and a transcript shows), ``tool_calls`` its function
  calls (so ``tool_call_count`` counts them), ``tool_name``/``tool_call_id`` of its
  first function response, ``timestamp`` the event's, and ``metadata`` the event's JSON
  exactly as ADK's own services store it (``model_dump_json(exclude_none=True)``), which
  is what is read back;
- what does not fit a session row goes in this adapter's tables: ``adk_sessions`` (app
  name, user id, ADK id, session state, create and update time, incarnation and
  revision; one row per session), ``adk_events`` (the event id of each event message:
  the key of idempotent re-delivery), ``adk_app_states`` and ``adk_user_states`` (state
  shared by every session of an app, and of an app and user, as ADK scopes it). Rows of
  the first two go with their session or message (``ON DELETE CASCADE``); shared state
  stays, as in ADK's services.

Ids: ADK makes a session id unique per (app, user), a sessiondb id is unique in the
store; ``adk_sessions`` maps each (app name, user id, ADK id), unique, to the sessiondb
session, and every lookup goes through it. The sessiondb id is the ADK id itself when no
session has it yet (the usual case: ``sessiondb show <id>`` takes the id an ADK app
logs); when another app or user, or a session not made through ADK, has it, the
sessiondb id is ``<id>~<tag>``, where ``<tag>`` is the first 8 hex digits of the SHA-256
of the JSON array ``[app_name, user_id]`` (``~<tag>~2``, ``~3``... in the unlikely case
that this is taken too; the ADK id is cut short when the result would exceed the longest
id). Rejected: a composite id (``app/user/id``) for every session, which every CLI
command and log line would then have to spell out.

Revisions: ``adk_sessions.revision`` grows by one with every append (the sessiondb
session's own ``revision`` counts changes to its fields, which appends are not), and
``incarnation``, a random token drawn when the session is created, tells a session from
an earlier one of the same id that was deleted (its revisions started from 0 too). A
``Session`` object carries both as it read them (``_storage_update_marker``, the field
ADK keeps for exactly this), and :func:`append` compares them inside the same write
transaction that appends, under the session's lock, so two processes can neither both
pass the check nor interleave. A ``Session`` without a marker (made by hand, or by
another service) is current when its last event is the session's last stored one, or
when both have none. ``update_time`` is the last event's timestamp, as in ADK's
services (so ``last_update_time`` equals it, and listings order as theirs do); no
check relies on it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..backend import Conn, first, rows, session_lock_key
from ..store import SessionDB
from ..text import MAX_ID_LENGTH
from .adk_errors import AdkAlreadyExists, AdkSessionNotFound, StaleSession
from .tables import AdapterTables, ensure_tables

__all__ = ["TABLES", "Stored", "Appended", "Marker", "create", "get", "list_for",
           "delete", "append", "user_state", "prepare", "store_id_candidates"]


def _ddl(text: str, real: str, integer: str) -> tuple[str, ...]:
    return tuple(s.strip().format(text=text, real=real, integer=integer)
                 for s in _DDL.split(";") if s.strip())


_DDL = """
CREATE TABLE adk_sessions (
    session_id {text} PRIMARY KEY REFERENCES sessions(id) ON DELETE CASCADE,
    app_name {text} NOT NULL,
    user_id {text} NOT NULL,
    adk_id {text} NOT NULL,
    incarnation {text} NOT NULL,
    state {text} NOT NULL,
    create_time {real} NOT NULL,
    update_time {real} NOT NULL,
    revision {integer} NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX adk_sessions_adk_id ON adk_sessions (app_name, user_id, adk_id);
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

# The tables of the shared states and their keys.
_SCOPES = {"app": ("adk_app_states", ("app_name",)),
           "user": ("adk_user_states", ("app_name", "user_id"))}

#: The session's identity in the adapter's table.
_IDENTITY = "app_name = ? AND user_id = ? AND adk_id = ?"

#: What a Session object was read at: the session's incarnation and revision.
Marker = tuple[str, int]


@dataclass
class Stored:
    """An ADK session as stored: ``id`` the ADK id, ``store_id`` the sessiondb session's,
    its own state (no prefixes), the app and user state (keys without their prefixes),
    and its events' JSON, oldest first."""

    id: str
    store_id: str
    app_name: str
    user_id: str
    state: dict[str, Any]
    app_state: dict[str, Any]
    user_state: dict[str, Any]
    update_time: float
    marker: Marker
    events: list[str] = field(default_factory=list)


@dataclass
class Appended:
    """What an append left: the session's marker and update time after it. ``stored``
    False when the event was there already (an equal re-delivery: nothing written);
    ``caught_up`` then tells whether the caller's object was just one event behind and
    that event is this one, the newest: applying it brings the object up to ``marker``."""

    marker: Marker
    update_time: float
    stored: bool = True
    caught_up: bool = False


def prepare(db: SessionDB) -> SessionDB:
    """``db`` with this adapter's tables (made once per store and version)."""
    ensure_tables(db, TABLES)
    return db


def store_id_candidates(app_name: str, user_id: str, adk_id: str) -> Iterator[str]:
    """The sessiondb ids a new ADK session may get, in the order they are tried: the
    ADK id, then ``<id>~<tag>``, ``<id>~<tag>~2``... (see the module docstring)."""
    yield adk_id
    owner = json.dumps([app_name, user_id])  # ASCII: any text hashes
    tag = "~" + hashlib.sha256(owner.encode("ascii")).hexdigest()[:8]
    for n in itertools.count(1):
        suffix = tag if n == 1 else f"{tag}~{n}"
        yield adk_id[:MAX_ID_LENGTH - len(suffix)] + suffix


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


def _locked_row(db: SessionDB, conn: Conn, identity: tuple[str, str, str],
                columns: str) -> Any:
    """The ``adk_sessions`` row (its sessiondb id, then ``columns``) of the ADK session,
    read with the sessiondb session's lock held; None when there is none. The id is
    looked up, locked, and looked up again until two lookups agree: on PostgreSQL the
    session may be deleted or made anew between the first lookup and the lock."""
    locked = None
    while True:
        row = conn.execute(f"SELECT session_id, {columns} FROM adk_sessions WHERE "
                           f"{_IDENTITY}", identity).fetchone()
        if row is None or row[0] == locked:
            return row
        db._sql.lock(conn, session_lock_key(row[0]))
        locked = row[0]


def create(db: SessionDB, source: str, app_name: str, user_id: str, adk_id: str,
           deltas: dict[str, dict[str, Any]], now: float) -> Stored:
    """Create the session with the session part of ``deltas`` as its state and merge
    the app and user parts into the shared states, in one transaction.

    :raises AdkAlreadyExists: this app and user have a session of this id; nothing
        was written.
    """
    identity = (app_name, user_id, adk_id)

    def write(conn: Conn) -> Stored:
        # The identity's lock first, then the candidates' in the order tried: every
        # creator locks in that order (and the candidates only grow longer), and the
        # other writers take one session's lock (a second only when the session was
        # deleted and made anew under another id meanwhile: should that ever close a
        # cycle, PostgreSQL reports the deadlock and the write path runs it again).
        db._sql.lock(conn, "adk-session:" + json.dumps(identity))
        if first(conn, f"SELECT 1 FROM adk_sessions WHERE {_IDENTITY}", identity):
            raise AdkAlreadyExists(f"Session with id {adk_id} already exists.", adk_id)
        for store_id in store_id_candidates(*identity):
            db._sql.lock(conn, session_lock_key(store_id))
            if first(conn, "SELECT 1 FROM sessions WHERE id = ?", (store_id,)) is None:
                break
        marker = (secrets.token_hex(8), 0)
        conn.execute("INSERT INTO sessions (id, source, user_id, started_at) VALUES "
                     "(?, ?, ?, ?)", (store_id, source, user_id, now))
        conn.execute("INSERT INTO adk_sessions (session_id, app_name, user_id, adk_id, "
                     "incarnation, state, create_time, update_time, revision) VALUES "
                     "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (store_id, *identity, marker[0], json.dumps(deltas["session"]), now,
                      now, marker[1]))
        return Stored(adk_id, store_id, app_name, user_id, dict(deltas["session"]),
                      _merge_scope(db, conn, "app", (app_name,), deltas["app"], now),
                      _merge_scope(db, conn, "user", (app_name, user_id), deltas["user"],
                                   now),
                      now, marker)

    return db._execute_write(write)


def get(db: SessionDB, app_name: str, user_id: str, adk_id: str,
        recent: int | None, after: float | None) -> Stored | None:
    """The session with its events (the last ``recent``, of those at or after
    ``after``; in the order they were appended), read as of one moment; None when this
    app and user have no session of this id."""

    def read(conn: Conn) -> Stored | None:
        row = conn.execute("SELECT session_id, state, update_time, incarnation, revision "
                           f"FROM adk_sessions WHERE {_IDENTITY}",
                           (app_name, user_id, adk_id)).fetchone()
        if row is None:
            return None
        store_id = row[0]
        events: list[str] = []
        if recent != 0:
            where, args = "m.session_id = ?", [store_id]
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
        return Stored(adk_id, store_id, app_name, user_id, _loads(row[1]),
                      _scope_state(conn, "app", (app_name,)),
                      _scope_state(conn, "user", (app_name, user_id)),
                      row[2], (row[3], row[4]), events)

    return db._read(read, snapshot=True)


def list_for(db: SessionDB, app_name: str, user_id: str | None) -> list[Stored]:
    """The sessions of an app (of one user, or of all), without events, least recently
    updated first (then by user and id, as ADK's services order them)."""

    def read(conn: Conn) -> list[Stored]:
        where, args = "app_name = ?", [app_name]
        if user_id is not None:
            where += " AND user_id = ?"
            args.append(user_id)
        found = rows(conn, "SELECT session_id, adk_id, user_id, state, update_time, "
                           f"incarnation, revision FROM adk_sessions WHERE {where} "
                           "ORDER BY update_time, user_id, adk_id", args)
        app_state = _scope_state(conn, "app", (app_name,))
        users = {r[0]: _loads(r[1]) for r in conn.execute(
            f"SELECT user_id, state FROM adk_user_states WHERE {where}", args).fetchall()}
        return [Stored(r["adk_id"], r["session_id"], app_name, r["user_id"],
                       _loads(r["state"]), app_state, users.get(r["user_id"], {}),
                       r["update_time"], (r["incarnation"], r["revision"]))
                for r in found]

    return db._read(read, snapshot=True)


def user_state(db: SessionDB, app_name: str, user_id: str) -> dict[str, Any]:
    """The state shared by the sessions of this app and user (keys without prefix)."""
    return db._read(lambda conn: _scope_state(conn, "user", (app_name, user_id)))


def delete(db: SessionDB, app_name: str, user_id: str, adk_id: str) -> None:
    """Delete the session of this app, user and id, its messages and its rows here (as
    ``SessionDB.delete_session``, in the same transaction as the lookup); nothing when
    there is none."""

    def owned(conn: Conn) -> str | None:
        row = _locked_row(db, conn, (app_name, user_id, adk_id), "1")
        return row[0] if row is not None else None

    with db.transaction():
        store_id = db._execute_write(owned)
        if store_id is not None:
            db.delete_session(store_id)


def _last_events(conn: Conn, store_id: str) -> list[str]:
    """The ids of the session's last two events, newest first (driven from
    messages(session_id, id), as :func:`get` is)."""
    return [r[0] for r in conn.execute(
        "SELECT e.event_id FROM messages m JOIN adk_events e ON e.message_id = m.id "
        "WHERE m.session_id = ? ORDER BY m.id DESC LIMIT 2", (store_id,)).fetchall()]


def append(db: SessionDB, app_name: str, user_id: str, adk_id: str, *,
           expected: Marker | None, seen_event: str | None, event_id: str,
           event_json: str, timestamp: float, message: dict[str, Any], calls: int,
           deltas: dict[str, dict[str, Any]]) -> Appended:
    """Append one event, in one write transaction under the session's lock: check that
    the session is still at ``expected`` (its incarnation and revision; or, without a
    marker, that its last event is ``seen_event``, the id of the caller's last event, or
    that neither has one), then write the message, the event's row, the session's new
    state, update time (the event's ``timestamp``) and revision, and the shared states.

    An event whose id the session already holds with the same JSON is not written again
    (a retried append whose first attempt committed); this check comes first, as in
    ADK's in-memory service.

    :param message: the message's ``role``, ``content``, ``tool_calls``, ``tool_name``
        and ``tool_call_id``; ``calls`` the number of tool calls.
    :raises StaleSession: the session changed since, or was deleted and made anew
        (nothing written).
    :raises AdkSessionNotFound: no such session for this app and user.
    :raises AdkAlreadyExists: another event with this id is in the session.
    """

    def write(conn: Conn) -> Appended:
        row = _locked_row(db, conn, (app_name, user_id, adk_id),
                          "incarnation, revision, update_time, state")
        if row is None:
            raise AdkSessionNotFound(adk_id, app_name, user_id)
        store_id, incarnation, revision, update_time, state = row
        stored = first(conn, "SELECT m.metadata FROM adk_events e JOIN messages m ON "
                             "m.id = e.message_id WHERE e.session_id = ? AND "
                             "e.event_id = ?", (store_id, event_id))
        if stored is not None:
            if stored != event_json:
                raise AdkAlreadyExists(f"Event {event_id} already exists in session "
                                       f"{adk_id}; nothing was written", adk_id, event_id)
            last = _last_events(conn, store_id)
            if expected is not None:
                behind = expected == (incarnation, revision - 1)
            else:
                behind = (last[1] if len(last) > 1 else None) == seen_event
            return Appended((incarnation, revision), update_time, stored=False,
                            caught_up=behind and last[:1] == [event_id])
        if expected is not None:
            stale = expected != (incarnation, revision)
        else:
            stale = _last_events(conn, store_id)[:1] != ([seen_event] if seen_event else [])
        if stale:
            raise StaleSession(adk_id, expected[1] if expected else None, revision,
                               recreated=expected is not None and expected[0] != incarnation)
        db._sql.update_session(conn, session_lock_key(store_id),
                               "message_count = message_count + 1, "
                               "tool_call_count = tool_call_count + ?", [calls], store_id)
        message_id = first(conn, "INSERT INTO messages (session_id, role, content, "
                                 "tool_calls, tool_name, tool_call_id, timestamp, metadata) "
                                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                           (store_id, message["role"], message["content"],
                            message["tool_calls"], message["tool_name"],
                            message["tool_call_id"], timestamp, event_json))
        conn.execute("INSERT INTO adk_events (message_id, session_id, event_id) VALUES "
                     "(?, ?, ?)", (message_id, store_id, event_id))
        if deltas["session"]:
            state = json.dumps({**_loads(state), **deltas["session"]})
        conn.execute("UPDATE adk_sessions SET state = ?, update_time = ?, revision = ? "
                     "WHERE session_id = ?", (state, timestamp, revision + 1, store_id))
        if deltas["app"]:
            _merge_scope(db, conn, "app", (app_name,), deltas["app"], timestamp)
        if deltas["user"]:
            _merge_scope(db, conn, "user", (app_name, user_id), deltas["user"], timestamp)
        return Appended((incarnation, revision + 1), timestamp)

    return db._execute_write(write)
