"""A LangGraph checkpointer on sessiondb: many processes, one thread, no "database is
locked", on SQLite or PostgreSQL (``pip install 'sessiondb[langgraph]'``)::

    from sessiondb.adapters.langgraph import SessionDBSaver

    with SessionDBSaver("state.db") as checkpointer:       # or a postgresql:// URL
        graph = builder.compile(checkpointer=checkpointer)
        graph.invoke(inputs, {"configurable": {"thread_id": "chat-1"}})

:class:`SessionDBSaver` is a :class:`~langgraph.checkpoint.base.BaseCheckpointSaver`,
sync and async in one class (as LangGraph's ``InMemorySaver``): ``put``, ``put_writes``,
``get_tuple``, ``list``, ``delete_thread``, ``copy_thread``, ``delete_for_runs``,
``prune`` and their ``a``-prefixed coroutines. It passes LangGraph's conformance suite
(``langgraph-checkpoint-conformance``), every capability, on both databases.

**What is stored where.** A thread is a sessiondb session (id = ``thread_id``, source
``"langgraph"``), created by the thread's first write, so ``sessiondb list`` and ``show``
list it and ``delete_session`` (or ``prune_sessions``, once the session is ended) removes
its checkpoints with it. Checkpoints, channel values and pending writes do not fit the
message model: they live in the adapter's tables (:mod:`.langgraph_sql`), and the
session carries no messages (a checkpoint's ``messages`` channel is a value LangGraph
rewrites, forks and replays, not an append-only transcript).

**Writes.** Each call is one transaction through the store's write path: the thread's
lock first (concurrent writers of one thread queue, on PostgreSQL too), then its rows;
a call that fails writes nothing. Pending writes follow LangGraph's SQLite saver: a batch
of special writes only (errors, interrupts, resumes) replaces the same task's, any
other batch keeps what is there.

**Async.** The coroutines run the store's calls on worker threads of the saver (one on
SQLite, whose one connection serializes them anyway; on PostgreSQL one per connection
of the store's pool), never on the event loop, and not on the loop's default executor,
which a burst of checkpoints waiting for the write lock would take from the
application; with an :class:`~sessiondb.AsyncSessionDB`, on its worker thread (see
:mod:`sessiondb.adapters.worker`). A store given as a path is opened, and the adapter's
tables made, at the first call, on the thread that makes it: a saver constructed inside
a coroutine does no I/O. A cancelled coroutine's write still completes (all or
nothing) before the cancellation is raised; a cancelled read that has not started is
skipped.
"""

from __future__ import annotations

import json
import os
import random
from contextlib import contextmanager
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP, BaseCheckpointSaver, ChannelVersions, Checkpoint, CheckpointMetadata,
    CheckpointTuple, SerializerProtocol, get_serializable_checkpoint_metadata,
    writes_sort_key,
)

from ..aio import AsyncSessionDB
from ..errors import InvalidArgument, InvalidArgumentType
from ..store import SessionDB
from ..text import check_id, check_text
from . import langgraph_config as cfg, langgraph_sql as q
from .tables import ensure_tables
from .worker import StoreArg, Worker

__all__ = ["SessionDBSaver"]

_PAGE = 50  # checkpoints read per transaction while listing: short reads, bounded memory
_STRATEGIES = ("keep_latest", "delete")


def _prepare(db: SessionDB) -> None:
    ensure_tables(db, q.TABLES)


class _Query:
    """A ``list`` call in progress: its filters and where the next page starts."""

    def __init__(self, thread_id: str | None, ns: str | None, checkpoint_id: str | None,
                 before: str | None, metadata: Mapping[str, Any], limit: int | None) -> None:
        self.thread_id, self.ns, self.checkpoint_id = thread_id, ns, checkpoint_id
        self.before, self.metadata, self.remaining = before, metadata, limit
        self.after: tuple[str, str, str] | None = None
        self.done = limit == 0


class SessionDBSaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer storing threads in a sessiondb store (see the module
    docstring for what is stored where).

    :param db: a store path or ``postgresql://`` URL (None: sessiondb's default store),
        which the saver opens at its first call and closes (``close()``, ``with``,
        ``async with``); or an open :class:`~sessiondb.SessionDB` or
        :class:`~sessiondb.AsyncSessionDB`, which stays the caller's to close (with an
        ``AsyncSessionDB`` every call, sync or async, runs on its worker thread).
    :param serde: LangGraph's serializer (default: its ``JsonPlusSerializer``).
    :param source: the source of the sessions the saver creates (default ``"langgraph"``).
    :param options: options of :class:`~sessiondb.SessionDB`, when ``db`` is a path.
    :raises InvalidArgumentType: ``db`` is none of these.
    :raises ConfigurationError: ``options`` given with an open store.

    A path that cannot be opened as a store raises ``DatabaseOpenError`` at the first
    call, as ``SchemaTooNewError`` does for tables written by a newer sessiondb.
    """

    def __init__(self, db: StoreArg, *, serde: SerializerProtocol | None = None,
                 source: str = "langgraph", **options: Any) -> None:
        super().__init__(serde=serde)
        self.source = check_id("source", source)
        # Shared by the copies LangGraph makes of the saver (compile() may call
        # with_allowlist, which copies it): one store and one set of threads.
        self._worker = Worker(db, options, name="SessionDBSaver", prepare=_prepare)

    @classmethod
    @contextmanager
    def from_conn_string(cls, conn_string: "str | os.PathLike[str]", *,
                         serde: SerializerProtocol | None = None, source: str = "langgraph",
                         **options: Any) -> Iterator["SessionDBSaver"]:
        """A saver on the store at ``conn_string`` (a path or a ``postgresql://`` URL),
        closed when the block ends; as ``SqliteSaver.from_conn_string``."""
        saver = cls(conn_string, serde=serde, source=source, **options)
        try:
            yield saver
        finally:
            saver.close()

    @property
    def db(self) -> SessionDB | AsyncSessionDB:
        """The store (for ``get_session``, ``list_sessions``, ...): the ``SessionDB``,
        opened now if the saver owns it and has not opened it yet; or the
        ``AsyncSessionDB`` it was given.

        :raises ClosedError: the saver was closed (its calls all raise it then, even on
            a store that stays open)."""
        return self._worker.store()

    def close(self) -> None:
        """Refuse calls from now on, wait for the coroutines' calls in progress, stop
        the worker threads and close the store if the saver opened it. Idempotent."""
        self._worker.close()

    def __enter__(self) -> "SessionDBSaver":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "SessionDBSaver":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._worker.aclose()

    def __repr__(self) -> str:
        return f"SessionDBSaver({self._worker.target!r}, source={self.source!r})"

    # -- reads --------------------------------------------------------------------------
    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names (``checkpoint_id``), else the thread's latest
        in its namespace; None if there is none.

        :raises InvalidArgument: no ``thread_id`` in ``config["configurable"]``.
        :raises InvalidArgumentType: ``config`` or one of its ids has the wrong type.
        """
        found = self._worker.call(self._next_page, _lookup(config))
        return found[0] if found else None

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first (by checkpoint id): of the thread, namespace and
        checkpoint ``config`` names (each optional; ``None``: every thread), whose
        metadata has every ``filter`` item, older than ``before``'s checkpoint, at most
        ``limit``. Read in pages of 50, each one short read.

        :raises InvalidArgument: a negative ``limit``.
        :raises InvalidArgumentType: an argument has the wrong type.
        """
        query = self._query(config, filter, before, limit)

        def pages() -> Iterator[CheckpointTuple]:
            while not query.done:
                yield from self._worker.call(self._next_page, query)

        return pages()

    def _query(self, config: RunnableConfig | None, filter: Any, before: Any,
               limit: Any) -> _Query:
        conf = cfg.configurable(config) if config is not None else {}
        if filter is not None and not isinstance(filter, Mapping):
            raise InvalidArgumentType(f"filter must be a dict, not {type(filter).__name__}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise InvalidArgumentType("limit must be an int or None, not "
                                      f"{type(limit).__name__}")
        if limit is not None and limit < 0:
            raise InvalidArgument(f"limit must not be negative, got {limit}")
        older = cfg.checkpoint_id(cfg.configurable(before)) if before is not None else None
        return _Query(cfg.thread_id(conf, required=False), cfg.namespace(conf, default=None),
                      cfg.checkpoint_id(conf), older, filter or {}, limit)

    def _next_page(self, db: SessionDB, query: _Query) -> list[CheckpointTuple]:
        """Read the query's next page (one read transaction), advance it, and return its
        checkpoints that pass the metadata filter."""
        size = _PAGE if query.remaining is None or query.metadata else min(
            _PAGE, query.remaining)
        sql = db._sql

        def read(conn: Any) -> tuple[list, list, q.Loaded]:
            rows = q.page(conn, thread_id=query.thread_id, ns=query.ns,
                          checkpoint_id=query.checkpoint_id, before=query.before,
                          after=query.after, size=size)
            kept = [r for r in rows if cfg.matches(json.loads(r[6]), query.metadata)]
            kept = kept if query.remaining is None else kept[:query.remaining]
            return rows, kept, q.load(conn, sql, kept)

        rows, kept, loaded = db._read(read, snapshot=True)
        if rows:
            query.after = (rows[-1][2], rows[-1][0], rows[-1][1])
        if query.remaining is not None:
            query.remaining -= len(kept)
        query.done = len(rows) < size or query.remaining == 0
        return [self._tuple(row, loaded) for row in kept]

    def _tuple(self, row: q.CheckpointRow, loaded: q.Loaded) -> CheckpointTuple:
        thread_id, ns, checkpoint_id, parent, type_, blob, metadata, _ = row
        checkpoint = self.serde.loads_typed((type_, bytes(blob)))
        values = {}
        for channel, version in checkpoint["channel_versions"].items():
            stored = loaded.blobs.get((thread_id, ns, channel, str(version)))
            if stored is not None and stored[0] != "empty":
                values[channel] = self.serde.loads_typed((stored[0], bytes(stored[1] or b"")))
        checkpoint["channel_values"] = values
        writes = sorted(loaded.writes.get((thread_id, ns, checkpoint_id), ()),
                        key=lambda w: writes_sort_key(w[4], w[0], w[5]))
        return CheckpointTuple(
            config=cfg.config(thread_id, ns, checkpoint_id),
            checkpoint=checkpoint,
            metadata=json.loads(metadata),
            parent_config=cfg.config(thread_id, ns, parent) if parent else None,
            pending_writes=[
                (task_id, channel, self.serde.loads_typed((type_, bytes(value or b""))))
                for task_id, channel, type_, value, _, _ in writes],
        )

    # -- writes -------------------------------------------------------------------------
    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        """Store a checkpoint, the values of the channels in ``new_versions`` and its
        metadata; ``config``'s ``checkpoint_id`` is its parent.

        :returns: the config naming the stored checkpoint.
        :raises InvalidArgument: no ``thread_id``, or a checkpoint without an ``id``.
        :raises InvalidArgumentType: metadata that is not JSON-serializable, or an
            argument of the wrong type.
        """
        return self._worker.call(self._put, config, checkpoint, metadata, new_versions)

    def _put(self, db: SessionDB, config: RunnableConfig, checkpoint: Checkpoint,
             metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        conf = cfg.configurable(config)
        thread_id, ns = cfg.thread_id(conf), cfg.namespace(conf)
        parent = cfg.checkpoint_id(conf)
        if not isinstance(checkpoint, Mapping) or not isinstance(new_versions, Mapping):
            raise InvalidArgumentType("checkpoint must be a Checkpoint dict and new_versions "
                                      "a dict of channel versions")
        if not isinstance(checkpoint.get("id"), str) or not checkpoint["id"]:
            raise InvalidArgument("checkpoint must have a non-empty 'id' (str)")
        stored = dict(checkpoint)
        values = stored.pop("channel_values", None) or {}
        versions = {str(k): str(v) for k, v in (stored.get("channel_versions") or {}).items()}
        blobs = [(thread_id, ns, channel, str(version),
                  *(self.serde.dumps_typed(values[channel]) if channel in values
                    else ("empty", None)))
                 for channel, version in new_versions.items()]
        meta = get_serializable_checkpoint_metadata(config, metadata)
        try:
            meta_json = json.dumps(meta)
        except (TypeError, ValueError) as exc:
            raise InvalidArgumentType(f"checkpoint metadata must be JSON-serializable: "
                                      f"{exc}") from None
        run_id = meta.get("run_id")
        row = (thread_id, ns, checkpoint["id"], parent, *self.serde.dumps_typed(stored),
               meta_json, json.dumps(versions))
        sql = db._sql
        db._execute_write(lambda conn: q.put_checkpoint(
            conn, sql, self.source, row, None if run_id is None else str(run_id), blobs))
        return cfg.config(thread_id, ns, checkpoint["id"])

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        """Store a task's pending writes on the checkpoint ``config`` names.

        :raises InvalidArgument: no ``thread_id`` or ``checkpoint_id`` in ``config``.
        :raises InvalidArgumentType: a write is not a ``(channel, value)`` pair.
        """
        self._worker.call(self._put_writes, config, writes, task_id, task_path)

    def _put_writes(self, db: SessionDB, config: RunnableConfig,
                    writes: Sequence[tuple[str, Any]], task_id: str, task_path: str) -> None:
        conf = cfg.configurable(config)
        thread_id, ns = cfg.thread_id(conf), cfg.namespace(conf)
        checkpoint_id = cfg.checkpoint_id(conf)
        if checkpoint_id is None:
            raise InvalidArgument("put_writes needs config['configurable']['checkpoint_id']: "
                                  "the checkpoint the writes belong to")
        task_id = check_id("task_id", task_id)
        task_path = check_text("task_path", task_path) or ""
        rows = []
        for idx, write in enumerate(writes):
            if not isinstance(write, (tuple, list)) or len(write) != 2 \
                    or not isinstance(write[0], str):
                raise InvalidArgumentType(f"writes[{idx}] must be a (channel, value) pair "
                                          "with a str channel")
            channel, value = write
            rows.append((thread_id, ns, checkpoint_id, task_id,
                         WRITES_IDX_MAP.get(channel, idx), channel,
                         *self.serde.dumps_typed(value), task_path))
        if not rows:
            return
        replace = all(row[5] in WRITES_IDX_MAP for row in rows)
        sql = db._sql
        db._execute_write(lambda conn: q.put_writes(conn, sql, self.source, thread_id, rows,
                                                    replace))

    def delete_thread(self, thread_id: str) -> None:
        """Delete the thread's checkpoints and writes, in every namespace, and its
        session if the saver created it and it holds nothing else (no message, no child
        session); a thread that does not exist is no error."""
        self._worker.call(self._delete_thread, thread_id)

    def _delete_thread(self, db: SessionDB, thread_id: str) -> None:
        thread_id = cfg.one_id("thread_id", thread_id)
        sql = db._sql
        db._execute_write(lambda conn: q.delete_thread(conn, sql, self.source, thread_id))

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint (all namespaces, the whole parent chain) and pending
        write of one thread to another, in one transaction; rows the target already has
        are kept. A source with no checkpoints copies nothing (and creates no session)."""
        self._worker.call(self._copy_thread, source_thread_id, target_thread_id)

    def _copy_thread(self, db: SessionDB, source_thread_id: str,
                     target_thread_id: str) -> None:
        source_id = cfg.one_id("source_thread_id", source_thread_id)
        target_id = cfg.one_id("target_thread_id", target_thread_id)
        sql = db._sql
        db._execute_write(lambda conn: q.copy_thread(conn, sql, self.source, source_id,
                                                     target_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints whose metadata ``run_id`` is one of ``run_ids``, with
        their writes (LangGraph's DeltaChannel warning applies: a live thread's delta
        channels rebuilt from them lose those writes)."""
        self._worker.call(self._delete_for_runs, run_ids)

    def _delete_for_runs(self, db: SessionDB, run_ids: Sequence[str]) -> None:
        runs = cfg.ids("run_ids", run_ids)
        if runs:
            sql = db._sql
            db._execute_write(lambda conn: q.delete_for_runs(conn, sql, runs))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep each namespace's latest checkpoint of each thread (and
        the ancestors its delta channels are rebuilt from, if any); ``"delete"``: delete
        the threads as :meth:`delete_thread` does. One transaction per thread.

        :raises InvalidArgument: an unknown strategy.
        """
        self._worker.call(self._prune, thread_ids, strategy)

    def _prune(self, db: SessionDB, thread_ids: Sequence[str], strategy: str) -> None:
        threads = cfg.ids("thread_ids", thread_ids)
        if strategy not in _STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
        sql = db._sql
        for thread_id in threads:
            if strategy == "delete":
                db._execute_write(lambda conn: q.delete_thread(
                    conn, sql, self.source, thread_id))
            else:
                db._execute_write(lambda conn: q.keep_latest(conn, sql, thread_id))

    def get_next_version(self, current: str | None, channel: None) -> str:
        """The next version of a channel: the count, then a random part, so that two
        forks of one checkpoint never give one version two values (as LangGraph's own
        savers do)."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    # -- the coroutines: the same calls on the worker threads ---------------------------
    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """:meth:`get_tuple`, off the event loop."""
        found = await self._worker.run(self._next_page, _lookup(config))
        return found[0] if found else None

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None
                    ) -> AsyncIterator[CheckpointTuple]:
        """:meth:`list`, each page read off the event loop."""
        query = self._query(config, filter, before, limit)
        while not query.done:
            for item in await self._worker.run(self._next_page, query):
                yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        """:meth:`put`, off the event loop."""
        return await self._worker.write(self._put, config, checkpoint, metadata,
                                        new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        """:meth:`put_writes`, off the event loop."""
        await self._worker.write(self._put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        """:meth:`delete_thread`, off the event loop."""
        await self._worker.write(self._delete_thread, thread_id)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """:meth:`copy_thread`, off the event loop."""
        await self._worker.write(self._copy_thread, source_thread_id, target_thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """:meth:`delete_for_runs`, off the event loop."""
        await self._worker.write(self._delete_for_runs, run_ids)

    async def aprune(self, thread_ids: Sequence[str], *,
                     strategy: str = "keep_latest") -> None:
        """:meth:`prune`, off the event loop."""
        await self._worker.write(self._prune, thread_ids, strategy)


def _lookup(config: RunnableConfig) -> _Query:
    """The query of ``get_tuple``: the checkpoint ``config`` names, else the latest."""
    conf = cfg.configurable(config)
    return _Query(cfg.thread_id(conf), cfg.namespace(conf), cfg.checkpoint_id(conf), None,
                  {}, 1)
