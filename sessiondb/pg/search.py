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

**Finding the matches.** The search column is indexed in *bands* of ids, a partial GIN
index each (:mod:`sessiondb.pg.bands`): the newest ids in bands of 16,384, older ones
merged eight to one, and an open tail above the newest id; a band's index holds only
its own postings. The newest matches are read in *slices* of ids from the top, each
slice a statement that stops at the matches still needed (``ORDER BY id DESC LIMIT``).
The first slice (:data:`FIRST_SLICE` ids) is *walked*: its messages read newest first
through the primary key (or the ``(session_id, id)`` index for ``session_id``) and each
tested against the query; a word in most messages finds its window there. After it,
each slice is sized by the share of matches seen so far (with a margin; at most
:data:`MAX_GROWTH` times the ids read when none was seen) and read the way estimated
cheapest: the walk again (its pace measured on the first slice); the bands holding the
slice, one branch of a ``UNION ALL`` per band with the band's predicate written out (so
the planner uses its partial index; a band read in part also gets the slice's ids,
which the planner may intersect with a bitmap of the primary key); the bands of all
the ids left; or, with a source filter of at most
:data:`~sessiondb.pg.slices.MAX_WALKED_SESSIONS`
sessions, each such session's messages in the slice from the ``(session_id, id)``
index (a rare source is never looked for among all messages); or, for a query whose
every group holds a phrase of two words or more, the messages holding the phrase's
adjacent word pairs, from the index of pairs (:mod:`sessiondb.pg.pairs`), each one
tested against the query (a phrase of common words rarely adjacent reads its few
matches, not every message holding its words). A band's index reads
the whole posting list of every lexeme it is given, whatever part of the band is
wanted: its cost is estimated from the column's statistics
(``pg_stats.most_common_elems``) per id of the bands touched, and corrected by what a
slice of them took; the index of pairs' from the statistics of its expression (a key
missing from them is rarer than the rarest there). Ids that no valid index holds (a
band being rebuilt after an interrupted build, or dropped by hand) are read through
the primary key. All ways find the same rows; the choice changes the time, never the
result. A group of more
than :data:`INDEX_TERMS` ANDed terms (a pasted paragraph) gives the index only its
longest terms and checks the rest on the rows. Statements are never prepared
(``prepare=False``: a generic plan could neither see how common the words are nor
prove a band's partial index usable), and JIT compilation is off for the search's
statements (it costs more than the statements; settings are restored before
returning). A search that finds the newest id near the tail starts the roll of the
bands in the background (:func:`sessiondb.pg.bands.start_roll`).

**Limits.** The GIN index of the words knows no positions: until the index of pairs
is built (a store migrated from schema version 2, see :mod:`sessiondb.pg.pairs`), a
phrase of words that are each common but rarely adjacent is checked on every message
holding all its words in the ids read (for a phrase with fewer than :data:`WINDOW`
matches, all of them: every band); with it, a phrase whose pairs are common but
whose whole is rare (three words, each pair frequent) still is. A source or role
filter that keeps a few percent of the matches of a common word reads the messages
around them. ``limit=None`` ranks every match, window by window.

Measured on a million messages (``python -m sessiondb.bench.pg_scale_search URL
--rounds 60``, 2026-12-06, 2 CPUs shared with other work at load average 3,
``shared_buffers`` 3 GB, everything cached;
``benchmarks/results/2026-12-06-pg-search-1m-bands.txt``): a page
costs 4-8 ms of statements and snippets, plus what it reads. A word in 10% of the
messages 10 ms at p50 (17 ms with one index over all messages), ``a NOT b`` of two words
in nearly every message 11 ms (45 ms: a walk of 36,000 ids), an OR of two rare words 12
ms, a role filter on a medium word 18 ms; every shape of the benchmark 26 ms or less at
p50 and 50 ms or less at p99 but one: a phrase of two words each in 10% of the messages,
adjacent in 74, checked all 11,300 messages holding both (27 ms for that statement;
40 ms p50, 65 ms p99). With the index of pairs it reads the messages of its pair's key:
11.5 ms p50, 16.8 ms p99 (``benchmarks/results/2026-12-06-pg-search-1m-pairs.txt``).

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
import time
from typing import Any, NamedTuple


from ..records import context_item, search_hit
from ..search import Filters
from ..text import NO_LIMIT, query_parts
from . import bands, pairs, slices
from .conn import PgConn
from .schema import TSV_CHARS

__all__ = ["search_messages", "build_query", "WINDOW"]

#: Matches ranked together: the newest WINDOW, then the WINDOW before them, ...
WINDOW = 1000
#: Ids of the first slice read (a word in most messages finds its window there).
FIRST_SLICE = 1024
#: A slice covers at most this many times the ids covered before it.
MAX_GROWTH = 16
#: Margin on the ids a slice is estimated to need.
SLICE_MARGIN = 1.25
#: Characters of a message given to ts_headline for its snippet.
HEAD_CHARS = 8192
#: Characters of each context message.
CONTEXT_CHARS = 200
#: Ids of the bands read by a slice, at least, for its time to correct the estimate of
#: the GIN index's cost.
MIN_MEASURED_IDS = 32_768
#: Terms of a group of ANDed terms given to the GIN index (the rest are checked on its
#: rows).
INDEX_TERMS = 4
#: Bytes of work_mem the search's statements get at least (exact bitmaps, see
#: :func:`search_messages`).
WORK_MEM = 64 * 1024 * 1024
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
# The names of the valid GIN indexes of the search column (see sessiondb.pg.bands).
_INDEXES_SQL = ("SELECT coalesce(array_agg(c.relname::text), '{}') "
                "FROM pg_catalog.pg_index i "
                "JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = 'messages'::regclass AND i.indisvalid AND "
                "(c.relname = 'idx_messages_fts' OR c.relname LIKE 'messages\\_fts\\_%%')")
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
    # No JIT compilation: a slice that reads many rows is costed high enough to be
    # compiled, which takes longer (10-20 ms) than the slice itself. work_mem large
    # enough for an exact bitmap of the GIN index's matches: with the default 4 MB the
    # bitmap of a word in 10% of a million messages turns lossy, and every message of
    # a lossy page is read and tested again (a third of the heap pages, 2-4x the time).
    jit, mem = conn.raw.execute(
        "SELECT current_setting('jit'), current_setting('work_mem'), "
        "set_config('jit', 'off', true), set_config('work_mem', "
        f"greatest(pg_size_bytes(current_setting('work_mem')), {WORK_MEM})::text || 'B', "
        "true)", prepare=False).fetchone()[:2]
    try:
        built = build_query(conn, terms)
        if built is None:
            return []
        ids = ranked_ids(conn, built, filters, limit, offset)
        return fetch_hits(conn, built.text, ids) if ids else []
    finally:
        # After an error the transaction is over: nothing to restore.
        if slices.usable(conn):
            conn.raw.execute("SELECT set_config('jit', %s, true), set_config('work_mem', "
                             "%s, true)", [jit, mem], prepare=False)


# -- the query -----------------------------------------------------------------------

def parse_query(query: str) -> list[tuple[str, bool, bool] | str]:
    """The pieces of a user's query, as :func:`~sessiondb.text.sanitize_fts_query` cuts
    them: an operator (``"AND"``, ``"OR"``, ``"NOT"``), or a term ``(text, prefix,
    minus)``: a quoted phrase's text or a word, ``prefix`` for a trailing ``*``,
    ``minus`` for a leading ``-``.

    :raises InvalidArgument: longer than :data:`~sessiondb.text.MAX_QUERY_LENGTH`.
    """
    pieces: list[tuple[str, bool, bool] | str] = []
    for i, part in enumerate(query_parts(query)):
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


class Query(NamedTuple):
    """A search as a ``tsquery``, and its shape (for the cost of the GIN index)."""

    text: str  #: the tsquery, as text
    #: OR-ed groups of ANDed terms: ``(negated, [(lexeme, prefix), ...], tsquery)``
    groups: list[list[tuple[bool, list[tuple[str, bool]], str]]]

    def for_index(self) -> str:
        """The query the GIN index is asked: each group's terms, or :data:`INDEX_TERMS`
        of them when it has more (phrases and long words first, prefixes last: the
        index reads the list of every lexeme it is given, and a 1,000-character query
        has hundreds); the rows it returns are then checked against the whole query."""
        if all(len(group) <= INDEX_TERMS for group in self.groups):
            return self.text
        return " | ".join("(" + " & ".join(f"({t[2]})" for t in group) + ")"
                          for group in self.indexed())

    def indexed(self) -> list[list[tuple[bool, list[tuple[str, bool]], str]]]:
        """The terms of each group given to the GIN index (see :meth:`for_index`)."""
        if all(len(group) <= INDEX_TERMS for group in self.groups):
            return self.groups
        return [sorted((t for t in group if not t[0]), key=lambda t: (
            any(prefix for _, prefix in t[1]), -len(t[2])))[:INDEX_TERMS]
            for group in self.groups]


def build_query(conn: PgConn, pieces: list[tuple[str, bool, bool] | str]) -> Query | None:
    """The ``tsquery`` of :func:`parse_query`'s pieces; None when nothing searchable is
    left.

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
    if not kept:
        return None
    groups: list[list[tuple[bool, str]]] = [[]]
    negate = False
    for item in kept:
        if item == "OR":
            groups.append([])
        elif item == "NOT":
            negate = True
        elif isinstance(item, tuple):
            term, minus = item
            groups[-1].append(((negate or minus) and bool(groups[-1]), term))
            negate = False
    text = " | ".join("(" + " & ".join(("!" if negated else "") + f"({term})"
                                       for negated, term in group) + ")"
                      for group in groups)
    return Query(text, [[(negated, [(m.group(1).replace("''", "'"),
                                     term.startswith(":*", m.end()))
                                    for m in _LEXEME.finditer(term)], term)
                         for negated, term in group] for group in groups])


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

def ranked_ids(conn: PgConn, query: Query, filters: Filters, limit: int,
               offset: int) -> list[int]:
    """The message ids of one page of hits, in the window order (module docstring).

    :param limit: ids wanted; :data:`~sessiondb.text.NO_LIMIT` for all.
    """
    if limit == 0 or (filters.sources is not None and not filters.sources):
        return []
    unbounded = limit >= NO_LIMIT - offset
    first = offset // WINDOW
    # Whole windows: the last one of the page decides the rank of its first hits.
    need = -1 if unbounded else -(-(offset + limit) // WINDOW) * WINDOW
    found = newest_matches(conn, query, filters, need)
    ordered: list[int] = []
    for start in range(first * WINDOW, len(found), WINDOW):
        window = found[start:start + WINDOW]
        ordered += [rowid for rowid, _ in sorted(window, key=lambda r: (-r[1], -r[0]))]
    skip = offset - first * WINDOW
    return ordered[skip:] if unbounded else ordered[skip:skip + limit]


def newest_matches(conn: PgConn, query: Query, filters: Filters, need: int
                   ) -> list[tuple[int, float]]:
    """``(id, rank)`` of the newest ``need`` matches passing ``filters`` (all of them if
    ``need`` is negative), newest first, read in slices of ids (module docstring)."""
    plan = slices.Plan(filters, query.text, query.for_index())
    paired = pairs.wanted(query.groups)
    asked = sorted({p for group in paired or [] for p in group})
    lowest, top, names, schema, keys = conn.raw.execute(
        f"SELECT min(id), max(id), ({_INDEXES_SQL}), current_schema()::text, "
        f"({pairs.KEYS_SQL}) {plan.bounds}", {**plan.args, "pairs": asked},
        prepare=False).fetchone()
    if filters.session_id is None and top is not None and (
            bands.wants_roll(names, top) or pairs.INDEX not in names):
        bands.start_roll(conn.raw, schema)
    if top is None:
        return []
    keyed = dict(zip(asked, keys))
    if paired is not None and pairs.INDEX in names:
        # Not while it is built (or before): the phrase is found without it.
        plan.use_pairs(pairs.query(paired, keyed))
    else:
        paired = None
    segments = bands.layout(names)
    total = top - lowest + 1
    found: list[tuple[int, float]] = []
    hi, us_per_id = top, 0.0
    gin: tuple[float, float] | None = None
    by_pairs: tuple[float, float] | None = None
    sessions: tuple[int, int] | None = None
    while hi >= lowest:
        left = need - len(found) if need >= 0 else NO_LIMIT
        rest = hi - lowest + 1
        if hi == top:
            way, size = "walk", FIRST_SLICE
        else:
            density = len(found) / (top - hi)
            # The ids the rest needs at the density seen so far; nothing seen yet:
            # MAX_GROWTH times the ids read.
            ids = min(rest, (top - hi) * MAX_GROWTH)
            if density and need >= 0:
                ids = min(rest, int(left / density * SLICE_MARGIN) + 1)
            if gin is None:
                gin = slices.gin_estimate(conn, schema, query.indexed(), total)
            costs = {("walk", ids): us_per_id * ids,
                     ("gin", ids): slices.gin_cost(gin, segments, lowest, top,
                                                   hi - ids + 1, hi, us_per_id, total),
                     ("gin-all", -1): slices.gin_cost(gin, segments, lowest, top,
                                                      lowest, hi, us_per_id, total)}
            if paired is not None:
                if by_pairs is None:
                    by_pairs = slices.pairs_estimate(
                        conn, schema, [[(p, keyed[p]) for p in group] for group in paired],
                        total)
                pair_us, pair_rows = by_pairs
                costs[("pairs", ids)] = (pair_us + slices.US_RANGE_ID * ids
                                         + slices.US_GIN_MATCH * pair_rows * ids / total)
                costs[("pairs-all", -1)] = (pair_us + slices.US_GIN_MATCH * pair_rows
                                            * rest / total)
            if plan.by_session:
                if sessions is None:
                    sessions = plan.sessions(conn)
                count, messages = sessions
                if count <= slices.MAX_WALKED_SESSIONS:
                    costs[("sessions", ids)] = (count * slices.US_SESSION
                                                + slices.US_ROW * messages * ids / total)
            way, size = _cheapest(costs)
            size = rest if size < 0 else size
        lo = max(lowest, hi - size + 1)
        began = time.perf_counter()
        parts = slices.parts(segments, lowest, top, lo, hi)
        rows = plan.slice(conn, way, lo, hi, left, parts)
        if way == "walk":
            # The walk stops at the LIMIT: it read the ids down to its last row.
            read = hi - (rows[-1][0] if len(rows) == left else lo) + 1
            us = (time.perf_counter() - began) * 1e6 / read
            us_per_id = min(max(us, slices.US_MIN_PER_ID), slices.US_MAX_PER_ID)
        elif way.startswith("gin") and gin is not None:
            # What this slice of the index took is what the next one will take, per
            # id of the bands it read.
            # Only from bands of some size: a small one's time is mostly the
            # statement's fixed cost, which would look like a dear index.
            spent = ((time.perf_counter() - began) * 1e6
                     - slices.US_GIN_MATCH * len(rows))
            banded = sum(slices.band_ids(seg, lowest, top) for seg, _, _, _ in parts
                         if seg.index is not None)
            if banded >= MIN_MEASURED_IDS:
                gin = (max(gin[0], spent * total / banded), gin[1])
        found += rows
        if 0 <= need <= len(found):
            return found
        hi = lo - 1
    return found


def _cheapest(costs: dict[tuple[str, int], float]) -> tuple[str, int]:
    """The way (and slice size) of least estimated cost."""
    return min(costs, key=costs.__getitem__)


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
