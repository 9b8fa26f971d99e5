"""An adapter's own tables, beside the store's, made through the one write path.

An adapter declares its tables once, as DDL per database (``"sqlite"``,
``"postgresql"``) that creates the current version, with the version number and the
upgrades that bring an older store's tables to it; :func:`ensure_tables` creates or
upgrades them the first time an instance needs them, in one write transaction under the store's own lock discipline
(``BEGIN IMMEDIATE`` on SQLite; a transaction-scoped advisory lock on PostgreSQL, so two
processes creating them at once never collide), and records the version in
``sessiondb_meta`` under ``adapter:<name>``. A store whose recorded version is newer than
the adapter's is refused with :class:`~sessiondb.errors.SchemaTooNewError`
(written by a newer sessiondb; nothing is changed).

Rows of an adapter's tables that belong to a session reference ``sessions(id)`` with
``ON DELETE CASCADE``: deleting or pruning the session removes them in the same
transaction.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..backend import Conn
from ..errors import ConfigurationError, SchemaTooNewError

__all__ = ["AdapterTables", "ensure_tables"]


@dataclass(frozen=True)
class AdapterTables:
    """An adapter's tables.

    :ivar ddl: ``ddl[dialect name]``: the statements that create the tables at
        ``version`` in a store that has none (plain ``CREATE TABLE``/``CREATE INDEX``).
    :ivar upgrades: ``upgrades[n][dialect name]``: the statements that bring tables at
        version ``n - 1`` to ``n``, for every ``n`` from 2 to ``version``.
    """

    name: str
    version: int
    ddl: Mapping[str, tuple[str, ...]]
    upgrades: Mapping[int, Mapping[str, tuple[str, ...]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [n for n in range(2, self.version + 1) if n not in self.upgrades]
        if missing:
            raise ConfigurationError(f"the {self.name} tables have no upgrade to version "
                                     f"{missing[0]}")

    @property
    def key(self) -> str:
        return f"adapter:{self.name}"


_made: "weakref.WeakKeyDictionary[Any, set[str]]" = weakref.WeakKeyDictionary()
_made_lock = threading.Lock()


def ensure_tables(db: Any, tables: AdapterTables) -> None:
    """Create ``tables`` in ``db``'s store, or upgrade them from an older version, in
    one write transaction (a no-op after the first call per instance).

    :raises SchemaTooNewError: the store has them at a newer version.
    """
    with _made_lock:
        if tables.key in _made.get(db, ()):
            return
    dialect = db._sql

    def write(conn: Conn) -> None:
        dialect.lock(conn, tables.key)
        row = conn.execute("SELECT value FROM sessiondb_meta WHERE key = ?",
                           (tables.key,)).fetchone()
        have = int(row[0]) if row else 0
        if have > tables.version:
            raise SchemaTooNewError(f"{db.path} ({tables.name} tables)", have,
                                    tables.version)
        if have == tables.version:
            return
        steps = ([tables.ddl] if have == 0 else
                 [tables.upgrades[n] for n in range(have + 1, tables.version + 1)])
        for step in steps:
            for statement in step[dialect.name]:
                conn.execute(statement)
        conn.execute("INSERT INTO sessiondb_meta (key, value) VALUES (?, ?) ON CONFLICT "
                     "(key) DO UPDATE SET value = excluded.value",
                     (tables.key, str(tables.version)))

    db._execute_write(write)
    with _made_lock:
        _made.setdefault(db, set()).add(tables.key)
