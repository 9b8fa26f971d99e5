"""Prefix queries (``abc*``) without a prefix index, run as an OR of the words.

FTS5 answers ``abc*`` from a table without a ``prefix=`` index of that length by
merging the doclists of every word that starts with ``abc`` into one before the first
row comes out, in every statement: a prefix of a word found in most messages costs
45-110 ms on a million messages however few rows are read. The same query written as
an OR of those words (``("abc" OR "abcd" OR ...)``) matches the same rows, and FTS5
reads an OR lazily, so a walk newest first stops as cheaply as for one word. It costs
instead a seek per word (in every segment of the index) at the start of each statement,
about 45 microseconds per word on a million messages in 10 segments, and a read of an
OR grows with its words: a search may run many statements (a walk of a filter's
sessions) where the merge happens once or twice. FTS5's merge costs about 25
microseconds per leaf page of the doclists and 100-400 per word: a prefix of 83 words
of which one is in nearly every message (3,900 pages) merges in 105 ms and starts in
3.7 ms written out; a prefix of 2,300 words (one letter) takes 120-290 ms written out
against about 1 s merged, but 2-3.5 s with a rare source's filter. So a prefix is
written out when its words' seeks in :data:`STATEMENTS` statements cost less than the
merge (:func:`expand`).

**Finding the words.** ``fts5vocab`` lists them, but counts every occurrence of each
word as it goes (a word in every message: 15 ms). The words are read instead from the
index's own b-tree (https://sqlite.org/fts5.html, and the format described at the top
of SQLite's ``fts5_index.c``, which FTS5 keeps stable across versions): ``%_idx`` holds,
for every leaf page of a segment that has a word on it, a prefix of its first word; the
leaf pages (rows of ``%_data``) whose words may start with the prefix are read, and
their words decoded. A word found only as a deletion not yet merged away is listed too:
it matches nothing, and costs only its seek. Words still in memory (written in this
connection's open write transaction) are not in those tables, so a query run inside a
write transaction is left to FTS5.

**Ranking.** Each word of an expansion is a phrase of its own to FTS5; bm25 needs the
occurrences of the prefix phrase, their sum. :func:`group_spec` describes which
phrases of the expanded query make up each phrase of the original, and
``sessiondb.search`` sums them (the largest group as the row's instances less the rest).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import apsw

from . import fts_tables
from .fts_tables import FIRST, varint
from .schema import index_prefixes

#: A prefix with more words than this is never written out (the query grows with them).
MAX_WORDS = 4000
# Microseconds, on a million messages in 10 segments: a statement's start per word of
# an expansion (its seek in each segment); FTS5's merge per leaf page of the doclists
# and per word (a lower bound: 100-400 measured).
US_PER_WORD = 45.0
US_MERGED_PAGE = 25.0
US_MERGED_WORD = 100.0
#: Statements of a search a prefix is written out for: one walk and one fetch of the
#: hits, or a walk of a filter's sessions (its start is paid in every one).
STATEMENTS = 10

# An FTS5 query, part by part: spaces (ASCII ones: FTS5 reads U+00A0 as part of a
# bareword), a string (``""`` is a quote in it), a bareword (ASCII letters, digits,
# ``_``, ``\x1a`` and every character past ASCII), either one perhaps a prefix;
# parentheses; anything else (``:``, ``^``, ``+``, ``-``, ``{``...) ends the rewrite.
QUERY_PART = re.compile(
    r'([ \t\n\r]+)|("(?:[^"]|"")*")(\*?)|([A-Za-z0-9_\x1a\x80-\U0010ffff]+)(\*?)'
    r'|([()])|(.)', re.DOTALL)
_PART = QUERY_PART
_OPERATORS = ("AND", "OR", "NOT")
_MAIN = b"0"  # the byte before every word of the main index (prefix indexes: 1, 2...)
_PAGE_BITS = 37  # a leaf page's %_data id: segment id << 37 | page number
_FLAGS = apsw.FTS5_TOKENIZE_QUERY | apsw.FTS5_TOKENIZE_PREFIX
_STARRED = re.compile(r'"([^"]*)"\*|([^\s"*]+)\*')
_TOKEN = re.compile(r"[^\W_]+")
_KEPT: "weakref.WeakKeyDictionary[apsw.Connection, tuple]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Expansion:
    """A query with its prefix phrases written as ORs of words."""

    match: str  #: the rewritten query
    groups: tuple[int, ...]  #: phrases of ``match`` per phrase of the original, in order
    words: int  #: words of all expansions (each costs a seek per statement)

    @property
    def statement_us(self) -> float:
        """Microseconds an FTS5 statement of ``match`` takes to start, beyond any
        statement's."""
        return self.words * US_PER_WORD


def merges_doclists(conn: apsw.Connection, match: str) -> bool:
    """True when ``match`` has a prefix phrase (``abc*``) that no ``prefix=`` index of
    the table covers: FTS5 then merges the doclists of every word with the prefix
    before the first row comes out (a prefix of a word in every message: 45-80 ms on a
    million messages), in every statement; so a search then runs as few as it can."""
    lengths: set[int] | None = None
    for quoted, bare in _STARRED.findall(match):
        words = _TOKEN.findall(quoted or bare)
        if not words:
            continue
        if lengths is None:
            lengths = set(index_prefixes(conn))
        if len(words[-1]) not in lengths:
            return True
    return False


def group_spec(groups: Sequence[int]) -> str:
    """``groups`` as the text argument of the rank-data function (``"1 83 1"``)."""
    return " ".join(map(str, groups))


def expand(conn: apsw.Connection, match: str, within: set[str] | None = None,
           table: str = FIRST) -> Expansion | None:
    """``match`` with each prefix phrase that no ``prefix=`` index covers written as an
    OR of the index's words with that prefix; None when no phrase was rewritten
    (nothing to rewrite; syntax it does not handle, such as ``NEAR``, column filters or
    ``^``; a table with its own tokenizer; a write transaction open on ``conn``). A
    prefix of more than :data:`MAX_WORDS` words, or whose words' seeks would cost more
    than FTS5's merge (:func:`_cheaper_written_out`), is left to FTS5.

    A prefix that no word has becomes the same phrase without the star (it matches
    nothing either way). Phrases side by side (FTS5's implicit AND, which binds
    tighter than ``NOT``, ``AND`` and ``OR``) become a parenthesized explicit AND when
    one of them is rewritten, as FTS5 allows parentheses only between operators. The
    rewrite matches exactly the rows ``match`` matches, with its phrases in the same
    order.

    :param within: the words of some rows (:func:`words_of`): only these are written
        out, so the rewrite matches exactly what ``match`` matches among those rows,
        and gives them the same phrase occurrences (a word absent from a row has none).
    :param table: the index table whose words are written out (the index is cut into
        tables by id block, :mod:`sessiondb.fts_tables`: the rewrite is for that
        table's rows).
    """
    if "*" not in match or conn.txn_state("main") == apsw.SQLITE_TXN_WRITE:
        return None
    sql = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'messages_fts'"
                       ).fetchone()
    if sql is None or "tokenize" in sql[0].lower():
        return None
    covered = set(index_prefixes(conn))
    tokenizer = conn.fts5_tokenizer("unicode61")
    # Each part: an operator or parenthesis (None), or a phrase as (text, rewritten).
    parts: list[tuple[str, bool] | str] = []
    groups: list[int] = []
    words = 0
    for m in _PART.finditer(match):
        space, quoted, qstar, bare, bstar, paren, other = m.groups()
        if other is not None or bare == "NEAR" or (bare in _OPERATORS and bstar):
            return None  # not handled, or not FTS5 ("OR*"): FTS5 says what it is
        if space is not None:
            continue
        if paren is not None or bare in _OPERATORS:
            parts.append(m.group())
            continue
        groups.append(1)
        text = quoted[1:-1].replace('""', '"') if quoted is not None else bare
        tokens = [t[2] for t in tokenizer(text.encode("utf-8"), _FLAGS, None)
                  ] if qstar or bstar else []
        found = None
        if tokens and len(tokens[-1]) not in covered and not _surely_merged(
                conn, tokens[-1], table):
            listed = _kept(conn, ("words", tokens[-1], table), prefix_words)
            if listed is not None and _cheaper_written_out(listed, _share(conn, table)):
                found = [w for w in listed.words if within is None or w in within]
        if found is None:
            parts.append((m.group(), False))
        elif not found:
            parts.append((_phrase(tokens), True))  # no word has the prefix
        else:
            parts.append(("(" + " OR ".join(_phrase(tokens[:-1] + [w]) for w in found)
                          + ")", True))
            groups[-1] = len(found)
            words += len(found)
    if not any(isinstance(part, tuple) and part[1] for part in parts):
        return None
    out: list[str] = []
    run: list[tuple[str, bool]] = []
    for part in [*parts, ""]:
        if isinstance(part, tuple):
            run.append(part)
            continue
        if len(run) > 1 and any(rewritten for _, rewritten in run):
            out.append("(" + " AND ".join(text for text, _ in run) + ")")
        else:
            out += [text for text, _ in run]
        run = []
        out.append(part)
    return Expansion(" ".join(out).strip(), tuple(groups), words)


def _cheaper_written_out(listed: PrefixWords, share: float = 1.0) -> bool:
    """True when the words' seeks in the :data:`STATEMENTS` statements a search may run
    cost less than FTS5's merge of their doclists in one, the pages taken as the whole
    index would have them (the table's over its ``share`` of the index's rows: see
    :func:`_share`)."""
    written = len(listed.words) * US_PER_WORD * STATEMENTS
    return written <= (listed.pages / share * US_MERGED_PAGE
                       + len(listed.words) * US_MERGED_WORD)


def _share(conn: apsw.Connection, table: str) -> float:
    """The share of the index's rows in ``table`` (1.0 for an index of one table).

    The choice between writing a prefix out and FTS5's merge is made as over the whole
    index, as it was before the index was cut into tables by block: a table of a
    quarter of the rows has a quarter of the pages to merge, and the same words to
    seek, so its merge would look cheap; but the merged walk then reads every match of
    the table for a filter that keeps few (a two-letter prefix with a source of 1% of
    the sessions: 142 ms merged against 55 ms written out, a million messages in four
    tables, measured), where the words written out let the filter's sessions be walked
    instead."""
    listed = fts_tables.tables(conn)
    if len(listed) == 1:
        return 1.0
    rows = {t.name: fts_tables.averages(conn, t.name)[0] for t in listed}
    return max(1, rows[table]) / max(1, sum(rows.values()))


def _surely_merged(conn: apsw.Connection, prefix: str, table: str = FIRST) -> bool:
    """True when the prefix's words are certainly too many for
    :func:`_cheaper_written_out`, found from the index's b-tree alone: reading their
    words (:func:`prefix_words`) costs 60-75 ms for one letter on a million messages, as
    much as a search. The pages are counted as :func:`prefix_words` counts them, and
    the words bounded from below (see :func:`_read_extent`); the decision is the one
    the words would give whenever this says True, with the table's own pages (an index
    cut into tables: :func:`_cheaper_written_out` takes the whole index's, so a prefix
    of a few hundred words may be written out where this, on one table, would merge
    it; one of thousands (a letter) is merged or tested row by row either way, as over
    one table)."""
    pages, words = _extent(conn, prefix, table)
    return words * (US_PER_WORD * STATEMENTS - US_MERGED_WORD) > pages * US_MERGED_PAGE


def merge_cost_us(conn: apsw.Connection, match: str, table: str = FIRST) -> float:
    """Microseconds FTS5's merge of the prefixes of ``match`` that no ``prefix=`` index
    covers is estimated to take at least (leaf pages and words, see
    :func:`_surely_merged`); 0.0 when it merges nothing."""
    covered = set(index_prefixes(conn))
    cost = 0.0
    for quoted, bare in _STARRED.findall(match):
        words = _TOKEN.findall(quoted or bare)
        if words and len(words[-1]) not in covered:
            tokenizer = conn.fts5_tokenizer("unicode61")
            tokens = [t[2] for t in tokenizer((quoted or bare).encode("utf-8"), _FLAGS, None)]
            if tokens:
                pages, least = _extent(conn, tokens[-1], table)
                cost += pages * US_MERGED_PAGE + least * US_MERGED_WORD
    return cost


def _extent(conn: apsw.Connection, prefix: str, table: str = FIRST) -> tuple[int, int]:
    return _kept(conn, ("extent", prefix, table), _read_extent)


def new_search(conn: apsw.Connection) -> None:
    """Forget what :func:`_kept` kept for ``conn``: called as a search starts, so that
    what one search reads is kept for that search only (a benchmark that repeats a query
    must not find the words read by the one before)."""
    _KEPT.pop(conn, None)


def _kept(conn: apsw.Connection, key: tuple[str, str, str], read: Callable) -> Any:
    """``read(conn, key[1], key[2])``, kept for ``conn`` during a search (:func:`new_search`)
    while the database does not change (by this connection: its count of changes; by
    another: PRAGMA data_version): a search asks for a prefix's extent and words twice
    (the query, then its hits), 5-10 ms for a prefix of hundreds of words."""
    state = (conn.total_changes(), conn.execute("PRAGMA data_version").fetchone()[0])
    kept = _KEPT.get(conn)
    if kept is None or kept[0] != state:
        kept = (state, {})
        _KEPT[conn] = kept
    if key not in kept[1]:
        kept[1][key] = read(conn, key[1], key[2])
    return kept[1][key]


def _read_extent(conn: apsw.Connection, prefix: str, table: str = FIRST) -> tuple[int, int]:
    """The leaf pages the doclists of the words with ``prefix`` span in all segments,
    counted as :func:`prefix_words` counts them, and a lower bound of the words, from
    the ``%_idx`` b-tree alone.

    A page's key is a prefix of the first word on it, so two keys (of any segments)
    that are not prefixes of one another begin different words; and the pages of one
    segment all begin different words.
    """
    low = _MAIN + prefix.encode("utf-8")
    high = low + b"\xff"
    pages = most = 0
    keys: set[bytes] = set()
    for segment in _segments(conn, table):
        start, past = conn.execute(
            f"SELECT (SELECT pgno FROM {table}_idx WHERE segid = ?1 AND term <= ?2 "
            f"ORDER BY term DESC LIMIT 1), (SELECT pgno FROM {table}_idx WHERE "
            "segid = ?1 AND term >= ?3 ORDER BY term LIMIT 1)", (segment, low, high)
        ).fetchone()
        inside = conn.execute(f"SELECT term, pgno FROM {table}_idx WHERE segid = ? AND "
                              "term > ? AND term < ?", (segment, low, high)).fetchall()
        most = max(most, len(inside))
        keys.update(term for term, _ in inside)
        numbers = ([start >> 1] if start is not None else []) + [
            pgno >> 1 for _, pgno in inside]
        if numbers:
            pages += (past >> 1 if past is not None else numbers[-1] + 1) - numbers[0]
    ordered = sorted(keys)
    return pages, max(most, sum(1 for i, key in enumerate(ordered) if i + 1 == len(ordered)
                                or not ordered[i + 1].startswith(key)))


def _segments(conn: apsw.Connection, table: str = FIRST) -> Iterator[int]:
    """The ids of the index's segments, in order, each read when the one before is done
    (a seek in the ``%_idx`` b-tree each)."""
    segment = -1
    while True:
        row = conn.execute(f"SELECT segid FROM {table}_idx WHERE segid > ? "
                           "ORDER BY segid LIMIT 1", (segment,)).fetchone()
        if row is None:
            return
        segment = row[0]
        yield segment


def words_of(conn: apsw.Connection, ids: Sequence[int], budget: int) -> set[str] | None:
    """The words of these messages as the index has them (their text through the
    table's tokenizer); None when their texts hold more than ``budget`` bytes."""
    listed = json.dumps(list(ids))
    size = conn.execute("SELECT coalesce(sum(octet_length(content)), 0) FROM messages "
                        "WHERE id IN (SELECT value FROM json_each(?))", (listed,)
                        ).fetchone()[0]
    if size > budget:
        return None
    tokenizer = conn.fts5_tokenizer("unicode61")
    words: set[str] = set()
    for (text,) in conn.execute("SELECT content FROM messages WHERE id IN (SELECT value "
                                "FROM json_each(?))", (listed,)):
        if text:
            data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
            words.update(tokenizer(data, apsw.FTS5_TOKENIZE_DOCUMENT, None,
                                   include_offsets=False, include_colocated=False))
    return words


class PrefixWords(NamedTuple):
    """The index's words with a prefix, and how much a native prefix query merges."""

    words: list[str]  #: sorted
    pages: int  #: leaf pages their doclists span, in all segments


def prefix_words(conn: apsw.Connection, prefix: str, table: str = FIRST
                 ) -> PrefixWords | None:
    """The words of the index that start with ``prefix`` (a token as the tokenizer
    gives it); None when they are more than :data:`MAX_WORDS`.

    A segment's pages holding such words are the last one whose ``%_idx`` key is at
    most the prefix's key, and those whose key lies in the prefix's range: a key is a
    prefix of its page's first word, and greater than every word of the pages before.
    Their doclists end where the first page of a key past the range begins.
    """
    low = _MAIN + prefix.encode("utf-8")
    high = low + b"\xff"  # past every word with the prefix (UTF-8 never has 0xff)
    found: set[bytes] = set()
    pages = 0
    for segment in _segments(conn, table):
        rows = conn.execute(
            f"SELECT * FROM (SELECT 0, pgno FROM {table}_idx WHERE segid = ?1 AND "
            "term <= ?2 ORDER BY term DESC LIMIT 1) UNION ALL SELECT 0, pgno FROM "
            f"{table}_idx WHERE segid = ?1 AND term > ?2 AND term < ?3 UNION ALL "
            f"SELECT * FROM (SELECT 1, pgno FROM {table}_idx WHERE segid = ?1 AND "
            "term >= ?3 ORDER BY term LIMIT 1)", (segment, low, high)).fetchall()
        numbers = [pgno >> 1 for past, pgno in rows if not past]
        for number in numbers:
            row = conn.execute(f"SELECT block FROM {table}_data WHERE id = ?",
                               ((segment << _PAGE_BITS) + number,)).fetchone()
            if row is not None:
                found.update(leaf_words(row[0], low, high))
        if numbers:
            pages += (rows[-1][1] >> 1 if rows[-1][0] else numbers[-1] + 1) - numbers[0]
        if len(found) > MAX_WORDS:
            return None
    return PrefixWords(sorted(w[1:].decode("utf-8", "replace") for w in found), pages)


def leaf_words(page: bytes, low: bytes = b"", high: bytes | None = None) -> list[bytes]:
    """The words (keys, with their index byte) that start on an FTS5 leaf page, from
    ``low`` up to ``high`` (excluded; None: no bound): its footer lists their offsets;
    the first is stored whole, each next one as the bytes it shares with the one before
    and the rest. A page's words are in order, so the reading stops at the first past
    ``high`` (a page of a small segment holds hundreds of words: read whole, the
    pages of a two-letter prefix in a table of 19 segments took 5 ms, measured)."""
    if len(page) < 4:
        return []
    end = len(page)
    at = int.from_bytes(page[2:4], "big")  # the footer
    words: list[bytes] = []
    offset, last, first = 0, b"", True
    while at < end:
        delta, at = _varint(page, at)
        offset += delta
        if first:
            size, start = _varint(page, offset)
            last, first = page[start:start + size], False
        else:
            shared, start = _varint(page, offset)
            size, start = _varint(page, start)
            last = last[:shared] + page[start:start + size]
        if last >= low:
            if high is not None and last >= high:
                break
            words.append(last)
    return words


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """:func:`~sessiondb.fts_tables.varint`, the one-byte case (nearly every one on a
    leaf page) without a call."""
    byte = data[at]
    return (byte, at + 1) if byte < 0x80 else varint(data, at)


def _phrase(tokens: Sequence[str]) -> str:
    return '"' + " ".join(tokens).replace('"', '""') + '"'
