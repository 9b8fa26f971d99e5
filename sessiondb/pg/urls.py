"""sessiondb's own parameters in a ``postgresql://`` URL (``?schema=profile_a&pooler=1``),
which libpq would refuse: split from the rest before the URL reaches psycopg."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ..errors import ConfigurationError

#: The URL query parameters that are sessiondb's own options, not libpq's (libpq would
#: refuse them): ``?schema=profile_a&pooler=1``.
URL_OPTIONS = ("schema", "pooler")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def split_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL without sessiondb's own query parameters (:data:`URL_OPTIONS`), and those
    parameters (the last value of each wins)."""
    parts = urlsplit(url)
    pairs = [p for p in parts.query.split("&") if p]
    mine: dict[str, str] = {}
    rest: list[str] = []
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name in URL_OPTIONS:
            mine[name] = value
        else:
            rest.append(pair)
    return urlunsplit(parts._replace(query="&".join(rest))), mine


def split_schema(url: str) -> tuple[str, str | None]:
    """The URL without sessiondb's own query parameters, and its ``schema=``."""
    plain, mine = split_options(url)
    return plain, mine.get("schema")


def url_flag(name: str, value: str) -> bool:
    """A URL parameter's yes or no (``1``/``0``, ``true``/``false``, ``yes``/``no``,
    ``on``/``off``).

    :raises ConfigurationError: anything else."""
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigurationError(f"the URL parameter {name}={value} must be 1 or 0 "
                             "(true/false, yes/no, on/off)")
