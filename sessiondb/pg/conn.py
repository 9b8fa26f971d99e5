"""A psycopg connection that looks like the apsw connection the rules are written for.

The rules (:mod:`sessiondb.store`, :mod:`sessiondb.coordination`, ...) run SQL with ``?``
parameters and read ``changes()`` and ``last_insert_rowid()``, as on SQLite. This
wrapper rewrites the SQL once per statement text (cached) to psycopg's ``%s`` style and
keeps the row count of the last statement; ``last_insert_rowid()`` is ``lastval()``,
the value the last ``INSERT`` drew from an identity column's sequence in this session.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Sequence

import psycopg


@functools.lru_cache(maxsize=2048)
def to_psycopg(sql: str) -> str:
    """``?`` parameters become ``%s`` and a literal ``%`` becomes ``%%``; string literals,
    quoted identifiers and comments are left as they are (a ``?`` in them is text)."""
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            end = sql.find(ch, i + 1)
            while end != -1 and end + 1 < n and sql[end + 1] == ch:  # doubled quote
                end = sql.find(ch, end + 2)
            end = n - 1 if end == -1 else end
            out.append(sql[i:end + 1].replace("%", "%%"))
            i = end + 1
            continue
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end == -1 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
            continue
        out.append("%s" if ch == "?" else "%%" if ch == "%" else ch)
        i += 1
    return "".join(out)


class Cursor:
    """The results of one statement, read like an apsw cursor."""

    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor) -> None:
        self._cur = cur

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._cur) if self._cur.description is not None else iter(())

    def fetchall(self) -> list[tuple]:
        return self._cur.fetchall() if self._cur.description is not None else []

    def fetchone(self) -> tuple | None:
        return self._cur.fetchone() if self._cur.description is not None else None

    def get_description(self) -> Sequence[tuple]:
        return [(d.name, None) for d in self._cur.description or ()]


class PgConn:
    """One PostgreSQL connection inside one transaction, as the rules see it."""

    __slots__ = ("raw", "_changes", "_on_locked")

    def __init__(self, raw: psycopg.Connection, on_locked: Callable[[], None] | None = None
                 ) -> None:
        self.raw = raw
        self._changes = 0
        self._on_locked = on_locked

    def locked(self) -> None:
        """Called by :meth:`PgDialect.lock` once the rule's locks are taken: from here on
        the transaction holds what others wait for (the engine's hold bound starts)."""
        if self._on_locked is not None:
            self._on_locked()

    def execute(self, sql: str, args: Sequence[Any] | None = ()) -> Cursor:
        if args:
            cur = self.raw.execute(to_psycopg(sql), list(args))
        else:  # no parameters: sent as it is (several statements allowed)
            cur = self.raw.execute(sql)
        self._changes = max(cur.rowcount, 0)
        return Cursor(cur)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.raw.cursor() as cur:
            cur.executemany(to_psycopg(sql), rows)
            self._changes = max(cur.rowcount, 0)

    def changes(self) -> int:
        return self._changes

    def last_insert_rowid(self) -> int:
        return self.raw.execute("SELECT lastval()").fetchone()[0]
