"""Files written for the user (``sessiondb export -o FILE``): on the disk as they grow.

A file written without syncs sits in the page cache until the kernel writes it back,
all of it at once, about 30 s after it was first dirtied (Linux's default
``vm.dirty_expire_centisecs``). For an export of a large store that is a gigabyte or more
going to the disk in one burst, at a moment nobody chose, and every fsync on that disk
meanwhile queues behind it: the commits of the store's writers, or of an import of the
same file. Measured on the scale benchmark's million-message store, whose import followed
its 1.4 GB export: an appender beside the import waited up to 446 ms, 9.6 s into it. So
:class:`SyncedText` syncs the file after every :data:`SYNC_CHARS` characters written, and
once more at the end, before the file takes its name (:func:`replace_synced`), so that
what the call reported written is there after a power cut too (on macOS the last sync is
``F_FULLFSYNC``, as the store's own with ``durability="full"``: ``fsync()`` there stops
at the drive's cache). A sync that fails fails the write: the caller's file is left as
it was.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from .connection import sync_directory

#: Characters written between two syncs of the file (8 MiB of ASCII text).
SYNC_CHARS = 8 * 1024 * 1024

_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
_replace = os.replace


class SyncedText:
    """A text file opened for writing, synced every :data:`SYNC_CHARS` characters.

    Only ``write`` is offered: what :func:`sessiondb.jsonstream.write_jsonl` and
    :func:`~sessiondb.jsonstream.write_json_list` call.
    """

    def __init__(self, fh: IO[str]) -> None:
        self._fh = fh
        self._pending = 0

    def write(self, text: str) -> int:
        written = self._fh.write(text)
        self._pending += len(text)
        if self._pending >= SYNC_CHARS:
            self.sync()
        return written

    def sync(self, last: bool = False) -> None:
        """Flush Python's buffer and sync the file's data; ``last``: to the platter, on
        macOS (``F_FULLFSYNC``)."""
        self._fh.flush()
        full = getattr(fcntl, "F_FULLFSYNC", None)  # macOS only
        if last and full is not None:
            fcntl.fcntl(self._fh.fileno(), full)
        else:
            _datasync(self._fh.fileno())
        self._pending = 0


def replace_synced(tmp: Path, path: Path) -> None:
    """Give the written (and synced) file ``tmp`` its name ``path``, and make the new
    name durable: readers see the old file or the whole new one, before and after a
    power cut."""
    _replace(tmp, path)
    sync_directory(path.parent)
