"""Shapes of what the API returns, and the import format (the inverse of export).

Rows arrive as dicts in column order; these functions turn them into the documented
records. JSON columns (``model_config``, ``tool_calls``, ``reasoning_details``,
``codex_reasoning_items``, ``metadata``) are decoded on the way out; text that does not
decode is returned as it is.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidArgument, InvalidArgumentType
from .text import (
    MAX_ID_LENGTH, check_cost, check_count, check_id, check_number, check_text, from_json,
    sanitize_title, to_json,
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


#: The columns of an imported message row, in the order of the tuples that
#: :func:`import_session` returns (the order of the ``messages`` table).
MESSAGE_COLUMNS = ("id", "session_id", "role", "content", "tool_call_id", "tool_calls",
                   "tool_name", "timestamp", "token_count", "finish_reason", "reasoning",
                   "reasoning_details", "codex_reasoning_items", "metadata")
#: The message columns, for SELECTs (the PostgreSQL table has a search column besides).
MESSAGE_SELECT = ", ".join(MESSAGE_COLUMNS)
#: The session columns an imported session may set: every key of the dict that
#: :func:`import_session` returns but ``messages``.
IMPORT_SESSION_COLUMNS = (("id", "source") + _SESSION_TEXT
                          + ("title", "model_config", "started_at", "ended_at")
                          + _SESSION_COUNTERS + ("revision", "estimated_cost_usd",
                                                 "actual_cost_usd", "message_count",
                                                 "tool_call_count"))
_INT64_MAX = 2**63 - 1
#: The highest message id an import keeps (a higher one is given a new id, as a taken
#: one is: :mod:`sessiondb.bulk`). Once a message had the largest id SQLite allows
#: (2**63 - 1), AUTOINCREMENT refuses every later insert (SQLITE_FULL, as if the disk
#: were full), so an import leaves room above the ids it keeps: 2**62 of them.
MAX_MESSAGE_ID = 2**62 - 1


def check_import(data: Any) -> list[dict[str, Any]]:
    """Validate an export (one session dict or a list of them) before any write.

    Every column is checked as the API checks it (text, counters, costs, times, JSON,
    the title sanitized), so that nothing an export cannot hold reaches the store.

    :returns: the sessions as rows (see :func:`import_session`).
    :raises InvalidArgument: a value the store will not accept, or a session id that
        appears twice.
    :raises InvalidArgumentType: a value of the wrong type.
    """
    items = [data] if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise InvalidArgumentType("import data must be a session dict or a list of them")
    seen: set[str] = set()
    rows = []
    for item in items:
        row = import_session(item)
        if row["id"] in seen:
            raise InvalidArgument(f"session {row['id']!r} appears twice in the import")
        seen.add(row["id"])
        rows.append(row)
    return rows


def import_session(item: Any) -> dict[str, Any]:
    """Validate one exported session (see :func:`check_import`).

    :returns: the session's columns (absent ones left out, so that they take the column
        default), with ``message_count`` and ``tool_call_count`` derived from its
        messages, and ``messages``: a list of tuples in :data:`MESSAGE_COLUMNS` order.
    :raises InvalidArgument: a value the store will not accept.
    :raises InvalidArgumentType: a value of the wrong type.
    """
    if not isinstance(item, dict):
        raise InvalidArgumentType("each imported session must be a dict")
    sid = check_id("session id", item.get("id"))
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


def text_size(messages: list[tuple]) -> int:
    """Characters of text imported messages carry (content, reasoning, the JSON
    columns): what makes a message expensive to write besides its count."""
    return sum(len(m[3] or "") + len(m[5] or "") + len(m[10] or "") + len(m[11] or "")
               + len(m[12] or "") + len(m[13] or "") for m in messages)


def _message_row(sid: str, m: dict[str, Any]) -> tuple:
    """One message as a tuple in :data:`MESSAGE_COLUMNS` order.

    The common case (plain str, int and float values, as JSON decodes them; ASCII text;
    no JSON columns) is checked inline, in one expression: a bulk import validates a
    million of these, and the check functions' calls and error texts cost more than the
    checks. Anything else goes through :func:`_checked_row`, which raises the documented
    errors (or accepts, e.g., a str subclass or non-ASCII text).
    """
    get = m.get
    mid, role, stamp, tokens = get("id"), get("role"), get("timestamp"), get("token_count")
    content, call_id, tool_name = get("content"), get("tool_call_id"), get("tool_name")
    finish, reasoning, calls = get("finish_reason"), get("reasoning"), get("tool_calls")
    details, items, metadata = (get("reasoning_details"), get("codex_reasoning_items"),
                                get("metadata"))
    if ((mid is None or (type(mid) is int and 0 <= mid <= _INT64_MAX))
            and type(role) is str and 0 < len(role) <= MAX_ID_LENGTH and role.isascii()
            and type(stamp) is float and -math.inf < stamp < math.inf
            and (tokens is None or (type(tokens) is int and 0 <= tokens <= _INT64_MAX))
            and (content is None or (type(content) is str and content.isascii()))
            and call_id is None and tool_name is None and finish is None
            and reasoning is None and calls is None and details is None and items is None
            and metadata is None):
        return (mid, sid, role, content, None, None, None, stamp, tokens, None, None,
                None, None, None)
    return _checked_row(sid, m)


def _checked_row(sid: str, m: dict[str, Any]) -> tuple:
    """:func:`_message_row` for any message: each value checked on its own."""
    get = m.get
    mid, role, stamp, tokens = get("id"), get("role"), get("timestamp"), get("token_count")
    if mid is not None and not (type(mid) is int and 0 <= mid <= _INT64_MAX):
        mid = check_count(_of("id", sid), mid, optional=True)
    if not (type(role) is str and role and len(role) <= MAX_ID_LENGTH and _storable(role)):
        role = check_id(_of("role", sid), role)
    if type(stamp) is float and math.isfinite(stamp):
        pass
    else:
        stamp = check_number(_of("timestamp", sid), stamp)
    if tokens is not None and not (type(tokens) is int and 0 <= tokens <= _INT64_MAX):
        tokens = check_count(_of("token_count", sid), tokens, optional=True)
    text = []
    for c in _MESSAGE_TEXT:
        value = get(c)
        if value is not None and not (type(value) is str and _storable(value)):
            value = check_text(_of(c, sid), value)
        text.append(value)
    content, call_id, tool_name, finish, reasoning = text
    calls, details, items, metadata = (
        None if get(c) is None else to_json(_of(c, sid), get(c)) for c in _MESSAGE_JSON)
    return (mid, sid, role, content, call_id, calls, tool_name, stamp, tokens, finish,
            reasoning, details, items, metadata)


def _of(column: str, sid: str) -> str:
    return f"{column} of a message of imported session {sid!r}"


def _storable(text: str) -> bool:
    """True if SQLite can store ``text`` as UTF-8 (no lone surrogates); ASCII first,
    since that check is a fast scan and most text is ASCII."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parent_cycle(items: list[dict[str, Any]]) -> list[str] | None:
    """The ids of a cycle of parents among ``items`` (each session's parent the next
    one's id, the last one's the first's), or None. A session that is its own parent is
    no cycle here (its row refers to itself, which the database accepts)."""
    by_id = {item["id"]: item for item in items}
    done: set[str] = set()
    for item in items:
        path: list[str] = []
        at: dict[str, int] = {}
        current = item["id"]
        while current in by_id and current not in done:
            if current in at:
                return path[at[current]:]
            at[current] = len(path)
            path.append(current)
            parent = by_id[current].get("parent_session_id")
            if parent == current:
                break
            current = parent
        done.update(path)
    return None


def parents_first(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Order sessions so that every imported parent precedes its children (a cycle is
    left in the order met; SQLite then refuses the first of it)."""
    by_id = {item["id"]: item for item in items}
    ordered: list[dict[str, Any]] = []
    placed: set[str] = set()
    for item in items:
        # Walk up to the first ancestor already placed (iteratively: a chain of
        # continuations may be longer than Python's recursion limit).
        chain: list[dict[str, Any]] = []
        on_chain: set[str] = set()
        current = item
        while current["id"] not in placed and current["id"] not in on_chain:
            chain.append(current)
            on_chain.add(current["id"])
            parent = current.get("parent_session_id")
            if parent not in by_id or parent == current["id"]:
                break
            current = by_id[parent]
        for link in reversed(chain):
            placed.add(link["id"])
            ordered.append(link)
    return ordered
