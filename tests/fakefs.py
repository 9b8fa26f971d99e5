"""Stores on a filesystem this machine cannot mount (NFS, virtiofs, SMB ...): the tests
replace :func:`sessiondb.filesystems.examine` so that it reports one, the way the real
probe would there. Everything after the probe (the refusal, the rollback journal) runs
as it would on that filesystem.
"""

from __future__ import annotations

import os
from typing import Callable

from sessiondb import filesystems
from sessiondb.filesystems import Filesystem, classify, existing_directory


def on(fstype: str = "nfs4", magic: int | None = 0x6969
       ) -> Callable[["str | os.PathLike[str]"], Filesystem]:
    """An ``examine`` that puts every store on a filesystem of this type."""
    _, verdict, reason = classify(fstype, magic)

    def examine(path: "str | os.PathLike[str]") -> Filesystem:
        return Filesystem(fstype, magic, "/mnt/share", "files:/export", verdict, reason,
                          existing_directory(path))
    return examine


def install(fstype: str = "nfs4", magic: int | None = 0x6969) -> None:
    """For the rest of this process (a spawned worker)."""
    filesystems.examine = on(fstype, magic)
