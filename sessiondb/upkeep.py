"""Export, import, prune and the search index: the part of :class:`~sessiondb.SessionDB`
that moves many rows, each operation as a series of short write transactions
(:mod:`sessiondb.maintenance`). Written over the instance's engine and dialect, like the
rest of the rules (:mod:`sessiondb.backend`)."""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Sequence

from . import bulk, export, fts_merge, pruning, search_index
from .backend import Dialect, Engine
from .errors import ConfigurationError, InvalidArgument, InvalidArgumentType
from .maintenance import ProgressCallback, Tracker, check_progress, step_budget
from .schema import index_prefixes
from .text import check_cost, check_flag, check_text
from .vacuum import Vacuum


class Upkeep:
    """Export, import, prune, reclaim and rebuild (see the module docstring)."""

    _execute_write: Callable[..., Any]
    _read: Callable[..., Any]
    _run_steps: Callable[..., int]
    _sql: Dialect
    _engine: Engine
    path: Any
    checkpoint: Callable[..., Any]
    message_count: Callable[..., int]

    # -- export, import, prune ---------------------------------------------------------
    def export_session(self, session_id: str) -> dict[str, Any] | None:
        """The session and its messages as one JSON-ready dict, or None."""
        check_text("session_id", session_id, optional=False)
        return self._read(lambda c: export.export_session(c, session_id), snapshot=True)

    def iter_export(self, source: str | None = None) -> Iterator[dict[str, Any]]:
        """Every session (optionally of one source), oldest first, with its messages (as
        :meth:`export_session`), streamed: read in batches of up to 200 sessions or about
        5,000 messages, each in one short snapshot (a session is read with its messages;
        no read transaction is held while the caller works; inside a :meth:`snapshot`
        block all of it sees that snapshot). The first batch is read at the call.

        :raises InvalidArgumentType: ``source`` is not a str.
        """
        source = check_text("source", source)
        first = self._read(lambda c: export.export_batch(c, source, None, self._sql),
                           snapshot=True)
        return export.export_batches(self._read, source, first, self._sql)

    def export_all(self, source: str | None = None) -> list[dict[str, Any]]:
        """Every session (optionally of one source), oldest first, with its messages, as
        one list (:meth:`iter_export` streams them instead)."""
        return list(self.iter_export(source))

    def import_sessions(self, data: Any, *, skip_existing: bool = False,
                        progress: ProgressCallback | None = None,
                        read_in_thread: bool | None = None) -> int:
        """Import what the exports produced: a session dict, a list of them, or any
        iterable of them (a generator over a JSON Lines file), consumed in batches, in
        short write transactions while other processes keep writing, each committing
        whole sessions; then the deferred indexing, in steps (:mod:`sessiondb.bulk`:
        message ids, parents, conflicts midway). If interrupted, what was committed stays
        and a rerun with ``skip_existing=True`` finishes the job. A dict or list is
        checked as a whole before anything is written. In a :meth:`transaction` block
        the input is read first and written as one call.

        :param progress: called after each step: task ``"import"`` (``"messages"``),
            then ``"index"``.
        :param read_in_thread: read and validate a stream in a thread of its own, beside
            the writes, through a staging file in the temporary directory
            (:mod:`sessiondb.bulk_stage`; SQLite, outside a :meth:`transaction` block;
            ignored otherwise). None (the default) does so for the iterator
            :func:`sessiondb.jsonstream.read_items` returns, which only reads its file;
            pass True for another iterable that another thread may consume, False to
            read in the caller's thread.
        :returns: number of sessions imported.
        :raises IntegrityViolation: a session already exists (unless ``skip_existing``),
            a parent is neither in the store nor in the import, or a title is taken.
        :raises InvalidArgument: a value the store will not accept.
        :raises InvalidArgumentType: ``data`` or a value in it has the wrong type.
        """
        check_flag("skip_existing", skip_existing)
        if read_in_thread is not None:
            check_flag("read_in_thread", read_in_thread)
        progress = check_progress(progress)
        if self._engine.in_transaction:
            return bulk.import_in_block(data, sql=self._sql, write=self._execute_write,
                                        skip_existing=skip_existing, progress=progress)
        with self._sql.import_context(self._read):
            return bulk.import_sessions(
                data, sql=self._sql, write=self._execute_write, read=self._read,
                budget=step_budget(self._engine.hold_timeout),
                between=self._engine.between_steps, skip_existing=skip_existing,
                progress=progress, index=self._index_pending, read_in_thread=read_in_thread)

    def prune_sessions(self, older_than_days: float = 90, source: str | None = None, *,
                       dry_run: bool = False, progress: ProgressCallback | None = None
                       ) -> int:
        """Delete ended sessions started more than ``older_than_days`` ago, with their
        messages, and give the space back (:meth:`reclaim_space`). Active sessions are
        never pruned; neither is a session that a remaining session names as its parent.

        It runs as a series of short write transactions (:mod:`sessiondb.maintenance`),
        so other processes keep writing meanwhile, and each leaves the store consistent:
        a session goes with all its messages at once (one with more than 2,000 messages
        or 4 MB of content loses them oldest first, a chunk at a time, counters exact at
        every step). If it
        is interrupted, what was deleted stays deleted and a rerun finishes the job.
        Inside a :meth:`transaction` block it runs within that transaction.

        :param dry_run: only count what would be deleted; nothing is written.
        :param progress: called with a :class:`~sessiondb.maintenance.Progress` (task
            ``"prune"``, rows: sessions plus messages) after each step, then by
            :meth:`reclaim_space`.
        :returns: number of sessions deleted (or, with ``dry_run``, that would be).
        """
        days = check_cost("older_than_days", older_than_days)
        if days is None:
            raise InvalidArgument("older_than_days is required")
        source = check_text("source", source)
        dry_run = check_flag("dry_run", dry_run)
        progress = check_progress(progress)
        cutoff = time.time() - days * 86400
        sessions, messages = self._read(lambda c: pruning.count(c, cutoff, source),
                                        snapshot=True)
        if dry_run or not sessions:
            return sessions
        deleted = pruning.Tally()
        # The pages are given back as the deletions free them (sessiondb.vacuum: a long
        # freelist makes every page slow to give back).
        vacuum = Vacuum() if self._sql.reclaims_space else None
        with self._reclaim_context():
            self._run_steps(pruning.prune_step(cutoff, source, deleted, self._sql, vacuum),
                            Tracker("prune", "rows", sessions + messages, progress),
                            committed=deleted.commit)
        self.reclaim_space(progress=progress)
        return deleted.total

    def reclaim_space(self, *, progress: ProgressCallback | None = None) -> dict[str, int]:
        """Give the pages that deletions freed back to the file system, in short steps
        (``PRAGMA incremental_vacuum``; no VACUUM holding the lock for minutes), then
        checkpoint so that the file shrinks. Stores that sessiondb created shrink; a
        converted hermes-agent file (made without incremental auto-vacuum) keeps its
        size and reuses the free pages for new data.

        :param progress: called after each step (task ``"reclaim"``, unit ``"pages"``).
        On PostgreSQL there is nothing to do in steps: autovacuum makes the space of
        deleted rows reusable (``VACUUM FULL`` would lock the tables); the sizes are
        the store's tables with their indexes.

        :returns: ``freed_pages``, ``bytes_before`` and ``bytes_after`` (database file).
        """
        progress = check_progress(progress)
        if not self._sql.reclaims_space:  # PostgreSQL: the server's autovacuum does it
            size = self._read(self._sql.store_bytes)
            return {"freed_pages": 0, "bytes_before": size, "bytes_after": size}
        before = _file_size(self.path)
        free = self._read(lambda c: int(c.pragma("freelist_count")))
        vacuum = Vacuum()
        with self._reclaim_context():
            freed = self._run_steps(pruning.reclaim_step(vacuum),
                                    Tracker("reclaim", "pages", free, progress))
        if freed and not self._engine.in_transaction:
            self.checkpoint()
        return {"freed_pages": freed, "bytes_before": before,
                "bytes_after": _file_size(self.path)}

    def optimize_search_index(self, *, progress: ProgressCallback | None = None) -> int:
        """Merge each sealed table of the full-text index into one segment, in short
        steps while other processes keep writing (:mod:`sessiondb.fts_merge`): a search
        that runs a query per range of ids (a rare source's) then looks each word up
        once per table. Worth running after a large import, a rebuild or a prune; a
        table already in one segment is skipped, and one cut short is finished. Each
        table's pages are read first, outside the write lock. The newest table, which
        takes every new message, is left to FTS5's own merges. Nothing on PostgreSQL,
        or while the index is damaged or being rebuilt.

        :param progress: called after each step (task ``"merge"``, unit ``"pages"``:
            the index pages merged, about; the total is those of the tables to merge).
        :returns: the pages merged (about).
        :raises ConfigurationError: inside a ``transaction()`` or ``snapshot()`` block.
        """
        progress = check_progress(progress)
        if self._engine.in_transaction:
            raise ConfigurationError("optimize_search_index() runs in steps of its own: "
                                     "call it outside transaction() and snapshot() blocks")
        if not self._sql.defers_index:  # PostgreSQL: a GIN index has no segments
            return int(self._read(lambda c: 0))  # (ClosedError on a closed instance)
        todo = self._read(fts_merge.due)
        total = self._read(lambda c: sum(fts_merge.pages(c, t) for t in todo))
        tracker = Tracker("merge", "pages", total, progress)
        for table in todo:
            if table not in self._read(fts_merge.due):  # a rebuild began, or done by another
                continue
            self._read(lambda c: fts_merge.warm(c, table))  # noqa: B023 (called now)
            self._run_steps(fts_merge.merge_step(table), tracker)
        return tracker.done

    def _reclaim_context(self) -> Any:
        """A larger page cache while pages are given back: moving a page reads the
        freelist's trunk pages and the pointer-map pages around the whole file, which
        SQLite's default cache of 2 MB keeps evicting (measured: twice as slow)."""
        if not self._sql.reclaims_space:
            return nullcontext()
        return bulk.larger_cache(self._read, bulk.RECLAIM_CACHE_KIB)

    def rebuild_search_index(self, *, prefixes: Sequence[int] | None = None,
                             progress: ProgressCallback | None = None) -> int:
        """Rebuild the full-text index from the messages (which are only read), in short
        steps while other processes keep writing; clears a damage mark
        (:mod:`sessiondb.search_index`). Searches raise
        :class:`~sessiondb.errors.SearchIndexError` until it is done. If a rebuild was
        cut short (a crash, a kill), this finishes it instead of starting again (unless
        its new index was found damaged meanwhile); it also indexes messages a bulk
        import left pending.

        :param prefixes: give the index FTS5 prefix indexes of these lengths (e.g.
            ``(2, 3, 4)``: a prefix query ``dep*`` of 2-4 letters then answers in
            milliseconds on any store, for an index about 3.5 times larger and writes
            that index a message about 4 times slower); ``()`` removes them; None
            (default) keeps what the index has. A change starts a new rebuild.
        :param progress: called after each step (task ``"index"``, unit ``"messages"``;
            then ``"cleanup"`` while the old index is removed).
        :returns: the number of messages indexed.
        :raises InvalidArgument: a prefix length outside 1-20 (on PostgreSQL: any).
        """
        progress = check_progress(progress)
        wanted = _check_prefixes(prefixes)
        if not self._sql.defers_index:
            # PostgreSQL: the search column is generated with each row and its GIN index
            # answers prefix queries; nothing is ever pending (doctor --repair rebuilds
            # an index the server marks invalid).
            if wanted:
                raise InvalidArgument("prefix indexes are a SQLite (FTS5) option; "
                                      "PostgreSQL's index answers prefix queries as it is")
            return self.message_count()
        if wanted is not None and wanted != self._read(index_prefixes):
            self._execute_write(lambda c: search_index.begin_rebuild(
                c, "a rebuild was requested", wanted), bounded=False)
        elif (self._read(search_index.rebuilding) is None
              or self._read(search_index.damage_note) is not None):
            # A rebuild cut short is finished, unless a write has found its new index
            # damaged since (the triggers skip a damaged index: finishing it would
            # leave it incomplete). Unbounded: an index too damaged to set aside is
            # dropped in one statement.
            self._execute_write(lambda c: search_index.begin_rebuild(
                c, "a rebuild was requested"), bounded=False)
        return self._index_pending(progress)

    def _index_pending(self, progress: ProgressCallback | None) -> int:
        if not self._sql.defers_index:
            return 0
        total = self._read(search_index.pending_total)
        return search_index.catch_up(self._run_steps, progress, total)


def _check_prefixes(prefixes: Any) -> tuple[int, ...] | None:
    if prefixes is None:
        return None
    if isinstance(prefixes, (str, bytes)) or not isinstance(prefixes, (list, tuple, set,
                                                                         frozenset)):
        raise InvalidArgumentType("prefixes must be a list of ints (e.g. [2, 3, 4]), not "
                                  f"{type(prefixes).__name__}")
    for n in prefixes:
        if isinstance(n, bool) or not isinstance(n, int):
            raise InvalidArgumentType(f"prefixes must hold ints, not {type(n).__name__}")
        if not 1 <= n <= 20:
            raise InvalidArgument(f"a prefix index length must be 1 to 20, got {n}")
    return tuple(sorted(set(prefixes)))


def _file_size(path: Any) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
