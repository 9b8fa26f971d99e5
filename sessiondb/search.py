"""Full-text search whose time does not grow with the number of matches.

``ORDER BY rank`` over FTS5 ranks every match before it returns the first twenty: a
common word over a million messages took 770 ms. Search here reads a bounded number of
matches instead, and this fixes the order of the results.

**The order.** The matches that pass the filters are taken in *windows* of
:data:`WINDOW` (1,000), newest first: the first window holds the 1,000 most recent
matching messages (highest ids), the second the 1,000 before them, and so on. Within a
window the best match comes first (bm25, below), ties newest first. ``offset`` counts
through that sequence, so consecutive pages never repeat or skip a hit, and a page that
straddles two windows takes the end of one and the start of the next. A query with at
most 1,000 matches (every rare word) is therefore ordered exactly best match first; a
common word gives the best of its 1,000 most recent matches. Recency was chosen as the
window because an agent's transcripts are searched mostly for recent work, and because
FTS5 reads its doclists in rowid order, so the newest matches are the cheap ones to find.

**bm25.** The score is FTS5's bm25 (k1 = 1.2, b = 0.75, https://sqlite.org/fts5.html
#the_bm25_function), except for the number of messages containing each phrase, which
FTS5 counts over the whole index on every query (every match of a common word: 23 ms; of
a two-word phrase: 170 ms). Here it is counted over the newest :data:`IDF_SLICE`
(10,000) messages instead; in a store no larger the score is FTS5's exactly, and with a
single phrase the order is FTS5's exactly in any store (the count only scales every
score alike).

**Finding the candidates.** The FTS5 doclist is walked newest first (FTS5 reads its
doclists in rowid order, so the walk stops cheaply once the window is full: a common
word costs its newest ~1,000 rows), each match joined with its message and session for
the filters. A filter that keeps few of the matches (a rare source, one session, a query
whose words are everywhere) would make that walk read every match; so after a first span
of :data:`FIRST_SPAN` ids the rest is found the way estimated cheapest from what the
span showed: the same walk; the walk with each match looked up in the list of the
filter's message ids; or the filter's sessions walked newest first, each one's messages
:data:`CHUNK` at a time, each chunk matched by one range query. All three find the same
rows, so the choice changes the time, never the result. A ``roles`` filter alone is
applied to each match (roles are few and common).

**Limits.** A prefix query (``abc*``) makes FTS5 merge the doclists of every word with
the prefix before the first row comes out, in every statement, unless the table has a
``prefix=`` index of that length: a prefix of a word found in most messages then costs
45-80 ms per statement on a million messages, so such a search runs as few statements as
it can (one walk, one fetch of the hits, every phrase weighted alike). ``a NOT b`` of
two words in nearly every message reads the doclist of ``a`` to find the few messages
without ``b``. ``limit=None`` ranks every match, window by window.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Sequence

import apsw

from . import records, search_index
from .backend import fetch as _fetch, first as _first
from .schema import index_prefixes
from .text import plain_snippet

#: Matches ranked together: the newest WINDOW, then the WINDOW before them, ...
WINDOW = 1000
#: Newest messages over which each phrase's document frequency is counted for bm25.
IDF_SLICE = 10_000
#: Rows (ids) of the index walk's first span, after which it may switch strategy.
FIRST_SPAN = 1024
#: A session's messages matched per range query when its sessions are walked.
CHUNK = 512
#: Walking more sessions than this is never chosen (listing them alone costs too much).
MAX_WALKED_SESSIONS = 2000
_K1, _B = 1.2, 0.75
# Unit costs (microseconds, measured on a million-message store) of the ways to find
# candidates (see _candidates): a match read and joined with its message (and session);
# a message id put in the list of a filter's messages; a match read and looked up in
# that list; a session listed with its newest message; a session walked (its first
# chunk: an index read and an FTS5 range query, whose seek dominates).
_US_JOINED_MATCH = 1.6
_US_LISTED_ID = 0.15
_US_LISTED_MATCH = 0.5
_US_LISTED_SESSION = 2.0
_US_WALKED_SESSION = 130.0
_US_MAX_PER_ID = 2.0
# ... and of fetching hits: an FTS5 statement's start (its seek in every segment), and
# a match read in a range and checked against the list of hits.
_US_STATEMENT = 150.0
_US_SCANNED_MATCH = 0.3
_US_MATCH_WORK = 3.0  # a match the walk returned: its join and its rank data

# A list argument as one bound JSON array: ``IN (?, ?, ...)`` fails past SQLite's
# 32,766 variables, and its statement text grows with the list.
_IN_LIST = "(SELECT value FROM json_each(?))"
_RANK_DATA = "sessiondb_rank_data"
# snippet() for a message while its bytes x query phrases stay under this (at most
# ~10,000 matches: under a second even when every word matches); see fetch_hits.
SNIPPET_BUDGET = 20_000
_PLAIN_SNIPPET_SCAN = 1_000_000  # bytes of a long message searched for its snippet
#: Bytes of a context message read (200 characters are at most 800 bytes).
CONTEXT_BYTES = 800
# The context of a hit: the previous message, the hit and the next one of its session,
# each as (role, id, size, its bytes when they are few; see message_head).
_CONTEXT_SQL = (
    "SELECT role, id, octet_length(content), CASE WHEN octet_length(content) <= "
    f"{CONTEXT_BYTES} THEN CAST(content AS BLOB) END FROM ("
    " SELECT * FROM (SELECT id, role, content FROM messages WHERE session_id = ? AND id < ?"
    "  ORDER BY id DESC LIMIT 1)"
    " UNION ALL SELECT id, role, content FROM messages WHERE session_id = ? AND id = ?"
    " UNION ALL SELECT * FROM (SELECT id, role, content FROM messages WHERE session_id = ?"
    "  AND id > ? ORDER BY id LIMIT 1)) ORDER BY id"
)
_HIT_SQL = (
    "SELECT m.id, m.session_id, m.role, CASE WHEN octet_length(m.content) * ? <= ? "
    "THEN snippet(messages_fts, 0, '>>>', '<<<', '...', 40) END, m.timestamp, "
    "m.tool_name, s.source, s.model, s.started_at FROM messages_fts "
    "CROSS JOIN messages m ON m.id = messages_fts.rowid "
    "JOIN sessions s ON s.id = m.session_id WHERE messages_fts MATCH ? "
    # The unary plus keeps the list away from FTS5, which would run the whole query
    # once per listed id (a prefix query: a full doclist merge each time).
    f"AND messages_fts.rowid BETWEEN ? AND ? AND +messages_fts.rowid IN {_IN_LIST}"
)
_QUOTED = re.compile(r'"[^"]*"\*?')
_STARRED = re.compile(r'"([^"]*)"\*|([^\s"*]+)\*')
_TOKEN = re.compile(r"[^\W_]+")

_PREPARED: "weakref.WeakSet[apsw.Connection]" = weakref.WeakSet()


class Page(NamedTuple):
    """One page of hits, as :func:`ranked_ids` returns it."""

    ids: list[int]  #: message ids, in the window order
    scan_us: float  #: estimated microseconds per id of a range read (for fetch_hits)


@dataclass(frozen=True)
class Filters:
    """What a hit must be besides a match.

    :param sources: only sessions of these sources (``[]``: nothing matches); None: any.
    :param exclude_sources: no session of these sources; None or ``[]``: none excluded.
    :param roles: only messages of these roles; None or ``[]``: any role.
    :param session_id: only this session's messages; None: any session.
    :param bind_each: bind each list item as its own SQL variable (``IN (?, ?)``, as
        the hermes-agent facade's original did: any bindable type, at most 32,766
        items) instead of the whole list as one JSON array (strings, any number).
    """

    sources: Sequence[Any] | None = None
    exclude_sources: Sequence[Any] | None = None
    roles: Sequence[Any] | None = None
    session_id: str | None = None
    bind_each: bool = False

    def inside(self, column: str, items: Sequence[Any], negate: bool = False
               ) -> tuple[str, list[Any]]:
        """``column [NOT] IN`` the items, as SQL and its arguments."""
        op = "NOT IN" if negate else "IN"
        if self.bind_each:
            return f"{column} {op} ({', '.join('?' * len(items))})", list(items)
        return f"{column} {op} {_IN_LIST}", [json.dumps(list(items))]


def search_messages(conn: apsw.Connection, path: object, match: str, filters: Filters,
                    limit: int, offset: int) -> list[dict[str, Any]]:
    """The hits of :meth:`sessiondb.SessionDB.search_messages`, in the window order (see
    the module docstring), read in the caller's read transaction.

    :param match: a query as :func:`~sessiondb.text.sanitize_fts_query` returns it.
    :param limit: hits wanted; negative means all.
    :returns: dicts with ``id``, ``session_id``, ``role``, ``snippet``, ``timestamp``,
        ``tool_name``, ``source``, ``model``, ``session_started`` and ``context``.
    :raises SearchIndexError: the index is marked damaged or being rebuilt.
    """
    search_index.raise_if_damaged(conn, path)
    page = ranked_ids(conn, match, filters, limit, offset, _QUOTED.findall(match))
    phrases = match.count('"') // 2
    hits = [records.search_hit(row) for row in fetch_hits(conn, match, page, phrases)]
    for hit in hits:
        if hit["snippet"] is None:
            hit["snippet"] = long_message_snippet(conn, hit["id"], match)
        around = _fetch(conn, _CONTEXT_SQL, (hit["session_id"], hit["id"]) * 3)
        hit["context"] = [records.context_item((role, _decode(message_head(
            conn, rowid, size, inline, CONTEXT_BYTES)))) for role, rowid, size, inline in around]
    return hits


def ranked_ids(conn: apsw.Connection, match: str, filters: Filters, limit: int,
               offset: int, phrases: Sequence[str] | None = None) -> Page:
    """The message ids of one page of hits, in the window order (module docstring).

    :param match: a valid FTS5 query.
    :param limit: ids wanted; negative means all from ``offset`` on.
    :param phrases: the query's phrases as FTS5 queries, in the query's order (for
        bm25's document frequencies); None, or a list that does not fit the query, ranks
        every phrase alike.
    :raises apsw.Error: ``match`` is not valid FTS5, or the index is damaged.
    """
    if limit == 0 or (filters.sources is not None and not filters.sources):
        return Page([], 0.0)
    end = offset + limit if limit > 0 else -1
    need = -1 if end < 0 else -(-end // WINDOW) * WINDOW  # whole windows
    _prepare(conn)
    found, scan_us = _candidates(conn, match, filters, need)
    first = offset // WINDOW
    windows = [found[i:i + WINDOW] for i in range(first * WINDOW, len(found), WINDOW)]
    if not windows:
        return Page([], scan_us)
    scorer = _Scorer(conn, None if _expensive(conn, match) else phrases, found[0][1])
    ordered = [rowid for window in windows for rowid in scorer.order(window)]
    start = offset - first * WINDOW
    return Page(ordered[start:] if limit < 0 else ordered[start:start + limit], scan_us)


def fetch_hits(conn: apsw.Connection, match: str, page: Page, terms: int) -> list[tuple]:
    """The rows of the hits of ``page``, in its order: ``(id, session_id, role, snippet,
    timestamp, tool_name, source, model, started_at)``; ``snippet`` is None for a message
    too long for FTS5's ``snippet()`` (see :func:`long_message_snippet`).

    Hits are read by range queries, one per group of hits close enough that reading the
    ids between them costs less than another query's start (by the pace the walk
    showed), or a single one when every query merges whole doclists.

    FTS5's ``snippet()`` takes time that grows with the square of the matches in a
    message (a 10 MB one: hours, holding a read transaction); each phrase of the query
    can match every word, so past a budget of ``terms`` x bytes it is not called.
    (``octet_length``, because ``length()`` stops at a NUL.)

    :param terms: the number of phrases of ``match``, for that budget.
    """
    ids = sorted(page.ids)
    rows: dict[int, tuple] = {}
    gap = _US_STATEMENT / max(page.scan_us, 1e-9)
    groups = [ids] if ids and _expensive(conn, match) else _clusters(ids, gap)
    for group in groups:
        for row in _fetch(conn, _HIT_SQL, (terms, SNIPPET_BUDGET, match, group[0],
                                           group[-1], json.dumps(group))):
            rows[row[0]] = row
    return [rows[i] for i in page.ids if i in rows]


def long_message_snippet(conn: apsw.Connection, message_id: int, match: str) -> str:
    """The snippet of a message too long for FTS5's ``snippet()`` (see
    :func:`fetch_hits`), made from its first megabyte by
    :func:`~sessiondb.text.plain_snippet`.

    :param match: a query as :func:`~sessiondb.text.sanitize_fts_query` returns it.
    """
    size = _first(conn, "SELECT octet_length(content) FROM messages WHERE id = ?",
                  (message_id,))
    head = message_head(conn, message_id, size, None, _PLAIN_SNIPPET_SCAN)
    return plain_snippet(_decode(head) or "", match)


def message_head(conn: apsw.Connection, message_id: int, size: int | None,
                 inline: bytes | None, nbytes: int) -> bytes | None:
    """The first ``nbytes`` bytes of a message's content (None for NULL content).

    SQLite reads a whole value to compute anything of it but its type and size
    (``substr(CAST(content AS BLOB), 1, n)`` of a 10 MB message reads 10 MB), so a
    short value comes with its row (``inline``) and a long one is read by incremental
    BLOB I/O, which reads only the pages of the bytes asked for
    (https://sqlite.org/c3ref/blob_read.html). Runs in the caller's read transaction.

    :param size: ``octet_length(content)``, which SQLite knows without reading it.
    :param inline: the whole content when the row brought it, else None.
    """
    if size is None:
        return None
    if inline is not None:
        return inline[:nbytes]
    blob = conn.blob_open("main", "messages", "content", message_id, False)
    try:
        return blob.read(min(nbytes, size))
    finally:
        blob.close()


# -- candidates: the newest matches that pass the filters ----------------------------

def _prepare(conn: apsw.Connection) -> None:
    """Register the rank-data function on this connection, once."""
    if conn not in _PREPARED:
        conn.register_fts5_function(_RANK_DATA, _rank_data)
        _PREPARED.add(conn)


def _rank_data(api: apsw.FTS5ExtensionApi) -> str:
    """What bm25 needs of a row, as text: the index's rows and tokens, the row's tokens,
    then each phrase's occurrences in the row (an FTS5 auxiliary function)."""
    counts = " ".join(str(sum(map(len, api.phrase_locations(i))))
                      for i in range(api.phrase_count))
    return f"{api.row_count} {api.column_total_size(-1)} {api.column_size(-1)} {counts}"


@dataclass
class _Plan:
    """The filters as SQL for the index walk, and the id range the hits lie in."""

    joins: str
    where: str
    args: list[Any]
    lo: int
    hi: int


def _candidates(conn: apsw.Connection, match: str, filters: Filters,
                need: int) -> tuple[list[tuple[int, str]], float]:
    """``(id, rank data)`` of the newest ``need`` matches passing ``filters`` (all of
    them if ``need`` is negative), newest first; and the microseconds a range read of
    this query takes per id (:func:`_scan_cost`).

    The index walk reads the first span (:data:`FIRST_SPAN` ids); if that did not fill
    the window and a source or session filter applies, the rest is found the cheapest of
    three ways, estimated from what the span showed: the same walk (each match joined
    with its message); the walk with each match looked up in the list of the filter's
    message ids (built once from the ``(session_id, id)`` index); or the session walk
    (:func:`_session_walk`). All three find the same rows.
    """
    plan = _plan(conn, filters)
    if plan is None:
        return [], 0.0
    found: list[tuple[int, str]] = []
    span_lo = max(plan.lo, plan.hi - FIRST_SPAN + 1)
    if _expensive(conn, match):
        span_lo = plan.lo  # every statement merges whole doclists: read them once
    visited, first, us, reached = _index_walk(conn, match, plan, span_lo, plan.hi, need,
                                              found)
    pace = us / max(1, first - reached) if visited > 1 else 0.0
    if len(found) == need or span_lo == plan.lo:
        return found, _scan_cost(visited, plan.hi - reached + 1, pace)
    way = "join"
    if filters.session_id is not None or filters.sources or filters.exclude_sources:
        span = _Span(plan.hi - span_lo + 1, span_lo - plan.lo, visited, len(found),
                     us / max(1, first - span_lo))
        way = _cheapest_way(conn, filters, need, span)
    if way == "sessions":
        left = -1 if need < 0 else need - len(found)
        found += _session_walk(conn, match, filters, _sessions(conn, filters, span_lo - 1),
                               left)
        return found, _scan_cost(visited, plan.hi - span_lo + 1, pace)
    if way == "list":
        plan = _listed_plan(filters, plan)
    more, _, _, low = _index_walk(conn, match, plan, plan.lo, span_lo - 1, need, found)
    return found, _scan_cost(visited + more, plan.hi - low + 1, pace,
                             visited / (plan.hi - reached + 1))


def _scan_cost(matches: int, ids: int, pace: float, span_density: float | None = None
               ) -> float:
    """Microseconds per id of reading a range of this query's matches: at least their
    reading (``matches`` over ``ids``), or the walk's ``pace`` per id less its work on
    the matches it returned (joins, rank data), which is higher when FTS5 reads much
    more than it returns (``a NOT b`` of two words found everywhere)."""
    density = matches / max(1, ids)
    work = (density if span_density is None else span_density) * _US_MATCH_WORK
    return max(density * _US_SCANNED_MATCH, pace - work)


@dataclass(frozen=True)
class _Span:
    """What the first span of the index walk showed."""

    ids: int  # ids it covered
    left: int  # ids below it
    matches: int  # matches read
    kept: int  # matches that passed the filters
    us_per_id: float  # its pace after the first match (0 if it had at most one)


def _cheapest_way(conn: apsw.Connection, filters: Filters, need: int, span: _Span) -> str:
    """``"join"``, ``"list"`` or ``"sessions"``: the way to find the rest of the
    candidates estimated cheapest (see :func:`_candidates`).

    The index walk's cost is what the span cost per id, times the ids still to walk
    (all that are left, or as many as the rate of kept matches says the rest needs):
    a per-match figure alone would miss that FTS5 reads far more than it returns for
    ``a NOT b`` of two common words. The list lookup saves the join of every match;
    the session walk costs a range query per session, for the share of the filter's
    sessions needed.
    """
    ids = span.left
    if span.kept and need >= 0:
        ids = min(ids, (need - span.kept) * span.ids / span.kept)
    density = span.matches / span.ids  # matches per id
    # The measured pace, within what reading and joining the matches alone costs and a
    # bound (a walk preempted by another process must not look like a slow query).
    per_id = min(max(span.us_per_id, density * _US_JOINED_MATCH), _US_MAX_PER_ID)
    cond, args = _session_conditions(filters)
    count, messages = conn.execute(
        "SELECT count(*), coalesce(sum(message_count), 0) FROM (SELECT message_count "
        f"FROM sessions s WHERE {cond} LIMIT ?)", (*args, MAX_WALKED_SESSIONS + 1)).fetchone()
    costs = {"join": ids * per_id}
    if count <= MAX_WALKED_SESSIONS:
        saved = density * (_US_JOINED_MATCH - _US_LISTED_MATCH)
        costs["list"] = messages * _US_LISTED_ID + ids * max(per_id - saved, per_id / 4)
        expected = messages * density  # matches in the filter's sessions
        share = 1.0 if need < 0 or expected <= need else need / expected
        costs["sessions"] = count * (_US_LISTED_SESSION + share * _US_WALKED_SESSION)
    return min(costs, key=costs.__getitem__)


def _plan(conn: apsw.Connection, filters: Filters) -> _Plan | None:
    """None when no message can pass (an unknown session, an empty store)."""
    cond: list[str] = []
    args: list[Any] = []
    sessions = filters.sources or filters.exclude_sources
    for column, items, negate in (("s.source", filters.sources, False),
                                  ("s.source", filters.exclude_sources, True),
                                  ("m.role", filters.roles, False)):
        if items:
            sql, values = filters.inside(column, items, negate)
            cond.append(sql)
            args += values
    if filters.session_id is not None:
        cond.append("m.session_id = ?")
        args.append(filters.session_id)
        lo, hi = conn.execute(
            "SELECT (SELECT min(id) FROM messages WHERE session_id = ?), "
            "(SELECT max(id) FROM messages WHERE session_id = ?)",
            (filters.session_id,) * 2).fetchone()
    else:
        lo, hi = conn.execute("SELECT (SELECT min(id) FROM messages), "
                              "(SELECT max(id) FROM messages)").fetchone()
    if hi is None:
        return None
    joins = ""
    if cond:
        joins = " CROSS JOIN messages m ON m.id = messages_fts.rowid"
        if sessions:
            joins += " CROSS JOIN sessions s ON s.id = m.session_id"
    return _Plan(joins, " AND ".join(cond) or "1", args, lo, hi)


def _index_walk(conn: apsw.Connection, match: str, plan: _Plan, lo: int, hi: int,
                need: int, found: list[tuple[int, str]]) -> tuple[int, int, float]:
    """Walk the matches with ids ``lo..hi`` newest first, appending those that pass
    the filters to ``found`` until it holds ``need``.

    The cursor is read lazily and abandoned when enough were found: FTS5 walks its
    doclists in rowid order, so a common word costs only the rows read. A match that
    fails the filters costs its join, not the rank data (the CASE).

    :returns: the matches read, the id of the first, the microseconds from the first
        to the end (the walk's own pace, without the statement's start), and the lowest
        id the walk covered.
    """
    sql = (f"SELECT messages_fts.rowid, CASE WHEN {plan.where} THEN "
           f"{_RANK_DATA}(messages_fts) END FROM messages_fts{plan.joins} "
           "WHERE messages_fts MATCH ? AND messages_fts.rowid BETWEEN ? AND ? "
           "ORDER BY messages_fts.rowid DESC")
    visited, first, began, reached = 0, lo, 0.0, lo
    if need >= 0 and len(found) >= need:
        return visited, first, 0.0, hi + 1
    cursor = conn.execute(sql, (*plan.args, match, lo, hi))
    try:
        for rowid, data in cursor:
            if not visited:
                first, began = rowid, time.perf_counter()
            visited += 1
            if data is not None:
                found.append((rowid, data))
                if len(found) == need:
                    reached = rowid
                    break
    finally:
        cursor.close()
    us = (time.perf_counter() - began) * 1e6 if visited else 0.0
    return visited, first, us, reached


def _sessions(conn: apsw.Connection, filters: Filters, below: int
              ) -> list[tuple[int, str]]:
    """The sessions passing ``filters`` as ``(newest message id <= below, session id)``,
    newest first (those without such a message left out)."""
    cond, args = _session_conditions(filters)
    rows = _fetch(conn, f"SELECT (SELECT max(m.id) FROM messages m WHERE m.session_id = "
                        f"s.id AND m.id <= ?), s.id FROM sessions s WHERE {cond}",
                  (below, *args))
    return sorted((r for r in rows if r[0] is not None), reverse=True)


def _listed_plan(filters: Filters, plan: _Plan) -> _Plan:
    """The filters as a lookup of each match in the list of the filter's message ids
    (a subquery SQLite builds once per statement), and the role of the matches found
    there only."""
    cond, args = _session_conditions(filters)
    # CROSS JOIN: sessions first, then each one's ids from the (session_id, id) index;
    # the other order reads every message in the id range.
    where = (f"messages_fts.rowid IN (SELECT m.id FROM sessions s CROSS JOIN messages m "
             f"ON m.session_id = s.id WHERE {cond} AND m.id BETWEEN ? AND ?)")
    args = [*args, plan.lo, plan.hi]
    if filters.roles:
        sql, values = filters.inside(
            "(SELECT role FROM messages WHERE id = messages_fts.rowid)", filters.roles)
        where += " AND " + sql  # AND stops at the first false operand: a lookup per hit
        args += values
    return _Plan("", where, args, plan.lo, plan.hi)


def _session_conditions(filters: Filters) -> tuple[str, list[Any]]:
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


def _session_walk(conn: apsw.Connection, match: str, filters: Filters,
                  sessions: list[tuple[int, str]], need: int) -> list[tuple[int, str]]:
    """The newest ``need`` matches (all if negative) among the messages of
    ``sessions`` (``(newest id, session id)``, newest first), newest first.

    Each session's messages are read newest first, :data:`CHUNK` ids at a time from the
    ``(session_id, id)`` index, and each chunk is matched by one FTS5 query over its id
    range, read in ascending order (a descending range read re-reads the doclist from
    its end: 1-2 ms per query for a common word, against tens of microseconds). A
    session's range may hold other sessions' messages; they are dropped. The walk stops
    once ``need`` were found and no session left can hold a newer one.
    """
    roles = ""
    args: list[Any] = []
    if filters.roles:
        sql, args = filters.inside("role", filters.roles)
        roles = " AND " + sql
    ids_sql = (f"SELECT id FROM messages WHERE session_id = ? AND id <= ?{roles} "
               "ORDER BY id DESC LIMIT ?")
    range_sql = (f"SELECT rowid, {_RANK_DATA}(messages_fts) FROM messages_fts WHERE "
                 "messages_fts MATCH ? AND rowid BETWEEN ? AND ?")
    kept: list[tuple[int, str]] = []  # a min-heap of the newest found so far

    def full_below(rowid: int) -> bool:
        return 0 <= need <= len(kept) and rowid < kept[0][0]

    for newest, session_id in sessions:
        if full_below(newest):
            break
        cursor = newest
        while not full_below(cursor):
            ids = [r[0] for r in _fetch(conn, ids_sql, (session_id, cursor, *args, CHUNK))]
            if not ids:
                break
            wanted = set(ids)
            for row in _fetch(conn, range_sql, (match, ids[-1], ids[0])):
                if row[0] in wanted:
                    if need < 0 or len(kept) < need:
                        heapq.heappush(kept, row)
                    elif row[0] > kept[0][0]:
                        heapq.heapreplace(kept, row)
            if len(ids) < CHUNK:
                break
            cursor = ids[-1] - 1
    return sorted(kept, reverse=True)


# -- ranking within a window ----------------------------------------------------------

class _Scorer:
    """bm25 of rank data (see :func:`_rank_data`), with each phrase's document
    frequency counted over the newest :data:`IDF_SLICE` messages."""

    def __init__(self, conn: apsw.Connection, phrases: Sequence[str] | None,
                 sample: str) -> None:
        fields = sample.split()
        count = len(fields) - 3
        self.idf = [1.0] * count
        if count > 1 and phrases is not None and len(phrases) == count:
            self.idf = _idf(conn, phrases, int(fields[0])) or self.idf

    def order(self, window: Iterable[tuple[int, str]]) -> list[int]:
        """The ids of ``window`` best first, ties newest first."""
        return [rowid for _, _, rowid in sorted(
            (self.score(data), -rowid, rowid) for rowid, data in window)]

    def score(self, data: str) -> float:
        """FTS5's bm25 (fts5_aux.c, fts5Bm25Function) with these IDFs: lower is better."""
        rows, tokens, length, *freqs = map(int, data.split())
        avgdl = tokens / rows if rows else 1.0
        norm = _K1 * (1 - _B + _B * length / avgdl)
        score = 0.0
        for idf, freq in zip(self.idf, freqs):
            score += idf * ((freq * (_K1 + 1.0)) / (freq + norm))
        return -1.0 * score


def _idf(conn: apsw.Connection, phrases: Sequence[str], index_rows: int
         ) -> list[float] | None:
    """Each phrase's IDF as FTS5's bm25 computes it, ``log((N - n + 0.5) / (n + 0.5))``
    (at least 1e-6), over the newest :data:`IDF_SLICE` ids: ``N`` of them, ``n`` the
    messages among them containing the phrase (in a store no larger: the index's rows
    and every message containing it, so exactly FTS5's). None when a phrase cannot be
    counted; the caller then weighs every phrase alike."""
    top = _first(conn, "SELECT max(id) FROM messages", ())
    slice_lo = (top or 0) - IDF_SLICE + 1
    if _first(conn, "SELECT 1 FROM messages WHERE id < ? LIMIT 1", (slice_lo,)) is None:
        rows, bound = index_rows, None
    else:
        # The slice's ids, not its rows: counting them reads every message of it (a few
        # ms), and recent ids have few gaps (deletions prune the oldest sessions).
        rows, bound = IDF_SLICE, slice_lo
    out = []
    for phrase in phrases:
        try:
            hits = _first(conn, "SELECT count(*) FROM messages_fts WHERE messages_fts "
                                "MATCH ? AND rowid >= ?", (phrase, bound or 0))
        except apsw.SQLError:
            return None
        idf = math.log((rows - hits + 0.5) / (hits + 0.5))
        out.append(idf if idf > 0.0 else 1e-6)
    return out


def _expensive(conn: apsw.Connection, match: str) -> bool:
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


def _clusters(ids: list[int], gap: float) -> list[list[int]]:
    """Sorted ids split where two are more than ``gap`` apart."""
    groups: list[list[int]] = []
    for rowid in ids:
        if groups and rowid - groups[-1][-1] <= gap:
            groups[-1].append(rowid)
        else:
            groups.append([rowid])
    return groups


def _decode(head: bytes | None) -> str | None:
    # A character cut in two at the end of a head is dropped, as before.
    return None if head is None else head.decode("utf-8", "ignore")
