"""The write gate's sidecar file and how it is locked: its byte layout, and the handle
that holds a :class:`~sessiondb.gate.FifoGate`'s locks with Linux OFD locks.

The sidecar ``<db>.sessiondb-gate`` holds no data but two counters; what matters are the
kernel locks on its bytes (layout below). The ticket protocol (:mod:`sessiondb.gate`) needs
locks that exclude every other gate handle, in this process or another, and that the
kernel drops when their process dies. Two kinds of handle give it that:

- :class:`OfdLocks` (here): Linux *open file description* locks on a descriptor of the
  handle's own. They belong to that descriptor, so two handles of one process exclude
  each other, and closing any other descriptor never drops them.
- :class:`~sessiondb.gate_posix.PosixLocks`: classic ``fcntl`` record locks, which every
  POSIX system has but which belong to the *process*; the bookkeeping that makes them
  behave like OFD locks between the handles of one process lives there.

Both lock the same bytes of the same file, and Linux makes OFD and classic locks conflict
with each other, so processes using different kinds on one store still exclude each
other. Within one process the kinds must not be mixed on one sidecar: closing an OFD
handle's descriptor would drop every classic lock the process holds on the file. A small
census of the sidecars this process has open refuses that (:func:`open_sidecar`).
"""

from __future__ import annotations

import errno
import os
import random
import struct
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigurationError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

# Byte offsets in the sidecar file.
DISPENSER = 0           # lock byte guarding the counters
DOOR = 2                # reader room: snapshot readers pass through the door (shared) ...
ROOM = 3                # ... and stay in the room (shared); a checkpointer locks both
COUNTERS = 8            # u64 next, u64 done (little endian), read and written with pread/pwrite
SLOT_BASE = 1 << 20     # lock byte of ticket t: SLOT_BASE + t % SLOTS
SLOTS = 1 << 20         # more outstanding tickets than this is impossible in practice
# struct flock on LP64 Linux: short l_type, short l_whence, off_t l_start, off_t l_len,
# pid_t l_pid (0 for OFD locks), padding. (Classic locks use fcntl.lockf, which builds
# the platform's own struct.)
_FLOCK = struct.Struct("hhqqi4x")


def poll(attempt: Callable[[], bool], timeout: float) -> bool:
    """Call ``attempt`` every millisecond until it returns True or ``timeout`` passes.
    The reader room's locks are held only for a checkpoint reset (rare) or one snapshot,
    and nothing on the write path waits on them, so a short poll is the right wait."""
    deadline = time.monotonic() + timeout
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.001)
    return True


#: The longest a caller's wait sleeps in one call. A signal that arrives just before a
#: blocking wait starts interrupts nothing: its Python handler (Ctrl-C's
#: KeyboardInterrupt) would run only when the wait ends, up to ``write_timeout`` later.
#: Waiting in slices runs it within a slice.
SIGNAL_SLICE = 0.1


def wait_event(event: threading.Event, timeout: float) -> bool:
    """``event.wait(timeout)`` in slices of :data:`SIGNAL_SLICE`, so that a signal
    handler's exception reaches the caller within a slice, wherever the signal landed."""
    deadline = time.monotonic() + timeout
    while not event.wait(min(max(0.0, deadline - time.monotonic()), SIGNAL_SLICE)):
        if time.monotonic() >= deadline:
            return False
    return True


def attempt(lock_call: Callable[..., Any], *args: Any) -> bool:
    """Run a non-blocking lock call; False if the byte is held by someone else."""
    try:
        lock_call(*args)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def take_dispenser(handle: Any, deadline: float) -> bool:
    """Lock the dispenser byte, polling: it is held for three system calls, so a short
    randomized poll is the right wait (a blocking lock could hang on a holder stopped by
    SIGSTOP in that window). False if ``deadline`` (monotonic) passes first."""
    while not handle.try_lock(DISPENSER):
        if time.monotonic() >= deadline:
            return False
        time.sleep(random.uniform(20e-6, 200e-6))
    return True


# -- which sidecars this process has open, and with which kind of lock ----------------

_CENSUS: dict[tuple[int, int], dict[str, int]] = {}
_CENSUS_LOCK = threading.Lock()
# Descriptors that could not be closed safely (see open_sidecar): kept for the process.
_KEPT_OPEN: list[int] = []


def _refuse_mixing(key: tuple[int, int] | None, kind: str, path: Path) -> None:
    other = [k for k, n in _CENSUS.get(key, {}).items() if n and k != kind] if key else []
    if other:
        raise ConfigurationError(
            f"this process already uses the {other[0]!r} write gate on {path}; one process "
            f"cannot also use the {kind!r} gate on it (closing one kind's descriptor would "
            "drop the other's locks): open every instance of this store with the same "
            "gate option")


def open_sidecar(path: Path, kind: str) -> tuple[int, tuple[int, int]]:
    """Open (create 0600, never following a symlink) the sidecar for a handle of ``kind``
    and count it in the census.

    :returns: the descriptor and the file's ``(st_dev, st_ino)``.
    :raises ConfigurationError: the process holds the file with the other kind of lock.
    :raises OSError: it cannot be opened (ELOOP for a symlink).
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(
        os, "O_CLOEXEC", 0)
    with _CENSUS_LOCK:
        try:
            st = os.lstat(path)
            _refuse_mixing((st.st_dev, st.st_ino), kind, path)  # checked before opening:
        except FileNotFoundError:                             # see below
            pass
        fd = os.open(path, flags, 0o600)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        try:
            _refuse_mixing(key, kind, path)  # the path was replaced meanwhile
        except ConfigurationError:
            # Closing a descriptor drops the process's classic locks on the file, so a
            # descriptor of a file that has them stays open.
            (_KEPT_OPEN.append if kind == "ofd" else os.close)(fd)
            raise
        kinds = _CENSUS.setdefault(key, {})
        kinds[kind] = kinds.get(kind, 0) + 1
    return fd, key


def close_sidecar(fd: int, key: tuple[int, int], kind: str) -> None:
    """Close a descriptor :func:`open_sidecar` gave and take it out of the census."""
    with _CENSUS_LOCK:
        kinds = _CENSUS.get(key, {})
        kinds[kind] = kinds.get(kind, 1) - 1
        if not any(kinds.values()):
            _CENSUS.pop(key, None)
    os.close(fd)


def _forget_census() -> None:
    # In a fork child: every inherited handle is dropped (see sessiondb.gate), and a
    # parent thread may have held the lock at fork time.
    global _CENSUS_LOCK
    _CENSUS_LOCK = threading.Lock()
    _CENSUS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_census)


class OfdLocks:
    """A gate handle's locks as Linux OFD locks, on a descriptor of its own.

    :param path: the sidecar file.
    """

    kind = "ofd"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd, self._key = open_sidecar(path, self.kind)

    # -- the ticket protocol's locks ----------------------------------------------------
    def try_lock(self, offset: int, shared: bool = False) -> bool:
        """Lock one byte without waiting; False if another handle holds it."""
        kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
        return attempt(fcntl.fcntl, self.fd, fcntl.F_OFD_SETLK,
                       _FLOCK.pack(kind, os.SEEK_SET, offset, 1, 0))

    def releaser(self, offset: int) -> Callable[[], Any]:
        """A call that unlocks ``offset`` in one C call (no Python frame in which an
        exception raised by a signal handler could land)."""
        return partial(fcntl.fcntl, self.fd, fcntl.F_OFD_SETLK,
                       _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0))

    def unlock(self, offset: int) -> None:
        self.releaser(offset)()

    def await_unlocked(self, offset: int) -> None:
        """Sleep in the kernel until no other handle holds ``offset``."""
        fcntl.fcntl(self.fd, fcntl.F_OFD_SETLKW,
                    _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0))
        self.unlock(offset)

    # Each handle has its own descriptor, so the kernel orders them all.
    def lock_dispenser(self, deadline: float) -> bool:
        return take_dispenser(self, deadline)

    def unlock_dispenser(self) -> None:
        self.unlock(DISPENSER)  # a no-op unless this handle holds it

    def hold_slot(self, offset: int) -> bool:
        return self.try_lock(offset)

    def let_go(self, offset: int) -> None:
        pass

    # -- the reader room (see sessiondb.checkpoint) -------------------------------------
    def enter_room(self, timeout: float) -> bool:
        if not poll(lambda: self.try_lock(DOOR, shared=True), timeout):
            return False
        try:
            return self.try_lock(ROOM, shared=True)
        finally:
            self.unlock(DOOR)

    def leave_room(self) -> None:
        self.unlock(ROOM)

    def close_door(self, timeout: float) -> bool:
        return poll(lambda: self.try_lock(DOOR), timeout)

    def empty_room(self, timeout: float) -> bool:
        return poll(lambda: self.try_lock(ROOM), timeout)

    def open_door(self) -> None:
        self.unlock(ROOM)
        self.unlock(DOOR)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        # Forget the number before closing it: a helper thread of an abandoned wait that
        # wakes up later must find -1 (EBADF), never a reused descriptor.
        fd, self.fd = self.fd, -1
        if fd >= 0:
            close_sidecar(fd, self._key, self.kind)

    def drop_inherited(self) -> None:
        """In a fork child: close the inherited descriptor. It shares the parent's open
        file description, and so its locks: as long as the child keeps it open, a ticket
        the parent holds or waits with outlives the parent. Closing our copy leaves the
        parent's locks intact (OFD locks go with the last descriptor of the description)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
