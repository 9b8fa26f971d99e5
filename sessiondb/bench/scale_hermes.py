"""A hermes-agent ``state.db`` (its schema 6) of many messages, written with raw SQL as
hermes-agent itself lays it out, for the scale benchmark's conversion step.

The DDL follows the hermes-agent specification's schema section: the tables with their
columns in hermes-agent's order, its four indexes and the unique partial title index, the
external-content FTS5 table over ``messages.content`` with its three triggers, and
``schema_version`` holding 6. The rows are inserted first and indexed in one FTS5
``rebuild`` afterwards, which leaves the same file as indexing each row through the
triggers, in a fraction of the time.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import apsw

from .scale_data import Corpus, sessions

HERMES_DDL = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE sessions (
    id TEXT PRIMARY KEY, source TEXT NOT NULL, user_id TEXT, model TEXT,
    model_config TEXT, system_prompt TEXT, parent_session_id TEXT,
    started_at REAL NOT NULL, ended_at REAL, end_reason TEXT,
    message_count INTEGER DEFAULT 0, tool_call_count INTEGER DEFAULT 0,
    input_tokens INTEGER DEFAULT 0, output_tokens INTEGER DEFAULT 0,
    cache_read_tokens INTEGER DEFAULT 0, cache_write_tokens INTEGER DEFAULT 0,
    reasoning_tokens INTEGER DEFAULT 0, billing_provider TEXT, billing_base_url TEXT,
    billing_mode TEXT, estimated_cost_usd REAL, actual_cost_usd REAL, cost_status TEXT,
    cost_source TEXT, pricing_version TEXT, title TEXT,
    FOREIGN KEY (parent_session_id) REFERENCES sessions(id));
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL REFERENCES sessions(id),
    role TEXT NOT NULL, content TEXT, tool_call_id TEXT, tool_calls TEXT, tool_name TEXT,
    timestamp REAL NOT NULL, token_count INTEGER, finish_reason TEXT, reasoning TEXT,
    reasoning_details TEXT, codex_reasoning_items TEXT);
CREATE INDEX idx_sessions_source ON sessions(source);
CREATE INDEX idx_sessions_parent ON sessions(parent_session_id);
CREATE INDEX idx_sessions_started ON sessions(started_at DESC);
CREATE INDEX idx_messages_session ON messages(session_id, timestamp);
CREATE UNIQUE INDEX idx_sessions_title_unique ON sessions(title) WHERE title IS NOT NULL;
"""
HERMES_FTS = """
CREATE VIRTUAL TABLE messages_fts USING fts5(content, content=messages, content_rowid=id);
CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES('delete', old.id, old.content);
END;
CREATE TRIGGER messages_fts_update AFTER UPDATE ON messages BEGIN
    INSERT INTO messages_fts(messages_fts, rowid, content) VALUES('delete', old.id, old.content);
    INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content);
END;
"""
_SESSION_COLS = ("id", "source", "model", "started_at", "ended_at", "title", "message_count")
_BATCH = 200  # sessions per transaction of the build (nobody else uses the file yet)


def build_hermes_db(path: str, corpus: Corpus, session_count: int, seed: int) -> dict[str, Any]:
    """Write a fresh hermes-agent schema-6 ``state.db`` at ``path`` with ``session_count``
    sessions of 50 messages (the benchmark's data), fully indexed.

    :returns: ``sessions``, ``messages``, ``duration_s``, ``file_bytes``.
    """
    t0 = time.perf_counter()
    conn = apsw.Connection(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(HERMES_DDL)
        conn.execute("INSERT INTO schema_version VALUES (6)")
        messages = 0
        shown = time.monotonic()
        stream = sessions(corpus, session_count, seed + 1, first=0)
        for done in range(0, session_count, _BATCH):
            with conn:
                for item in _take(stream, _BATCH):
                    msgs = item.pop("messages")
                    item["message_count"] = len(msgs)
                    conn.execute(f"INSERT INTO sessions ({', '.join(_SESSION_COLS)}) "
                                 f"VALUES ({', '.join('?' * len(_SESSION_COLS))})",
                                 [item[c] for c in _SESSION_COLS])
                    conn.executemany(
                        "INSERT INTO messages (session_id, role, content, timestamp) "
                        "VALUES (?, ?, ?, ?)",
                        [(item["id"], m["role"], m["content"], m["timestamp"])
                         for m in msgs])
                    messages += len(msgs)
            if time.monotonic() - shown >= 2.0:
                shown = time.monotonic()
                print(f"    hermes state.db: {messages:,} messages, "
                      f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        print("    hermes state.db: indexing", file=sys.stderr, flush=True)
        with conn:
            conn.execute(HERMES_FTS)
            conn.execute("INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return {"sessions": session_count, "messages": messages,
            "duration_s": time.perf_counter() - t0, "file_bytes": os.path.getsize(path)}


def _take(stream: Any, n: int) -> list[dict[str, Any]]:
    out = []
    for item in stream:
        out.append(item)
        if len(out) == n:
            break
    return out


def count_messages(path: str, session_id: str | None = None) -> int:
    """Messages in the file (of one session), read-only."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        if session_id is None:
            return conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        return conn.execute("SELECT count(*) FROM messages WHERE session_id = ?",
                            (session_id,)).fetchone()[0]
    finally:
        conn.close()


__all__ = ["build_hermes_db", "count_messages", "HERMES_DDL", "HERMES_FTS"]
