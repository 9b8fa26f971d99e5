"""Full-text search whose time does not grow with the number of matches.

``ORDER BY rank`` over FTS5 ranks every match before it returns the first twenty: a
common word over a million messages took 770 ms. Search here reads a bounded number of
matches instead, and this fixes the order of the results.

**The order.** Message ids are cut into *blocks* of :data:`HORIZON` (262,144): ids 1
to 262,144, then 262,145 to 524,288, and so on. The matches that pass the filters are
taken in *windows*, newest first: the first window holds the :data:`WINDOW` (1,000)
most recent matching messages (highest ids) of the newest block, the second the 1,000
before them in that block (or, once the block has no more, the newest 1,000 of the
block below), and so on. Within a window the best match comes first (bm25, below),
ties newest first. ``offset`` counts through that sequence, so consecutive pages never
repeat or skip a hit, and a page that straddles two windows takes the end of one and
the start of the next; a message that does not match, appended or deleted between two
pages, changes no window (a matching one moves the windows of its block). A query with
at most 1,000 matches in one block (every rare word in a store of up to 262,144
messages) is therefore ordered exactly best match first; a common word gives the best
of its 1,000 most recent matches; a rare word in a larger store the best of its matches
in the newest block, then the best of those in the block below. Recency was chosen as
the window because an agent's transcripts are searched mostly for recent work, and
because FTS5 reads its doclists in rowid order, so the newest matches are the cheap
ones to find. The blocks bound the ids a window reads whatever the store's size: a
query whose words are in nearly every message but whose matches are few (``a NOT b``
with ``b`` nearly everywhere) makes FTS5 read both doclists to find them, and without
blocks a filter that keeps few of them had every id of the store read (a million: 60
ms) to fill a window.

**Tables.** The index is cut into one FTS5 table per block (:mod:`sessiondb.fts_tables`),
and each window is read from the table it lies in; a prefix is written out with the
words of each table the windows reach. bm25 takes the whole index's rows and tokens
(not those of the window's table), so the order is the one a single table would give.

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
the filters; a filter that keeps few of the matches is served other ways, estimated
cheapest from a first span of the walk (:mod:`sessiondb.search_walks`). All ways find
the same rows, so the choice changes the time, never the result.

**Prefixes.** FTS5 answers a prefix (``abc*``) without a ``prefix=`` index of that
length by merging the doclists of every word with the prefix before the first row
comes out, in every statement (45-110 ms on a million messages for a prefix of a word
found in most of them). So each such prefix is written as an OR of the index's words
that have it (:mod:`sessiondb.search_prefix`): the same rows, read lazily like any
word, and bm25 of the prefix's occurrences as FTS5 counts them; the hits are then read
with only the words they hold. The order is the same as with a ``prefix=`` index. A
prefix of thousands of words (one letter), which FTS5 merges in about 1 s and whose
words would take 0.1 s of seeks to start, matches nearly every message: its query is
answered by testing the newest messages that pass the filters one by one against it
(:mod:`sessiondb.search_rows`; their tokens, the rank data FTS5 would give, FTS5's own
snippets), while that is estimated cheaper than the merge: the same hits in the same
order.

**Limits.** A statement of a prefix written out starts with a seek per word (about 45
microseconds each on a million messages), so a prefix is written out only when that,
over the statements a search may run, costs less than FTS5's merge
(:mod:`sessiondb.search_prefix`): a prefix of thousands of words (one letter) is
merged, about 1 s, when its messages cannot be tested one by one (a shape
:mod:`sessiondb.search_rows` does not test, such as ``(a* OR b) c``; a walk estimated
dearer than the merge, such as ``a* zebra`` with a rare ``zebra``; messages not indexed
yet). Such a prefix, a query in FTS5 syntax the rewrite does not read (``NEAR``, column
filters, ``^``) and a search inside a write transaction run as FTS5 reads them: as few
statements as possible, every phrase weighted alike (also when tested one by one).
``a NOT b`` with ``b`` in nearly every message reads both doclists until the window is
full: with a filter that keeps few of its matches, all of them in the block (about 11
ms per 262,144 ids), and all of them in the store when the page needs more matches than
the blocks before it hold. The snippet of a prefix query may show another passage of
the message than FTS5 with the prefix would: FTS5 prefers the passage with the most
different phrases, and each word of the prefix is one. ``limit=None`` ranks every
match, window by window.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import apsw

from . import fts_tables, records, search_index, search_prefix, search_rows
from .search_costs import scan_cost
from .search_hits import IN_LIST, Page, complete_hits
from .search_prefix import merges_doclists
from .search_queries import Queries, Run
from .search_rank import Scorer, prepare
from .search_walks import Plan, band_of, candidates, make_plan
# The reading of hits and the constants that shape them are part of this module's
# interface (the hermes-agent facade reads hits through it).
from .search_hits import (CONTEXT_BYTES, SNIPPET_BUDGET, fetch_hits, long_message_snippet,
                          message_head)
from .search_rank import IDF_SLICE

__all__ = ["CONTEXT_BYTES", "HORIZON", "IDF_SLICE", "SNIPPET_BUDGET", "WINDOW", "Filters",
           "Page", "Run", "fetch_hits",
           "long_message_snippet", "message_head", "ranked_ids", "search_messages"]

#: Matches ranked together: the newest WINDOW, then the WINDOW before them, ...
WINDOW = 1000
#: ... each within one block of this many ids (fewer matches if fewer are there).
HORIZON = 1 << 18
_QUOTED = re.compile(r'"[^"]*"\*?')

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
        return f"{column} {op} {IN_LIST}", [json.dumps(list(items))]


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
    complete_hits(conn, hits, match)
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
    prepare(conn)
    search_prefix.new_search(conn)
    queries = Queries(conn, match)
    plan = make_plan(conn, filters)
    windows: list[list[tuple[int, str]]] = []
    scan_us: float | None = None
    from_texts = False
    skipped = 0  # matches in the windows before the page's first
    taken = 0  # matches in ``windows``
    each = _windows(conn, queries, filters, plan)
    try:
        for found, us, tested in each:
            scan_us = us if scan_us is None else scan_us
            from_texts |= tested
            if not windows and skipped + len(found) <= offset:
                skipped += len(found)  # a window wholly before the page: not ranked
            elif found:
                windows.append(found)
                taken += len(found)
            if 0 <= end <= skipped + taken:
                break
    finally:
        each.close()  # a window read by a statement still open (_merged_windows)
    if not windows:
        run = queries.run(fts_tables.tables(conn)[0].name)[0]
        return Page([], scan_us or 0.0, run.match, run.statement_us)
    run = queries.run(fts_tables.table_for(conn, windows[0][0][0]).name)[0]
    shape = search_rows.parse(conn, match) if " NOT " in match else None
    scorer = Scorer(conn, lambda table: queries.phrases(table, phrases), windows[0][0][1],
                    None if shape is None else [p.excluded for p in shape.phrases])
    ordered = [rowid for window in windows for rowid in scorer.order(window)]
    start = offset - skipped
    ids = ordered[start:] if limit < 0 else ordered[start:start + limit]
    return Page(ids, scan_us or 0.0, run.match, run.statement_us, from_texts)


def _windows(conn: apsw.Connection, queries: Queries, filters: Filters,
             plan: "Plan | None") -> Iterator[tuple[list[tuple[int, str]], float, bool]]:
    """The windows of the order (module docstring), newest first: each one's matches
    newest first, the microseconds per id of a range read
    (:func:`sessiondb.search_walks.candidates`), and
    whether they were found by :func:`_tested` for a query whose statements merge whole
    doclists (their snippets are then made from their texts). A window
    lies in one block and one table of the index (whose bounds are block starts, except
    in an index made before 0.8)."""
    top = -1 if plan is None else plan.hi
    while plan is not None and top >= plan.lo:
        table = fts_tables.table_for(conn, top)
        floor = plan.lo if table.lo is None else max(plan.lo, table.lo)
        run, test = queries.run(table.name)
        bottom = _block_start(top, floor)
        part = dataclasses.replace(plan, lo=bottom, hi=top, table=table.name)
        found = None
        if test is not None:
            found = _tested(conn, test, band_of(conn, filters, plan), part,
                            queries.merge_cost_us(table.name))
        if found is not None:
            yield found, 0.0, True
        elif merges_doclists(conn, run.match):
            # Each statement would merge the whole doclists again, whatever its range
            # (a one-letter prefix: about 1 s on a million messages): the table's
            # windows left are cut from one statement's rows instead of one statement
            # per window.
            yield from _merged_windows(conn, run, dataclasses.replace(
                plan, lo=floor, hi=top, table=table.name))
            top = floor - 1
            continue
        else:
            found, us = candidates(conn, run, filters, part, WINDOW,
                                    queries.row_test(table.name))
            yield found, us, False
            if (len(found) == WINDOW and "session_walk" not in plan.memo
                    and run.statement_us > us * (top - found[-1][0] + 1)):
                # A statement of this query costs more to start than reading a
                # window's ids (a prefix written out as many words, each sought in every
                # segment): the table's windows below, read for a deep page, are cut
                # from one statement's rows instead of one statement each.
                yield from _merged_windows(conn, run, dataclasses.replace(
                    plan, lo=floor, hi=found[-1][0] - 1, table=table.name))
                top = floor - 1
                continue
        if len(found) == WINDOW:
            top = found[-1][0] - 1
        else:  # the block is done
            top = _newest_below(conn, filters, plan, bottom)


def _newest_below(conn: apsw.Connection, filters: Filters, plan: "Plan", bottom: int
                  ) -> int:
    """The newest id below ``bottom`` of a message the plan's range may hold (of its
    session, with a session filter), or ``plan.lo - 1``: the next window starts in its
    block, past the blocks that hold no message (an import may keep ids far apart:
    one statement per empty block of 262,144 ids made a store with a message at id
    10**12 and one at 5 take hours to search)."""
    if filters.session_id is None:
        sql, args = "SELECT max(id) FROM messages WHERE id < ?", (bottom,)
    else:
        sql, args = ("SELECT max(id) FROM messages WHERE session_id = ? AND id < ?",
                     (filters.session_id, bottom))
    newest = conn.execute(sql, args).fetchone()[0]
    return plan.lo - 1 if newest is None else newest


def _block_start(top: int, lo: int) -> int:
    """The lowest id of the window that starts at ``top``: the first of the block of
    :data:`HORIZON` ids holding ``top`` (ids 1 to HORIZON, then HORIZON + 1 to 2 *
    HORIZON, ...), or ``lo`` if higher. Fixed blocks rather than a span counted from the
    newest id: a message appended (or deleted) between two pages moves no window but
    the newest block's."""
    return max(lo, (top - 1) // HORIZON * HORIZON + 1)


def _merged_windows(conn: apsw.Connection, run: Run, plan: "Plan"
                    ) -> Iterator[tuple[list[tuple[int, str]], float, bool]]:
    """The windows from the plan's newest id down, as :func:`_windows` gives them, cut
    from one walk of the matches in the plan's range (for a query whose statements
    merge whole doclists)."""
    sql = fts_tables.on(plan.table, (
        f"SELECT messages_fts.rowid, CASE WHEN {plan.where} THEN {run.rank} END "
        f"FROM messages_fts{plan.joins} WHERE messages_fts MATCH ? AND "
        "messages_fts.rowid BETWEEN ? AND ? ORDER BY messages_fts.rowid DESC"))
    window: list[tuple[int, str]] = []
    bottom = _block_start(plan.hi, plan.lo)
    visited, began = 0, time.perf_counter()

    def cost(rowid: int) -> float:
        ids = plan.hi - rowid + 1
        return scan_cost(visited, ids, (time.perf_counter() - began) * 1e6 / ids)

    cursor = conn.execute(sql, (*plan.args, run.match, plan.lo, plan.hi))
    try:
        for rowid, data in cursor:
            visited += 1
            if data is None:
                continue
            if rowid < bottom:  # the window's range holds no more matches
                if window:  # (blocks without a match between: no window to yield)
                    yield window, cost(rowid), False
                window, bottom = [], _block_start(rowid, plan.lo)
            window.append((rowid, data))
            if len(window) == WINDOW:
                yield window, cost(rowid), False
                window, bottom = [], _block_start(rowid - 1, plan.lo)
    finally:
        cursor.close()
    if window:
        yield window, cost(plan.lo), False


def _tested(conn: apsw.Connection, test: search_rows.RowTest,
            band: Callable[[int, int], Iterable[tuple[int, Any]]], plan: "Plan",
            budget_us: float) -> list[tuple[int, str]] | None:
    """The newest :data:`WINDOW` matches of a query FTS5 would merge whole doclists
    for with ids in the plan's range, found by testing the newest messages ``band``
    gives (:mod:`sessiondb.search_rows`); None when that is estimated to cost more
    than the merge (``budget_us``), or cannot be done."""
    return search_rows.newest_matches(conn, test, band, plan.lo, plan.hi, WINDOW,
                                      budget_us)
