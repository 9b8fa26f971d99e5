"""The text rules of hermes-agent's ``SessionDB`` (March 2026), as pure functions: title
sanitizing, the full-text query sanitizer, list previews, JSON columns.

They differ from sessiondb's own rules (:mod:`sessiondb.text`) on purpose, in the details
that code written against hermes-agent can observe; see :mod:`sessiondb.compat.hermes`.
"""

from __future__ import annotations

import json
import re
from itertools import chain
from typing import Any

from .. import text
from ..errors import InvalidArgument, InvalidArgumentType

# -- titles -----------------------------------------------------------------------------


def sanitize_title(title: str | None) -> str | None:
    """hermes-agent's rule: a falsy title is None (whatever its type); anything else is
    cleaned by sessiondb's rule, which is the same (delete controls and invisible
    characters, collapse whitespace runs, trim, refuse over 100 characters).

    :raises InvalidTitle: (a ``ValueError``) over 100 characters after cleaning.
    :raises InvalidArgumentType: (a ``TypeError``) a truthy non-str.
    """
    return text.sanitize_title(title) if title else None


# -- full-text query --------------------------------------------------------------------

_PHRASE = re.compile(r'"[^"]*"')
_SPECIALS = re.compile(r'[+{}()"^]')
_STARS = re.compile(r"\*+")
_LOOSE_STAR = re.compile(r"(^|\s)\*")
_LEADING_OPERATOR = re.compile(r"^(AND|OR|NOT)\b\s*", re.IGNORECASE)
_TRAILING_OPERATOR = re.compile(r"\s+(AND|OR|NOT)\s*$", re.IGNORECASE)
_COMPOUND = re.compile(r"\b(\w+(?:-\w+)+)\b")


def sanitize_fts5_query(query: str) -> str:
    """hermes-agent's full-text query sanitizer, step for step (quoted phrases kept,
    FTS5 specials and loose stars removed, dangling operators trimmed, hyphenated words
    quoted). The result may still be invalid FTS5 (``hello.``); the search then finds
    nothing, as the original's did."""
    phrases: list[str] = []
    # A placeholder character absent from the query, neither a word character nor
    # whitespace, so that the later steps see phrase boundaries as the original did.
    mark = next(chr(c) for c in chain(range(0xE000, 0xF900), range(0xF0000, 0xFFFFE))
                if chr(c) not in query)

    def protect(match: re.Match) -> str:
        phrases.append(match.group(0))
        return f"{mark}Q{len(phrases) - 1}{mark}"

    out = _PHRASE.sub(protect, query)
    out = _SPECIALS.sub(" ", out)
    out = _STARS.sub("*", out)
    out = _LOOSE_STAR.sub(r"\1", out)
    out = _LEADING_OPERATOR.sub("", out.strip(), count=1).strip()
    out = _TRAILING_OPERATOR.sub("", out, count=1)
    out = _COMPOUND.sub(r'"\1"', out)
    for i, phrase in enumerate(phrases):
        out = out.replace(f"{mark}Q{i}{mark}", phrase)
    return out.strip()


# -- lists ------------------------------------------------------------------------------

#: Code points of a message read for a preview (the window is cut before trimming).
PREVIEW_WINDOW = 63
PREVIEW_LENGTH = 60


def preview(head: bytes | None) -> str:
    """The preview of a session list row from the first bytes (UTF-8) of its first user
    message: of its first 63 characters, line breaks as spaces, trimmed, then 60
    characters and ``...`` if there were more."""
    content = head_text(head, PREVIEW_WINDOW)
    raw = content.replace("\n", " ").replace("\r", " ").strip()
    return raw[:PREVIEW_LENGTH] + ("..." if len(raw) > PREVIEW_LENGTH else "")


def head_text(head: bytes | None, chars: int) -> str:
    """The first ``chars`` characters of text read as its first ``4 * chars`` bytes (see
    :func:`head_sql`; a character cut in two is dropped); NULL is ``""``."""
    return "" if head is None else head.decode("utf-8", "ignore")[:chars]


def head_sql(column: str, chars: int) -> str:
    """SQL for the first bytes of a text column that hold its first ``chars`` characters:
    a message may be megabytes long, and ``substr()`` of a TEXT stops at a NUL."""
    return f"substr(CAST({column} AS BLOB), 1, {4 * chars})"


# -- JSON columns -----------------------------------------------------------------------


def encode_if_truthy(value: Any) -> str | None:
    """``json.dumps`` with default settings for a truthy value; a falsy one is NULL.

    :raises InvalidArgumentType: (a ``TypeError``, as json raises) not serializable.
    :raises InvalidArgument: (a ``ValueError``, as json raises) a circular reference.
    """
    if not value:
        return None
    try:
        return json.dumps(value)
    except TypeError as exc:
        raise InvalidArgumentType(f"not JSON-serializable: {exc}") from exc
    except ValueError as exc:
        raise InvalidArgument(f"not JSON-serializable: {exc}") from exc


def decodes(value: str) -> tuple[bool, Any]:
    """``(True, decoded)``, or ``(False, None)`` when the text is not JSON."""
    try:
        return True, json.loads(value)
    except (ValueError, TypeError, RecursionError):
        return False, None
