"""The power-loss simulator across several processes (see :mod:`crashvfs`): each
process's :class:`~crashvfs.CrashVFS` reports to a :class:`Journal`, one file that all
of them append to, and :func:`replay` rebuilds the disk's :class:`~crashvfs.Model` from
it as of the moment the test stopped them all."""

from __future__ import annotations

import fcntl
import itertools
import os
import pickle
import struct
import threading
from typing import Any, Callable

from crashvfs import SECTOR, Model


class Journal:
    """What a :class:`CrashVFS` of one process among several reports to: every record
    (:meth:`Model` call) appended to a journal file the processes share, one ``write()``
    of a length-prefixed pickle each (``O_APPEND``: records never interleave). Opening
    and deleting a file are made atomic with their record (an ``flock`` on the journal,
    and a lock for this process's threads), so that the journal never has a process open
    a file that another one created before the creation's record. The test cuts the
    power by stopping every process (SIGSTOP), reading the journal's length, killing
    them all; :func:`replay` then rebuilds the :class:`Model` as of that moment."""

    sector = SECTOR

    def __init__(self, path: str, psow: bool = False) -> None:
        self.psow = psow
        self.powered = True  # (the power is cut from outside)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._mu = threading.Lock()
        self._tokens = itertools.count()
        self._pid = os.getpid()

    def _record(self, *record: Any) -> None:
        data = pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)
        os.write(self._fd, struct.pack("<I", len(data)) + data)

    def _handle(self, handle: int) -> tuple[int, int]:
        return (self._pid, handle)

    def opening(self) -> Any:
        """Held around an ``xOpen`` or ``xDelete`` and its record."""
        return _Flocked(self._mu, self._fd)

    def opened(self, handle: int, path: str, kind: str, existed: bool, create: bool,
               read: Callable[[], bytes]) -> None:
        self._record("opened", self._handle(handle), path, kind, existed, create)

    def wrote(self, handle: int, kind: str, offset: int, data: bytes) -> None:
        self._record("write", self._handle(handle), offset, data)

    def truncated(self, handle: int, kind: str, size: int) -> None:
        self._record("truncate", self._handle(handle), size)

    def sync_begins(self, handle: int, kind: str) -> Any:
        token = (self._pid, next(self._tokens))
        self._record("sync_begins", self._handle(handle), token)
        return token

    def sync_ends(self, handle: int, token: Any, flags: int) -> None:
        self._record("sync_ends", self._handle(handle), token, flags)

    def deleted(self, path: str, syncdir: bool) -> None:
        self._record("deleted", path, syncdir)

    def closed(self, handle: int) -> None:
        self._record("closed", self._handle(handle))


class _Flocked:
    def __init__(self, mu: threading.Lock, fd: int) -> None:
        self.mu, self.fd = mu, fd

    def __enter__(self) -> None:
        self.mu.acquire()
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.mu.release()


def replay(journal: str, length: int, files: dict[str, tuple[str, bytes]]) -> Model:
    """The :class:`Model` of the first ``length`` bytes of ``journal`` (whole records
    only), starting from ``files`` (path -> (kind, bytes)): the files as they were,
    durable, before the processes started."""
    model = Model()
    for n, (path, (kind, content)) in enumerate(files.items()):
        model.opened(-1 - n, path, kind, True, False, lambda c=content: c)
        model.closed(-1 - n)
    with open(journal, "rb") as fh:
        data = fh.read(length)
    pos = 0
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        if pos + 4 + size > len(data):
            break  # a record cut short by the kill
        op, *args = pickle.loads(data[pos + 4:pos + 4 + size])
        pos += 4 + size
        if op == "opened":
            handle, path, kind, existed, create = args
            assert not existed or path in model.names, f"{path} was never seen created"
            model.opened(handle, path, kind, existed, create, lambda: b"")
        else:
            getattr(model, op)(*args)
    return model
