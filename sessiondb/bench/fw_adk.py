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
counts as a failed write and the writer goes on with its next event. Every append's
time is recorded, a refused one included.

Besides the table's figures, :func:`details` reads from the session how many appends
were refused as stale and retried, and how many events were appended by a writer whose
``Session`` had not seen the event stored just before them (``interleaved``: a stale
object that a check made outside the write let through).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from typing import Any

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


def _ledger(target: str) -> str:
    """Where the writers leave the sequence numbers of their acknowledged appends (a
    directory under the system's temporary directory, named after the target)."""
    digest = hashlib.sha256(target.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"sessiondb-fw-adk-{digest}")


def prepare(backend: str, target: str) -> None:
    """Create the session the writers share, and an empty ledger."""
    shutil.rmtree(_ledger(target), ignore_errors=True)
    os.makedirs(_ledger(target))

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
    done: dict[str, Any] = {"ok": 0, "errors": [], "waits": [], "stale": 0}
    acked: list[int] = []
    session = None
    try:
        for seq in range(count):
            event = _event(writer, seq)
            attempt = 0
            while True:
                try:
                    if session is None:
                        session = await service.get_session(
                            app_name=APP, user_id=USER, session_id=SESSION, config=recent)
                        if session is None:
                            raise LookupError("the session is gone")
                    attempt += 1
                    event.timestamp = time.time()
                    event.custom_metadata.update(
                        seen=[e.id for e in session.events[-3:]], attempt=attempt)
                    started = time.monotonic()
                    try:
                        await service.append_event(session, event)
                    finally:
                        done["waits"].append(time.monotonic() - started)
                except StaleSessionError:
                    done["stale"] += 1
                    session = None
                    continue
                except Exception as exc:  # counted, never fatal: the table shows it
                    done["errors"].append(f"{type(exc).__name__}: {exc}"[:300])
                    break
                done["ok"] += 1
                acked.append(seq)
                break
    finally:
        with open(os.path.join(_ledger(target), f"writer-{writer}.json"), "w") as f:
            json.dump(acked, f)
        await service.close()
    return done


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


def verify(backend: str, target: str, writers: int, count: int) -> dict[str, int]:
    """What the session holds, read back through the backend's own ``get_session``."""
    tags = _tags(asyncio.run(_events(backend, target)))
    have = set(tags)
    acked: dict[int, list[int]] = {}
    for w in range(writers):
        try:
            with open(os.path.join(_ledger(target), f"writer-{w}.json")) as f:
                acked[w] = json.load(f)
        except FileNotFoundError:
            acked[w] = []  # the writer never reported: its writes count as errors
    shutil.rmtree(_ledger(target), ignore_errors=True)
    order = {w: [s for tw, s in tags if tw == w] for w in range(writers)}
    return {
        "present": len(have),
        "duplicated": len(tags) - len(have),
        "lost": sum((w, s) not in have for w, seqs in acked.items() for s in seqs),
        "out_of_order": sum(seqs != sorted(set(seqs)) for seqs in order.values()),
    }


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
