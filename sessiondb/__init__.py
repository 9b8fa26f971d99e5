"""sessiondb: a SQLite session store that many local processes share without freezing."""

from .errors import (
    ClosedError, ConfigurationError, CorruptDatabaseError, DatabaseBusyError,
    DatabaseOpenError, DiskFullError, HoldTimeout, IntegrityViolation, InvalidArgument,
    InvalidArgumentType, InvalidTitle, SchemaTooNewError, SearchIndexError, SessionDBError,
    SessionNotFound, StorageError, TitleConflict, WalDeletedError, WriteTimeout,
)
from .aio import AsyncSessionDB
from .store import SessionDB
from .text import sanitize_title

__version__ = "0.1.0"

__all__ = [
    "SessionDB", "AsyncSessionDB", "sanitize_title", "__version__",
    "SessionDBError", "ConfigurationError", "DatabaseOpenError", "SchemaTooNewError",
    "ClosedError", "InvalidArgument", "InvalidTitle", "TitleConflict", "InvalidArgumentType",
    "SessionNotFound", "IntegrityViolation", "DatabaseBusyError", "WriteTimeout",
    "HoldTimeout", "StorageError", "DiskFullError", "CorruptDatabaseError", "SearchIndexError",
    "WalDeletedError",
]
