"""A search that tests recent messages one by one, for a query FTS5 could only start by
merging the doclists of thousands of words (a one-letter prefix, ``a*``).

FTS5 answers ``a*`` without a ``prefix=`` index of length 1 by merging the doclists of
every word that starts with ``a`` (2,300 words on a million messages: about 1 s) before
the first row comes out, however few rows are wanted; written out as an OR of those words
(:mod:`sessiondb.search_prefix`) it starts with a seek per word, about 0.1 s. Such a
prefix matches nearly every message, so the newest window of matches is found sooner by
reading the newest messages that pass the filters and testing each against the query:
its text through the table's tokenizer, the query's phrases found among its tokens
(about 15 microseconds a message of 1 KB). The rank data of each hit is what FTS5
would report (:func:`sessiondb.search_rank.rank_data`): the index's rows and tokens
(read once from FTS5 for the first hit), the message's tokens and each phrase's
occurrences. So the hits, their order and their snippets are those of FTS5's own
answer (:func:`sessiondb.search_hits.fetch_hits` makes the snippets of these hits with
FTS5 over a table of only their texts).

Only queries whose matching and phrase counts are certain are tested this way: phrases
joined by ``AND`` (or side by side) with ``NOT`` before single phrases, or phrases all
joined by ``OR``. FTS5 reports a phrase's occurrences in a row only when its iterator
stands on that row; in these shapes every phrase of a matching row that the row holds
does, and a phrase after ``NOT`` is absent from it. Anything else (parentheses, ``NEAR``,
column filters, a table with its own tokenizer, messages not indexed yet, a write
transaction) is left to FTS5, and so is a query whose walk would cost more than FTS5's
merge: :func:`newest_matches` gives up (returns None) when the rate of matches it sees
says so, for instance ``a* zebra`` where few messages hold ``zebra``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import apsw

from . import fts_tables
from .backend import first as _first
from .search_hits import IN_LIST
from .search_prefix import QUERY_PART
from .search_rank import rank_sql

#: A source filter of at most this many sessions reads their messages by session.
MAX_LISTED_SESSIONS = 2000
#: Ids of the first band of messages read; each next band is sized by the rate of
#: matches so far.
FIRST_BAND = 1024
#: Microseconds a message (about 1 KB) is assumed to cost to test before any was.
US_TESTED = 20.0
# FTS5 truncates a longer token (bytes) when it indexes it; such texts are left to FTS5.
_MAX_TOKEN_BYTES = 32768
_OPERATORS = ("AND", "OR", "NOT")
_DOCUMENT = apsw.FTS5_TOKENIZE_DOCUMENT


@dataclass(frozen=True)
class _Phrase:
    tokens: tuple[str, ...]
    prefix: bool
    excluded: bool  # after NOT: a matching row does not hold it


@dataclass(frozen=True)
class RowTest:
    """A query as a test of one message's tokens (see :func:`parse`)."""

    phrases: tuple[_Phrase, ...]  #: in the query's order (FTS5's phrase numbers)
    any_of: bool  #: True: phrases joined by OR; False: AND and NOT

    def counts(self, tokens: Sequence[str]) -> list[int] | None:
        """Each phrase's occurrences among ``tokens`` when they match, else None."""
        # Tokens never hold a NUL (the tokenizer splits on it): joined with NULs, the
        # tokens with a prefix are the occurrences of NUL and the prefix.
        joined = "\0" + "\0".join(tokens)
        counts = [_occurrences(p, tokens, joined) for p in self.phrases]
        if self.any_of:
            return counts if any(counts) else None
        for phrase, count in zip(self.phrases, counts):
            if (count > 0) == phrase.excluded:
                return None
        return counts


def parse(conn: apsw.Connection, match: str) -> RowTest | None:
    """``match`` as a :class:`RowTest`; None when its shape is not one this module
    tests (module docstring), or the table has a tokenizer of its own."""
    sql = _first(conn, "SELECT sql FROM sqlite_schema WHERE name = 'messages_fts'", ())
    if sql is None or "tokenize" in sql.lower():
        return None
    tokenizer = conn.fts5_tokenizer("unicode61")
    items: list[tuple[str, bool] | str] = []  # phrases (text, star) and operators
    for m in QUERY_PART.finditer(match):
        space, quoted, qstar, bare, bstar, paren, other = m.groups()
        if space is not None:
            continue
        if paren is not None or other is not None or bare == "NEAR":
            return None
        if bare in _OPERATORS:
            if bstar:
                return None  # not FTS5 ("OR*"): FTS5 says what it is
            items.append(bare)
            continue
        if items and not isinstance(items[-1], str):
            items.append("")  # side by side: FTS5's implicit AND
        text = quoted[1:-1].replace('""', '"') if quoted is not None else bare
        items.append((text, bool(qstar or bstar)))
    if not items or len(items) % 2 == 0 or any(
            isinstance(item, str) for item in items[::2]):
        return None  # not valid FTS5: FTS5 says why
    operators = items[1::2]
    if any(op == "OR" for op in operators):
        if any(op != "OR" for op in operators):
            return None
        excluded = [False] * len(items[::2])
    else:
        # The right side of NOT must be one phrase: "a NOT b c" is "a NOT (b c)".
        after = operators[1:] + ["AND"]
        if any(op == "NOT" and nxt == "" for op, nxt in zip(operators, after)):
            return None
        excluded = [False] + [op == "NOT" for op in operators]
    phrases = []
    for (text, star), out in zip(items[::2], excluded):
        flags = apsw.FTS5_TOKENIZE_QUERY | (apsw.FTS5_TOKENIZE_PREFIX if star else 0)
        tokens = tuple(t[2] for t in tokenizer(text.encode("utf-8"), flags, None))
        if not tokens:
            return None
        phrases.append(_Phrase(tokens, star, out))
    return RowTest(tuple(phrases), any(op == "OR" for op in operators))


def _occurrences(phrase: _Phrase, tokens: Sequence[str], joined: str) -> int:
    words, last = phrase.tokens, len(phrase.tokens) - 1
    if last == 0:
        if phrase.prefix:
            return joined.count("\0" + words[0])
        return tokens.count(words[0])
    if ("\0" + words[0]) not in joined:
        return 0
    count = 0
    for i in range(len(tokens) - last):
        if tokens[i] == words[0] and all(tokens[i + k] == words[k] for k in range(1, last)) \
                and (tokens[i + last].startswith(words[last]) if phrase.prefix
                     else tokens[i + last] == words[last]):
            count += 1
    return count


class _Unsure(Exception):
    """A message this module cannot test as FTS5 would."""


def newest_matches(conn: apsw.Connection, test: RowTest,
                   band: Callable[[int, int], Iterable[tuple[int, Any]]], lo: int, hi: int,
                   need: int, budget_us: float, tally: list[int] | None = None,
                   share: float = 1.0) -> list[tuple[int, str]] | None:
    """``(id, rank data)`` of the newest ``need`` matches (all if negative) among the
    messages ``band(low, high)`` yields (``(id, content)`` of those passing the
    filters with ids in ``low..high``, newest first), newest first; None when the walk
    is estimated to cost more than ``budget_us`` (then nothing is lost but the time
    spent), when messages in ``lo..hi`` are not indexed yet, or when a message is one
    FTS5 might read otherwise (a token longer than FTS5 keeps, a content neither text
    nor bytes).

    The ids are read in bands newest first: :data:`FIRST_BAND` ids, then as many as
    the rate of matches so far says the rest needs (a quarter more, at most 16 times
    the band before).

    :param tally: if given, the number of messages tested is appended to it (when the
        matches are returned).
    :param share: the share of the ids that ``band`` is expected to yield (the walk
        does not start when the messages of its first band are estimated to cost more
        than ``budget_us``).
    """
    if conn.txn_state("main") == apsw.SQLITE_TXN_WRITE or _pending(conn, lo, hi):
        return None
    tokenizer = conn.fts5_tokenizer("unicode61")
    found: list[tuple[int, str]] = []
    top, size, tested, covered = hi, FIRST_BAND, 0, 0
    began = time.perf_counter()
    totals: str | None = None
    try:
        while top >= lo and (need < 0 or len(found) < need):
            if covered:
                spent = (time.perf_counter() - began) * 1e6
                if need < 0:
                    left = (top - lo + 1) * tested / covered
                else:
                    left = (need - len(found)) * tested / max(len(found), 0.5)
                if spent + left * spent / max(tested, 1) > budget_us:
                    return None
                if need >= 0 and found:
                    size = int(min(max(FIRST_BAND, (need - len(found)) * covered
                                       / len(found) * 1.25), size * 16))
                else:
                    size *= 16
            elif budget_us < FIRST_BAND * share * US_TESTED:
                return None
            bottom = max(lo, top - size + 1)
            for rowid, content in band(bottom, top):
                tested += 1
                tokens = _tokens(tokenizer, content)
                counts = test.counts(tokens)
                if counts is None:
                    continue
                if totals is None:
                    totals = _index_totals(conn, rowid, tokens)
                found.append((rowid, f"{totals} {len(tokens)} " + " ".join(map(str, counts))))
                if len(found) == need:
                    break
            covered += top - bottom + 1
            top = bottom - 1
    except _Unsure:
        return None
    if tally is not None:
        tally.append(tested)
    return found


def _tokens(tokenizer: Any, content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        data = content.encode("utf-8")
    elif isinstance(content, bytes):
        data = content
    else:
        raise _Unsure  # a number: SQLite's text of it is not Python's
    tokens = tokenizer(data, _DOCUMENT, None, include_offsets=False,
                       include_colocated=False)
    if len(data) > _MAX_TOKEN_BYTES and any(
            len(t.encode("utf-8")) > _MAX_TOKEN_BYTES for t in tokens):
        raise _Unsure
    return tokens


def _index_totals(conn: apsw.Connection, rowid: int, tokens: list[str]) -> str:
    """The index's rows and tokens as FTS5's rank data gives them (for any row), read
    with a query of one word of this message."""
    if not tokens:
        raise _Unsure
    table = fts_tables.table_for(conn, rowid).name
    data = _first(conn, fts_tables.on(table, f"SELECT {rank_sql(None)} FROM messages_fts "
                                             "WHERE messages_fts MATCH ? AND rowid = ?"),
                  ('"' + tokens[0] + '"', rowid))
    fields = (data or "").split()
    if len(fields) < 3 or int(fields[2]) != len(tokens):
        raise _Unsure  # not tokenized as FTS5 did
    return f"{fields[0]} {fields[1]}"


def _pending(conn: apsw.Connection, lo: int, hi: int) -> bool:
    """True when messages with ids in ``lo..hi`` may be waiting to be indexed."""
    try:
        return _first(conn, "SELECT 1 FROM sessiondb_fts_pending WHERE lo <= ? AND hi >= ? "
                            "LIMIT 1", (hi, lo)) is not None
    except apsw.SQLError:  # a store without the table: every message is indexed
        return False


def band_reader(conn: apsw.Connection, filters: Any
                ) -> Callable[[int, int], Iterable[tuple[int, Any]]]:
    """``band(low, high)``: ``(id, content)`` of the messages passing ``filters`` with
    ids in ``low..high``, newest first, read lazily. A source filter of at most
    :data:`MAX_LISTED_SESSIONS` sessions reads their messages from the ``(session_id,
    id)`` index (a rare source: a seek per session, not a read of every message);
    with more, each message is joined with its session."""
    cond: list[str] = []
    args: list[Any] = []
    joins = ""
    if filters.session_id is not None:
        cond.append("m.session_id = ?")
        args.append(filters.session_id)
    if filters.sources or filters.exclude_sources:
        where, values = session_conditions(filters)
        ids = [r[0] for r in conn.execute(f"SELECT s.id FROM sessions s WHERE {where} "
                                          "LIMIT ?", (*values, MAX_LISTED_SESSIONS + 1))]
        if filters.session_id is not None or len(ids) > MAX_LISTED_SESSIONS:
            joins = " CROSS JOIN sessions s ON s.id = m.session_id"
            cond.append(where)
            args += values
        else:
            cond.append(f"m.id IN (SELECT x.id FROM messages x WHERE x.session_id IN "
                        f"{IN_LIST} AND x.id BETWEEN ?1 AND ?2)")
            args.append(json.dumps(ids))
    if filters.roles:
        sql, values = filters.inside("m.role", filters.roles)
        cond.append(sql)
        args += values
    sql = (f"SELECT m.id, m.content FROM messages m{joins} WHERE m.id BETWEEN ?1 AND ?2 "
           f"AND {' AND '.join(cond) or '1'} ORDER BY m.id DESC")

    def band(low: int, high: int) -> Iterable[tuple[int, Any]]:
        cursor = conn.execute(sql, (low, high, *args))
        try:
            yield from cursor
        finally:
            cursor.close()

    return band


def session_conditions(filters: Any) -> tuple[str, list[Any]]:
    """The filters on sessions (``session_id``, ``sources``, ``exclude_sources`` of a
    :class:`sessiondb.search.Filters`) as SQL over ``sessions s``, and its arguments."""
    cond = ["1"]
    args: list[Any] = []
    if filters.session_id is not None:
        cond.append("s.id = ?")
        args.append(filters.session_id)
    for items, negate in ((filters.sources, False), (filters.exclude_sources, True)):
        if items:
            sql, values = filters.inside("s.source", items, negate)
            cond.append(sql)
            args += values
    return " AND ".join(cond), args
