"""A drop-in replacement for hermes-agent's ``SessionDB`` (``hermes_state.py``, March 2026,
its schema 6), on a SQLite file or a PostgreSQL database::

    from sessiondb.compat.hermes import SessionDB   # instead of: from hermes_state import SessionDB

    db = SessionDB()                                      # ~/.hermes/state.db, as before
    db = SessionDB("postgresql://hermes@db.internal/hermes")   # a PostgreSQL store

Every method, default, return shape (dict keys in hermes-agent's column order), counter,
title and search rule is hermes-agent's (#6), on both backends. Underneath it is
sessiondb's engine (:func:`sessiondb.opening.open_engine`): the writes run through its
one write path (SQLite: the FIFO gate, ``BEGIN IMMEDIATE``, jittered retry until
``write_timeout``; PostgreSQL: a pooled connection, a short transaction, retries of
serialization failures) instead of the original's 15-attempt loop. A file is a sessiondb
store: the ``sessiondb`` CLI and :class:`sessiondb.SessionDB` open it too, and an
existing hermes-agent ``state.db`` is converted in place when first opened
(:mod:`sessiondb.conversion`). A URL opens a sessiondb store on PostgreSQL
(there is nothing to convert; :class:`sessiondb.SessionDB` opens the same URL too).

Where the original raised a ``sqlite3`` error, this raises a class that derives from both
that ``sqlite3`` class and a sessiondb error, so ``except sqlite3.IntegrityError`` and
``except sessiondb.IntegrityViolation`` both work, on either backend (on PostgreSQL the
sessiondb error's ``__cause__`` is the psycopg error, and the message starts with
SQLite's words, e.g. ``FOREIGN KEY constraint failed``)::

    IntegrityError      IntegrityViolation + sqlite3.IntegrityError
                        (foreign key, NOT NULL, datatype mismatch: limit=None)
    ProgrammingError    InvalidArgumentType + sqlite3.ProgrammingError
                        (a value SQLite cannot store, e.g. list content; on
                        PostgreSQL also a value of another type than the column's)
    DatabaseLocked      DatabaseBusyError + sqlite3.OperationalError
    └── LockTimeout     + WriteTimeout: no write lock within write_timeout
    DatabaseClosed      ClosedError + AttributeError (any call after close())
    TitleInUse          TitleConflict (a ValueError), hermes-agent's message

Deliberate differences (README, "Coming from hermes-agent"): ``close()`` runs a last
PASSIVE checkpoint; lock contention waits up to ``write_timeout`` (16 s) in a FIFO queue
rather than 15 jittered attempts; a message too long for FTS5's quadratic ``snippet()``
gets sessiondb's linear-time snippet; search ranks in windows of the 1,000 most recent
matches, best first within each (:mod:`sessiondb.search`; fewer matches than that: best
first, as the original; on SQLite within each block of 262,144 message ids). A query
that is still invalid FTS5 after sanitizing returns ``[]`` exactly as in the original
(the permitted difference of answering it with matches is not taken), on PostgreSQL
too.

On PostgreSQL, besides (see :mod:`sessiondb.compat._hermes_search` and
:mod:`sessiondb.pg.search`):

- search: the matches are PostgreSQL's (``to_tsvector('simple')``): accents are not
  removed (``cafe`` does not find ``café``); ``foo.py``, ``v1.2`` and e-mail addresses
  are single tokens (``foo`` does not find ``foo.py``); a hyphenated word is found by
  itself and its parts, not by its parts apart (``chat-send`` does not find ``chat
  send``), nor is a phrase that starts or ends inside one (``"run chat"`` in ``run
  chat-send``); only the first 262,144 characters of a message are indexed; the column
  filter ``content:`` is dropped (``-content:`` finds nothing) and ``"a phrase"*`` is
  the exact phrase; a query over 1,000 characters raises
  :class:`~sessiondb.errors.InvalidArgument` (a ValueError). The order within a window
  is ``ts_rank``'s (how often the words occur, over 1 + the log of the message's
  length), not bm25's (which weighs a rare word above a common one). Snippets are
  ``ts_headline``'s: up to 40 words around the best match, each matched word wrapped on
  its own (``>>>quick<<< >>>brown<<<`` where FTS5 wraps the phrase ``>>>quick
  brown<<<``);
- text holding U+0000 cannot be stored or looked up
  (:class:`~sessiondb.errors.InvalidArgument`); a value of another type than its
  column's (an int session id, a token count ``"abc"``), which SQLite stored or compared
  as it was, raises :class:`ProgrammingError`; a session id of None is not stored
  (primary keys are NOT NULL; SQLite's legacy rule let hermes-agent store such a row);
- sessions that started at the same instant are listed in no defined order (on
  SQLite: the order of the index SQLite picks, as in the original).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .. import records, search, search_index
from ..backend import Conn, Handle, fetch as _fetch, first as _first, is_url
from ..opening import open_engine
from ..errors import StorageError
from ..hermes_schema import HERMES_MESSAGE_COLUMNS
from ..text import lineage_number, split_lineage
from . import _hermes_search as searching, _hermes_sql as q, _hermes_text as rules
from ._hermes_errors import (
    DatabaseClosed, DatabaseLocked, IntegrityError, LockTimeout, ProgrammingError, TitleInUse,
    bindable, compatible_errors, page,
)

__all__ = [
    "SessionDB", "DEFAULT_DB_PATH", "SCHEMA_VERSION", "IntegrityError", "ProgrammingError",
    "DatabaseLocked", "LockTimeout", "DatabaseClosed", "TitleInUse",
]

T = TypeVar("T")

#: hermes-agent's schema version; the file itself is a sessiondb store.
SCHEMA_VERSION = 6
#: ``$HERMES_HOME/state.db``, else ``~/.hermes/state.db`` (read once, at import).
DEFAULT_DB_PATH = Path(os.environ.get("HERMES_HOME") or Path.home() / ".hermes") / "state.db"
#: Seconds a write waits for the lock before :class:`LockTimeout` (see SessionDB).
WRITE_TIMEOUT = 16.0


_ASSISTANT_ONLY = ("reasoning", "reasoning_details", "codex_reasoning_items")
_JSON_KEYS = ("tool_calls", "reasoning_details", "codex_reasoning_items")
_ACCOUNT_ARGS = ("session_id", *q.TOKENS, "estimated_cost_usd", "actual_cost_usd",
                 *q.LATEST_WINS, *q.FIRST_WINS)


class SessionDB(Handle):
    """hermes-agent's ``SessionDB`` on a sessiondb engine (which it holds): SQLite for a
    file, PostgreSQL for a URL.

    :param db_path: the database file (``Path`` or ``str``), or a PostgreSQL URL
        (``postgresql://user@host/db``, a ``str``); None means :data:`DEFAULT_DB_PATH`
        (``$SESSIONDB_PATH`` is not read: hermes-agent's default is hermes-agent's
        home). Missing parent directories of a file are created.
    :param options: keyword options of :class:`sessiondb.SessionDB` (``write_timeout``,
        ``hold_timeout``; SQLite's or PostgreSQL's own, such as ``pool_size`` and
        ``schema``), all optional. ``write_timeout`` defaults to 16 s here, about the
        longest the original's 15 attempts of up to 1 s (plus 20-150 ms pauses) waited
        before raising ``OperationalError``.
    :raises DatabaseOpenError: the path cannot be opened as a store, or is a hermes-agent
        file of another schema version (:class:`~sessiondb.errors.HermesSchemaError`);
        the server of a URL cannot be reached.
    :raises ConfigurationError: an option the backend does not have.
    """

    MAX_TITLE_LENGTH = 100

    def __init__(self, db_path: Path | str | None = None, **options: Any) -> None:
        # The argument itself: a file's str becomes a Path (as code using
        # db_path.parent needs); a URL stays the str it was, password included, so
        # that SessionDB(db.db_path) opens the same store (what is shown, ``path`` and
        # repr(), hides the password). Rejected: the masked URL, which cannot open it.
        if db_path is None:
            self.db_path: Path | str = DEFAULT_DB_PATH
        elif is_url(db_path):
            self.db_path = db_path
        else:
            self.db_path = db_path if isinstance(db_path, Path) else Path(db_path)
        options.setdefault("write_timeout", WRITE_TIMEOUT)
        self._engine = open_engine(self.db_path, options)
        self._sql = self._engine.sql
        # The columns whose NULL makes hermes-agent's INSERT OR IGNORE skip a session
        # (see create_session): on PostgreSQL the primary key too, which SQLite's
        # legacy rule lets hold NULL.
        self._not_null = ("source",) if self._sql.name == "sqlite" else ("id", "source")

    # sessiondb's extras (see sessiondb.SessionDB for each)
    @contextmanager
    def transaction(self) -> Iterator["SessionDB"]:
        """One atomic write transaction for several calls (as :meth:`sessiondb.SessionDB.transaction`)."""
        with compatible_errors(), self._engine.transaction():
            yield self

    def checkpoint(self, reset: bool = False) -> dict[str, int]:
        """As :meth:`sessiondb.SessionDB.checkpoint`."""
        with compatible_errors():
            return self._engine.checkpoint(reset)

    def stats(self) -> dict[str, Any]:
        """The write path's and checkpoints' figures (as :meth:`sessiondb.SessionDB.stats`)."""
        with compatible_errors():
            return self._engine.stats()

    # -- the engine's doors, with hermes-compatible errors ------------------------------
    def _execute_write(self, fn: Callable[[Conn], T], *, bounded: bool = True) -> T:
        with compatible_errors():
            return self._engine.execute_write(fn, bounded=bounded)

    def _read(self, fn: Callable[[Conn], T], snapshot: bool = False) -> T:
        with compatible_errors():
            return self._engine.read(fn, snapshot)

    def _run(self, sql: str, args: tuple | dict) -> None:
        bindable(args)
        self._execute_write(lambda conn: conn.execute(sql, args))

    def _select(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        bindable(args)
        return self._read(lambda conn: q.rows(conn, sql, args))

    def _value(self, sql: str, args: tuple | list = ()) -> Any:
        bindable(args)
        return self._read(lambda conn: _first(conn, sql, args))

    def _insert_or_ignore(self, values: dict[str, Any]) -> None:
        """hermes-agent's ``INSERT OR IGNORE INTO sessions``: nothing when the id exists,
        and nothing, silently, when a NOT NULL column would be NULL (OR IGNORE skips
        such a row too, and hermes-agent relies on it: ``create_session(sid, None)``
        returns quietly); a missing parent still fails. Written as ``ON CONFLICT DO
        NOTHING``, which both databases read and which skips only the taken id, after
        a check of the NOT NULL columns (PostgreSQL has no OR IGNORE)."""
        args = bindable(tuple(values.values()))
        if any(values[column] is None for column in self._not_null):
            return
        sql = (f"INSERT INTO sessions ({', '.join(values)}) VALUES "
               f"({', '.join('?' * len(values))}) ON CONFLICT DO NOTHING")
        self._execute_write(lambda conn: conn.execute(sql, args))

    # -- session lifecycle ------------------------------------------------------------
    def create_session(self, session_id: str, source: str, model: str | None = None,
                       model_config: dict | None = None, system_prompt: str | None = None,
                       user_id: str | None = None,
                       parent_session_id: str | None = None) -> str:
        """Insert the session unless its id exists (then nothing changes).

        ``model_config`` is stored as JSON if truthy, else NULL. A row breaking NOT NULL
        (``source=None``) is silently not inserted; the id is returned anyway.

        :raises IntegrityError: ``parent_session_id`` names a missing session.
        :raises TypeError: ``model_config`` is not JSON-serializable.
        """
        config = rules.encode_if_truthy(model_config)
        self._insert_or_ignore({
            "id": session_id, "source": source, "user_id": user_id, "model": model,
            "model_config": config, "system_prompt": system_prompt,
            "parent_session_id": parent_session_id, "started_at": time.time(),
            "message_count": 0, "tool_call_count": 0})
        return session_id

    def ensure_session(self, session_id: str, source: str = "unknown",
                       model: str | None = None) -> None:
        """Insert a minimal session row unless the id exists (idempotent)."""
        self._insert_or_ignore({"id": session_id, "source": source, "model": model,
                                "started_at": time.time()})

    def end_session(self, session_id: str, end_reason: str | None) -> None:
        """Set ``ended_at`` to now and ``end_reason`` (again on every call)."""
        self._run("UPDATE sessions SET ended_at = ?, end_reason = ? WHERE id = ?",
                    (time.time(), end_reason, session_id))

    def reopen_session(self, session_id: str) -> None:
        """Clear ``ended_at`` and ``end_reason``."""
        self._run("UPDATE sessions SET ended_at = NULL, end_reason = NULL WHERE id = ?",
                    (session_id,))

    def update_system_prompt(self, session_id: str, system_prompt: str | None) -> None:
        """Overwrite the system prompt."""
        self._run("UPDATE sessions SET system_prompt = ? WHERE id = ?",
                    (system_prompt, session_id))

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """The session row (``model_config`` as JSON text), or None."""
        bindable((session_id,))
        return self._read(lambda conn: q.session(conn, session_id))

    # -- token and cost accounting ----------------------------------------------------
    def update_token_counts(
        self, session_id: str, input_tokens: int = 0, output_tokens: int = 0,
        model: str | None = None, cache_read_tokens: int = 0, cache_write_tokens: int = 0,
        reasoning_tokens: int = 0, estimated_cost_usd: float | None = None,
        actual_cost_usd: float | None = None, cost_status: str | None = None,
        cost_source: str | None = None, pricing_version: str | None = None,
        billing_provider: str | None = None, billing_base_url: str | None = None,
        billing_mode: str | None = None, absolute: bool = False,
    ) -> None:
        """Add the token counts and costs (``absolute``: set them). Cost status, source
        and pricing version: the latest non-None wins; model and billing fields: the
        first non-None wins. A missing session is a no-op."""
        self._account("absolute" if absolute else "add", locals())

    def set_token_counts(
        self, session_id: str, input_tokens: int = 0, output_tokens: int = 0,
        model: str | None = None, cache_read_tokens: int = 0, cache_write_tokens: int = 0,
        reasoning_tokens: int = 0, estimated_cost_usd: float | None = None,
        actual_cost_usd: float | None = None, cost_status: str | None = None,
        cost_source: str | None = None, pricing_version: str | None = None,
        billing_provider: str | None = None, billing_base_url: str | None = None,
        billing_mode: str | None = None,
    ) -> None:
        """Set the token counts and the estimated cost (None clears it); the other fields
        as in :meth:`update_token_counts`."""
        self._account("set", locals())

    def _account(self, mode: str, args: dict[str, Any]) -> None:
        # Checked as the named parameters the original bound (its error message).
        bindable({k: args[k] for k in _ACCOUNT_ARGS})
        values = q.account_args(mode, args)
        self._execute_write(lambda conn: conn.execute(q.ACCOUNT_SQL[mode], values))

    # -- titles -----------------------------------------------------------------------
    @staticmethod
    def sanitize_title(title: str | None) -> str | None:
        """Delete control and invisible characters, collapse whitespace runs to one
        space, trim; a falsy or empty result is None.

        :raises ValueError: longer than 100 characters after that (never truncated).
        """
        return rules.sanitize_title(title)

    def set_session_title(self, session_id: str, title: str | None) -> bool:
        """Set the sanitized title (an empty one clears it); True if the session exists.

        :raises ValueError: the title is too long, or another session has it (checked
            even when ``session_id`` does not exist).
        """
        clean = self.sanitize_title(title)
        bindable((session_id,))

        def write(conn: Conn) -> bool:
            # PostgreSQL: setters of this title queue, so the check below stays true
            # until the update commits (SQLite: BEGIN IMMEDIATE did it already).
            self._sql.lock(conn, "session:" + str(session_id),
                           *(["title:" + clean] if clean is not None else []))
            if clean is not None:
                other = _first(conn, "SELECT id FROM sessions WHERE title = ? AND id != ?",
                               (clean, session_id))
                if other is not None:
                    raise TitleInUse(clean, other)
            conn.execute("UPDATE sessions SET title = ? WHERE id = ?", (clean, session_id))
            return conn.changes() > 0

        return self._execute_write(write)

    def get_session_title(self, session_id: str) -> str | None:
        """The title, or None (no title, or no such session)."""
        return self._value("SELECT title FROM sessions WHERE id = ?", (session_id,))

    def get_session_by_title(self, title: str) -> dict[str, Any] | None:
        """The session with exactly this title (case-sensitive, not sanitized), or None."""
        rows = self._select(f"SELECT {q.SESSION} FROM sessions WHERE title = ?", (title,))
        return rows[0] if rows else None

    def resolve_session_by_title(self, title: str) -> str | None:
        """The newest (by ``started_at``) of the numbered variants ``<title> #...``
        (ASCII case folded), else the exact title's session, else None."""
        bindable((title,))

        def read(conn: Conn) -> str | None:
            # ASCII-case-insensitive prefix, every other character literal (the
            # original's LIKE with escapes): the dialect's starts_with.
            match, args = self._sql.starts_with("title", f"{title} #", fold=True)
            newest = _first(conn, f"SELECT id FROM sessions WHERE {match} "
                                  "ORDER BY started_at DESC LIMIT 1", args)
            if newest is not None:
                return newest
            return _first(conn, "SELECT id FROM sessions WHERE title = ?", (title,))

        return self._read(read, snapshot=True)

    def get_next_title_in_lineage(self, base_title: str) -> str:
        """The next title of a lineage: ``"X"`` -> ``"X #2"``, ``"X #2"`` -> ``"X #3"``;
        the base itself while no title of the lineage exists."""
        base = split_lineage(base_title)  # the same rule as sessiondb's
        match, args = self._sql.starts_with("title", f"{base} #", fold=True)
        rows = self._select(f"SELECT title FROM sessions WHERE title = ? OR {match}",
                            (base, *args))
        if not rows:
            return base
        highest = max([1] + [lineage_number(r["title"]) or 1 for r in rows])
        return f"{base} #{highest + 1}"

    # -- lookup, listing, counts ------------------------------------------------------
    def resolve_session_id(self, session_id_or_prefix: str) -> str | None:
        """The exact id, else the only id starting with the text (ASCII case folded,
        ``%``/``_`` literal); None for no match or several."""
        key = session_id_or_prefix
        bindable((key,))

        def read(conn: Conn) -> str | None:
            if _first(conn, "SELECT id FROM sessions WHERE id = ?", (key,)) is not None:
                return key
            match, args = self._sql.starts_with("id", key, fold=True)
            rows = _fetch(conn, f"SELECT id FROM sessions WHERE {match} LIMIT 2", args)
            return rows[0][0] if len(rows) == 1 else None

        return self._read(read, snapshot=True)

    def list_sessions_rich(self, source: str | None = None,
                           exclude_sources: list[str] | None = None, limit: int = 20,
                           offset: int = 0) -> list[dict[str, Any]]:
        """Sessions, newest first, each row followed by ``last_active`` (latest message
        time, else ``started_at``) and ``preview`` (first user message, 60 characters).

        The page is picked first and only its rows are described (see
        :mod:`sessiondb.listing`; on PostgreSQL :mod:`sessiondb.pg.listing`), by the
        original's ``ORDER BY started_at DESC LIMIT OFFSET``, without its subqueries for
        every session of the filter. (Sessions that started at the same instant come in
        the order of the index SQLite picks, as they did in the original; on
        PostgreSQL in no defined order.)"""
        where, args = q.source_filters(source, exclude_sources)
        bindable((*args, limit, offset))
        first, skip = page(limit, offset)
        window = 4 * rules.PREVIEW_WINDOW  # the bytes of head_sql()

        def read(conn: Conn) -> list[dict[str, Any]]:
            rows = q.in_table_order(conn, self._sql.list_page(
                conn, where, args, "s.started_at DESC", first, skip, columns=q.S_SESSION,
                preview_order="m.timestamp, m.id"))
            for row in rows:
                row["preview"] = rules.preview(row["preview"].read(window)[0])
            return rows

        return self._read(read, snapshot=True)

    def search_sessions(self, source: str | None = None, limit: int = 20,
                        offset: int = 0) -> list[dict[str, Any]]:
        """Session rows, newest first, of one source if given."""
        bindable((*q.source_filters(source)[1], limit, offset))
        return self._select(*q.search_sessions_sql(source, *page(limit, offset)))

    def session_count(self, source: str | None = None) -> int:
        """The number of sessions, of one source if given."""
        where, args = q.source_filters(source)
        return self._value(f"SELECT COUNT(*) FROM sessions s{q.where(where)}", args)

    def message_count(self, session_id: str | None = None) -> int:
        """The number of messages, of one session if given."""
        if session_id:
            return self._value("SELECT COUNT(*) FROM messages WHERE session_id = ?",
                               (session_id,))
        # SQLite: kept by triggers, one row read; PostgreSQL: the sessions' counters.
        return self._value(self._sql.message_total)

    # -- messages ---------------------------------------------------------------------
    def append_message(self, session_id: str, role: str, content: str | None = None,
                       tool_name: str | None = None, tool_calls: Any = None,
                       tool_call_id: str | None = None, token_count: int | None = None,
                       finish_reason: str | None = None, reasoning: str | None = None,
                       reasoning_details: Any = None,
                       codex_reasoning_items: Any = None) -> int:
        """Insert a message (timestamp now) and count it in the session: one message,
        and ``len(tool_calls)`` tool calls for a list (one for any other non-None value).

        :returns: the message id.
        :raises IntegrityError: the session does not exist, or ``role`` is None.
        :raises ProgrammingError: a value SQLite cannot store (e.g. list content).
        :raises TypeError: a JSON field is not serializable (nothing is written).
        """
        args = bindable((
            session_id, role, content, tool_call_id, rules.encode_if_truthy(tool_calls),
            tool_name, time.time(), token_count, finish_reason, reasoning,
            rules.encode_if_truthy(reasoning_details),
            rules.encode_if_truthy(codex_reasoning_items)))
        calls = records.count_tool_calls(tool_calls)  # the same rule as sessiondb's
        columns = ", ".join(HERMES_MESSAGE_COLUMNS[1:])

        def write(conn: Conn) -> int:
            # The counters first: on PostgreSQL the UPDATE locks the session's row, so
            # its appends queue there and draw their ids in the order they commit. A
            # missing session then fails the INSERT's foreign key (all rolled back).
            conn.execute("UPDATE sessions SET message_count = message_count + 1, "
                         "tool_call_count = tool_call_count + ? WHERE id = ?",
                         (calls, session_id))
            return conn.execute(f"INSERT INTO messages ({columns}) VALUES "
                                f"({', '.join('?' * len(args))}) RETURNING id",
                                args).fetchone()[0]

        return self._execute_write(write)

    def get_messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's messages, oldest first; ``tool_calls`` decoded (text that is
        not JSON kept as it is), the reasoning fields as JSON text."""
        bindable((session_id,))
        return self._read(lambda conn: q.messages(conn, session_id))

    def get_messages_as_conversation(self, session_id: str) -> list[dict[str, Any]]:
        """The session as chat messages: ``role``, ``content``, the tool fields when
        set, and on assistant messages the reasoning fields when set (decoded)."""
        out = []
        for m in self._select(
                "SELECT role, content, tool_call_id, tool_name, tool_calls, reasoning, "
                "reasoning_details, codex_reasoning_items FROM messages "
                "WHERE session_id = ? ORDER BY timestamp, id", (session_id,)):
            item = {"role": m["role"], "content": m["content"]}
            for key in ("tool_call_id", "tool_name", "tool_calls", "reasoning",
                        "reasoning_details", "codex_reasoning_items"):
                if not m[key] or key in _ASSISTANT_ONLY and m["role"] != "assistant":
                    continue
                if key not in _JSON_KEYS:
                    item[key] = m[key]
                    continue
                ok, value = rules.decodes(m[key])
                if ok:  # JSON that does not decode is left out
                    item[key] = value
            out.append(item)
        return out

    # -- search -----------------------------------------------------------------------
    @staticmethod
    def _sanitize_fts5_query(query: str) -> str:
        """hermes-agent's query sanitizer (see :func:`_hermes_text.sanitize_fts5_query`)."""
        return rules.sanitize_fts5_query(query)

    def search_messages(self, query: str, source_filter: list[str] | None = None,
                        exclude_sources: list[str] | None = None,
                        role_filter: list[str] | None = None, limit: int = 20,
                        offset: int = 0) -> list[dict[str, Any]]:
        """Full-text search: the best matches among the most recent. Each hit: ``id``,
        ``session_id``, ``role``, ``snippet`` (matches in ``>>> <<<``), ``timestamp``,
        ``tool_name``, ``source``, ``model``, ``session_started``, ``context`` (the
        messages of the session with ids next to the match's, the match included).

        The order is sessiondb's (:mod:`sessiondb.search`): windows of the 1,000 most
        recent matches, best match first within each (SQLite: bm25; PostgreSQL:
        ``ts_rank``), ties newest first, on SQLite each window within one block of
        262,144 message ids; a query with at most 1,000 matches is ordered best match
        first (on SQLite, within each block), as hermes-agent's was. A query that is still not valid FTS5
        after sanitizing finds nothing (``[]``), on PostgreSQL too. (PostgreSQL's
        matches, ranks and snippets differ in details: see the module docstring.)

        :raises IntegrityError: ``limit`` or ``offset`` is not an integer (None).
        :raises SearchIndexError: (SQLite) the index is damaged or being rebuilt.
        :raises InvalidArgument: (PostgreSQL) the query is over 1,000 characters.
        """
        if not query or not query.strip():
            return []
        match = self._sanitize_fts5_query(query)
        if not match:
            return []
        sources = None if source_filter is None else list(source_filter)
        excluded, roles = list(exclude_sources or ()), list(role_filter or ())
        terms = max(1, len(match.split()))
        # Checked as one statement's parameters, in the order this search bound them
        # before it ranked in windows (the numbers in the error message stay the same).
        bindable((terms, search.SNIPPET_BUDGET, match, *(sources or ()), *excluded,
                   *roles, limit, offset))
        first, skip = page(limit, offset)
        # Bound one by one, as the original did (its types, its variable limit).
        filters = search.Filters(sources=sources, exclude_sources=excluded, roles=roles,
                                 bind_each=True)
        if self._sql.name == "sqlite":
            def read(conn: Conn) -> list[dict[str, Any]]:
                return searching.sqlite_hits(conn, self.path, query, match, filters,
                                             first, skip)
        else:
            pg_query = searching.pg_query(match)
            if pg_query is None:
                return []  # not valid FTS5: the original's []

            def read(conn: Conn) -> list[dict[str, Any]]:
                return searching.pg_hits(conn, self._sql, self.path, pg_query, filters,
                                         first, skip)

        try:
            return self._read(read, snapshot=True)
        except StorageError as exc:
            if search_index.is_search_damage(exc):
                raise search_index.search_damage_error(exc, self.path) from exc
            raise

    # -- export and cleanup -----------------------------------------------------------
    def export_session(self, session_id: str) -> dict[str, Any] | None:
        """The session row plus ``messages`` (as :meth:`get_messages`), or None."""
        bindable((session_id,))

        def read(conn: Conn) -> dict[str, Any] | None:
            session = q.session(conn, session_id)
            if session is not None:
                session["messages"] = q.messages(conn, session_id)
            return session

        return self._read(read, snapshot=True)

    def export_all(self, source: str | None = None) -> list[dict[str, Any]]:
        """:meth:`export_session` of each of :meth:`search_sessions` (up to 100,000)."""
        sql, args = q.search_sessions_sql(source, 100000, 0)

        def read(conn: Conn) -> list[dict[str, Any]]:
            sessions = q.rows(conn, sql, args)
            for session in sessions:
                session["messages"] = q.messages(conn, session["id"])
            return sessions

        return self._read(read, snapshot=True)

    def clear_messages(self, session_id: str) -> None:
        """Delete the session's messages and zero its message and tool-call counts; the
        session row keeps everything else. A missing session is a no-op."""
        bindable((session_id,))

        def write(conn: Conn) -> None:
            # The counters first: on PostgreSQL the UPDATE locks the session's row, so
            # an append waits for the clear (or the clear for it, then deletes its
            # message too), and the counts match the messages left.
            conn.execute("UPDATE sessions SET message_count = 0, tool_call_count = 0 "
                         "WHERE id = ?", (session_id,))
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))

        self._execute_write(write)

    def delete_session(self, session_id: str) -> bool:
        """Delete the session and its messages; False if it does not exist.

        :raises IntegrityError: another session names it as parent (nothing deleted).
        """
        bindable((session_id,))

        def write(conn: Conn) -> bool:
            if not q.exists_locked(conn, session_id, self._sql.for_update):
                return False
            q.delete(conn, session_id)
            return True

        return self._execute_write(write)

    def prune_sessions(self, older_than_days: float = 90, source: str | None = None) -> int:
        """Delete the ended sessions started more than ``older_than_days`` ago (of one
        source if given), newest first, with their messages; returns how many.

        :raises IntegrityError: a session to delete is the parent of one that stays (or
            of one deleted after it); nothing is deleted.
        """
        cutoff = time.time() - older_than_days * 86400
        where, args = q.source_filters(source)
        where += ["s.started_at < ?", "s.ended_at IS NOT NULL"]
        # PostgreSQL: the rows stay locked until the prune ends (appends to them wait,
        # then find them gone), as BEGIN IMMEDIATE keeps everything still on SQLite.
        sql = (f"SELECT s.id FROM sessions s{q.where(where)} ORDER BY s.started_at DESC"
               + self._sql.for_update)
        params = bindable((*args, cutoff))

        def write(conn: Conn) -> int:
            ids = [r[0] for r in _fetch(conn, sql, params)]
            for sid in ids:
                q.delete(conn, sid)
            return len(ids)

        return self._execute_write(write)
