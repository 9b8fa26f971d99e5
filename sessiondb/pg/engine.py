"""The PostgreSQL engine: a bounded pool, short transactions, and the write path in full.

Built on four PostgreSQL incidents, each answered here:

- *A row lock held forever by a client that died mid-transaction.* Every connection has
  TCP keepalives and a TCP user timeout; every transaction sets
  ``idle_in_transaction_session_timeout`` to ``hold_timeout`` (plus a second), so the
  server ends a session that sits in a transaction (a SIGSTOPped or partitioned client)
  and frees its locks.
- *A heartbeat through a transaction-mode pooler that recycled the connection under it.*
  Nothing here lives in a connection's session: no session advisory locks, no ``SET``
  outside a transaction (each transaction's settings are ``SET LOCAL`` statements sent
  with its ``BEGIN``, in one round trip), no server-side prepared statements when
  ``pooler=True``. Leases and claims are rows changed by short transactions.
- *Workers holding reserved connections until the pool ran dry.* A connection is taken
  for one transaction and given back; the pool is bounded (``pool_size``); a wait for a
  connection is bounded by ``write_timeout`` and ends in
  :class:`~sessiondb.errors.WriteTimeout` when every connection is in use (in
  :class:`~sessiondb.errors.ConnectionLost` when the pool had room but no connection
  could be made: the server is down or unreachable); at 80% in use a
  :class:`~sessiondb.errors.PoolWarning` is issued; ``stats()`` shows the pool
  (:mod:`sessiondb.pg.pool`).
- *Hung work holding every slot while cleanup waited for a free one.* Work never holds a
  connection (only ``transaction()`` blocks do: their locks are bounded by
  ``hold_timeout``, but a block whose code hangs keeps its pooled connection until it
  returns, and the instance's other calls then get ``WriteTimeout``), and the claim
  reaper runs inside every ``claim()`` transaction, so any other instance reaps.

**The write path** (:meth:`PgEngine.execute_write`): take a connection (bounded wait),
``BEGIN`` (READ COMMITTED) with the transaction's timeouts, run the rules' function (its
first statement takes the advisory locks of what it checks, folded into the row update
where there is one, see :mod:`sessiondb.pg.dialect`), ``COMMIT``. Calls inside a
``transaction()`` block run as savepoints (see :meth:`PgEngine._nested`). Reads are
bounded like writes (the wait plus the hold bound), so a read stuck behind a partition
ends in :class:`~sessiondb.errors.DatabaseBusyError`. A ``snapshot()`` block is not
bounded (as on SQLite): it holds a pooled connection and a REPEATABLE READ snapshot,
which keeps vacuum from removing rows deleted meanwhile, until it ends: keep it short. A serialization failure or a deadlock rolls
back and runs it again after a jittered pause, until ``write_timeout``; nothing else is
retried. Waiting for a lock is bounded by ``lock_timeout`` (the rest of
``write_timeout``: :class:`~sessiondb.errors.WriteTimeout`); holding locks is bounded by
``hold_timeout``: a watchdog cancels the statement of a transaction that holds its locks
past it (:class:`~sessiondb.errors.HoldTimeout`) and, if the transaction has still not
ended :data:`CANCEL_GRACE` seconds later (the server cannot be reached: a partition), shuts
the socket, so the caller gets a typed error instead of hanging; an expired transaction is
rolled back by closing its connection, never by a ROLLBACK that could wait behind the
partition. A connection lost during ``COMMIT`` is
:class:`~sessiondb.errors.ConnectionLost` (it may have committed), never
:class:`~sessiondb.errors.HoldTimeout` (which says nothing was written). Errors are
translated at one boundary (:func:`sessiondb.pg.translate.translate`).
"""

from __future__ import annotations

import heapq
import itertools
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar
from urllib.parse import urlsplit

try:
    import psycopg
    import psycopg.errors as pgerr
    import psycopg_pool  # noqa: F401 - sessiondb.pg.pool's: missing, said below
except ImportError as exc:  # pragma: no cover - depends on the install
    from ..errors import ConfigurationError
    raise ConfigurationError(
        "a postgresql:// URL needs the PostgreSQL extra: pip install 'sessiondb[postgres]' "
        f"({exc})") from exc

from ..backend import check_durability, check_hold_timeout, check_seconds_option, mask
from ..errors import (
    ClosedError, ConfigurationError, DatabaseBusyError, HoldTimeout, StorageError,
    WriteTimeout,
)
from ..maintenance import ProgressCallback, Step, Tracker, check_progress, run_steps, step_budget
from ..text import check_flag
from ..writes import WriteCounters, backoff
from . import schema as pg_schema
from .conn import PgConn
from .dialect import POSTGRESQL
from .pool import BoundedPool
from .translate import translate
from .urls import split_options, url_flag

T = TypeVar("T")

#: Seconds the server waits past ``hold_timeout`` before it ends a session idle in a
#: transaction (the client's own watchdog acts first; this frees locks of a dead client).
IDLE_GRACE = 1.0
#: Seconds after a cancel that a statement may still run before its socket is shut.
CANCEL_GRACE = 2.0
_RETRY = (pgerr.SerializationFailure, pgerr.DeadlockDetected)
_SAVEPOINT = "sessiondb_nested"


class PgEngine:
    """One store in a PostgreSQL database; the options are :class:`~sessiondb.SessionDB`'s.

    :param pool_size: connections this instance may open (default 8); a call waits for a
        free one up to ``write_timeout``.
    :param schema: the PostgreSQL schema holding the store (default: the URL's
        ``?schema=`` parameter, else ``"sessiondb"``; created if missing), so that several
        stores (profiles) can share a database.
    :param pooler: True when the URL points at a pooler in transaction mode (PgBouncer):
        no server-side prepared statements are used (also the URL's ``?pooler=1``).
    :param application_name: shown in ``pg_stat_activity`` (default ``"sessiondb"``).
    :param durability: ``"full"`` (default): commits are as durable as the server is
        configured to make them (``synchronous_commit``, ``on`` unless changed);
        ``"normal"``: every transaction runs with ``SET LOCAL synchronous_commit = off``,
        so a commit returns before its WAL is flushed, and a crash of the server or the
        machine may lose the last commits (up to about three ``wal_writer_delay``, 0.6 s
        by default), never corrupting the database.
    """

    sql = POSTGRESQL

    def __init__(self, url: str, *, write_timeout: float = 30.0,
                 hold_timeout: float | None = 10.0, pool_size: int = 8,
                 schema: str | None = None, pooler: bool = False,
                 application_name: str = "sessiondb", durability: str = "full",
                 progress: ProgressCallback | None = None) -> None:
        check_seconds_option("write_timeout", write_timeout)
        check_hold_timeout(hold_timeout)
        self._durability = check_durability(durability)
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigurationError("pool_size must be an int >= 1")
        url, in_url = split_options(url)
        own = "&".join(f"{k}={v}" for k, v in in_url.items())  # reopens the same store
        self.path = mask(url) + (("&" if urlsplit(url).query else "?") + own if own else "")
        self._url = url
        self._schema = pg_schema.check_schema_name(schema or in_url.get("schema")
                                                   or "sessiondb")
        # The option, or the URL's ?pooler=1 (a URL in $SESSIONDB_PATH says it all).
        self._pooler = check_flag("pooler", pooler) or (
            "pooler" in in_url and url_flag("pooler", in_url["pooler"]))
        self.write_timeout = float(write_timeout)
        self._hold = None if hold_timeout is None else float(hold_timeout)
        self._progress = check_progress(progress)
        self.counters = WriteCounters()
        self._local = threading.local()  # this thread's transaction()/snapshot() block
        self._closed = False
        self._pid = os.getpid()
        self._watchdog = _Watchdog()
        self._pool = BoundedPool(url, self.path, pool_size, str(application_name)[:63],
                                 pooler=self._pooler, timeout=self.write_timeout,
                                 counters=self.counters)
        try:
            self._server_version = self.read(
                lambda c: c.raw.info.server_version)
            pg_schema.ensure_schema(self._run_raw, self.path, self._schema)
        except BaseException:
            self._pool.close()
            raise

    # -- connections ------------------------------------------------------------------
    @contextmanager
    def _connection(self, deadline: float) -> Iterator[psycopg.Connection]:
        """A pooled connection until the block ends; the wait is bounded by ``deadline``."""
        if self._closed:
            raise ClosedError(f"{self!r} is closed; open a new SessionDB")
        if os.getpid() != self._pid:
            self._after_fork()
        with self._pool.connection(deadline) as raw:
            yield raw

    def _after_fork(self) -> None:
        """In a fork child: a pool of its own (:meth:`BoundedPool.after_fork`), and none
        of the parent's per-thread state."""
        self._pool.after_fork()  # first: if it fails, the next call tries again
        self._pid = os.getpid()
        self._watchdog = _Watchdog()
        self._local = threading.local()

    def _begin(self, raw: psycopg.Connection, lock_wait: float, hold: float | None,
               isolation: str = "READ COMMITTED", then: str = "") -> None:
        """BEGIN and the transaction's settings (SET LOCAL: nothing outlives the
        transaction, so a pooler may hand the connection on), in one round trip. The
        values are numbers and a checked schema name, written into the statement so
        that it can go as one simple query.

        :param then: a statement to send in the same round trip (a block's savepoint)."""
        idle = 0 if hold is None else int((hold + IDLE_GRACE) * 1000)
        statement = 0 if hold is None else int((hold + lock_wait) * 1000) + 1
        raw.execute(f"BEGIN ISOLATION LEVEL {isolation}; SET LOCAL search_path = "
                    f'"{self._schema}"; SET LOCAL lock_timeout = '
                    f"{max(1, int(lock_wait * 1000))}; SET LOCAL statement_timeout = "
                    f"{statement}; SET LOCAL idle_in_transaction_session_timeout = {idle}"
                    # "full" leaves the server's setting alone (a stronger remote_apply
                    # included); "normal" gives up waiting for the WAL flush.
                    + ("; SET LOCAL synchronous_commit = off"
                       if self._durability == "normal" else "")
                    # A snapshot is taken by the first query, not by BEGIN: take it now.
                    + ("; SELECT 1" if isolation.startswith("REPEATABLE") else "")
                    + (f"; {then}" if then else ""))

    def _run_raw(self, fn: Callable[[psycopg.Connection], T]) -> T:
        """Run ``fn(raw)`` in one transaction (schema work at open)."""
        deadline = time.monotonic() + self.write_timeout
        with self._connection(deadline) as raw:
            try:
                self._begin(raw, self.write_timeout, None)
                result = fn(raw)
                _commit(raw)
                return result
            except BaseException as exc:
                _rollback(raw)
                raise translate(exc, self.path) from exc

    # -- the write path ---------------------------------------------------------------
    @property
    def hold_timeout(self) -> float | None:
        return self._hold

    @property
    def in_transaction(self) -> bool:
        block = self._block()
        return block is not None and block.kind == "write"

    def _block(self) -> "_Block | None":
        """This thread's open block; never one inherited from a parent across fork()."""
        if os.getpid() != self._pid:
            return None
        return getattr(self._local, "block", None)

    def execute_write(self, fn: Callable[[PgConn], T], *, bounded: bool = True) -> T:
        """Run ``fn(conn)`` in one transaction (see the module docstring); inside a
        :meth:`transaction` block of this thread, as a savepoint of it."""
        block = self._block()
        if block is not None:
            if block.kind != "write":
                raise ConfigurationError("cannot write inside a snapshot() block; "
                                         "write after it ends")
            return self._nested(block, fn)
        start = time.monotonic()
        deadline = start + self.write_timeout
        hold = self._hold if bounded else None
        attempt = 0
        while True:
            attempt += 1
            with self._connection(deadline) as raw:
                txn = _Txn(raw, start, hold, self._watchdog)
                try:
                    self._begin(raw, max(0.001, deadline - time.monotonic()), hold)
                    txn.arm(deadline)
                    result = fn(PgConn(raw, txn.locked))
                    txn.check()
                    txn.committing = True
                    _commit(raw)
                except _RETRY as exc:
                    txn.disarm()
                    _rollback(raw)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        self.counters.timeouts += 1
                        raise WriteTimeout(time.monotonic() - start, attempt,
                                           f"PostgreSQL: {exc.sqlstate} {exc}") from exc
                    self.counters.retries += 1
                    time.sleep(backoff(attempt, remaining))
                    continue
                except BaseException as exc:
                    txn.disarm()
                    _rollback(raw, txn.expired)
                    self.counters.failed += 1
                    raise self._error(exc, txn, attempt) from exc
                txn.disarm()
                self._record(txn)
                return result

    def _record(self, txn: "_Txn") -> None:
        c = self.counters
        c.writes += 1
        waited = txn.locked_at - txn.start
        held = time.monotonic() - txn.locked_at
        c.waits.append(waited)
        c.holds.append(held)
        c.longest_wait_s = max(c.longest_wait_s, waited)
        c.longest_hold_s = max(c.longest_hold_s, held)
        if waited > 0.001:
            c.contended += 1

    def _error(self, exc: BaseException, txn: "_Txn", attempt: int) -> BaseException:
        if txn.committing and isinstance(exc, (psycopg.OperationalError,
                                               psycopg.InterfaceError)):
            # Cut off during COMMIT: it may have committed. ConnectionLost says so;
            # HoldTimeout would say that nothing was written.
            return translate(exc, self.path, txn.hold)
        if txn.expired and isinstance(exc, (psycopg.Error, HoldTimeout)):
            self.counters.hold_timeouts += 1
            return HoldTimeout(time.monotonic() - txn.locked_at, txn.hold or 0.0)
        if isinstance(exc, pgerr.LockNotAvailable):
            self.counters.timeouts += 1
            return WriteTimeout(time.monotonic() - txn.start, attempt,
                                "PostgreSQL lock_timeout: another transaction holds a lock "
                                "this write needs")
        return translate(exc, self.path, txn.hold)

    def _nested(self, block: "_Block", fn: Callable[[PgConn], T]) -> T:
        """A call inside a block, as a savepoint that undoes only the call if it fails.
        A savepoint is released by the next call's (the same round trip: RELEASE then
        SAVEPOINT) or by the COMMIT, and the block's first is sent with its BEGIN, so a
        call costs its own statements plus at most one round trip.

        Measured and rejected (a turn of two calls, one process, fsync off, p50): the
        savepoint (and a block's BEGIN) sent ahead of the call's first statement in one
        simple query, that statement bound client-side: 3 round trips instead of 5, but
        720 us against 470, since the server then parses and plans every statement
        (nothing stays prepared) and a round trip on a local socket costs less; psycopg's
        pipeline mode, which keeps prepared statements: more client time per call than
        the round trip it saves (entering and leaving a pipeline costs about a round
        trip). Without that round trip at all (no savepoint before a later call: unsafe)
        a turn measured 1.35x plain psycopg's fewest statements against 1.46x with it:
        the savepoints are a small part of what a turn costs beyond plain psycopg."""
        block.txn.check()
        raw = block.raw
        try:
            # Inside the try: on a connection lost mid-block (a partition, a restart) the
            # SAVEPOINT is the statement that fails, and it must fail typed too.
            if block.savepoint == "used":
                raw.execute(f"RELEASE SAVEPOINT {_SAVEPOINT}; SAVEPOINT {_SAVEPOINT}")
            elif block.savepoint is None:
                raw.execute(f"SAVEPOINT {_SAVEPOINT}")
            block.savepoint = "used"
            result = fn(PgConn(raw))
        except BaseException as exc:
            if not block.txn.expired and block.savepoint is not None:
                # (expired: the block is rolled back as a whole)
                try:
                    raw.execute(f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
                    block.savepoint = "fresh"  # it stays, with nothing after it
                except psycopg.Error:
                    pass  # the connection is gone: the block fails as a whole at its end
            if block.txn.expired and isinstance(exc, psycopg.Error):
                raise HoldTimeout(time.monotonic() - block.txn.start,
                                  block.txn.hold or 0.0) from exc
            if isinstance(exc, _RETRY):
                raise DatabaseBusyError(
                    f"{exc.sqlstate}: {exc} ({self.path}); this call was undone, the "
                    "transaction() block goes on; take locks in the same order in "
                    "concurrent blocks") from exc
            raise translate(exc, self.path, block.txn.hold) from exc
        return result

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._block() is not None:
            raise ConfigurationError("transaction() blocks cannot be nested, nor used "
                                     "inside snapshot()")
        start = time.monotonic()
        deadline = start + self.write_timeout
        with self._connection(deadline) as raw:
            txn = _Txn(raw, start, self._hold, self._watchdog)
            try:
                self._begin(raw, self.write_timeout, self._hold, then=f"SAVEPOINT {_SAVEPOINT}")
            except BaseException as exc:
                _rollback(raw)
                raise translate(exc, self.path) from exc
            txn.locked()  # a block holds what its calls lock until it ends
            self._local.block = _Block("write", raw, txn, savepoint="fresh")
            ok = False
            try:
                yield
                ok = True
            finally:
                self._local.block = None
                if ok and not txn.expired:
                    try:  # still watched: a COMMIT sent into a partition must end too
                        txn.committing = True
                        _commit(raw)
                    except BaseException as exc:
                        txn.disarm()
                        _rollback(raw, txn.expired)
                        self.counters.failed += 1
                        raise self._error(exc, txn, 1) from exc
                    txn.disarm()
                    self._record(txn)
                else:
                    txn.disarm()
                    _rollback(raw, txn.expired)
                    if ok:
                        self.counters.hold_timeouts += 1
                        raise HoldTimeout(time.monotonic() - txn.start, txn.hold or 0.0)

    # -- reads ------------------------------------------------------------------------
    def read(self, fn: Callable[[PgConn], T], snapshot: bool = False) -> T:
        """Run a read; ``snapshot`` runs it as one REPEATABLE READ transaction. Inside a
        block, as a savepoint like a write: a failed statement puts a PostgreSQL
        transaction in its failed state, and without one the block's work would be lost
        at its COMMIT."""
        block = self._block()
        if block is not None:
            return self._nested(block, fn)
        start = time.monotonic()
        deadline = start + self.write_timeout
        # A read is bounded like a write: the wait (write_timeout) plus the hold bound
        # (or write_timeout again without one), server side by statement_timeout, client
        # side by the watchdog, which also ends a read stuck behind a partition.
        hold = self._hold if self._hold is not None else self.write_timeout
        with self._connection(deadline) as raw:
            txn = _Txn(raw, start, hold, self._watchdog)
            try:
                self._begin(raw, self.write_timeout, hold,
                            "REPEATABLE READ READ ONLY" if snapshot else "READ COMMITTED")
                txn.arm(deadline)
                result = fn(PgConn(raw))
                txn.disarm()
                _commit(raw)
                return result
            except BaseException as exc:
                txn.disarm()
                _rollback(raw, txn.expired)
                if isinstance(exc, (psycopg.OperationalError, pgerr.QueryCanceled)) and (
                        txn.expired or isinstance(exc, pgerr.QueryCanceled)):
                    raise DatabaseBusyError(
                        f"a read of {self.path} did not finish within "
                        f"{self.write_timeout + hold:g}s (write_timeout plus hold_timeout) "
                        "and was cancelled: the server is overloaded or cannot be "
                        "reached") from exc
                raise translate(exc, self.path) from exc

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        if self._block() is not None:
            raise ConfigurationError("snapshot() cannot be nested or used inside "
                                     "transaction()")
        deadline = time.monotonic() + self.write_timeout
        with self._connection(deadline) as raw:
            try:
                self._begin(raw, self.write_timeout, None, "REPEATABLE READ READ ONLY")
            except BaseException as exc:
                _rollback(raw)
                raise translate(exc, self.path) from exc
            self._local.block = _Block("read", raw, _Txn(raw, time.monotonic(), None,
                                                         self._watchdog))
            try:
                yield
            finally:
                self._local.block = None
                _rollback(raw)

    # -- long work, operations ----------------------------------------------------------
    def run_steps(self, step: Step, tracker: Tracker | None = None,
                  committed: Callable[[], None] | None = None) -> int:
        """Long work as short write transactions (:func:`sessiondb.maintenance.run_steps`)."""
        return run_steps(self.execute_write, step, step_budget(self._hold), tracker,
                         committed or (lambda: None))

    def between_steps(self) -> None:
        """Nothing to do between steps: the server checkpoints and vacuums by itself."""

    def checkpoint(self, reset: bool = False) -> dict[str, int]:
        """Nothing to do: the server checkpoints by itself (zeros, for the same shape)."""
        check_flag("reset", reset)
        if self._closed:
            raise ClosedError(f"{self!r} is closed; open a new SessionDB")
        return {"wal_frames": 0, "checkpointed_frames": 0}

    def stats(self) -> dict[str, Any]:
        if self._closed:
            raise ClosedError(f"{self!r} is closed; open a new SessionDB")
        figures: dict[str, Any] = self.counters.snapshot()
        figures["pool"] = self._pool.figures()
        figures["backend"] = "postgresql"
        figures["path"] = self.path
        figures["schema"] = self._schema
        figures["durability"] = self._durability
        figures["schema_version"] = pg_schema.SCHEMA_VERSION
        figures["server_version"] = self._server_version
        figures["driver_version"] = psycopg.__version__
        return figures

    def close(self) -> None:
        """Close the pool's connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._pid:
            self._pool.close()

    def __repr__(self) -> str:
        return f"SessionDB({self.path!r}{', closed' if self._closed else ''})"


class _Block:
    """This thread's open transaction() or snapshot() block."""

    __slots__ = ("kind", "raw", "txn", "savepoint")

    def __init__(self, kind: str, raw: psycopg.Connection, txn: "_Txn",
                 savepoint: str | None = None) -> None:
        self.kind, self.raw, self.txn = kind, raw, txn
        #: The calls' savepoint: None (none yet), "fresh" (nothing done after it) or
        #: "used" (a call ran after it; the next call releases it and makes a new one).
        self.savepoint = savepoint


class _Txn:
    """One transaction's clock and its hold bound, watched by :class:`_Watchdog`."""

    __slots__ = ("raw", "start", "hold", "locked_at", "expired", "committing", "_dog",
                 "_seq")

    def __init__(self, raw: psycopg.Connection, start: float, hold: float | None,
                 dog: "_Watchdog") -> None:
        self.raw, self.start, self.hold, self._dog = raw, start, hold, dog
        self.locked_at = start
        self.expired = False
        self.committing = False
        self._seq: int | None = None

    def arm(self, deadline: float) -> None:
        """Until the locks are taken, bound the whole transaction by the wait budget
        plus the hold bound (lock_timeout ends the wait itself)."""
        if self.hold is not None:
            self._seq = self._dog.watch(self, deadline + self.hold)

    def locked(self) -> None:
        self.locked_at = time.monotonic()
        if self.hold is not None:
            self._seq = self._dog.watch(self, self.locked_at + self.hold)

    def disarm(self) -> None:
        self._dog.forget(self)

    def check(self) -> None:
        if self.expired:
            raise HoldTimeout(time.monotonic() - self.locked_at, self.hold or 0.0)


class _Watchdog:
    """One thread per engine finding transactions that hold their locks past
    ``hold_timeout``; each is ended by a thread of its own (:func:`_end`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Txn]] = []
        self._live: dict[int, int] = {}  # id(txn) -> its current entry's sequence number
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, txn: _Txn, deadline: float) -> int:
        seq = next(self._seq)
        with self._cond:
            self._live[id(txn)] = seq
            heapq.heappush(self._heap, (deadline, seq, txn))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="sessiondb-pg-watchdog")
                self._thread.start()
            self._cond.notify()
        return seq

    def forget(self, txn: _Txn) -> None:
        with self._cond:
            self._live.pop(id(txn), None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else 60.0
                    if not self._cond.wait(timeout) and not self._heap:
                        self._thread = None
                        return
                deadline, seq, txn = heapq.heappop(self._heap)
                if self._live.get(id(txn)) != seq:
                    continue
                txn.expired = True
            # One thread per expiry: ending one can take 2 * CANCEL_GRACE (a partition),
            # and the transactions cut off by the same partition must not queue for it.
            threading.Thread(target=_end, args=(txn, seq, self), daemon=True,
                             name="sessiondb-pg-end").start()

    def current(self, txn: _Txn, seq: int) -> bool:
        with self._cond:
            return self._live.get(id(txn)) == seq


def _end(txn: _Txn, seq: int, dog: _Watchdog) -> None:
    """Cancel the statement of an expired transaction. If its owner has not ended the
    transaction :data:`CANCEL_GRACE` seconds later, shut the socket: either a statement
    still runs because the server cannot be reached (a partition), or a block sits idle
    past its bound, and then the next statement it sends could wait forever behind a
    partition, while the server ends such a session anyway
    (``idle_in_transaction_session_timeout``)."""
    if not dog.current(txn, seq):
        return  # ended meanwhile: its connection may already serve another call
    try:
        txn.raw.cancel_safe(timeout=CANCEL_GRACE)
    except Exception:
        pass
    time.sleep(CANCEL_GRACE)
    # IDLE: the transaction is over and the connection about to be reused: leave it.
    if dog.current(txn, seq) and txn.raw.info.transaction_status != \
            psycopg.pq.TransactionStatus.IDLE:
        try:
            with socket.socket(fileno=os.dup(txn.raw.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)  # the dup is closed, the socket is not
        except (OSError, psycopg.Error):
            pass


def _commit(raw: psycopg.Connection) -> None:
    """COMMIT, and make sure it was one: PostgreSQL answers COMMIT of a transaction that
    an error left failed with a ROLLBACK, without an error."""
    if raw.execute("COMMIT").statusmessage != "COMMIT":
        raise StorageError("the transaction had failed and was rolled back by the server at "
                           "its COMMIT (an error inside it was caught and ignored); nothing "
                           "of it was written")


def _rollback(raw: psycopg.Connection, expired: bool = False) -> None:
    """Roll back; a transaction past its hold bound is rolled back by closing its
    connection instead: it is given up (the server ends its session anyway), and a
    ROLLBACK sent through a partition would wait with no bound."""
    try:
        if expired:
            raw.close()
        elif raw.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            raw.execute("ROLLBACK")
    except psycopg.Error:
        pass  # a broken connection: the pool discards it when it comes back
