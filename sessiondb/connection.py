"""Opening a connection: where the file lives, and every per-connection pragma.

Each pragma is a small function named for its intent (after apsw's ``bestpractice``), and
:func:`open_connection` is the only place that applies them, so every connection sessiondb
makes is configured the same way.

The one rule this module exists to keep: **nothing but SQLite ever opens the database,
``-wal`` or ``-shm`` files.** Closing *any* descriptor of the database file drops every
POSIX lock the process holds on it, silently, which has corrupted real deployments
(https://sqlite.org/howtocorrupt.html#_posix_advisory_locks_canceled_by_a_separate_thread_doing_close_).
Permissions are therefore set with ``os.chmod`` on the path, never through a descriptor.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Callable

import apsw
import platformdirs

from .errors import ConfigurationError, DatabaseBusyError, DatabaseOpenError, translate
from .replacement import refuse_replaced
from .schema import refuse_unusable
from .walguard import refuse_marked
from .writes import backoff

#: SQLite versions before this have the WAL-reset bug that can corrupt a database shared by
#: several processes (https://sqlite.org/wal.html#walresetbug).
MIN_SQLITE_VERSION = (3, 51, 3)

ENV_PATH = "SESSIONDB_PATH"


def default_path() -> Path:
    """Where a store lives when no path is given.

    ``$SESSIONDB_PATH`` if set, else ``platformdirs.user_data_dir("sessiondb")/state.db``.
    """
    env = os.environ.get(ENV_PATH)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("sessiondb")) / "state.db"


def sqlite_version() -> tuple[int, int, int]:
    """The version of the SQLite library apsw is linked against."""
    parts = apsw.sqlite_lib_version().split(".")
    return (int(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 0)


def check_sqlite_version(version: tuple[int, int, int] | None = None) -> None:
    """Refuse SQLite releases with the WAL-reset corruption bug.

    :raises ConfigurationError: if the linked SQLite is older than 3.51.3.
    """
    version = version or sqlite_version()
    if version < MIN_SQLITE_VERSION:
        have = ".".join(map(str, version))
        need = ".".join(map(str, MIN_SQLITE_VERSION))
        raise ConfigurationError(
            f"SQLite {have} has the WAL-reset bug that corrupts databases shared by "
            f"several processes (https://sqlite.org/wal.html#walresetbug); sessiondb "
            f"needs {need} or newer: `pip install -U apsw`"
        )


def prepare_directory(path: Path) -> None:
    """Create the parent directory (mode 0700) if missing; refuse unusable paths."""
    parent = path.parent
    if not parent.exists():
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise DatabaseOpenError(
                f"cannot create directory {parent}: {exc.strerror}", str(path)
            ) from exc
    if path.is_dir():
        raise DatabaseOpenError(f"{path} is a directory; pass the path of a file", str(path))


def connection_wal(conn: apsw.Connection) -> None:
    """WAL lets readers and one writer work at once (https://sqlite.org/wal.html)."""
    mode = conn.pragma("journal_mode", "wal")
    if str(mode).lower() != "wal":
        raise ConfigurationError(
            f"could not switch {conn.filename} to WAL (journal_mode is {mode}); "
            "the file system may not support shared memory (network drives do not)"
        )


def connection_rollback_journal(conn: apsw.Connection) -> None:
    """The rollback journal (``journal_mode=DELETE``), on a filesystem where WAL is
    unsafe and the user opted in (:mod:`sessiondb.filesystems`): it needs only the locks
    on the database file, no shared memory (https://sqlite.org/lockingv3.html). Leaving
    WAL needs every other connection closed; SQLite answers busy meanwhile."""
    mode = conn.pragma("journal_mode", "delete")
    if str(mode).lower() != "delete":
        raise ConfigurationError(
            f"could not switch {conn.filename} to the rollback journal (journal_mode is "
            f"{mode}); every process using this store must open it with "
            "unsafe_filesystem='journal'")


def connection_durability(conn: apsw.Connection, durability: str = "full",
                          journal: bool = False) -> None:
    """What a commit waits for (https://sqlite.org/pragma.html#pragma_synchronous).

    ``"full"``: ``synchronous=FULL``, so in WAL mode every commit syncs the ``-wal``
    before it returns, and a write acknowledged survives a power cut (the first sync of
    a new ``-wal`` also syncs its directory, which SQLite's Unix VFS does by itself);
    ``fullfsync`` makes that sync reach the platter on macOS, where ``fsync()`` stops at
    the drive's cache (a no-op elsewhere). ``"normal"``: ``synchronous=NORMAL``, durable
    against a crash of the process; a power cut may lose the transactions committed since
    the last checkpoint synced the ``-wal``, and leaves the store consistent on a disk
    with powersafe overwrite (bytes outside a write survive its interruption: what
    SQLite's own VFSes assume). On a disk that can garble a whole sector, NORMAL can
    leave a transaction half applied, because SQLite pads a WAL commit to its sector's
    end only when it syncs it; FULL cannot. Checkpoints sync the ``-wal`` and the
    database file in both.
    The rollback journal (``journal``) always gets FULL: with NORMAL a power cut can
    corrupt it.
    Rejected: ``synchronous=EXTRA``, which differs from FULL only for rollback journals."""
    full = durability == "full" or journal
    conn.pragma("synchronous", "FULL" if full else "NORMAL")
    conn.pragma("fullfsync", full)


def connection_foreign_keys(conn: apsw.Connection) -> None:
    """Enforce parent/child references between sessions and messages."""
    conn.pragma("foreign_keys", True)


def connection_no_mmap(conn: apsw.Connection) -> None:
    """No memory-mapped I/O: under concurrent writers in other processes a transient WAL
    race becomes a SIGBUS or structural corruption instead of a retryable error."""
    conn.pragma("mmap_size", 0)


def connection_manual_checkpoints(conn: apsw.Connection, journal_size_limit: int) -> None:
    """Checkpoints are run by :mod:`sessiondb.checkpoint` outside the write lock, never by
    whichever writer happens to cross SQLite's auto-checkpoint threshold; after a WAL reset
    the file is truncated back to ``journal_size_limit`` bytes."""
    conn.wal_autocheckpoint(0)
    conn.pragma("journal_size_limit", journal_size_limit)


#: Page size of new stores. Every commit appends each page it touched to the WAL, and an
#: agent turn touches about 13-16 pages (message row, two indexes, session row, FTS
#: segment, structure and docsize records): 1 KiB pages make that 17 KiB of WAL per turn
#: instead of 52 KiB with the 4 KiB default, at the same write cost (measured). Three
#: times less WAL is three times more writing before a long reader's snapshot pins the
#: WAL at its bound (see sessiondb.checkpoint).
NEW_PAGE_SIZE = 1024


def connection_new_file_layout(conn: apsw.Connection) -> None:
    """On a brand-new (empty) file: small pages (:data:`NEW_PAGE_SIZE`), and incremental
    auto-vacuum so that pruning can give space back. Both must precede the switch to
    WAL: that switch already writes the first page, after which neither can change
    without a VACUUM (https://sqlite.org/pragma.html#pragma_auto_vacuum)."""
    if int(conn.pragma("page_count")) == 0:
        conn.pragma("page_size", NEW_PAGE_SIZE)
        conn.pragma("auto_vacuum", "INCREMENTAL")


def connection_busy_timeout(conn: apsw.Connection, milliseconds: int) -> None:
    """A short busy timeout: long waits are queued in the kernel by the write gate
    (:mod:`sessiondb.gate`), so SQLite's fixed-schedule busy handler only covers brief
    collisions with writers that do not use the gate."""
    conn.set_busy_timeout(milliseconds)


def open_connection(
    path: Path, *, busy_timeout_ms: int, journal_size_limit: int, timeout: float = 30.0,
    vfs: str | None = None, create: bool = False, durability: str = "full",
    journal: bool = False,
) -> apsw.Connection:
    """Open and configure one connection to the store at ``path``.

    The file is inspected before anything could change it: a file that is not a
    database, an empty (zero-byte) file, a store written by a newer sessiondb, or a
    database with foreign tables is refused with its bytes untouched (the switch to WAL
    alone would rewrite its header). Busy errors while configuring are retried with
    jitter for up to ``timeout`` seconds.

    :param create: create the file (mode 0600) if missing; only :func:`create_store`
        does, under a private name, so a store never appears half-made.
    :param durability: ``"full"`` or ``"normal"`` (:func:`connection_durability`).
    :param journal: use the rollback journal instead of WAL (an unsafe filesystem, see
        :mod:`sessiondb.filesystems`).
    :raises DatabaseOpenError: the path cannot be opened or is not a sessiondb store.
    :raises WalDeletedError, StoreReplacedError: a marker says a person must look first.
    :raises SchemaTooNewError: the store was written by a newer sessiondb.
    :raises DatabaseBusyError: the file stayed locked for ``timeout`` seconds.
    :raises ConfigurationError: WAL mode is unavailable or SQLite is too old.
    """
    check_sqlite_version()
    prepare_directory(path)
    created = create and not path.exists()
    if not create:
        refuse_marked(path)
        refuse_replaced(path)
        refuse_empty_file(path)
    # URI names are taken by ATTACH (a bulk import attaches its staging file read-only:
    # sessiondb.bulk_stage); the store's own name is never read as one.
    flags = (apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI
             | (apsw.SQLITE_OPEN_CREATE if create else 0))
    name = str(path)
    if name.startswith("file:"):
        name = "./" + name
    try:
        conn = apsw.Connection(name, flags=flags, vfs=vfs)
    except apsw.Error as exc:
        raise DatabaseOpenError(_open_advice(path, exc), str(path)) from exc
    try:
        if conn.readonly("main"):
            # SQLite falls back to read-only without a word when the file is not
            # writable; the first write would then fail far from the cause.
            raise apsw.ReadOnlyError("the file is read-only for this user")
        if created:
            _restrict_new_file(path)
        connection_busy_timeout(conn, busy_timeout_ms)
        _configure(conn, path, journal_size_limit, timeout, durability, journal)
    except apsw.Error as exc:
        conn.close()
        if isinstance(exc, (apsw.NotADBError, apsw.CorruptError, apsw.CantOpenError,
                            apsw.ReadOnlyError, apsw.PermissionsError)):
            raise DatabaseOpenError(_open_advice(path, exc), str(path)) from exc
        raise translate(exc, str(path)) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def refuse_empty_file(path: Path) -> None:
    """Refuse a zero-byte file: sessiondb never leaves one (see :func:`create_store`), so
    one is something else's doing (``touch``, a tool that truncated the store), and
    quietly making a new store in it would hide that the data is gone.

    :raises DatabaseOpenError: the file exists and is empty.
    """
    try:
        empty = path.stat().st_size == 0
    except OSError:
        return  # missing or unreadable: opening it reports that
    if empty:
        raise DatabaseOpenError(
            f"{path} is an empty file (0 bytes), not a sessiondb store; nothing was "
            "changed. If the store's data should be there, restore it from a backup; if "
            "the file is a leftover, delete it and sessiondb will create a new store",
            str(path))


#: Name of a store being built by :func:`create_store`: ``<db>.sessiondb-new-<pid>-<hex>``.
_NEW = ".sessiondb-new-"


def create_store(path: Path, open_new: Callable[[Path], apsw.Connection],
                 build: Callable[[apsw.Connection, Path], None]) -> None:
    """Create the store at ``path`` so that it appears complete or not at all.

    The store is built under a private name next to ``path`` (``open_new`` opens it,
    ``build`` creates the schema through the write path), closed (SQLite checkpoints
    and removes its ``-wal``), and then hard-linked to ``path``, which fails if the
    path exists meanwhile: of several processes creating one store at once, one wins and
    the others open its file. The private name is then removed, and the directory
    synced, so that the new name survives a power cut. So no process ever sees
    a zero-byte or schema-less store at ``path``, and a process killed while creating
    leaves only its private files, which the next creation removes.

    :raises DatabaseOpenError: the directory is not writable or does not allow links.
    """
    _sweep_abandoned(path)
    tmp = path.with_name(f"{path.name}{_NEW}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        conn = open_new(tmp)
        try:
            build(conn, tmp)
        finally:
            conn.close()  # the last connection: SQLite checkpoints and deletes tmp-wal
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created the store first: use its file
        except OSError as exc:
            raise DatabaseOpenError(
                f"cannot create {path}: {exc.strerror} (sessiondb creates a store under "
                "a private name and links it into place, which this file system refused)",
                str(path)) from exc
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}{suffix}")
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make the directory's entries durable (``fsync`` of the directory): a new name
    made by ``link()`` is otherwise not guaranteed to survive a power cut, however well
    the file's own bytes were synced. Best effort: some systems cannot sync a directory
    (Windows), and the store is usable all the same."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sweep_abandoned(path: Path) -> None:
    """Remove stores a killed process left half-built (their pid no longer runs)."""
    pattern = re.compile(re.escape(path.name + _NEW) + r"(\d+)-[0-9a-f]+(-wal|-shm|-journal)?$")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if m and not process_alive(int(m.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def _configure(conn: apsw.Connection, path: Path, journal_size_limit: int,
               timeout: float, durability: str, journal: bool = False) -> None:
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        attempt += 1
        try:
            refuse_unusable(conn, path)
            connection_new_file_layout(conn)
            (connection_rollback_journal if journal else connection_wal)(conn)
            connection_durability(conn, durability, journal)
            connection_foreign_keys(conn)
            connection_no_mmap(conn)
            connection_manual_checkpoints(conn, journal_size_limit)
            return
        except (apsw.BusyError, apsw.LockedError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DatabaseBusyError(
                    f"{path} stayed locked by another process for {timeout:.1f}s while "
                    "opening; retry later" + (
                        " (leaving WAL for the rollback journal waits until no other "
                        "process has the store open: every process must use "
                        "unsafe_filesystem='journal')" if journal else "")
                ) from exc
            time.sleep(backoff(attempt, remaining))


def _restrict_new_file(path: Path) -> None:
    # chmod by path, not through a descriptor (see the module docstring). SQLite creates
    # the -wal and -shm files later with the database file's permissions.
    try:
        if path.stat().st_uid == os.geteuid():
            os.chmod(path, 0o600)
    except (OSError, AttributeError):  # AttributeError: no geteuid (Windows)
        pass


def _open_advice(path: Path, exc: apsw.Error) -> str:
    if isinstance(exc, apsw.NotADBError):
        return f"{path} is not a SQLite database (or is encrypted); nothing was changed"
    if isinstance(exc, apsw.CorruptError):
        return f"{path} is damaged: {exc}; run `sessiondb doctor --db {path}`"
    if isinstance(exc, (apsw.ReadOnlyError, apsw.PermissionsError)):
        return (f"{path} is not writable by this user ({exc}); sessiondb needs write "
                "access to the file and its directory (for the -wal and -shm files)")
    if isinstance(exc, apsw.CantOpenError):
        return (f"cannot open {path}: {exc}; check that the directory exists and is "
                "writable")
    return f"cannot open {path}: {exc}"


def close_for_fork(conn: apsw.Connection) -> None:
    """Close an idle connection just before ``fork()``, cheaply: no checkpoint and no
    WAL clean-up on the way out (``SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE``), since the
    owner reopens at its next call.

    Why close at all: SQLite keeps per-process lock state for every open file, and a
    child inherits it. A connection the child then opens to the same file joins that
    copied state instead of taking real locks, so its locks protect nothing: the parent
    closing its last connection can delete the ``-wal`` file under the child
    (acknowledged writes lost), and a child forked during a write waits on the parent's
    write lock forever. With no connection open at fork time the child starts clean
    (https://sqlite.org/howtocorrupt.html#_carrying_an_open_database_connection_across_a_fork_).
    """
    try:
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    except apsw.Error:
        pass
    conn.close()
