"""The engine under :class:`~sessiondb.SessionDB`: one connection, the two doors.

An :class:`Engine` owns one apsw connection and everything that keeps it safe to share:
the instance lock, fork handling, the write path (:meth:`Engine.execute_write`), short
reads (:meth:`Engine.read`), :meth:`Engine.transaction`, :meth:`Engine.snapshot`, and
checkpoints. It knows no table: :class:`~sessiondb.SessionDB` holds one and writes the
session API (:mod:`sessiondb.store`) over it; this is SQLite's half of the seam drawn in
:mod:`sessiondb.backend` (PostgreSQL's is :mod:`sessiondb.pg.engine`).

All calls of an instance are serialized by an instance lock, so an instance may be shared
by the threads of a process. Around ``fork()`` every instance is parked and reopened
(:mod:`sessiondb.forks`).

Reads are single short statements or short snapshots (all rows fetched before the lock
is released); no read transaction is ever held across user code, except inside an
explicit :meth:`Engine.snapshot` block.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import apsw
import filelock

from .backend import check_durability, check_hold_timeout, check_seconds_option
from .checkpoint import CheckpointPolicy
from .dialect import SQLITE
from .connection import (
    close_for_fork, create_store, default_path, open_connection, prepare_directory,
    sqlite_version,
)
from . import conversion, filesystems, forks, fts_tables, search_index
from .errors import (
    ClosedError, ConfigurationError, CorruptDatabaseError, DatabaseBusyError, HoldTimeout,
    SessionDBError, StoreReplacedError, WalDeletedError, translate,
)
from .gate import GateTimeout, NullGate, gate_kind, make_gate
from .holding import held
from .procs import READING, claim as claim_slot, watched_gate
from .maintenance import (
    ProgressCallback, Step, Tracker, WalBudget, cache_writes, check_progress, run_steps,
    step_budget,
)
from .replacement import StoreIdentity, StoreMoved, handle_replaced, refuse_replaced
from .schema import SCHEMA_VERSION, build_schema
from .text import check_flag
from .walguard import FilesLost, WalGuard, handle_lost
from .writes import WritePath, backoff, rollback

T = TypeVar("T")


class Engine:
    """One connection to a sessiondb store, safe to share between threads, processes and
    forks; the options are those of :class:`~sessiondb.SessionDB`."""

    sql = SQLITE

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        write_timeout: float = 30.0,
        hold_timeout: float | None = 10.0,
        busy_timeout: float = 0.05,
        checkpoint_every: int = 50,
        wal_limit: int = 64 * 1024 * 1024,
        reset_timeout: float = 1.0,
        journal_size_limit: int = 8 * 1024 * 1024,
        gate: bool | str = "auto",
        vfs: str | None = None,
        durability: str = "full",
        progress: ProgressCallback | None = None,
        unsafe_filesystem: str | None = None,
        procs: bool = True,
    ) -> None:
        for name, value in (("write_timeout", write_timeout), ("busy_timeout", busy_timeout),
                            ("reset_timeout", reset_timeout)):
            check_seconds_option(name, value)
        check_hold_timeout(hold_timeout)
        check_durability(durability)
        gate = gate_kind(gate)  # "ofd", "posix" or "none", for every gate of this instance
        for name, value in (("checkpoint_every", checkpoint_every), ("wal_limit", wal_limit),
                            ("journal_size_limit", journal_size_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(f"{name} must be an int >= 0")
        if vfs is not None and vfs not in apsw.vfs_names():
            raise ConfigurationError(f"no SQLite VFS named {vfs!r} is registered "
                                     f"(registered: {', '.join(apsw.vfs_names())})")
        self.path = Path(path).expanduser() if path is not None else default_path()
        self.path = Path(os.path.abspath(self.path))
        # Before anything is created: a refused store is left as it was (or absent).
        self.filesystem = filesystems.examine(self.path)
        journal = filesystems.use_journal(str(self.path), self.filesystem,
                                          filesystems.policy(unsafe_filesystem))
        self._options = dict(write_timeout=float(write_timeout),
                             hold_timeout=None if hold_timeout is None else float(hold_timeout),
                             busy_timeout_ms=max(1, int(busy_timeout * 1000)),
                             checkpoint_every=checkpoint_every, wal_limit=wal_limit,
                             reset_timeout=float(reset_timeout),
                             journal_size_limit=journal_size_limit, gate=gate, vfs=vfs,
                             durability=durability, progress=check_progress(progress),
                             journal=journal, procs=check_flag("procs", procs))
        self._lock = threading.RLock()
        self._fork_locked = False
        self._ckpt_parked = False
        self._closed = False
        self._conn: apsw.Connection | None = None
        self._lost: WalDeletedError | None = None  # see sessiondb.walguard
        self._replaced: StoreReplacedError | None = None  # see sessiondb.replacement
        self._identity = StoreIdentity(self.path)
        self._open()
        forks.register(self)

    # -- connection lifecycle ---------------------------------------------------------
    def _open(self) -> None:
        forks.refuse_if_forked_busy(self.path)
        o = self._options
        self._rolls = False  # until the store is sessiondb's (a hermes-agent file is not)
        self._roll_after = 0.0  # (monotonic) no seal tried before, after one failed
        if not self.path.exists():
            refuse_replaced(self.path)  # moved away in use: no new store in its place
            prepare_directory(self.path)
            create_store(self.path, lambda tmp: self._new_connection(tmp),
                         lambda conn, tmp: build_schema(conn, partial(
                             WritePath(NullGate(), o["write_timeout"], str(tmp)).run, conn)))
        conn = self._new_connection()
        gate = slot = None
        try:
            self._gate = gate = make_gate(self.path, o["gate"])
            # This instance's row in the process record (sessiondb top), or None.
            self._slot = slot = claim_slot(self.path, o["wal_limit"]) if o["procs"] else None
            self._writes = WritePath(self._gate, o["write_timeout"], str(self.path),
                                     o["hold_timeout"])
            self._walguard = WalGuard(self.path)
            self._walguard.record()
            self._identity.record(conn)
            self._writes.verify = self._verify_files
            # The rollback journal has no WAL: nothing to checkpoint, nothing to bound.
            self._checkpoints = CheckpointPolicy(
                watched_gate(lambda: make_gate(self.path, o["gate"]), slot),
                self._new_connection,
                0 if o["journal"] else o["checkpoint_every"],
                0 if o["journal"] else o["wal_limit"], o["reset_timeout"],
                o["busy_timeout_ms"], conn.filename_wal)
            self._checkpoints.verify = lambda: (self._walguard.lost() is None
                                                and self._identity.intact())
            if slot is not None:
                slot.attach(self._writes.counters, self._checkpoints.counters)
                self._writes.record = slot
                self._checkpoints.on_reset = slot.reset_done
            self._conn = conn
            self._pid = os.getpid()
            # A migration is bounded work that cannot always be split (an index is
            # built in one statement), so it is exempt from the hold bound (the long part
            # of a conversion, its copy, runs in steps within the bound). Both run
            # through read(), which retries a read that meets a commit (busy): rare with
            # WAL, common with the rollback journal, where a commit locks readers out.
            builder = conversion.builder_lock(self.path)
            try:
                self.read(lambda c: conversion.ensure_schema(
                    c, self.path, partial(self.execute_write, bounded=False),
                    o["write_timeout"], self.run_steps, o["progress"],
                    partial(conversion.elect, builder)))
                if self.read(lambda c: search_index.finish_on_open(c)
                             or conversion.leftover(c)):
                    self._finish_conversion(builder)
            finally:
                builder.release(force=True)
            self._rolls = True
        except BaseException:
            self._conn = None
            self._pid = -1  # the next call opens everything again
            conn.close()
            if gate is not None:
                gate.close()
            if slot is not None:
                slot.close()
            raise

    def _finish_conversion(self, builder: filelock.FileLock) -> None:
        """Empty and drop a converted hermes-agent file's old messages table
        (:func:`sessiondb.conversion.drain_step`), index its messages (it is searchable
        once they are) and remove set-aside index tables
        (:func:`sessiondb.search_index.finish_on_open`) in short steps, unless another
        process is at it (:func:`sessiondb.conversion.elect`; the store works meanwhile,
        and search says the index is being built)."""
        if not conversion.elect(builder):
            return
        try:
            # The old table first: until it is gone, deleting a session scans it.
            self.run_steps(conversion.drain_step,
                           Tracker("cleanup", "rows", None, self._options["progress"]))
            search_index.catch_up(self.run_steps, self._options["progress"],
                                  self.read(search_index.pending_total))
        except (DatabaseBusyError, HoldTimeout):
            # Contention (a writer holding the lock past write_timeout, a paused
            # machine): the store works without this work, and search says the index is
            # being built, so the open succeeds and the next one carries on. Raising
            # would refuse a usable store, as no open of a finished one does.
            pass

    def _new_connection(self, new_file: Path | None = None) -> apsw.Connection:
        """A configured connection to the store, or to ``new_file`` (created) while
        :func:`~sessiondb.connection.create_store` builds a store."""
        o = self._options
        return open_connection(new_file or self.path, busy_timeout_ms=o["busy_timeout_ms"],
                               journal_size_limit=o["journal_size_limit"],
                               timeout=o["write_timeout"], vfs=o["vfs"],
                               create=new_file is not None, durability=o["durability"],
                               journal=o["journal"])

    def _park_for_fork(self) -> None:
        """Before fork(): take the instance lock and close an idle connection (see
        :func:`sessiondb.connection.close_for_fork`). Released by :meth:`_unpark`."""
        timeout = self._options["write_timeout"]
        self._fork_locked = self._lock.acquire(timeout=timeout)
        self._ckpt_parked = (self._fork_locked and not self._closed
                             and os.getpid() == self._pid
                             and self._checkpoints.park(timeout))
        conn = self._conn
        if (self._fork_locked and conn is not None and not self._closed
                and os.getpid() == self._pid and conn.get_autocommit()):
            try:
                close_for_fork(conn)
            except apsw.Error:
                return  # still open: the child will refuse this file
            self._conn = None

    def _unpark(self) -> None:
        if self._ckpt_parked:
            self._ckpt_parked = False
            self._checkpoints.unpark()
        if self._fork_locked:
            self._fork_locked = False
            self._lock.release()

    def _in_child(self) -> list[apsw.Connection]:
        """After fork(), in the child: the instance lock is new (the parent's is held by
        the forking thread, or by a thread that does not exist here); returns the
        connections that were mid-transaction at fork time (never to be closed here)."""
        self._lock = threading.RLock()
        self._fork_locked = False
        reset_conn = None if self._ckpt_parked else self._checkpoints.take_connection()
        self._ckpt_parked = False
        if self._closed:
            return []
        return [c for c in (self._conn, reset_conn) if c is not None]

    def close(self) -> None:
        """Run a last PASSIVE checkpoint and close the connection. Idempotent."""
        if os.getpid() == self._pid and not self._closed:
            self._checkpoints.close()  # outside the lock: its thread may be waiting for it
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conn, self._conn = self._conn, None
            if os.getpid() != self._pid:
                return
            if self._slot is not None:
                self._slot.close()
            if conn is None:  # closed for a fork and not reopened since
                self._gate.close()
                return
            try:
                now = self._identity.now()
                if self._replaced is None and now != self._identity.was:
                    self._replaced = handle_replaced(conn, self.path, self._identity.was,
                                                     now)
                lost = None if self._lost or self._replaced else self._walguard.lost()
                if lost is not None:
                    self._lost = handle_lost(conn, self.path, lost)
                if self._lost is None and self._replaced is None:  # never checkpoint an
                    self._checkpoints.passive(conn, escalate=False)  # orphaned WAL
            except (apsw.Error, SessionDBError):
                pass  # a courtesy checkpoint: the frames stay in the WAL for the next one
            finally:
                try:
                    conn.close()
                except apsw.Error as exc:
                    raise translate(exc, str(self.path)) from exc
                finally:
                    self._gate.close()

    def __repr__(self) -> str:
        # Named after the public class that holds it: this is what errors show.
        return f"SessionDB({str(self.path)!r}{', closed' if self._closed else ''})"

    def _connected(self) -> apsw.Connection:
        """A usable connection (reopened after fork); call holding the instance lock,
        as ``with self._lock: conn = self._connected()``. Not a context manager holding
        the lock across a ``yield``: an exception (a signal handler's) landing in
        contextlib's frames around it would keep the lock until garbage collection,
        and every other thread using the instance would wait for it."""
        if self._closed:
            raise ClosedError(f"{self!r} is closed; open a new SessionDB")
        if self._lost is not None:
            raise WalDeletedError(str(self._lost), *self._lost_args())
        if self._replaced is not None:
            e = self._replaced
            raise StoreReplacedError(str(e), e.path, e.marker, e.was, e.now)
        if os.getpid() != self._pid:
            if self._conn is not None:
                forks.inherit(self._conn)
            self._conn = None
            self._open()
        elif self._conn is None:  # closed before a fork: reopen (same gate and stats)
            self._conn = self._new_connection()
            self._walguard.record()  # SQLite may have made new -wal/-shm files
        assert self._conn is not None
        return self._conn

    @property
    def hold_timeout(self) -> float | None:
        return self._options["hold_timeout"]

    @property
    def in_transaction(self) -> bool:
        """True inside a :meth:`transaction` block (of this instance)."""
        return self._writes.active

    # -- the two doors: every write and every read ----------------------------------
    def execute_write(self, fn: Callable[[apsw.Connection], T], *,
                       bounded: bool = True) -> T:
        """Run ``fn(conn)`` in one ``BEGIN IMMEDIATE`` transaction (the only write path).

        Busy errors are retried with jitter until ``write_timeout``; any other exception
        rolls everything back and propagates (apsw errors mapped to sessiondb errors).
        Called inside :meth:`transaction` it joins that transaction (as a savepoint).
        A write that fails only because the full-text index is damaged marks the index
        so and runs again without it (:mod:`sessiondb.search_index`).

        :param bounded: False exempts it from ``hold_timeout``: only for bounded work
            that cannot be split (a schema migration, see
            :meth:`sessiondb.writes.WritePath.run`); long work runs in short steps
            instead (:mod:`sessiondb.maintenance`).
        """
        try:
            return self._write(fn, bounded)
        except CorruptDatabaseError as exc:
            if fn is search_index.mark_damaged or not search_index.is_damage(exc):
                raise
            self._write(search_index.mark_damaged)
            return self._write(fn, bounded)

    def _write(self, fn: Callable[[apsw.Connection], T], bounded: bool = True) -> T:
        with self._lock:
            conn = self._connected()
            if self._writes.active:
                return self._writes.nested(conn, fn)
            if not conn.get_autocommit():
                raise ConfigurationError("cannot write inside a snapshot() block; "
                                         "write after it ends")
            with self._files_guard(conn):
                result = self._writes.run(conn, fn, bounded)
                self._identity.check(committed=True)  # into the old file? (replacement)
            overgrown = self._checkpoints.after_write(conn)
            roll = fn is not fts_tables.roll and self._roll_due(conn)
        if overgrown:  # outside the lock: the background reset may be waiting for it
            self._checkpoints.reset(wait=True, past=self._checkpoints.INLINE_AT, quiet=True)
        if roll:
            self._roll()
        return result

    def _roll_due(self, conn: apsw.Connection) -> bool:
        """True when the full-text index's tail is to be sealed at the next block
        (:mod:`sessiondb.fts_tables`): checked after each write, outside its transaction.
        A check that fails (busy: a commit locks readers out in the rollback journal)
        says no; the next write checks again (a block's last 4,096 ids leave plenty)."""
        if not self._rolls or time.monotonic() < self._roll_after:
            return False
        try:
            return fts_tables.due(conn)
        except apsw.Error:
            return False

    def _roll(self) -> None:
        """Seal the index's tail, a short write of its own after the caller's has
        committed: so its failure is never the caller's (who would retry a write that
        is done). It is tried again a second later; meanwhile the tail only grows past
        its block. Exempt from the hold bound: a seal's DDL cannot be split, and takes a
        few milliseconds."""
        try:
            self._write(fts_tables.roll, bounded=False)
        except (SessionDBError, apsw.Error):
            self._roll_after = time.monotonic() + 1.0

    def _verify_files(self) -> None:
        """Right after BEGIN IMMEDIATE: the files are still the ones this instance
        opened (sessiondb.replacement, sessiondb.walguard)."""
        self._identity.check()
        self._walguard.check()

    @contextmanager
    def _files_guard(self, conn: apsw.Connection) -> Iterator[None]:
        """Turn a lost -wal/-shm, found by the write path after BEGIN (and rolled back),
        into WalDeletedError, and a replaced database file into StoreReplacedError, now
        and for every later call (see sessiondb.walguard, sessiondb.replacement)."""
        try:
            yield
        except FilesLost as exc:
            self._lost = handle_lost(conn, self.path, exc.name)
            raise WalDeletedError(str(self._lost), *self._lost_args()) from None
        except StoreMoved as exc:
            e = self._replaced = handle_replaced(conn, self.path, self._identity.was,
                                                 exc.now, exc.committed)
            raise StoreReplacedError(str(e), e.path, e.marker, e.was, e.now) from None

    def _lost_args(self) -> tuple[str, str, str | None]:
        e = self._lost
        assert e is not None
        return e.path, e.marker, e.rescue

    def read(self, fn: Callable[[apsw.Connection], T], snapshot: bool = False) -> T:
        """Run a read; ``snapshot`` wraps it in one short read transaction. Busy errors
        (rare in WAL mode) are retried like writes; other errors are translated."""
        with self._lock:
            conn = self._connected()
            deadline = time.monotonic() + self._options["write_timeout"]
            attempt = 0
            if self._writes.active:  # a read inside a transaction() block: guarded,
                # since the watchdog may be rolling this connection back
                return self._writes.guarded(partial(self._read_in_block, conn, fn))
            nested = not conn.get_autocommit()
            while True:
                attempt += 1
                try:
                    if snapshot and not nested:
                        conn.execute("BEGIN DEFERRED")
                        try:
                            return fn(conn)
                        finally:
                            conn.execute("COMMIT")
                    return fn(conn)
                except (apsw.BusyError, apsw.LockedError) as exc:
                    if not nested:
                        rollback(conn)  # a half-started read transaction must not stay
                    remaining = deadline - time.monotonic()
                    if nested or remaining <= 0:
                        raise translate(exc, str(self.path)) from exc
                    time.sleep(backoff(attempt, remaining))
                except apsw.Error as exc:
                    if not nested:
                        rollback(conn)
                    raise translate(exc, str(self.path)) from exc

    def _read_in_block(self, conn: apsw.Connection, fn: Callable[[apsw.Connection], T]) -> T:
        try:
            return fn(conn)
        except apsw.Error as exc:
            if isinstance(exc, apsw.InterruptError):
                raise  # guarded() turns it into HoldTimeout (typed)
            raise translate(exc, str(self.path)) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Group several calls into one atomic write transaction::

            with db.transaction():
                db.append_message(sid, "assistant", text)
                db.update_token_counts(sid, output_tokens=120)

        The write lock is taken up front (``BEGIN IMMEDIATE``) and held until the block
        ends: keep the block short and do no slow work (model calls, network) inside it.
        Other threads using this instance wait for the block to finish. Calls inside run
        as savepoints: a call that raises undoes only itself; an exception leaving the
        block rolls back everything.
        """
        with self._lock:
            conn = self._connected()
            if self._writes.active:
                raise ConfigurationError("transaction() blocks cannot be nested")
            if not conn.get_autocommit():
                raise ConfigurationError("cannot write inside a snapshot() block; "
                                         "write after it ends")
            ok = False
            try:  # from before begin: see WritePath.begin
                with self._files_guard(conn):
                    self._writes.begin(conn)
                yield
                ok = True
            finally:
                try:
                    self._writes.finish(conn, ok)
                except BaseException:
                    # Landed as finish was entered, where finish cannot catch it (a
                    # signal handler's exception): end it here (a no-op if the first
                    # call got through). The block's generator is closed on garbage
                    # collection if contextlib's own frames were interrupted.
                    self._writes.finish(conn, False)
                    raise
            if ok:
                with self._files_guard(conn):
                    self._identity.check(committed=True)
            overgrown = self._checkpoints.after_write(conn)
            roll = ok and self._roll_due(conn)
        if overgrown:
            self._checkpoints.reset(wait=True, past=self._checkpoints.INLINE_AT, quiet=True)
        if roll:
            self._roll()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Read several things as of one moment::

            with db.snapshot():
                newest = db.list_sessions(limit=1)
                messages = db.get_messages(newest[0]["id"])

        Every read inside the block sees the store as it was when the block began;
        writing inside it raises :class:`~sessiondb.errors.ConfigurationError`. The block
        holds a read transaction, which keeps the WAL frames written meanwhile from being
        checkpointed: keep it short (sessiondb's own calls never hold one). Other threads
        using this instance wait for the block to finish.

        Snapshots cooperate with WAL resets (:mod:`sessiondb.checkpoint`): while a reset
        is being prepared, a new snapshot waits for it (typically well under a second;
        past ``2 x reset_timeout + 1`` s it proceeds without cooperating).
        """
        with self._lock:
            conn = self._connected()
            if self._writes.active or not conn.get_autocommit():
                raise ConfigurationError("snapshot() cannot be nested or used inside "
                                         "transaction()")
            in_room = self._gate.enter_room(max(2.0, 2 * self._options["reset_timeout"]) + 1)
            try:
                # The SELECT is what starts the read transaction (BEGIN alone defers it).
                try:
                    self.read(lambda c: c.execute(
                        "BEGIN DEFERRED; SELECT 1 FROM sqlite_schema LIMIT 1").fetchall())
                except BaseException:
                    rollback(conn)
                    raise
                pid = os.getpid()
                if self._slot is not None:  # a long snapshot pins the WAL: top shows it
                    self._slot.state(READING, time.monotonic())
                try:
                    yield
                finally:
                    if os.getpid() == pid:  # a fork child must not end the parent's
                        rollback(conn)
                        if self._slot is not None:
                            self._slot.publish()
            finally:
                if in_room:
                    self._gate.leave_room()

    def run_steps(self, step: Step, tracker: Tracker | None = None,
                   committed: Callable[[], None] | None = None) -> int:
        """Run long work as short write transactions (:func:`sessiondb.maintenance.run_steps`)
        with this instance's step budget and a checkpoint between steps.

        :param committed: called after each step that committed (not after one the hold
            bound rolled back, which is run again).
        """
        def between() -> None:
            if committed is not None:
                committed()
            self.between_steps()

        pages = self._checkpoints.step_pages()
        return run_steps(self.execute_write, step, step_budget(self._options["hold_timeout"]),
                         tracker, between, self._pause_for_pollers,
                         WalBudget(pages, cache_writes) if pages else None)

    def _pause_for_pollers(self, seconds: float) -> None:
        """A pause between two steps of long work with this instance's write gate held
        (and its instance lock, which guards the gate's handle): writers queued at the
        gate wait it out, so the lock is free for writers that bypass the gate and poll
        for it (see :func:`sessiondb.maintenance.run_steps`)."""
        with self._lock:
            self._connected()
            try:
                held(partial(self._gate.acquire, seconds), lambda _: time.sleep(seconds),
                     partial(self._gate.release, None))
            except GateTimeout:
                pass  # a long queue: its writers take the lock in turn meanwhile

    def between_steps(self) -> None:
        """After one step of long work (:mod:`sessiondb.maintenance`): the WAL is
        copied into the database as the steps go
        (:meth:`CheckpointPolicy.after_step <sessiondb.checkpoint.CheckpointPolicy.after_step>`)."""
        if not self._writes.active:
            self._checkpoints.after_step()

    # -- operations -------------------------------------------------------------------
    def checkpoint(self, reset: bool = False) -> dict[str, int]:
        """Run a PASSIVE checkpoint now, and a WAL reset (TRUNCATE, see
        :mod:`sessiondb.checkpoint`) if ``reset`` or the WAL is past half of
        ``wal_limit``; returns when both are done. With the rollback journal (an unsafe
        filesystem, :mod:`sessiondb.filesystems`) there is no WAL: returns zeros.

        :raises InvalidArgumentType: ``reset`` is not True or False.
        :raises StorageError: a disk fault stopped it; nothing is lost.
        """
        reset = check_flag("reset", reset)
        with self._lock:
            conn = self._connected()
            if self._writes.active or not conn.get_autocommit():
                raise ConfigurationError("checkpoint() cannot run inside a transaction() "
                                         "or snapshot() block; call it after the block")
            with self._files_guard(conn):
                self._verify_files()  # never copy an orphaned WAL over the database
            if self._options["journal"]:
                return {"wal_frames": 0, "checkpointed_frames": 0}
            result = self._checkpoints.passive(conn, escalate=False, wait=True)
            due = reset or self._checkpoints.over_half()
        if due:  # outside the lock: a background reset in progress may need it
            self._checkpoints.reset(wait=True)
        frames, done = result or (-1, -1)
        return {"wal_frames": frames, "checkpointed_frames": done}

    def stats(self) -> dict[str, Any]:
        """Figures to act on: writes, retries, timeouts, lock-wait percentiles (s),
        longest lock hold (s), checkpoints and their results, current WAL size (bytes)."""
        with self._lock:
            self._connected()
            figures: dict[str, Any] = self._writes.counters.snapshot()
            figures["checkpoint"] = self._checkpoints.counters.snapshot()
            figures["wal_bytes"] = self._checkpoints.wal_bytes()
            figures["gate"] = self._gate.kind
            # Through the gate's own descriptor: opening the sidecar anew and closing it
            # would drop this process's classic locks under the portable gate.
            figures["gate_queue"] = self._gate.queue_depth()
            figures["journal_mode"] = "delete" if self._options["journal"] else "wal"
            figures["filesystem"] = self.filesystem.as_dict()
            figures["durability"] = self._options["durability"]
            slot = self._slot
            figures["procs"] = None if slot is None else {
                "file": slot.path, "slot": slot.index, "error": slot.error or None}
            figures["path"] = str(self.path)
            figures["schema_version"] = SCHEMA_VERSION
            figures["sqlite_version"] = ".".join(map(str, sqlite_version()))
            return figures
