"""The disk under a benchmark: its file system, and what one sync costs there.

A durable commit waits for a sync of the ``-wal`` (``durability="full"``), so that figure
explains the difference between the ``sessiondb`` and ``sessiondb-normal`` strategies.
It means something only on a real disk: on tmpfs a sync costs nothing, and it is
measured in the directory that holds the benchmark's files, which is where the commits
sync.
"""

from __future__ import annotations

import os
import time
from typing import Any

from ..writes import percentile

#: Syncs timed by :func:`fsync_probe`; each follows an append of one 1 KiB page and its
#: frame header (1048 bytes), the size of the WAL frames sessiondb's stores write.
PROBE_SYNCS = 200
_FRAME = 1048


def filesystem_of(path: str) -> dict[str, str]:
    """The mount that holds ``path`` (from ``/proc/mounts``; empty where there is none)."""
    path = os.path.realpath(path)
    best: dict[str, str] = {}
    try:
        with open("/proc/mounts", encoding="utf-8") as fh:
            for line in fh:
                device, mount, fstype = line.split()[:3]
                mount = mount.replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best.get("mount", "")):
                    best = {"device": device, "mount": mount, "type": fstype}
    except OSError:
        pass
    return best


def fsync_probe(directory: str, syncs: int = PROBE_SYNCS) -> dict[str, Any]:
    """Time ``fdatasync`` (``fsync`` where there is none) after each append of a WAL
    frame's worth of bytes to a scratch file in ``directory`` (removed after): what
    SQLite's Unix VFS calls for each durable commit. Milliseconds."""
    sync = getattr(os, "fdatasync", os.fsync)
    path = os.path.join(directory, f"fsync-probe-{os.getpid()}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    times: list[float] = []
    try:
        block = os.urandom(_FRAME)
        for i in range(syncs):
            os.pwrite(fd, block, i * _FRAME)
            t0 = time.perf_counter()
            sync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    ms = [t * 1000 for t in times]
    return {"call": sync.__name__, "syncs": syncs, "p50_ms": percentile(ms, 50),
            "p90_ms": percentile(ms, 90), "p99_ms": percentile(ms, 99), "max_ms": max(ms),
            "filesystem": filesystem_of(directory)}


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (empty where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return []
