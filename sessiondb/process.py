"""Who holds a lease or claim, and whether that process has surely ended.

A holder is recorded as (host name, boot id, pid namespace, pid, process start time).
Only a holder on this host, since this boot, in this pid namespace can be judged: its
process has ended when its pid no longer exists, is a zombie, or belongs to a process
started at another time (the pid was reused). Anything else -- another host, another
container's pid namespace, no ``/proc``, ``/proc`` unreadable (out of descriptors,
``hidepid``) -- is *unknown*, and an unknown holder keeps its lease or claim until its TTL.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Process:
    """The identity recorded with a lease or claim (the columns ``host``, ``boot_id``,
    ``pid_ns``, ``pid``, ``pid_start``)."""

    host: str
    boot_id: str | None
    pid_ns: int | None
    pid: int
    start: int | None  # clock ticks after boot (/proc/<pid>/stat, field 22)


class _Unknown(Exception):
    """/proc could not answer (not: the process does not exist)."""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of ``pid``; None if no such process exists.

    :raises _Unknown: /proc could not be read for another reason.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise _Unknown from exc
    fields = text[text.rfind(")") + 2:].split()  # the name may hold spaces and ')'
    return fields[0], int(fields[19])


@lru_cache(maxsize=None)
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def this_process() -> Process:
    pid = os.getpid()
    try:
        st = _stat(pid)
    except _Unknown:
        st = None
    return Process(socket.gethostname(), _boot_id(), _pid_ns(), pid, st[1] if st else None)


def holder_gone(host: str | None, boot_id: str | None, pid_ns: int | None, pid: int | None,
                start: int | None) -> bool:
    """True only when the recorded holder process has surely ended (see the module
    docstring); False when it runs or cannot be judged from here."""
    me = this_process()
    if None in (host, boot_id, pid_ns, pid, start, me.boot_id, me.pid_ns) or host != me.host:
        return False
    if boot_id != me.boot_id:
        return True  # the machine rebooted since: every process of then has ended
    if pid_ns != me.pid_ns:
        return False  # another container's pids mean nothing here
    try:
        st = _stat(pid)  # type: ignore[arg-type]
    except _Unknown:
        return False
    return st is None or st[0] in ("Z", "X") or st[1] != start
