"""Shapes of what the API returns, and the import format (the inverse of export).

Rows arrive as dicts in column order; these functions turn them into the documented
records. JSON columns (``model_config``, ``tool_calls``, ``reasoning_details``,
``codex_reasoning_items``, ``metadata``) are decoded on the way out; text that does not
decode is returned as it is.
"""

from __future__ import annotations

from typing import Any

import apsw

from .errors import InvalidArgument, InvalidArgumentType
from .text import (
    check_cost, check_count, check_id, check_number, check_text, from_json, sanitize_title,
    to_json,
)

_SESSION_JSON = ("model_config",)
_MESSAGE_JSON = ("tool_calls", "reasoning_details", "codex_reasoning_items", "metadata")


def session(row: dict[str, Any]) -> dict[str, Any]:
    """A session record: every column of ``sessions``, ``model_config`` decoded."""
    out = dict(row)
    for key in _SESSION_JSON:
        out[key] = from_json(out.get(key))
    return out


def listed_session(row: dict[str, Any]) -> dict[str, Any]:
    """A session record plus ``last_active`` and ``preview`` (first user message, one
    line, at most 60 characters plus ``...``), as :mod:`sessiondb.listing` made them."""
    return session(row)


def message(row: dict[str, Any]) -> dict[str, Any]:
    """A message record: every column of ``messages``, JSON columns decoded."""
    out = dict(row)
    for key in _MESSAGE_JSON:
        out[key] = from_json(out.get(key))
    return out


def conversation_item(msg: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-style chat message: role and content, tool fields when set, and the
    reasoning fields on assistant messages."""
    item: dict[str, Any] = {"role": msg["role"], "content": msg["content"]}
    for key in ("tool_call_id", "tool_name", "tool_calls"):
        if msg.get(key):
            item[key] = msg[key]
    if msg["role"] == "assistant":
        for key in ("reasoning", "reasoning_details", "codex_reasoning_items"):
            if msg.get(key):
                item[key] = msg[key]
    return item


def count_tool_calls(tool_calls: Any) -> int:
    """Calls in an assistant message's ``tool_calls``: a list counts its items, any other
    value one call, None none."""
    if tool_calls is None:
        return 0
    return len(tool_calls) if isinstance(tool_calls, list) else 1


def search_hit(row: tuple) -> dict[str, Any]:
    keys = ("id", "session_id", "role", "snippet", "timestamp", "tool_name", "source",
            "model", "session_started")
    return dict(zip(keys, row))


def context_item(row: tuple) -> dict[str, Any]:
    role, content = row
    return {"role": role, "content": (content or "")[:200]}


# -- import -------------------------------------------------------------------------

_SESSION_TEXT = ("user_id", "model", "system_prompt", "parent_session_id", "end_reason",
                 "billing_provider", "billing_base_url", "billing_mode", "cost_status",
                 "cost_source", "pricing_version")
_SESSION_COUNTERS = ("input_tokens", "output_tokens", "cache_read_tokens",
                     "cache_write_tokens", "reasoning_tokens")
_MESSAGE_TEXT = ("content", "tool_call_id", "tool_name", "finish_reason", "reasoning")


def check_import(data: Any) -> list[dict[str, Any]]:
    """Validate an export (one session dict or a list of them) before any write.

    Every column is checked as the API checks it (text, counters, costs, times, JSON,
    the title sanitized), so that nothing an export cannot hold reaches the store.

    :returns: the sessions as rows ready for :func:`insert_session`, each with its
        ``messages`` as rows.
    :raises InvalidArgument: a value the store will not accept.
    :raises InvalidArgumentType: a value of the wrong type.
    """
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InvalidArgumentType("import data must be a session dict or a list of them")
    seen: set[str] = set()
    rows = []
    for item in items:
        if not isinstance(item, dict):
            raise InvalidArgumentType("each imported session must be a dict")
        sid = check_id("session id", item.get("id"))
        if sid in seen:
            raise InvalidArgument(f"session {sid!r} appears twice in the import")
        seen.add(sid)
        rows.append(_session_row(sid, item))
    return rows


def _session_row(sid: str, item: dict[str, Any]) -> dict[str, Any]:
    of = f" of imported session {sid!r}"
    row: dict[str, Any] = {"id": sid, "source": check_id("source" + of, item.get("source"))}
    for c in _SESSION_TEXT:
        row[c] = check_text(c + of, item.get(c))
    row["title"] = sanitize_title(item.get("title"))
    row["model_config"] = to_json("model_config" + of, item.get("model_config"))
    row["started_at"] = check_number("started_at" + of, item.get("started_at"))
    row["ended_at"] = check_number("ended_at" + of, item.get("ended_at"), optional=True)
    for c in _SESSION_COUNTERS + ("revision",):
        row[c] = check_count(c + of, item.get(c), optional=True)
    for c in ("estimated_cost_usd", "actual_cost_usd"):
        row[c] = check_cost(c + of, item.get(c))
    messages = item.get("messages", [])
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise InvalidArgumentType(f"messages of session {sid!r} must be a list of dicts")
    # Counters are derived from the messages imported, never trusted from the input.
    row["message_count"] = len(messages)
    row["tool_call_count"] = sum(count_tool_calls(m.get("tool_calls")) for m in messages)
    # Absent fields take the column default: an explicit NULL counter would stay NULL
    # forever (NULL + 1 is NULL), so later appends would never be counted.
    row = {c: v for c, v in row.items() if v is not None}
    row["messages"] = [_message_row(sid, m) for m in messages]
    return row


def _message_row(sid: str, m: dict[str, Any]) -> dict[str, Any]:
    of = f" of a message of imported session {sid!r}"
    row: dict[str, Any] = {
        "id": check_count("id" + of, m.get("id"), optional=True),
        "session_id": sid,
        "role": check_id("role" + of, m.get("role")),
        "timestamp": check_number("timestamp" + of, m.get("timestamp")),
        "token_count": check_count("token_count" + of, m.get("token_count"), optional=True),
    }
    for c in _MESSAGE_TEXT:
        row[c] = check_text(c + of, m.get(c))
    for c in _MESSAGE_JSON:
        row[c] = to_json(c + of, m.get(c))
    return row


def parents_first(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order sessions so that every imported parent precedes its children."""
    by_id = {item["id"]: item for item in items}
    ordered: list[dict[str, Any]] = []
    placed: set[str] = set()

    def place(item: dict[str, Any], trail: frozenset[str]) -> None:
        if item["id"] in placed:
            return
        parent = item.get("parent_session_id")
        if parent in by_id and parent != item["id"] and parent not in trail:
            place(by_id[parent], trail | {item["id"]})
        placed.add(item["id"])
        ordered.append(item)

    for item in items:
        place(item, frozenset())
    return ordered


def insert_session(conn: apsw.Connection, item: dict[str, Any]) -> None:
    """Insert one session as :func:`check_import` returned it, and its messages
    (message ids kept where free)."""
    row = {c: v for c, v in item.items() if c != "messages"}
    conn.execute(f"INSERT INTO sessions ({', '.join(row)}) VALUES "
                 f"({', '.join('?' * len(row))})", list(row.values()))
    for m in item["messages"]:
        row = dict(m)
        if row["id"] is not None and conn.execute(
                "SELECT 1 FROM messages WHERE id = ?", (row["id"],)).fetchone():
            row["id"] = None  # taken: let SQLite assign a new one, order is kept
        conn.execute(f"INSERT INTO messages ({', '.join(row)}) VALUES "
                     f"({', '.join('?' * len(row))})", list(row.values()))
