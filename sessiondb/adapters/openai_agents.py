"""sessiondb behind the OpenAI Agents SDK: :class:`SessionDBSession`, the SDK's
``Session`` protocol on a store that many processes share, on SQLite or PostgreSQL.

Where the SDK takes a ``SQLiteSession``, it takes a ``SessionDBSession``::

    from sessiondb.adapters.openai_agents import SessionDBSession

    session = SessionDBSession("user-42", "state.db")   # or a postgresql:// URL
    result = await Runner.run(agent, "Hello", session=session)

*What is stored where.* A conversation is a sessiondb session (id = ``session_id``,
``source="openai-agents"`` unless told otherwise), created by the first ``add_items``
that adds something, so ``sessiondb list``, ``show``, ``search``, export and prune work
on it. Each item is one message, in the order added:

- ``role``: the item's ``role`` (``user``, ``assistant``, ``system``, ``developer``), or
  else its ``type`` (``function_call``, ``function_call_output``, ``reasoning``, ...),
  else ``item``;
- ``content``: the item's text, for search and display: a string ``content``, else the
  text of its parts joined by newlines (``content``, ``output``, ``summary``), else a
  function call's ``arguments``; with NUL characters dropped and lone surrogates
  replaced by ``?`` (text that every backend stores; the item's JSON keeps them);
- ``tool_name`` and ``tool_call_id``: the item's ``name`` and ``call_id``;
  ``tool_calls``: for a call item (its type ends in ``_call``), one entry
  ``{"type", "id", "name"}``, so the session's ``tool_call_count`` counts the calls;
- ``metadata``: ``{"openai_agents_item": <the item>}``, the item's exact JSON, which is
  what :meth:`SessionDBSession.get_items` returns (a dict equal to the one added, key
  order included). A message of the session that was not written through this class
  (no such key) reads as ``{"role": <role>, "content": <content or "">}``.

*Concurrency.* ``add_items`` is one write transaction (all the items or none, in
order, never interleaved with another writer's); ``pop_item`` is
:meth:`sessiondb.SessionDB.pop_message`, one write, so two processes popping at once
never get the same item; the session's counters equal its rows after every call. Every
call runs off the event loop (:mod:`sessiondb.adapters.worker`): on an
:class:`~sessiondb.AsyncSessionDB`'s worker thread when given one, else on the
session's own worker threads (one on SQLite), never on the loop's default executor,
which writes queued behind another process's write lock would otherwise take from the
application (its DNS lookups included). A store given as a path is opened at the first
call, on that thread. A write whose caller is cancelled is awaited to its end first,
then the cancellation is raised (as the SDK's own sessions do), so the caller never
mistakes a committed write for a lost one.

The SDK (``pip install 'sessiondb[openai-agents]'``) is imported when a session's
settings are first needed (by the ``Runner``, or a ``session_settings`` argument), not
before: a process that only reads and writes items does without its second of import
time; ``import sessiondb`` never imports it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..backend import Conn, rows as _rows
from ..errors import InvalidArgument, InvalidArgumentType, SessionNotFound
from ..store import SessionDB
from ..text import check_id, from_json
from .plain import plain_text
from .worker import StoreArg, Worker

if TYPE_CHECKING:
    from agents.memory.session_settings import SessionSettings

__all__ = ["SessionDBSession", "ITEM_KEY", "SOURCE"]

#: The key of ``messages.metadata`` that holds an item's exact JSON.
ITEM_KEY = "openai_agents_item"
#: The ``source`` of the sessions this adapter creates, unless told otherwise.
SOURCE = "openai-agents"
_MAX_LABEL = 100  # a longer role, type, name or call id is no label: left out
_NO_LIMIT = 2**63 - 1  # LIMIT for "all": SQLite and PostgreSQL both take a 64-bit one

Item = dict[str, Any]


class SessionDBSession:
    """The OpenAI Agents SDK's ``Session`` protocol on a sessiondb store.

    :param session_id: the conversation's id, which is its sessiondb session's id (a
        non-empty str of at most 1,024 characters).
    :param db: where the conversation lives: a file path or a ``postgresql://`` URL
        (opened on first use and owned: :meth:`close` closes it), None for sessiondb's
        default store (``$SESSIONDB_PATH``, else the user data dir), or an open
        :class:`~sessiondb.SessionDB` or :class:`~sessiondb.AsyncSessionDB` that many
        sessions share (not owned: :meth:`close` leaves it open).
    :param source: the ``source`` of the session it creates (default ``"openai-agents"``).
    :param session_settings: the SDK's ``SessionSettings`` (or a dict of them);
        ``settings.limit`` is how many of the latest items :meth:`get_items` returns when
        called without a limit (None: all).
    :param options: options of :class:`~sessiondb.SessionDB` for a store opened from a
        path (``write_timeout``, ``pool_size``, ...).
    :raises InvalidArgument: an empty or too long ``session_id`` or ``source``.
    :raises InvalidArgumentType: ``db`` is none of the above.
    :raises ConfigurationError: options given with an open store.
    """

    def __init__(self, session_id: str, db: StoreArg = None, *, source: str = SOURCE,
                 session_settings: SessionSettings | dict[str, Any] | None = None,
                 **options: Any) -> None:
        self.session_id = check_id("session_id", session_id)
        self.source = check_id("source", source)
        self._settings: SessionSettings | None = None
        if session_settings is not None:
            self.session_settings = session_settings
        self._worker = Worker(db, options, name="SessionDBSession")

    def __repr__(self) -> str:
        return f"SessionDBSession({self.session_id!r}, source={self.source!r})"

    @property
    def session_settings(self) -> SessionSettings:
        """The SDK's ``SessionSettings`` of this session (default ``SessionSettings()``:
        no limit); may be set to another, or to a dict of them."""
        if self._settings is None:
            from agents.memory.session_settings import SessionSettings

            self._settings = SessionSettings()
        return self._settings

    @session_settings.setter
    def session_settings(self, value: SessionSettings | dict[str, Any] | None) -> None:
        from agents.memory.session_settings import coerce_session_settings

        self._settings = coerce_session_settings(value) if value is not None else None

    # -- the Session protocol ---------------------------------------------------------
    async def get_items(self, limit: int | None = None) -> list[Item]:
        """The conversation's items, oldest first: all of them, or the latest ``limit``.

        :param limit: how many of the latest items; None means
            ``session_settings.limit`` (None there too: all); 0 gives ``[]``.
        :returns: the items, each equal to the dict that was added.
        :raises InvalidArgument: a negative limit (the SDK's ``SQLiteSession`` returns
            every item then, by SQLite's reading of ``LIMIT -1``; its other backends
            differ, so it is refused here rather than guessed).
        :raises InvalidArgumentType: a limit that is not an int.
        """
        self._worker.check_open()
        if limit is None and self._settings is not None:  # the SDK's rule
            limit = self._settings.limit
        count = _check_limit(limit)
        if count == 0:
            return []
        return await self._worker.run(_latest, self.session_id, count)

    async def add_items(self, items: list[Item]) -> None:
        """Append ``items`` at the end of the conversation, in order, in one write
        transaction: all of them or, on any error, none. Creates the session first if
        it does not exist; an empty list writes nothing.

        :raises InvalidArgumentType: ``items`` is not a list, an item is not a dict or
            is not JSON-serializable (NaN included); nothing was added.
        """
        if not isinstance(items, (list, tuple)):
            raise InvalidArgumentType(f"items must be a list of dicts, not "
                                      f"{type(items).__name__}")
        items = list(items)  # this list, as it is now
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise InvalidArgumentType(f"item {index} must be a dict, not "
                                          f"{type(item).__name__}; nothing was added")
        self._worker.check_open()
        if items:
            await self._worker.write(_append, self.session_id, self.source, items)

    async def pop_item(self) -> Item | None:
        """Remove the conversation's newest item and return it (None if it has none).
        Atomic across processes: two callers at once never get the same item."""
        return await self._worker.write(_pop, self.session_id)

    async def clear_session(self) -> None:
        """Remove every item of the conversation. Its sessiondb session stays (title,
        token counts, ended state), with zero messages."""
        await self._worker.write(_clear, self.session_id)

    # -- the store ----------------------------------------------------------------------
    def close(self) -> None:
        """Refuse calls from now on (:class:`~sessiondb.errors.ClosedError`), wait for
        the calls in progress, and close the store if this session opened it (from a
        path or URL); a store that was passed in is left open. Idempotent."""
        self._worker.close()


# -- what runs on the worker thread --------------------------------------------------

def _latest(db: SessionDB, session_id: str, count: int | None) -> list[Item]:
    def read(conn: Conn) -> list[dict[str, Any]]:
        return _rows(conn, "SELECT role, content, metadata FROM messages WHERE "
                           "session_id = ? ORDER BY id DESC LIMIT ?",
                     (session_id, _NO_LIMIT if count is None else count))

    return [_item(row["role"], row["content"], from_json(row["metadata"]))
            for row in reversed(db._read(read))]


def _append(db: SessionDB, session_id: str, source: str, items: list[Item]) -> None:
    messages = [_message(index, item) for index, item in enumerate(items)]
    with db.transaction():
        db.create_session(session_id, source)
        for message in messages:
            db.append_message(session_id, **message)


def _pop(db: SessionDB, session_id: str) -> Item | None:
    try:
        message = db.pop_message(session_id)
    except SessionNotFound:
        return None
    if message is None:
        return None
    return _item(message["role"], message["content"], message["metadata"])


def _clear(db: SessionDB, session_id: str) -> None:
    try:
        db.clear_messages(session_id)
    except SessionNotFound:
        pass  # nothing was ever added: nothing to clear


# -- items and messages -------------------------------------------------------------

def _message(index: int, item: Item) -> dict[str, Any]:
    """The ``append_message`` arguments of one item (see the module docstring)."""
    # Encoded here once more, before any write, for an error that names the item:
    # append_message's own would come from inside the transaction and speak of metadata.
    try:
        json.dumps(item, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgumentType(f"item {index} is not JSON-serializable ({exc}); "
                                  "nothing was added") from None
    kind = item.get("type")
    role = _label(item.get("role")) or _label(kind) or "item"
    name, call_id = _label(item.get("name")), _label(item.get("call_id"))
    calls = None
    if isinstance(kind, str) and kind.endswith("_call"):
        call = {"type": plain_text(kind), "id": call_id or _label(item.get("id")),
                "name": name}
        calls = [{k: v for k, v in call.items() if v is not None}]
    return {"role": role, "content": _text(item), "tool_name": name,
            "tool_call_id": call_id, "tool_calls": calls, "metadata": {ITEM_KEY: item}}


def _item(role: str, content: str | None, metadata: Any) -> Item:
    """The item a message stands for: its exact JSON, or a plain message for one that
    was not written through this adapter."""
    if isinstance(metadata, dict) and isinstance(metadata.get(ITEM_KEY), dict):
        return metadata[ITEM_KEY]
    return {"role": role, "content": content or ""}


def _text(item: Item) -> str | None:
    """An item's text: a string, or its parts' text joined (see the module docstring)."""
    for key in ("content", "output", "summary"):
        value = item.get(key)
        if isinstance(value, str):
            return plain_text(value)
        if isinstance(value, list):
            parts = [p.get("text") or p.get("refusal") for p in value if isinstance(p, dict)]
            text = "\n".join(p for p in parts if isinstance(p, str) and p)
            if text:
                return plain_text(text)
    arguments = item.get("arguments")
    return plain_text(arguments) if isinstance(arguments, str) else None


def _label(value: Any) -> str | None:
    """A short text field (role, type, name, call id), or None if there is none."""
    if not isinstance(value, str) or not value or len(value) > _MAX_LABEL:
        return None
    return plain_text(value) or None


def _check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgumentType(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise InvalidArgument(f"limit must be >= 0 (the latest N items) or None (all), "
                              f"got {limit}")
    return min(limit, _NO_LIMIT)
