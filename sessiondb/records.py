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
from .text import check_id, check_text, from_json, to_json

_SESSION_JSON = ("model_config",)
_MESSAGE_JSON = ("tool_calls", "reasoning_details", "codex_reasoning_items", "metadata")
PREVIEW_LENGTH = 60


def session(row: dict[str, Any]) -> dict[str, Any]:
    """A session record: every column of ``sessions``, ``model_config`` decoded."""
    out = dict(row)
    for key in _SESSION_JSON:
        out[key] = from_json(out.get(key))
    return out


def listed_session(row: dict[str, Any]) -> dict[str, Any]:
    """A session record plus ``last_active`` and ``preview`` (first user message, one
    line, at most 60 characters plus ``...``)."""
    out = session(row)
    text = (row.get("preview") or "").replace("\r", " ").replace("\n", " ").strip()
    out["preview"] = text[:PREVIEW_LENGTH] + ("..." if len(text) > PREVIEW_LENGTH else "")
    return out


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

_SESSION_COLUMNS = (
    "id", "source", "user_id", "model", "model_config", "system_prompt", "parent_session_id",
    "started_at", "ended_at", "end_reason", "message_count", "tool_call_count",
    "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
    "reasoning_tokens", "billing_provider", "billing_base_url", "billing_mode",
    "estimated_cost_usd", "actual_cost_usd", "cost_status", "cost_source", "pricing_version",
    "title",
)
_MESSAGE_COLUMNS = (
    "id", "session_id", "role", "content", "tool_call_id", "tool_calls", "tool_name",
    "timestamp", "token_count", "finish_reason", "reasoning", "reasoning_details",
    "codex_reasoning_items", "metadata",
)


def check_import(data: Any) -> list[dict[str, Any]]:
    """Validate an export (one session dict or a list of them) before any write."""
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InvalidArgumentType("import data must be a session dict or a list of them")
    seen: set[str] = set()
    for item in items:
        if not isinstance(item, dict):
            raise InvalidArgumentType("each imported session must be a dict")
        sid = check_id("session id", item.get("id"))
        check_id("source", item.get("source"))
        if sid in seen:
            raise InvalidArgument(f"session {sid!r} appears twice in the import")
        seen.add(sid)
        if not isinstance(item.get("started_at"), (int, float)):
            raise InvalidArgument(f"session {sid!r} has no numeric started_at")
        messages = item.get("messages", [])
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidArgumentType(f"messages of session {sid!r} must be a list of dicts")
        for m in messages:
            check_id("message role", m.get("role"))
            check_text("message content", m.get("content"))
            if not isinstance(m.get("timestamp"), (int, float)):
                raise InvalidArgument(f"a message of session {sid!r} has no numeric timestamp")
    return items


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
    """Insert one exported session and its messages (message ids kept where free)."""
    row = {c: item.get(c) for c in _SESSION_COLUMNS}
    row["model_config"] = to_json("model_config", item.get("model_config"))
    # Counters are derived from the messages imported, never trusted from the input.
    messages = item.get("messages", [])
    row["message_count"] = len(messages)
    row["tool_call_count"] = sum(count_tool_calls(m.get("tool_calls")) for m in messages)
    # Absent fields take the column default: an explicit NULL counter would stay NULL
    # forever (NULL + 1 is NULL), so later appends would never be counted.
    row = {c: v for c, v in row.items() if v is not None}
    conn.execute(f"INSERT INTO sessions ({', '.join(row)}) VALUES "
                 f"({', '.join('?' * len(row))})", list(row.values()))
    for m in messages:
        row = {c: m.get(c) for c in _MESSAGE_COLUMNS}
        row["session_id"] = item["id"]
        for key in _MESSAGE_JSON:
            row[key] = to_json(key, m.get(key))
        if row["id"] is not None and conn.execute(
                "SELECT 1 FROM messages WHERE id = ?", (row["id"],)).fetchone():
            row["id"] = None  # taken: let SQLite assign a new one, order is kept
        conn.execute(f"INSERT INTO messages ({', '.join(row)}) VALUES "
                     f"({', '.join('?' * len(row))})", list(row.values()))

