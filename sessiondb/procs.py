"""The process record: who has a store open and what each is doing, in a sidecar.

Every instance that opens a SQLite store publishes a *slot* in ``<db>.sessiondb-procs``:
who it is (pid, program, host, when it opened, its ``wal_limit``), the figures of its
``stats()`` (writes, failed writes, retries, timeouts, hold timeouts, contended writes,
longest wait, longest hold, checkpoints), and what it is doing now: idle, waiting for the
write lock since t, holding it since t, or reading in a ``snapshot()`` block since t
(which keeps the WAL from being reset), and the same for its WAL reset. ``sessiondb
top`` and ``sessiondb stats`` read every slot (:func:`read_record`). The database file,
its ``-wal`` and ``-shm`` are never touched here.

*Layout* (little endian): a header of :data:`HEADER` bytes (magic ``SDBPROCS``, layout
version, slot size, and the store's last WAL reset: when, how long, whether it
succeeded, by which pid), then slot ``i`` at ``HEADER + i * SLOT``, up to
:data:`MAX_SLOTS`. A slot holds an identity written once when it is claimed, a writer
block rewritten as the instance's state changes, and a checkpoint block. Times of states
are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for the processes of a boot), the
opening time is wall-clock.

*Cost on the write path*: per write, three ``pwrite()`` calls at the instance's own slot
(waiting and holding: 12 bytes; idle: the whole slot with its counters, about 300
bytes), no fsync, no lock, no read: about 3 microseconds, as much as the gate's own
uncontended path. Rejected: ``mmap``, cheaper
still, but a file truncated by someone else turns a store into ``SIGBUS`` and kills the
writer; a ``pwrite`` past the end only extends the file.

*Liveness*: an instance claims its slot by taking a kernel lock on the slot's first byte
(a classic POSIX record lock through :func:`fcntl.lockf`, which every POSIX system has)
and keeps it until it closes; the kernel drops it when the process ends, however it
ends, so a killed process's row disappears at the next read. A reader tests each slot
with a shared lock, which never conflicts with another reader's; a slot nobody holds is
empty or a dead process's and is not shown. A held slot is also judged as the holders of
leases are (:func:`sessiondb.process.holder_gone`: same host and boot, the pid gone or
reused), which is what remains where the filesystem refuses locks.

Classic record locks belong to the process, and closing *any* descriptor of the file
drops all of them, so a process keeps one descriptor per sidecar (:class:`_Handle`),
shared by its instances and by readers, and closes it only when none uses it; each
instance has a slot of its own (so a row is exactly one instance's ``stats()``). A fork
child inherits none of these locks: it forgets the inherited descriptor and its
instances claim new slots when they reopen.

*Damage*: a file too short, or with a zeroed header, gets its header (re)written by the
next instance that opens the store; a header with another magic (a damaged or foreign
file; the sidecar holds no data) is rewritten too; a file of a newer layout version is
left alone and the instance runs unpublished. Readers raise
:class:`ProcessRecordError` for a foreign or newer file, and count slots that a live
process holds but whose content is not a slot (``damaged``). Publishing never raises
into a write: an error (disk full, the file made read-only) turns this instance's
publishing off.

``$SESSIONDB_PROCS=0`` (or the option ``procs=False``) turns publishing off.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import SessionDBError
from .gate_locks import attempt
from .process import holder_gone, this_process

try:
    import fcntl
except ImportError:  # Windows: no record, the store works without it
    fcntl = None  # type: ignore[assignment]

__all__ = ["ProcessRecordError", "Record", "Row", "Slot", "claim", "enabled",
           "read_record", "sidecar", "totals", "watched_gate"]

SUFFIX = ".sessiondb-procs"
ENV = "SESSIONDB_PROCS"
MAGIC = b"SDBPROCS"
VERSION = 1
HEADER = 256
SLOT = 512
MAX_SLOTS = 4096

IDLE, WAITING, HOLDING, READING = 0, 1, 2, 3
STATES = ("idle", "waiting", "holding", "reading")  # reading: in a snapshot() block

_HEAD = struct.Struct("<8sII")            # magic, version, slot size
_RESET_AT = 32
_RESET = struct.Struct("<ddII")           # wall time, seconds, ok, pid
_SLOT_MAGIC = b"SLOT"
# identity: magic, pid, pid start, pid namespace, opened at (wall), wal_limit, boot id,
# host, program
_IDENT = struct.Struct("<4sIqqdq36s64s64s")
_WRITER_AT = 208
_STATE = struct.Struct("<Id")             # state, since (monotonic)
# state, since, writes, failed, retries, timeouts, hold timeouts, contended, longest wait,
# longest hold, passive checkpoints, resets ok, resets failed
_WRITER = struct.Struct("<Id6Q2d3I")
_CKPT_AT = 304                            # the WAL reset's state, since


class ProcessRecordError(SessionDBError):
    """The process record sidecar cannot be read: not a sessiondb process record, or one
    of a newer layout. It holds no data: the next process that opens the store rewrites
    a damaged one; delete it only while no process has the store open."""


def sidecar(db_path: str | os.PathLike[str]) -> Path:
    """The process record of the store at ``db_path``."""
    path = Path(os.path.abspath(db_path))
    return path.with_name(path.name + SUFFIX)


def enabled() -> bool:
    """False where there are no POSIX record locks, or ``$SESSIONDB_PROCS`` is 0/off."""
    return fcntl is not None and os.environ.get(ENV, "1").strip().lower() not in (
        "0", "off", "false", "no")


# -- one descriptor per sidecar per process ----------------------------------------------

class _Handle:
    """This process's descriptor of one sidecar, shared by its slots and readers."""

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path, self.fd, self.writable = path, fd, writable
        st = os.fstat(fd)
        self.key = (st.st_dev, st.st_ino)
        self.users = 0
        self.slots: set[int] = set()


_MU = threading.Lock()
# By file, not by name: the same file reached under two names (a relative path, a
# symlinked directory) must still get one descriptor, or closing the second would drop
# the locks held through the first.
_HANDLES: dict[tuple[int, int], _Handle] = {}
_SLOTS: "weakref.WeakSet[Slot]" = weakref.WeakSet()


def _acquire(path: str, create: bool) -> _Handle | None:
    """The process's handle of ``path`` (opened if needed); None if ``create`` is False
    and the file does not exist. Raises OSError when it cannot be opened."""
    with _MU:
        try:
            st = os.stat(path, follow_symlinks=False)
            handle = _HANDLES.get((st.st_dev, st.st_ino))
        except FileNotFoundError:
            handle = None
        if handle is None:
            flags = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
            try:
                fd, writable = os.open(path, flags | (os.O_CREAT if create else 0), 0o600), True
            except FileNotFoundError:
                return None
            except PermissionError:
                if create:
                    raise
                fd, writable = os.open(path, flags & ~os.O_RDWR | os.O_RDONLY), False
            try:
                handle = _Handle(path, fd, writable)
            except OSError:
                os.close(fd)
                raise
            _HANDLES[handle.key] = handle
        handle.users += 1
        return handle


def _release(handle: _Handle) -> None:
    with _MU:
        handle.users -= 1
        if handle.users > 0 or _HANDLES.get(handle.key) is not handle:
            return
        del _HANDLES[handle.key]
        try:
            os.close(handle.fd)  # the last user: no lock of this process is left in it
        except OSError:
            pass


def _forget_inherited() -> None:
    # In a fork child: the parent's locks were not inherited, so closing the copies
    # drops nothing of the parent's; the parent's slots are not this process's.
    global _MU
    _MU = threading.Lock()
    for handle in _HANDLES.values():
        try:
            os.close(handle.fd)
        except OSError:
            pass
    _HANDLES.clear()
    for slot in list(_SLOTS):
        slot._fd = -1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited)


def _lock(fd: int, offset: int, exclusive: bool) -> bool:
    """Take a lock on one byte without waiting; False if another process holds one."""
    return attempt(fcntl.lockf, fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                   | fcntl.LOCK_NB, 1, offset, os.SEEK_SET)


def _unlock(fd: int, offset: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, offset, os.SEEK_SET)


def _offset(index: int) -> int:
    return HEADER + index * SLOT


# -- publishing --------------------------------------------------------------------------

class Slot:
    """One instance's slot: claimed by :func:`claim`, written by the write path
    (:meth:`state`, :meth:`publish`), given back by :meth:`close`. No method raises: a
    failed ``pwrite`` turns this slot's publishing off (``error`` says why)."""

    def __init__(self, handle: _Handle, index: int, identity: bytes) -> None:
        self._handle = handle
        # Written again with every full publish, so that a slot survives the file being
        # truncated under it (the cost is the same single pwrite, a few bytes longer).
        self._identity = identity.ljust(_WRITER_AT, b"\0")
        self._fd = handle.fd
        self.index = index
        self.path = handle.path
        self._at = _offset(index)
        self._pid = os.getpid()
        self._writes: Any = None
        self._checkpoints: Any = None
        self.error = ""
        _SLOTS.add(self)

    def attach(self, writes: Any, checkpoints: Any) -> None:
        """The counters this slot publishes: a :class:`sessiondb.writes.WriteCounters` and
        a :class:`sessiondb.checkpoint.CheckpointCounters`."""
        self._writes, self._checkpoints = writes, checkpoints
        self.publish(IDLE)

    def _write(self, data: bytes, at: int) -> None:
        try:
            os.pwrite(self._fd, data, at)
        except (OSError, ValueError) as exc:  # never into the write path
            if self._fd >= 0:
                self.error = f"publishing stopped: {exc}"
            self._fd = -1

    def state(self, state: int, since: float) -> None:
        """The writer's state only (waiting, holding): 12 bytes."""
        if self._fd >= 0:
            self._write(_STATE.pack(state, since), self._at + _WRITER_AT)

    def publish(self, state: int = IDLE, since: float = 0.0) -> None:
        """The writer's state with every counter."""
        w, c = self._writes, self._checkpoints
        if self._fd < 0 or w is None:
            return
        self._write(self._identity + _WRITER.pack(
            state, since, w.writes, w.failed, w.retries, w.timeouts, w.hold_timeouts,
            w.contended, w.longest_wait_s, w.longest_hold_s, c.passive_runs & 0xFFFFFFFF,
            c.resets_ok & 0xFFFFFFFF, c.resets_failed & 0xFFFFFFFF), self._at)

    def checkpoint(self, state: int, since: float = 0.0) -> None:
        """The WAL reset's state: waiting for the write gate, or holding it."""
        if self._fd >= 0:
            self._write(_STATE.pack(state, since), self._at + _CKPT_AT)

    def reset_done(self, ok: bool, seconds: float) -> None:
        """Record a WAL reset attempt as the store's last one (the header)."""
        if self._fd >= 0:
            self._write(_RESET.pack(time.time(), seconds, int(ok), os.getpid()), _RESET_AT)

    def close(self) -> None:
        """Give the slot back (its row disappears). In a fork child, a no-op."""
        handle, self._handle = self._handle, None
        self._fd = -1
        if handle is None or os.getpid() != self._pid:
            return
        try:
            os.pwrite(handle.fd, b"\0" * 4, self._at)
            _unlock(handle.fd, self._at)
        except OSError:
            pass  # closing the descriptor (below, when last) drops the lock anyway
        finally:
            with _MU:
                handle.slots.discard(self.index)
            _release(handle)


def claim(db_path: str | os.PathLike[str], wal_limit: int) -> Slot | None:
    """Claim a slot in the process record of the store at ``db_path``; None when the
    record is off, unusable (a symlink, no permission, no locks, a newer layout) or
    full: the store works the same, unpublished."""
    if not enabled():
        return None
    try:
        handle = _acquire(str(sidecar(db_path)), create=True)
    except OSError:
        return None
    if handle is None:
        return None
    try:
        if handle.writable and _prepare(handle.fd):
            for index in range(MAX_SLOTS):
                with _MU:
                    if index in handle.slots:
                        continue
                    if not _lock(handle.fd, _offset(index), exclusive=True):
                        continue
                    handle.slots.add(index)
                slot = Slot(handle, index, _identity(wal_limit))
                os.pwrite(handle.fd, slot._identity.ljust(SLOT, b"\0"), slot._at)
                return slot
    except OSError:
        pass
    _release(handle)
    return None


def _prepare(fd: int) -> bool:
    """Write the header if it is missing, zeroed or foreign; False for a newer layout."""
    raw = os.pread(fd, _HEAD.size, 0).ljust(_HEAD.size, b"\0")
    magic, version, size = _HEAD.unpack(raw)
    if magic == MAGIC and (version, size) != (VERSION, SLOT):
        return False  # another layout: leave it to the sessiondb that wrote it
    if (magic, version, size) != (MAGIC, VERSION, SLOT):
        os.pwrite(fd, _HEAD.pack(MAGIC, VERSION, SLOT), 0)
    return True


def _identity(wal_limit: int) -> bytes:
    me = this_process()
    return _IDENT.pack(
        _SLOT_MAGIC, me.pid, -1 if me.start is None else me.start,
        -1 if me.pid_ns is None else me.pid_ns, time.time(), wal_limit,
        (me.boot_id or "").encode()[:36], me.host.encode()[:64], program().encode()[:64])


def program() -> str:
    """What this process is, for a person: the script or command name, and the
    ``multiprocessing`` name of a child process."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    name = os.path.basename(argv0) if argv0 not in ("-c", "-m") else f"python {argv0}"
    if name == "__main__.py":
        name = os.path.basename(os.path.dirname(argv0)) or name
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        name = f"{name or 'python'} [{mp.current_process().name}]"
    return name or "python"


class _WatchedGate:
    """A gate whose holding and waiting are published as a slot's WAL reset state (the
    checkpointer's gate handle; see :mod:`sessiondb.checkpoint`)."""

    def __init__(self, gate: Any, slot: Slot) -> None:
        self._gate, self._slot = gate, slot

    def acquire(self, timeout: float) -> tuple[float, bool]:
        self._slot.checkpoint(WAITING, time.monotonic())
        try:
            entered = self._gate.acquire(timeout)
        except BaseException:
            self._slot.checkpoint(IDLE)
            raise
        self._slot.checkpoint(HOLDING, time.monotonic())
        return entered

    def release(self, held: float | None = None) -> None:
        try:
            self._gate.release(held)
        finally:
            self._slot.checkpoint(IDLE)

    def __getattr__(self, name: str) -> Any:  # the reader room, close, ...
        return getattr(self._gate, name)


def watched_gate(open_gate: Callable[[], Any], slot: Slot | None) -> Callable[[], Any]:
    """``open_gate``, whose gates publish their holder's state in ``slot``."""
    if slot is None:
        return open_gate
    return lambda: _WatchedGate(open_gate(), slot)


# -- reading -----------------------------------------------------------------------------

@dataclass
class Row:
    """One live instance in the record. Times in seconds; ``state_s`` and
    ``reset_state_s`` are how long the state has lasted (0 when idle)."""

    slot: int
    pid: int
    program: str
    host: str
    opened_at: float
    wal_limit: int
    state: str
    state_s: float
    writes: int
    failed_writes: int
    retries: int
    timeouts: int
    hold_timeouts: int
    contended_writes: int
    lock_wait_max_s: float
    lock_hold_max_s: float
    passive_runs: int
    resets_ok: int
    resets_failed: int
    reset_state: str
    reset_state_s: float
    this_process: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Record:
    """What :func:`read_record` found: the live rows (slot order), the slots held by a
    live process but damaged, and the store's last WAL reset (``at`` wall-clock, ``s``,
    ``ok``, ``pid``) or None."""

    path: str
    exists: bool
    rows: list[Row]
    damaged: int
    last_reset: dict[str, Any] | None


def read_record(db_path: str | os.PathLike[str]) -> Record:
    """Every live instance's row in the process record of the store at ``db_path``.
    Never creates the file.

    :raises ProcessRecordError: the file is not a process record, or of a newer layout.
    :raises OSError: it exists but cannot be read.
    """
    path = str(sidecar(db_path))
    if fcntl is None:
        return Record(path, False, [], 0, None)
    handle = _acquire(path, create=False)
    if handle is None:
        return Record(path, False, [], 0, None)
    try:
        size = os.fstat(handle.fd).st_size
        data = os.pread(handle.fd, min(size, _offset(MAX_SLOTS)), 0)
        with _MU:
            own = set(handle.slots)
        return _parse(path, handle.fd, data, own)
    finally:
        _release(handle)


def _parse(path: str, fd: int, data: bytes, own: set[int]) -> Record:
    head = data[:HEADER].ljust(HEADER, b"\0")
    magic, version, size = _HEAD.unpack_from(head)
    if head.strip(b"\0") and magic != MAGIC:
        raise ProcessRecordError(f"{path} is not a sessiondb process record; it holds no "
                                 "data: the next process that opens the store rewrites it")
    if magic == MAGIC and (version, size) != (VERSION, SLOT):
        raise ProcessRecordError(f"{path} was written by a newer sessiondb (layout "
                                 f"{version}); use that version's `sessiondb top`")
    at, seconds, ok, pid = _RESET.unpack_from(head, _RESET_AT)
    last_reset = ({"at": at, "s": seconds, "ok": bool(ok), "pid": pid} if at else None)
    rows, damaged = [], 0
    now = time.monotonic()
    for index in range(max(0, (len(data) - HEADER) // SLOT)):
        raw = data[_offset(index):_offset(index + 1)]
        mine = index in own
        held = True if mine else _held(fd, _offset(index))
        if not held:
            continue  # free, or left by a process that has ended
        if raw[:4] != _SLOT_MAGIC:
            # Zeros: being claimed or given back this instant. Anything else in a slot a
            # live process holds was written by something other than sessiondb.
            damaged += held is True and any(raw[:4])
            continue
        row = _row(index, raw, now, mine)
        if row is None:
            damaged += 1
        elif mine or not _gone(raw):
            rows.append(row)
    return Record(path, True, rows, damaged, last_reset)


def _held(fd: int, offset: int) -> bool | None:
    """True if a live process holds the slot's lock, False if nobody does, None if the
    filesystem cannot say (then identity alone judges)."""
    try:
        if _lock(fd, offset, exclusive=False):
            _unlock(fd, offset)
            return False
        return True
    except OSError:
        return None


def _gone(raw: bytes) -> bool:
    _, pid, start, ns, _, _, boot, host, _ = _IDENT.unpack_from(raw)
    return holder_gone(_text(host), _text(boot) or None, None if ns < 0 else ns, pid,
                       None if start < 0 else start)


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


def _row(index: int, raw: bytes, now: float, mine: bool) -> Row | None:
    _, pid, _, _, opened, wal_limit, _, host, prog = _IDENT.unpack_from(raw)
    (state, since, writes, failed, retries, timeouts, hold_timeouts, contended, wait, hold,
     passive, ok, bad) = _WRITER.unpack_from(raw, _WRITER_AT)
    reset_state, reset_since = _STATE.unpack_from(raw, _CKPT_AT)
    if state >= len(STATES) or reset_state >= len(STATES):
        return None
    return Row(index, pid, _text(prog), _text(host), opened, wal_limit, STATES[state],
               max(0.0, now - since) if state else 0.0, writes, failed, retries, timeouts,
               hold_timeouts, contended, wait, hold, passive, ok, bad, STATES[reset_state],
               max(0.0, now - reset_since) if reset_state else 0.0, mine)


def totals(rows: list[Row]) -> dict[str, Any]:
    """The figures of every row together: counts summed, longest wait and hold the
    largest, and how many instances hold, wait, or read in a snapshot."""
    summed = ("writes", "failed_writes", "retries", "timeouts", "hold_timeouts",
              "contended_writes")
    out: dict[str, Any] = {"processes": len(rows)}
    out["holding"] = sum(1 for r in rows if "holding" in (r.state, r.reset_state))
    out["waiting"] = sum(1 for r in rows if "waiting" in (r.state, r.reset_state))
    out["reading"] = sum(1 for r in rows if r.state == "reading")
    out.update({k: sum(getattr(r, k) for r in rows) for k in summed})
    out["lock_wait_max_s"] = max((r.lock_wait_max_s for r in rows), default=0.0)
    out["lock_hold_max_s"] = max((r.lock_hold_max_s for r in rows), default=0.0)
    return out
