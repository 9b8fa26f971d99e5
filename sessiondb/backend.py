"""The seam between the public API and a database: what a backend provides.

:class:`~sessiondb.SessionDB` holds one *engine* (it does not inherit one) and writes its
rules once, over a small connection interface. Two engines exist:

- SQLite (:class:`sessiondb.engine.Engine`): one apsw connection, the kernel-queued write
  gate, ``BEGIN IMMEDIATE``, checkpoints; the zero-configuration default;
- PostgreSQL (:class:`sessiondb.pg.engine.PgEngine`): a bounded connection pool, short
  READ COMMITTED transactions with explicit locks, retries of serialization failures and
  deadlocks; selected by a ``postgresql://`` URL and imported only then.

What an engine provides (:class:`Engine`): the one write path (``execute_write``), short
reads (``read``), ``transaction()`` and ``snapshot()`` blocks, long work in short steps
(``run_steps``), ``checkpoint()``, ``stats()``, ``close()``, and its :class:`Dialect`:
the few SQL fragments and actions that differ between the two databases. The rules
(:mod:`sessiondb.store`, :mod:`sessiondb.coordination`, :mod:`sessiondb.bulk`, ...) are
written once in the SQL both databases share (``RETURNING``, ``ON CONFLICT``, ``?``
parameters, which the PostgreSQL connection rewrites), and call the dialect for the rest.

A *connection* handed to a write or read function (:class:`Conn`) is what apsw's
``Connection`` offers and the PostgreSQL engine imitates: ``execute(sql, args)``
returning a cursor (iterable, ``fetchall``, ``fetchone``, ``get_description``),
``changes()`` and ``last_insert_rowid()``. This module imports no driver.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import PurePath
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from .errors import ConfigurationError

T = TypeVar("T")

__all__ = ["Conn", "Dialect", "Engine", "fetch", "first", "is_url", "open_engine", "rows"]

_URL_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    def __iter__(self) -> Any: ...
    def fetchall(self) -> list[tuple]: ...
    def fetchone(self) -> tuple | None: ...
    def get_description(self) -> Sequence[tuple]: ...


class Conn(Protocol):
    """The connection a write or read function receives (see the module docstring)."""

    def execute(self, sql: str, args: Sequence[Any] = ...) -> Cursor: ...
    def changes(self) -> int: ...
    def last_insert_rowid(self) -> int: ...


class Dialect(Protocol):
    """What differs between the databases, as used by the rules written once.

    :ivar name: ``"sqlite"`` or ``"postgresql"``.
    :ivar in_list: an SQL expression that is the list given as one parameter (a JSON
        array), for ``x IN <in_list>``.
    """

    name: str
    in_list: str

    def lock(self, conn: Conn, *keys: str) -> None:
        """Serialize the writers of these keys (a session id, a lease name, an owner)
        until the transaction ends. SQLite: nothing to do (``BEGIN IMMEDIATE`` admits one
        writer at a time); PostgreSQL: transaction-scoped advisory locks."""

    def now(self, conn: Conn) -> float:
        """The clock that decides expiry (seconds since the epoch): this host's on SQLite
        (one machine), the server's on PostgreSQL (many hosts, one clock)."""

    def list_arg(self, values: Iterable[Any]) -> Any:
        """The parameter for :attr:`in_list`."""


class Engine(Protocol):
    """A backend's engine (see the module docstring)."""

    path: Any
    sql: Dialect

    def execute_write(self, fn: Callable[[Conn], T], *, bounded: bool = True) -> T: ...
    def read(self, fn: Callable[[Conn], T], snapshot: bool = False) -> T: ...
    def transaction(self) -> AbstractContextManager[Any]: ...
    def snapshot(self) -> AbstractContextManager[Any]: ...
    def run_steps(self, step: Any, tracker: Any = None,
                  committed: Callable[[], None] | None = None) -> int: ...
    def checkpoint(self, reset: bool = False) -> dict[str, int]: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


def is_url(path: Any) -> bool:
    """True for a PostgreSQL URL (``postgresql://...`` or ``postgres://...``)."""
    return isinstance(path, str) and path.lower().startswith(_URL_SCHEMES)


def open_engine(path: Any, options: dict[str, Any]) -> Engine:
    """The engine for ``path``: PostgreSQL for a URL (given, or in ``$SESSIONDB_PATH``
    when ``path`` is None), else a SQLite file.

    :raises ConfigurationError: an option the chosen backend does not have.
    """
    from .connection import ENV_PATH
    if isinstance(path, PurePath) and is_url(str(path).replace(":/", "://", 1)):
        raise ConfigurationError(
            f"{str(path)!r} looks like a PostgreSQL URL made into a path (Path() keeps one "
            "slash of '//'); pass the URL as a str")
    if path is None and is_url(os.environ.get(ENV_PATH, "")):
        path = os.environ[ENV_PATH]
    if is_url(path):
        from .pg.engine import PgEngine  # psycopg is imported only here
        factory: Callable[..., Engine] = PgEngine
        kind = "PostgreSQL"
    else:
        from .engine import Engine as SQLiteEngine
        factory, kind = SQLiteEngine, "SQLite"
    try:
        return factory(path, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        name = str(exc).rsplit(" ", 1)[-1]
        raise ConfigurationError(f"option {name} does not apply to a {kind} store") from None


# -- reading rows (pure functions of a connection) --------------------------------------

def fetch(conn: Conn, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    return conn.execute(sql, args).fetchall()


def rows(conn: Conn, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Rows as dicts keyed by column name, in column order."""
    cursor = conn.execute(sql, args)
    try:
        names = [d[0] for d in cursor.get_description()]
    except Exception:  # apsw.ExecutionCompleteError: no rows
        return []
    return [dict(zip(names, row)) for row in cursor]


def first(conn: Conn, sql: str, args: Sequence[Any] = ()) -> Any:
    row = conn.execute(sql, args).fetchone()
    return row[0] if row else None
