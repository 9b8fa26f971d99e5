"""The store an adapter uses and the threads its coroutines run on: one :class:`Worker`
per adapter instance, shared by the copies a framework makes of it.

An adapter hands the ``db`` argument it was given (and the store options) to a
:class:`Worker` and calls the store only through it::

    self._worker = Worker(db, options, name="SessionDBSaver", prepare=make_my_tables)

    def put(self, ...):                               # sync: on the caller's thread
        return self._worker.call(self._put, ...)      # self._put(store, ...)

    async def aput(self, ...):                        # async: off the event loop
        return await self._worker.write(self._put, ...)

    async def aget(self, ...):
        return await self._worker.run(self._get, ...)

The API:

- ``Worker(db, options, *, name, prepare=None)``: ``db`` is a path, a ``postgresql://``
  URL or None (sessiondb's default store): *owned*, opened with ``options`` at the
  first call, on the thread making it, and closed by :meth:`Worker.close`; or an open
  :class:`~sessiondb.SessionDB` or :class:`~sessiondb.AsyncSessionDB`: *shared*, never
  closed here. Constructing one does no I/O, so an adapter may be made inside a
  coroutine. ``name`` (the adapter's class name) goes in error messages and thread
  names; ``prepare(store)`` runs before every call (make its repeats cheap, as
  :func:`~sessiondb.adapters.tables.ensure_tables` does).
- ``await run(fn, *args)``: ``fn(store, *args)`` off the event loop; ``await
  write(fn, *args)``: the same for a write, which a cancelled caller waits for (see
  *Cancellation*); ``call(fn, *args)``: the same from sync code, on the calling thread.
- ``store()``: the store (opened now, if owned and not yet open): a ``SessionDB``, or
  the ``AsyncSessionDB`` given.
- ``close()`` (and ``await aclose()``, which waits on a thread of its own): later calls
  raise :class:`~sessiondb.errors.ClosedError`, owned store or shared; the calls
  already made on the worker's threads complete first (an ``AsyncSessionDB``'s on its
  own thread, not waited for); then an owned store is closed. Idempotent.
- ``check_open()``: raise ``ClosedError`` if closed (for a call that ends before it
  reaches the store); ``closed``, ``owned``, and ``target``: what ``db`` was (for the
  adapter's repr).
- :func:`settled`: await a call to its end even if the caller is cancelled meanwhile.

*The threads.* A ``SessionDB`` serializes its calls (SQLite: one connection behind a
lock; PostgreSQL: a bounded pool), so coroutines queued behind another process's write
lock would hold every thread they run on. They run on threads of the worker's own (one
on SQLite; on PostgreSQL as many as the store's pool has connections), never on the
loop's default executor, which the application needs meanwhile (``loop.getaddrinfo``
resolves names on it: an HTTP client would wait behind the queued writes). A forked
child gets its own threads at its first call (the parent's do not exist there). An
``AsyncSessionDB`` runs the calls on its one worker thread instead (``adb.run``), in
the order they are made and never in the middle of one of its ``run()`` functions,
as its documentation promises; a sync call from another thread waits for its turn there.

*Cancellation.* A cancelled :meth:`Worker.run` that has not started is skipped, one
that has started completes and its result is dropped: all or nothing either way. A
cancelled :meth:`Worker.write` runs to its end (committed or rolled back) before the
cancellation is raised, so a caller told "cancelled" never has a write that commits
afterwards, nor mistakes a committed one for a lost one.

The readable text an adapter derives from an item or event (``content``, labels) goes
through :func:`sessiondb.adapters.plain.plain_text`. This module imports no framework.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from typing import Any, Awaitable, Callable, Mapping, TypeVar, Union

from ..aio import AsyncSessionDB
from ..backend import is_url
from ..connection import ENV_PATH
from ..errors import ClosedError, ConfigurationError, InvalidArgumentType
from ..store import SessionDB

__all__ = ["Worker", "StoreArg", "settled"]

T = TypeVar("T")
#: What an adapter's ``db`` argument may be (see :class:`Worker`).
StoreArg = Union[str, "os.PathLike[str]", SessionDB, AsyncSessionDB, None]
_PG_THREADS = 8  # a PostgreSQL store's default pool_size: more threads would only wait

# Every worker, so that a forked child drops the parent's threads and locks.
_WORKERS: "weakref.WeakSet[Worker]" = weakref.WeakSet()


class Worker:
    """The store of one adapter instance and the threads its calls run on (see the
    module docstring).

    :param db: a path, a ``postgresql://`` URL or None (owned), or an open
        :class:`~sessiondb.SessionDB` or :class:`~sessiondb.AsyncSessionDB` (shared).
    :param options: options of :class:`~sessiondb.SessionDB`, for an owned store.
    :param name: the adapter's name, for error messages and thread names.
    :param prepare: run with the ``SessionDB`` before every call (e.g. make tables).
    :raises InvalidArgumentType: ``db`` is none of these.
    :raises ConfigurationError: ``options`` given with an open store.
    """

    def __init__(self, db: StoreArg, options: Mapping[str, Any], *, name: str,
                 prepare: Callable[[SessionDB], object] | None = None) -> None:
        if isinstance(db, (SessionDB, AsyncSessionDB)):
            if options:
                raise ConfigurationError(
                    f"store options ({', '.join(sorted(options))}) apply only to a store "
                    f"{name} opens from a path; this one is open already")
        elif not (db is None or isinstance(db, (str, os.PathLike))):
            raise InvalidArgumentType("db must be a path, a postgresql:// URL, a SessionDB "
                                      f"or an AsyncSessionDB, not {type(db).__name__}")
        self.target = db
        self.owned = not isinstance(db, (SessionDB, AsyncSessionDB))
        self.closed = False
        self._finished = False  # close() has closed the owned store: nothing reopens it
        self._name = name
        self._options = dict(options)
        self._prepare = prepare
        self._adb = db if isinstance(db, AsyncSessionDB) else None
        self._db = db if isinstance(db, SessionDB) else None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._reset_locks()
        _WORKERS.add(self)

    def _reset_locks(self) -> None:
        self._lock = threading.Lock()  # closed and the pool: "not closed, then submit"
        self._open_lock = threading.Lock()  # opening (and closing) an owned store

    def __repr__(self) -> str:
        return f"Worker({self.target!r}, {self._name}{', closed' if self.closed else ''})"

    # -- the store ----------------------------------------------------------------------
    def store(self) -> SessionDB | AsyncSessionDB:
        """The store: the ``AsyncSessionDB`` given, else the ``SessionDB``, prepared
        (opened now, on this thread, if owned and not open yet).

        :raises ClosedError: :meth:`close` was called.
        :raises DatabaseOpenError: an owned store cannot be opened.
        """
        self.check_open()
        return self._adb if self._adb is not None else self._session_db()

    def _session_db(self) -> SessionDB:
        db = self._db
        if db is None:
            with self._open_lock:
                if self._finished:  # (a call made before close() may still open it)
                    raise self._closed_error()
                if self._db is None:
                    self._db = SessionDB(self.target, **self._options)
                db = self._db
        if self._prepare is not None:
            self._prepare(db)
        return db

    def check_open(self) -> None:
        """:raises ClosedError: :meth:`close` was called."""
        if self.closed:
            raise self._closed_error()

    def _closed_error(self) -> ClosedError:
        return ClosedError(f"this {self._name} is closed; make a new one")

    def _apply(self, db: SessionDB, fn: Callable[..., T], args: tuple) -> T:
        """``fn(db, *args)``, ``db`` prepared (on the ``AsyncSessionDB``'s thread)."""
        if self._prepare is not None:
            self._prepare(db)
        return fn(db, *args)

    # -- calls --------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(store, *args)`` now, on this thread (with an ``AsyncSessionDB``: on its
        thread, waited for here). For the adapters' sync methods.

        :raises ClosedError: :meth:`close` was called.
        """
        self.check_open()
        if self._adb is not None:
            return self._adb._queue(lambda db: self._apply(db, fn, args)).result()
        return fn(self._session_db(), *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(store, *args)`` off the event loop, on the worker's threads (see the
        module docstring); cancelled, it is skipped if it has not started.

        :raises ClosedError: :meth:`close` was called.
        """
        return await self._start(fn, args)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """:meth:`run` for a write: a cancelled caller waits for it to end, then gets
        the cancellation (see :func:`settled`)."""
        return await settled(self._start(fn, args))

    def _start(self, fn: Callable[..., T], args: tuple) -> Awaitable[T]:
        """Queue the call now (so that a coroutine's calls start in the order made) and
        return its result, to be awaited."""
        if self._adb is not None:
            self.check_open()
            return self._adb.run(self._apply, fn, args)
        return asyncio.wrap_future(self._submit(fn, args))

    def _submit(self, fn: Callable[..., T], args: tuple) -> "concurrent.futures.Future[T]":
        with self._lock:
            self.check_open()
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._threads(), thread_name_prefix=f"sessiondb-{self._name}")
            return self._pool.submit(lambda: fn(self._session_db(), *args))

    def _threads(self) -> int:
        """One thread on SQLite (its one connection serializes the calls anyway); on
        PostgreSQL, one per connection of the store's pool."""
        if self._db is not None:
            return 1 if self._db.backend == "sqlite" else self._db.stats()["pool"]["size"]
        target = self.target
        if target is None:
            target = os.environ.get(ENV_PATH)
        if not is_url(target):
            return 1
        size = self._options.get("pool_size", _PG_THREADS)
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 \
            else _PG_THREADS  # an invalid pool_size: opening the store reports it

    # -- closing ------------------------------------------------------------------------
    def close(self) -> None:
        """Refuse calls from now on (:class:`~sessiondb.errors.ClosedError`), wait for
        the calls already made on the worker's threads, stop them, and close the store
        if it is owned. Idempotent.

        :raises StorageError: closing an owned store failed.
        """
        with self._lock:
            self.closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if not self.owned:
            return
        with self._open_lock:  # after an open in progress on another thread
            db, self._db, self._finished = self._db, None, True
        if db is not None:
            db.close()

    async def aclose(self) -> None:
        """:meth:`close` on a thread of its own, so the event loop goes on while the
        calls already made complete; cancelling the await does not stop it."""
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def close() -> None:
            try:
                self.close()
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        threading.Thread(target=close, name=f"sessiondb-{self._name}-close",
                         daemon=True).start()
        await asyncio.shield(asyncio.wrap_future(done))


def _after_fork_in_child() -> None:
    for worker in list(_WORKERS):
        # The parent's threads do not exist here, and a lock one of them held stays held.
        worker._reset_locks()
        worker._pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


async def settled(call: Awaitable[T]) -> T:
    """Await ``call`` to its end even if the caller is cancelled meanwhile, then raise
    the cancellation: a cancelled write must not return while its transaction may still
    commit. Shielding alone would return at once and leave the outcome unknown.

    :returns: what ``call`` returned, if the caller was not cancelled.
    :raises asyncio.CancelledError: the caller was cancelled (``call`` has ended).
    """
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
