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

Which writes were acknowledged is known only to the writers, and ``verify`` runs in the
parent after them: each writer leaves the sequence numbers of its acknowledged writes
in a small file (beside the store file; for a URL in the temporary directory, removed
by ``verify``), so that ``lost`` counts acknowledged writes missing, not failed ones.
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import time
from contextlib import closing
from typing import Any

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


def prepare(backend: str, target: str) -> None:
    """Nothing to create: the first writers make the store, as an app's would. Only the
    acknowledgement files of an earlier run on this target go."""
    for path in glob.glob(_acks_path(target, "*")):
        os.remove(path)


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

    return asyncio.run(_write(session, writer, count, target))


async def _write(make: Any, writer: int, count: int, target: str) -> dict[str, Any]:
    errors: list[str] = []
    waits: list[float] = []
    acked: list[int] = []
    session = None
    try:
        for seq in range(count):
            started = time.monotonic()
            try:
                if session is None:
                    session = make()
                await session.add_items([item(writer, seq)])
                acked.append(seq)
            except Exception as exc:  # the table counts it; the writer goes on
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                waits.append(time.monotonic() - started)
    finally:
        if session is not None:
            try:
                session.close()
            except Exception as exc:
                errors.append(f"close: {type(exc).__name__}: {exc}")
        with open(_acks_path(target, str(writer)), "w") as out:
            json.dump(acked, out)
    return {"ok": len(acked), "errors": errors, "waits": waits}


def verify(backend: str, target: str, writers: int, count: int) -> dict[str, Any]:
    """What the conversation holds, against what each writer says was acknowledged."""
    tags = [t for t in map(tag, _items(backend, target)) if t is not None]
    acked = set()
    for writer in range(writers):
        path = _acks_path(target, str(writer))
        if os.path.exists(path):
            with open(path) as f:
                acked.update((writer, seq) for seq in json.load(f))
            if "://" in target:
                os.remove(path)
    present = set(tags)
    out_of_order = sum(
        1 for w in range(writers)
        if (seqs := [s for tw, s in tags if tw == w]) != sorted(seqs))
    return {"present": len(tags), "lost": len(acked - present),
            "duplicated": len(tags) - len(present), "out_of_order": out_of_order}


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


def _acks_path(target: str, writer: str) -> str:
    """Where a writer leaves its acknowledged sequence numbers: beside a store file; for
    a URL, in the temporary directory under a name made from the URL."""
    if "://" not in target:
        return f"{target}.acks-{writer}.json"
    digest = hashlib.sha256(target.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"sessiondb-fw-openai-{digest}.acks-{writer}.json")
