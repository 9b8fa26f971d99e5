"""WAL checkpoint policy: keep the ``-wal`` file small without stalling writers.

SQLite's auto-checkpoint is off (:func:`sessiondb.connection.connection_manual_checkpoints`);
instead every ``checkpoint_every`` writes this instance runs a PASSIVE checkpoint after
leaving the write gate (https://sqlite.org/c3ref/wal_checkpoint_v2.html). PASSIVE never
waits and never blocks anyone, but it cannot copy frames that a reader's snapshot still
needs, so a store whose readers are never all idle would grow its WAL without bound (1.4 -
2.9 GB in 10 s was measured with a reader holding 500 ms transactions back to back).

So when the WAL passes half of ``wal_limit`` a *reset* is requested. The WAL size is known
after every commit (SQLite's WAL hook reports its frame count, at no cost), so the check
runs after every write. A reset runs in a background thread of the instance, so the write
that crossed the line returns at once:

1. *Close the door* of the reader room (:mod:`sessiondb.gate`): new ``snapshot()`` readers
   wait; writers keep going. Only one process's checkpointer can hold the door.
2. *Wait for the room to empty*: the snapshots already open finish (a few hundred ms for
   a TUI's long read); writers still keep going, unless the WAL passes 75% of the limit
   meanwhile (writes faster than one snapshot's worth of WAL fits in the limit): then the
   checkpointer waits inside the write gate, holding writers back until the readers are
   out. This is the only way to bound a WAL that a reader pins; it costs throughput only
   when writes are that fast.
3. With no cooperating reader left, take the instance's connection, run PASSIVE (copies
   nearly everything, blocks nobody), then enter the write gate and run TRUNCATE with a
   short busy timeout: only frames written in the last moments remain to copy, so
   writers queue behind it for milliseconds, fairly, in the gate.
4. Open the door.

If the WAL still grows past 60% of the limit before the background reset got to it (very
large writes), the writer that grew it runs the reset itself before its call returns.

Readers that do not cooperate (another program, or a ``sqlite3`` shell holding a
transaction) make step 3 fail quickly. The reset is then retried at once for up to
``reset_timeout`` (in short calls: :meth:`CheckpointPolicy._checkpoint_until`): the
trade-off made explicit by that option is that writers wait up to ``reset_timeout``
while the reset waits for such a reader. Against a reader that starts its next
transaction the moment it ends one, a TRUNCATE needs about two of its transactions: the
current one must end before the copy completes, and the next one began before the copy
completed, so it holds a read mark that keeps the WAL from restarting (measured: readers
of 0.45 s back to back never defeated the default 1 s; readers of 0.6 s did); readers
that overlap, likewise. So foreign readers whose transactions last more than about
``reset_timeout / 2``, back to back or overlapping, can defeat the bound: raise
``reset_timeout`` to twice the longest foreign read to keep it, at the price of writers
waiting that long per attempt. ``stats()["checkpoint"]["resets_failed"]`` counts the
failed attempts.

*Disk faults* (``SQLITE_FULL``, ``SQLITE_IOERR`` while a checkpoint writes, syncs or
truncates a file) lose nothing: the frames stay in the WAL and the next checkpoint copies
them. They reach the caller that asked for the checkpoint, typed
(:func:`sessiondb.errors.translate`): :meth:`Engine.checkpoint
<sessiondb.engine.Engine.checkpoint>`. A checkpoint that runs because of a write (the
periodic PASSIVE, the background or inline reset) only counts them
(``passive_failed``, ``resets_failed``, ``last_error``): that write has committed, and
raising would report it as failed, so the caller would write it twice. The next write
meets a disk that is still failing on its own.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import apsw

from .connection import close_for_fork
from .errors import SessionDBError, translate
from .gate import Gate, GateTimeout
from .holding import held


@dataclass
class CheckpointCounters:
    passive_runs: int = 0
    passive_busy: int = 0
    passive_failed: int = 0     # a disk fault (not busy) stopped a PASSIVE checkpoint
    resets_ok: int = 0
    resets_failed: int = 0
    resets_skipped: int = 0     # another process's checkpointer was already at it
    step_restarts: int = 0      # WAL restarts made ready after a step (after_step)
    step_restarts_failed: int = 0  # a disk fault (not busy) stopped one of those
    last_wal_frames: int = 0
    last_checkpointed_frames: int = 0
    longest_reset_s: float = 0.0
    last_error: str = ""        # the last disk fault a checkpoint or reset met

    def snapshot(self) -> dict[str, float | int | str]:
        return dict(self.__dict__)


class CheckpointPolicy:
    """Decides when to checkpoint, and how; one per :class:`~sessiondb.SessionDB`.

    Resets run on a connection and a gate handle of their own (opened on first use), so
    that they never need the instance lock: the instance's writers keep going while a
    reset waits for readers or copies pages, and queue in the gate like everyone else
    only for the final TRUNCATE.

    :param open_gate: opens a gate handle with its own descriptor (door, room, tickets).
    :param open_conn: opens a connection configured like the instance's.
    :param every: run a PASSIVE checkpoint after this many writes (0 disables).
    :param wal_limit: bytes; above half of it a reset (TRUNCATE) is attempted.
    :param reset_timeout: seconds a reset may make writers wait for foreign readers.
    :param busy_timeout_ms: the connection's normal busy timeout, restored after a reset.
    """

    QUICK_RESET_MS = 50     # busy timeout of a reset once cooperating readers are out
    HOLD_WRITERS_AT = 0.75  # WAL fraction past which a reset waits for readers in the gate
    INLINE_AT = 0.6         # WAL fraction past which the writer itself resets
    STEP_COPY_AT = 1 / 64   # WAL fraction past which long work has it copied as it goes
    STEP_WAIT_AT = 1 / 8    # WAL fraction past which long work waits for its copy
    STEP_PAGES_AT = 1 / 16  # WAL fraction one step of long work should write at most
    STEP_RESTART_MS = 20    # busy bound of the RESTART checkpoint that follows that copy
    STEP_RESTART_PAUSE = 1.0  # seconds without one after a RESTART that did not get through
    ATTEMPT_MS = 50         # busy timeout of one checkpoint call of a reset (_checkpoint_until)

    def __init__(self, open_gate: Callable[[], Gate],
                 open_conn: Callable[[], apsw.Connection], every: int, wal_limit: int,
                 reset_timeout: float, busy_timeout_ms: int, wal_path: str) -> None:
        self._open_gate = open_gate
        self._open_conn = open_conn
        self._gate: Gate | None = None
        self._conn: apsw.Connection | None = None
        self.every = every
        self.wal_limit = wal_limit
        self.reset_timeout = reset_timeout
        self.busy_timeout_ms = busy_timeout_ms
        self.wal_path = wal_path
        self.counters = CheckpointCounters()
        self._since = 0
        self._frame_bytes = 0
        self._hooked: apsw.Connection | None = None
        self._wal_frames = 0        # WAL size in frames after this connection's last commit
        self._written = 0           # pages the connection had written (DBSTATUS_CACHE_WRITE)
        self._backoff = False       # the last reset failed: wait for the next periodic one
        self._reset_mu = threading.Lock()
        self._wanted = threading.Event()
        self._reset_wanted = False
        # Copies asked for by after_step, and done (a copy serves every request made
        # before it started).
        self._copy_cv = threading.Condition()
        self._copy_asked = self._copy_done = 0
        self._restart_after = 0.0   # no step RESTART before this time (monotonic)
        self._stopped = False
        #: False when the -wal/-shm are no longer SQLite's (set by the engine, walguard):
        #: then no checkpoint runs
        self.verify: Callable[[], bool] = lambda: True
        #: told of every TRUNCATE attempt, (ok, seconds): the process record
        #: (sessiondb.procs) keeps the store's last one for `sessiondb top`
        self.on_reset: Callable[[bool, float], None] | None = None
        self._thread: threading.Thread | None = None

    def after_write(self, conn: apsw.Connection) -> bool:
        """Count a committed write; checkpoint when due. Call outside the write gate.

        :returns: True when the background reset has not kept up (huge writes, or it
            is waiting for a reader), the WAL is past 60% of the limit, and this write
            grew it: it took the WAL past that line, or wrote a sixteenth of the limit
            itself. The caller must then call ``reset(wait=True, past=0.6)`` once it has
            let go of the instance lock, so that the writer that grows the WAL pays for
            it. A small write that finds the WAL already past the line (grown by another
            process's large write, whose own call resets it) only requests the
            background reset: at ten million messages an appender's small writes after
            a maintenance step of 95 MB each reset the WAL inline, 1.1 s per call, for
            a maintainer that was copying it already (measured).
        """
        if self._hooked is not conn:
            self.attach(conn)
        written = int(conn.status(apsw.SQLITE_DBSTATUS_CACHE_WRITE)[0])
        grew = max(0, written - self._written) * self._frame_bytes
        self._written = written
        self._since += 1
        if self.every and self._since >= self.every:
            try:
                self.passive(conn)
            except SessionDBError:
                pass  # counted by passive(); the write has committed (module docstring)
        elif not self._backoff and self._over(0.5):
            self._request_reset()
        if self._backoff or not self._over(self.INLINE_AT):
            return False
        line = self.wal_limit * self.INLINE_AT
        before = self._wal_frames * self._frame_bytes - grew
        return before <= line or grew >= self.wal_limit * self.STEP_PAGES_AT

    def attach(self, conn: apsw.Connection) -> None:
        """Follow the WAL size through SQLite's WAL hook (called after each commit of
        this connection, https://sqlite.org/c3ref/wal_hook.html). The hook only records
        the figure: checkpointing there would run inside the write gate."""
        conn.set_wal_hook(self._on_commit)
        self._hooked = conn
        self._frame_bytes = int(conn.pragma("page_size")) + 24

    def step_pages(self) -> int:
        """The pages one step of long work should write at most: half of what
        :meth:`after_step` lets the WAL hold before it waits for the copy
        (:class:`sessiondb.maintenance.WalBudget`); 0 with no ``wal_limit``."""
        if not self.wal_limit or not self._frame_bytes:
            return 0
        return max(1, int(self.wal_limit * self.STEP_PAGES_AT) // self._frame_bytes)

    def _on_commit(self, conn: apsw.Connection, dbname: str, frames: int) -> int:
        if dbname == "main":
            self._wal_frames = frames
        return apsw.SQLITE_OK

    def passive(self, conn: apsw.Connection, escalate: bool = True, wait: bool = False
                ) -> tuple[int, int] | None:
        """Run a PASSIVE checkpoint; request a reset if the WAL is past half the limit.

        :param wait: if this policy's own background thread is checkpointing (a copy
            between steps, a reset), wait for it and then run (an explicit checkpoint
            must not come back having copied nothing because of its own instance).
        :returns: (frames in the WAL, frames checkpointed), or None if another
            checkpoint was running (or a disk fault stopped the last one of a closing
            instance).
        :raises StorageError: a disk fault stopped it (:class:`DiskFullError` for
            ``SQLITE_FULL``); nothing is lost, the frames stay in the WAL.
        """
        self._since = 0
        self._backoff = False
        if not self.verify():
            return None  # an orphaned WAL must never be copied (sessiondb.walguard)
        try:
            # "main" only: without a name SQLite checkpoints every attached database
            # (a bulk import's read-only staging file fails that: sessiondb.bulk_stage)
            # and the frame counts it returns are undefined.
            frames, done = conn.wal_checkpoint(dbname="main",
                                               mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except (apsw.BusyError, apsw.LockedError):
            if wait and threading.current_thread() is not self._thread:
                with self._reset_mu:  # held while the background thread checkpoints
                    pass
                return self.passive(conn, escalate)
            self.counters.passive_busy += 1
            return None
        except apsw.Error as exc:
            self.counters.passive_failed += 1
            self.counters.last_error = repr(exc)
            if self._stopped:
                # The instance's close(): its last checkpoint is a courtesy; the frames
                # stay in the WAL and the next open (or checkpoint) copies them.
                return None
            raise translate(exc, conn.filename) from exc
        c = self.counters
        c.passive_runs += 1
        c.last_wal_frames, c.last_checkpointed_frames = frames, done
        self._wal_frames = frames
        if escalate and self._over(0.5):
            self._request_reset()
        return frames, done

    def after_step(self) -> None:
        """After one step of long work (:mod:`sessiondb.maintenance`), outside the
        transaction: have the WAL copied into the database by the policy's background
        thread (PASSIVE, on its own connection), and once the WAL holds
        :data:`STEP_WAIT_AT` of ``wal_limit``, wait for that copy and then make the WAL
        start again from its beginning (:meth:`_restart_after_step`).

        Maintenance writes megabytes of WAL per step. Copied as it goes, the periodic
        PASSIVE that other writers run after their own writes (on the path of their
        calls) finds the checkpointer busy or little to copy, instead of copying the
        steps' megabytes itself (up to hundreds of ms of a writer's call, measured).
        Waiting now and then lets the copy catch up with the steps, and the RESTART
        after it has the next write start the WAL again from its beginning: the WAL
        stays near that size and never reaches the reset threshold, whose TRUNCATE
        every writer would wait for.

        Below :data:`STEP_COPY_AT` of ``wal_limit`` (1 MB of the default) nothing is
        asked: the periodic PASSIVE copies a WAL that small in a moment, and short work
        on a small store leaves no copy running behind it (a ``checkpoint()`` right
        after it reports the same figures however the threads were scheduled)."""
        if self._stopped or not self.wal_limit or not self._over(self.STEP_COPY_AT):
            return
        wait = self._over(self.STEP_WAIT_AT)
        with self._copy_cv:
            self._copy_asked += 1
            asked = self._copy_asked
        self._request()
        deadline = time.monotonic() + max(2.0, 2 * self.reset_timeout)
        if wait and self._wait_for_copy(asked, deadline):
            self._restart_after_step()

    def _restart_after_step(self) -> None:
        """A RESTART checkpoint inside the write gate, while no snapshot reader is in
        the room: it copies the frames that other writers committed during the copy
        (few: writers queue at the gate meanwhile) and has the next writer start the
        WAL again from its beginning, overwriting the file rather than growing it.

        A wholly copied WAL alone did not do it: beside a process appending every 5-10
        ms, the copy after a step was complete nearly every time (PASSIVE reported every
        frame copied), and still the next commits went on at the end of the WAL, which
        grew to the reset threshold (half of ``wal_limit``) again and again: 4 to 8
        resets per 300,000 imported messages, and waits for copies after most steps
        (measured). A RESTART waits, within its busy bound, until no
        connection reads from the WAL, which is what lets the next writer start it
        again (https://sqlite.org/c3ref/wal_checkpoint_v2.html).

        It is skipped while a ``snapshot()`` reader is in the room (it would wait for
        that reader, writers queued behind it), when another process's checkpointer
        holds the door, and for :data:`STEP_RESTART_PAUSE` after one that did not get
        through within :data:`STEP_RESTART_MS` (a reader that does not cooperate): the
        steps then go on as with the copy alone, and the WAL's bound is kept by resets
        as always. A disk fault is only counted, as for the copy."""
        if time.monotonic() < self._restart_after:
            return
        with self._reset_mu:
            if self._stopped or not self.verify():
                return
            if self._gate is None:
                self._gate = self._open_gate()
            if self._conn is None:
                self._conn = self._open_conn()
            gate, conn = self._gate, self._conn
            # The gate first, within the busy bound, and the door only then, without
            # waiting: a shut door stops new snapshot readers, so it must never stay
            # shut while this waits for a writer to leave the gate.
            try:
                done = held(partial(gate.acquire, self.STEP_RESTART_MS / 1000),
                            lambda _: held(partial(gate.close_door, 0),
                                           partial(self._restart, gate, conn),
                                           gate.open_door),
                            gate.release)
            except GateTimeout:
                return
            if done is False:
                return
            if done is None:
                self._restart_after = time.monotonic() + self.STEP_RESTART_PAUSE
                return
            c = self.counters
            c.step_restarts += 1
            c.last_wal_frames, c.last_checkpointed_frames = done
            self._wal_frames = done[0]

    def _restart(self, gate: Gate, conn: apsw.Connection, shut: bool
                 ) -> tuple[int, int] | bool | None:
        """The RESTART of :meth:`_restart_after_step`, in the gate, once the door is
        ``shut`` (by this handle): its figures; None if it did not get through; False
        if it was not tried (the door not ours, or a snapshot reader in the room)."""
        try:
            if not shut or not gate.empty_room(0):
                return False
            return self._checkpoint_until(conn, apsw.SQLITE_CHECKPOINT_RESTART,
                                          self.STEP_RESTART_MS,
                                          lambda frames, copied: frames == copied)
        except apsw.Error as exc:
            self.counters.step_restarts_failed += 1
            self.counters.last_error = repr(exc)
            return None

    def _checkpoint_until(self, conn: apsw.Connection, mode: int, busy_ms: int,
                          ok: Callable[[int, int], bool]) -> tuple[int, int] | None:
        """A checkpoint in ``mode``, tried again until ``busy_ms`` have passed while it
        is not ``ok(frames, copied)``; the last figures, or None if it never was.
        SQLITE_BUSY comes at once, without the busy handler, while another connection
        runs a checkpoint (the PASSIVE a writer of this process runs after its write,
        outside the gate, or another process's): it ends in milliseconds, so it is
        tried again. Readers that pin the WAL are waited for by the busy handler, but
        each call for at most :data:`ATTEMPT_MS`, then a new call, up to the bound.

        One call that waits out the whole bound can wait for nothing. SQLite's
        checkpoint reads each reader slot's mark once, and then waits for the lock of
        a slot whose reader is behind the end of the WAL; when that reader ends, a
        reader starting next may take the freed slot with a mark at the end of the WAL,
        and readers that overlap keep it taken: the reader that was waited for is long
        gone, and the call waits to its timeout. Against a foreign process keeping two
        0.3 s read transactions open in turns, a half period apart, 9 of 20 resets
        waited out their 1 s so (6 of 12 waited out all of a 3 s bound: a longer
        ``reset_timeout`` does not help), while calls of 50 ms within the same 1 s got
        through 20 of 20 times, in 0.42 - 0.59 s (measured): a new call reads the
        marks again and passes that slot."""
        conn.set_busy_timeout(min(busy_ms, self.ATTEMPT_MS))
        until = time.monotonic() + busy_ms / 1000
        try:
            while True:
                try:
                    frames, copied = conn.wal_checkpoint(dbname="main", mode=mode)
                    if ok(frames, copied):
                        return frames, copied
                except (apsw.BusyError, apsw.LockedError):
                    pass
                if time.monotonic() >= until:
                    return None
                time.sleep(0.002)
        finally:
            conn.set_busy_timeout(self.busy_timeout_ms)

    def _wait_for_copy(self, asked: int, deadline: float) -> bool:
        """Wait until the copy asked for as number ``asked`` is done; False if it is not
        by ``deadline`` (or the thread is gone)."""
        with self._copy_cv:
            while self._copy_done < asked and not self._stopped:
                left = deadline - time.monotonic()
                thread = self._thread  # (a fork child has its parent's, not alive)
                if left <= 0 or thread is None or not thread.is_alive():
                    return False
                self._copy_cv.wait(left)
            return not self._stopped

    def over_half(self) -> bool:
        """True when the WAL is past half of ``wal_limit`` (a reset is due)."""
        return self._over(0.5)

    def over(self, fraction: float) -> bool:
        """True when the WAL is past ``fraction`` of ``wal_limit``."""
        return self._over(fraction)

    def _over(self, fraction: float) -> bool:
        return bool(self.wal_limit) and (
            self._wal_frames * self._frame_bytes > self.wal_limit * fraction)

    # -- resets, in a background thread --------------------------------------------
    def _request_reset(self) -> None:
        if self._stopped or self._backoff:
            return
        self._reset_wanted = True
        self._request()

    def _request(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._reset_loop, daemon=True,
                                            name="sessiondb-checkpoint")
            self._thread.start()
        self._wanted.set()

    def _reset_loop(self) -> None:
        while True:
            self._wanted.wait()
            if self._stopped:
                return
            self._wanted.clear()
            reset, self._reset_wanted = self._reset_wanted, False
            with self._copy_cv:
                asked = self._copy_asked
            try:
                if reset and not self._backoff:
                    self.reset(quiet=True)
                elif asked > self._copy_done:
                    self._copy()
            except Exception:  # closed underneath us, or the OS failed: stop; a later
                self._thread = None  # request starts a new thread
                return
            finally:
                with self._copy_cv:  # (a reset copies everything too)
                    self._copy_done = max(self._copy_done, asked)
                    self._copy_cv.notify_all()

    def _copy(self) -> None:
        """The PASSIVE checkpoint that :meth:`after_step` requested; a busy
        checkpointer (another process's) or a disk fault is only counted, as for the
        periodic one."""
        with self._reset_mu:
            if self._stopped or not self.verify():
                return
            if self._conn is None:
                self._conn = self._open_conn()
            try:
                self.passive(self._conn, escalate=False)
            except SessionDBError:
                pass  # counted by passive(); the step that asked has committed

    def reset(self, wait: bool = False, past: float = 0.0, *,
              quiet: bool | None = None) -> bool:
        """Reset the WAL cooperatively (see the module docstring); True on success.
        A failed reset is retried at the next periodic checkpoint, not before.

        :param wait: if another reset is running, wait for it; else return False at once.
        :param past: reset only if the WAL is still past this fraction of the limit.
        :param quiet: count a disk fault and return False instead of raising it. The
            default is quiet for a writer's inline reset (``past`` given), whose own
            write has already committed, and loud for an explicit request.
        :raises StorageError: (unless quiet) a disk fault stopped the reset; nothing is
            lost, the frames stay in the WAL.
        """
        if quiet is None:
            quiet = past > 0
        if not wait and self._reset_mu.locked():
            return False  # the background thread is at it
        # ``with``, not acquire() and try: an exception raised by a signal handler as
        # acquire() returned would keep the lock for good, and every later reset and
        # close() would wait for it. (Without ``wait`` this may wait for a reset that
        # began just now, and then run: the background thread, the only such caller.)
        with self._reset_mu:
            try:
                return self._reset(past)
            except (apsw.Error, SessionDBError) as exc:  # busy is handled inside: disk
                self.counters.resets_failed += 1
                self.counters.last_error = repr(exc)
                self._backoff = True
                if quiet:
                    return False
                if isinstance(exc, SessionDBError):
                    raise
                raise translate(exc, self.wal_path.removesuffix("-wal")) from exc

    def _reset(self, past: float) -> bool:
        """The body of :meth:`reset`, under ``_reset_mu``."""
        if past and self._backoff:
            return False  # one failed meanwhile (it waited for us): retry next period
        if past and not self._over(past):
            return True  # another reset got there first
        if self._stopped or not self.verify():
            return False  # (an orphaned WAL: the next write reports it, walguard)
        if self._gate is None:
            self._gate = self._open_gate()
        if self._conn is None:
            self._conn = self._open_conn()
        gate, conn = self._gate, self._conn
        ok = held(partial(gate.close_door, 0.1), partial(self._reset_in_room, gate, conn),
                  gate.open_door)
        if ok is None:
            self.counters.resets_skipped += 1
            return False
        if ok:
            self.counters.resets_ok += 1
        else:
            self.counters.resets_failed += 1
        self._backoff = not ok
        return ok

    def _reset_in_room(self, gate: Gate, conn: apsw.Connection, shut: bool
                       ) -> bool | None:
        """Steps 2 and 3 of a reset (the module docstring), once the door is ``shut``
        by this handle: whether the WAL was reset; None if the door was not ours."""
        if not shut:
            return None
        deadline = time.monotonic() + max(2.0, 2 * self.reset_timeout)
        emptied = self._wait_for_room(gate, deadline)
        ok = self._truncate(conn, self.QUICK_RESET_MS, None if emptied else deadline)
        if not ok:  # a reader that does not cooperate: wait for it, writers too
            ok = self._truncate(conn, int(self.reset_timeout * 1000))
        return ok

    def _wait_for_room(self, gate: Gate, deadline: float) -> bool:
        """Wait for the snapshot readers inside to leave, while writers keep going, but
        only until the WAL passes ``HOLD_WRITERS_AT`` of the limit. True: room empty."""
        while time.monotonic() < deadline:
            if gate.empty_room(0.005):
                return True
            if self.wal_limit and self.wal_bytes() > self.wal_limit * self.HOLD_WRITERS_AT:
                return False
        return False

    def _truncate(self, conn: apsw.Connection, busy_ms: int,
                  readers_until: float | None = None) -> bool:
        """PASSIVE outside the gate, then TRUNCATE inside it (writers queue meanwhile).

        :param readers_until: the snapshot readers have not left yet: wait for them (up
            to this time) inside the gate, holding writers back; that is what bounds
            the WAL when writes outpace what one long snapshot pins.
        """
        assert self._gate is not None
        gate = self._gate
        if readers_until is not None:
            try:
                held(partial(gate.acquire, self.reset_timeout),
                     lambda _: gate.empty_room(max(0.0, readers_until - time.monotonic())),
                     gate.release)
            except GateTimeout:
                return False
        try:
            self._wal_frames, _ = conn.wal_checkpoint(dbname="main",
                                                      mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except (apsw.BusyError, apsw.LockedError):
            pass
        start = time.monotonic()
        try:
            ok = held(partial(gate.acquire, max(self.reset_timeout, busy_ms / 1000)),
                      lambda _: self._checkpoint_until(
                          conn, apsw.SQLITE_CHECKPOINT_TRUNCATE, busy_ms,
                          lambda frames, _: frames == 0) is not None,
                      gate.release)
        except GateTimeout:
            return False
        c = self.counters
        c.longest_reset_s = max(c.longest_reset_s, time.monotonic() - start)
        if self.on_reset is not None:
            self.on_reset(ok, time.monotonic() - start)
        if ok:
            c.last_wal_frames = c.last_checkpointed_frames = self._wal_frames = 0
        return ok

    def close(self) -> None:
        """Stop the background thread and close what resets opened (call without holding
        the instance lock)."""
        self._stopped = True
        self._wanted.set()
        with self._copy_cv:
            self._copy_cv.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        with self._reset_mu:
            conn, self._conn = self._conn, None
            gate, self._gate = self._gate, None
            try:
                if conn is not None:
                    conn.close()
            except apsw.Error:
                # Closed all the same. It holds no transaction (resets run under
                # _reset_mu), so nothing is lost; raising here would stop the instance's
                # close() before its own connection and gate are closed.
                pass
            finally:
                if gate is not None:
                    gate.close()

    def park(self, timeout: float) -> bool:
        """Before fork(): wait for a reset in progress, close the reset connection (see
        :func:`sessiondb.connection.close_for_fork`) and keep resets out until
        :meth:`unpark`. Returns whether it got hold (then call unpark)."""
        if not self._reset_mu.acquire(timeout=timeout):
            return False
        if self._conn is not None:
            conn, self._conn = self._conn, None
            close_for_fork(conn)
        return True

    def take_connection(self) -> apsw.Connection | None:
        """Forget (and return) the reset connection: used in a fork child, where it must
        never be used or closed."""
        conn, self._conn = self._conn, None
        return conn

    def unpark(self) -> None:
        self._reset_mu.release()

    def wal_bytes(self) -> int:
        """Current size of the ``-wal`` file (``os.stat`` only; the file is never opened)."""
        try:
            return os.stat(self.wal_path).st_size
        except OSError:
            return 0
