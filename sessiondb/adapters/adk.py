"""Google ADK's session service on sessiondb: :class:`SessionDBSessionService`, a
``google.adk.sessions.BaseSessionService`` that many processes can share, on a SQLite
file or a PostgreSQL database::

    from sessiondb.adapters.adk import SessionDBSessionService

    session_service = SessionDBSessionService("state.db")  # or "postgresql://..."
    runner = Runner(app_name="weather", agent=agent, session_service=session_service)

It behaves as ADK's own ``SqliteSessionService`` and ``DatabaseSessionService`` do
(sessions with given or generated ids, ``GetSessionConfig``, state scoped by the
``app:``, ``user:`` and ``temp:`` prefixes, partial events and ``temp:`` keys never
stored, events read back as they were appended), with three differences:

- the stale-session check is made inside the write transaction that appends, under the
  session's lock, against a revision that every append moves and a token that tells a
  session from an earlier one of the same id: two processes appending to one session
  never both pass it, so no event is interleaved or lost (ADK's SQLite service checks
  outside any lock), and an object read before the session was deleted and made anew
  is refused; a stale append raises
  :class:`~sessiondb.adapters.adk_errors.StaleSession`, which is both sessiondb's
  ``StaleRevision`` and ADK's ``StaleSessionError``, and writes nothing;
- events come back in the order they were appended (ADK's SQLite and database services
  sort them by their timestamps, which each process stamps before it appends);
- an ADK session is a sessiondb session, whose id is the ADK id unless another app or
  user (or a session not made through ADK) has that id already (see
  :mod:`sessiondb.adapters.adk_store`, which also says what is stored where).

Within one process, appends to one session (any ``Session`` object of it) wait for each
other, as in ADK's ``DatabaseSessionService``: two tasks appending to the same object at
once (ADK's live mode does) are both stored, one after the other.

Every call runs off the event loop (:mod:`sessiondb.adapters.worker`): on the
service's own worker threads (one on SQLite), or on an ``AsyncSessionDB``'s thread if
given one, never on the loop's default executor, which writes queued behind another
process's write lock would otherwise take from the application. This module imports
``google.adk``; ``import sessiondb`` does not import it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from typing import Any, AsyncIterator, Optional

from google.adk.events.event import Event
from google.adk.platform import time as platform_time
from google.adk.platform import uuid as platform_uuid
from google.adk.sessions import _session_util
from google.adk.sessions.base_session_service import (
    BaseSessionService, GetSessionConfig, ListSessionsResponse,
)
from google.adk.sessions.session import Session
from google.adk.sessions.state import State

from ..aio import AsyncSessionDB
from ..errors import InvalidArgumentType
from ..store import SessionDB
from ..text import MAX_ID_LENGTH, check_id, check_text
from . import adk_store
from .adk_errors import AdkAlreadyExists, AdkSessionNotFound, StaleSession
from .plain import plain_text
from .worker import Worker, settled

__all__ = ["SessionDBSessionService", "StaleSession", "AdkSessionNotFound",
           "AdkAlreadyExists"]

#: How a Session object read from this service carries its marker:
#: ``sessiondb:<incarnation>:<revision>``.
_MARKER = "sessiondb:"


class SessionDBSessionService(BaseSessionService):
    """An ADK session service whose sessions live in a sessiondb store.

    :param db: a SQLite file path or a PostgreSQL URL (the service opens the store, on
        its first call, and closes it in :meth:`close`), or an open
        :class:`~sessiondb.SessionDB` or :class:`~sessiondb.AsyncSessionDB` (the caller
        keeps and closes it; with an ``AsyncSessionDB`` every call runs on its worker
        thread, in the order made).
    :param source: the ``source`` of the sessiondb sessions it creates.
    :raises InvalidArgumentType: ``db`` is none of these.
    """

    def __init__(self, db: str | os.PathLike[str] | SessionDB | AsyncSessionDB, *,
                 source: str = "adk") -> None:
        self._source = check_id("source", source)
        if db is None:  # (the worker would take it for sessiondb's default store)
            raise InvalidArgumentType("db must be a path, a PostgreSQL URL, a SessionDB or "
                                      "an AsyncSessionDB, not None")
        self._worker = Worker(db, {}, name="SessionDBSessionService",
                              prepare=adk_store.prepare)
        # One asyncio lock per session being appended to (see _one_append_at_a_time),
        # with the number of tasks holding or awaiting it.
        self._appending: dict[tuple[Any, ...], list[Any]] = {}
        self._appending_guard = threading.Lock()

    def __repr__(self) -> str:
        return (f"SessionDBSessionService({str(self._worker.target)!r}, "
                f"source={self._source!r})")

    async def close(self) -> None:
        """Refuse calls from now on (:class:`~sessiondb.errors.ClosedError`), wait for
        the calls in progress, and close the store if the service opened it (from a
        path or URL): a store given open is left open, for its owner to close.
        Idempotent."""
        await self._worker.aclose()

    @contextlib.asynccontextmanager
    async def _one_append_at_a_time(self, session: Session) -> AsyncIterator[None]:
        """Hold the lock of ``session``'s (app, user, id) in this service: appends to
        one session from tasks of one process run one after the other, each reading the
        object's marker only once the previous one has moved it (read before, two tasks
        would both carry the same revision and the second be refused as stale). Locks
        are dropped once no task holds or awaits them, and kept per event loop (an
        asyncio lock serves one loop; appends from two loops are checked by the store,
        as two processes' are)."""
        key = (asyncio.get_running_loop(), session.app_name, session.user_id, session.id)
        with self._appending_guard:
            entry = self._appending.setdefault(key, [asyncio.Lock(), 0])
            entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            with self._appending_guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._appending[key]

    async def __aenter__(self) -> "SessionDBSessionService":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the service --------------------------------------------------------------------
    async def create_session(self, *, app_name: str, user_id: str,
                             state: Optional[dict[str, Any]] = None,
                             session_id: Optional[str] = None) -> Session:
        """Create a session (``session_id`` given, surrounding blanks stripped as ADK
        does, or generated) with ``state``: its ``app:`` and ``user:`` keys go to the
        state shared by the app and by the app's user, ``temp:`` keys are dropped.

        :returns: the session, its state merged with the shared states.
        :raises AdkAlreadyExists: this app and user have a session of this id already
            (also ADK's ``AlreadyExistsError``); another app's or user's session of
            this id is another session.
        """
        app_name, user_id = _owner(app_name, user_id)
        if state is not None and not isinstance(state, dict):
            raise InvalidArgumentType(f"state must be a dict, not {type(state).__name__}")
        session_id = _new_id(session_id)
        deltas = _session_util.extract_json_safe_state_delta(state or {})
        now = platform_time.get_time()
        return await self._worker.write(lambda db: _session(adk_store.create(
            db, self._source, app_name, user_id, session_id, deltas, now)))

    async def get_session(self, *, app_name: str, user_id: str, session_id: str,
                          config: Optional[GetSessionConfig] = None) -> Optional[Session]:
        """The session with its events, oldest first (``config``: only the last
        ``num_recent_events``, only those stamped at or after ``after_timestamp``), and
        its state merged with the shared states; None if this app and user have none."""
        app_name, user_id = _owner(app_name, user_id)
        session_id = _lookup_id(session_id)
        config = config or GetSessionConfig()
        if session_id is None:
            return None
        # Parsed on the worker's thread too: a long session's events take a while.
        return await self._worker.run(lambda db: _session(adk_store.get(
            db, app_name, user_id, session_id, config.num_recent_events,
            config.after_timestamp)))

    async def list_sessions(self, *, app_name: str,
                            user_id: Optional[str] = None) -> ListSessionsResponse:
        """The sessions of the app (of one user, or of all), without their events,
        least recently updated first."""
        app_name = check_text("app_name", app_name, optional=False)
        user_id = check_text("user_id", user_id)
        return await self._worker.run(lambda db: ListSessionsResponse(sessions=[
            _session(s) for s in adk_store.list_for(db, app_name, user_id)]))

    async def delete_session(self, *, app_name: str, user_id: str, session_id: str) -> None:
        """Delete the session with its events (a session this app and user do not have:
        nothing happens)."""
        app_name, user_id = _owner(app_name, user_id)
        session_id = _lookup_id(session_id)
        if session_id is not None:
            await self._worker.write(adk_store.delete, app_name, user_id, session_id)

    async def get_user_state(self, *, app_name: str, user_id: str) -> dict[str, Any]:
        """The state shared by the app's sessions of this user, keys without ``user:``."""
        app_name, user_id = _owner(app_name, user_id)
        return await self._worker.run(adk_store.user_state, app_name, user_id)

    async def append_event(self, session: Session, event: Event) -> Event:
        """Store ``event`` in the session and apply it to ``session`` (its events, state
        and ``last_update_time``), as ADK's services do; a partial event is returned
        untouched, ``temp:`` keys reach ``session.state`` but are not stored.

        The check that ``session`` is not stale and the append are one transaction;
        appends to one session made at once in this process wait for each other.
        An event already stored in the session with the same content is not stored
        again (a retry whose first attempt was written): if it is the session's newest
        event and ``session`` was read just before it, it is applied to ``session``
        now, as the first attempt would have; otherwise ``session`` is left as it is.

        A call cancelled once its turn has come runs to its end first (the event
        stored and applied to ``session``, or refused), then raises the cancellation:
        ``session`` stays in step with the store. If an append fails after its write
        committed (a connection lost before the commit's answer), ``session`` is behind
        the store: appending the same event again with it catches it up (see above),
        and any other append with it is refused as stale (nothing is lost or written
        twice).

        :raises StaleSession: someone appended since ``session`` was read, or deleted
            the session and made it anew (also ADK's ``StaleSessionError``, a
            ``ValueError``); nothing was written and neither
            ``session`` nor ``event`` was changed: read the session again and retry.
        :raises AdkSessionNotFound: the session does not exist (any more).
        :raises AdkAlreadyExists: another event with this id is in the session.
        """
        if not isinstance(session, Session) or not isinstance(event, Event):
            raise InvalidArgumentType("append_event takes a google.adk Session and Event, "
                                      f"not {type(session).__name__} and "
                                      f"{type(event).__name__}")
        if event.partial:
            return event
        # What is stored: the event without its temp: keys, as ADK's services store it.
        # The caller's event is trimmed (by the base class) only once the write is in.
        delta = {k: v for k, v in (event.actions.state_delta or {}).items()
                 if not k.startswith(State.TEMP_PREFIX)}
        kept = event.model_copy(update={
            "actions": event.actions.model_copy(update={"state_delta": delta})})
        message, calls = _message(event)
        deltas = _session_util.extract_json_safe_state_delta(delta)
        self._worker.check_open()

        async def write_and_apply() -> Event:
            # Read only now: a task appending to this object before us has moved these.
            args = dict(expected=_marker(session),
                        seen_event=session.events[-1].id if session.events else None,
                        event_id=event.id,
                        event_json=kept.model_dump_json(exclude_none=True),
                        timestamp=event.timestamp, message=message, calls=calls,
                        deltas=deltas)
            done = await self._worker.run(lambda db: adk_store.append(
                db, session.app_name, session.user_id, session.id, **args))
            if not (done.stored or done.caught_up):
                return event
            session.last_update_time = done.update_time
            session._storage_update_marker = _MARKER + "%s:%d" % done.marker
            return await super(SessionDBSessionService, self).append_event(
                session=session, event=event)

        async with self._one_append_at_a_time(session):
            # Not worker.write: its result would be dropped on cancellation, and
            # session left behind the store; the lock is held until the end, so the
            # next append reads the marker this one leaves.
            return await settled(write_and_apply())


# -- between ADK's objects and what is stored ---------------------------------------------

def _owner(app_name: Any, user_id: Any) -> tuple[str, str]:
    return (check_text("app_name", app_name, optional=False),
            check_text("user_id", user_id, optional=False))


def _new_id(session_id: Any) -> str:
    """A new session's id as ADK's services take it: surrounding blanks stripped, and
    generated when none (or only blanks) is given."""
    stripped = (check_text("session_id", session_id) or "").strip()
    return check_id("session_id", stripped or platform_uuid.new_uuid())


def _lookup_id(session_id: Any) -> str | None:
    """The id to look a session up by (blanks stripped); None for one no session can
    have (empty, or longer than any stored id): such a session is simply not found."""
    stripped = check_text("session_id", session_id, optional=False).strip()
    return stripped if 0 < len(stripped) <= MAX_ID_LENGTH else None


def _session(stored: adk_store.Stored | None) -> Session | None:
    """The ADK Session of a stored one: its state merged with the shared states (keys
    prefixed), its events parsed, and its revision as the storage marker."""
    if stored is None:
        return None
    state = dict(stored.state)
    state.update({State.APP_PREFIX + k: v for k, v in stored.app_state.items()})
    state.update({State.USER_PREFIX + k: v for k, v in stored.user_state.items()})
    session = Session(id=stored.id, app_name=stored.app_name, user_id=stored.user_id,
                      state=state, last_update_time=stored.update_time,
                      events=[Event.model_validate_json(e) for e in stored.events])
    session._storage_update_marker = _MARKER + "%s:%d" % stored.marker
    return session


def _marker(session: Session) -> adk_store.Marker | None:
    """The incarnation and revision a Session object was read at; None if it did not
    come from us."""
    marker = session._storage_update_marker
    if isinstance(marker, str) and marker.startswith(_MARKER):
        incarnation, _, revision = marker[len(_MARKER):].partition(":")
        if incarnation and revision.isascii() and revision.isdigit():
            return incarnation, int(revision)
    return None


def _plain(text: str | None) -> str | None:
    """The message's readable copy of ``text`` (None for none or empty): the event
    itself keeps every character."""
    return plain_text(text) if text else None


def _message(event: Event) -> tuple[dict[str, Any], int]:
    """The message of an event (see :mod:`sessiondb.adapters.adk_store`) and its
    number of tool calls."""
    parts = (event.content.parts or []) if event.content else []
    calls = [p.function_call.model_dump(mode="json", exclude_none=True)
             for p in parts if p.function_call]
    answers = [p.function_response for p in parts if p.function_response]
    role = "tool" if answers else "user" if event.author == "user" else "assistant"
    # A tool message's text is its result, as in a chat transcript (and search finds it).
    results = [a.model_dump(mode="json").get("response") for a in answers]
    texts = [p.text for p in parts if p.text] + [
        json.dumps(r) for r in results if r is not None]
    return {
        "role": role,
        "content": _plain("\n".join(texts)),
        "tool_calls": json.dumps(calls) if calls else None,
        "tool_name": _plain(answers[0].name) if answers else None,
        "tool_call_id": _plain(answers[0].id) if answers else None,
    }, len(calls)
