"""The SQL of :mod:`sessiondb.compat.hermes`, as pure functions of a connection, written
once for SQLite and PostgreSQL; and two rules of hermes-agent's SQLite that the facade
asks of SQLite itself, whatever the store's backend (:func:`sqlite_page`,
:func:`fts5_syntax_ok`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import apsw

from ..backend import Conn, first as _first, rows as _engine_rows
from ..hermes_schema import HERMES_MESSAGE_COLUMNS, HERMES_SESSION_COLUMNS
from ..text import NO_LIMIT, from_json

SESSION = ", ".join(HERMES_SESSION_COLUMNS)
S_SESSION = ", ".join("s." + c for c in HERMES_SESSION_COLUMNS)
MESSAGE = ", ".join(HERMES_MESSAGE_COLUMNS)
TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
          "reasoning_tokens")
LATEST_WINS = ("cost_status", "cost_source", "pricing_version")
FIRST_WINS = ("billing_provider", "billing_base_url", "billing_mode", "model")


# -- token and cost accounting -----------------------------------------------------------

def _account_sql(mode: str) -> str:
    """The UPDATE of the facade's accounting: ``add`` (update_token_counts),
    ``absolute`` (its ``absolute=True``) or ``set`` (set_token_counts), with the
    parameters of :func:`account_args`. NULL arithmetic is the original's: a None
    counter added makes the counter NULL."""
    add = mode == "add"
    sets = [f"{f} = {f} + ?" if add else f"{f} = ?" for f in TOKENS]
    # The estimated cost's argument comes with its COALESCE done (account_args): a NULL
    # parameter in COALESCE(?, 0) would make PostgreSQL type it integer.
    sets.append("estimated_cost_usd = " + (
        "COALESCE(estimated_cost_usd, 0) + ?" if add else "?"))
    # "Is the actual cost None" is a parameter of its own: PostgreSQL cannot type a
    # NULL parameter in "? IS NULL".
    sets.append("actual_cost_usd = CASE WHEN ? THEN actual_cost_usd "
                + ("ELSE COALESCE(actual_cost_usd, 0) + ? END" if add else "ELSE ? END"))
    sets += [f"{f} = COALESCE(?, {f})" for f in LATEST_WINS]
    sets += [f"{f} = COALESCE({f}, ?)" for f in FIRST_WINS]
    return f"UPDATE sessions SET {', '.join(sets)} WHERE id = ?"


ACCOUNT_SQL = {mode: _account_sql(mode) for mode in ("add", "absolute", "set")}


def account_args(mode: str, args: dict[str, Any]) -> tuple:
    """The parameters of :data:`ACCOUNT_SQL` ``[mode]`` from the method's arguments."""
    estimated, actual = args["estimated_cost_usd"], args["actual_cost_usd"]
    if mode != "set" and estimated is None:
        estimated = 0  # (arg or 0): "add" adds nothing, "absolute" sets 0.0
    return (*(args[f] for f in TOKENS), estimated, actual is None, actual,
            *(args[f] for f in LATEST_WINS), *(args[f] for f in FIRST_WINS),
            args["session_id"])


# -- rows ---------------------------------------------------------------------------------

def rows(conn: Conn, sql: str, args: tuple | list = ()) -> list[dict[str, Any]]:
    """Rows as dicts whose session or message columns come in the table's order, as
    the original's ``SELECT *`` gave them: on a file hermes-agent itself migrated from an
    older schema, its added columns stand at the end (spec: "key order differs on
    migrated databases"). Other keys (``last_active``, ``preview``) follow. Only a
    SQLite file can be such a file: a PostgreSQL store's tables are sessiondb's own,
    in the documented order."""
    found = _engine_rows(conn, sql, args)
    return in_table_order(conn, found)


def in_table_order(conn: Conn, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``found`` (rows of session or message columns in the documented order) with
    those columns in the order of the file's table (see :func:`rows`)."""
    if not found or not isinstance(conn, apsw.Connection):
        return found
    keys = list(found[0])
    for table, wanted in (("sessions", HERMES_SESSION_COLUMNS),
                          ("messages", HERMES_MESSAGE_COLUMNS)):
        if keys[:len(wanted)] == list(wanted):
            order = [name for (name,) in conn.execute(
                "SELECT name FROM pragma_table_info(?)", (table,)) if name in wanted]
            if order != list(wanted):
                found = [{**{k: row[k] for k in order}, **row} for row in found]
            break
    return found


def source_filters(source: Any, exclude_sources: Any = None) -> tuple[list[str], list]:
    """Conditions on sessions ``s`` and their arguments: ``source`` if truthy,
    ``exclude_sources`` if truthy (both may apply). Each excluded source is its own
    parameter, as the original bound them (any bindable type)."""
    where: list[str] = []
    args: list[Any] = []
    if source:
        where.append("s.source = ?")
        args.append(source)
    if exclude_sources:
        items = list(exclude_sources)
        where.append(f"s.source NOT IN ({', '.join('?' * len(items))})")
        args += items
    return where, args


def where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""


def search_sessions_sql(source: Any, limit: int, offset: int) -> tuple[str, tuple]:
    """The sessions of ``search_sessions`` (a page as :func:`sqlite_page` gives it)."""
    conditions, args = source_filters(source)
    return (f"SELECT {S_SESSION} FROM sessions s{where(conditions)} "
            "ORDER BY s.started_at DESC LIMIT ? OFFSET ?", (*args, limit, offset))


def session(conn: Conn, session_id: str) -> dict[str, Any] | None:
    found = rows(conn, f"SELECT {SESSION} FROM sessions WHERE id = ?", (session_id,))
    return found[0] if found else None


def messages(conn: Conn, session_id: str) -> list[dict[str, Any]]:
    found = rows(conn, f"SELECT {MESSAGE} FROM messages WHERE session_id = ? "
                       "ORDER BY timestamp, id", (session_id,))
    for row in found:
        if row["tool_calls"]:
            row["tool_calls"] = from_json(row["tool_calls"])
    return found


def exists_locked(conn: Conn, session_id: str, for_update: str) -> bool:
    """Whether the session exists; with ``for_update`` (the dialect's), its row stays
    locked until the write ends, so an append to it waits and then finds it gone."""
    return _first(conn, f"SELECT 1 FROM sessions WHERE id = ?{for_update}",
                  (session_id,)) is not None


def delete(conn: Conn, session_id: str) -> None:
    """Delete a session and its messages; a session still named as parent by another
    makes the foreign-key check fail the statement (the original's behaviour)."""
    conn.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
    conn.execute("DELETE FROM sessions WHERE id = ?", (session_id,))


# -- hermes-agent's SQLite rules, asked of SQLite ------------------------------------------

_local = threading.local()


def _memory() -> apsw.Connection:
    """This thread's in-memory SQLite database holding an FTS5 table shaped as
    hermes-agent's ``messages_fts`` (a fork child opens its own)."""
    conn = getattr(_local, "conn", None)
    if conn is None or _local.pid != os.getpid():
        conn = apsw.Connection(":memory:")
        conn.execute("CREATE VIRTUAL TABLE messages_fts USING fts5(content)")
        _local.conn, _local.pid = conn, os.getpid()
    return conn


def sqlite_page(limit: Any, offset: Any) -> tuple[int, int]:
    """``limit`` and ``offset`` as hermes-agent's SQLite read them in ``LIMIT ? OFFSET
    ?``, by asking SQLite: an integer, or a value SQLite turns into one losslessly
    (``"5"``, ``5.0``); a negative limit means all, a negative offset 0. Rejected:
    re-implementing the rule in Python (which texts and floats pass is SQLite's
    affinity rule, easy to get almost right), and letting each backend read them
    (PostgreSQL reads ``LIMIT NULL`` as no limit and refuses a negative one).

    :returns: ``(limit, offset)``, the limit :data:`~sessiondb.text.NO_LIMIT` for all.
    :raises apsw.MismatchError: not such a value (None, ``"x"``, ``2.5``): the
        original's "datatype mismatch".
    """
    conn = _memory()
    conn.execute("SELECT 1 LIMIT ? OFFSET ?", (limit, offset)).fetchall()
    first, skip = conn.execute("SELECT CAST(? AS INTEGER), CAST(? AS INTEGER)",
                               (limit, offset)).fetchone()
    return (first if first >= 0 else NO_LIMIT), max(skip, 0)


def fts5_syntax_ok(match: str) -> bool:
    """Whether FTS5 accepts ``match`` as a query of hermes-agent's index (a table of one
    column, ``content``): the original answered a query it refused with ``[]``."""
    try:
        _memory().execute("SELECT 1 FROM messages_fts WHERE messages_fts MATCH ?",
                          (match,)).fetchall()
    except apsw.SQLError:
        return False
    return True
