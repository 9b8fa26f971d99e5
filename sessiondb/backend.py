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
(``run_steps``), ``checkpoint()``, ``stats()``, ``close()``, and its :class:`Dialect`
(:func:`sessiondb.opening.open_engine` picks one; this module imports neither):
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

from contextlib import AbstractContextManager
from urllib.parse import urlsplit, urlunsplit
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

from .errors import ConfigurationError

T = TypeVar("T")

__all__ = ["Conn", "Dialect", "Engine", "Handle", "fetch", "first", "is_url", "mask", "rows",
           "session_lock_key"]

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
    """What differs between the databases, as used by the rules written once (SQLite's:
    :mod:`sessiondb.dialect`; PostgreSQL's: :mod:`sessiondb.pg.dialect`).

    :ivar name: ``"sqlite"`` or ``"postgresql"``.
    :ivar in_list: an SQL expression that is the list given as one parameter (a JSON
        array of text), for ``x IN <in_list>``; ``in_id_list``: the same of integers.
    :ivar message_total: the statement that reads the number of messages.
    :ivar for_update: appended to a SELECT of a row a write checks, so that it stays as
        checked until the write commits; ``skip_locked``: so that a queue's readers pass
        over rows another transaction holds.
    :ivar defers_index: bulk imports defer full-text indexing (and catch up in steps).
    :ivar reclaims_space: deleted rows' space is given back in steps (``reclaim_space``).
    :ivar refuses_overflow: the database refuses integer and float overflow itself.
    """

    name: str
    in_list: str
    in_id_list: str
    message_total: str
    for_update: str
    skip_locked: str
    defers_index: bool
    reclaims_space: bool
    refuses_overflow: bool

    def lock(self, conn: Conn, *keys: str) -> None:
        """Serialize the writers of these keys (a session's, :func:`session_lock_key`;
        a lease name, an owner) until the transaction ends. SQLite: nothing to do
        (``BEGIN IMMEDIATE`` admits one writer at a time); PostgreSQL:
        transaction-scoped advisory locks."""

    def update_session(self, conn: Conn, key: str, assignments: str, args: list[Any],
                       session_id: str) -> bool:
        """Update the session's row after taking the lock ``key``, in one statement;
        whether the session exists."""

    def insert_for_session(self, conn: Conn, key: str, assignments: str, args: list[Any],
                           session_id: str, table: str, row: dict[str, Any]) -> int | None:
        """:meth:`update_session`, then ``INSERT INTO table`` the ``row`` (column: value)
        if the session exists; the new row's id, or None when the session does not
        exist (nothing written)."""

    def now(self, conn: Conn) -> float:
        """The clock that decides expiry (seconds since the epoch): this host's on SQLite
        (one machine), the server's on PostgreSQL (many hosts, one clock)."""

    def list_arg(self, values: Iterable[Any]) -> Any:
        """The parameter for :attr:`in_list`."""

    def starts_with(self, column: str, prefix: str, fold: bool = False
                    ) -> tuple[str, list[Any]]:
        """SQL true when ``column`` starts with ``prefix`` (ASCII case folded with
        ``fold``), and its arguments."""

    def list_page(self, conn: Conn, where: list[str], args: list[Any], order: str,
                  limit: int, offset: int, *, columns: str, preview_order: str
                  ) -> list[dict[str, Any]]:
        """One page of sessions ``s`` with ``last_active`` and a ``preview`` head."""

    def search(self, conn: Conn, path: Any, query: str, filters: Any, limit: int,
               offset: int) -> list[dict[str, Any]]:
        """The hits of ``search_messages``."""

    def unindexed(self, column: str) -> str:
        """``column`` in a condition the planner must not use an index for."""

    def store_bytes(self, conn: Conn) -> int:
        """The store's size in bytes."""

    def assign_ids(self, conn: Conn, messages: list[tuple], assign: Any) -> list[tuple]:
        """Imported messages with their ids (see :func:`sessiondb.bulk._assign_ids`)."""

    def ids_used(self, conn: Conn) -> None:
        """After messages were inserted with explicit ids."""

    def import_context(self, read: Any) -> AbstractContextManager[Any]:
        """Around a bulk import."""


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


class Handle:
    """What every public store class offers about the engine it holds (``_engine``):
    its path, its backend, closing, ``with``, and its repr."""

    _engine: Engine

    @property
    def path(self) -> Any:
        """The store: its absolute file path, or its URL without the password."""
        return self._engine.path

    @property
    def backend(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.sql.name

    def close(self) -> None:
        """Close the store's connections (SQLite: after a last PASSIVE checkpoint).
        Idempotent."""
        self._engine.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self._engine)


def session_lock_key(session_id: str) -> str:
    """The key of a session for :meth:`Dialect.lock`: every write that changes the
    session or its rows takes it (the store's own and the adapters' alike), so that they
    queue on PostgreSQL as they do on SQLite."""
    return "session:" + session_id


def is_url(path: Any) -> bool:
    """True for a PostgreSQL URL (``postgresql://...`` or ``postgres://...``)."""
    return isinstance(path, str) and path.lower().startswith(_URL_SCHEMES)


def mask(url: str) -> str:
    """The URL without its password (what errors and ``path`` show)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


# -- options both engines take --------------------------------------------------------

def check_seconds_option(name: str, value: Any) -> float:
    """A positive number of seconds (``write_timeout``, ...)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds")
    return float(value)


def check_hold_timeout(value: Any) -> float | None:
    """``hold_timeout``: a positive number of seconds, or None (no bound)."""
    if value is not None and (isinstance(value, bool) or not isinstance(
            value, (int, float)) or not value > 0):
        raise ConfigurationError("hold_timeout must be a positive number of seconds "
                                 "or None (no bound)")
    return None if value is None else float(value)


#: The values of the ``durability`` option, the strongest first.
DURABILITY = ("full", "normal")


def check_durability(value: Any) -> str:
    """``durability``: ``"full"`` (a write acknowledged is on disk: it survives a power
    cut) or ``"normal"`` (it survives a crash of the process; a power cut or an OS crash
    may lose the writes since the last sync; see
    :func:`sessiondb.connection.connection_durability`)."""
    if value not in DURABILITY:
        raise ConfigurationError(f"durability must be 'full' or 'normal', not {value!r}")
    return value


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
