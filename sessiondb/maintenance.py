"""Long work in short steps: how pruning, importing, rebuilding the full-text index and
giving space back run on a large store without stopping everyone else.

A maintenance operation on a million-message store is minutes of work; as one write
transaction it would hold the write lock all that time (the ``hold_timeout`` watchdog
rightly ends it, and every other process waits meanwhile). So each operation is a
*step function* -- ``step(conn, deadline) -> units done`` -- that does a bounded slice of
the work inside one transaction and stops at ``deadline``, leaving the store consistent,
and :func:`run_steps` calls it through the write path until it reports no more work.
Between two steps the write gate serves the writers queued meanwhile (first come, first
served), so another process waits at most about one step; a process that bypasses
the gate and polls for the lock gets a longer pause at least every 0.25 s (see
:func:`run_steps`). A step's time budget is :func:`step_budget`: 0.05 s, or a quarter
of ``hold_timeout`` when that is smaller, the step's commit included (the time the step
function itself gets is adjusted after each step, since committing thousands of changed
pages takes tens of ms); a step that still overruns the bound (a paused machine) is
retried with half the budget. Between steps the engine has the WAL copied as the steps
go (:meth:`sessiondb.checkpoint.CheckpointPolicy.after_step`).
A step function must therefore be idempotent in effect: it reads where the work stands
inside its own transaction, so a rerun after a crash, or two processes doing the same
work at once, simply carry on from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import apsw

from .errors import HoldTimeout, InvalidArgumentType

#: A step function: does work until ``deadline`` (``time.monotonic``), returns the units
#: of work it did; 0 means there was nothing left to do.
Step = Callable[[apsw.Connection, float], int]

DEFAULT_STEP_S = 0.05
_MIN_STEP_S = 0.002
# Steps of the smallest budget the hold bound may end in a row before the work gives up:
# one that overran it once may have met a stall (a commit's fsync behind a busy disk, a
# process starved of CPU), which a retry after a pause does not meet again.
_MIN_STEP_TRIES = 4
_HOLD_SHARE = 4  # a step may use at most a quarter of hold_timeout
_YIELD_SHARE = 0.2  # pause after a step, as a share of its duration (see run_steps)
# A longer pause at least this often (see run_steps): longer than the longest sleep of
# SQLite's default busy handler between two polls of the lock (100 ms).
POLL_GAP_S = 0.11
_POLL_GAP_EVERY_S = 0.25
# Bytes of message content a step may index or delete per second of its budget: FTS5
# tokenizes every byte it indexes, and every byte of a message it deletes from the
# index (about 20 MB/s measured either way), so a chunk counted in messages alone
# held the lock for seconds when they were large.
_BYTES_PER_SECOND = 8_000_000
_MIN_BYTES = 65536  # a chunk's bytes however little time is left


@dataclass(frozen=True)
class Progress:
    """How far a long operation has come; passed to a ``progress`` callback after each
    step.

    :ivar task: what is running: ``"prune"``, ``"import"``, ``"index"`` (building the
        full-text index), ``"cleanup"`` (removing an old index, or a converted file's old
        messages table), ``"reclaim"`` (giving space back), ``"convert"`` (copying a
        hermes-agent file's messages into sessiondb's table).
    :ivar done: units done so far.
    :ivar total: units in all, when known in advance (else None); for a prune, an
        estimate (the sessions' ``message_count``), which ``done`` may pass.
    :ivar unit: what is counted: ``"sessions"``, ``"messages"``, ``"pages"``, ``"rows"``,
        ``"ids"`` (message ids passed by the conversion's copy).
    :ivar elapsed_s: seconds since the task started.
    """

    task: str
    done: int
    total: Optional[int]
    unit: str
    elapsed_s: float

    @property
    def eta_s(self) -> Optional[float]:
        """Seconds left at the rate so far, when ``total`` is known."""
        if self.total is None or self.done <= 0 or self.elapsed_s <= 0:
            return None
        return max(0.0, (self.total - self.done) * self.elapsed_s / self.done)


ProgressCallback = Callable[[Progress], None]


def check_progress(progress: object) -> Optional[ProgressCallback]:
    """None or a callable.

    :raises InvalidArgumentType: anything else.
    """
    if progress is not None and not callable(progress):
        raise InvalidArgumentType(f"progress must be a callable taking a Progress, not "
                                  f"{type(progress).__name__}")
    return progress  # type: ignore[return-value]


def step_budget(hold_timeout: Optional[float]) -> float:
    """Seconds one step may hold the write lock."""
    if hold_timeout is None:
        return DEFAULT_STEP_S
    return max(_MIN_STEP_S, min(DEFAULT_STEP_S, hold_timeout / _HOLD_SHARE))


def byte_budget(deadline: float) -> int:
    """Bytes of message content a chunk of work may take with the time left before
    ``deadline`` (``time.monotonic``)."""
    return max(_MIN_BYTES, int((deadline - time.monotonic()) * _BYTES_PER_SECOND))


def fit_bytes(rows: Sequence[tuple[int, Optional[int]]], budget: int) -> list[int]:
    """The ids of the first ``rows`` (``(id, bytes)``, bytes as ``octet_length``, which
    SQLite answers without loading the value) whose bytes fit ``budget``; at least the
    first, whatever its size."""
    ids: list[int] = []
    size = 0
    for rowid, nbytes in rows:
        size += nbytes or 0
        if ids and size > budget:
            break
        ids.append(rowid)
    return ids


class Tracker:
    """Counts the units of one task and reports them to a progress callback."""

    def __init__(self, task: str, unit: str, total: Optional[int],
                 progress: Optional[ProgressCallback]) -> None:
        self.task, self.unit, self.total = task, unit, total
        self.done = 0
        self._progress = progress
        self._start = time.monotonic()

    def add(self, units: int) -> None:
        self.done += units
        if self._progress is not None:
            self._progress(Progress(self.task, self.done, self.total, self.unit,
                                    time.monotonic() - self._start))


@dataclass(frozen=True)
class WalBudget:
    """The WAL pages one step of long work may write (SQLite).

    A step bounded in time alone can still write tens of megabytes: at ten million
    messages a step of the full-text rebuild indexes a few hundred messages in its 50
    ms, and FTS5 merges index segments in proportion to what a commit adds and to the
    index's depth, in that commit. The WAL then passed the point where the next writer
    of another process resets it on its own call (copying all of it into a 24 GB file:
    up to 2 s of its call, measured). Steps whose pages stay under this budget let the
    copy between steps keep up (:meth:`sessiondb.checkpoint.CheckpointPolicy.after_step`).
    Not every step can: a merge of FTS5's largest segments stops only between two
    terms, so a term found in most messages has its whole doclist copied in one commit
    (steps of up to 91,324 pages at ten million messages, measured), whatever the step
    did before it.

    :ivar pages: pages a step should write at most.
    :ivar written: pages a connection has written so far (SQLite's
        ``SQLITE_DBSTATUS_CACHE_WRITE``: to the WAL, commits included).
    """

    pages: int
    written: Callable[[Any], int]


def cache_writes(conn: apsw.Connection) -> int:
    """Pages ``conn`` has written to the WAL since it was opened."""
    return int(conn.status(apsw.SQLITE_DBSTATUS_CACHE_WRITE)[0])


def run_steps(write: Callable[[Callable[[apsw.Connection], int]], int], step: Step,
              budget: float, tracker: Optional[Tracker] = None,
              between: Optional[Callable[[], None]] = None,
              pause: Callable[[float], None] = time.sleep,
              wal: Optional["WalBudget"] = None) -> int:
    """Call ``step`` through ``write`` (the instance's ``_execute_write``), one
    transaction per call, until it returns 0; returns the units done in all.

    :param budget: seconds per step (:func:`step_budget`), its commit included: the
        time a step itself gets is adjusted after each step so that with its commit it
        holds the lock about that long.
    :param between: called after each step, outside the transaction (the engine's
        checkpoint between steps).
    :param pause: makes the long pauses (below): the engine's holds its write gate
        meanwhile, so that its queued writers leave the lock to those that poll.
    :param wal: the pages a step may write to the WAL, and how to count them (SQLite):
        a step that wrote more has the next one's time cut to match.
    :raises HoldTimeout: a step overran the hold bound even with the smallest budget,
        :data:`_MIN_STEP_TRIES` times in a row (each rolled back: nothing half-done).
    """
    total = 0
    gap = time.monotonic()  # when the last long pause ended
    work = budget  # the step's own time; its commit comes on top (see below)
    overruns = 0  # steps of the smallest budget the hold bound ended, in a row
    while True:
        started = time.monotonic()
        entered = [started]

        used: list[Any] = []  # the step's connection and the pages it had written before

        def call(conn: apsw.Connection) -> int:
            entered[0] = time.monotonic()  # the lock is held from here
            if wal is not None:
                used[:] = [conn, wal.written(conn)]
            return step(conn, entered[0] + work)

        try:
            done = write(call)
        except HoldTimeout:
            if budget <= _MIN_STEP_S:
                overruns += 1
                if overruns >= _MIN_STEP_TRIES:
                    raise
                pause(POLL_GAP_S)  # the others' turn; then the same step again
            budget = max(_MIN_STEP_S, budget / 2)  # nothing was written: try a smaller one
            work = min(work, budget)
            continue
        overruns = 0
        if not done:
            return total
        total += done
        # A step's commit writes every page it changed to the WAL and syncs it: tens of
        # ms after a step that moved or deleted thousands of pages. The lock is held
        # for both, so the step's own time is adjusted until both fit the budget
        # (halfway each time, so that one slow commit does not swing it); and until
        # its pages fit the WAL budget (see WalBudget).
        held = time.monotonic() - entered[0]
        scale = budget / held if held > 0 else 1.0
        if wal is not None and used:
            pages = wal.written(used[0]) - used[1]
            if pages > wal.pages:
                scale = min(scale, wal.pages / pages)
        work = min(budget, max(budget / 8, work * scale ** 0.5))
        if between is not None:
            between()
        # Writers that bypass the gate (an un-upgraded hermes-agent, a sqlite3 shell)
        # poll for the lock with sleeps of up to 100 ms: a step taken again the moment
        # the last one ended would starve them (seconds, measured). A pause of a fifth of
        # the step lets one of their polls land on a free lock, at a fifth of the speed,
        # but not surely: polls 100 ms apart against a lock free 10 ms in 60 kept
        # missing it for over a second (measured, hermes-agent's writer beside a
        # conversion). So at least every 0.25 s the pause outlasts their longest sleep:
        # each of them then polls while the lock is free, and waits about 0.4 s at most.
        # With other sessiondb writers queued at the gate, they took the free lock as
        # often as the pollers' one poll in the pause did (waits of 0.75 s, measured):
        # ``pause`` holds the gate, leaving the lock to the pollers alone.
        now = time.monotonic()
        if now + _YIELD_SHARE * (now - started) - gap >= _POLL_GAP_EVERY_S:
            pause(POLL_GAP_S)
            gap = time.monotonic()
        else:
            time.sleep(_YIELD_SHARE * (now - started))
        if tracker is not None:
            tracker.add(done)
