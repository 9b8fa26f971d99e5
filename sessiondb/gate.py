"""The write gate: a FIFO queue of writers, kept by the kernel, in a sidecar file.

Why a gate at all: SQLite's busy handler sleeps on a fixed schedule (1, 2, 5 ... 100 ms),
so waiting writers of different processes poll in lock-step, a writer that just committed
re-takes the lock microseconds later, and old waiters starve (a *convoy*: 30 s stalls with
16 processes on this project's machine). Here a waiter sleeps in the kernel and is woken
the moment its predecessor leaves, in ticket order. Correctness never depends on the
gate: every write still runs ``BEGIN IMMEDIATE`` under SQLite's own locking, so a writer
that bypasses the gate (the ``sqlite3`` shell, another library) is merely unfair, never
unsafe.

How it works (a ticket lock built from kernel locks, so a dead holder frees it): the
sidecar ``<db>.sessiondb-gate`` holds two counters, ``next`` and ``done``, and one lock
byte per ticket slot. To enter, a writer briefly locks the *dispenser* byte, takes ticket
``t = next`` (``next += 1``), locks its own slot byte ``t``, and lets go of the
dispenser. If ``done == t - 1`` the gate is free: that is the whole uncontended path
(five system calls, a few microseconds). Otherwise it blocks on slot ``t - 1``, i.e. in
the kernel until its predecessor leaves. A holder leaves by writing ``done = t`` and
unlocking slot ``t``. A predecessor that died or gave up leaves its slot unlocked without
advancing ``done``; the waiter then walks one ticket further back, so crashed or impatient
writers never wedge the queue.

The locks are Linux *open file description* locks (``F_OFD_SETLKW``): unlike classic
POSIX locks they belong to this file descriptor, not to the process, so two
:class:`~sessiondb.SessionDB` instances in one process exclude each other, and closing an
unrelated descriptor never drops them. A blocking lock call has no timeout, so the wait
runs in a short-lived helper thread while the caller waits on an event with the remaining
time budget; a caller that gives up (a timeout, or any exception while queued, Ctrl-C
included) unlocks its slot (its successors walk past it), and the helper lets go of the
predecessor's slot as soon as the kernel hands it over.
A fork child closes its inherited copies of the sidecar descriptor at once (they share
the parent's locks, and would keep a killed parent's ticket alive) and opens its own on
first use.

*Turns.* Handing the gate to another process costs more than the syscalls: after another
connection wrote, SQLite drops its page cache, so a process's first write after a switch
takes about twice as long as the next ones (0.3 ms more, measured), plus the wake-up of
the next process. A process that just committed therefore keeps the gate for its next
write if that write comes at once: a helper thread hands the gate on after
``IDLE_RELEASE`` without a next write, and a turn ends after ``TURN_WRITES`` writes or
once it has lasted ``TURN_SECONDS``, whichever comes first. The cap is unconditional
(kept even while others wait), which is what recovers the plain setup's throughput on
tiny transactions. A process whose writes usually come further apart than
``IDLE_RELEASE`` (a moving average of the gap; an agent thinking between turns) gets no
turns at all and hands the gate on at once, so it never makes others wait for an idle
timer.

Where OFD locks do not exist (macOS, Windows) :class:`NullGate` is used: writes then rely
on ``BEGIN IMMEDIATE`` plus jittered retry alone (fair enough for a few processes; the
convoy protection is Linux-only).
"""

from __future__ import annotations

import errno
import os
import queue
import random
import struct
import sys
import threading
import time
import weakref
from pathlib import Path

from .errors import DatabaseOpenError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Gate", "FifoGate", "NullGate", "GateTimeout", "ofd_locks_available", "make_gate"]

# Byte offsets in the sidecar file.
_DISPENSER = 0          # lock byte guarding the counters
_DOOR = 2               # reader room: snapshot readers pass through the door (shared) ...
_ROOM = 3               # ... and stay in the room (shared); a checkpointer locks both
_COUNTERS = 8           # u64 next, u64 done (little endian), read and written with pread/pwrite
_SLOT_BASE = 1 << 20    # lock byte of ticket t: _SLOT_BASE + t % _SLOTS
_SLOTS = 1 << 20        # more outstanding tickets than this is impossible in practice
_PAIR = struct.Struct("<QQ")
_ONE = struct.Struct("<Q")
# struct flock on LP64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (0 for OFD locks), padding.
_FLOCK = struct.Struct("hhqqi4x")


class GateTimeout(Exception):
    """The gate could not be entered before the deadline (internal; becomes WriteTimeout)."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"write gate not acquired after {waited_s:.3f}s")
        self.waited_s = waited_s


def ofd_locks_available() -> bool:
    """True where Linux open-file-description locks exist (the FIFO gate's foundation)."""
    return fcntl is not None and sys.platform.startswith("linux") and hasattr(
        fcntl, "F_OFD_SETLKW"
    )


class Gate:
    """Interface of a write gate. ``acquire`` returns seconds waited and whether it had
    to queue; ``release`` lets the next writer in."""

    def acquire(self, timeout: float) -> tuple[float, bool]:
        raise NotImplementedError

    def release(self, held: float | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    # The reader room (see sessiondb.checkpoint): long readers wait at the door while a
    # checkpointer resets the WAL; the checkpointer waits for the room to empty.
    def enter_room(self, timeout: float) -> bool:
        return False

    def leave_room(self) -> None:
        pass

    def close_door(self, timeout: float) -> bool:
        return True

    def empty_room(self, timeout: float) -> bool:
        return True

    def open_door(self) -> None:
        pass


class NullGate(Gate):
    """No queue: writers meet only at SQLite's lock (the fallback without OFD locks)."""

    def acquire(self, timeout: float) -> tuple[float, bool]:
        return 0.0, False

    def release(self, held: float | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class _Wait:
    """State shared by a waiting caller and its helper thread."""

    __slots__ = ("lock", "event", "acquired", "abandoned", "error")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.event = threading.Event()
        self.acquired = False
        self.abandoned = False
        self.error: BaseException | None = None


class FifoGate(Gate):
    """The kernel-queued FIFO ticket gate described in the module docstring.

    Not thread-safe on its own: the owning :class:`~sessiondb.SessionDB` serializes
    calls with its instance lock (one ticket per instance at a time).

    :param path: the sidecar file; created 0600, never followed if it is a symlink.
    """

    TURN_WRITES = 64        # a turn ends after this many writes ...
    TURN_SECONDS = 0.020    # ... or once it has lasted this long
    IDLE_RELEASE = 0.0002   # a kept gate is handed on after this long without a write

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = self._open(path)
        self._pid = os.getpid()
        self._ticket: int | None = None
        self._new_turn_state()
        _GATES.add(self)

    def _new_turn_state(self) -> None:
        self._mu = threading.Lock()
        self._cv = threading.Condition(self._mu)
        self._kept = False          # between two writes of one turn
        self._kept_since = 0.0
        self._turn_start = 0.0
        self._turn_writes = 0
        self._idle_thread: threading.Thread | None = None
        self._waiter: threading.Thread | None = None
        self._idle_asleep = False   # the idle thread waits with no timeout
        self._released_at = 0.0     # when the last committed write released (or kept)
        self._gap = 0.0             # moving average of the time from a commit to the next
                                    # write: a process that pauses gets no turns

    @staticmethod
    def _open(path: Path) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(
            os, "O_CLOEXEC", 0
        )
        return os.open(path, flags, 0o600)

    # -- kernel lock primitives -------------------------------------------------------
    def _lock(self, offset: int, wait: bool, shared: bool = False) -> bool:
        cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        try:
            fcntl.fcntl(self._fd, cmd, _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _unlock(self, offset: int) -> None:
        fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK,
                    _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))

    @staticmethod
    def _slot(ticket: int) -> int:
        return _SLOT_BASE + ticket % _SLOTS

    def _done(self) -> int:
        raw = os.pread(self._fd, _ONE.size, _COUNTERS + _ONE.size)
        return _ONE.unpack(raw.ljust(_ONE.size, b"\0"))[0]

    # -- public -----------------------------------------------------------------------
    def acquire(self, timeout: float) -> tuple[float, bool]:
        """Enter the gate, waiting at most ``timeout`` seconds.

        :returns: (seconds waited, whether the gate was contended).
        :raises GateTimeout: the deadline passed; this writer's place was given up.
        """
        if os.getpid() != self._pid:
            self._after_fork()
        with self._mu:
            now = time.monotonic()
            if self._released_at:  # learn how soon this process writes again
                gap = now - self._released_at
                self._gap = 0.75 * self._gap + 0.25 * gap
                self._released_at = 0.0
            if self._kept:  # this process's turn goes on
                self._kept = False
                return 0.0, False
        if self._ticket is not None:
            # A second ticket on the same open file description would "lock" our own
            # slot (OFD locks never conflict with themselves) and then unlock it while
            # we still hold the gate, letting the next writer in early.
            raise RuntimeError("this gate is already held; release it first")
        start = time.monotonic()
        try:
            entered = self._enter(start, start + timeout)
            self._turn_start, self._turn_writes = time.monotonic(), 0
            return entered
        except BaseException:
            # A timeout, an OS error, or KeyboardInterrupt (any exception a signal
            # handler raises, wherever it lands): never leave the dispenser or a ticket
            # behind, or every writer of every process would wedge behind it. Giving up
            # a ticket that had already entered is safe as well: its successors treat it
            # as a dead holder's and walk past it.
            try:
                self._unlock(_DISPENSER)  # a no-op unless this description holds it
                if self._ticket is not None:
                    self._give_up(self._ticket)
            except OSError:  # e.g. the gate was closed: the original error matters
                pass
            raise

    def _enter(self, start: float, deadline: float) -> tuple[float, bool]:
        ticket, done = self._take_ticket(deadline, start)
        if done >= ticket - 1:
            return time.monotonic() - start, False
        wait = _Wait()
        try:
            self._waiter_queue().put((ticket, wait))
            wait.event.wait(max(0.0, deadline - time.monotonic()))
        finally:
            with wait.lock:
                if not wait.acquired:
                    wait.abandoned = True
        if wait.error is not None:
            raise wait.error
        if wait.abandoned:
            raise GateTimeout(time.monotonic() - start)
        return time.monotonic() - start, True

    def release(self, held: float | None = None) -> None:
        """Leave the gate: mark this ticket done and wake the successor.

        :param held: seconds the write that just committed held the gate; a short one
            keeps this process's turn going (see "Turns" in the module docstring).
            None (a failed write, a checkpoint, close) always leaves.
        """
        try:
            if held is not None and self._ticket is not None:
                with self._mu:
                    self._turn_writes += 1
                    now = self._released_at = time.monotonic()
                    if (self._gap < self.IDLE_RELEASE
                            and self._turn_writes < self.TURN_WRITES
                            and now - self._turn_start < self.TURN_SECONDS):
                        if self._idle_thread is None:
                            self._idle_thread = threading.Thread(
                                target=self._idle_loop, daemon=True,
                                name="sessiondb-gate-idle")
                            self._idle_thread.start()
                        self._kept, self._kept_since = True, now
                        if self._idle_asleep:
                            self._cv.notify()
                        return
        except BaseException:  # e.g. a signal handler's exception: never keep by accident
            with self._mu:
                self._kept = False
                self._leave()
            raise
        with self._mu:
            self._kept = False
            self._leave()

    def _waiter_queue(self) -> "queue.SimpleQueue[tuple[int, _Wait] | None]":
        """The queue of this gate's waiter thread, started on first use. One long-lived
        thread, not one per wait: starting a thread blocks until it has run, which on a
        busy machine costs more than the wait it serves."""
        with self._mu:
            if self._waiter is None:
                self._waits: "queue.SimpleQueue[tuple[int, _Wait] | None]" = \
                    queue.SimpleQueue()
                self._waiter = threading.Thread(target=self._waiter_loop,
                                                args=(self._waits,), daemon=True,
                                                name="sessiondb-gate-wait")
                self._waiter.start()
            return self._waits

    def _waiter_loop(self, waits: "queue.SimpleQueue[tuple[int, _Wait] | None]") -> None:
        while True:
            item = waits.get()
            if item is None:
                return
            self._walk(*item)

    def _idle_loop(self) -> None:
        """Hand a kept gate on once its holder has not written for IDLE_RELEASE."""
        pid = self._pid
        with self._cv:
            while self._fd >= 0 and os.getpid() == pid:
                if not self._kept:
                    self._idle_asleep = True
                    self._cv.wait(0.05)  # a timeout too, in case a notify was missed
                    self._idle_asleep = False
                    continue
                remaining = self._kept_since + self.IDLE_RELEASE - time.monotonic()
                if remaining > 0:
                    self._cv.wait(remaining)
                    continue
                self._kept = False
                try:
                    self._leave()
                except OSError:  # closed meanwhile: no more turns without this thread
                    self._idle_thread = None
                    return

    def _leave(self) -> None:
        ticket = self._ticket
        if ticket is None or os.getpid() != self._pid:
            self._ticket = None
            return
        unlock = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, self._slot(ticket), 1, 0)
        try:
            os.pwrite(self._fd, _ONE.pack(ticket), _COUNTERS + _ONE.size)
        finally:
            # Only C calls from here on, so that an exception raised by a signal
            # handler cannot land between forgetting the ticket and unlocking its slot.
            self._ticket = None
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, unlock)

    def close(self) -> None:
        if self._fd >= 0 and os.getpid() == self._pid:
            self.release()
            # Forget the number before closing it: a helper thread of an abandoned wait
            # that wakes up later must find -1 (EBADF), never a reused descriptor; the
            # idle thread sees -1 and ends.
            with self._mu:
                fd, self._fd = self._fd, -1
                self._cv.notify()
                if self._waiter is not None:
                    self._waits.put(None)
            os.close(fd)
        self._fd = -1

    # -- the reader room ----------------------------------------------------------------
    # Door and room are held only for a checkpoint reset (rare) or one snapshot, so short
    # polls are the right wait here: nothing on the write path waits on them.
    def _poll(self, offset: int, shared: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._lock(offset, wait=False, shared=shared):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def enter_room(self, timeout: float) -> bool:
        """A snapshot reader comes in (waits while a checkpointer has the door shut).
        :returns: False if the door stayed shut for ``timeout`` (read without the room)."""
        if not self._poll(_DOOR, True, timeout):
            return False
        try:
            return self._lock(_ROOM, wait=False, shared=True)
        finally:
            self._unlock(_DOOR)

    def leave_room(self) -> None:
        self._unlock(_ROOM)

    def close_door(self, timeout: float) -> bool:
        """A checkpointer stops new snapshot readers; False if another one holds it."""
        return self._poll(_DOOR, False, timeout)

    def empty_room(self, timeout: float) -> bool:
        """Wait until no snapshot reader is inside (after :meth:`close_door`)."""
        return self._poll(_ROOM, False, timeout)

    def open_door(self) -> None:
        self._unlock(_ROOM)
        self._unlock(_DOOR)

    # -- internals --------------------------------------------------------------------
    def _take_ticket(self, deadline: float, start: float) -> tuple[int, int]:
        # The dispenser is held for three system calls, so a short randomized poll is
        # the right wait here (a blocking lock could hang on a holder stopped by SIGSTOP
        # in that window).
        while not self._lock(_DISPENSER, wait=False):
            if time.monotonic() >= deadline:
                raise GateTimeout(time.monotonic() - start)
            time.sleep(random.uniform(20e-6, 200e-6))
        try:
            # A short read is a new file, or one whose ``done`` was never written (no
            # writer has left yet): missing bytes are zeros. Reading such a file as
            # (0, 0) would hand out the same first ticket twice.
            raw = os.pread(self._fd, _PAIR.size, _COUNTERS).ljust(_PAIR.size, b"\0")
            nxt, done = _PAIR.unpack(raw)
            ticket = max(nxt, done + 1)
            self._ticket = ticket  # before it is issued, so that acquire can give it back
            os.pwrite(self._fd, _ONE.pack(ticket + 1), _COUNTERS)
            if not self._lock(self._slot(ticket), wait=False):
                # Only a waiter 2**20 tickets old could hold this slot.
                raise RuntimeError(f"gate slot for ticket {ticket} is unexpectedly held")
        finally:
            self._unlock(_DISPENSER)
        return ticket, done

    def _walk(self, ticket: int, wait: _Wait) -> None:
        """Helper thread: block until every earlier ticket has left the gate."""
        try:
            k = ticket - 1
            while self._done() < k:
                slot = self._slot(k)
                self._lock(slot, wait=True)  # sleeps in the kernel until ticket k leaves
                self._unlock(slot)
                if wait.abandoned:
                    return
                if self._done() < k:
                    k -= 1  # ticket k died or gave up without finishing: wait for k-1
        except BaseException as exc:  # pragma: no cover - OS failure while waiting
            wait.error = exc
        with wait.lock:
            if not wait.abandoned and wait.error is None:
                wait.acquired = True
        wait.event.set()

    def _give_up(self, ticket: int) -> None:
        self._ticket = None
        self._unlock(self._slot(ticket))

    def _drop_inherited(self) -> None:
        # Runs in a fork child (see _close_inherited_gates). The inherited descriptor
        # shares the parent's open file description, and so its locks: as long as the
        # child keeps it open, a ticket the parent holds or waits with outlives the
        # parent (a parent killed while holding the gate would wedge every writer until
        # the child exits). Closing our copy leaves the parent's locks intact, since
        # OFD locks go only when the last descriptor of the description closes.
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd = -1
        self._ticket = None
        self._new_turn_state()  # the parent's idle thread and its lock did not come along

    def _after_fork(self) -> None:
        self._drop_inherited()  # already done at fork time where register_at_fork exists
        self._fd = self._open(self.path)
        self._pid = os.getpid()


# Every live FifoGate of this process, so a fork child can let go of them at once.
_GATES: "weakref.WeakSet[FifoGate]" = weakref.WeakSet()


def _close_inherited_gates() -> None:
    for gate in list(_GATES):
        gate._drop_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_gates)


def make_gate(db_path: Path, enabled: bool = True) -> Gate:
    """The best gate for this platform: FIFO where OFD locks exist, else :class:`NullGate`.

    :raises DatabaseOpenError: the sidecar cannot be opened (a symlink, which is never
        followed, or no permission).
    """
    if not (enabled and ofd_locks_available()):
        return NullGate()
    sidecar = db_path.with_name(db_path.name + ".sessiondb-gate")
    try:
        return FifoGate(sidecar)
    except OSError as exc:
        why = ("it is a symbolic link, which sessiondb never follows"
               if exc.errno == errno.ELOOP else exc.strerror)
        raise DatabaseOpenError(
            f"cannot open the write-gate sidecar {sidecar}: {why}; remove it (it holds "
            "no data) or fix its permissions", str(db_path)) from exc
