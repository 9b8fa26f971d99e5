"""psycopg's exceptions as sessiondb's (:mod:`sessiondb.errors`): the one boundary where
the PostgreSQL engine translates them (:mod:`sessiondb.pg.engine`)."""

from __future__ import annotations

import psycopg
import psycopg.errors as pgerr

from ..errors import (
    ConnectionLost, CorruptDatabaseError, DiskFullError, HoldTimeout, IntegrityViolation,
    InvalidArgument, SessionDBError, StorageError, TitleConflict, WriteTimeout,
)


def translate(exc: BaseException, url: str = "", hold: float | None = None) -> BaseException:
    """Map a psycopg exception to the sessiondb equivalent (chain it with ``from``);
    others are returned unchanged."""
    if isinstance(exc, SessionDBError) or not isinstance(exc, psycopg.Error):
        return exc
    where = f" ({url})" if url else ""
    text = str(exc).strip()
    if isinstance(exc, pgerr.UniqueViolation) and getattr(exc.diag, "constraint_name", "") \
            == "idx_sessions_title_unique":
        title = text.split("(title)=(", 1)[-1].split(")", 1)[0] if "(title)=(" in text else ""
        return TitleConflict(title, "another session")
    if isinstance(exc, psycopg.IntegrityError):
        return IntegrityViolation(f"constraint failed{where}: {text}")
    if isinstance(exc, (pgerr.QueryCanceled, pgerr.IdleInTransactionSessionTimeout)):
        return HoldTimeout(hold or 0.0, hold or 0.0)
    if isinstance(exc, pgerr.LockNotAvailable):
        return WriteTimeout(0.0, 1, f"PostgreSQL: {text}")
    if isinstance(exc, (pgerr.DiskFull, pgerr.OutOfMemory)):
        return DiskFullError(f"the server is out of space{where}: {text}; free space, "
                             "then retry")
    if isinstance(exc, (pgerr.DataCorrupted, pgerr.IndexCorrupted)):
        return CorruptDatabaseError(f"database is damaged{where}: {text}")
    if isinstance(exc, psycopg.DataError) or "NUL (0x00)" in text:
        return InvalidArgument(f"a value PostgreSQL cannot store{where}: {text}")
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return ConnectionLost(f"lost the connection to the server{where}: {text}; nothing "
                              "of this call was committed unless it was cut off during "
                              "COMMIT; later calls reconnect", url)
    return StorageError(f"PostgreSQL error{where}: {text}")
