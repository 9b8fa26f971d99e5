"""The errors of the Google ADK session service (:mod:`sessiondb.adapters.adk`).

Each is both sessiondb's and the one ADK's own services raise, so an ``except`` clause
written for either catches it::

    sessiondb                    google.adk
    StaleRevision        ─┐  ┌─  StaleSessionError (a ValueError)
                          StaleSession
    SessionNotFound      ─┐  ┌─  SessionNotFoundError (a ValueError)
                          AdkSessionNotFound
    IntegrityViolation   ─┐  ┌─  AlreadyExistsError
                          AdkAlreadyExists
"""

from __future__ import annotations

from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError

from ..errors import IntegrityViolation, SessionNotFound, StaleRevision

__all__ = ["StaleSession", "AdkSessionNotFound", "AdkAlreadyExists"]


class StaleSession(StaleRevision, StaleSessionError):
    """The ``Session`` object given to ``append_event`` is older than the stored
    session: another writer appended an event since it was read, or the session was
    deleted and made anew with the same id. Nothing was written; read the session again
    (``get_session``) and append to that.

    :ivar session_id: the session's ADK id.
    :ivar expected: the session's revision when this object was read (None for a
        ``Session`` that did not come from this service: its last event was compared
        with the session's instead).
    :ivar actual: the stored revision now.
    :ivar recreated: the object was read from an earlier session of this id, since
        deleted (its revisions are not comparable with this one's).
    """

    def __init__(self, session_id: str, expected: int | None, actual: int, *,
                 recreated: bool = False) -> None:
        seen = ("was read from an earlier session of this id, since deleted and made "
                "anew" if recreated else
                f"was read at revision {expected}: another writer appended an event "
                "meanwhile" if expected is not None else
                "has not seen the session's last event: another writer appended one")
        Exception.__init__(
            self, f"ADK session {session_id!r} is at revision {actual} in the store, but "
                  f"this Session object {seen}; nothing was written. Read it again with "
                  "get_session() and append to the new object")
        self.session_id = session_id
        self.expected = expected
        self.actual = actual
        self.recreated = recreated


class AdkSessionNotFound(SessionNotFound, SessionNotFoundError):
    """No ADK session with this id exists for this app and user (it was deleted, or
    was never made by this app and user)."""

    def __init__(self, session_id: str, app_name: str, user_id: str) -> None:
        SessionNotFound.__init__(
            self, session_id, f"ADK session {session_id!r} of app {app_name!r} and user "
                              f"{user_id!r} not found")
        self.app_name = app_name
        self.user_id = user_id


class AdkAlreadyExists(IntegrityViolation, AlreadyExistsError):
    """A session (or an event in a session) with this id already exists; nothing was
    written.

    :ivar session_id: the session's ADK id.
    :ivar event_id: the event id, when an event was refused.
    """

    def __init__(self, message: str, session_id: str, event_id: str | None = None) -> None:
        AlreadyExistsError.__init__(self, message)
        self.session_id = session_id
        self.event_id = event_id
