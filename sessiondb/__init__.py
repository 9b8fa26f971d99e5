"""sessiondb: a session store that many processes share without freezing (SQLite on one
machine, PostgreSQL across machines)."""

from .bounded import Deadline, Heartbeat
from .coordination import Claim, Lease
from .errors import (
    CapExceeded, CapWarning, ClaimLost, ClosedError, ConfigurationError, ConnectionLost,
    CoordinationError,
    CorruptDatabaseError, DatabaseBusyError, DatabaseOpenError, DeadlineExceeded,
    DiskFullError, FilesystemWarning, ForeignDatabaseError, HermesSchemaError, HoldTimeout,
    IntegrityViolation, InvalidArgument, InvalidArgumentType, InvalidTitle, LeaseHeld,
    LeaseLost, PoolWarning, SchemaTooNewError,
    SearchIndexError, SessionDBError, SessionNotFound, StaleRevision, StorageError,
    StoreReplacedError, TitleConflict, UnsafeFilesystemError, WalDeletedError, WriteTimeout,
)
from .maintenance import Progress
from .aio import AsyncSessionDB
from .store import SessionDB
from .text import sanitize_title

__version__ = "0.7.0"

__all__ = [
    "SessionDB", "AsyncSessionDB", "sanitize_title", "__version__",
    "SessionDBError", "ConfigurationError", "DatabaseOpenError", "SchemaTooNewError",
    "HermesSchemaError", "ForeignDatabaseError", "UnsafeFilesystemError", "ClosedError",
    "InvalidArgument", "InvalidTitle", "TitleConflict", "InvalidArgumentType",
    "SessionNotFound", "IntegrityViolation", "DatabaseBusyError", "WriteTimeout",
    "HoldTimeout", "StorageError", "DiskFullError", "CorruptDatabaseError", "SearchIndexError",
    "WalDeletedError", "StoreReplacedError", "StaleRevision", "CoordinationError",
    "LeaseHeld", "LeaseLost", "ClaimLost", "CapExceeded", "DeadlineExceeded", "CapWarning",
    "ConnectionLost", "PoolWarning", "FilesystemWarning",
    "Lease", "Claim", "Heartbeat", "Deadline", "Progress",
]
