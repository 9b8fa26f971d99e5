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
- *Every handle its own ticket*, as with OFD locks, so writers are served in the order
  they came, whichever process they are in. The dispenser byte is the process's, so its
  handles take tickets one at a time (the record names the handle at the dispenser), and
  each slot lock is held for exactly one handle's ticket. The kernel would let a handle
  "wait" for a slot its own process holds at once, so the record keeps the process's
  tickets: a handle whose predecessor is a ticket of its own process waits for it on a
  condition variable in the process, and only for other processes' tickets in the
  kernel.
- *The reader room* is counted in the process: how many of its snapshot readers are
  inside (the kernel's shared lock on the room byte stays while any is), and which handle
  shut the door or emptied the room. A handle never locks a byte the process already
  holds in another mode, which would convert that lock instead of conflicting with it.
- *Deadlock detection*: the kernel refuses a blocking wait (``EDEADLK``) that would close
  a cycle of *processes* waiting for each other's classic locks, on any file, judged per
  process rather than per thread. With two tickets of one process in the queue, one each
  side of another process's, it sees one where there is none: P holds ticket 1 and waits
  (for its ticket 3) for ticket 2, whose process Q waits for ticket 1. Or this process
  waits for its predecessor while that one waits for an application's own lock that
  another thread of this process holds. :meth:`sessiondb.gate.FifoGate._await` waits a
  moment and asks again, keeping its ticket, so its place in line is kept.
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
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .gate_locks import (
    DISPENSER, DOOR, ROOM, SIGNAL_SLICE, attempt, close_sidecar, open_sidecar, poll,
    take_dispenser,
)

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
        self.changed = threading.Condition(self.mu)  # a ticket left, the dispenser freed
        self.dispenser: PosixLocks | None = None     # the handle taking a ticket
        self.tickets: dict[int, PosixLocks] = {}     # slot -> the handle whose ticket it is
        self.readers = 0            # this process's snapshot readers in the room
        self.door: PosixLocks | None = None     # the handle that shut the door
        self.room: PosixLocks | None = None     # the handle that holds the room empty


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
        return attempt(fcntl.lockf, self.fd,
                       (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB, 1, offset)

    def releaser(self, offset: int) -> Callable[[], Any]:
        """A call that unlocks ``offset`` in one C call."""
        return partial(fcntl.lockf, self.fd, fcntl.LOCK_UN, 1, offset)

    def unlock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, offset)

    def await_unlocked(self, offset: int) -> None:
        """Sleep until no other handle holds ``offset``: in the process for a ticket of
        its own, else in the kernel.

        :raises OSError: ``EDEADLK`` when the kernel judges that the wait would close a
            cycle of waiting processes (see the module docstring).
        """
        sidecar = self._attached()
        with sidecar.changed:
            if offset in sidecar.tickets:
                # Tickets before ours were all issued, and so recorded, before ours.
                while offset in sidecar.tickets:
                    sidecar.changed.wait()
                return
        with _REGISTRY_LOCK:
            if sidecar.fd < 0:
                raise OSError(errno.EBADF, "the write gate was closed")
            sidecar.blocked += 1  # the descriptor stays open until this call is done
        try:
            fcntl.lockf(sidecar.fd, fcntl.LOCK_EX, 1, offset)
            fcntl.lockf(sidecar.fd, fcntl.LOCK_UN, 1, offset)
        finally:
            with _REGISTRY_LOCK:
                sidecar.blocked -= 1
                _close_if_unused(sidecar)

    def _attached(self) -> _Sidecar:
        sidecar = self._sidecar
        if sidecar is None:
            raise OSError(errno.EBADF, "the write gate was closed")
        return sidecar

    # -- tickets: one handle at the dispenser at a time, each slot one handle's ---------
    def lock_dispenser(self, deadline: float) -> bool:
        """Take the dispenser (in the process, then in the kernel); False if ``deadline``
        (monotonic) passes first."""
        sidecar = self._attached()
        with sidecar.changed:
            while sidecar.dispenser is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                sidecar.changed.wait(min(remaining, SIGNAL_SLICE))
            sidecar.dispenser = self
        if take_dispenser(self, deadline):
            return True
        self.unlock_dispenser()
        return False

    def unlock_dispenser(self) -> None:
        """Let go of the dispenser, if this handle has it."""
        sidecar = self._sidecar
        if sidecar is None:
            return
        with sidecar.changed:
            if sidecar.dispenser is self:
                try:
                    self.unlock(DISPENSER)
                finally:
                    sidecar.dispenser = None
                    sidecar.changed.notify_all()

    def hold_slot(self, offset: int) -> bool:
        """Lock the slot of a ticket just taken (at the dispenser) and record it as this
        handle's; False if another process holds it."""
        if not self.try_lock(offset):
            return False
        sidecar = self._attached()
        with sidecar.mu:
            sidecar.tickets[offset] = self
        return True

    def let_go(self, offset: int) -> None:
        """After the slot's unlock: the ticket is no longer this process's."""
        sidecar = self._sidecar
        if sidecar is not None:
            with sidecar.changed:
                if sidecar.tickets.get(offset) is self:
                    del sidecar.tickets[offset]
                    sidecar.changed.notify_all()

    # -- the reader room ----------------------------------------------------------------
    def _poll(self, attempt_once: Callable[[_Sidecar], bool], timeout: float) -> bool:
        """Poll ``attempt_once(record)`` under the record's lock; False once closed."""
        sidecar = self._sidecar
        if sidecar is None:
            return False

        def once() -> bool:
            with sidecar.mu:
                return attempt_once(sidecar)

        return poll(once, timeout)

    def enter_room(self, timeout: float) -> bool:
        entered: list[bool] = []

        def through_the_door(sidecar: _Sidecar) -> bool:
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

        return self._poll(through_the_door, timeout) and bool(entered)

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
        def shut(sidecar: _Sidecar) -> bool:
            if sidecar.door is None and self.try_lock(DOOR):
                sidecar.door = self
            return sidecar.door is self

        return self._poll(shut, timeout)

    def empty_room(self, timeout: float) -> bool:
        def empty(sidecar: _Sidecar) -> bool:
            # Our own readers inside: locking the room now would convert their shared
            # lock into ours instead of waiting for them.
            if sidecar.room is None and not sidecar.readers and self.try_lock(ROOM):
                sidecar.room = self
            return sidecar.room is self

        return self._poll(empty, timeout)

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
        self.unlock_dispenser()
        with sidecar.changed:
            try:
                self._leave_room(sidecar, self._inside)
                self._open_door(sidecar)
            finally:
                for slot in [s for s, owner in sidecar.tickets.items() if owner is self]:
                    del sidecar.tickets[slot]
                    self.unlock(slot)
                sidecar.changed.notify_all()
        with _REGISTRY_LOCK:
            self._sidecar = None
            sidecar.users -= 1
            _close_if_unused(sidecar)

    def drop_inherited(self) -> None:
        """In a fork child: forget the parent's sidecar record (the registry was cleared
        at fork, see :func:`_forget_registry`)."""
        self._sidecar = None
        self._inside = 0
