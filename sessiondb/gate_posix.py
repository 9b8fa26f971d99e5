"""The write gate's locks as classic POSIX record locks: convoy protection beyond Linux.

Classic ``fcntl`` locks (``F_SETLK``/``F_SETLKW``, taken here through
:func:`fcntl.lockf`, which builds each platform's ``struct flock``) exist on every POSIX
system, macOS and the BSDs included, and the kernel drops them when their process dies,
which is what the ticket protocol of :mod:`sessiondb.gate` needs. But they belong to the
*process*, not to a descriptor: a second lock by the same process on a byte it holds
succeeds instead of waiting (or converts a shared lock to an exclusive one), an unlock by
any thread releases it for every thread, and closing ANY descriptor of the file drops
every lock the process holds on it. So the :class:`PosixLocks` handles of one process (two
:class:`~sessiondb.SessionDB` instances of one store, and each one's checkpointer) share
one record per sidecar, :class:`_Sidecar`, which makes them behave towards each other as
OFD handles do:

- *One descriptor per sidecar per process*: a registry keyed by the file's
  ``(st_dev, st_ino)``. The first handle opens it; it is closed only once the last handle
  is closed and no thread is inside a blocking lock call on it, so it is never closed
  while the process holds a lock through it. sessiondb opens the sidecar nowhere else.
- *One ticket per process at a time*: handles queue first come first served inside the
  process (:meth:`PosixLocks.enter_process`) before they take a ticket, and hand that
  place on when they leave the gate. The kernel thus sees at most one slot lock per
  process, held for exactly one handle, so no thread of the process ever waits on a byte
  the process itself holds, and a process's waits only point to earlier tickets, which
  cannot close a cycle among gate users.
- *The reader room* is counted in the process: how many of its snapshot readers are
  inside (the kernel's shared lock on the room byte stays while any is), and which handle
  shut the door or emptied the room. A handle never locks a byte the process already
  holds in another mode, which would convert that lock instead of conflicting with it.
- *Deadlock detection*: the kernel refuses a blocking wait (``EDEADLK``) that would close
  a cycle of *processes* waiting for each other's classic locks, on any file, judged per
  process rather than per thread; e.g. this process waits for its predecessor while that
  one waits for a lock of an application's own that another thread of this process holds.
  :meth:`sessiondb.gate.FifoGate._await` waits a moment and asks again, keeping its
  ticket, so its place in line is kept.
- *Fork*: classic locks are not inherited, so a child holds none; it forgets the registry
  (closing the inherited descriptors, which drops nothing of the parent's) and attaches
  anew on first use.

Residual hazard: code of this process that opens and closes the sidecar file itself (not
sessiondb; say, a helper copying the store's directory with ``open()``) drops this
process's gate locks, exactly as closing a descriptor of the database drops SQLite's own
locks. Another process may then enter the gate while this one is in it, where SQLite's
write lock still serializes them (unfair for a moment, never unsafe), and the queue is
whole again from this process's next entry on. Windows has no ``fcntl``: there the gate
stays off (:class:`sessiondb.gate.NullGate`).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections import deque
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .gate_locks import DOOR, ROOM, close_sidecar, open_sidecar, poll

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["PosixLocks", "posix_locks_available"]


def posix_locks_available() -> bool:
    """True where classic ``fcntl`` record locks exist (every POSIX system)."""
    return fcntl is not None and hasattr(fcntl, "lockf") and os.name == "posix"


class _Sidecar:
    """This process's one descriptor of one sidecar file, and what its handles hold."""

    def __init__(self, key: tuple[int, int], fd: int) -> None:
        self.key = key
        self.fd = fd
        self.spare: list[int] = []  # see _attach
        self.users = 0              # PosixLocks handles attached (under _REGISTRY_LOCK)
        self.blocked = 0            # threads inside a blocking lock call (likewise)
        self.mu = threading.Lock()  # guards everything below
        self.holder: PosixLocks | None = None   # whose is the process's place in the gate
        self.line: deque[tuple[PosixLocks, threading.Event]] = deque()
        self.readers = 0            # this process's snapshot readers in the room
        self.door: PosixLocks | None = None     # the handle that shut the door
        self.room: PosixLocks | None = None     # the handle that holds the room empty

    def hand_on(self) -> None:
        """The place in the gate goes to the next handle in line (under ``mu``)."""
        if self.line:
            self.holder, event = self.line.popleft()
            event.set()
        else:
            self.holder = None


_REGISTRY: dict[tuple[int, int], _Sidecar] = {}
_REGISTRY_LOCK = threading.Lock()


def _attach(path: Path) -> _Sidecar:
    with _REGISTRY_LOCK:
        try:
            st = os.lstat(path)  # look it up without opening: see the module docstring
            sidecar = _REGISTRY.get((st.st_dev, st.st_ino))
        except FileNotFoundError:
            sidecar = None
        if sidecar is None:
            fd, key = open_sidecar(path, PosixLocks.kind)
            sidecar = _REGISTRY.get(key)
            if sidecar is None:
                sidecar = _REGISTRY[key] = _Sidecar(key, fd)
            else:
                # The path was replaced between lstat and open by a file the registry
                # has: this second descriptor must outlive the locks held through the
                # first, so it closes with it.
                sidecar.spare.append(fd)
        sidecar.users += 1
        return sidecar


def _close_if_unused(sidecar: _Sidecar) -> None:
    """Close the descriptor once no handle uses it and no thread waits on it (call under
    ``_REGISTRY_LOCK``): only then does the process hold no lock through it."""
    if sidecar.users or sidecar.blocked or sidecar.fd < 0:
        return
    if _REGISTRY.get(sidecar.key) is sidecar:
        del _REGISTRY[sidecar.key]
    fds, sidecar.fd, sidecar.spare = [sidecar.fd, *sidecar.spare], -1, []
    for fd in fds:
        close_sidecar(fd, sidecar.key, PosixLocks.kind)


def _forget_registry() -> None:
    # In a fork child (see the module docstring). A parent thread may have held the lock.
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    for sidecar in _REGISTRY.values():
        for fd in (sidecar.fd, *sidecar.spare):
            try:
                os.close(fd)
            except OSError:
                pass
        sidecar.fd, sidecar.spare = -1, []
    _REGISTRY.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_registry)


class PosixLocks:
    """A gate handle's locks as classic record locks on the process's one descriptor of
    the sidecar (see the module docstring); the interface of
    :class:`sessiondb.gate_locks.OfdLocks`.

    :param path: the sidecar file.
    """

    kind = "posix"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sidecar: _Sidecar | None = _attach(path)
        self._inside = 0  # this handle's snapshot readers in the room

    @property
    def fd(self) -> int:
        sidecar = self._sidecar
        return sidecar.fd if sidecar is not None else -1

    # -- the ticket protocol's locks ----------------------------------------------------
    def try_lock(self, offset: int, shared: bool = False) -> bool:
        """Lock one byte without waiting; False if another process holds it."""
        try:
            fcntl.lockf(self.fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB,
                        1, offset)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def releaser(self, offset: int) -> Callable[[], Any]:
        """A call that unlocks ``offset`` in one C call."""
        return partial(fcntl.lockf, self.fd, fcntl.LOCK_UN, 1, offset)

    def unlock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)

    def await_unlocked(self, offset: int) -> None:
        """Sleep in the kernel until no other process holds ``offset``.

        :raises OSError: ``EDEADLK`` when the kernel judges that the wait would close a
            cycle of waiting processes (see the module docstring).
        """
        with _REGISTRY_LOCK:
            sidecar = self._sidecar
            if sidecar is None or sidecar.fd < 0:
                raise OSError(errno.EBADF, "the write gate was closed")
            sidecar.blocked += 1  # the descriptor stays open until this call is done
        try:
            fcntl.lockf(sidecar.fd, fcntl.LOCK_EX, 1, offset)
            fcntl.lockf(sidecar.fd, fcntl.LOCK_UN, 1, offset)
        finally:
            with _REGISTRY_LOCK:
                sidecar.blocked -= 1
                _close_if_unused(sidecar)

    # -- one ticket per process: the handles' line inside it ---------------------------
    def enter_process(self, deadline: float) -> bool | None:
        """Wait (first come, first served) until this handle has the process's place in
        the gate. :returns: whether it had to wait; None if ``deadline`` (monotonic)
        passed first."""
        sidecar = self._sidecar
        if sidecar is None:
            raise OSError(errno.EBADF, "the write gate was closed")
        with sidecar.mu:
            if sidecar.holder is None and not sidecar.line:
                sidecar.holder = self
                return False
            waiter = (self, threading.Event())
            sidecar.line.append(waiter)
        try:
            while True:
                waiter[1].wait(max(0.0, deadline - time.monotonic()))
                with sidecar.mu:
                    if sidecar.holder is self:
                        return True
                    if time.monotonic() >= deadline:
                        sidecar.line.remove(waiter)
                        return None
        except BaseException:
            with sidecar.mu:  # (a place granted meanwhile is given back by the caller)
                if waiter in sidecar.line:
                    sidecar.line.remove(waiter)
            raise

    def leave_process(self) -> None:
        """Hand the process's place in the gate on, if it is this handle's."""
        sidecar = self._sidecar
        if sidecar is None:
            return
        with sidecar.mu:
            if sidecar.holder is self:
                sidecar.hand_on()

    def holds_process(self) -> bool:
        sidecar = self._sidecar
        return sidecar is not None and sidecar.holder is self

    def waiting_here(self) -> int:
        """Handles of this process queued for its place in the gate."""
        sidecar = self._sidecar
        return len(sidecar.line) if sidecar is not None else 0

    # -- the reader room ----------------------------------------------------------------
    def enter_room(self, timeout: float) -> bool:
        sidecar = self._sidecar
        if sidecar is None:
            return False
        entered: list[bool] = []

        def through_the_door() -> bool:
            with sidecar.mu:
                if sidecar.door is not None or not self.try_lock(DOOR, shared=True):
                    return False  # shut, by a handle of ours or by another process
                try:
                    if sidecar.readers or (sidecar.room is None
                                           and self.try_lock(ROOM, shared=True)):
                        sidecar.readers += 1
                        self._inside += 1
                        entered.append(True)
                finally:
                    self.unlock(DOOR)
                return True

        return poll(through_the_door, timeout) and bool(entered)

    def leave_room(self) -> None:
        sidecar = self._sidecar
        if sidecar is None or not self._inside:
            return
        with sidecar.mu:
            self._leave_room(sidecar, 1)

    def _leave_room(self, sidecar: _Sidecar, readers: int) -> None:
        self._inside -= readers
        sidecar.readers -= readers
        if readers and not sidecar.readers:
            self.unlock(ROOM)

    def close_door(self, timeout: float) -> bool:
        sidecar = self._sidecar
        if sidecar is None:
            return False

        def shut() -> bool:
            with sidecar.mu:
                if sidecar.door is None and self.try_lock(DOOR):
                    sidecar.door = self
                return sidecar.door is self

        return poll(shut, timeout)

    def empty_room(self, timeout: float) -> bool:
        sidecar = self._sidecar
        if sidecar is None:
            return False

        def empty() -> bool:
            with sidecar.mu:
                # Our own readers inside: locking the room now would convert their
                # shared lock into ours instead of waiting for them.
                if (sidecar.room is None and not sidecar.readers
                        and self.try_lock(ROOM)):
                    sidecar.room = self
                return sidecar.room is self

        return poll(empty, timeout)

    def open_door(self) -> None:
        sidecar = self._sidecar
        if sidecar is not None:
            with sidecar.mu:
                self._open_door(sidecar)

    def _open_door(self, sidecar: _Sidecar) -> None:
        if sidecar.room is self:
            sidecar.room = None
            self.unlock(ROOM)
        if sidecar.door is self:
            sidecar.door = None
            self.unlock(DOOR)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Give back what this handle holds (as closing an OFD descriptor would) and
        detach; the last handle closes the descriptor."""
        sidecar = self._sidecar
        if sidecar is None:
            return
        with sidecar.mu:
            try:
                self._leave_room(sidecar, self._inside)
                self._open_door(sidecar)
            finally:
                if sidecar.holder is self:
                    sidecar.hand_on()
        with _REGISTRY_LOCK:
            self._sidecar = None
            sidecar.users -= 1
            _close_if_unused(sidecar)

    def drop_inherited(self) -> None:
        """In a fork child: forget the parent's sidecar record (the registry was cleared
        at fork, see :func:`_forget_registry`)."""
        self._sidecar = None
        self._inside = 0
