"""Bulk import: whole stores in, in short steps, with bounded memory (export, the way
out: :mod:`sessiondb.export`).

:func:`import_sessions` takes a session dict, a list of them, or any iterable
of them (a generator over a JSON Lines file). It writes a series of short write
transactions (as :mod:`sessiondb.maintenance` describes): a step takes as many sessions
as fit half the step budget at the rates (rows, and bytes of text) the last step ran,
at least one; a session goes in the same transaction as all its messages, so every
commit leaves the store consistent and a kill loses nothing already committed, and
``skip_existing=True`` makes a rerun finish the job. Between two steps the engine's
checkpoint runs and the lock stays free for a fifth of the step's length, as between
maintenance steps; a stream's next step's worth of sessions is read and validated
meanwhile, so about one step is held ahead of the writes. A stream that may be read in
another thread (``read_in_thread``; by default the iterator
:func:`sessiondb.jsonstream.read_items` returns) is read and validated by a staging
thread instead, beside the writes, at most :data:`sessiondb.bulk_stage.AHEAD_ROWS` rows
ahead (:mod:`sessiondb.bulk_stage`).

*Message ids* are kept where free (so a round trip into a fresh store is equal, ids
included). From the first message of a session that cannot keep its id (taken, or not
above the previous one), that message and the rest of its session get the next ids
AUTOINCREMENT would give, so the session keeps its order. The step assigns every id
itself, before it inserts, so that it can defer their full-text indexing
(:func:`sessiondb.search_index.defer_ids`): the triggers skip them, and the import
indexes them in steps once the rows are in. FTS5's tokenizer is the slowest part of an
insert; deferred, rows go in several times faster, while other writers' messages (ids
above the ranges) are indexed at once as always. A concurrent writer takes the ids just
above the store's last, which the rest of an export into a fresh store would have kept:
those messages then get new ones (content and order unchanged).

*Parents before children*: a list is reordered so that parents come first. A stream is
ordered within what is known: a child whose parent is neither in the store nor earlier
in the stream waits (at most :data:`WAITING_SESSIONS` sessions or
:data:`WAITING_MESSAGES` messages) until its parent arrives; one still waiting at the
end is refused with :class:`~sessiondb.errors.IntegrityViolation`, as is a stream that
makes more wait than that (exports list sessions oldest first, so a parent comes first
unless it started after its child). A session id twice in a list is refused before
anything is written; in a stream, twice within a batch likewise, and across batches
the second is "already exists" (skipped with ``skip_existing``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from . import bulk_stage, records, search_index
from .backend import Conn, Dialect
from .bulk_checks import (
    Read, Write, check_list, check_titles, missing_parent, present, refuse_cycle,
)
from .bulk_stage import Stage, Staged
from .jsonstream import Items
from .errors import (
    HoldTimeout, IntegrityViolation, InvalidArgument, InvalidArgumentType, SessionDBError,
)
from .maintenance import ProgressCallback, Tracker

#: Rows (messages plus one per session) within which a stream's session ids are checked
#: against each other (a repeat further apart is "already exists").
BATCH_MESSAGES = 20_000
#: Children that may wait for a parent later in a stream, and their messages.
WAITING_SESSIONS = 2_000
WAITING_MESSAGES = 20_000

#: KiB of page cache the connection gets while it imports (SQLite's default is 2,000):
#: a step dirties a few MB of pages, and with a small cache SQLite spills them to the
#: WAL before the commit, some several times (measured: 10-15% fewer rows per second).
IMPORT_CACHE_KIB = 16_384
#: KiB of page cache while free pages are given back (``reclaim_space``, a prune): the
#: freelist's trunk pages and the pointer-map pages of a 2 GB file fit in it.
RECLAIM_CACHE_KIB = 65_536

#: The most rows (sessions plus messages) one step takes, however fast they go in.
MAX_STEP_ROWS = 50_000
_FIRST_STEP_ROWS = 1_000       # the first step; later ones adapt to the time budget
_FIRST_STEP_BYTES = 1_000_000  # of message text (bytes counted as characters)
_STEP_SHARE = 0.5       # of the budget a step aims at, so that a slow one still fits
# After a step, the lock is left free for a fifth of the step's length, as run_steps
# does (sessiondb.maintenance): writers that bypass the gate poll for the lock with
# sleeps, and a step taken again the moment the last one ended would starve them. A
# stream's next sessions are read and validated meanwhile, so this costs it nothing.
_PAUSE_SHARE = 0.2
_INT64_MAX = 2**63 - 1
_MESSAGE_INSERT = (f"INSERT INTO messages ({', '.join(records.MESSAGE_COLUMNS)}) "
                   f"VALUES ({', '.join('?' * len(records.MESSAGE_COLUMNS))})")



# -- input ---------------------------------------------------------------------------

def source_of(data: Any) -> tuple[Optional[list[dict[str, Any]]], Optional[Iterator[Any]]]:
    """``(rows, None)`` for a dict or a list (validated at once, as a whole), else
    ``(None, iterator)`` for any other iterable, to be consumed lazily.

    :raises InvalidArgumentType: ``data`` is a str or bytes, or not iterable.
    :raises InvalidArgument: an invalid session in a dict or list.
    """
    if isinstance(data, (dict, list)):
        return records.check_import(data), None
    if isinstance(data, (str, bytes, bytearray, memoryview)) or not hasattr(data, "__iter__"):
        raise InvalidArgumentType("import data must be a session dict, a list of them or "
                                  f"an iterable of them, not {type(data).__name__}")
    return None, iter(data)


# -- one run of an import -------------------------------------------------------------

@dataclass
class _Outcome:
    """What one step did; applied to the run's state only once the step committed (a
    step may be retried, or rolled back, so it changes nothing but the store)."""

    taken: int = 0                   # sessions taken from the front of the queue
    imported: int = 0
    skipped: int = 0
    messages: int = 0
    size: int = 0                    # characters of message text written
    deferred: bool = False
    released: list[str] = field(default_factory=list)    # parents whose children went in
    waiting: list[dict[str, Any]] = field(default_factory=list)   # children to hold back
    seconds: float = 0.0             # the whole write: waiting, the step, the commit


class ImportRun:
    """The state of one import: the validated sessions waiting to be written, the
    children waiting for a parent, and the counts.

    :param write: runs a write function in one transaction (``_execute_write``).
    :param budget: seconds one step may hold the write lock.
    :param between: called after each step, outside the transaction (the engine's
        checkpoint between steps), or None.
    :param defer: defer full-text indexing of the imported messages.
    :param stream: hold back children whose parent is missing (a stream); else refuse
        them at once (a list: the parent is not coming).
    """

    def __init__(self, write: Write, budget: float, *, sql: Dialect, skip_existing: bool,
                 defer: bool, stream: bool, tracker: Tracker,
                 between: Optional[Callable[[], None]] = None) -> None:
        self.write, self.budget, self.between, self.sql = write, budget, between, sql
        self.skip_existing, self.defer, self.stream = skip_existing, defer, stream
        self.tracker = tracker
        self.stage: Optional[Stage] = None  # a stream read by a staging thread
        # (session row, its rows: itself and its messages, characters of its text)
        self.queue: deque[tuple[dict[str, Any], int, int]] = deque()
        self.queued = 0                  # rows (sessions + messages) in the queue
        self.waiting: dict[str, list[dict[str, Any]]] = {}
        self.waiting_sessions = self.waiting_messages = 0
        self.imported = self.skipped = 0
        self.deferred = False
        bounded = budget != float("inf")
        self.step_rows = min(_FIRST_STEP_ROWS, MAX_STEP_ROWS) if bounded else _INT64_MAX
        self.step_size = _FIRST_STEP_BYTES if bounded else _INT64_MAX
        self._free_until = 0.0           # the end of the pause after the last step

    def add(self, row: dict[str, Any]) -> None:
        rows = 1 + len(row["messages"])
        msgs = row["messages"]
        self.queue.append((row, rows, msgs.size if isinstance(msgs, Staged)
                           else records.text_size(msgs)))
        self.queued += rows

    def drain(self) -> None:
        """Write every queued session, a step (one transaction) at a time."""
        while self.queue:
            self.step()

    def step(self) -> None:
        """Write the sessions at the front of the queue that fit one step."""
        pause = self._free_until - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        started = time.monotonic()
        try:
            out: _Outcome = self.write(self._step)
        except HoldTimeout:
            # Rolled back, nothing written: the next try is smaller, unless this one
            # was a single session already (it cannot be split).
            if self.step_rows <= self.queue[0][1]:
                raise
            self.step_rows = max(1, self.step_rows // 4)
            self.step_size = max(1, self.step_size // 4)
            return
        out.seconds = time.monotonic() - started
        self._free_until = time.monotonic() + _PAUSE_SHARE * out.seconds
        if self.between is not None:
            self.between()
        self._apply(out)

    def finish(self) -> None:
        """After the input ended: the children still waiting get their last chance
        (their parent may have been created meanwhile), then are refused."""
        self.stream = False
        left = [r for rows in self.waiting.values() for r in rows]
        refuse_cycle(left, self.done_before())
        for row in records.parents_first(left):
            self.add(row)
        self.waiting.clear()
        self.waiting_sessions = self.waiting_messages = 0
        self.drain()

    # -- a step ------------------------------------------------------------------------
    def _step(self, conn: Conn) -> _Outcome:
        out = _Outcome()
        take, rows, size = [], 0, 0
        for row, row_rows, row_size in self.queue:
            take.append(row)
            rows += row_rows
            size += row_size
            if rows >= self.step_rows or size >= self.step_size:
                break
        out.taken = len(take)
        work = self._place(conn, take, out)
        check_titles(conn, self.sql, work, self.done_before())
        # A staged session's messages are known here by their ids only (bulk_stage).
        keys = [m for row in work for m in _keys(row)]
        if keys:
            keys = self.sql.assign_ids(conn, keys, _assign_ids)
            if self.defer:
                ids = sorted(m[0] for m in keys if m[0] is not None)
                out.deferred = search_index.defer_ids(conn, ids)
        messages, runs = self._messages(conn, work, keys)
        self._insert_sessions(conn, work)

        def insert() -> None:
            if messages:
                conn.executemany(_MESSAGE_INSERT, messages)
            if runs:
                bulk_stage.insert_messages(conn, runs)

        # Deferred, every id is pending: the triggers would only count the rows.
        if out.deferred and all(k[0] is not None for k in keys):
            search_index.insert_pending(conn, insert)
        else:
            insert()
        if keys:
            self.sql.ids_used(conn)
        out.imported, out.messages, out.size = len(work), len(keys), size
        return out

    def _messages(self, conn: Conn, work: list[dict[str, Any]], keys: list[tuple]
                  ) -> tuple[list[tuple], list[bulk_stage.Run]]:
        """The step's messages with their ids: as tuples to insert, and as runs of
        staging rows that the store's connection copies in SQL. On a connection the
        staging file is not attached to (opened again since), staged sessions take
        their rows back from the staging file."""
        messages: list[tuple] = []
        runs: list[bulk_stage.Run] = []
        attached = self.stage is not None and self.stage.attached(conn)
        at = 0
        for row in work:
            msgs = row["messages"]
            got = keys[at:at + len(msgs)]
            at += len(msgs)
            if not isinstance(msgs, Staged):
                messages.extend(got)
            elif attached:
                bulk_stage.add_run(runs, msgs, [k[0] for k in got])
            else:
                assert self.stage is not None
                messages.extend((k[0],) + m[1:] for k, m in zip(got, self.stage.fetch(msgs)))
        return messages, runs

    def _insert_sessions(self, conn: Conn, work: list[dict[str, Any]]) -> None:
        """Insert the step's sessions in their order (parents first): staged ones a
        run at a time, in SQL, when the staging file is attached to ``conn``."""
        stage = self.stage if self.stage is not None and self.stage.attached(conn) else None
        staged: list[int] = []
        for row in work:
            msgs = row["messages"]
            if stage is not None and isinstance(msgs, Staged):
                staged.append(msgs.session)
                continue
            if staged:
                assert stage is not None
                stage.insert_sessions(conn, staged)
                staged = []
            columns = [c for c in row if c != "messages"]
            conn.execute(f"INSERT INTO sessions ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' * len(columns))})", [row[c] for c in columns])
        if staged:
            assert stage is not None
            stage.insert_sessions(conn, staged)

    def _place(self, conn: Conn, take: list[dict[str, Any]], out: _Outcome
               ) -> list[dict[str, Any]]:
        """The sessions of this step in insertion order: existing ones skipped (or
        refused), children of missing parents held back (or refused), and children
        that were waiting for a session of this step right after it."""
        ids = {row["id"] for row in take}
        existing = present(conn, self.sql, list(ids))
        parents = {row.get("parent_session_id") for row in take} - {None}
        known = existing | present(conn, self.sql, list(parents - ids))  # in the store
        work: list[dict[str, Any]] = []
        held: dict[str, list[dict[str, Any]]] = {}  # this step's waiting, by parent
        todo = deque(take)
        while todo:
            row = todo.popleft()
            sid = row["id"]
            # A released child was not looked up with the step's sessions.
            if sid in known or (sid not in ids and present(conn, self.sql, [sid])):
                if not self.skip_existing:
                    done = self.done_before() if self.imported else (
                        "nothing was imported (pass skip_existing=True, or --skip-existing "
                        "to sessiondb import, to import only the new ones)")
                    raise IntegrityViolation(f"session {sid!r} already exists; {done}")
                out.skipped += 1
            else:
                parent = row.get("parent_session_id")
                if parent is not None and parent != sid and parent not in known:
                    if self.stream:
                        held.setdefault(parent, []).append(row)
                        continue
                    raise IntegrityViolation(
                        f"{missing_parent(sid, parent)}; {self.done_before()}")
                work.append(row)
            known.add(sid)
            # A session now in the store (imported or there already) lets its waiting
            # children in, right after it: those of earlier steps, then this step's. So
            # where a child goes does not depend on where the steps end.
            children = held.pop(sid, [])
            if sid in self.waiting and sid not in out.released:
                out.released.append(sid)
                children = self.waiting[sid] + children
            todo.extendleft(reversed(children))
        out.waiting = [row for rows in held.values() for row in rows]
        return work

    def done_before(self) -> str:
        """What an error met now leaves in the store, for its message."""
        if not self.imported:
            return "nothing was imported"
        return (f"{self.imported:,} session(s) were imported before it, each complete "
                "(rerun with skip_existing=True, or --skip-existing, to import the rest)")

    def _apply(self, out: _Outcome) -> None:
        staged = None
        for _ in range(out.taken):
            row, rows, _ = self.queue.popleft()
            self.queued -= rows
            if isinstance(row["messages"], Staged):
                staged = row["messages"]
        for row in out.waiting:  # held in memory, so that the staging file moves on
            msgs = row["messages"]
            if isinstance(msgs, Staged):
                assert self.stage is not None
                row["messages"] = self.stage.fetch(msgs)
        if staged is not None:
            assert self.stage is not None
            self.stage.consumed(staged)
        for sid in out.released:
            for row in self.waiting.pop(sid):
                self.waiting_sessions -= 1
                self.waiting_messages -= len(row["messages"])
        self.imported += out.imported
        self.skipped += out.skipped
        self.deferred = self.deferred or out.deferred
        if out.seconds > 0 and self.budget != float("inf"):
            # Aim the next step at a share of the budget, at the rates this one ran
            # (commit and wait included: an overestimate of the time it held the lock),
            # in rows and in text: inserting a message costs time by its bytes too.
            rows = out.messages + out.imported + out.skipped
            aim = self.budget * _STEP_SHARE / out.seconds
            self.step_rows = int(min(MAX_STEP_ROWS, max(1, rows * aim)))
            self.step_size = int(max(1, out.size * aim)) if out.size else _INT64_MAX
        self.tracker.add(out.messages)
        for row in out.waiting:
            parent = row["parent_session_id"]
            self.waiting.setdefault(parent, []).append(row)
            self.waiting_sessions += 1
            self.waiting_messages += len(row["messages"])
        if (self.waiting_sessions > WAITING_SESSIONS
                or self.waiting_messages > WAITING_MESSAGES):
            raise IntegrityViolation(
                f"{self.waiting_sessions:,} imported sessions ({self.waiting_messages:,} "
                "messages) wait for a parent session that has not come yet; "
                f"{self.done_before()}. Put parents before their children (as export "
                "does)")


def _keys(row: dict[str, Any]) -> list[tuple]:
    """A session's messages as :func:`_assign_ids` takes them: its tuples, or for a
    staged session (id, session id) pairs."""
    msgs = row["messages"]
    if isinstance(msgs, Staged):
        return [(i, row["id"]) for i in msgs.ids]
    return msgs


def _assign_ids(conn: Conn, messages: list[tuple], top: int, in_list: str
                ) -> list[tuple]:
    """Give every message its id before it is inserted, and return the tuples with
    them: the exported id while it is free, above the session's previous one and at most
    :data:`~sessiondb.records.MAX_MESSAGE_ID`; from the first message of a session that
    cannot keep its id on, the next ids AUTOINCREMENT would give, so the session's
    messages stay in their order (they are read back by id). Assigning them here, rather than letting SQLite, lets the step
    defer their indexing by id."""
    wanted = [m[0] for m in messages if m[0] is not None]
    taken = set()
    if wanted:
        taken = {r[0] for r in conn.execute(
            f"SELECT id FROM messages WHERE id IN {in_list}", (json.dumps(wanted),))}
    out = []
    session, moved, last = None, False, -1
    for m in messages:
        if m[1] != session:  # a step's messages come session by session
            session, moved, last = m[1], False, -1
        mid = m[0]
        if moved or mid is None or mid > records.MAX_MESSAGE_ID or mid in taken \
                or mid <= last:
            moved = True
            if top >= _INT64_MAX:
                out.append((None,) + m[1:])  # SQLite reports the exhausted id space
                continue
            mid = top + 1
            m = (mid,) + m[1:]
        taken.add(mid)
        last = mid
        if mid > top:
            top = mid
        out.append(m)
    return out


# -- the whole import -----------------------------------------------------------------

def import_sessions(data: Any, *, sql: Dialect, write: Write, read: Read, budget: float,
                    between: Optional[Callable[[], None]], skip_existing: bool,
                    progress: Optional[ProgressCallback],
                    index: Callable[[Optional[ProgressCallback]], int],
                    read_in_thread: Optional[bool] = None) -> int:
    """Import ``data`` (see :func:`source_of` and the module docstring) in steps of
    ``budget`` seconds, deferring the indexing; returns the sessions imported.

    :param read_in_thread: read and validate a stream in a staging thread
        (:mod:`sessiondb.bulk_stage`; SQLite only); None: only the iterator that
        :func:`sessiondb.jsonstream.read_items` returns.
    :param write: ``_execute_write``.
    :param read: ``_read``.
    :param between: called after each step (``_between_steps``).
    :param index: indexes every pending message in steps (``_index_pending``).
    :raises IntegrityViolation: a session exists already (unless ``skip_existing``), a
        parent is missing, a title is taken; the message says what was imported before.
    """
    rows, stream = source_of(data)
    threaded = isinstance(stream, Items) if read_in_thread is None else read_in_thread
    return _import(rows, stream, sql=sql, write=write, read=read, budget=budget,
                   between=between, defer=sql.name == "sqlite", skip_existing=skip_existing,
                   progress=progress, index=index, threaded=threaded)


def import_in_block(data: Any, *, sql: Dialect, write: Write, skip_existing: bool,
                    progress: Optional[ProgressCallback]) -> int:
    """Import ``data`` inside a ``transaction()`` block, as one write function, so that
    a failure undoes only this call, as for every call in a block. A stream is read
    (and validated) first, since the store's lock is held while that function runs;
    nothing is deferred (the triggers index as usual, so nothing is left to catch up).
    """
    rows, stream = source_of(data)
    if rows is None:
        rows = records.check_import(list(stream or ()))

    def whole(conn: Conn) -> int:
        # No progress reports from inside: a callback that used the store there would
        # wait for the lock its own call holds.
        return _import(rows, None, sql=sql, write=lambda fn: fn(conn),
                       read=lambda fn, snapshot=False: fn(conn), budget=float("inf"),
                       between=None, defer=False, skip_existing=skip_existing,
                       progress=None, index=lambda _: 0)

    imported = write(whole)
    messages = sum(len(r["messages"]) for r in rows)
    Tracker("import", "messages", messages, progress).add(messages)
    return imported


def _import(rows: Optional[list[dict[str, Any]]], stream: Optional[Iterator[Any]], *,
            sql: Dialect, write: Write, read: Read, budget: float, between: Optional[Callable[[], None]],
            defer: bool, skip_existing: bool, progress: Optional[ProgressCallback],
            index: Callable[[Optional[ProgressCallback]], int], threaded: bool = False) -> int:
    tracker = Tracker("import", "messages",
                      None if rows is None else sum(len(r["messages"]) for r in rows),
                      progress)
    run = ImportRun(write, budget, sql=sql, skip_existing=skip_existing, defer=defer,
                    stream=rows is None, tracker=tracker, between=between)
    try:
        if rows is not None:
            for row in check_list(rows, sql=sql, write=write, read=read,
                                  skip_existing=skip_existing):
                run.add(row)
            run.drain()
        elif threaded and defer:
            assert stream is not None
            with bulk_stage.staging(stream, read) as stage:
                run.stage = stage  # None: the staging file could not be made
                _stream(run, stream)
        else:
            assert stream is not None
            _stream(run, stream)
    except Exception:
        # What was imported before the failure is made searchable too, and so is what
        # an import that was killed left pending: a rerun that stops at once (on a
        # session imported already) still finishes that. A failure of this is left to
        # a rerun: the error that stopped the import is the news.
        try:
            if run.deferred or (defer and read(_anything_pending)):
                index(progress)
        except Exception:
            pass
        raise
    if run.deferred or (defer and read(_anything_pending)):
        index(progress)  # also what an import that was killed left pending
    return run.imported


@contextmanager
def larger_cache(read: Read, wanted: int = IMPORT_CACHE_KIB) -> Iterator[None]:
    """Give the connection ``wanted`` KiB of page cache (:data:`IMPORT_CACHE_KIB`;
    unless it has more) for the duration of the block, then the size it had."""
    def size(conn: Conn) -> tuple[int, int]:
        return int(conn.pragma("cache_size")), int(conn.pragma("page_size"))

    before, page = read(size)
    kib = -before if before < 0 else before * page // 1024
    if kib >= wanted:
        yield
        return
    read(lambda conn: conn.pragma("cache_size", -wanted))
    try:
        yield
    finally:
        try:
            read(lambda conn: conn.pragma("cache_size", before))
        except SessionDBError:
            pass  # closed meanwhile: a new connection starts with the default anyway


def _stream(run: ImportRun, items: Iterator[Any]) -> None:
    """Consume ``items``: read and validate one step's worth of sessions (while the
    lock is free), write one step, and so on; so what is held ahead of the writes is
    about a step, and a bad session is refused before the step that would write it."""
    recent: set[str] = set()  # a session twice within BATCH_MESSAGES rows is refused
    pulled = 0
    ended = False
    while True:
        while not ended and (run.queued < run.step_rows or not run.queue):
            row = _next_row(run, items)
            if row is None:
                ended = True
                break
            if row["id"] in recent:
                raise InvalidArgument(f"session {row['id']!r} appears twice in the import; "
                                      f"{run.done_before()}")
            recent.add(row["id"])
            pulled += 1 + len(row["messages"])
            if pulled >= BATCH_MESSAGES:
                recent, pulled = {row["id"]}, 0
            run.add(row)
        if not run.queue:
            break
        run.step()
    run.finish()


def _next_row(run: ImportRun, items: Iterator[Any]) -> Optional[dict[str, Any]]:
    """The next session of the stream, validated (None at its end)."""
    try:
        if run.stage is not None:
            return run.stage.next_row()
        try:
            item = next(items)
        except StopIteration:
            return None
        return records.import_session(item)
    except (InvalidArgument, InvalidArgumentType) as exc:
        if not run.imported:
            raise
        # The same error, saying what is in the store already (the sessions validated
        # before it and not written yet are not).
        raise type(exc)(f"{exc}; {run.done_before()}") from exc


def _anything_pending(conn: Conn) -> bool:
    return conn.execute("SELECT 1 FROM sessiondb_fts_pending LIMIT 1").fetchone() is not None
