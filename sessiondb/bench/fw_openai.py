"""The frameworks benchmark's OpenAI Agents SDK case (:mod:`.frameworks`): 8 processes
adding items to one conversation at once, through
:class:`sessiondb.adapters.openai_agents.SessionDBSession` on a SQLite file
(``sessiondb``) or a PostgreSQL URL (``sessiondb-pg``), and through the SDK's own
``agents.SQLiteSession`` on a file (``SQLiteSession``).

Each write is one ``await session.add_items([item])`` of a user message tagged
``w<writer> #<seq>``, as a ``Runner`` adds a turn's input. The SDK's backend runs
exactly as shipped: one ``SQLiteSession`` per process, made at the first write (a
write whose construction fails is an error, and the next write tries again, as the
next request of an app would), no retries besides its own; every error is caught and
counted, never ending the run.

``verify`` reads the conversation back and finds each item's writer and sequence number
in its text.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import sqlite3
from contextlib import closing
from typing import Any

from .frameworks import Writes, tally

NAME = "OpenAI Agents SDK"
BACKENDS = ("sessiondb", "sessiondb-pg", "SQLiteSession")
#: The conversation every writer adds to.
CONVERSATION = "bench-conversation"
_TAG = re.compile(r"^w(\d+) #(\d+):")
# A user turn of a realistic size (about 300 characters).
_FILLER = ("Please summarise the design review notes from this morning and list the open "
           "questions about the storage layer, the retry policy and the rollout plan, "
           "with an owner for each; keep it short enough to paste into the team channel "
           "before the afternoon sync.")


def item(writer: int, seq: int) -> dict[str, Any]:
    """The item of write ``seq`` of ``writer``."""
    return {"role": "user", "content": f"w{writer} #{seq}: {_FILLER}"}


def tag(item: Any) -> tuple[int, int] | None:
    """``(writer, seq)`` of an item written by :func:`work`, else None."""
    content = item.get("content") if isinstance(item, dict) else None
    match = _TAG.match(content) if isinstance(content, str) else None
    return (int(match[1]), int(match[2])) if match else None


def load(backend: str) -> None:
    """Import what the writes run on before the writers start together: the SDK (about
    1.4 s) for its ``SQLiteSession``; sessiondb's adapter, which never imports the SDK,
    for the others (8 processes importing the SDK for nothing cost 11 s of CPU a run)."""
    importlib.import_module("agents" if backend == "SQLiteSession"
                            else "sessiondb.adapters.openai_agents")


def prepare(backend: str, target: str) -> None:
    """Nothing to create: the first writers make the store, as an app's would."""


def work(backend: str, target: str, writer: int, count: int) -> dict[str, Any]:
    """``count`` writes of one item each, one after another; see the module docstring."""
    if backend == "SQLiteSession":
        from agents import SQLiteSession

        def session() -> Any:
            return SQLiteSession(CONVERSATION, target)
    else:
        from ..adapters.openai_agents import SessionDBSession

        def session() -> Any:
            return SessionDBSession(CONVERSATION, target)

    return asyncio.run(_write(session, writer, count))


async def _write(make: Any, writer: int, count: int) -> dict[str, Any]:
    writes = Writes()
    session = None
    try:
        for seq in range(count):
            with writes.attempt(seq):
                if session is None:
                    session = make()
                await session.add_items([item(writer, seq)])
    finally:
        if session is not None:
            try:
                session.close()
            except Exception as exc:
                writes.error(exc, "close: ")
    return writes.result()


def verify(backend: str, target: str, acked: dict[int, list[int]]) -> dict[str, Any]:
    """What the conversation holds, against what each writer says was acknowledged."""
    return tally((t for t in map(tag, _items(backend, target)) if t is not None), acked)


def _items(backend: str, target: str) -> list[Any]:
    """Every item of the conversation, in the store's order."""
    if backend == "SQLiteSession":
        # Read with sqlite3 as the SDK stores them (its table and JSON), not through a
        # SQLiteSession, whose constructor would write the schema if a run left none.
        if not os.path.exists(target):
            return []
        with closing(sqlite3.connect(target)) as conn:
            try:
                rows = conn.execute("SELECT message_data FROM agent_messages WHERE "
                                    "session_id = ? ORDER BY id", (CONVERSATION,)).fetchall()
            except sqlite3.OperationalError:  # no table: nothing was ever written
                return []
        return [json.loads(r[0]) for r in rows]  # the SDK wrote them with json.dumps
    from ..adapters.openai_agents import ITEM_KEY
    from ..store import SessionDB

    with SessionDB(target) as db:
        return [(m["metadata"] or {}).get(ITEM_KEY) for m in db.get_messages(CONVERSATION)]

