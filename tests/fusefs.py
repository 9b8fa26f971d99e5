"""A FUSE passthrough filesystem for the tests: ``python fusefs.py SOURCE MOUNTPOINT``.

Every call is passed on to the directory SOURCE, unchanged, by ``mfusepy`` (ctypes
bindings of libfuse 2 or 3): the plainest FUSE filesystem there is. Two mounts of one
SOURCE are two views of the same files, each with a page cache and locks of its own, as
a VM and its host (virtiofs, 9p) or two NFS clients have; SQLite loses writes across them
(``tests/museum/test_13_unsafe_filesystem.py``). Runs in the foreground until unmounted.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

import mfusepy as fuse

_STAT = ("st_atime_ns", "st_ctime_ns", "st_mtime_ns", "st_gid", "st_mode", "st_nlink",
         "st_size", "st_uid", "st_ino")
_STATVFS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")


class Passthrough(fuse.Operations):
    use_ns = True

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)  # libfuse 3 changes the working directory

    def _p(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fh: Any = None) -> dict[str, int]:
        try:
            st = os.lstat(self._p(path))
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno) from None
        out = {k: getattr(st, k) for k in _STAT}
        for k in ("st_atime", "st_ctime", "st_mtime"):
            out[k] = out.pop(k + "_ns")
        return out

    def readdir(self, path: str, fh: Any) -> list[str]:
        return [".", "..", *os.listdir(self._p(path))]

    def open(self, path: str, flags: int) -> int:
        return os.open(self._p(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._p(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: Any = None) -> None:
        os.truncate(self._p(path), length)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        os.fsync(fh)
        return 0

    def unlink(self, path: str) -> None:
        os.unlink(self._p(path))

    def rename(self, old: str, new: str) -> None:
        os.rename(self._p(old), self._p(new))

    def link(self, target: str, source: str) -> None:
        os.link(self._p(source), self._p(target))

    def mkdir(self, path: str, mode: int) -> None:
        os.mkdir(self._p(path), mode)

    def rmdir(self, path: str) -> None:
        os.rmdir(self._p(path))

    def chmod(self, path: str, mode: int) -> None:
        os.chmod(self._p(path), mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        os.chown(self._p(path), uid, gid)

    def utimens(self, path: str, times: Any = None) -> None:
        os.utime(self._p(path), ns=times)

    def access(self, path: str, mode: int) -> None:
        if not os.access(self._p(path), mode):
            raise fuse.FuseOSError(errno.EACCES)

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self._p(path))
        return {k: getattr(st, k) for k in _STATVFS}


if __name__ == "__main__":
    fuse.FUSE(Passthrough(sys.argv[1]), sys.argv[2], foreground=True, nothreads=True,
              fsname="passfs", subtype="passfs")
