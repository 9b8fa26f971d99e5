"""SQLite's :class:`~sessiondb.backend.Dialect`: the SQL that differs from PostgreSQL's."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from .backend import Conn


class SQLiteDialect:
    name = "sqlite"
    #: A JSON array parameter as a table: json_each reads it in one pass (a long
    #: ``IN (?, ?, ...)`` list would hit the parameter limit and defeat the statement cache).
    in_list = "(SELECT value FROM json_each(?))"

    def lock(self, conn: Conn, *keys: str) -> None:
        """Nothing: ``BEGIN IMMEDIATE`` already admits one writer at a time."""

    def now(self, conn: Conn) -> float:
        return time.time()

    def list_arg(self, values: Iterable[Any]) -> Any:
        return json.dumps(list(values))


SQLITE = SQLiteDialect()
