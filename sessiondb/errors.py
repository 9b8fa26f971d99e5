"""The sessiondb exception tree.

Every error the library raises on purpose derives from :class:`SessionDBError`, so one
``except SessionDBError`` catches them all and callers never need to import ``apsw``::

    SessionDBError
    ├── ConfigurationError          bad option value, unsupported SQLite
    ├── DatabaseOpenError           the path cannot be opened as a sessiondb store
    │   ├── SchemaTooNewError       written by a newer sessiondb; left untouched
    │   ├── HermesSchemaError       a hermes-agent state.db sessiondb cannot convert
    │   ├── ForeignDatabaseError    another application's SQLite file (its application_id)
    │   └── UnsafeFilesystemError   on a filesystem where WAL corrupts (NFS, SMB, FUSE ...)
    ├── ClosedError                 the instance was closed
    ├── InvalidArgument (ValueError)    a value the store will not accept
    │   ├── InvalidTitle            title too long after sanitizing
    │   └── TitleConflict           another session already has the title
    ├── InvalidArgumentType (TypeError) e.g. tool_calls that are not JSON-serializable
    ├── SessionNotFound             the session a write names does not exist
    ├── IntegrityViolation          a constraint the schema enforces (e.g. a referenced parent)
    ├── DatabaseBusyError           a lock stayed taken longer than the time budget
    │   └── WriteTimeout            the write lock could not be had within the time budget
    ├── HoldTimeout                 this write held the lock past hold_timeout: rolled back
    ├── StorageError                SQLite reported an I/O-level problem
    │   ├── DiskFullError           SQLITE_FULL: free space, then retry
    │   ├── CorruptDatabaseError    the file or an index is damaged: run ``sessiondb doctor``
    │   ├── WalDeletedError         the -wal/-shm was deleted under a live connection
    │   ├── StoreReplacedError      the database file was replaced under a live connection
    │   └── ConnectionLost          PostgreSQL: the server is unreachable, down or ended it
    ├── SearchIndexError            the full-text index is damaged (messages are intact)
    ├── StaleRevision               the session changed since the revision the update expected
    └── CoordinationError           leases and work claims (sessiondb.coordination)
        ├── LeaseHeld               someone else holds the lease (``.holder``, ``.expires_at``)
        ├── LeaseLost               the lease (or claim) is no longer this holder's: fenced out
        │   └── ClaimLost           the work claim expired or went back to the queue
        ├── CapExceeded             the owner holds as many leases or claims as its cap allows
        └── DeadlineExceeded        work under a lease or claim ran past its deadline

:mod:`sessiondb.copy` adds its own branch under ``SessionDBError``: ``CopyError`` (with
``.report``), and under it ``SameStoreError``, ``CopyConflict`` (sessions skipped) and
``CopyMismatch`` (the destination does not hold what was read).

:mod:`sessiondb.procs` adds ``ProcessRecordError``: the process record that ``sessiondb
top`` reads is not one (foreign, damaged) or of a newer layout.

Warnings: :class:`CapWarning` (a ``UserWarning``) when an owner reaches 80% of a cap;
:class:`PoolWarning` when 80% of a PostgreSQL connection pool is in use;
:class:`FilesystemWarning` when a store is opened on a filesystem sessiondb does not know.

:mod:`sessiondb.compat.hermes` raises subclasses that are also the ``sqlite3`` (or
builtin) classes hermes-agent raised, so its callers' ``except`` clauses keep working::

    IntegrityViolation  └── hermes.IntegrityError      + sqlite3.IntegrityError
    InvalidArgumentType └── hermes.ProgrammingError    + sqlite3.ProgrammingError
    DatabaseBusyError   └── hermes.DatabaseLocked      + sqlite3.OperationalError
    WriteTimeout            └── hermes.LockTimeout     (both of the above)
    ClosedError         └── hermes.DatabaseClosed      + AttributeError
    TitleConflict       └── hermes.TitleInUse          (hermes-agent's message)

Errors from SQLite are translated at one boundary (:func:`translate`) and chained, so the
original ``apsw`` exception stays reachable as ``__cause__``; errors from PostgreSQL
likewise, at :func:`sessiondb.pg.translate.translate` (a ``psycopg`` exception as the cause;
the hermes classes above then wrap those too).
"""

from __future__ import annotations

import time

import apsw

__all__ = [
    "SessionDBError",
    "ConnectionLost",
    "PoolWarning",
    "ConfigurationError",
    "DatabaseOpenError",
    "SchemaTooNewError",
    "HermesSchemaError",
    "ForeignDatabaseError",
    "UnsafeFilesystemError",
    "ClosedError",
    "InvalidArgument",
    "InvalidTitle",
    "TitleConflict",
    "InvalidArgumentType",
    "SessionNotFound",
    "IntegrityViolation",
    "DatabaseBusyError",
    "WriteTimeout",
    "HoldTimeout",
    "StorageError",
    "DiskFullError",
    "CorruptDatabaseError",
    "WalDeletedError",
    "StoreReplacedError",
    "SearchIndexError",
    "StaleRevision",
    "CoordinationError",
    "LeaseHeld",
    "LeaseLost",
    "ClaimLost",
    "CapExceeded",
    "DeadlineExceeded",
    "CapWarning",
    "FilesystemWarning",
    "translate",
]


class SessionDBError(Exception):
    """Base class of every error sessiondb raises on purpose."""

    def __reduce__(self) -> tuple:
        # Errors cross process boundaries (multiprocessing, process pools); the default
        # pickling calls __init__ with the message alone, which most subclasses refuse.
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type, args: tuple, state: dict) -> BaseException:
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class ConfigurationError(SessionDBError):
    """An option has an invalid value, or the linked SQLite is unsafe to use."""


class DatabaseOpenError(SessionDBError):
    """The path cannot be opened as a sessiondb store.

    :ivar path: the database path that failed.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class SchemaTooNewError(DatabaseOpenError):
    """The store was written by a newer sessiondb; it is left untouched.

    :ivar found: the schema version in the file.
    :ivar supported: the newest version this library knows.
    """

    def __init__(self, path: str, found: int, supported: int) -> None:
        super().__init__(
            f"{path} has schema version {found}, but this sessiondb only knows up to "
            f"{supported}; upgrade sessiondb to open it (the file was not modified)",
            path,
        )
        self.found = found
        self.supported = supported


class HermesSchemaError(DatabaseOpenError):
    """A hermes-agent ``state.db`` that sessiondb cannot convert: it lacks columns its
    schema version must have, or its version is not one hermes-agent wrote. The file is
    left untouched.

    :ivar found: the version in its ``schema_version`` table.
    """

    def __init__(self, path: str, found: object, detail: str = "") -> None:
        super().__init__(
            f"{path} is a hermes-agent state.db with schema version {found}"
            + (f" ({detail})" if detail else "")
            + " that sessiondb cannot convert (the file was not modified). Open it once "
            "with hermes-agent (March 2026 or later), then open it with sessiondb", path)
        self.found = found


class ForeignDatabaseError(DatabaseOpenError):
    """The file is a SQLite database of another application: its ``PRAGMA
    application_id`` is neither sessiondb's nor 0. It is left untouched.

    :ivar application_id: the id found in the file's header.
    """

    def __init__(self, path: str, application_id: int) -> None:
        name = application_id.to_bytes(4, "big", signed=application_id < 0)
        shown = f" ({name.decode('ascii')!r})" if name.isascii() and name.decode(
            "ascii").isprintable() else ""
        super().__init__(
            f"{path} is another application's SQLite database (PRAGMA application_id = "
            f"0x{application_id & 0xFFFFFFFF:08x}{shown}, not sessiondb's); nothing was "
            "changed. Pass the path of a sessiondb store or of a new file", path)
        self.application_id = application_id


class UnsafeFilesystemError(DatabaseOpenError):
    """The store's directory is on a filesystem where SQLite's WAL mode corrupts or fails
    (network, host-shared or FUSE filesystems: NFS, SMB, 9p, virtiofs ...); nothing was
    created or changed. The message names the filesystem and the remedies.

    :ivar filesystem: the filesystem's type, e.g. ``"nfs4"``, ``"fuse.sshfs"``.
    :ivar magic: the ``statfs`` ``f_type`` of the filesystem (Linux), else None.
    :ivar mount_point: where it is mounted, when known.
    """

    def __init__(self, message: str, path: str, filesystem: str, magic: int | None,
                 mount_point: str | None) -> None:
        super().__init__(message, path)
        self.filesystem = filesystem
        self.magic = magic
        self.mount_point = mount_point


class ClosedError(SessionDBError):
    """The instance was closed; open a new :class:`~sessiondb.SessionDB`."""


class InvalidArgument(SessionDBError, ValueError):
    """A value the store will not accept (also a :class:`ValueError`)."""


class InvalidTitle(InvalidArgument):
    """A session title is too long after sanitizing."""


class TitleConflict(InvalidArgument):
    """Another session already uses this title.

    :ivar title: the sanitized title.
    :ivar session_id: the session that holds it.
    """

    def __init__(self, title: str, session_id: str) -> None:
        super().__init__(f"Title {title!r} is already in use by session {session_id}")
        self.title = title
        self.session_id = session_id


class InvalidArgumentType(SessionDBError, TypeError):
    """An argument has a type the store cannot persist (also a :class:`TypeError`)."""


class SessionNotFound(SessionDBError):
    """The session a write refers to does not exist.

    :ivar session_id: the id that was not found.
    """

    def __init__(self, session_id: str, message: str | None = None) -> None:
        super().__init__(message or f"session {session_id!r} does not exist")
        self.session_id = session_id


class IntegrityViolation(SessionDBError):
    """A constraint of the schema was violated; nothing was written."""


class DatabaseBusyError(SessionDBError):
    """Another process held a lock for longer than this call's time budget."""


class WriteTimeout(DatabaseBusyError):
    """The write could not get the write lock within its time budget; nothing was written.

    :ivar waited_s: seconds spent waiting, all attempts included.
    :ivar attempts: how many times the write lock was requested.
    """

    def __init__(self, waited_s: float, attempts: int, detail: str = "") -> None:
        msg = (
            f"could not get the write lock in {waited_s:.2f}s ({attempts} attempt(s)); "
            "another process holds it. Nothing was written; retry later, or raise "
            "write_timeout if writes legitimately take this long"
        )
        super().__init__(msg + (f" [{detail}]" if detail else ""))
        self.waited_s = waited_s
        self.attempts = attempts


class HoldTimeout(SessionDBError):
    """This write held the write lock longer than ``hold_timeout`` and was rolled back (by
    a watchdog thread, so that other processes could go on); nothing of it was written.

    :ivar held_s: seconds the transaction had held the lock when it was rolled back.
    :ivar hold_timeout: the bound it crossed.
    """

    def __init__(self, held_s: float, hold_timeout: float) -> None:
        super().__init__(
            f"this write held the write lock for {held_s:.2f}s, past hold_timeout="
            f"{hold_timeout:g}s, and was rolled back so that other processes could write; "
            "nothing of it was written. Keep transaction() blocks short (no model, network "
            "or other slow calls inside), or raise hold_timeout")
        self.held_s = held_s
        self.hold_timeout = hold_timeout


class StorageError(SessionDBError):
    """SQLite reported an I/O-level problem; the transaction was rolled back."""


class DiskFullError(StorageError):
    """The disk (or a quota) is full; free space and retry. Nothing was written."""


class CorruptDatabaseError(StorageError):
    """The database file is damaged. Run ``sessiondb doctor`` and restore from backup."""


class WalDeletedError(StorageError):
    """The ``-wal`` or ``-shm`` file of a store in use was deleted or replaced by
    something other than SQLite. Writing on would fork the database into two histories,
    so sessiondb stops writing it, saves what this process could still read into a
    rescue copy, and leaves a marker that refuses every later open until a person has
    looked (the message says how).

    :ivar path: the database path.
    :ivar marker: the marker file (``<db>.sessiondb-wal-lost``).
    :ivar rescue: the rescue copy, if one was written.
    """

    def __init__(self, message: str, path: str, marker: str, rescue: str | None) -> None:
        super().__init__(message)
        self.path = path
        self.marker = marker
        self.rescue = rescue


class StoreReplacedError(StorageError):
    """The database file was replaced (renamed over, restored from a backup) or moved
    away while this instance had it open. Its connection still holds the old file, so
    writing on would write into a file nobody will read again: the instance stops (this
    error on every later call), leaves a marker that ``sessiondb doctor`` reports, and
    never checkpoints into the old file. Open a new :class:`~sessiondb.SessionDB` to use
    the file that is there now.

    :ivar path: the database path.
    :ivar marker: the marker file (``<db>.sessiondb-replaced``).
    :ivar was: ``(st_dev, st_ino)`` of the file this instance opened.
    :ivar now: ``(st_dev, st_ino)`` of the file at the path now, None if there is none.
    """

    def __init__(self, message: str, path: str, marker: str, was: tuple[int, int],
                 now: tuple[int, int] | None) -> None:
        super().__init__(message)
        self.path = path
        self.marker = marker
        self.was = was
        self.now = now


class SearchIndexError(SessionDBError):
    """The full-text index is damaged; messages are intact.

    Rebuild it with ``sessiondb doctor --repair``.
    """


class StaleRevision(SessionDBError):
    """The session was changed by someone else since the revision this update expected;
    nothing was written. Read the session again, merge, and retry with its revision.

    :ivar session_id: the session.
    :ivar expected: the revision the caller passed.
    :ivar actual: the session's revision now.
    """

    def __init__(self, session_id: str, expected: int, actual: int) -> None:
        super().__init__(
            f"session {session_id!r} is at revision {actual}, not {expected}: someone else "
            "changed it meanwhile; nothing was written. Read it again and retry with "
            f"expected_revision={actual}")
        self.session_id = session_id
        self.expected = expected
        self.actual = actual


class CoordinationError(SessionDBError):
    """Base of the lease and work-claim errors (:mod:`sessiondb.coordination`)."""


class LeaseHeld(CoordinationError):
    """Another owner holds the lease.

    :ivar name: the lease name.
    :ivar holder: the owner holding it.
    :ivar expires_at: when it lapses unless renewed (epoch seconds).
    :ivar token: the holder's fencing token.
    """

    def __init__(self, name: str, holder: str, expires_at: float, token: int) -> None:
        super().__init__(
            f"lease {name!r} is held by {holder!r} until {_clock(expires_at)} (token {token}); "
            "try again after that, or pass wait= to acquire_lease")
        self.name = name
        self.holder = holder
        self.expires_at = expires_at
        self.token = token


class LeaseLost(CoordinationError):
    """The lease is no longer this holder's (it expired, was released, or was taken over
    with a higher fencing token); the write or renewal that found out was refused and
    nothing of it was written. Stop the work done under it.

    :ivar name: the lease name.
    :ivar token: the token this holder had.
    :ivar reason: what happened, in words.
    """

    def __init__(self, name: str, token: int, reason: str) -> None:
        super().__init__(f"lease {name!r} (token {token}) is no longer yours: {reason}; "
                         "nothing was written. Stop the work done under it")
        self.name = name
        self.token = token
        self.reason = reason


class ClaimLost(LeaseLost):
    """The work claim expired or went back to the queue (someone else may run the item);
    the completion or write that found out was refused.

    :ivar claim_id: the item.
    """

    def __init__(self, claim_id: int, token: int, reason: str) -> None:
        super().__init__(f"claim:{claim_id}", token, reason)
        self.claim_id = claim_id


class CapExceeded(CoordinationError):
    """The owner already holds as many leases or claims as its cap allows; nothing was
    taken. Release some, or put the work back in the queue and try later.

    :ivar owner: the owner.
    :ivar kind: ``"leases"`` or ``"claims"``.
    :ivar held: how many it holds.
    :ivar cap: the cap.
    """

    def __init__(self, owner: str, kind: str, held: int, cap: int) -> None:
        super().__init__(f"{owner!r} holds {held} {kind}, its cap is {cap}; nothing was "
                         f"taken. Release {kind} (or re-queue the work) and try again, or "
                         f"raise max_{kind}_per_owner")
        self.owner = owner
        self.kind = kind
        self.held = held
        self.cap = cap


class DeadlineExceeded(CoordinationError):
    """Work under a lease or claim ran past its deadline; the lease was released or the
    claim returned to the queue, so later writes fenced by it are refused.

    :ivar name: the lease name (``claim:<id>`` for a claim).
    :ivar seconds: the deadline that passed.
    """

    def __init__(self, name: str, seconds: float) -> None:
        super().__init__(f"work under {name!r} ran past its {seconds:g}s deadline; the "
                         "slot was given back (lease released / claim returned to the queue)")
        self.name = name
        self.seconds = seconds


class CapWarning(UserWarning):
    """An owner holds 80% or more of its lease or claim cap."""


class PoolWarning(UserWarning):
    """80% or more of an instance's PostgreSQL connections are in use at once."""


class FilesystemWarning(UserWarning):
    """A store was opened on a filesystem sessiondb does not know to be safe or unsafe
    for SQLite's WAL mode (see :mod:`sessiondb.filesystems`)."""


class ConnectionLost(StorageError):
    """PostgreSQL: the connection to the server was lost, could not be made, or was ended
    by the server (restart, network partition, an administrator). A write that got this
    before its COMMIT was sent was rolled back by the server; one cut off during COMMIT
    may or may not have committed (re-read before writing it again). Later calls take a
    new connection, so they work again as soon as the server is back.

    :ivar url: the server's URL, without the password.
    """

    def __init__(self, message: str, url: str = "") -> None:
        super().__init__(message)
        self.url = url


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f" ({ts:.3f})"


def translate(exc: BaseException, path: str = "") -> BaseException:
    """Map an ``apsw`` exception to the sessiondb equivalent (chain it with ``from``).

    Exceptions that are not from apsw are returned unchanged.
    """
    where = f" ({path})" if path else ""
    if isinstance(exc, SessionDBError) or not isinstance(exc, apsw.Error):
        return exc
    text = str(exc)
    if isinstance(exc, apsw.FullError):
        return DiskFullError(f"disk full{where}: {text}; free space, then retry")
    if isinstance(exc, (apsw.CorruptError, apsw.NotADBError)):
        return CorruptDatabaseError(
            f"database is damaged{where}: {text}; run `sessiondb doctor` on it"
        )
    if isinstance(exc, apsw.ConstraintError):
        return IntegrityViolation(f"constraint failed{where}: {text}")
    if isinstance(exc, (apsw.BusyError, apsw.LockedError)):
        return DatabaseBusyError(f"database busy{where}: {text}; retry later")
    if isinstance(exc, (apsw.IOError, apsw.CantOpenError, apsw.ReadOnlyError,
                        apsw.PermissionsError, apsw.ProtocolError)):
        return StorageError(f"storage error{where}: {text}")
    return StorageError(f"SQLite error{where}: {text}")
