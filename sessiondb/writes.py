"""The write path: every mutation runs here, inside ``BEGIN IMMEDIATE``.

:meth:`WritePath.run` is the body of ``SessionDB._execute_write``:

1. enter the write gate (:mod:`sessiondb.gate`; waiters queue in the kernel, FIFO);
2. ``BEGIN IMMEDIATE`` takes SQLite's write lock up front, so a transaction never has
   to upgrade a read lock halfway through (the source of ``SQLITE_BUSY`` that no busy
   handler can fix, https://sqlite.org/lang_transaction.html#deferred_immediate_and_exclusive_transactions);
3. ``fn(conn)``, then ``COMMIT``; on *any* exception ``ROLLBACK`` and re-raise;
4. on ``SQLITE_BUSY``/``SQLITE_LOCKED`` (a writer that bypasses the gate, or a
   checkpoint) leave the gate, sleep a randomized, growing interval and try again until
   the time budget is spent, then raise :class:`~sessiondb.errors.WriteTimeout`.
   Nothing else is ever retried.

*The hold bound.* A transaction that holds the write lock past ``hold_timeout`` (a
``transaction()`` block doing slow work, a runaway statement) makes every other process
wait, so a watchdog thread (one per process) ends it: it interrupts the running
statement (:meth:`apsw.Connection.interrupt`), rolls the transaction back and leaves the
gate; the owner's next call, or the end of its block, raises
:class:`~sessiondb.errors.HoldTimeout`. The owner holds ``WritePath._sql`` while it runs
SQL inside a transaction and the watchdog takes it before rolling back, because an apsw
connection refuses to be used by two threads at once; the watchdog interrupts only while
that transaction is still open (``_imu``), so an interrupt never lands on a later
statement. A process that is stopped (SIGSTOP) or hung in C cannot be helped this way:
the others then wait their ``write_timeout`` and get ``WriteTimeout``, and go on as soon
as it dies (its kernel locks die with it).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

import apsw

from .errors import ConfigurationError, HoldTimeout, StorageError, WriteTimeout, translate
from .gate import Gate, GateTimeout

T = TypeVar("T")

_BUSY = (apsw.BusyError, apsw.LockedError)
_WAITING, _HOLDING = 1, 2  # states published in the process record (sessiondb.procs)


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``samples`` by nearest rank; 0.0 when empty."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, int(round(q / 100.0 * len(ordered) + 0.5)) - 1))
    return ordered[rank]


@dataclass
class WriteCounters:
    """Raw figures kept by :class:`WritePath`; :meth:`SessionDB.stats` reports them."""

    writes: int = 0
    failed: int = 0
    retries: int = 0
    timeouts: int = 0
    hold_timeouts: int = 0
    contended: int = 0
    longest_hold_s: float = 0.0
    longest_wait_s: float = 0.0
    # Recent samples only, so percentiles describe current behaviour in bounded memory.
    waits: deque = field(default_factory=lambda: deque(maxlen=4096))
    holds: deque = field(default_factory=lambda: deque(maxlen=4096))

    def snapshot(self) -> dict[str, float | int]:
        waits, holds = list(self.waits), list(self.holds)
        return {
            "writes": self.writes,
            "failed_writes": self.failed,
            "retries": self.retries,
            "timeouts": self.timeouts,
            "hold_timeouts": self.hold_timeouts,
            "contended_writes": self.contended,
            "lock_wait_p50_s": percentile(waits, 50),
            "lock_wait_p90_s": percentile(waits, 90),
            "lock_wait_p99_s": percentile(waits, 99),
            "lock_wait_max_s": self.longest_wait_s,
            "lock_hold_p50_s": percentile(holds, 50),
            "lock_hold_p99_s": percentile(holds, 99),
            "lock_hold_max_s": self.longest_hold_s,
        }


def backoff(attempt: int, remaining: float) -> float:
    """Full-jitter exponential backoff: uniform in [0.5, 1.5) x min(50 ms, 1 ms x 2^n),
    never past the deadline. Randomness is what breaks lock-step convoys."""
    base = min(0.050, 0.001 * (2 ** min(attempt, 10)))
    return max(0.0, min(remaining, base * random.uniform(0.5, 1.5)))


class WritePath:
    """Runs write transactions for one connection; see the module docstring.

    :param gate: the write gate shared by every writer of this database.
    :param write_timeout: seconds a write may spend waiting for the lock, retries included.
    :param path: the database path, for error messages.
    :param hold_timeout: seconds a transaction may hold the write lock before the
        watchdog rolls it back (None: no bound).
    """

    def __init__(self, gate: Gate, write_timeout: float, path: str,
                 hold_timeout: float | None = None) -> None:
        self.gate = gate
        self.write_timeout = write_timeout
        self.hold_timeout = hold_timeout
        self.path = path
        self.counters = WriteCounters()
        self._active = threading.local()
        self._owner = os.getpid()  # the process that began the open transaction
        self._sql = threading.Lock()   # held by the owner while it runs SQL in a transaction
        self._imu = threading.Lock()   # guards _tx and the watchdog's interrupt
        self._seq = 0
        self._tx: tuple[int, apsw.Connection, float] | None = None  # (seq, conn, entered)
        self._expired = (-1, 0.0)      # (seq, held_s) of the transaction the watchdog ended
        #: called right after BEGIN IMMEDIATE; an exception rolls back and propagates
        #: (the engine checks that the -wal/-shm files are still SQLite's, walguard)
        self.verify: Callable[[], None] | None = None
        #: told when this instance starts waiting, holds, and goes idle (with the
        #: counters): its slot in the process record (sessiondb.procs), or None
        self.record: Any = None

    @property
    def active(self) -> bool:
        """True while the calling thread is inside a write transaction."""
        return getattr(self._active, "depth", 0) > 0

    def run(self, conn: apsw.Connection, fn: Callable[[apsw.Connection], T],
            bounded: bool = True) -> T:
        """Run ``fn(conn)`` as one ``BEGIN IMMEDIATE`` transaction, retrying on busy.

        :param bounded: False exempts this transaction from the hold bound: for work
            that is bounded but cannot be split, such as a schema migration building an
            index in one statement.
        """
        return self._attempts(conn, fn, bounded)

    def begin(self, conn: apsw.Connection) -> None:
        """Enter the gate and ``BEGIN IMMEDIATE`` (retrying busy), for a transaction whose
        body the caller runs; end it with :meth:`finish`, from a handler that covers this
        call too: an exception may come out of it with the transaction open (one raised
        by a signal handler as its last call returns)."""
        self._attempts(conn, None)

    def guarded(self, fn: Callable[[], T]) -> T:
        """``fn()``, SQL that the caller runs inside an open transaction (a call inside
        a ``transaction()`` block), with the watchdog excluded; raises
        :class:`~sessiondb.errors.HoldTimeout` if it already ended the transaction.

        A call, not a context manager: a generator holding ``_sql`` across its
        ``yield`` would keep it when an exception (a signal handler's) landed in
        contextlib's frames around it, until garbage collection, and the block's own
        end would wait for it for good."""
        with self._sql:
            self._raise_if_expired()
            try:
                return fn()
            except apsw.InterruptError as exc:
                self._raise_if_expired(exc)
                raise translate(exc, self.path) from exc

    def nested(self, conn: apsw.Connection, fn: Callable[[apsw.Connection], T]) -> T:
        """``fn(conn)`` as a savepoint of the open transaction (a call inside a
        ``transaction()`` block): if it raises, only its own changes are undone. Raises
        :class:`~sessiondb.errors.HoldTimeout` if the watchdog ended the block."""
        return self.guarded(lambda: self._savepoint(conn, fn))

    def _savepoint(self, conn: apsw.Connection, fn: Callable[[apsw.Connection], T]) -> T:
        if conn.get_autocommit():
            # SQLite itself rolled the whole transaction back (disk full, I/O
            # error): running on would commit the rest of the block call by call.
            raise StorageError(f"the transaction on {self.path} was rolled back by an "
                               "earlier error; leave the transaction() block and retry")
        conn.execute("SAVEPOINT sessiondb_nested")
        try:
            result = fn(conn)
        except BaseException as exc:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK TO sessiondb_nested")
                try:
                    conn.execute("RELEASE sessiondb_nested")
                except apsw.BusyError:
                    # A write statement of fn's is still in progress: an exception (a
                    # signal handler's) landed as it returned its first row, and its
                    # cursor lives on in the traceback. The savepoint, rolled back,
                    # stays open inside the block's transaction, harmless: the block's
                    # COMMIT or ROLLBACK ends it.
                    pass
            if isinstance(exc, apsw.Error) and not isinstance(exc, apsw.InterruptError):
                raise translate(exc, self.path) from exc
            raise  # an interrupt: guarded() turns it into HoldTimeout
        conn.execute("RELEASE sessiondb_nested")
        return result

    def finish(self, conn: apsw.Connection, ok: bool) -> None:
        """Commit (``ok``) or roll back the transaction this thread opened with
        :meth:`begin`, and leave the gate.

        A no-op when this thread has none open, so that the caller calls it again (not
        ``ok``) when an exception comes out of it: one raised by a signal handler as it
        is entered cannot be caught inside it, every later one is (:meth:`_end`)."""
        if not self.active:
            return
        if os.getpid() != self._owner:
            # A fork child leaving the parent's transaction() block: that transaction
            # (and SQLite's lock state for it) belongs to the parent; ending it here
            # would rewrite the shared WAL index under other processes' writes.
            self._active.depth = 0
            raise ConfigurationError(
                "this process was forked inside a transaction() block; the transaction "
                "belongs to the parent and was left alone (nothing was written here)")
        committed = False
        with self._sql:
            tx = self._tx  # None: the watchdog rolled it back and left the gate
            entered = None if tx is None else tx[2]
            try:
                if ok:
                    self._raise_if_expired()
                    conn.execute("COMMIT")
                    committed = True
                    self.counters.writes += 1
                elif tx is not None:
                    self.counters.failed += 1
            except BaseException as exc:
                if tx is not None:
                    self.counters.failed += 1
                if isinstance(exc, apsw.InterruptError):
                    self._raise_if_expired(exc)
                if isinstance(exc, apsw.Error):
                    raise translate(exc, self.path) from exc
                raise
            finally:
                try:
                    self._end(conn, entered, committed)
                except BaseException:
                    self._end(conn, entered, committed)  # see _end
                    raise

    # -- internals --------------------------------------------------------------------
    def _attempts(self, conn: apsw.Connection, fn, bounded: bool = True):
        start = time.monotonic()
        deadline = start + self.write_timeout
        attempt = 0
        while True:
            attempt += 1
            with self._sql:
                done, outcome = self._attempt(conn, fn, start, deadline, attempt, bounded)
            if done:
                return outcome
            self.counters.retries += 1
            if self.record is not None:  # still waiting, through the backoff below
                self.record.publish(_WAITING, start)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._timed_out(start, attempt, outcome)
            time.sleep(backoff(attempt, remaining))

    def _attempt(self, conn: apsw.Connection, fn, start: float, deadline: float,
                 attempt: int, bounded: bool = True) -> tuple[bool, object]:
        """One try: (True, result), or (False, the busy error) to retry. One handler
        covers everything from entering the gate to COMMIT, so that no exception (a
        KeyboardInterrupt included, wherever it lands) can leave the gate held or a write
        transaction open on the connection."""
        entered = None
        committed = False
        self._owner = os.getpid()
        record = self.record
        try:
            if record is not None:
                record.state(_WAITING, start)
            try:
                _, contended = self.gate.acquire(max(0.0, deadline - time.monotonic()))
            except GateTimeout:
                self._timed_out(start, attempt, None)
            conn.execute("BEGIN IMMEDIATE")
            entered = time.monotonic()
            if record is not None:
                record.state(_HOLDING, entered)
            self._opened(conn, entered, bounded)
            if self.verify is not None:
                self.verify()
            self._record_wait(entered - start, contended)
            self._active.depth = 1
            if fn is None:
                return True, entered  # transaction(): finish() commits and leaves
            result = fn(conn)
            if os.getpid() != self._owner:  # fn forked: see finish()
                self._active.depth = 0
                raise ConfigurationError("a write callback forked; the child must "
                                         "not commit the parent's transaction")
            self._raise_if_expired()
            conn.execute("COMMIT")
            committed = True
            self.counters.writes += 1
            # Inside the handler's reach: a signal that arrived during COMMIT raises
            # its exception at the next Python call, and that must not skip leaving.
            self._leave(entered, committed=True)
            return True, result
        except BaseException as exc:
            busy = False
            # Ending inside the handler's own handler: an exception can land as any
            # call returns (see _end). Counted before: _leave publishes the counters.
            try:
                busy = isinstance(exc, _BUSY)
                if os.getpid() == self._owner:
                    if entered is not None and not (committed or busy):
                        self.counters.failed += 1
                    self._end(conn, entered, committed)
            except BaseException:
                if os.getpid() == self._owner:
                    self._end(conn, entered, committed)
                raise
            if os.getpid() == self._owner:
                if entered is not None and isinstance(exc, apsw.InterruptError):
                    self._raise_if_expired(exc)
            if busy:
                return False, exc
            if isinstance(exc, apsw.Error):
                raise translate(exc, self.path) from exc
            raise

    # -- the hold bound (see the module docstring) ------------------------------------
    def _opened(self, conn: apsw.Connection, entered: float, bounded: bool = True) -> None:
        with self._imu:
            self._seq += 1
            self._tx = (self._seq, conn, entered)
        if self.hold_timeout is not None and bounded:
            _WATCHDOG.watch(self, self._seq, entered + self.hold_timeout)

    def _raise_if_expired(self, cause: BaseException | None = None) -> None:
        seq, held = self._expired
        if seq == self._seq and self.hold_timeout is not None:
            raise HoldTimeout(held, self.hold_timeout) from cause

    def is_open(self, seq: int) -> bool:
        tx = self._tx
        return tx is not None and tx[0] == seq

    def expire(self, seq: int) -> None:
        """Called by the watchdog: end transaction ``seq`` if it is still open."""
        with self._imu:
            if not self.is_open(seq):
                return
            _, conn, entered = self._tx  # type: ignore[misc]
            self._expired = (seq, time.monotonic() - entered)
            self.counters.hold_timeouts += 1
        # Statements that are running are interrupted; one started between two of our
        # polls is too (the flag stays set while any statement of the connection runs).
        while not self._sql.acquire(timeout=0.005):
            with self._imu:
                if not self.is_open(seq):
                    return
                conn.interrupt()
        try:
            with self._imu:
                if not self.is_open(seq):
                    return  # the owner ended it meanwhile (and raised HoldTimeout)
                self._tx = None
            try:
                rollback(conn)
                self.counters.failed += 1
            finally:
                self.gate.release(None)
                if self.record is not None:
                    self.record.publish()
        finally:
            self._sql.release()

    def _record_wait(self, waited: float, contended: bool) -> None:
        c = self.counters
        c.waits.append(waited)
        c.longest_wait_s = max(c.longest_wait_s, waited)
        c.contended += contended

    def _end(self, conn: apsw.Connection, entered: float | None, committed: bool) -> None:
        """Roll back unless ``committed``, then leave the gate: how every transaction
        ends, and both are no-ops once done. So a handler calls it once more if an
        exception comes out of it: one raised by a signal handler (it can land as any
        Python function is entered, and as any call returns) as this method, the
        rollback or :meth:`_leave` is entered cannot be caught where it lands, and
        would otherwise leave the transaction open or the gate held."""
        try:
            if not committed:
                rollback(conn)
        finally:
            self._leave(entered, committed)

    def _leave(self, entered: float | None, committed: bool = False) -> None:
        """Leave the gate; ``entered`` is None when BEGIN never succeeded. After a commit
        the gate learns how long it was held, so that it may keep a turn going for this
        process's next short write (see :mod:`sessiondb.gate`)."""
        self._active.depth = 0
        held = None if entered is None else time.monotonic() - entered
        try:  # from taking the transaction on, so that an exception cannot skip leaving
            with self._imu:
                tx, self._tx = self._tx, None
            if entered is not None and tx is None:
                return  # the watchdog ended this transaction (and left), or it was never
                        # recorded: an exception landed between BEGIN and _opened
            if held is not None:
                c = self.counters
                c.holds.append(held)
                c.longest_hold_s = max(c.longest_hold_s, held)
            if self.record is not None:
                # Idle, with the counters. Published before letting go, so that it does
                # not lengthen the gap between two writes, which decides whether this
                # process's turn goes on (sessiondb.gate).
                self.record.publish()
        finally:
            # Always, not only for the transaction we took: after the watchdog left,
            # leaving again is a no-op (nothing of this instance entered the gate since:
            # this thread holds the instance lock, and _sql against the watchdog). Had
            # the transaction decided it, an exception raised by a signal handler
            # between BEGIN and _opened, or in the first call's release (whose second
            # call finds the transaction taken), would keep the gate held for good.
            try:
                self.gate.release(held if committed else None)
            except BaseException:
                # Landed as release was entered, where release cannot catch it: leave
                # here (a no-op if the first call got through).
                self.gate.release(None)
                raise

    def _timed_out(self, start: float, attempts: int, cause: BaseException | None):
        self.counters.timeouts += 1
        if self.record is not None:
            self.record.publish()
        raise WriteTimeout(time.monotonic() - start, attempts) from cause


def rollback(conn: apsw.Connection) -> None:
    """Roll back if a transaction is open; SQLite may already have rolled back on its own
    (after SQLITE_FULL or an I/O error), which is not an error here."""
    try:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
    except apsw.Error:
        pass


class _Watchdog:
    """One daemon thread per process that ends write transactions held past their
    ``hold_timeout`` (:meth:`WritePath.expire`). A transaction costs it one dict update;
    the thread wakes at the earliest deadline, about once per ``hold_timeout`` while
    transactions keep ending in time."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cv = threading.Condition()
        self._due: dict[WritePath, tuple[int, float]] = {}
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def watch(self, wp: WritePath, seq: int, deadline: float) -> None:
        with self._cv:
            self._due[wp] = (seq, deadline)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="sessiondb-hold-watchdog")
                self._thread.start()
            if deadline < self._wake_at:
                self._cv.notify()

    def _loop(self) -> None:
        while True:
            due = []
            with self._cv:
                now = time.monotonic()
                soonest = math.inf
                for wp, (seq, deadline) in list(self._due.items()):
                    if not wp.is_open(seq):
                        del self._due[wp]
                    elif deadline <= now:
                        del self._due[wp]
                        due.append((wp, seq))
                    else:
                        soonest = min(soonest, deadline)
                if not due:
                    self._wake_at = soonest
                    self._cv.wait(None if soonest == math.inf else soonest - now)
                    self._wake_at = 0.0
                    continue
            for wp, seq in due:
                try:
                    wp.expire(seq)
                except Exception:  # noqa: BLE001 - the watchdog must outlive any one error
                    pass


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    # The thread does not exist in a child, and a parent thread may hold its lock.
    os.register_at_fork(after_in_child=_WATCHDOG._reset)
