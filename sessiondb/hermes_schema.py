"""A hermes-agent ``state.db`` as sessiondb finds it: its schema's columns and version,
and hermes-agent's own migration steps, which bring an older file to the version the
conversion (:mod:`sessiondb.conversion`) and the facade (:mod:`sessiondb.compat.hermes`)
speak.
"""

from __future__ import annotations

from pathlib import Path

import apsw

from .errors import HermesSchemaError

#: The columns of hermes-agent's ``sessions`` and ``messages`` tables (its schema 6), in
#: its order; sessiondb's tables have them in this order, plus columns of its own.
HERMES_SESSION_COLUMNS = (
    "id", "source", "user_id", "model", "model_config", "system_prompt",
    "parent_session_id", "started_at", "ended_at", "end_reason", "message_count",
    "tool_call_count", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "billing_provider", "billing_base_url",
    "billing_mode", "estimated_cost_usd", "actual_cost_usd", "cost_status", "cost_source",
    "pricing_version", "title")
HERMES_MESSAGE_COLUMNS = (
    "id", "session_id", "role", "content", "tool_call_id", "tool_calls", "tool_name",
    "timestamp", "token_count", "finish_reason", "reasoning", "reasoning_details",
    "codex_reasoning_items")
#: The hermes-agent schema the facade speaks. Older files are first brought to it by
#: hermes-agent's own migration steps (below); newer ones are left at their version,
#: and converted if they have every column of 6.
HERMES_SCHEMA_VERSION = 6
#: hermes-agent's migration ladder: (version, table, column added). Its v4 step is the
#: unique title index, which the conversion creates anyway.
HERMES_LADDER = (
    (2, "messages", "finish_reason TEXT"),
    (3, "sessions", "title TEXT"),
    *((5, "sessions", column) for column in (
        "cache_read_tokens INTEGER DEFAULT 0", "cache_write_tokens INTEGER DEFAULT 0",
        "reasoning_tokens INTEGER DEFAULT 0", "billing_provider TEXT",
        "billing_base_url TEXT", "billing_mode TEXT", "estimated_cost_usd REAL",
        "actual_cost_usd REAL", "cost_status TEXT", "cost_source TEXT",
        "pricing_version TEXT")),
    *((6, "messages", column) for column in (
        "reasoning TEXT", "reasoning_details TEXT", "codex_reasoning_items TEXT")),
)


def hermes_version(conn: apsw.Connection, path: Path,
                   names: list[str] | None = None) -> int | None:
    """The hermes-agent schema version of a database without a sessiondb schema, if it is
    a hermes-agent ``state.db`` that :mod:`sessiondb.conversion` can convert (an empty
    ``schema_version`` counts as 6, as hermes-agent itself takes it); None if it is not
    one at all (no ``schema_version``, ``sessions`` and ``messages`` tables).

    :raises HermesSchemaError: it lacks columns that its version (or version 1, for the
        columns hermes-agent's steps add) must have; nothing is changed.
    """
    if names is None:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table'")]
    if not {"schema_version", "sessions", "messages"} <= set(names):
        return None
    try:
        version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
    except apsw.SQLError:  # a schema_version table without a version column
        return None
    version = HERMES_SCHEMA_VERSION if version is None else version
    if not isinstance(version, int) or version < 1:
        raise HermesSchemaError(str(path), version, "not a version hermes-agent wrote")
    for table, wanted in (("sessions", HERMES_SESSION_COLUMNS),
                          ("messages", HERMES_MESSAGE_COLUMNS)):
        added = {c.split()[0] for step, t, c in HERMES_LADDER
                 if t == table and step > version}
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        missing = [c for c in wanted if c not in have and c not in added]
        if missing:
            raise HermesSchemaError(str(path), version,
                                    f"its {table} table lacks {', '.join(missing)}")
    return version


def hermes_ladder(conn: apsw.Connection) -> None:
    """hermes-agent's own migration steps on a file older than its schema 6, as
    hermes-agent would take them: each added column goes at the end, whatever the file's
    version claims; ``schema_version`` becomes 6 (a newer one is left alone)."""
    for _, table, column in HERMES_LADDER:
        if column.split()[0] not in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
    if conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 0:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (HERMES_SCHEMA_VERSION,))
    conn.execute("UPDATE schema_version SET version = ? WHERE version < ?",
                 (HERMES_SCHEMA_VERSION, HERMES_SCHEMA_VERSION))
