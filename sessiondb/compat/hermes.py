"""A drop-in replacement for hermes-agent's ``SessionDB`` (``hermes_state.py``, March 2026,
its schema 6)::

    from sessiondb.compat.hermes import SessionDB   # instead of: from hermes_state import SessionDB

Every method, default, return shape (dict keys in hermes-agent's column order), counter,
title and search rule is hermes-agent's (#6). Underneath it is sessiondb: the writes run
through the engine's write path (:meth:`sessiondb.engine.Engine.execute_write`: the FIFO gate, ``BEGIN
IMMEDIATE``, jittered retry until ``write_timeout``) instead of the original's 15-attempt
loop, the reads through :meth:`~sessiondb.engine.Engine.read`, on one apsw connection with
sessiondb's pragmas and checkpoints. The file is a sessiondb store: the ``sessiondb`` CLI
and :class:`sessiondb.SessionDB` open it too, and an existing hermes-agent ``state.db`` is
converted in place when first opened (:func:`sessiondb.schema.from_hermes`).

Where the original raised a ``sqlite3`` error, this raises a class that derives from both
that ``sqlite3`` class and a sessiondb error, so ``except sqlite3.IntegrityError`` and
``except sessiondb.IntegrityViolation`` both work::

    IntegrityError      IntegrityViolation + sqlite3.IntegrityError
                        (foreign key, NOT NULL, datatype mismatch: limit=None)
    ProgrammingError    InvalidArgumentType + sqlite3.ProgrammingError
                        (a value SQLite cannot store, e.g. list content)
    DatabaseLocked      DatabaseBusyError + sqlite3.OperationalError
    └── LockTimeout     + WriteTimeout: no write lock within write_timeout
    DatabaseClosed      ClosedError + AttributeError (any call after close())
    TitleInUse          TitleConflict (a ValueError), hermes-agent's message

Deliberate differences (README, "Coming from hermes-agent"): ``close()`` runs a last
PASSIVE checkpoint; lock contention waits up to ``write_timeout`` (16 s) in a FIFO queue
rather than 15 jittered attempts; a message too long for FTS5's quadratic ``snippet()``
gets sessiondb's linear-time snippet; search ranks in windows of the 1,000 most recent
matches, best first within each (:mod:`sessiondb.search`; fewer matches than that: best
first, as the original); rows read from a file hermes-agent had migrated
from an older version have their keys in the documented order, not the file's. A query
that is still invalid FTS5 after sanitizing returns ``[]`` exactly as in the original
(the permitted difference of answering it with matches is not taken).
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import apsw

from .. import listing, records, search, search_index
from ..backend import fetch as _fetch, first as _first
from ..engine import Engine
from ..backend import rows as _engine_rows
from ..errors import (
    ClosedError, DatabaseBusyError, IntegrityViolation, InvalidArgumentType, SessionDBError,
    StorageError, TitleConflict, WriteTimeout,
)
from ..schema import HERMES_MESSAGE_COLUMNS, HERMES_SESSION_COLUMNS, MESSAGE_TOTAL_SQL
from ..text import (
    MAX_QUERY_LENGTH, from_json, lineage_number, sanitize_fts_query, split_lineage,
)
from . import _hermes_text as rules

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


# -- errors -----------------------------------------------------------------------------

class IntegrityError(IntegrityViolation, sqlite3.IntegrityError):
    """A constraint failed (foreign key, NOT NULL, a datatype mismatch); nothing was
    written. Also a ``sqlite3.IntegrityError``, as the original raised."""


class ProgrammingError(InvalidArgumentType, sqlite3.ProgrammingError):
    """A value of a type SQLite cannot store (a list as content, say); nothing was
    written. Also a ``sqlite3.ProgrammingError``, as the original raised."""


class DatabaseLocked(DatabaseBusyError, sqlite3.OperationalError):
    """The database stayed locked past the time budget. Also a
    ``sqlite3.OperationalError``, as the original raised after its last retry."""


class LockTimeout(WriteTimeout, DatabaseLocked):
    """No write lock within ``write_timeout``; nothing was written."""


class DatabaseClosed(ClosedError, AttributeError):
    """The instance was closed. Also an ``AttributeError``, as the original raised."""


class TitleInUse(TitleConflict):
    """Another session has the title; hermes-agent's message, word for word."""

    def __init__(self, title: str, session_id: str) -> None:
        super().__init__(title, session_id)
        self.args = (f"Title '{title}' is already in use by session {session_id}",)


@contextmanager
def _compatible_errors() -> Iterator[None]:
    """Raise the engine's errors in their hermes-compatible form (chained)."""
    try:
        yield
    except (IntegrityError, DatabaseLocked, DatabaseClosed):
        raise
    except ClosedError as exc:
        raise DatabaseClosed(str(exc)) from None
    except SessionDBError as exc:
        cause = exc.__cause__
        if isinstance(exc, IntegrityViolation) or isinstance(
                cause, (apsw.ConstraintError, apsw.MismatchError)):
            # SQLite's own words, as sqlite3 gave them: "FOREIGN KEY constraint failed"
            text = str(cause) if isinstance(cause, apsw.Error) else str(exc)
            raise IntegrityError(text) from exc
        if isinstance(exc, WriteTimeout):
            raise LockTimeout(exc.waited_s, exc.attempts) from exc
        if isinstance(exc, DatabaseBusyError):
            raise DatabaseLocked(str(exc)) from exc
        raise


_BINDABLE = (type(None), int, float, str, bytes, bytearray, memoryview)


Args = TypeVar("Args", tuple, list, dict)


def _bindable(args: Args) -> Args:
    """:raises ProgrammingError: an argument SQLite cannot store (checked before any SQL
    runs, with the message of Python's ``sqlite3``)."""
    named = args.items() if isinstance(args, dict) else enumerate(args, 1)
    for key, value in named:
        if not isinstance(value, _BINDABLE):
            raise ProgrammingError(f"Error binding parameter {key}: type "
                                   f"'{type(value).__name__}' is not supported")
    return args


def _placeholders(values: Any) -> tuple[str, list]:
    items = list(values)
    return f"({', '.join('?' * len(items))})", items


_SESSION = ", ".join(HERMES_SESSION_COLUMNS)
_S_SESSION = ", ".join("s." + c for c in HERMES_SESSION_COLUMNS)
_MESSAGE = ", ".join(HERMES_MESSAGE_COLUMNS)
_ASSISTANT_ONLY = ("reasoning", "reasoning_details", "codex_reasoning_items")
_JSON_KEYS = ("tool_calls", "reasoning_details", "codex_reasoning_items")
_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
           "reasoning_tokens")
_LATEST_WINS = ("cost_status", "cost_source", "pricing_version")
_FIRST_WINS = ("billing_provider", "billing_base_url", "billing_mode", "model")


class SessionDB:
    """hermes-agent's ``SessionDB`` on sessiondb's SQLite engine (which it holds).

    :param db_path: the database file (``Path`` or ``str``); None means
        :data:`DEFAULT_DB_PATH`. Missing parent directories are created.
    :param options: keyword options of :class:`sessiondb.SessionDB` (``write_timeout``,
        ``hold_timeout``, ...), all optional. ``write_timeout`` defaults to 16 s here,
        about the longest the original's 15 attempts of up to 1 s (plus 20-150 ms
        pauses) waited before raising ``OperationalError``.
    :raises DatabaseOpenError: the path cannot be opened as a store, or is a hermes-agent
        file of another schema version (:class:`~sessiondb.errors.HermesSchemaError`).
    """

    MAX_TITLE_LENGTH = 100

    def __init__(self, db_path: Path | str | None = None, **options: Any) -> None:
        # The argument itself (a str becomes a Path, as code using db_path.parent needs).
        self.db_path = DEFAULT_DB_PATH if db_path is None else (
            db_path if isinstance(db_path, Path) else Path(db_path))
        options.setdefault("write_timeout", WRITE_TIMEOUT)
        self._engine = Engine(self.db_path, **options)

    @property
    def path(self) -> Path:
        """The store's absolute path."""
        return self._engine.path

    def close(self) -> None:
        """Run a last PASSIVE checkpoint and close the connection. Idempotent."""
        self._engine.close()

    def __enter__(self) -> "SessionDB":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._engine)

    # sessiondb's extras (see sessiondb.SessionDB for each)
    @contextmanager
    def transaction(self) -> Iterator["SessionDB"]:
        """One atomic write transaction for several calls (as :meth:`sessiondb.SessionDB.transaction`)."""
        with _compatible_errors(), self._engine.transaction():
            yield self

    def checkpoint(self, reset: bool = False) -> dict[str, int]:
        """As :meth:`sessiondb.SessionDB.checkpoint`."""
        with _compatible_errors():
            return self._engine.checkpoint(reset)

    def stats(self) -> dict[str, Any]:
        """The write path's and checkpoints' figures (as :meth:`sessiondb.SessionDB.stats`)."""
        with _compatible_errors():
            return self._engine.stats()

    # -- the engine's doors, with hermes-compatible errors ------------------------------
    def _execute_write(self, fn: Callable[[apsw.Connection], T], *,
                       bounded: bool = True) -> T:
        with _compatible_errors():
            return self._engine.execute_write(fn, bounded=bounded)

    def _read(self, fn: Callable[[apsw.Connection], T], snapshot: bool = False) -> T:
        with _compatible_errors():
            return self._engine.read(fn, snapshot)

    def _run(self, sql: str, args: tuple | dict) -> None:
        _bindable(args)
        self._execute_write(lambda conn: conn.execute(sql, args))

    def _select(self, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
        _bindable(args)
        return self._read(lambda conn: _rows(conn, sql, args))

    def _value(self, sql: str, args: tuple | list = ()) -> Any:
        _bindable(args)
        return self._read(lambda conn: _first(conn, sql, args))

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
        self._run(
            "INSERT OR IGNORE INTO sessions (id, source, user_id, model, model_config, "
            "system_prompt, parent_session_id, started_at, message_count, tool_call_count) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0)",
            (session_id, source, user_id, model, config, system_prompt, parent_session_id,
             time.time()))
        return session_id

    def ensure_session(self, session_id: str, source: str = "unknown",
                       model: str | None = None) -> None:
        """Insert a minimal session row unless the id exists (idempotent)."""
        self._run("INSERT OR IGNORE INTO sessions (id, source, model, started_at) "
                    "VALUES (?, ?, ?, ?)", (session_id, source, model, time.time()))

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
        _bindable((session_id,))
        return self._read(lambda conn: _session(conn, session_id))

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
        self._run(_ACCOUNT_SQL[mode], {k: args[k] for k in _ACCOUNT_ARGS})

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
        _bindable((session_id,))

        def write(conn: apsw.Connection) -> bool:
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
        rows = self._select(f"SELECT {_SESSION} FROM sessions WHERE title = ?", (title,))
        return rows[0] if rows else None

    def resolve_session_by_title(self, title: str) -> str | None:
        """The newest (by ``started_at``) of the numbered variants ``<title> #...``
        (ASCII case folded), else the exact title's session, else None."""
        _bindable((title,))

        def read(conn: apsw.Connection) -> str | None:
            newest = _first(conn, "SELECT id FROM sessions WHERE " + _ASCII_CI_PREFIX.format(
                "title") + " ORDER BY started_at DESC LIMIT 1", _prefix_args(f"{title} #"))
            if newest is not None:
                return newest
            return _first(conn, "SELECT id FROM sessions WHERE title = ?", (title,))

        return self._read(read, snapshot=True)

    def get_next_title_in_lineage(self, base_title: str) -> str:
        """The next title of a lineage: ``"X"`` -> ``"X #2"``, ``"X #2"`` -> ``"X #3"``;
        the base itself while no title of the lineage exists."""
        base = split_lineage(base_title)  # the same rule as sessiondb's
        rows = self._select("SELECT title FROM sessions WHERE title = ? OR "
                            + _ASCII_CI_PREFIX.format("title"),
                            (base, *_prefix_args(f"{base} #")))
        if not rows:
            return base
        highest = max([1] + [lineage_number(r["title"]) or 1 for r in rows])
        return f"{base} #{highest + 1}"

    # -- lookup, listing, counts ------------------------------------------------------
    def resolve_session_id(self, session_id_or_prefix: str) -> str | None:
        """The exact id, else the only id starting with the text (ASCII case folded,
        ``%``/``_`` literal); None for no match or several."""
        key = session_id_or_prefix
        _bindable((key,))

        def read(conn: apsw.Connection) -> str | None:
            if _first(conn, "SELECT id FROM sessions WHERE id = ?", (key,)) is not None:
                return key
            rows = _fetch(conn, "SELECT id FROM sessions WHERE " + _ASCII_CI_PREFIX.format(
                "id") + " LIMIT 2", _prefix_args(key))
            return rows[0][0] if len(rows) == 1 else None

        return self._read(read, snapshot=True)

    def list_sessions_rich(self, source: str | None = None,
                           exclude_sources: list[str] | None = None, limit: int = 20,
                           offset: int = 0) -> list[dict[str, Any]]:
        """Sessions, newest first, each row followed by ``last_active`` (latest message
        time, else ``started_at``) and ``preview`` (first user message, 60 characters).

        The page is picked first and only its rows are described (see
        :mod:`sessiondb.listing`), by the original's ``ORDER BY started_at DESC LIMIT
        OFFSET``, without its subqueries for every session of the filter. (Sessions that
        started at the same instant come in the order of the index SQLite picks, as
        they did in the original.)"""
        where, args = _source_filters(source, exclude_sources)
        _bindable((*args, limit, offset))
        window = 4 * rules.PREVIEW_WINDOW  # the bytes of head_sql()

        def read(conn: apsw.Connection) -> list[dict[str, Any]]:
            rowids = listing.page_rowids(conn, where, args, "s.started_at DESC", limit,
                                         offset)
            rows = listing.describe(conn, _rows, rowids, columns=_S_SESSION,
                                    preview_order="m.timestamp, m.id")
            for row in rows:
                row["preview"] = rules.preview(row["preview"].read(window)[0])
            return rows

        return self._read(read, snapshot=True)

    def search_sessions(self, source: str | None = None, limit: int = 20,
                        offset: int = 0) -> list[dict[str, Any]]:
        """Session rows, newest first, of one source if given."""
        return self._select(*_search_sessions_sql(source, limit, offset))

    def session_count(self, source: str | None = None) -> int:
        """The number of sessions, of one source if given."""
        where, args = _source_filters(source)
        return self._value(f"SELECT COUNT(*) FROM sessions s{_where(where)}", args)

    def message_count(self, session_id: str | None = None) -> int:
        """The number of messages, of one session if given."""
        if session_id:
            return self._value("SELECT COUNT(*) FROM messages WHERE session_id = ?",
                               (session_id,))
        return self._value(MESSAGE_TOTAL_SQL)  # kept by triggers: one row read

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
        args = _bindable((
            session_id, role, content, tool_call_id, rules.encode_if_truthy(tool_calls),
            tool_name, time.time(), token_count, finish_reason, reasoning,
            rules.encode_if_truthy(reasoning_details),
            rules.encode_if_truthy(codex_reasoning_items)))
        calls = records.count_tool_calls(tool_calls)  # the same rule as sessiondb's
        columns = ", ".join(HERMES_MESSAGE_COLUMNS[1:])

        def write(conn: apsw.Connection) -> int:
            conn.execute(f"INSERT INTO messages ({columns}) VALUES "
                         f"({', '.join('?' * len(args))})", args)
            message_id = conn.last_insert_rowid()
            conn.execute("UPDATE sessions SET message_count = message_count + 1, "
                         "tool_call_count = tool_call_count + ? WHERE id = ?",
                         (calls, session_id))
            return message_id

        return self._execute_write(write)

    def get_messages(self, session_id: str) -> list[dict[str, Any]]:
        """The session's messages, oldest first; ``tool_calls`` decoded (text that is
        not JSON kept as it is), the reasoning fields as JSON text."""
        _bindable((session_id,))
        return self._read(lambda conn: _messages(conn, session_id))

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
        recent matches, best match (bm25) first within each, ties newest first; a query
        with at most 1,000 matches is ordered best match first, as hermes-agent's was.
        A query that is still not valid FTS5 after sanitizing finds nothing (``[]``).
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
        _bindable((terms, search.SNIPPET_BUDGET, match, *(sources or ()), *excluded,
                   *roles, limit, offset))
        # Bound one by one, as the original did (its types, its variable limit).
        filters = search.Filters(sources=sources, exclude_sources=excluded, roles=roles,
                                 bind_each=True)
        page = (limit, offset)

        def read(conn: apsw.Connection) -> list[dict[str, Any]]:
            search_index.raise_if_damaged(conn, self.path)
            # LIMIT and OFFSET as SQLite reads them: None is a datatype mismatch (an
            # IntegrityError, as in the original), a negative limit means all.
            conn.execute("SELECT 1 LIMIT ? OFFSET ?", page).fetchall()
            first, skip = conn.execute("SELECT CAST(? AS INTEGER), CAST(? AS INTEGER)",
                                       page).fetchone()
            try:
                ranked = search.ranked_ids(conn, match, filters,
                                           first if first >= 0 else -1, max(skip, 0),
                                           _hermes_phrases(match))
                rows = search.fetch_hits(conn, match, ranked, terms)
            except apsw.SQLError as exc:
                if "malformed" in str(exc) or "corrupt" in str(exc):
                    raise  # damage, not syntax: SearchIndexError below
                return []  # not valid FTS5 after sanitizing: the original's []
            hits = [dict(zip(_HIT_KEYS, row)) for row in rows]
            for hit in hits:
                if hit["snippet"] is None:  # too long for FTS5's snippet()
                    hit["snippet"] = search.long_message_snippet(
                        conn, hit["id"], sanitize_fts_query(query[:MAX_QUERY_LENGTH]))
                try:
                    hit["context"] = [
                        {"role": role, "content": rules.head_text(search.message_head(
                            conn, rowid, size, inline, 4 * 200), 200)}
                        for role, rowid, size, inline in _fetch(conn, _CONTEXT_SQL, (
                            hit["session_id"], hit["id"] - 1, hit["id"] + 1))]
                except apsw.Error:
                    hit["context"] = []
            return hits

        try:
            return self._read(read, snapshot=True)
        except StorageError as exc:
            if search_index.is_search_damage(exc):
                raise search_index.search_damage_error(exc, self.path) from exc
            raise

    # -- export and cleanup -----------------------------------------------------------
    def export_session(self, session_id: str) -> dict[str, Any] | None:
        """The session row plus ``messages`` (as :meth:`get_messages`), or None."""
        _bindable((session_id,))

        def read(conn: apsw.Connection) -> dict[str, Any] | None:
            session = _session(conn, session_id)
            if session is not None:
                session["messages"] = _messages(conn, session_id)
            return session

        return self._read(read, snapshot=True)

    def export_all(self, source: str | None = None) -> list[dict[str, Any]]:
        """:meth:`export_session` of each of :meth:`search_sessions` (up to 100,000)."""
        sql, args = _search_sessions_sql(source, 100000, 0)

        def read(conn: apsw.Connection) -> list[dict[str, Any]]:
            sessions = _rows(conn, sql, args)
            for session in sessions:
                session["messages"] = _messages(conn, session["id"])
            return sessions

        return self._read(read, snapshot=True)

    def clear_messages(self, session_id: str) -> None:
        """Delete the session's messages and zero its message and tool-call counts; the
        session row keeps everything else. A missing session is a no-op."""
        _bindable((session_id,))

        def write(conn: apsw.Connection) -> None:
            conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            conn.execute("UPDATE sessions SET message_count = 0, tool_call_count = 0 "
                         "WHERE id = ?", (session_id,))

        self._execute_write(write)

    def delete_session(self, session_id: str) -> bool:
        """Delete the session and its messages; False if it does not exist.

        :raises IntegrityError: another session names it as parent (nothing deleted).
        """
        _bindable((session_id,))

        def write(conn: apsw.Connection) -> bool:
            if _first(conn, "SELECT COUNT(*) FROM sessions WHERE id = ?", (session_id,)) == 0:
                return False
            _delete(conn, session_id)
            return True

        return self._execute_write(write)

    def prune_sessions(self, older_than_days: float = 90, source: str | None = None) -> int:
        """Delete the ended sessions started more than ``older_than_days`` ago (of one
        source if given), newest first, with their messages; returns how many.

        :raises IntegrityError: a session to delete is the parent of one that stays (or
            of one deleted after it); nothing is deleted.
        """
        cutoff = time.time() - older_than_days * 86400
        where, args = _source_filters(source)
        where += ["s.started_at < ?", "s.ended_at IS NOT NULL"]
        sql = f"SELECT s.id FROM sessions s{_where(where)} ORDER BY s.started_at DESC"
        params = _bindable((*args, cutoff))

        def write(conn: apsw.Connection) -> int:
            ids = [r[0] for r in _fetch(conn, sql, params)]
            for sid in ids:
                _delete(conn, sid)
            return len(ids)

        return self._execute_write(write)


# -- helpers (pure functions of a connection) -----------------------------------------

def _account_sql(mode: str) -> str:
    """The UPDATE of :meth:`SessionDB._account`: ``add`` (update_token_counts),
    ``absolute`` (its ``absolute=True``) or ``set`` (set_token_counts). NULL arithmetic
    is the original's: a None counter added makes the counter NULL."""
    add = mode == "add"
    sets = [f"{f} = {f} + :{f}" if add else f"{f} = :{f}" for f in _TOKENS]
    sets.append("estimated_cost_usd = " + {
        "add": "COALESCE(estimated_cost_usd, 0) + COALESCE(:estimated_cost_usd, 0)",
        "absolute": "COALESCE(:estimated_cost_usd, 0)",
        "set": ":estimated_cost_usd"}[mode])
    sets.append("actual_cost_usd = CASE WHEN :actual_cost_usd IS NULL THEN actual_cost_usd "
                + ("ELSE COALESCE(actual_cost_usd, 0) + :actual_cost_usd END" if add
                   else "ELSE :actual_cost_usd END"))
    sets += [f"{f} = COALESCE(:{f}, {f})" for f in _LATEST_WINS]
    sets += [f"{f} = COALESCE({f}, :{f})" for f in _FIRST_WINS]
    return f"UPDATE sessions SET {', '.join(sets)} WHERE id = :session_id"


_ACCOUNT_SQL = {mode: _account_sql(mode) for mode in ("add", "absolute", "set")}
_ACCOUNT_ARGS = ("session_id", *_TOKENS, "estimated_cost_usd", "actual_cost_usd",
                 *_LATEST_WINS, *_FIRST_WINS)

# ASCII-case-insensitive prefix, every other character literal: byte prefixes of
# lower() (which folds only ASCII), where the original used LIKE with escapes.
_ASCII_CI_PREFIX = "substr(CAST(lower({0}) AS BLOB), 1, ?) = CAST(lower(?) AS BLOB)"
# The neighbours of a hit: the bytes of a short one with its row, a long one's first 800
# read by search.message_head (SQLite would read the whole value for a substr() of it).
_CONTEXT_SQL = ("SELECT role, id, octet_length(content), CASE WHEN octet_length(content) "
                "<= 800 THEN CAST(content AS BLOB) END FROM messages "
                "WHERE session_id = ? AND id BETWEEN ? AND ? ORDER BY id")
_HIT_KEYS = ("id", "session_id", "role", "snippet", "timestamp", "tool_name", "source",
             "model", "session_started")
# A phrase of a hermes-agent query: a quoted string (maybe a prefix), or a bare word
# (maybe with a column filter and a star); the operators are not phrases.
_HERMES_PHRASE = re.compile(r'"[^"]*"\*?|[^\s"]+')
_COLUMN_FILTER = re.compile(r"^[^\s:\"]+:")


def _hermes_phrases(match: str) -> list[str]:
    """The phrases of a sanitized hermes-agent query, each as an FTS5 query, for bm25's
    document frequencies (:func:`sessiondb.search.ranked_ids` checks that they fit the
    query, and weighs the phrases alike when not)."""
    return [_COLUMN_FILTER.sub("", word) for word in _HERMES_PHRASE.findall(match)
            if word not in ("AND", "OR", "NOT")]


def _prefix_args(prefix: str) -> tuple[int, str]:
    return len(prefix.encode()), prefix


def _source_filters(source: Any, exclude_sources: Any = None) -> tuple[list[str], list]:
    """Conditions on sessions ``s`` and their arguments: ``source`` if truthy,
    ``exclude_sources`` if truthy (both may apply)."""
    where, args = [], []
    if source:
        where.append("s.source = ?")
        args.append(source)
    if exclude_sources:
        marks, items = _placeholders(exclude_sources)
        where.append(f"s.source NOT IN {marks}")
        args += items
    return where, args


def _rows(conn: apsw.Connection, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
    """Rows as dicts whose session or message columns come in the file's table order, as
    the original's ``SELECT *`` gave them: on a file hermes-agent itself migrated from an
    older schema, its added columns stand at the end (spec: "key order differs on
    migrated databases"). Other keys (``last_active``, ``preview``) follow."""
    rows = _engine_rows(conn, sql, args)
    if rows:
        keys = list(rows[0])
        for table, wanted in (("sessions", HERMES_SESSION_COLUMNS),
                              ("messages", HERMES_MESSAGE_COLUMNS)):
            if keys[:len(wanted)] == list(wanted):
                order = [name for (name,) in conn.execute(
                    "SELECT name FROM pragma_table_info(?)", (table,)) if name in wanted]
                if order != list(wanted):
                    rows = [{**{k: row[k] for k in order}, **row} for row in rows]
                break
    return rows


def _where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def _search_sessions_sql(source: Any, limit: Any, offset: Any) -> tuple[str, tuple]:
    where, args = _source_filters(source)
    return (f"SELECT {_S_SESSION} FROM sessions s{_where(where)} ORDER BY s.started_at DESC "
            "LIMIT ? OFFSET ?", (*args, limit, offset))


def _session(conn: apsw.Connection, session_id: str) -> dict[str, Any] | None:
    rows = _rows(conn, f"SELECT {_SESSION} FROM sessions WHERE id = ?", (session_id,))
    return rows[0] if rows else None


def _messages(conn: apsw.Connection, session_id: str) -> list[dict[str, Any]]:
    rows = _rows(conn, f"SELECT {_MESSAGE} FROM messages WHERE session_id = ? "
                       "ORDER BY timestamp, id", (session_id,))
    for row in rows:
        if row["tool_calls"]:
            row["tool_calls"] = from_json(row["tool_calls"])
    return rows


def _delete(conn: apsw.Connection, session_id: str) -> None:
    """Delete a session and its messages; a session still named as parent by another
    makes SQLite's foreign-key check fail the statement (the original's behaviour)."""
    conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

