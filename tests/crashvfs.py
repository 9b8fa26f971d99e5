"""A power-loss simulator for SQLite: a VFS shim that plays the disk, after SQLite's own
crash VFS (``src/test6.c``, used by its ``crash*.test`` and ``walcrash*.test``).

Every file SQLite opens through :class:`CrashVFS` is a real file of the platform's VFS:
reads, writes, locks and the ``-shm`` shared memory all go to it, so several
connections, threads and the background checkpoint thread work as they always do. What
the shim adds is a model of what a disk would *keep* (:class:`Model`): for each file
(an :class:`Inode`), the bytes that were synced, and every write and truncate since its
last sync, in order; for each name, which inode the directory holds on the platter and
which one the page cache holds. ``xSync`` makes an inode's pending writes durable
(``SQLITE_SYNC_FULL``, ``_NORMAL`` and ``_DATAONLY`` alike: Linux's ``fdatasync`` keeps
the size the data needs, and nothing else a database file needs is metadata). A sync is
two records: the writes recorded before it began are the ones it covers, so a write
another thread makes while it runs stays pending.

The *cut* (:meth:`Model.crash`), at a chosen moment (the Nth sync or write of a kind of
file, see :meth:`Disk.arm`, or whenever the test calls :meth:`Disk.cut`), decides what
reached the platter, per a seeded random policy: all pending writes dropped, all applied,
each applied or dropped (which is also what reordering comes to: a disk never writes an
older version of a sector over a newer one, since the cache holds only the newest, so
overlapping writes keep their order and only non-overlapping ones can land in any order),
or each applied, dropped or *torn*, sector by sector (:data:`SECTOR` bytes): a torn
sector holds the new bytes, the old ones, or garbage, and, unless the disk claims
powersafe overwrite (``psow=True``), the garbage covers the whole sector, bytes the write
never touched included. From then on nothing more reaches the model (the machine is off);
the process keeps running on its page cache until the test has closed every connection,
and :meth:`Disk.reboot` then writes the surviving bytes over the real files, so the next
open sees exactly what the disk kept.

Also modelled:

* *Directories.* A file the shim saw created, or deleted, keeps its old state on the
  platter until the directory is synced: SQLite's Unix VFS syncs it on the first
  ``xSync`` of a ``-wal`` or journal it opened with ``SQLITE_OPEN_CREATE`` (``os_unix.c``,
  ``UNIXFILE_DIRSYNC``), and on ``xDelete(syncdir=True)``; the shim mirrors both. At the
  cut each name whose creation or deletion was not synced is, per the seed, as the
  platter had it or as the cache did (a ``-wal`` deleted at close may come back).
* *The ``-shm`` file.* After a reboot it is stale (the kernel wrote some of the mapped
  pages back) or gone (``/dev/shm``): :meth:`Disk.reboot` deletes it, empties it, leaves
  the last bytes the page cache had, or fills it with garbage, per the seed. SQLite must
  rebuild the WAL index from the ``-wal`` in every case.
* *What SQLite is told.* ``xSectorSize`` is :data:`SECTOR` and
  ``xDeviceCharacteristics`` claims nothing (no atomic writes, no safe append, no
  sequential writes, no powersafe overwrite; test6.c's default), so SQLite takes every
  precaution it has (it pads a synced WAL commit to a sector boundary); ``psow=True``
  claims powersafe overwrite, as SQLite's Unix VFS does by default on Linux.

Not modelled: a disk that acknowledges a sync and then loses the data (no software can
survive it); the creation of a file outside the shim (sessiondb links a new store into
place and syncs the directory itself, :func:`sessiondb.connection.create_store`): the
simulation starts from files that already exist and are durable; files SQLite does not
need to keep (temporary files, the ``-shm``) are not tracked.

Processes: a :class:`Disk` lives in one process, where the workload runs several
:class:`~sessiondb.SessionDB` instances on threads (each with its own connections and
gate descriptors, so they exclude each other as processes do, though SQLite shares its
per-file lock state between the connections of a process); there the power can go at
an exact event (the Nth sync). For several processes, each one's VFS reports to a shared
journal instead (:mod:`crashjournal`), and the power goes when the test stops them all.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import apsw

#: The sector the simulated disk writes atomically, or tears (test6.c's default).
SECTOR = 512

#: The files a disk must keep, by SQLite's open flag (temporary files and the -shm
#: need not survive a reboot).
KINDS = {apsw.SQLITE_OPEN_MAIN_DB: "db", apsw.SQLITE_OPEN_WAL: "wal",
         apsw.SQLITE_OPEN_MAIN_JOURNAL: "journal", apsw.SQLITE_OPEN_SUPER_JOURNAL: "journal"}
#: Files whose first sync also syncs their directory when SQLite opened them with
#: SQLITE_OPEN_CREATE (os_unix.c: UNIXFILE_DIRSYNC).
DIRSYNC_KINDS = ("wal", "journal")

#: How a cut treats the writes that were not synced (see the module docstring), drawn
#: per seed; ``"garbage"`` (every pending write torn, every sector of it garbage) is only
#: asked for by name, to stage the worst case.
POLICIES = ("drop", "keep", "mixed", "torn")
#: What a reboot leaves of a database's -shm file.
SHM_FATES = ("deleted", "empty", "stale", "garbage")


class Inode:
    """One file's content: what is on the platter, and what is still in the cache."""

    __slots__ = ("durable", "pending")

    def __init__(self, durable: bytes = b"") -> None:
        self.durable = bytearray(durable)
        self.pending: list[tuple[int, bytes | int]] = []  # (offset, data) | (-1, size)


def _apply(buf: bytearray, op: tuple[int, bytes | int]) -> None:
    offset, data = op
    if offset < 0:  # a truncate (or an extension with zeros)
        size = int(data)  # type: ignore[arg-type]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))
        return
    assert isinstance(data, bytes)
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    buf[offset:end] = data


@dataclass
class CutFigures:
    """What one cut did to the writes in flight (summed over files)."""

    policy: str = ""
    pending: int = 0            # writes and truncates not synced at the cut
    applied: int = 0
    dropped: int = 0
    torn: int = 0               # writes torn sector by sector
    garbled_sectors: int = 0
    names_reverted: int = 0     # creations/deletions the directory did not keep
    shm: str = ""

    def add(self, other: "CutFigures") -> None:
        for name in ("pending", "applied", "dropped", "torn", "garbled_sectors",
                     "names_reverted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Model:
    """What the disk holds; fed with records of what SQLite did (module docstring)."""

    def __init__(self) -> None:
        #: path -> [inode on the platter, inode in the cache] (None: no such file)
        self.names: dict[str, list[Inode | None]] = {}
        self.handles: dict[int, tuple[Inode, str, bool]] = {}  # id -> (inode, path, dirsync)
        self.syncing: dict[int, int] = {}  # sync token -> pending writes it covers
        self.counts: Counter[str] = Counter()

    def opened(self, handle: int, path: str, kind: str, existed: bool, create: bool,
               read: Callable[[], bytes]) -> None:
        names = self.names.get(path)
        if names is None or names[1] is None:
            if existed:  # first seen: the simulation starts from a synced disk
                inode = Inode(read())
                self.names[path] = [inode, inode]
            else:        # created now: on the platter only once its directory is synced
                inode = Inode()
                self.names[path] = [None if names is None else names[0], inode]
        inode = self.names[path][1]
        assert inode is not None
        self.handles[handle] = (inode, path, create and kind in DIRSYNC_KINDS)
        self.counts[f"open {kind}"] += 1

    def write(self, handle: int, offset: int, data: bytes) -> None:
        self.handles[handle][0].pending.append((offset, data))
        self.counts["write"] += 1

    def truncate(self, handle: int, size: int) -> None:
        self.handles[handle][0].pending.append((-1, size))
        self.counts["truncate"] += 1

    def sync_begins(self, handle: int, token: int) -> None:
        self.syncing[token] = len(self.handles[handle][0].pending)

    def sync_ends(self, handle: int, token: int, flags: int) -> None:
        inode, path, dirsync = self.handles[handle]
        covered = self.syncing.pop(token)
        for op in inode.pending[:covered]:
            _apply(inode.durable, op)
        del inode.pending[:covered]
        self.counts[f"sync {_flag_name(flags)}"] += 1
        if dirsync:
            self.handles[handle] = (inode, path, False)
            self.sync_directory(os.path.dirname(path))

    def deleted(self, path: str, syncdir: bool) -> None:
        if path in self.names:
            self.names[path][1] = None
        if syncdir:
            self.sync_directory(os.path.dirname(path))

    def closed(self, handle: int) -> None:
        self.handles.pop(handle, None)

    def sync_directory(self, directory: str) -> None:
        self.counts["sync directory"] += 1
        for path, names in self.names.items():
            if os.path.dirname(path) == directory:
                names[0] = names[1]

    def crash(self, rng: random.Random, policy: str, psow: bool = False,
              sector: int = SECTOR) -> tuple[dict[str, bytes | None], CutFigures]:
        """The files as the disk keeps them after a cut now: path -> bytes (None: no
        such file), and what the cut did."""
        figures = CutFigures(policy=policy)
        kept: dict[int, bytes] = {}
        out: dict[str, bytes | None] = {}
        for path, (on_platter, in_cache) in sorted(self.names.items()):
            inode = on_platter
            if on_platter is not in_cache:  # a creation or deletion the directory
                if rng.random() < 0.5:      # may or may not have kept
                    inode = in_cache
                else:
                    figures.names_reverted += 1
            if inode is None:
                out[path] = None
                continue
            if id(inode) not in kept:
                kept[id(inode)] = _survivor(inode, rng, policy, psow, sector, figures)
            out[path] = kept[id(inode)]
        return out, figures


def _survivor(inode: Inode, rng: random.Random, policy: str, psow: bool, sector: int,
              figures: CutFigures) -> bytes:
    buf = bytearray(inode.durable)
    for op in inode.pending:
        figures.pending += 1
        if policy == "keep":
            fate = "apply"
        elif policy == "drop":
            fate = "drop"
        elif policy == "mixed":
            fate = rng.choice(("apply", "drop"))
        elif policy == "garbage":
            fate = "tear"
        else:
            fate = rng.choice(("apply", "drop", "tear"))
        if fate == "tear" and op[0] < 0:
            fate = rng.choice(("apply", "drop"))  # a size change is not torn
        if fate == "apply":
            _apply(buf, op)
            figures.applied += 1
        elif fate == "drop":
            figures.dropped += 1
        else:
            figures.torn += 1
            figures.garbled_sectors += _tear(buf, op, rng, psow, sector,
                                             garbage=policy == "garbage")
    return bytes(buf)


def _tear(buf: bytearray, op: tuple[int, Any], rng: random.Random, psow: bool,
          sector: int, garbage: bool = False) -> int:
    """Write ``op`` sector by sector, each sector new, old or garbage; returns how many
    sectors became garbage. Without powersafe overwrite the garbage fills the sector,
    beyond the bytes written."""
    offset, data = op
    end = offset + len(data)
    if end > len(buf):
        buf.extend(bytes(end - len(buf)))
    garbled = 0
    start = offset - offset % sector
    while start < end:
        lo, hi = max(start, offset), min(start + sector, end)
        fate = 2 if garbage else rng.randrange(3)
        if fate == 0:
            buf[lo:hi] = data[lo - offset:hi - offset]
        elif fate == 2:
            if not psow:
                lo, hi = start, min(start + sector, len(buf))
            buf[lo:hi] = rng.randbytes(hi - lo)
            garbled += 1
        start += sector
    return garbled


def _flag_name(flags: int) -> str:
    name = "full" if flags & 0x0F == apsw.SQLITE_SYNC_FULL else "normal"
    return name + ("+dataonly" if flags & apsw.SQLITE_SYNC_DATAONLY else "")


# -- the disk: a model fed by the VFS of this process --------------------------------


@dataclass
class Trigger:
    """Cut the power at the ``n``-th ``op`` ("write", "sync", "truncate") of files of
    ``kind`` ("db", "wal", or "any"): before a sync takes effect, after a write or a
    truncate reached the cache (so that write is one of the pending ones)."""

    op: str
    kind: str
    n: int
    seen: int = 0


@dataclass
class Disk:
    """The simulated disk under every file of a :class:`CrashVFS`, with its power switch.

    :param seed: every random choice of the cuts (policy, fates, torn bytes, the -shm).
    :param psow: claim (and behave with) powersafe overwrite.
    """

    seed: int = 0
    psow: bool = False
    sector: int = SECTOR
    model: Model = field(default_factory=Model)
    powered: bool = True
    trigger: Trigger | None = None
    survivors: dict[str, bytes | None] | None = None
    figures: CutFigures | None = None
    events: Counter = field(default_factory=Counter)  # (op, kind) seen while powered
    cut_by: str = ""

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._mu = threading.Lock()
        self._tokens = itertools.count()

    # -- the test's side ----------------------------------------------------------
    def arm(self, op: str, kind: str, n: int) -> None:
        """Cut the power at the ``n``-th matching event from now (see :class:`Trigger`)."""
        with self._mu:
            self.trigger = Trigger(op, kind, n)

    def cut(self, policy: str | None = None, reason: str = "by the test") -> None:
        """Cut the power now (a no-op if it is already off)."""
        with self._mu:
            self._cut(policy, reason)

    def reboot(self) -> CutFigures:
        """Write what the disk kept over the real files, and power on again with a fresh
        model. Every connection through the VFS must be closed by now.

        :returns: what the cut did (also with the -shm's fate)."""
        with self._mu:
            self._cut(None, "at reboot")
            assert not self.model.handles, "close every connection before the reboot"
            assert self.survivors is not None and self.figures is not None
            figures = self.figures
            figures.shm = restore(self.survivors, self.rng)
            self.model = Model()
            self.powered, self.trigger, self.survivors, self.figures = True, None, None, None
            self.cut_by = ""
            self.events.clear()
            return figures

    # -- the VFS's side -------------------------------------------------------------
    def opening(self) -> Any:
        return contextlib.nullcontext()

    def _event(self, op: str, kind: str) -> None:
        self.events[op, kind] += 1
        t = self.trigger
        if t is not None and t.op == op and t.kind in (kind, "any"):
            t.seen += 1
            if t.seen >= t.n:
                self._cut(None, f"at {op} #{t.n} of {t.kind}")

    def _cut(self, policy: str | None, reason: str) -> None:
        if not self.powered:
            return
        self.powered = False
        self.cut_by = reason
        self.survivors, self.figures = self.model.crash(
            self.rng, policy or self.rng.choice(POLICIES), self.psow, self.sector)

    def opened(self, handle: int, path: str, kind: str, existed: bool, create: bool,
               read: Callable[[], bytes]) -> None:
        with self._mu:
            if self.powered:
                self.model.opened(handle, path, kind, existed, create, read)

    def wrote(self, handle: int, kind: str, offset: int, data: bytes) -> None:
        with self._mu:
            if self.powered and handle in self.model.handles:
                self.model.write(handle, offset, data)
                self._event("write", kind)

    def truncated(self, handle: int, kind: str, size: int) -> None:
        with self._mu:
            if self.powered and handle in self.model.handles:
                self.model.truncate(handle, size)
                self._event("truncate", kind)

    def sync_begins(self, handle: int, kind: str) -> int | None:
        with self._mu:
            if not self.powered or handle not in self.model.handles:
                return None
            self._event("sync", kind)
            if not self.powered:
                return None  # this sync was the cut: it never happened
            token = next(self._tokens)
            self.model.sync_begins(handle, token)
            return token

    def sync_ends(self, handle: int, token: int | None, flags: int) -> None:
        with self._mu:
            if self.powered and token is not None:
                self.model.sync_ends(handle, token, flags)

    def deleted(self, path: str, syncdir: bool) -> None:
        with self._mu:
            if self.powered:
                self.model.deleted(path, syncdir)

    def closed(self, handle: int) -> None:
        with self._mu:
            self.model.closed(handle)


def restore(survivors: dict[str, bytes | None], rng: random.Random) -> str:
    """Make the real files what the disk kept (the simulator acting as the disk after a
    reboot, never the library's doing), and the ``-shm`` what a reboot leaves of it;
    returns the -shm's fate (:data:`SHM_FATES`)."""
    shm = rng.choice(SHM_FATES)
    for path, content in survivors.items():
        _replace(path, content)
        if not path.endswith(("-wal", "-journal")):
            _reset_shm(path + "-shm", shm, rng)
            for journal in (path + "-wal", path + "-journal"):
                if journal not in survivors:  # made after the power went: never on disk
                    _replace(journal, None)
    return shm


def _replace(path: str, content: bytes | None) -> None:
    if content is None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    with open(path, "wb") as fh:
        fh.write(content)


def _reset_shm(path: str, fate: str, rng: random.Random) -> None:
    if not os.path.exists(path):
        return
    if fate == "deleted":
        os.unlink(path)
    elif fate == "empty":
        with open(path, "r+b") as fh:
            fh.truncate(0)
    elif fate == "garbage":
        size = os.path.getsize(path)
        with open(path, "r+b") as fh:
            fh.write(rng.randbytes(size))
    # "stale": the bytes the page cache last had, as the kernel may have written back


# -- the VFS ----------------------------------------------------------------------------


class CrashFile(apsw.VFSFile):
    """A real file of the base VFS whose writes, truncates and syncs the disk records."""

    def __init__(self, vfs: "CrashVFS", name: Any, flags: list[int]) -> None:
        self.disk = vfs.disk
        path = name.filename() if isinstance(name, apsw.URIFilename) else name
        self.kind = next((k for bit, k in KINDS.items() if flags[0] & bit), None)
        self.handle = id(self)
        with self.disk.opening():
            existed = path is not None and os.path.exists(path)
            super().__init__(vfs.base, name, flags)
            if self.kind is not None and path is not None:
                self.disk.opened(self.handle, path, self.kind, existed,
                                 bool(flags[0] & apsw.SQLITE_OPEN_CREATE), self._read_all)
            else:
                self.kind = "other"

    def _read_all(self) -> bytes:
        # Through this file's own descriptor: opening another one and closing it would
        # drop the process's POSIX locks on the file.
        size = super().xFileSize()
        return bytes(super().xRead(size, 0)) if size else b""

    def xWrite(self, data: Any, offset: int) -> None:
        super().xWrite(data, offset)
        self.disk.wrote(self.handle, self.kind, offset, bytes(data))

    def xTruncate(self, newsize: int) -> None:
        super().xTruncate(newsize)
        self.disk.truncated(self.handle, self.kind, newsize)

    def xSync(self, flags: int) -> None:
        token = self.disk.sync_begins(self.handle, self.kind)
        super().xSync(flags)
        self.disk.sync_ends(self.handle, token, flags)

    def xSectorSize(self) -> int:
        return self.disk.sector

    def xDeviceCharacteristics(self) -> int:
        return apsw.SQLITE_IOCAP_POWERSAFE_OVERWRITE if self.disk.psow else 0

    def xClose(self) -> None:
        try:
            super().xClose()
        finally:
            self.disk.closed(self.handle)


class CrashVFS(apsw.VFS):
    """The platform's VFS over a simulated :class:`Disk`; open a store through it with
    ``SessionDB(path, vfs=crash_vfs.name)``. Unregister it when done."""

    _names = itertools.count()

    def __init__(self, disk: Disk, base: str = "") -> None:
        self.disk = disk
        self.base = base
        self.name = f"sessiondb-crash-{os.getpid()}-{next(self._names)}"
        super().__init__(self.name, base)

    def xOpen(self, name: Any, flags: list[int]) -> CrashFile:
        return CrashFile(self, name, flags)

    def xDelete(self, filename: str, syncdir: bool) -> None:
        with self.disk.opening():
            super().xDelete(filename, syncdir)
            self.disk.deleted(filename, syncdir)
