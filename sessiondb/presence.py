"""Whether there is a store at a path or URL, asked before opening it (which would
create one). Kept out of :mod:`sessiondb.opening`, which the package's core imports: for
a URL this loads :mod:`sessiondb.pg.doctor`, which imports the package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .backend import is_url
from .errors import DatabaseOpenError


def require_store(target: Any) -> None:
    """Refuse to go on when there is no store at ``target`` (a path or a URL), creating
    nothing: opening a missing file, or a PostgreSQL schema without sessiondb's tables,
    would create an empty store there, and a command that only reads it (or a copy from
    it) would quietly find nothing. A file that is there is left to the open, which
    refuses what is not a store (an empty file, another application's database) with its
    bytes untouched.

    :raises DatabaseOpenError: there is no store (or the server cannot be reached).
    """
    if is_url(target):
        from .pg.doctor import store_version  # psycopg is imported only for a URL
        where, version = store_version(str(target))
        if version == 0:
            raise DatabaseOpenError(f"no sessiondb store in {where} (nothing was created "
                                    "there); check the URL and its ?schema=", where)
        return
    path = Path(target).expanduser()
    if not path.exists():
        raise DatabaseOpenError(f"no sessiondb store at {path} (nothing was created); "
                                "check the path", str(path))
