"""The cost model of a search's ways of finding a window's candidates (see
:func:`sessiondb.search_walks.candidates`): what each way is estimated to cost, in
microseconds, from what the first span of the index walk showed. All ways find the same
rows, so the model changes the time of a search, never its result.

Functions of the span's figures and of the filter's sessions (counted once per search,
with one query); used by :mod:`sessiondb.search_walks`. The ``filters`` arguments are
:class:`sessiondb.search.Filters` (not imported here: that module imports this one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import apsw

from .search_rows import US_TESTED, session_conditions

#: Walking more sessions than this is never chosen (listing them alone costs too much).
MAX_WALKED_SESSIONS = 2000
# Unit costs (microseconds, measured on a million-message store) of the ways to find
# candidates: a match read and joined with its message (and session); a message id put
# in the list of a filter's messages; a match read and looked up in that list; a
# session listed with its newest message; a session walked (its first chunk: an index
# read and an FTS5 range query, whose seek dominates).
_US_JOINED_MATCH = 1.6
_US_LISTED_ID = 0.15
_US_LISTED_MATCH = 0.5
_US_LISTED_SESSION = 2.0
_US_WALKED_SESSION = 130.0
_US_MAX_PER_ID = 2.0
# ... a match the walk returned: its join and its rank data; a match read in a range.
_US_MATCH_WORK = 3.0
_US_SCANNED_MATCH = 0.3


def scan_cost(matches: int, ids: int, pace: float, span_density: float | None = None
              ) -> float:
    """Microseconds per id of reading a range of this query's matches: at least their
    reading (``matches`` over ``ids``), or the walk's ``pace`` per id less its work on
    the matches it returned (joins, rank data), which is higher when FTS5 reads much
    more than it returns (``a NOT b`` of two words found everywhere)."""
    density = matches / max(1, ids)
    work = (density if span_density is None else span_density) * _US_MATCH_WORK
    return max(density * _US_SCANNED_MATCH, pace - work)


@dataclass(frozen=True)
class Span:
    """What the first span of the index walk showed."""

    ids: int  # ids it covered
    left: int  # ids below it
    matches: int  # matches read
    kept: int  # matches that passed the filters
    us_per_id: float  # its pace after the first match (0 if it had at most one)


def cheapest_way(conn: apsw.Connection, filters: Any, need: int, span: Span,
                 statement_us: float = 0.0, in_range: float = 1.0,
                 memo: dict[str, Any] | None = None, tested: bool = False) -> str:
    """``"join"``, ``"list"``, ``"sessions"`` or ``"rows"``: the way to find the rest
    of the candidates estimated cheapest (see :func:`sessiondb.search_walks.candidates` and
    :func:`way_costs`)."""
    costs = way_costs(conn, filters, need, span, statement_us, in_range, memo, tested)
    return min(costs, key=costs.__getitem__)


def way_costs(conn: apsw.Connection, filters: Any, need: int, span: Span,
              statement_us: float = 0.0, in_range: float = 1.0,
              memo: dict[str, Any] | None = None, tested: bool = False
              ) -> dict[str, float]:
    """Microseconds each way of finding the rest of the candidates is estimated to
    cost (see :func:`sessiondb.search_walks.candidates`).

    The index walk's cost is what the span cost per id, times the ids still to walk
    (all that are left, or as many as the rate of kept matches says the rest needs):
    a per-match figure alone would miss that FTS5 reads far more than it returns for
    ``a NOT b`` of two common words. The list lookup saves the join of every match;
    the session walk costs a range query per session (``statement_us`` more for a
    query whose statements start slowly), for the share of the filter's sessions
    needed. ``in_range``: the share of the store's ids in the window's range, taken as
    the share of the filter's sessions and messages in it (all of them are listed).
    ``memo``: where the filter's sessions and messages are kept once counted (every
    window of a search asks). ``tested``: the query has a row test; testing the
    filter's messages costs :data:`sessiondb.search_rows.US_TESTED` each, as many as
    the span's rate of matches says the rest needs (all of them, for every match).
    """
    ids, per_id = walk_ids(span, need)
    density = span.matches / span.ids  # matches per id
    count, messages = filter_sessions(conn, filters, {} if memo is None else memo)
    costs = {"join": ids * per_id}
    listed = count <= MAX_WALKED_SESSIONS  # else ``messages`` counts only some of them
    if tested and density > 0 and (listed or need >= 0):
        to_test = messages * in_range if need < 0 else (need - span.kept) / density
        costs["rows"] = (min(to_test, messages * in_range) if listed else to_test) \
            * US_TESTED
    if listed:
        messages, walkable = messages * in_range, count * in_range
        saved = density * (_US_JOINED_MATCH - _US_LISTED_MATCH)
        costs["list"] = messages * _US_LISTED_ID + ids * max(per_id - saved, per_id / 4)
        expected = messages * density  # matches in the filter's sessions
        share = 1.0 if need < 0 or expected <= need else need / expected
        # A session's query, or reading the ids up to the next one's (search_walks._session_walk).
        spacing = (span.ids + span.left) / max(1.0, walkable)
        walked = _US_WALKED_SESSION + min(statement_us, spacing * per_id)
        costs["sessions"] = count * _US_LISTED_SESSION + walkable * share * walked
    return costs


def filter_sessions(conn: apsw.Connection, filters: Any, memo: dict[str, Any]
                    ) -> tuple[int, int]:
    """The sessions passing the filters on sessions, and their messages, counted once
    per search (kept in ``memo``); at most :data:`MAX_WALKED_SESSIONS` + 1 are counted,
    and only their messages."""
    if "sessions" not in memo:
        cond, args = session_conditions(filters)
        memo["sessions"] = tuple(conn.execute(
            "SELECT count(*), coalesce(sum(message_count), 0) FROM (SELECT message_count "
            f"FROM sessions s WHERE {cond} LIMIT ?)", (*args, MAX_WALKED_SESSIONS + 1)
        ).fetchone())
    return memo["sessions"]


def walk_ids(span: Span, need: int) -> tuple[float, float]:
    """The ids the index walk has still to read (all that are left, or as many as the
    rate of kept matches says the rest needs), and its cost per id: the span's pace,
    within what reading and joining the matches alone costs and a bound (a walk
    preempted by another process must not look like a slow query)."""
    ids = float(span.left)
    if span.kept and need >= 0:
        ids = min(ids, (need - span.kept) * span.ids / span.kept)
    density = span.matches / span.ids
    return ids, min(max(span.us_per_id, density * _US_JOINED_MATCH), _US_MAX_PER_ID)


def walk_cost(span: Span, need: int) -> float:
    """Microseconds the index walk below the span is estimated to cost (:func:`walk_ids`)."""
    ids, per_id = walk_ids(span, need)
    return ids * per_id
