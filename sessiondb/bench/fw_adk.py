"""The Google ADK case of the frameworks benchmark (:mod:`.frameworks`): 8 processes
append events to one ADK session at once, through sessiondb's session service
(:mod:`sessiondb.adapters.adk`, a file or a PostgreSQL URL) and through ADK's own
``SqliteSessionService`` (ADK's SQLite backend, what a ``sqlite://`` session URI opens),
on a file.

Each writer reads the session once, then appends ``count`` events, each tagged with its
writer, its sequence number, its attempt and the ids of the last three events its
``Session`` object held. An append refused as stale (``StaleSessionError``: another
writer appended since this object was read) is met as an ADK app would meet it: read the
session again and append the event to the new object, stamped anew (a retried append is
a new write: ADK's SQLite service orders events by these stamps), as often as it takes;
a re-read loads the last :data:`RECENT` events, the context of a turn. Any other error
counts as a failed write and the writer goes on with its next event. Every attempt's
time is recorded (with the re-read of the session before it, if any), a refused one
included.

Besides the table's figures, :func:`details` reads from the session how many appends
were refused as stale and retried, and how many events were appended by a writer whose
``Session`` had not seen the event stored just before them (``interleaved``: a stale
object that a check made outside the write let through).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import sqlite3
import time
from typing import Any

from .frameworks import Writes, tally

NAME = "Google ADK"
BACKENDS = ("sessiondb", "sessiondb-pg", "SqliteSessionService")
APP, USER, SESSION = "bench", "bench-user", "bench-session"
#: Events a writer's re-read of the session loads.
RECENT = 20


def _service(backend: str, target: str) -> Any:
    if backend == "SqliteSessionService":
        from google.adk.sessions.sqlite_session_service import SqliteSessionService

        return SqliteSessionService(target)
    from ..adapters.adk import SessionDBSessionService

    return SessionDBSessionService(target)


def load(backend: str) -> None:
    """Import ADK and google.genai (about 0.7 s), before the writers start together."""
    importlib.import_module("google.adk.events.event")
    importlib.import_module("google.adk.sessions.sqlite_session_service"
                            if backend == "SqliteSessionService" else "sessiondb.adapters.adk")


def prepare(backend: str, target: str) -> None:
    """Create the session the writers share."""

    async def create() -> None:
        service = _service(backend, target)
        try:
            await service.create_session(app_name=APP, user_id=USER, session_id=SESSION)
        finally:
            await service.close()

    asyncio.run(create())


def _event(writer: int, seq: int) -> Any:
    from google.adk.events.event import Event
    from google.adk.events.event_actions import EventActions
    from google.genai import types

    return Event(invocation_id=f"bench-{writer}-{seq}", author=f"writer-{writer}",
                 content=types.Content(role="model", parts=[
                     types.Part(text=f"writer {writer} event {seq}")]),
                 actions=EventActions(state_delta={f"writer-{writer}": seq}),
                 custom_metadata={"writer": writer, "seq": seq})


def work(backend: str, target: str, writer: int, count: int) -> dict[str, Any]:
    """``count`` appends of this writer (see the module docstring)."""
    return asyncio.run(_work(backend, target, writer, count))


async def _work(backend: str, target: str, writer: int, count: int) -> dict[str, Any]:
    from google.adk.errors._stale_session_error import StaleSessionError
    from google.adk.sessions.base_session_service import GetSessionConfig

    recent = GetSessionConfig(num_recent_events=RECENT)
    service = _service(backend, target)
    writes = Writes()
    session = None
    try:
        for seq in range(count):
            event = _event(writer, seq)
            for attempt in itertools.count(1):
                with writes.attempt(seq, again=(StaleSessionError,)):
                    if session is None:
                        session = await service.get_session(
                            app_name=APP, user_id=USER, session_id=SESSION, config=recent)
                        if session is None:
                            raise LookupError("the session is gone")
                    event.timestamp = time.time()
                    event.custom_metadata.update(
                        seen=[e.id for e in session.events[-3:]], attempt=attempt)
                    await service.append_event(session, event)
                if not writes.again:
                    break
                session = None  # stale: read the session again, append again
    finally:
        await service.close()
    return writes.result()


async def _events(backend: str, target: str) -> list[Any]:
    service = _service(backend, target)
    try:
        session = await service.get_session(app_name=APP, user_id=USER, session_id=SESSION)
    finally:
        await service.close()
    return session.events if session else []


def _tags(events: list[Any]) -> list[tuple[int, int]]:
    return [(e.custom_metadata["writer"], e.custom_metadata["seq"]) for e in events
            if e.custom_metadata and "writer" in e.custom_metadata]


def verify(backend: str, target: str, acked: dict[int, list[int]]) -> dict[str, Any]:
    """What the session holds, read back through the backend's own ``get_session``, and
    in the notes what :func:`details` finds."""
    figures: dict[str, Any] = tally(_tags(asyncio.run(_events(backend, target))), acked)
    found = details(backend, target)
    figures["notes"] = (f"{found['stale_retries']} stale appends refused and retried, "
                        f"{found['interleaved']} let through")
    return figures


def _appended(backend: str, target: str) -> list[Any]:
    """The events in the order they were stored (ADK's ``SqliteSessionService`` reads
    them back sorted by their timestamps: its table's row order is the append order)."""
    if backend != "SqliteSessionService":
        return asyncio.run(_events(backend, target))
    from google.adk.events.event import Event

    with sqlite3.connect(target) as conn:
        rows = conn.execute("SELECT event_data FROM events WHERE session_id = ? "
                            "ORDER BY rowid", (SESSION,)).fetchall()
    return [Event.model_validate_json(r[0]) for r in rows]


def details(backend: str, target: str) -> dict[str, int]:
    """``events``; ``stale_retries``: appends refused as stale and made again;
    ``interleaved``: events whose writer had not seen the event stored before them."""
    events = _appended(backend, target)
    retries = interleaved = 0
    for before, event in zip([None] + events[:-1], events):
        meta = event.custom_metadata or {}
        retries += max(0, meta.get("attempt", 1) - 1)
        interleaved += before is not None and before.id not in meta.get("seen", ())
    return {"events": len(events), "stale_retries": retries, "interleaved": interleaved}
