"""How a search finds a window's candidates (:mod:`sessiondb.search`): the newest
matches that pass the filters, in a range of ids.

The FTS5 doclist is walked newest first (FTS5 reads its doclists in rowid order, so
the walk stops cheaply once the window is full: a common word costs its newest ~1,000
rows), each match joined with its message and session for the filters. A filter that keeps few of the matches (a rare source, one session, a query
whose words are everywhere) would make that walk read every match; so after a first span
of :data:`FIRST_SPAN` ids the rest is found the way estimated cheapest from what the
span showed: the same walk; the walk with each match looked up in the list of the
filter's message ids; or the filter's sessions walked newest first, each one's messages
:data:`CHUNK` at a time, chunks matched by range queries (chunks close together share
one); or, for a query whose prefixes are written out (below: each of its statements
starts with a seek per word, and reads an OR of its words: see
:mod:`sessiondb.search_prefix`), the filter's messages
tested one by one, newest first, as a one-letter prefix is. A walk estimated long
(``a NOT b`` of two words in nearly every message, where FTS5 reads all of ``a`` and
``b`` to find the few messages without ``b``) goes on in slices of ids newest first,
each read in ascending order, which FTS5 reads at about two thirds of the cost. For a
query whose prefixes are written out, under a source or session filter whose messages
are estimated to cost less to test one by one than a statement takes to start (a seek
per word in every segment), the first span is the newest :data:`SPAN_MATCHES` (32)
matches found by testing the filter's messages, and its rate of matches stands for the
span's figures. All ways find the same rows, so the choice changes the time, never the
result. A ``roles`` filter alone is applied to each match (roles are few and common).

Used by :mod:`sessiondb.search`. The ``filters`` arguments are
:class:`sessiondb.search.Filters` (not imported here: that module imports this one).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import apsw

from . import fts_tables, search_costs, search_rows
from .backend import fetch as _fetch
from .search_costs import MAX_WALKED_SESSIONS, Span, scan_cost, walk_cost, way_costs
from .search_hits import IN_LIST, US_STATEMENT as _US_STATEMENT
from .search_queries import Run
from .search_rows import session_conditions as _session_conditions

#: Rows (ids) of the index walk's first span, after which it may switch strategy.
FIRST_SPAN = 1024
#: A session's messages matched per range query when its sessions are walked.
CHUNK = 512
#: Matches of the first span when it tests the filter's messages one by one.
SPAN_MATCHES = 32
# The sliced walk is chosen when FTS5 reads far more than it returns (the span's time
# per match over this) and the walk is estimated to cost more than _SLICED_WALK
# statement starts (it runs a few statements more than one walk).
_US_READ_PER_MATCH = 20.0
_SLICED_WALK = 20
# A list argument as one bound JSON array (see search_hits).
_IN_LIST = IN_LIST


@dataclass
class Plan:
    """The filters as SQL for the index walk, and the id range the hits lie in (a
    window's part of the store's, or of the session's, range of ``ids`` ids)."""

    joins: str
    where: str
    args: list[Any]
    lo: int
    hi: int
    ids: int
    #: The index table the range lies in (sessiondb.fts_tables).
    table: str = fts_tables.FIRST
    #: Figures worked out once per search, shared by every window's copy of the plan.
    memo: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def share(self) -> float:
        """The share of the store's (or session's) ids in this plan's range."""
        return (self.hi - self.lo + 1) / max(1, self.ids)


def candidates(conn: apsw.Connection, run: Run, filters: Any, plan: Plan,
                need: int, test: search_rows.RowTest | None = None
                ) -> tuple[list[tuple[int, str]], float]:
    """``(id, rank data)`` of the newest ``need`` matches passing ``filters`` with ids
    in the plan's range (all of them if ``need`` is negative), newest first; and the
    microseconds a range read of this query takes per id
    (:func:`~sessiondb.search_costs.scan_cost`).

    The index walk reads the first span (:data:`FIRST_SPAN` ids); if that did not fill
    the window and a source or session filter applies, the rest is found the cheapest of
    three ways, estimated from what the span showed: the same walk (each match joined
    with its message); the walk with each match looked up in the list of the filter's
    message ids (built once from the ``(session_id, id)`` index); or the session walk
    (:func:`_session_walk`). A query whose prefixes are written out (``test``: its row
    test) has a fourth: the filter's messages tested one by one (:func:`_tested_rest`),
    as its statements, each starting with a seek per word, make the session walk dear.
    All find the same rows. Once a window of a search has walked the filter's sessions,
    the windows below it walk them too, without a first span: a filter that keeps so few
    matches that a window of a block did not fill keeps few in the blocks below (and
    each span is a statement more).
    """
    found: list[tuple[int, str]] = []
    if "session_walk" in plan.memo:
        scan_us = plan.memo["session_walk"]
        return _session_walk(conn, run, filters, _sessions_of(conn, filters, plan, plan.hi),
                             need, scan_us, plan.lo, plan.table), scan_us
    span_lo = max(plan.lo, plan.hi - FIRST_SPAN + 1)
    by_rows = _span_by_rows(conn, test, filters, plan, need, run.statement_us)
    if by_rows is not None:
        found, span = by_rows
        span_lo, visited, pace = plan.hi - span.ids + 1, span.matches, 0.0
        reached = found[-1][0] if len(found) == need else span_lo
    else:
        visited, first, us, reached = _index_walk(conn, run, plan, span_lo, plan.hi, need,
                                                  found)
        pace = us / max(1, first - reached) if visited else 0.0
        span = Span(plan.hi - span_lo + 1, span_lo - plan.lo, visited, len(found),
                    us / max(1, first - span_lo))
    if len(found) == need or span_lo == plan.lo:
        return found, scan_cost(visited, plan.hi - reached + 1, pace)
    way = "join"
    if filters.session_id is not None or filters.sources or filters.exclude_sources:
        way = search_costs.cheapest_way(conn, filters, need, span, run.statement_us,
                                        plan.share, plan.memo, test is not None)
    if way == "rows":
        way, more = _tested_rest(conn, test, filters, plan, span, need, run.statement_us)
        if more is not None:
            found += more
            return found, scan_cost(visited, plan.hi - span_lo + 1, pace)
    if way == "sessions":
        left = -1 if need < 0 else need - len(found)
        scan_us = plan.memo["session_walk"] = scan_cost(visited, plan.hi - span_lo + 1, pace)
        found += _session_walk(conn, run, filters,
                               _sessions_of(conn, filters, plan, span_lo - 1), left, scan_us,
                               plan.lo, plan.table)
        return found, scan_us
    if way == "list":
        plan = _listed_plan(filters, plan)
    if (span.us_per_id * span.ids > _US_READ_PER_MATCH * max(1, span.matches)
            and walk_cost(span, need) > _SLICED_WALK * (_US_STATEMENT + run.statement_us)):
        _, low, rest_us = _sliced_walk(conn, run, plan, span, need, found)
        rest_pace = rest_us / max(1, span_lo - low)
    else:
        _, rest_first, rest_us, low = _index_walk(conn, run, plan, plan.lo, span_lo - 1,
                                                  need, found, counted=False)
        rest_pace = rest_us / max(1, rest_first - low)
    # The walk past the span returned only the matches that passed: those it read are
    # taken at the span's density.
    more = round(span.matches / span.ids * (span_lo - low))
    # A span of at most one match tells nothing of the pace: the rest of the walk does.
    return found, scan_cost(visited + more, plan.hi - low + 1, pace or rest_pace,
                             visited / (plan.hi - reached + 1))


def _span_by_rows(conn: apsw.Connection, test: search_rows.RowTest | None,
                  filters: Any, plan: Plan, need: int, statement_us: float
                  ) -> tuple[list[tuple[int, str]], Span] | None:
    """The first span found by testing the messages that pass the filters one by one
    (:mod:`sessiondb.search_rows`), newest first, until :data:`SPAN_MATCHES` matches
    (or ``need``) are found: those matches, and the span's figures for the choice of a
    way for the rest. None when that is estimated to cost more than a statement of the
    query takes to start, or the test cannot be run: the index walk reads the span then.

    A query whose prefixes are written out starts each statement with a seek per word
    in every segment of the table (a two-letter prefix of 77-103 words in the newest
    table's 19 segments: 12-16 ms, measured), where a source of 1% of the messages has
    about ten in the index walk's span. The span's matches before the filters, which
    the cost model takes, are counted at the rate of the messages tested."""
    if test is None or (filters.session_id is None and not filters.sources
                        and not filters.exclude_sources):
        return None
    count, messages = search_costs.filter_sessions(conn, filters, plan.memo)
    if count > MAX_WALKED_SESSIONS:
        return None
    want = SPAN_MATCHES if need < 0 else min(need, SPAN_MATCHES)
    tally: list[int] = []
    found = search_rows.newest_matches(conn, test, band_of(conn, filters, plan), plan.lo,
                                       plan.hi, want, statement_us, tally,
                                       messages / max(1, plan.ids))
    if found is None:
        return None
    if len(found) < want or not found:  # every message in the range was tested
        return found, Span(plan.hi - plan.lo + 1, 0, len(found), len(found), 0.0)
    ids = plan.hi - found[-1][0] + 1
    return found, Span(ids, found[-1][0] - plan.lo, round(len(found) / tally[0] * ids),
                       len(found), 0.0)


def _tested_rest(conn: apsw.Connection, test: search_rows.RowTest | None,
                 filters: Any, plan: Plan, span: Span, need: int,
                 statement_us: float) -> tuple[str, list[tuple[int, str]] | None]:
    """The matches below the span (the newest ``need`` less those it kept) found by
    testing the messages that pass the filters one by one (:mod:`sessiondb.search_rows`),
    within what the cheapest other way is estimated to cost; and that way, for when the
    test gives up (its rate of matches says it would cost more) or cannot be run."""
    costs = way_costs(conn, filters, need, span, statement_us, plan.share, plan.memo)
    other = min(costs, key=costs.__getitem__)
    if test is None or costs[other] < search_rows.FIRST_BAND * search_rows.US_TESTED:
        return other, None  # (a budget the test's first band would exceed: none run)
    left = -1 if need < 0 else need - span.kept
    return other, search_rows.newest_matches(conn, test, band_of(conn, filters, plan),
                                             plan.lo, plan.lo + span.left - 1, left,
                                             costs[other])


def band_of(conn: apsw.Connection, filters: Any, plan: Plan
          ) -> Callable[[int, int], Iterable[tuple[int, Any]]]:
    """The search's reader of the messages that pass the filters, by id range
    (:func:`sessiondb.search_rows.band_reader`), made once per search."""
    if "band" not in plan.memo:
        plan.memo["band"] = search_rows.band_reader(conn, filters)
    return plan.memo["band"]


def _sliced_walk(conn: apsw.Connection, run: Run, plan: Plan, span: Span, need: int,
                 found: list[tuple[int, str]]) -> tuple[int, int, float]:
    """The index walk below the span, as slices of ids newest first, each read in
    ascending order: FTS5 reads a doclist backwards at 1.4-1.8 times the cost (``a NOT
    b`` of two words in nearly every message: 60 ms against 42 over a million ids).
    Each slice is sized by the rate of kept matches so far (a quarter more), so the
    ids read past the last one needed stay few; with none kept yet, each is 16 times
    the one before. Appends to ``found`` as :func:`_index_walk` does.

    :returns: the matches that passed, the lowest id covered, and the microseconds it
        took (the filters applied in the statement, as :func:`_index_walk` without
        ``counted``).
    """
    visited, covered, top, size = 0, span.ids, plan.lo + span.left - 1, FIRST_SPAN
    began = time.perf_counter()
    while top >= plan.lo and (need < 0 or len(found) < need):
        if need >= 0 and found:
            size = int(min(max(FIRST_SPAN, (need - len(found)) * covered / len(found)
                               * 1.25), size * 16))
        else:
            size *= 16
        bottom = max(plan.lo, top - size + 1)
        rows = _fetch(conn, *_walk_sql(run, plan, bottom, top, False, "ASC"))
        visited += len(rows)
        found += reversed(rows)
        covered += top - bottom + 1
        top = bottom - 1
    if need >= 0:
        del found[need:]
    return visited, top + 1, (time.perf_counter() - began) * 1e6


def make_plan(conn: apsw.Connection, filters: Any) -> Plan | None:
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
    return Plan(joins, " AND ".join(cond) or "1", args, lo, hi, hi - lo + 1)


def _walk_sql(run: Run, plan: Plan, lo: int, hi: int, counted: bool, order: str
              ) -> tuple[str, tuple[Any, ...]]:
    """The statement of an index walk over ``lo..hi`` and its arguments (see
    :func:`_index_walk` for ``counted``)."""
    if counted:
        return (fts_tables.on(plan.table, (
                    f"SELECT messages_fts.rowid, CASE WHEN {plan.where} THEN {run.rank} "
                    f"END FROM messages_fts{plan.joins} WHERE messages_fts MATCH ? AND "
                    "messages_fts.rowid BETWEEN ? AND ? ORDER BY messages_fts.rowid "
                    f"{order}")), (*plan.args, run.match, lo, hi))
    return (fts_tables.on(plan.table, (
                f"SELECT messages_fts.rowid, {run.rank} FROM messages_fts{plan.joins} "
                "WHERE messages_fts MATCH ? AND messages_fts.rowid BETWEEN ? AND ? AND "
                f"({plan.where}) ORDER BY messages_fts.rowid {order}")),
            (run.match, lo, hi, *plan.args))


def _index_walk(conn: apsw.Connection, run: Run, plan: Plan, lo: int, hi: int,
                need: int, found: list[tuple[int, str]], counted: bool = True
                ) -> tuple[int, int, float, int]:
    """Walk the matches with ids ``lo..hi`` newest first, appending those that pass
    the filters to ``found`` until it holds ``need``.

    The cursor is read lazily and abandoned when enough were found: FTS5 walks its
    doclists in rowid order, so a common word costs only the rows read. A match that
    fails the filters costs its join, not the rank data (the CASE).

    :param counted: every match read comes back (with no rank data when the filters
        drop it), so that the matches read are counted, as the first span's figures
        need; else only the matches that pass come back, the filters applied in the
        statement, and the count is theirs: past the span, a filter that keeps one match
        in a hundred cost the other 99 a row each here (35 ms of a search's 59 for a
        prefix of two letters with ``sources=[slack]``, 70,669 matches read, measured).
    :returns: the matches read (or that passed), the id of the first, the microseconds
        from the first to the end (the walk's own pace, without the statement's start),
        and the lowest id the walk covered.
    """
    visited, first, began, reached = 0, lo, 0.0, lo
    if need >= 0 and len(found) >= need:
        return visited, first, 0.0, hi + 1
    cursor = conn.execute(*_walk_sql(run, plan, lo, hi, counted, "DESC"))
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


def _sessions(conn: apsw.Connection, filters: Any, below: int
              ) -> list[tuple[int, str, int]]:
    """The sessions passing ``filters`` as ``(newest message id <= below, session id,
    oldest message id)``, newest first (those without such a message left out)."""
    cond, args = _session_conditions(filters)
    rows = _fetch(conn, f"SELECT (SELECT max(m.id) FROM messages m WHERE m.session_id = "
                        f"s.id AND m.id <= ?), s.id, (SELECT min(m.id) FROM messages m "
                        f"WHERE m.session_id = s.id) FROM sessions s WHERE {cond}",
                  (below, *args))
    return sorted((r for r in rows if r[0] is not None), reverse=True)


def _sessions_of(conn: apsw.Connection, filters: Any, plan: Plan, below: int
                 ) -> list[tuple[int, str]]:
    """:func:`_sessions` with a message up to ``below``, as ``(newest such id, session
    id)``, listed once per search (kept in the plan's memo for the windows below: a
    session's newest message there is its newest up to the window's top, which keeps
    the list's order). A session all of whose messages are newer is left out: in the
    windows below the first, each one's walk would be a query that finds nothing (a
    rare source's search that reaches four blocks: 280 of its 470 queries)."""
    listed = plan.memo.get("sessions_listed")
    if listed is None or listed[0] < below:
        listed = plan.memo["sessions_listed"] = (below, _sessions(conn, filters, below))
    return [(min(newest, below), sid) for newest, sid, oldest in listed[1]
            if oldest <= below]


def _listed_plan(filters: Any, plan: Plan) -> Plan:
    """The filters as a lookup of each match in the list of the filter's message ids
    (a subquery SQLite builds once per statement), and the role of the matches found
    there only."""
    cond, args = _session_conditions(filters)
    # CROSS JOIN: sessions first, then each one's ids from the (session_id, id) index;
    # the other order reads every message in the id range.
    # The unary plus: in a WHERE clause (a walk past the span), a bare rowid IN would be
    # handed to FTS5, which would run the query once per listed id.
    where = (f"+messages_fts.rowid IN (SELECT m.id FROM sessions s CROSS JOIN messages m "
             f"ON m.session_id = s.id WHERE {cond} AND m.id BETWEEN ? AND ?)")
    args = [*args, plan.lo, plan.hi]
    if filters.roles:
        sql, values = filters.inside(
            "(SELECT role FROM messages WHERE id = messages_fts.rowid)", filters.roles)
        where += " AND " + sql  # AND stops at the first false operand: a lookup per hit
        args += values
    return Plan("", where, args, plan.lo, plan.hi, plan.ids, plan.table, plan.memo)


def _session_walk(conn: apsw.Connection, run: Run, filters: Any,
                  sessions: list[tuple[int, str]], need: int, scan_us: float,
                  floor: int, table: str = fts_tables.FIRST) -> list[tuple[int, str]]:
    """The newest ``need`` matches (all if negative) among the messages of
    ``sessions`` (``(newest id, session id)``, newest first) with ids from ``floor``
    on, newest first.

    Each session's messages are read newest first, :data:`CHUNK` ids at a time from the
    ``(session_id, id)`` index, and chunks are matched by FTS5 queries over their id
    range, read in ascending order (a descending range read re-reads the doclist from
    its end: 1-2 ms per query for a common word, against tens of microseconds). Chunks
    whose ranges lie closer than reading the ids between them costs (``scan_us`` per
    id) against another query's start share one query. A range may hold other
    sessions' messages; they are dropped. The walk stops once ``need`` were found and no
    session left can hold a newer one.
    """
    roles = ""
    args: list[Any] = []
    if filters.roles:
        sql, args = filters.inside("role", filters.roles)
        roles = " AND " + sql
    ids_sql = (f"SELECT id FROM messages WHERE session_id = ? AND id <= ? AND id >= ?"
               f"{roles} ORDER BY id DESC LIMIT ?")
    # The unary plus: the list is checked per row (rank data made only for the rows in
    # it), not handed to FTS5, which would run the query once per listed id.
    range_sql = fts_tables.on(table, (
        f"SELECT rowid, {run.rank} FROM messages_fts WHERE messages_fts MATCH ? "
        f"AND rowid BETWEEN ? AND ? AND +rowid IN {_IN_LIST} ORDER BY rowid"))
    gap = (_US_STATEMENT + run.statement_us) / max(scan_us, 1e-3)
    kept: list[tuple[int, str]] = []  # a min-heap of the newest found so far
    pending: list[int] = []  # the ids of the chunks for the next query

    def flush() -> None:
        if pending:
            for row in _fetch(conn, range_sql, (run.match, min(pending), max(pending),
                                                json.dumps(pending))):
                if need < 0 or len(kept) < need:
                    heapq.heappush(kept, row)
                elif row[0] > kept[0][0]:
                    heapq.heapreplace(kept, row)
            pending.clear()

    def full_below(rowid: int) -> bool:
        if 0 <= need <= len(kept) + len(pending):
            flush()
        return 0 <= need <= len(kept) and rowid < kept[0][0]

    for newest, session_id in sessions:
        if newest < floor or full_below(newest):
            break
        cursor = newest
        while not full_below(cursor):
            ids = [r[0] for r in _fetch(conn, ids_sql, (session_id, cursor, floor, *args,
                                                        CHUNK))]
            if not ids:
                break
            if pending and (min(pending) - ids[0] > gap or ids[-1] - max(pending) > gap):
                flush()
            pending += ids
            if len(ids) < CHUNK:
                break
            cursor = ids[-1] - 1
    flush()
    return sorted(kept, reverse=True)
