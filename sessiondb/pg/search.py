"""Full-text search on PostgreSQL, in the order of the SQLite search.

``WHERE content_tsv @@ q ORDER BY rank LIMIT 20`` ranks every match before it returns
the first twenty: for a word found in most of a million messages that is a million
``ts_rank`` calls. Search here reads a bounded number of matches instead, and the order
of the results is the one :mod:`sessiondb.search` documents for SQLite.

**The order** (the same as SQLite's). The matches that pass the filters are taken in
*windows* of :data:`WINDOW` (1,000), newest first: the first window holds the 1,000 most
recent matching messages (highest ids), the second the 1,000 before them, and so on.
Within a window the best match comes first, ties newest first. ``offset`` counts
through that sequence, so consecutive pages never repeat or skip a hit. What differs
from SQLite is the score: ``ts_rank`` with normalization 1 (the number of times the
query's words occur in the message, divided by one plus the logarithm of the message's
length, https://www.postgresql.org/docs/current/textsearch-controls.html
#TEXTSEARCH-RANKING), not bm25, which weighs a rare word above a common one. A query of
one word therefore orders its window much as SQLite does (more occurrences, shorter
message first); a query of several words may order its window differently.

**Finding the matches.** The newest matches are read in *slices* of ids from the top:
the newest :data:`FIRST_SLICE` ids first, then a slice below it sized by the share of
matches the slices so far held (with a margin, at least twice and at most
:data:`MAX_GROWTH` times the ids covered so far), until the windows asked for are full
or the ids run out. In each slice PostgreSQL chooses between walking the slice's ids
through the primary key and testing each message (a word in most messages: the first
slice is enough) and the GIN index intersected with the slice (a rare word: a few
slices, each reading its short posting list). So a search reads about as many messages
as its windows need, whatever the number of matches. Filters are part of each slice's
statement: ``session_id`` through the ``(session_id, id)`` index, sources through a
join with ``sessions``. Statements are never prepared (``prepare=False``): a generic
plan cannot see how common the words are, and would pick one way for all queries.

**The query language**, built into a ``tsquery`` here, never by ``to_tsquery`` on the
user's text (which raises syntax errors), following
:func:`sessiondb.text.sanitize_fts_query`: words are ANDed; ``"a quoted phrase"`` is a
phrase (``<->``); ``abc*`` is a prefix (``:*``); uppercase ``OR`` and ``NOT`` are
operators where they stand between two terms (elsewhere they are dropped); parentheses,
``:``, ``^`` and other punctuation have no syntax meaning. Each word or phrase is cut
into lexemes by the same parser that built ``content_tsv`` (``phraseto_tsquery`` of the
``simple`` configuration), so anything is a valid query and a query finds the text it
was copied from. Differences from SQLite's FTS5 (``unicode61``): ``-word`` after another
term excludes the word (SQLite searches it); the parser keeps some tokens whole
(``foo.py``, ``user@example.com``, ``v1.2``: ``foo`` does not find ``foo.py``), and
finds a hyphenated word by itself and its parts (``chat-send`` finds ``chat-send``, not
``chat send``); accents are not removed (``cafe`` does not find ``café``). Only the
first 262,144 characters of a message are indexed (see :mod:`sessiondb.pg.schema`).

**Snippets.** ``ts_headline`` over the first :data:`HEAD_CHARS` characters (it parses
all the text it is given: a 10 MB message would cost seconds), one fragment of up to 40
words around the best match, matches wrapped in ``>>> <<<``, ``...`` where text was cut;
when nothing matches in that head (a match further in), over the indexed part.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import InvalidArgument
from ..records import context_item, search_hit
from ..search import Filters
from ..text import MAX_QUERY_LENGTH, NO_LIMIT
from .conn import PgConn
from .schema import TSV_CHARS

__all__ = ["search_messages", "build_query", "WINDOW"]

#: Matches ranked together: the newest WINDOW, then the WINDOW before them, ...
WINDOW = 1000
#: Ids of the first slice read (a word in most messages finds its window there).
FIRST_SLICE = 2048
#: A slice covers at most this many times the ids covered before it.
MAX_GROWTH = 16
#: Margin on the ids a slice is estimated to need.
SLICE_MARGIN = 1.25
#: Characters of a message given to ts_headline for its snippet.
HEAD_CHARS = 8192
#: Characters of each context message.
CONTEXT_CHARS = 200
_HEADLINE = ("StartSel=>>>, StopSel=<<<, MaxWords=40, MinWords=20, ShortWord=0, "
             "MaxFragments=1, FragmentDelimiter=...")
_OPERATORS = {"AND", "OR", "NOT"}
_WORD = re.compile(r"\w")
_LEXEME = re.compile(r"'((?:[^']|'')*)'")

# The lexemes of each term, as tsquery text; '' for a term without any (punctuation).
# to_tsvector first, because phraseto_tsquery of such text raises a NOTICE.
_TERMS_SQL = (
    "SELECT coalesce(array_agg(CASE WHEN to_tsvector('simple', t) <> ''::tsvector "
    "THEN phraseto_tsquery('simple', t)::text ELSE '' END ORDER BY n), '{}') "
    "FROM unnest(%s::text[]) WITH ORDINALITY AS u(t, n)"
)
_HITS_SQL = f"""
SELECT m.id, m.session_id, m.role, x.hl, m.timestamp, m.tool_name, s.source, s.model,
       s.started_at,
       x.at > 1 AND left(h.head, x.at - 1) ~ '[[:alnum:]]' AS cut_before,
       x.at > 0 AND (substr(h.head, x.at + length(x.plain)) ~ '[[:alnum:]]'
                     OR octet_length(m.content) > octet_length(h.head)) AS cut_after,
       octet_length(m.content) > octet_length(h.head) AS long,
       prev.role, prev.c, substr(m.content, 1, {CONTEXT_CHARS}), next.role, next.c
FROM unnest(%(ids)s::bigint[]) WITH ORDINALITY AS p(id, n)
JOIN messages m ON m.id = p.id
JOIN sessions s ON s.id = m.session_id
CROSS JOIN LATERAL (SELECT substr(m.content, 1, %(head)s) AS head) h
CROSS JOIN LATERAL (SELECT hl, strpos(h.head, plain) AS at, plain FROM (
    SELECT hl, replace(replace(hl, '>>>', ''), '<<<', '') AS plain FROM (
        SELECT ts_headline('simple', h.head, %(q)s::tsquery, %(opts)s) AS hl) a) b) x
LEFT JOIN LATERAL (SELECT role, substr(content, 1, {CONTEXT_CHARS}) AS c FROM messages
    WHERE session_id = m.session_id AND id < m.id ORDER BY id DESC LIMIT 1) prev ON true
LEFT JOIN LATERAL (SELECT role, substr(content, 1, {CONTEXT_CHARS}) AS c FROM messages
    WHERE session_id = m.session_id AND id > m.id ORDER BY id LIMIT 1) next ON true
ORDER BY p.n
"""


def search_messages(conn: PgConn, query: str, filters: Filters, limit: int,
                    offset: int) -> list[dict[str, Any]]:
    """The hits of :meth:`sessiondb.SessionDB.search_messages` on PostgreSQL, in the
    window order (see the module docstring), read in the caller's transaction.

    :param conn: a connection in a (REPEATABLE READ) transaction whose ``search_path``
        is the store's schema.
    :param query: the user's text, as given (at most 1,000 characters).
    :param limit: hits wanted; :data:`~sessiondb.text.NO_LIMIT` for all.
    :param offset: hits of the order to skip (>= 0).
    :returns: dicts with ``id``, ``session_id``, ``role``, ``snippet``, ``timestamp``,
        ``tool_name``, ``source``, ``model``, ``session_started`` and ``context``.
    :raises InvalidArgument: the query is longer than 1,000 characters.
    """
    terms = parse_query(query)
    if limit == 0 or not terms or (filters.sources is not None and not filters.sources):
        return []
    tsquery = build_query(conn, terms)
    if not tsquery:
        return []
    ids = ranked_ids(conn, tsquery, filters, limit, offset)
    return fetch_hits(conn, tsquery, ids) if ids else []


# -- the query -----------------------------------------------------------------------

def parse_query(query: str) -> list[tuple[str, bool, bool] | str]:
    """The pieces of a user's query, as :func:`~sessiondb.text.sanitize_fts_query` cuts
    them: an operator (``"AND"``, ``"OR"``, ``"NOT"``), or a term ``(text, prefix,
    minus)``: a quoted phrase's text or a word, ``prefix`` for a trailing ``*``,
    ``minus`` for a leading ``-``.

    :raises InvalidArgument: longer than :data:`~sessiondb.text.MAX_QUERY_LENGTH`.
    """
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidArgument(f"search query is {len(query)} characters; the limit is "
                              f"{MAX_QUERY_LENGTH}: search for a few distinctive words")
    pieces: list[tuple[str, bool, bool] | str] = []
    # PostgreSQL cannot take a NUL in a text parameter.
    parts = query.replace("\x00", " ").split('"')
    # Even indexes are outside quotes, odd ones inside; the text after an unmatched
    # final quote is unquoted.
    if len(parts) % 2 == 0:
        parts[-2] = parts[-2] + " " + parts[-1]
        parts.pop()
    for i, part in enumerate(parts):
        if i % 2:
            if _WORD.search(part):
                pieces.append((part, False, False))
            continue
        for chunk in part.split():
            if chunk in _OPERATORS:
                pieces.append(chunk)
                continue
            word = chunk.strip("*")
            minus = word.startswith("-")
            word = word.lstrip("-")
            if _WORD.search(word):
                pieces.append((word, chunk.endswith("*"), minus))
    return pieces


def build_query(conn: PgConn, pieces: list[tuple[str, bool, bool] | str]) -> str:
    """The ``tsquery`` (as text) of :func:`parse_query`'s pieces; ``""`` when nothing
    searchable is left.

    Each term is cut into lexemes by the server (one statement for all of them); terms
    without any are dropped; then, as in :func:`~sessiondb.text.sanitize_fts_query`,
    leading, trailing and repeated operators. An OR separates groups of ANDed terms;
    ``NOT`` and a leading ``-`` negate a term that is not the first of its group.
    """
    texts = [p[0] for p in pieces if not isinstance(p, str)]
    lexed = iter(conn.raw.execute(_TERMS_SQL, [texts], prepare=False).fetchone()[0])
    kept: list[tuple[str, bool] | str] = []  # operators and (tsquery, minus)
    for piece in pieces:
        if isinstance(piece, str):
            if kept and not isinstance(kept[-1], str):
                kept.append(piece)
            continue
        text, prefix, minus = piece
        lexemes = next(lexed)
        if lexemes:
            kept.append((_prefixed(lexemes, text) if prefix else lexemes, minus))
    while kept and isinstance(kept[-1], str):
        kept.pop()
    groups: list[list[str]] = [[]]
    negate = False
    for item in kept:
        if item == "OR":
            groups.append([])
        elif item == "NOT":
            negate = True
        elif isinstance(item, tuple):
            lexemes, minus = item
            first = not groups[-1]
            groups[-1].append(("!" if (negate or minus) and not first else "")
                              + f"({lexemes})")
            negate = False
    return " | ".join(f"({' & '.join(g)})" for g in groups if g) if kept else ""


def _prefixed(lexemes: str, word: str) -> str:
    """A term's tsquery with its last lexeme a prefix (``:*``), and any lexeme the word
    ends with (the whole of a hyphenated word, ``chat-se`` of ``chat-se*``)."""
    found = list(_LEXEME.finditer(lexemes))
    tail = word.lower().rstrip()
    out, at = [], 0
    for k, m in enumerate(found):
        lexeme = m.group(1).replace("''", "'")
        out.append(lexemes[at:m.end()])
        if k == len(found) - 1 or tail.endswith(lexeme):
            out.append(":*")
        at = m.end()
    out.append(lexemes[at:])
    return "".join(out)


# -- the order -----------------------------------------------------------------------

def ranked_ids(conn: PgConn, tsquery: str, filters: Filters, limit: int,
               offset: int) -> list[int]:
    """The message ids of one page of hits, in the window order (module docstring).

    :param tsquery: a valid tsquery, as text.
    :param limit: ids wanted; :data:`~sessiondb.text.NO_LIMIT` for all.
    """
    if limit == 0 or (filters.sources is not None and not filters.sources):
        return []
    unbounded = limit >= NO_LIMIT - offset
    first = offset // WINDOW
    # Whole windows: the last one of the page decides the rank of its first hits.
    need = -1 if unbounded else -(-(offset + limit) // WINDOW) * WINDOW
    found = newest_matches(conn, tsquery, filters, need)
    ordered: list[int] = []
    for start in range(first * WINDOW, len(found), WINDOW):
        window = found[start:start + WINDOW]
        ordered += [rowid for rowid, _ in sorted(window, key=lambda r: (-r[1], -r[0]))]
    skip = offset - first * WINDOW
    return ordered[skip:] if unbounded else ordered[skip:skip + limit]


def newest_matches(conn: PgConn, tsquery: str, filters: Filters, need: int
                   ) -> list[tuple[int, float]]:
    """``(id, rank)`` of the newest ``need`` matches passing ``filters`` (all of them if
    ``need`` is negative), newest first, read in slices of ids (module docstring)."""
    where = ["m.content_tsv @@ %(q)s::tsquery", "m.id BETWEEN %(lo)s AND %(hi)s"]
    args: dict[str, Any] = {"q": tsquery}
    join = ""
    if filters.session_id is not None:
        where.append("m.session_id = %(session)s")
        args["session"] = filters.session_id
        bounds = "FROM messages WHERE session_id = %(session)s"
    else:
        bounds = "FROM messages"
    if filters.roles:
        where.append("m.role = ANY(%(roles)s::text[])")
        args["roles"] = list(filters.roles)
    if filters.sources:
        where.append("s.source = ANY(%(sources)s::text[])")
        args["sources"] = list(filters.sources)
    if filters.exclude_sources:
        where.append("s.source <> ALL(%(exclude)s::text[])")
        args["exclude"] = list(filters.exclude_sources)
    if filters.sources or filters.exclude_sources:
        join = " JOIN sessions s ON s.id = m.session_id"
    lowest, top = conn.raw.execute(f"SELECT min(id), max(id) {bounds}", args,
                                   prepare=False).fetchone()
    if top is None:
        return []
    sql = (f"SELECT m.id, ts_rank(m.content_tsv, %(q)s::tsquery, 1) FROM messages m{join}"
           f" WHERE {' AND '.join(where)}")
    found: list[tuple[int, float]] = []
    size = top - lowest + 1 if need < 0 else FIRST_SLICE
    hi = top
    while hi >= lowest:
        lo = max(lowest, hi - size + 1)
        args["lo"], args["hi"] = lo, hi
        rows = conn.raw.execute(sql, args, prepare=False).fetchall()
        found += sorted(rows, reverse=True)
        if 0 <= need <= len(found):
            return found[:need]
        covered = top - lo + 1
        hi = lo - 1
        if found:  # the ids the rest needs at the density seen so far
            wanted = (need - len(found)) * covered / len(found) * SLICE_MARGIN
        else:
            wanted = covered * MAX_GROWTH
        size = int(min(max(wanted, covered * 2), covered * MAX_GROWTH))
    return found


# -- the hits ------------------------------------------------------------------------

def fetch_hits(conn: PgConn, tsquery: str, ids: list[int]) -> list[dict[str, Any]]:
    """The hits of ``ids``, in that order, with their snippets and context."""
    args = {"ids": ids, "q": tsquery, "opts": _HEADLINE, "head": HEAD_CHARS}
    rows = conn.raw.execute(_HITS_SQL, args, prepare=False).fetchall()
    hits = []
    for row in rows:
        (rowid, session_id, role, snippet, timestamp, tool_name, source, model, started,
         cut_before, cut_after, long, prev_role, prev, content, next_role, after) = row
        if long and ">>>" not in snippet:  # a match further in than the head
            snippet, cut_before, cut_after = _long_snippet(conn, tsquery, rowid)
        hit = search_hit((rowid, session_id, role,
                          ("..." if cut_before else "") + snippet
                          + ("..." if cut_after else ""),
                          timestamp, tool_name, source, model, started))
        around = [(prev_role, prev)] if prev_role is not None else []
        around.append((role, content))
        if next_role is not None:
            around.append((next_role, after))
        hit["context"] = [context_item(item) for item in around]
        hits.append(hit)
    return hits


def _long_snippet(conn: PgConn, tsquery: str, rowid: int) -> tuple[str, bool, bool]:
    """The snippet of a message whose first :data:`HEAD_CHARS` characters hold no
    match, from its indexed part."""
    sql = _HITS_SQL.replace("unnest(%(ids)s::bigint[])", "unnest(ARRAY[%(id)s::bigint])")
    row = conn.raw.execute(sql, {"id": rowid, "q": tsquery, "opts": _HEADLINE,
                                 "head": TSV_CHARS}, prepare=False).fetchone()
    return row[3], row[9], row[10]
