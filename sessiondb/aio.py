"""``AsyncSessionDB``: the session API for asyncio, with SQLite kept off the event loop.

A gateway serving many connections from one event loop must never wait on SQLite: a write
can queue for the write lock behind other processes for as long as ``write_timeout``, and
every coroutine of the loop would wait with it. :class:`AsyncSessionDB` owns one
:class:`~sessiondb.SessionDB` and one worker thread; every call is a job on that thread's
queue, and the coroutine awaits its result while the loop goes on (#5)::

    async with AsyncSessionDB("state.db") as db:
        await db.create_session("s-1", "gateway")
        mid = await db.append_message("s-1", "user", "hello")

One thread, not a pool: calls run one at a time, in the order they were *made* (a call
is queued when the method is called, not when its result is first awaited, so
``asyncio.create_task(db.create_session(...))`` followed by ``await db.append_message(...)``
runs in that order), and ``await db.run(fn)`` can
group several calls atomically without any lock of ours. SQLite would serialize the
calls of one connection anyway; a pool would only add threads waiting on the instance
lock. The methods are generated from :class:`~sessiondb.SessionDB`'s public methods when
this module is imported, so each has the same name, parameters, docstring, return value
and typed exceptions, awaitable.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import itertools
import os
import queue
import threading
import warnings
import weakref
from typing import (
    TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable, Coroutine, TypeVar,
)

from .bounded import Heartbeat
from .errors import ClosedError, ConfigurationError, SessionDBError
from .store import SessionDB

__all__ = ["AsyncSessionDB", "AsyncHeartbeat"]

T = TypeVar("T")

# Not wrapped: context managers (a block cannot span awaits, see AsyncSessionDB.transaction;
# use run() instead), close, heartbeat and iter_export (AsyncSessionDB has its own).
_NOT_WRAPPED = frozenset({"close", "transaction", "snapshot", "heartbeat", "iter_export"})

_Job = tuple[concurrent.futures.Future, Callable[[], Any]]


def _is_context_manager(fn: Callable[..., Any]) -> bool:
    return inspect.isgeneratorfunction(getattr(fn, "__wrapped__", None))


def _wrapped_methods() -> dict[str, Callable[..., Any]]:
    """SessionDB's public methods that become coroutines: plain functions only (never a
    property, classmethod or attribute), and no context manager."""
    out = {}
    for name in dir(SessionDB):
        member = inspect.getattr_static(SessionDB, name)
        if (name.startswith("_") or name in _NOT_WRAPPED or not inspect.isfunction(member)
                or _is_context_manager(member)):
            continue
        out[name] = member
    return out


def _awaitable(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: "AsyncSessionDB", *args: Any, **kwargs: Any) -> Coroutine[Any, Any, Any]:
        return self._submit(lambda db: getattr(db, name)(*args, **kwargs))

    call.__qualname__ = f"AsyncSessionDB.{name}"
    return call


class _Store:
    """What the worker thread shares with its instance: the store, once opened. The
    worker holds no reference to the instance, so an instance nobody closed can still
    be collected (its finalizer then closes the store and ends the thread)."""

    db: SessionDB | None = None


def _work(jobs: "queue.SimpleQueue[_Job | None]", exited: concurrent.futures.Future) -> None:
    """The worker thread: run jobs in queue order until the closing ``None``."""
    try:
        while (job := jobs.get()) is not None:
            future, fn = job
            del job  # hold no finished job (nor what it refers to) while waiting
            if future.set_running_or_notify_cancel():  # else: cancelled, skipped
                try:
                    future.set_result(fn())
                except StopIteration as exc:  # asyncio cannot carry it: the await hangs
                    future.set_exception(RuntimeError(f"the call raised StopIteration: "
                                                      f"{exc!r}"))
                except BaseException as exc:  # delivered to the awaiting coroutine
                    future.set_exception(exc)
            del future, fn
    finally:
        exited.set_result(None)


def _abandoned(jobs: "queue.SimpleQueue[_Job | None]", store: _Store, label: str) -> None:
    """Finalizer of an instance garbage-collected while open: close its store on the
    worker thread and end the thread."""
    warnings.warn(f"{label} was never closed; closing it now (use `async with` or "
                  "`await db.close()`)", ResourceWarning, stacklevel=2)
    jobs.put((concurrent.futures.Future(), lambda: store.db and store.db.close()))
    jobs.put(None)


class AsyncHeartbeat:
    """A :class:`~sessiondb.bounded.Heartbeat` for asyncio: the same attributes
    (``lost``, ``error``, ``holding``, ``check()``), and a ``stop()`` that is awaited,
    since stopping waits for a renewal in flight, which may wait for the write lock.
    ``on_lost`` is called on the heartbeat's thread: hand it to the loop with
    ``loop.call_soon_threadsafe``. Use ``async with await db.heartbeat(lease) as hb:``.
    """

    def __init__(self, heartbeat: Heartbeat) -> None:
        self._heartbeat = heartbeat

    def __getattr__(self, name: str) -> Any:
        return getattr(self._heartbeat, name)

    async def stop(self) -> None:
        """Stop renewing, without blocking the loop; idempotent."""
        await asyncio.to_thread(self._heartbeat.stop)

    async def __aenter__(self) -> "AsyncHeartbeat":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class AsyncSessionDB:
    """A :class:`~sessiondb.SessionDB` for asyncio: the same methods, awaitable, each run
    on this instance's one worker thread, in the order they were called (a call is queued
    at once and returns a coroutine that awaits its result).

    Open it with ``db = await AsyncSessionDB.open(path, **options)`` (then
    ``await db.close()``), or with ``async with AsyncSessionDB(path, **options) as db:``.
    The store itself is opened on the worker thread (opening touches files and may
    migrate the schema), so neither form blocks the event loop; the constructor alone
    opens nothing, and calls before opening raise :class:`~sessiondb.errors.ClosedError`.

    Any event loop, in any thread, may await the calls of one instance (one after
    another or at once): the queue is thread-safe and each result is delivered to the
    loop that awaits it.

    *Cancellation.* A cancelled call that the worker thread has not started yet when
    the cancellation reaches it (at the loop's next iteration) is skipped: it never runs.
    One that has started runs to completion on the worker thread, and its result or
    error is dropped. Either way every call is all or nothing: a write is one
    transaction, never half applied.

    *The GIL.* SQLite runs with the GIL released (apsw releases it around its SQLite
    calls, busy waits for the write lock included) and the write gate waits in the
    kernel, so waiting never holds the loop up. Python work on the worker thread does
    share the GIL with the loop: a call that is long in Python (``export_all`` of 20,000
    messages: 0.09 s) lets the loop run only every ``sys.getswitchinterval()`` (5 ms by
    default), and one C call never lets go: encoding or JSON-encoding a 20-million
    character message, or reading it back, held a loop up for 70-150 ms. Keep huge
    payloads out of a latency-critical loop, or lower the interval for the Python part.

    *Arguments* are used when the call runs on the worker thread, not when it is made: a
    dict changed by another coroutine meanwhile is stored changed. Pass copies.

    *Inside* ``run()`` *and* ``transaction()`` functions, use their ``db`` argument: a call
    of this instance from its own worker thread would wait for itself, so it raises
    :class:`~sessiondb.errors.ConfigurationError`. Keep those functions short and
    bounded; the one worker thread runs nothing else meanwhile (``asyncio.wait_for`` on a
    hung ``run()`` returns, but the thread stays in it).

    *Fork.* ``os.fork()`` (and multiprocessing's fork start method) waits for the call
    in progress, up to ``write_timeout``, and blocks the loop meanwhile; prefer spawn or
    ``asyncio.create_subprocess_exec``. The worker thread does not exist in a forked
    child; calls there raise :class:`~sessiondb.errors.ClosedError` and ``close()``
    returns at once, leaving the parent's store alone (open a new instance in the child).

    An instance garbage-collected while open is closed by a finalizer, with a
    ``ResourceWarning``.

    :param path: the database file, as for :class:`~sessiondb.SessionDB`.
    :param options: keyword options of :class:`~sessiondb.SessionDB` (``write_timeout``,
        ``hold_timeout``, ...).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self._args = (path, options)
        self._store = _Store()  # its db is touched on the worker thread only
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()  # makes "not closed, then enqueue" one step
        self._state = "new"  # new -> open -> closed
        self._pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._opened: concurrent.futures.Future | None = None
        self._exited: concurrent.futures.Future = concurrent.futures.Future()

    if TYPE_CHECKING:  # the generated methods (see the end of this module)
        def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]: ...

    @property
    def path(self) -> str | os.PathLike[str] | None:
        """The path this instance was given (the store's own ``path`` is resolved)."""
        return self._args[0]

    # -- lifecycle --------------------------------------------------------------------
    @classmethod
    async def open(cls, path: str | os.PathLike[str] | None = None,
                   **options: Any) -> "AsyncSessionDB":
        """Open a store on a new worker thread, without blocking the event loop.

        :param path: the database file, as for :class:`~sessiondb.SessionDB`.
        :param options: keyword options of :class:`~sessiondb.SessionDB`.
        :returns: the open instance; ``await db.close()`` when done.
        :raises DatabaseOpenError: the path cannot be opened as a store.
        :raises SchemaTooNewError: the store was written by a newer sessiondb.
        :raises ConfigurationError: an option is invalid.
        """
        db = cls(path, **options)
        await db._open()
        return db

    async def _open(self) -> None:
        with self._lock:
            if self._state == "closed":
                raise ClosedError(f"{self!r} is closed; open a new AsyncSessionDB")
            opener = self._opened is None
            if opener:
                self._thread = threading.Thread(target=_work, args=(self._jobs, self._exited),
                                                daemon=True, name=f"sessiondb-aio-{id(self):x}")
                self._opened = concurrent.futures.Future()
                path, options, store = *self._args, self._store
                self._jobs.put((self._opened,
                                lambda: setattr(store, "db", SessionDB(path, **options))))
                self._state = "open"
                self._finalizer = weakref.finalize(self, _abandoned, self._jobs, store,
                                                   repr(self))
                self._thread.start()  # waits only for the thread to be scheduled
        assert self._opened is not None
        try:
            # shield: a cancelled open must not skip the job that makes self._db
            await asyncio.shield(asyncio.wrap_future(self._opened))
        except BaseException:
            if opener:  # failed or cancelled: nobody else holds this instance; the close
                with contextlib.suppress(SessionDBError):  # job runs after the open job
                    await self.close()
            raise

    async def __aenter__(self) -> "AsyncSessionDB":
        await self._open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the store once every call issued before has run, then end the worker
        thread (joined without blocking the event loop). Idempotent; calls issued after
        it raise :class:`~sessiondb.errors.ClosedError`. Cancelling it does not stop it.

        :raises StorageError: closing the connection failed (the thread still ends).
        """
        self._refuse_on_worker("close()")
        with self._lock:
            first = self._state == "open" and os.getpid() == self._pid
            self._state = "closed"
            if self._finalizer is not None:
                self._finalizer.detach()
            if first:
                closed: concurrent.futures.Future = concurrent.futures.Future()
                store = self._store
                self._jobs.put((closed, lambda: store.db and store.db.close()))
                self._jobs.put(None)  # the worker's last job
        if self._thread is None or os.getpid() != self._pid:
            return  # never opened, or a fork child: the thread and store are the parent's
        await asyncio.shield(asyncio.wrap_future(self._exited))
        self._thread.join()  # at once: _exited is set by the thread's last statement
        if first:
            closed.result()  # raise what db.close() raised, to the first closer only

    def __repr__(self) -> str:
        path = self._args[0]
        return f"AsyncSessionDB({str(path) if path is not None else None!r}, {self._state})"

    # -- running work on the worker thread --------------------------------------------
    def _submit(self, fn: Callable[[SessionDB], T]) -> Coroutine[Any, Any, T]:
        """Queue ``fn(db)`` now, and return a coroutine that awaits its result (so the
        call may be awaited, handed to ``asyncio.create_task`` or to ``asyncio.run``).
        Cancelling the await skips the job if it has not started. An error found before
        queuing is raised where the call is awaited."""
        try:
            future = self._queue(fn)
        except SessionDBError as exc:
            future = concurrent.futures.Future()
            future.set_exception(exc)
        return _result(future)

    def _queue(self, fn: Callable[[SessionDB], T]) -> concurrent.futures.Future:
        self._refuse_on_worker("a call")
        future: concurrent.futures.Future = concurrent.futures.Future()
        store, label = self._store, repr(self)
        with self._lock:
            if self._state != "open":
                state = "not open" if self._state == "new" else "closed"
                raise ClosedError(f"{self!r} is {state}; open one with `await "
                                  "AsyncSessionDB.open(path)` or `async with "
                                  "AsyncSessionDB(path) as db`")
            if os.getpid() != self._pid:
                raise ClosedError(f"{self!r} was opened in process {self._pid}, whose worker "
                                  "thread does not exist in this forked child; open a new "
                                  "AsyncSessionDB here")
            self._jobs.put((future, lambda: fn(_opened(store, label))))
        return future

    def _refuse_on_worker(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise ConfigurationError(
                f"{what} of {self!r} from its own worker thread (inside a run() or "
                "transaction() function) would wait for itself; use the function's db "
                "argument instead")

    def run(self, fn: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        """Run ``fn(db, *args)`` on the worker thread, where ``db`` is the
        :class:`~sessiondb.SessionDB`, and return its result. No other call of this
        instance runs in between, so this is the way to do several things at once::

            def latest(db, sid):
                with db.snapshot():
                    return db.get_session(sid), db.get_messages(sid)

            session, messages = await adb.run(latest, "s-1")

        ``fn`` runs off the event loop: it must not touch the loop or await anything.

        :returns: what ``fn`` returned.
        :raises: whatever ``fn`` raised.
        """
        return self._submit(lambda db: fn(db, *args))

    def transaction(self, fn: Callable[..., T], *args: Any) -> Coroutine[Any, Any, T]:
        """Run ``fn(db, *args)`` inside ``db.transaction()`` on the worker thread: one
        atomic write of several calls (see :meth:`sessiondb.SessionDB.transaction`)::

            def turn(db, sid, text):
                db.append_message(sid, "assistant", text)
                db.update_token_counts(sid, output_tokens=120)

            await adb.transaction(turn, "s-1", "Done.")

        Not an ``async with`` block: the calls of every other coroutine share this
        instance's one thread and would run inside the open transaction (committed or
        rolled back with it), and the write lock would be held across awaits, blocking
        every other process for as long as the loop is busy elsewhere.

        :returns: what ``fn`` returned, once the transaction committed.
        :raises: whatever ``fn`` raised (the transaction is then rolled back), or the
            errors of ``transaction()`` (``WriteTimeout``, ``HoldTimeout``, ...).
        """
        def body(db: SessionDB) -> T:
            with db.transaction():
                return fn(db, *args)

        return self._submit(body)

    def heartbeat(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, AsyncHeartbeat]:
        """:meth:`sessiondb.SessionDB.heartbeat`, as an :class:`AsyncHeartbeat` (whose
        ``stop()`` is awaited)::

            async with await adb.heartbeat(lease) as hb:
                ...
        """
        return self._submit(lambda db: AsyncHeartbeat(db.heartbeat(*args, **kwargs)))


    async def iter_export(self, source: str | None = None
                          ) -> AsyncIterator[dict[str, Any]]:
        """:meth:`sessiondb.SessionDB.iter_export` as an async iterator: each batch of
        sessions is read on the worker thread, between the other calls (no read
        transaction is held in between)::

            async for session in adb.iter_export():
                ...
        """
        sessions = await self._submit(lambda db: db.iter_export(source))
        while True:
            batch = await self._submit(lambda db: list(itertools.islice(sessions, 50)))
            if not batch:
                return
            for session in batch:
                yield session


async def _result(future: concurrent.futures.Future) -> Any:
    return await asyncio.wrap_future(future)


def _opened(store: _Store, label: str) -> SessionDB:
    if store.db is None:  # the open job failed (its awaiter got the error)
        raise ClosedError(f"{label} failed to open; open a new AsyncSessionDB")
    return store.db


for _name, _method in _wrapped_methods().items():
    setattr(AsyncSessionDB, _name, _awaitable(_name, _method))
del _name, _method
