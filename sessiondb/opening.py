"""Opening a store: the engine for a path or a URL (:mod:`sessiondb.backend` draws the
seam; this module is the one place that knows both engines, so that neither they nor the
seam import each other)."""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Any, Callable

from .backend import Engine, is_url
from .connection import ENV_PATH
# The default backend is imported with the package, not at the first open: a process
# that drops privileges after importing sessiondb must not need to load modules (and the
# C extensions they use) afterwards.
from .engine import Engine as SQLiteEngine
from .errors import ConfigurationError


def open_engine(path: Any, options: dict[str, Any]) -> Engine:
    """The engine for ``path``: PostgreSQL for a URL (given, or in ``$SESSIONDB_PATH``
    when ``path`` is None), else a SQLite file.

    :raises ConfigurationError: an option the chosen backend does not have.
    """
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
        factory, kind = SQLiteEngine, "SQLite"
    try:
        return factory(path, **options)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        name = str(exc).rsplit(" ", 1)[-1]
        raise ConfigurationError(f"option {name} does not apply to a {kind} store") from None

