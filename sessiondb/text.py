"""Input checking and text rules: argument validation, titles, search-query sanitizing,
snippets of texts too long for FTS5's own, list previews.

Everything here is pure (no database), so every rule can be tested on its own.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import unicodedata
from typing import Any

from .errors import InvalidArgument, InvalidArgumentType, InvalidTitle

MAX_TITLE_LENGTH = 100
MAX_ID_LENGTH = 1024
_INT64_MAX = 2**63 - 1

# -- argument validation -------------------------------------------------------------


def check_text(name: str, value: Any, *, optional: bool = True, max_length: int | None = None
               ) -> str | None:
    """A str that SQLite can store as UTF-8 (no lone surrogates), or None if optional."""
    if value is None:
        if optional:
            return None
        raise InvalidArgument(f"{name} is required")
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{name} contains a lone surrogate at index {exc.start}; it is not valid "
            "Unicode text and cannot be stored"
        ) from None
    if max_length is not None and len(value) > max_length:
        raise InvalidArgument(f"{name} is {len(value)} characters; the limit is {max_length}")
    return value


def check_id(name: str, value: Any) -> str:
    """A non-empty identifier string."""
    text = check_text(name, value, optional=False, max_length=MAX_ID_LENGTH)
    if not text:
        raise InvalidArgument(f"{name} must not be empty")
    return text


def check_count(name: str, value: Any, *, optional: bool = False) -> int | None:
    """A non-negative integer that fits in SQLite's 64-bit INTEGER."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentType(f"{name} must be an int, not {type(value).__name__}")
    if value < 0 or value > _INT64_MAX:
        raise InvalidArgument(f"{name} must be between 0 and 2**63-1, got {_short(value)}")
    return value


def check_cost(name: str, value: Any) -> float | None:
    """None, or a finite non-negative number of US dollars."""
    number = check_number(name, value, optional=True)
    if number is not None and number < 0:
        raise InvalidArgument(f"{name} must be a finite number >= 0, got {number}")
    return number


def check_number(name: str, value: Any, *, optional: bool = False) -> float | None:
    """A finite int or float, as a float (e.g. a Unix time); None if optional."""
    if value is None:
        if optional:
            return None
        raise InvalidArgument(f"{name} is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgumentType(f"{name} must be a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int past the float range: 2**1024 and up
        number = math.inf
    if not math.isfinite(number):
        raise InvalidArgument(f"{name} must be a finite number, got {_short(value)}")
    return number


#: The longest span of seconds accepted (a TTL, a wait, a deadline): ten years.
MAX_SECONDS = 10 * 365 * 86400


def check_seconds(name: str, value: Any, *, zero: bool = False) -> float:
    """A number of seconds: more than 0 (or 0 too, with ``zero``), at most ten years."""
    number = check_number(name, value)
    assert number is not None
    if not (0 <= number if zero else 0 < number) or number > MAX_SECONDS:
        raise InvalidArgument(f"{name} must be {'>= 0' if zero else 'more than 0'} seconds "
                              f"and at most ten years, got {number}")
    return number


def check_flag(name: str, value: Any) -> bool:
    """True or False: a flag is never guessed from the truth value of something else."""
    if not isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be True or False, not "
                                  f"{type(value).__name__}")
    return value


#: The LIMIT that means none: the largest 64-bit integer (SQLite's -1 is an error in
#: PostgreSQL, PostgreSQL's NULL an error in SQLite).
NO_LIMIT = 2**63 - 1


def check_limit(limit: Any, offset: Any) -> tuple[int, int]:
    """``limit`` (None or negative means no limit: :data:`NO_LIMIT`) and ``offset`` as SQL
    values."""
    if limit is None:
        limit = -1
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidArgumentType(f"limit must be an int, not {type(limit).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise InvalidArgumentType(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0:
        raise InvalidArgument(f"offset must be >= 0, got {offset}")
    for name, value in (("limit", limit), ("offset", offset)):
        if value > _INT64_MAX:  # SQLite's LIMIT is a 64-bit integer
            raise InvalidArgument(f"{name} must be at most 2**63-1, got {_short(value)}; "
                                  "pass limit=None for no limit")
    return (limit if limit >= 0 else NO_LIMIT), offset


def check_list(name: str, values: Any) -> list[str] | None:
    """None, or a list/tuple/set of strings."""
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, (list, tuple, set, frozenset)):
        raise InvalidArgumentType(f"{name} must be a list of str, not {type(values).__name__}")
    return [check_text(f"{name} item", v, optional=False) for v in values]  # type: ignore[misc]


def to_json(name: str, value: Any) -> str | None:
    """JSON text for ``value`` (None stays None); NaN and non-serializable values refused."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidArgumentType(f"{name} is not JSON-serializable: {exc}") from None


def _short(value: Any) -> str:
    """A number for an error message: ``2**1100`` has 332 digits (and ``10**5000`` more
    than ``str()`` converts), so long ones are cut."""
    try:
        text = str(value)
    except ValueError:
        return f"an int of about {value.bit_length() * 0.30103:.0f} digits"
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def from_json(text: str | None) -> Any:
    """Decode stored JSON; text that does not decode is returned as it is."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


# -- titles ---------------------------------------------------------------------------

_INVISIBLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f"
    "\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ufff9-\ufffc]"
)
_SPACE_RUN = re.compile(r"\s+")
_LINEAGE_SUFFIX = re.compile(r"^(.*) #(\d+)$", re.DOTALL)


def sanitize_title(title: str | None) -> str | None:
    """Clean a session title for display and uniqueness.

    Deletes control, zero-width, bidi-override and BOM characters, collapses whitespace
    runs to one space and trims; an empty result is None.

    :raises InvalidTitle: longer than 100 characters after cleaning (never truncated).
    """
    # Type first: a falsy non-str (0, [], False) must not silently clear a title.
    if not check_text("title", title):
        return None
    cleaned = _SPACE_RUN.sub(" ", _INVISIBLE.sub("", title)).strip()
    if not cleaned:
        return None
    if len(cleaned) > MAX_TITLE_LENGTH:
        raise InvalidTitle(f"Title too long ({len(cleaned)} chars, max {MAX_TITLE_LENGTH})")
    return cleaned


def split_lineage(title: str) -> str:
    """``"name #3"`` -> ``"name"``; anything else unchanged."""
    match = _LINEAGE_SUFFIX.match(title)
    return match.group(1) if match else title


def lineage_number(title: str) -> int | None:
    match = _LINEAGE_SUFFIX.match(title)
    return int(match.group(2)) if match else None


# -- full-text query sanitizing ------------------------------------------------------

_OPERATORS = {"AND", "OR", "NOT"}
_WORD = re.compile(r"\w", re.UNICODE)
#: FTS5 parses a query in time that grows with the square of its terms (100,000 terms
#: take seconds, 10 MB of text half an hour); no one types more than this.
MAX_QUERY_LENGTH = 1000


def query_parts(query: str) -> list[str]:
    """The user's search text split at its double quotes: even indexes are outside
    quotes, odd ones inside (the text after an unmatched final quote counts as outside);
    a NUL is a space (FTS5 reads the query as a C string, where a NUL ends it mid-token;
    PostgreSQL refuses one in a text parameter).

    :raises InvalidArgument: longer than :data:`MAX_QUERY_LENGTH` characters.
    """
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidArgument(f"search query is {len(query)} characters; the limit is "
                              f"{MAX_QUERY_LENGTH}: search for a few distinctive words")
    parts = query.replace("\x00", " ").split('"')
    if len(parts) % 2 == 0:
        parts[-2] = parts[-2] + " " + parts[-1]
        parts.pop()
    return parts


def sanitize_fts_query(query: str) -> str:
    """Turn arbitrary user text into an FTS5 query that cannot be a syntax error.

    Balanced double-quoted phrases are kept as phrases; every other word becomes a quoted
    term (so ``:``, ``-``, ``(`` and friends lose their syntax meaning but hyphenated
    words still match as adjacent tokens); a trailing ``*`` keeps prefix search;
    uppercase ``AND``/``OR``/``NOT`` stay operators only where they stand between two
    terms. Returns ``""`` when nothing searchable is left.

    :raises InvalidArgument: longer than :data:`MAX_QUERY_LENGTH` characters.
    """
    pieces: list[str] = []
    for i, part in enumerate(query_parts(query)):
        if i % 2:
            if _WORD.search(part):
                pieces.append('"' + part + '"')
            continue
        for chunk in part.split():
            if chunk in _OPERATORS:
                pieces.append(chunk)
                continue
            prefix = chunk.endswith("*")
            word = chunk.strip("*").replace('"', "")
            if not _WORD.search(word):
                continue
            pieces.append('"' + word + '"' + ("*" if prefix else ""))
    # Operators must sit between two terms: drop leading, trailing and repeated ones.
    out: list[str] = []
    for piece in pieces:
        if piece in _OPERATORS and (not out or out[-1] in _OPERATORS):
            continue
        out.append(piece)
    while out and out[-1] in _OPERATORS:
        out.pop()
    return " ".join(out)


# -- snippets of long texts ---------------------------------------------------------

_TOKEN = re.compile(r"[^\W_]+")
_PHRASE = re.compile(r'"([^"]*)"(\*?)')


def plain_snippet(text: str, match: str, tokens: int = 40) -> str:
    """A snippet shaped like FTS5's ``snippet(..., '>>>', '<<<', '...', tokens)``, for a
    text too long to hand to FTS5: its snippet() takes time that grows with the square
    of the matches in the text (a 10 MB message: hours), this one linear time.

    Up to ``tokens`` words from a little before the first match, each matching word
    wrapped in ``>>> <<<``, ``...`` where text was cut; the beginning of the text when
    nothing matches. Words match as the ``unicode61`` tokenizer would have them
    (case-folded, accents removed), approximately.

    :param match: a query as :func:`sanitize_fts_query` returns it.
    """
    exact: set[str] = set()
    prefixes: list[str] = []
    for phrase, star in _PHRASE.findall(match):
        words = [_fold(w) for w in _TOKEN.findall(phrase)]
        if star and words:
            prefixes.append(words.pop())
        exact.update(words)
    starts = tuple(prefixes)

    def hit(word: str) -> bool:
        folded = _fold(word)
        return folded in exact or bool(starts and folded.startswith(starts))

    lead = max(1, tokens // 4)  # words shown before the first match
    found = iter(_TOKEN.finditer(text))
    window: list[re.Match] = []
    first = None
    for index, m in enumerate(found):
        window.append(m)
        if hit(m.group()):
            first = index
            break
        if len(window) > tokens:  # keep memory bounded on a long text without matches
            del window[:-lead]
    if first is None:  # no match: the beginning of the text
        window = list(_TOKEN.finditer(text[:tokens * 64]))[:tokens + 1]
        first_index = 0
    else:
        window = window[-lead:]
        first_index = first - len(window) + 1
        window += [m for _, m in zip(range(tokens - len(window) + 1), found)]
    more = len(window) > tokens
    window = window[:tokens]
    if not window:
        return ""
    out = ["..." if first_index > 0 else ""]
    for i, m in enumerate(window):
        if i:
            out.append(text[window[i - 1].end():m.start()])
        out.append(f">>>{m.group()}<<<" if hit(m.group()) else m.group())
    out.append("..." if more else "")
    return "".join(out)


def _fold(word: str) -> str:
    word = word.casefold()
    if word.isascii():
        return word
    return "".join(c for c in unicodedata.normalize("NFKD", word)
                   if not unicodedata.combining(c))


# -- list previews -------------------------------------------------------------------

#: Characters of a session's first user message shown in a list (then ``...``).
PREVIEW_LENGTH = 60


def decode_head(head: bytes, *, whole: bool) -> str:
    """Text from the first bytes of a UTF-8 value: a character cut in two at the end is
    dropped (unless ``whole``, the bytes are all of the value), and bytes that are not
    UTF-8 anywhere become U+FFFD rather than an error. The incremental decoder keeps an
    incomplete last sequence back instead of emitting it, which ``errors="ignore"`` on
    the whole would also do, but silently dropping invalid bytes elsewhere too."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(head, final=whole)


def preview(head: str, *, whole: bool, final: bool = True) -> str | None:
    """A list preview: the text on one line (CR and LF as spaces), trimmed, its first
    :data:`PREVIEW_LENGTH` characters and ``...`` when there were more.

    :param head: the value, or its beginning when not ``whole``.
    :param whole: ``head`` is the whole value.
    :param final: with a partial ``head`` whose characters do not settle the preview
        (they are mostly whitespace), return the preview of what is there, with ``...``,
        instead of None.
    :returns: the preview; None when ``head`` is partial, not ``final`` and does not
        settle it (read a longer head).
    """
    text = head.replace("\r", " ").replace("\n", " ").lstrip()
    if whole:
        text = text.rstrip()
        return text[:PREVIEW_LENGTH] + ("..." if len(text) > PREVIEW_LENGTH else "")
    # A character past the first PREVIEW_LENGTH that is not whitespace proves that the
    # trimmed whole is longer: the preview is then exact whatever follows the head.
    if len(text) > PREVIEW_LENGTH and not text[PREVIEW_LENGTH:].isspace():
        return text[:PREVIEW_LENGTH] + "..."
    return text.rstrip()[:PREVIEW_LENGTH] + "..." if final else None
