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
call runs off the event loop: on an :class:`~sessiondb.AsyncSessionDB`'s worker thread
when given one, else on a thread of the loop's default executor. A write whose caller
is cancelled is awaited to its end first, then the cancellation is raised (as the SDK's
own sessions do), so the caller never mistakes a committed write for a lost one.

The SDK (``pip install 'sessiondb[openai-agents]'``) is imported when a session's
settings are first needed (by the ``Runner``, or a ``session_settings`` argument), not
before: a process that only reads and writes items does without its second of import
time; ``import sessiondb`` never imports it.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar

from ..aio import AsyncSessionDB
from ..backend import Conn, rows as _rows
from ..errors import ClosedError, InvalidArgument, InvalidArgumentType, SessionNotFound
from ..store import SessionDB
from ..text import check_id, from_json

if TYPE_CHECKING:
    from agents.memory.session_settings import SessionSettings

__all__ = ["SessionDBSession", "ITEM_KEY", "SOURCE"]

#: The key of ``messages.metadata`` that holds an item's exact JSON.
ITEM_KEY = "openai_agents_item"
#: The ``source`` of the sessions this adapter creates, unless told otherwise.
SOURCE = "openai-agents"
_MAX_LABEL = 100  # a longer role, type, name or call id is no label: left out
_NO_LIMIT = 2**63 - 1  # LIMIT for "all": SQLite and PostgreSQL both take a 64-bit one

T = TypeVar("T")
Item = dict[str, Any]
Store = SessionDB | AsyncSessionDB


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
    :raises InvalidArgumentType: ``db`` is none of the above, or options were given
        with an open store.
    """

    def __init__(self, session_id: str, db: str | os.PathLike[str] | Store | None = None,
                 *, source: str = SOURCE,
                 session_settings: SessionSettings | dict[str, Any] | None = None,
                 **options: Any) -> None:
        self.session_id = check_id("session_id", session_id)
        self.source = check_id("source", source)
        self._settings: SessionSettings | None = None
        if session_settings is not None:
            self.session_settings = session_settings
        self._async: AsyncSessionDB | None = None
        self._db: SessionDB | None = None
        self._path: str | os.PathLike[str] | None = None
        self._options = options
        self._owned = False
        self._closed = False
        self._lock = threading.Lock()  # opening and closing an owned store
        if isinstance(db, (SessionDB, AsyncSessionDB)):
            if options:
                raise InvalidArgumentType(
                    f"store options ({', '.join(sorted(options))}) apply only to a store "
                    "opened from a path; this one is open already")
            if isinstance(db, AsyncSessionDB):
                self._async = db
            else:
                self._db = db
        elif db is None or isinstance(db, (str, os.PathLike)):
            self._path, self._owned = db, True
        else:
            raise InvalidArgumentType(
                "db must be a path, a postgresql:// URL, a SessionDB or an AsyncSessionDB, "
                f"not {type(db).__name__}")

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
        self._check_open()
        if limit is None and self._settings is not None:  # the SDK's rule
            limit = self._settings.limit
        count = _check_limit(limit)
        if count == 0:
            return []
        return await self._call(_latest, self.session_id, count)

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
        self._check_open()
        if items:
            await _settled(self._call(_append, self.session_id, self.source, items))

    async def pop_item(self) -> Item | None:
        """Remove the conversation's newest item and return it (None if it has none).
        Atomic across processes: two callers at once never get the same item."""
        return await _settled(self._call(_pop, self.session_id))

    async def clear_session(self) -> None:
        """Remove every item of the conversation. Its sessiondb session stays (title,
        token counts, ended state), with zero messages."""
        await _settled(self._call(_clear, self.session_id))

    # -- the store ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the store if this session opened it (from a path or URL); a store that
        was passed in is left open. Idempotent; calls after it raise
        :class:`~sessiondb.errors.ClosedError`."""
        with self._lock:
            self._closed = True
            db, owned = self._db, self._owned
            if owned:
                self._db = None
        if owned and db is not None:
            db.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"{self!r} is closed")

    def _call(self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """``fn(store, *args)`` off the event loop (see the module docstring)."""
        self._check_open()
        if self._async is not None:
            return self._async.run(fn, *args)
        return asyncio.to_thread(lambda: fn(self._store(), *args))

    def _store(self) -> SessionDB:
        """The store, opened now (on a worker thread: opening touches files or the
        network) if this session owns it and this is its first call."""
        with self._lock:
            self._check_open()
            if self._db is None:
                self._db = SessionDB(self._path, **self._options)
            return self._db


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
        call = {"type": _clean(kind), "id": call_id or _label(item.get("id")), "name": name}
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
            return _clean(value)
        if isinstance(value, list):
            parts = [p.get("text") or p.get("refusal") for p in value if isinstance(p, dict)]
            text = "\n".join(p for p in parts if isinstance(p, str) and p)
            if text:
                return _clean(text)
    arguments = item.get("arguments")
    return _clean(arguments) if isinstance(arguments, str) else None


def _clean(text: str) -> str:
    """Text every backend stores: no NUL (PostgreSQL refuses it), lone surrogates
    replaced (they are not Unicode). Only the derived columns are cleaned; the item's
    JSON keeps them, escaped."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _label(value: Any) -> str | None:
    """A short text field (role, type, name, call id), or None if there is none."""
    if not isinstance(value, str) or not value or len(value) > _MAX_LABEL:
        return None
    return _clean(value) or None


def _check_limit(limit: Any) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgumentType(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise InvalidArgument(f"limit must be >= 0 (the latest N items) or None (all), "
                              f"got {limit}")
    return min(limit, _NO_LIMIT)


async def _settled(call: Awaitable[T]) -> T:
    """Await a write to its end even if the caller is cancelled meanwhile, then raise the
    cancellation: a cancelled ``add_items`` must not return while its transaction may
    still commit. Shielding alone would return at once and leave the outcome unknown."""
    task = asyncio.ensure_future(call)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError as exc:
            cancelled = cancelled or exc
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller gets the cancellation instead
        raise cancelled
    return task.result()
