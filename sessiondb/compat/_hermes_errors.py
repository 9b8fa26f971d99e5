"""The errors of the hermes-agent facade (:mod:`sessiondb.compat.hermes`): sessiondb's
typed errors that are also the ``sqlite3`` errors hermes-agent raised, the translation of
the engine's errors into them (SQLite's words for PostgreSQL's integrity violations
included), and the argument checks that raise them before any SQL runs.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import apsw

from ..errors import (
    ClosedError, DatabaseBusyError, IntegrityViolation, InvalidArgumentType, SessionDBError,
    TitleConflict, WriteTimeout,
)
from . import _hermes_sql as q

class IntegrityError(IntegrityViolation, sqlite3.IntegrityError):
    """A constraint failed (foreign key, NOT NULL, a datatype mismatch); nothing was
    written. Also a ``sqlite3.IntegrityError``, as the original raised."""


class ProgrammingError(InvalidArgumentType, sqlite3.ProgrammingError):
    """A value of a type SQLite cannot store (a list as content, say); nothing was
    written. Also a ``sqlite3.ProgrammingError``, as the original raised."""


class DatabaseLocked(DatabaseBusyError, sqlite3.OperationalError):
    """The database stayed locked past the time budget. Also a
    ``sqlite3.OperationalError``, as the original raised after its last retry."""


class LockTimeout(WriteTimeout, DatabaseLocked):
    """No write lock within ``write_timeout``; nothing was written."""


class DatabaseClosed(ClosedError, AttributeError):
    """The instance was closed. Also an ``AttributeError``, as the original raised."""


class TitleInUse(TitleConflict):
    """Another session has the title; hermes-agent's message, word for word."""

    def __init__(self, title: str, session_id: str) -> None:
        super().__init__(title, session_id)
        self.args = (f"Title '{title}' is already in use by session {session_id}",)



# Public as sessiondb.compat.hermes.<name>: tracebacks and reprs say where to import them.
for _error in (IntegrityError, ProgrammingError, DatabaseLocked, LockTimeout, DatabaseClosed,
               TitleInUse):
    _error.__module__ = "sessiondb.compat.hermes"


@contextmanager
def compatible_errors() -> Iterator[None]:
    """Raise the engine's errors in their hermes-compatible form (chained)."""
    try:
        yield
    except (IntegrityError, ProgrammingError, DatabaseLocked, DatabaseClosed):
        raise
    except ClosedError as exc:
        raise DatabaseClosed(str(exc)) from None
    except SessionDBError as exc:
        cause = exc.__cause__
        state = getattr(cause, "sqlstate", None)  # a psycopg error's (PostgreSQL)
        if state in _PG_TYPE_ERRORS:
            raise ProgrammingError(f"a value of another type than its column's "
                                   f"(PostgreSQL: {str(cause).splitlines()[0]})") from exc
        if isinstance(exc, IntegrityViolation) or isinstance(
                cause, (apsw.ConstraintError, apsw.MismatchError)):
            # SQLite's own words, as sqlite3 gave them: "FOREIGN KEY constraint failed"
            text = str(cause) if isinstance(cause, apsw.Error) else str(exc)
            if state is not None:
                text = _sqlite_words(cause, state)
            raise IntegrityError(text) from exc
        if isinstance(exc, WriteTimeout):
            raise LockTimeout(exc.waited_s, exc.attempts) from exc
        if isinstance(exc, DatabaseBusyError):
            raise DatabaseLocked(str(exc)) from exc
        raise


#: SQLSTATEs of a value PostgreSQL cannot take where SQLite took anything (an int
#: compared with text, text for a number): undefined operator, datatype mismatch,
#: indeterminate type, invalid text representation, numeric value out of range.
_PG_TYPE_ERRORS = {"42883", "42804", "42P18", "22P02", "22003"}
#: SQLite's words for PostgreSQL's integrity violations.
_PG_CONSTRAINTS = {"23503": "FOREIGN KEY", "23502": "NOT NULL", "23505": "UNIQUE",
                   "23514": "CHECK"}


def _sqlite_words(cause: BaseException, state: str) -> str:
    """A PostgreSQL integrity violation in SQLite's words (``NOT NULL constraint failed:
    messages.role``), which code written against hermes-agent may look for, followed by
    PostgreSQL's."""
    kind = _PG_CONSTRAINTS.get(state)
    if kind is None:
        return str(cause)
    diag = getattr(cause, "diag", None)
    table, column = getattr(diag, "table_name", None), getattr(diag, "column_name", None)
    where = f": {table}.{column}" if kind != "FOREIGN KEY" and table and column else ""
    return f"{kind} constraint failed{where} (PostgreSQL: {str(cause).splitlines()[0]})"


_BINDABLE = (type(None), int, float, str, bytes, bytearray, memoryview)


Args = TypeVar("Args", tuple, list, dict)


def bindable(args: Args) -> Args:
    """:raises ProgrammingError: an argument SQLite cannot store (checked before any SQL
    runs, with the message of Python's ``sqlite3``)."""
    named = args.items() if isinstance(args, dict) else enumerate(args, 1)
    for key, value in named:
        if not isinstance(value, _BINDABLE):
            raise ProgrammingError(f"Error binding parameter {key}: type "
                                   f"'{type(value).__name__}' is not supported")
    return args


def page(limit: Any, offset: Any) -> tuple[int, int]:
    """``limit`` and ``offset`` as the original's SQLite read them
    (:func:`_hermes_sql.sqlite_page`), on either backend.

    :raises IntegrityError: not an integer (None: "datatype mismatch", as the original).
    """
    try:
        return q.sqlite_page(limit, offset)
    except apsw.MismatchError as exc:
        raise IntegrityError(str(exc)) from exc
