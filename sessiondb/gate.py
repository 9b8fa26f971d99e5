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

The locks come from a handle of one of two kinds (:mod:`sessiondb.gate_locks`): Linux
*open file description* locks, which belong to the handle's own descriptor, or, on every
other POSIX system (macOS, the BSDs), classic ``fcntl`` record locks, which belong to the
process and so are shared between the handles of a process through a registry that keeps
the process's tickets, so that its handles wait for each other in the process and for
other processes in the kernel (:mod:`sessiondb.gate_posix`).
Either way two :class:`~sessiondb.SessionDB` instances in one process exclude each other,
and closing one never drops the other's locks. A blocking lock call has no timeout, so
the wait runs in a helper thread while the caller waits on an event with the remaining
time budget; a caller that gives up (a timeout, or any exception while queued, Ctrl-C
included) unlocks its slot (its successors walk past it), and the helper lets go of the
predecessor's slot as soon as the kernel hands it over.
A fork child drops its inherited handles at once (an inherited OFD descriptor shares the
parent's locks, and would keep a killed parent's ticket alive) and opens its own on first
use.

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

*Which kind.* ``gate="auto"`` (the default) takes OFD locks where they exist (Linux),
else classic locks (macOS, the BSDs), else (Windows) :class:`NullGate`: writes then rely
on ``BEGIN IMMEDIATE`` plus jittered retry alone. ``"ofd"`` or ``"posix"`` forces one,
``"none"`` turns the gate off, and with ``"auto"`` the environment variable
``SESSIONDB_GATE`` may name any of them (:func:`gate_kind`).
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

from .errors import ConfigurationError, DatabaseOpenError
from .gate_locks import COUNTERS, SLOT_BASE, SLOTS, OfdLocks, wait_event
from .gate_posix import PosixLocks, posix_locks_available

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Gate", "FifoGate", "NullGate", "GateTimeout", "ofd_locks_available",
           "posix_locks_available", "gate_kind", "make_gate", "GATE_OPTIONS", "GATE_ENV"]

#: The values of the ``gate`` option (True means "auto", False "none").
GATE_OPTIONS = ("auto", "ofd", "posix", "none")
#: Read when the option is "auto": forces a kind for every instance of the process.
GATE_ENV = "SESSIONDB_GATE"
_LOCKS = {"ofd": OfdLocks, "posix": PosixLocks}
_PAIR = struct.Struct("<QQ")
_ONE = struct.Struct("<Q")


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


def gate_kind(option: bool | str = "auto") -> str:
    """The gate an instance uses: ``"ofd"``, ``"posix"`` or ``"none"``.

    :param option: one of :data:`GATE_OPTIONS`, or True ("auto") / False ("none").
        "auto" takes ``$SESSIONDB_GATE`` when it is set, else OFD locks where they exist,
        else classic locks where ``fcntl`` exists, else none.
    :raises ConfigurationError: an unknown value (of the option or of the variable), or a
        kind this platform does not have.
    """
    value = {True: "auto", False: "none"}.get(option, option) if isinstance(
        option, bool) else option
    source = "gate"
    if value not in GATE_OPTIONS:
        raise ConfigurationError(f"gate must be one of {', '.join(map(repr, GATE_OPTIONS))} "
                                 f"(or True/False), not {option!r}")
    if value == "auto" and os.environ.get(GATE_ENV, "").strip():
        value, source = os.environ[GATE_ENV].strip(), "$" + GATE_ENV
        if value not in GATE_OPTIONS:
            raise ConfigurationError(f"${GATE_ENV} must be one of "
                                     f"{', '.join(GATE_OPTIONS)}, not {value!r}")
    if value == "auto":
        return ("ofd" if ofd_locks_available() else
                "posix" if posix_locks_available() else "none")
    if value == "ofd" and not ofd_locks_available():
        raise ConfigurationError(
            f"{source}='ofd' needs Linux open-file-description locks, which this platform "
            f"({sys.platform}) does not have; use 'posix' (classic fcntl locks) or 'auto'")
    if value == "posix" and not posix_locks_available():
        raise ConfigurationError(
            f"{source}='posix' needs fcntl record locks, which this platform "
            f"({sys.platform}) does not have; use 'none' or 'auto'")
    return value


class Gate:
    """Interface of a write gate. ``acquire`` returns seconds waited and whether it had
    to queue; ``release`` lets the next writer in."""

    #: which gate this is: "ofd", "posix" or "none" (``stats()["gate"]``)
    kind = "none"

    def acquire(self, timeout: float) -> tuple[float, bool]:
        raise NotImplementedError

    def release(self, held: float | None = None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def queue_depth(self) -> int:
        """Writers holding or waiting for the gate (0 without a queue)."""
        return 0

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
    """No queue: writers meet only at SQLite's lock (the fallback without fcntl locks)."""

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
    :param kind: "ofd" (Linux OFD locks) or "posix" (classic fcntl locks).
    :raises ConfigurationError: this process holds the sidecar with the other kind.
    """

    TURN_WRITES = 64        # a turn ends after this many writes ...
    TURN_SECONDS = 0.020    # ... or once it has lasted this long
    IDLE_RELEASE = 0.0002   # a kept gate is handed on after this long without a write

    def __init__(self, path: Path, kind: str = "ofd") -> None:
        self.path = path
        self._file: OfdLocks | PosixLocks = _LOCKS[kind](path)
        self._pid = os.getpid()
        self._ticket: int | None = None
        self._letting_go: int | None = None  # a slot unlocked, its record not yet (_let_go)
        #: blocking waits the kernel refused as a deadlock (EDEADLK), then retried
        self.deadlock_retries = 0
        self._new_turn_state()
        _GATES.add(self)

    @property
    def kind(self) -> str:  # type: ignore[override]
        return self._file.kind

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
    def _slot(ticket: int) -> int:
        return SLOT_BASE + ticket % SLOTS

    def _counters(self) -> tuple[int, int]:
        # A short read is a new file, or one whose ``done`` was never written (no writer
        # has left yet): missing bytes are zeros.
        raw = os.pread(self._file.fd, _PAIR.size, COUNTERS)
        return _PAIR.unpack(raw.ljust(_PAIR.size, b"\0"))

    def _done(self) -> int:
        return self._counters()[1]

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
            # A second ticket on the same handle would "lock" our own slot (a lock never
            # conflicts with its owner) and then unlock it while we still hold the gate,
            # letting the next writer in early.
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
                self._file.unlock_dispenser()  # a no-op unless this handle holds it
                if self._ticket is not None:
                    self._give_up(self._ticket)
            except (OSError, ValueError):  # e.g. the gate was closed: the error matters
                pass
            raise

    def _enter(self, start: float, deadline: float) -> tuple[float, bool]:
        ticket, done = self._take_ticket(deadline, start)
        if done >= ticket - 1:
            return time.monotonic() - start, False
        wait = _Wait()
        try:
            self._waiter_queue().put((ticket, wait))
            wait_event(wait.event, deadline - time.monotonic())
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

        An exception that lands in here (one raised by a signal handler: it can land at
        the entry of any Python function, this one's helpers included, and after any
        call) still leaves. One that lands at the very entry of this method cannot be
        caught in it: a caller that must not keep the gate calls ``release(None)`` from
        its own handler (a no-op once the gate was left).
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
            # Inside the handler too: an exception landing as _leave or one of its
            # helpers is entered, before ``done`` is written, would leave the ticket
            # held and not kept: every other writer would wait for this process, and
            # its own next write would find the gate still held.
            with self._mu:
                self._kept = False
                self._leave()
        except BaseException:  # e.g. a signal handler's exception: never keep by accident
            with self._mu:
                self._kept = False
                self._leave()  # a no-op if the first one got through
            raise

    def _waiter_queue(self) -> "queue.SimpleQueue[tuple[int, _Wait] | None]":
        """The queue of this gate's waiter thread, started on first use. One long-lived
        thread, not one per wait: starting a thread blocks until it has run, which on a
        busy machine costs more than the wait it serves. Started again (with a new queue)
        if it is no longer alive: an exception raised by a signal handler inside
        ``Thread.start()`` can end the new thread before it serves anything, and every
        later wait of this gate would then last its whole timeout."""
        with self._mu:
            if self._waiter is None or not self._waiter.is_alive():
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
            while self._file.fd >= 0 and os.getpid() == pid:
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
            self._let_go()  # one that an exception cut short: this call redoes it
            return
        slot = self._slot(ticket)
        release = self._file.releaser(slot)
        try:
            os.pwrite(self._file.fd, _ONE.pack(ticket), COUNTERS + _ONE.size)
        finally:
            # Only C calls from here to the unlock, so that an exception raised by a
            # signal handler cannot land between forgetting the ticket and unlocking
            # its slot.
            self._letting_go, self._ticket = slot, None
            try:
                release()
            finally:
                self._let_go()

    def _let_go(self) -> None:
        """After the unlock of a ticket's slot: the process's record forgets the ticket
        (sessiondb.gate_posix). An exception that lands as this is entered leaves it
        pending, and the next release (the caller's second one) does it: a stale record
        would keep this process's next handle in line waiting for good."""
        slot = self._letting_go
        if slot is not None:
            self._file.let_go(slot)
            self._letting_go = None

    def close(self) -> None:
        if self._file.fd >= 0 and os.getpid() == self._pid:
            self.release()
            # The handle forgets its descriptor before closing it: a helper thread of an
            # abandoned wait that wakes up later must find -1 (EBADF), never a reused
            # descriptor; the idle thread sees -1 and ends.
            with self._mu:
                self._file.close()
                self._cv.notify()
                if self._waiter is not None:
                    self._waits.put(None)

    def queue_depth(self) -> int:
        """Writers holding or waiting for the gate: tickets issued and not yet done (read
        without a lock; a ticket given up, or a dead process's, counts until the next
        writer leaves). A cheap read for a monitor, through this gate's own descriptor:
        with classic locks, never open the sidecar yourself in a process that uses the
        gate (closing it would drop the process's locks)."""
        nxt, done = self._counters()
        return max(0, nxt - done - 1)

    # -- the reader room (see sessiondb.checkpoint; kept by the lock handle) ------------
    def enter_room(self, timeout: float) -> bool:
        """A snapshot reader comes in (waits while a checkpointer has the door shut).
        :returns: False if the door stayed shut for ``timeout`` (read without the room)."""
        return self._file.enter_room(timeout)

    def leave_room(self) -> None:
        self._file.leave_room()

    def close_door(self, timeout: float) -> bool:
        """A checkpointer stops new snapshot readers; False if another one holds it."""
        return self._file.close_door(timeout)

    def empty_room(self, timeout: float) -> bool:
        """Wait until no snapshot reader is inside (after :meth:`close_door`)."""
        return self._file.empty_room(timeout)

    def open_door(self) -> None:
        self._file.open_door()

    # -- internals --------------------------------------------------------------------
    def _take_ticket(self, deadline: float, start: float) -> tuple[int, int]:
        if not self._file.lock_dispenser(deadline):
            raise GateTimeout(time.monotonic() - start)
        try:
            while True:
                # Reading a file whose ``done`` was never written as (0, 0) would hand
                # out the same first ticket twice: hence max(next, done + 1).
                nxt, done = self._counters()
                ticket = max(nxt, done + 1)
                self._ticket = ticket  # before it is issued, so that acquire can give it back
                os.pwrite(self._file.fd, _ONE.pack(ticket + 1), COUNTERS)
                if self._file.hold_slot(self._slot(ticket)):
                    break
                # Someone holds this ticket's slot: the dispenser was not ours alone (with
                # classic locks, a descriptor of the sidecar closed by code of this
                # process drops its locks, see sessiondb.gate_posix) or a waiter 2**20
                # tickets old holds it. The next ticket is free of both.
                self._ticket = None
        finally:
            self._file.unlock_dispenser()
        return ticket, done

    def _walk(self, ticket: int, wait: _Wait) -> None:
        """Helper thread: block until every earlier ticket has left the gate."""
        try:
            k = ticket - 1
            while self._done() < k:
                self._await(self._slot(k), wait)  # sleeps in the kernel until k leaves
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

    def _await(self, slot: int, wait: _Wait) -> None:
        """Block until the holder of ``slot`` leaves it. With classic locks the kernel
        refuses a wait that would close a cycle of processes waiting for each other's
        locks (``EDEADLK``), judging per process, not per thread: say this process has a
        ticket before and after another process's, or our predecessor waits for a lock
        that another thread of ours holds (see :mod:`sessiondb.gate_posix`). Such a
        cycle ends when one of its members moves on, so wait a moment and ask again; our
        own slot stays locked meanwhile, so our place in line is kept. The caller's
        budget still bounds the whole wait."""
        delay = 100e-6
        while not wait.abandoned:
            try:
                self._file.await_unlocked(slot)
                return
            except OSError as exc:
                if exc.errno != errno.EDEADLK:
                    raise
            self.deadlock_retries += 1
            time.sleep(random.uniform(0.5, 1.5) * delay)
            delay = min(2 * delay, 0.010)

    def _give_up(self, ticket: int) -> None:
        slot = self._slot(ticket)
        release = self._file.releaser(slot)
        self._letting_go, self._ticket = slot, None  # then only C calls, as in _leave
        try:
            release()
        finally:
            self._let_go()

    def _drop_inherited(self) -> None:
        # Runs in a fork child (see _close_inherited_gates): see the handles'
        # drop_inherited for why at once.
        self._file.drop_inherited()
        self._ticket = self._letting_go = None
        self._new_turn_state()  # the parent's idle thread and its lock did not come along

    def _after_fork(self) -> None:
        self._drop_inherited()  # already done at fork time where register_at_fork exists
        self._file = _LOCKS[self.kind](self.path)
        self._pid = os.getpid()


# Every live FifoGate of this process, so a fork child can let go of them at once.
_GATES: "weakref.WeakSet[FifoGate]" = weakref.WeakSet()


def _close_inherited_gates() -> None:
    for gate in list(_GATES):
        gate._drop_inherited()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_gates)


def make_gate(db_path: Path, gate: bool | str = "auto") -> Gate:
    """The gate of a store: a :class:`FifoGate` of the kind :func:`gate_kind` picks, or
    :class:`NullGate`.

    :raises ConfigurationError: see :func:`gate_kind`, and :class:`FifoGate`.
    :raises DatabaseOpenError: the sidecar cannot be opened (a symlink, which is never
        followed, or no permission).
    """
    kind = gate_kind(gate)
    if kind == "none":
        return NullGate()
    sidecar = db_path.with_name(db_path.name + ".sessiondb-gate")
    try:
        return FifoGate(sidecar, kind)
    except OSError as exc:
        why = ("it is a symbolic link, which sessiondb never follows"
               if exc.errno == errno.ELOOP else exc.strerror)
        raise DatabaseOpenError(
            f"cannot open the write-gate sidecar {sidecar}: {why}; remove it (it holds "
            "no data) or fix its permissions", str(db_path)) from exc
