"""The filesystem under a store, and whether SQLite's WAL mode is safe on it.

WAL needs two things of the filesystem that holds the store: file locks that every
process using the store sees, and a shared-memory file (``-shm``, mapped with
``mmap(MAP_SHARED)``) whose pages all of them see coherently
(https://sqlite.org/wal.html#concurrency, https://sqlite.org/useovernet.html). Network
filesystems (NFS, SMB), filesystems a virtual machine or container shares with its host
(9p, virtiofs, VirtualBox and Parallels shared folders), cluster filesystems (CephFS,
Lustre, GPFS, OCFS2, GFS2) and FUSE filesystems guarantee neither: what people have met
there is "locking protocol" errors and corruption within a minute on virtiofs. Seen here
(``tests/museum/test_13_unsafe_filesystem.py``): two processes writing one store through
two FUSE mounts of one directory (two views with caches and locks of their own, as a VM
and its host, or two NFS clients, have) lost half of their acknowledged writes.

:func:`examine` names the filesystem of a store's directory (the nearest one that
exists, after symlinks, since SQLite puts the ``-wal`` and ``-shm`` beside the file a
symlink points to):

- Linux: ``statfs(2)``'s ``f_type`` (through ctypes: the standard library has only
  ``statvfs``, which has no type) and the mount's line in ``/proc/self/mountinfo``,
  which alone tells the members of the FUSE family apart (``fuse.sshfs``, ``fuseblk``,
  ``virtiofs``: one magic for all of them) and where an overlay's upper layer lives
  (classified in turn: an overlay is as safe as the layer that takes the writes);
- macOS: ``statfs(2)``'s ``f_fstypename`` (``apfs``, ``smbfs``, ``macfuse`` ...);
- Windows: only a UNC path (``\\\\server\\share\\...``) is recognized, as a network
  share; a mapped network drive is not examined;
- elsewhere: not examined.

and gives a verdict: ``"safe"``, ``"unsafe"``, ``"unknown"`` (a type missing from the
tables below) or ``"unchecked"`` (nothing could be learned). :func:`use_journal` turns it
into what the engine does, by the ``unsafe_filesystem`` option or, when that is not
given, ``$SESSIONDB_UNSAFE_FILESYSTEM`` (so that every process of a deployment can be
told at once):

============ ======================== =========================== ===============
option       unsafe                   unknown                     unchecked
============ ======================== =========================== ===============
``refuse``   UnsafeFilesystemError    WAL and a FilesystemWarning WAL
``journal``  rollback journal         rollback journal            rollback journal
``allow``    WAL                      WAL                         WAL
============ ======================== =========================== ===============

A safe filesystem always gets WAL. An unknown one is allowed with a warning rather than
refused: the network and shared filesystems are few and well known (they are all in the
table), while new or rare local ones are many, and refusing every one of them would push
their users to ``allow``, which silences the check for good.

The rollback journal (``journal_mode=DELETE``, https://sqlite.org/lockingv3.html) uses
only the byte-range locks on the database file, which every one of these filesystems
implements at least among the processes of one machine that reach the files through one
mount (through two mounts of one directory it loses writes too: exhibit 13 of the
museum). Its price: readers and writers exclude each other (a reader waits while a
write commits, a write's commit waits for the readers to finish, so a long
``snapshot()`` holds writers back for its whole length), and every commit syncs the
journal and the database (``synchronous=FULL``), so writes are slower. It has no WAL, so none of sessiondb's checkpoint machinery runs and
``wal_limit`` has nothing to bound. It is safe only if every process that opens the store
uses it (SQLite switches a store back to WAL for anyone who asks) and, across machines,
only where the filesystem's locks work across machines (NFS with a working lock manager;
never 9p or virtiofs shared with the host): prefer PostgreSQL there.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from .errors import ConfigurationError, FilesystemWarning, UnsafeFilesystemError

#: The values of the ``unsafe_filesystem`` option (see the module docstring).
POLICIES = ("refuse", "journal", "allow")
ENV_POLICY = "SESSIONDB_UNSAFE_FILESYSTEM"

_NETWORK = "a network filesystem: locks and shared memory are not coherent across clients"
_SHARED = ("a filesystem shared with a virtual machine's or container's host: shared "
           "memory and locks are not coherent between the two sides")
_CLUSTER = "a cluster filesystem: shared memory is not coherent across its nodes"
_FUSE = ("a FUSE filesystem: whether processes see each other's shared memory and locks "
         "depends on its implementation and on where its data lives (sshfs, s3fs, rclone, "
         "gcsfuse ... are network filesystems)")

#: Filesystem types (as ``/proc/self/mountinfo`` or macOS's ``f_fstypename`` name them)
#: on which WAL corrupts or fails, and why.
UNSAFE: dict[str, str] = {
    **dict.fromkeys(("nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "afpfs",
                     "webdav", "davfs", "ncpfs", "ncp", "afs", "kafs", "coda"), _NETWORK),
    **dict.fromkeys(("9p", "v9fs", "virtiofs", "vboxsf", "vmhgfs", "prl_fs", "drvfs"),
                    _SHARED),
    **dict.fromkeys(("ceph", "lustre", "gpfs", "fhgfs", "beegfs", "ocfs2", "gfs2",
                     "glusterfs", "orangefs", "pvfs2"), _CLUSTER),
    **dict.fromkeys(("fuse", "fuseblk", "macfuse", "osxfuse", "fusefs"), _FUSE),
}

#: Local filesystem types, where WAL works.
SAFE = frozenset((
    "ext2", "ext3", "ext4", "ext2/ext3/ext4", "xfs", "btrfs", "tmpfs", "ramfs", "zfs",
    "f2fs", "jfs", "reiserfs", "nilfs2", "bcachefs", "hfs", "hfsplus", "apfs", "vfat",
    "msdos", "exfat", "ntfs", "ntfs3", "ufs", "ffs", "udf", "iso9660", "cd9660",
    "squashfs", "erofs", "romfs", "minix", "ecryptfs", "overlay",
))

#: Linux ``statfs`` magics (``f_type``, from ``linux/magic.h`` and statfs(2)) and the
#: type each stands for. FUSE's is shared by every FUSE filesystem and by virtiofs.
MAGICS: dict[int, str] = {
    0xEF53: "ext2/ext3/ext4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
    0x858458F6: "ramfs", 0x2FC12FC1: "zfs", 0xF2F52010: "f2fs", 0x3153464A: "jfs",
    0x52654973: "reiserfs", 0x3434: "nilfs2", 0xCA451A4E: "bcachefs", 0x4244: "hfs",
    0x482B: "hfsplus", 0x4D44: "vfat", 0x2011BAB0: "exfat", 0x7366746E: "ntfs3",
    0x15013346: "udf", 0x9660: "iso9660", 0x73717368: "squashfs", 0xE0F5E1E2: "erofs",
    0x7275: "romfs", 0x137F: "minix", 0x5346544E: "ntfs", 0xF15F: "ecryptfs",
    0x794C7630: "overlay",
    0x6969: "nfs", 0xFF534D42: "cifs", 0xFE534D42: "smb2", 0x517B: "smb",
    0x564C: "ncp", 0x5346414F: "afs", 0x6B414653: "kafs", 0x73757245: "coda",
    0x01021997: "9p", 0x786F4256: "vboxsf", 0xBACBACBC: "vmhgfs", 0x7C7C6673: "prl_fs",
    0x00C36400: "ceph", 0x0BD00BD0: "lustre", 0x47504653: "gpfs", 0x19830326: "fhgfs",
    0x7461636F: "ocfs2", 0x01161970: "gfs2", 0x20030528: "orangefs",
    0x65735546: "fuse",
}
_FUSE_MAGIC = 0x65735546
_MAX_OVERLAY_DEPTH = 3


@dataclass(frozen=True)
class Filesystem:
    """What :func:`examine` found about the filesystem of a store's directory.

    :ivar type: the type's name: ``"ext4"``, ``"nfs4"``, ``"fuse.sshfs"``, ``"virtiofs"``
        ... (``"?"`` when nothing could be learned).
    :ivar magic: Linux ``statfs`` ``f_type``, else None.
    :ivar mount_point: where it is mounted, when known.
    :ivar source: what is mounted there (a device, ``server:/export`` ...), when known.
    :ivar verdict: ``"safe"``, ``"unsafe"``, ``"unknown"`` or ``"unchecked"``.
    :ivar reason: the verdict in words.
    :ivar directory: the directory examined.
    """

    type: str
    magic: int | None
    mount_point: str | None
    source: str | None
    verdict: str
    reason: str
    directory: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (``magic`` as ``"0x6969"``)."""
        d = asdict(self)
        d["magic"] = None if self.magic is None else f"0x{self.magic:x}"
        return d

    def describe(self) -> str:
        """E.g. ``nfs4 (statfs magic 0x6969) mounted at /mnt/share from srv:/export``."""
        text = self.type
        if self.magic is not None:
            text += f" (statfs magic 0x{self.magic:x})"
        if self.mount_point:
            text += f" mounted at {self.mount_point}"
        if self.source and self.source not in ("none", self.type):
            text += f" from {self.source}"
        return text


def classify(fstype: str | None, magic: int | None = None) -> tuple[str, str, str]:
    """The verdict on a filesystem type: ``(type, verdict, reason)``.

    :param fstype: the type as mountinfo or ``f_fstypename`` names it (preferred: it
        tells FUSE filesystems apart), or None.
    :param magic: Linux ``statfs`` ``f_type``, or None.
    """
    name = (fstype or MAGICS.get(magic or -1) or "").lower()
    if not name:
        if magic is None:
            return "?", "unchecked", "the filesystem could not be examined"
        return f"0x{magic:x}", "unknown", "a filesystem type sessiondb does not know"
    if name.startswith("fuse.") or name in UNSAFE:
        return name, "unsafe", UNSAFE.get(name, _FUSE)
    if name in SAFE:
        return name, "safe", "a local filesystem"
    known = MAGICS.get(magic or -1)
    if known is not None and known != name:  # a name we lack for a magic we know
        _, verdict, reason = classify(known)
        return name, verdict, reason
    return name, "unknown", "a filesystem type sessiondb does not know"


def examine(path: str | os.PathLike[str]) -> Filesystem:
    """The filesystem that holds (or would hold) the store at ``path``; never raises."""
    directory = existing_directory(path)
    try:
        if sys.platform.startswith("linux"):
            return _linux(directory)
        if sys.platform == "darwin":
            return _darwin(directory)
        if sys.platform == "win32" and _is_unc(directory):
            return Filesystem("smb", None, None, None, "unsafe", _NETWORK, directory)
    except (OSError, AttributeError, ValueError):  # a probe that fails says nothing
        pass
    return Filesystem("?", None, None, None, "unchecked",
                      f"filesystems are not examined on {sys.platform}", directory)


def existing_directory(path: str | os.PathLike[str]) -> str:
    """The directory that holds ``path`` after symlinks, or its nearest existing
    ancestor while it does not exist yet."""
    directory = os.path.dirname(os.path.realpath(os.fspath(path)))
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    return directory


# -- Linux ------------------------------------------------------------------------------

def _linux(directory: str, depth: int = 0) -> Filesystem:
    magic = statfs_magic(directory)
    mount = mount_of(directory, _read_mountinfo())
    fstype = mount.fstype if mount else None
    name, verdict, reason = classify(fstype, magic)
    if name == "overlay" and mount is not None:
        verdict, reason = _overlay(mount, depth)
    return Filesystem(name, magic, mount.mount_point if mount else None,
                      mount.source if mount else None, verdict, reason, directory)


def _overlay(mount: "Mount", depth: int) -> tuple[str, str]:
    """An overlay takes its writes in its upper layer: judge that, where it is visible."""
    upper = mount.option("upperdir")
    if upper is None:
        return "safe", "an overlay without an upper layer (read-only)"
    if depth >= _MAX_OVERLAY_DEPTH or not os.path.isdir(upper):
        return "safe", ("an overlay (a container's, presumably); its upper layer, which "
                        "takes the writes, is not visible here")
    inner = _linux(upper, depth + 1)
    return inner.verdict, f"an overlay whose upper layer is on {inner.type}: {inner.reason}"


def statfs_magic(directory: str) -> int | None:
    """``statfs(2)``'s ``f_type`` of ``directory``, or None if the call fails."""
    libc = ctypes.CDLL(None, use_errno=True)
    call = getattr(libc, "statfs64", None) or libc.statfs
    buf = ctypes.create_string_buffer(512)  # struct statfs: 120 bytes on 64-bit Linux
    if call(os.fsencode(directory), buf) != 0:
        return None
    # f_type is the first member, a native long (__fsword_t), except on s390x.
    word = ctypes.c_uint if os.uname().machine.startswith("s390") else ctypes.c_ulong
    return word.from_buffer(buf).value & 0xFFFFFFFF


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo`` (proc(5))."""

    device: tuple[int, int]
    mount_point: str
    fstype: str
    source: str
    super_options: str

    def option(self, name: str) -> str | None:
        for item in self.super_options.split(","):
            key, _, value = item.partition("=")
            if key == name:
                return _unescape(value)
        return None


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/self/mountinfo`` text (malformed lines are skipped)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(Mount((int(major), int(minor)), _unescape(fields[4]),
                                fields[sep + 1], _unescape(fields[sep + 2]),
                                fields[sep + 3]))
        except (ValueError, IndexError):
            continue
    return mounts


def mount_of(directory: str, mounts: list[Mount],
             device: tuple[int, int] | None = None) -> Mount | None:
    """The mount that holds ``directory``: among the mounts of its device (all of one
    filesystem, bind mounts included), else among all (btrfs subvolumes report a
    device of their own), the one with the longest mount point above it; when
    several are mounted at that point, the last one, which hides the others."""
    if device is None:
        try:
            st = os.stat(directory)
            device = (os.major(st.st_dev), os.minor(st.st_dev))
        except OSError:
            device = (-1, -1)
    same = [m for m in mounts if m.device == device]
    for candidates in (same, mounts):
        best = None
        for m in candidates:
            if _under(directory, m.mount_point) and (
                    best is None or len(m.mount_point) >= len(best.mount_point)):
                best = m
        if best is not None:
            return best
    return same[-1] if same else None


def _under(directory: str, mount_point: str) -> bool:
    return (directory == mount_point or mount_point == "/"
            or directory.startswith(mount_point.rstrip("/") + "/"))


def _read_mountinfo() -> list[Mount]:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())
    except OSError:
        return []


# -- macOS ------------------------------------------------------------------------------

class MacStatfs(ctypes.Structure):
    """macOS ``struct statfs`` (64-bit inodes, ``<sys/mount.h>``): 2168 bytes."""

    _fields_ = [
        ("f_bsize", ctypes.c_uint32), ("f_iosize", ctypes.c_int32),
        ("f_blocks", ctypes.c_uint64), ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64), ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64), ("f_fsid", ctypes.c_int32 * 2),
        ("f_owner", ctypes.c_uint32), ("f_type", ctypes.c_uint32),
        ("f_flags", ctypes.c_uint32), ("f_fssubtype", ctypes.c_uint32),
        ("f_fstypename", ctypes.c_char * 16), ("f_mntonname", ctypes.c_char * 1024),
        ("f_mntfromname", ctypes.c_char * 1024), ("f_flags_ext", ctypes.c_uint32),
        ("f_reserved", ctypes.c_uint32 * 7),
    ]


def _darwin(directory: str) -> Filesystem:
    libc = ctypes.CDLL(None, use_errno=True)
    try:  # x86_64 exports the 64-bit-inode struct under this name; arm64 as statfs
        call = libc["statfs$INODE64"]
    except AttributeError:
        call = libc.statfs
    buf = MacStatfs()
    if call(os.fsencode(directory), ctypes.byref(buf)) != 0:
        raise OSError(ctypes.get_errno(), "statfs failed")
    return from_mac_statfs(buf, directory)


def from_mac_statfs(buf: MacStatfs, directory: str) -> Filesystem:
    name, verdict, reason = classify(os.fsdecode(buf.f_fstypename) or None)
    return Filesystem(name, None, os.fsdecode(buf.f_mntonname) or None,
                      os.fsdecode(buf.f_mntfromname) or None, verdict, reason, directory)


# -- Windows ----------------------------------------------------------------------------

def _is_unc(directory: str) -> bool:
    """``\\\\server\\share\\...`` or ``\\\\?\\UNC\\server\\share\\...``; not
    ``\\\\?\\C:\\...`` (a long local path)."""
    d = directory.replace("/", "\\")
    if d.startswith("\\\\?\\") or d.startswith("\\\\.\\"):
        return d[4:].upper().startswith("UNC\\")
    return d.startswith("\\\\")


# -- what the engine does -------------------------------------------------------------

def policy(option: str | None) -> str:
    """The ``unsafe_filesystem`` option, else ``$SESSIONDB_UNSAFE_FILESYSTEM``, else
    ``"refuse"``.

    :raises ConfigurationError: not one of :data:`POLICIES`.
    """
    if option is not None:
        if option not in POLICIES:
            raise ConfigurationError(f"unsafe_filesystem must be one of {', '.join(POLICIES)}"
                                     f" (got {option!r})")
        return option
    value = os.environ.get(ENV_POLICY, "").strip().lower()
    if not value:
        return "refuse"
    if value not in POLICIES:
        raise ConfigurationError(f"${ENV_POLICY} must be one of {', '.join(POLICIES)} "
                                 f"(got {value!r})")
    return value


def use_journal(path: str, fs: Filesystem, chosen: str) -> bool:
    """Whether the store at ``path`` on ``fs`` uses the rollback journal instead of
    WAL, by the policy ``chosen`` (see the module docstring).

    :raises UnsafeFilesystemError: ``fs`` is unsafe and the policy is ``"refuse"``.
    """
    if fs.verdict == "safe" or chosen == "allow":
        return False
    if chosen == "journal":
        return True
    if fs.verdict == "unsafe":
        raise UnsafeFilesystemError(refusal(path, fs), path, fs.type, fs.magic,
                                    fs.mount_point)
    if fs.verdict == "unknown":
        warnings.warn(
            f"{path} is on a filesystem sessiondb does not know: {fs.describe()}. "
            "SQLite's WAL mode needs locks and shared memory that every process sees "
            "coherently, which network, host-shared and FUSE filesystems lack. If it is a "
            "local disk, pass unsafe_filesystem='allow' (or set "
            f"{ENV_POLICY}=allow) to silence this; if it is shared, use "
            "unsafe_filesystem='journal' or PostgreSQL", FilesystemWarning, stacklevel=5)
    return False


def refusal(path: str, fs: Filesystem) -> str:
    """The message of :class:`~sessiondb.errors.UnsafeFilesystemError`."""
    return (
        f"{path} is on {fs.describe()}, {fs.reason}. SQLite's WAL mode, which sessiondb "
        "uses, can corrupt the store or crash the process there, so it was not opened "
        "(nothing was created or changed). Remedies: (1) put the store on a local disk "
        "(the default path is one); (2) for processes on several machines, use "
        "PostgreSQL: SessionDB('postgresql://user@host/db'); (3) if every process that "
        "uses this store runs on this one machine and reaches it through this mount (not "
        "also from a VM's host or another client), opt in to SQLite's rollback journal "
        "with SessionDB(path, unsafe_filesystem='journal') or "
        f"{ENV_POLICY}=journal in every process: slower writes, and readers and writers "
        "wait for each other")
