"""The statements that read one slice of ids for :mod:`sessiondb.pg.search`, and what
each way of reading it is estimated to cost.

Four ways find the same rows of a slice: the *walk* (the primary key, newest first,
each row tested), the *bands* (one ``UNION ALL`` branch per band of the GIN index that
holds ids of the slice, see :mod:`sessiondb.pg.bands`), the *sessions* of a source
filter (each one's messages from the ``(session_id, id)`` index), and for a phrase the
*pairs* (the messages holding its adjacent word pairs, from the index of
:mod:`sessiondb.pg.pairs`, each row tested). The unit costs below
were measured on a million messages of about 1 KB.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from ..search import Filters
from . import bands, pairs
from .conn import PgConn

__all__ = ["Plan", "parts", "band_ids", "gin_cost", "gin_estimate", "pairs_estimate",
           "usable", "MAX_WALKED_SESSIONS"]

# Unit costs (microseconds, measured on a million messages of about 1 KB): a posting
# of the GIN index read (of a prefix's several lists: merged), a match found by the
# index (its row read, its rank); the bounds of a walk's measured pace per id (a walk
# preempted by another process must not look like a slow query).
US_TID = 0.15
US_PREFIX_TID = 0.45
US_GIN_MATCH = 3.0
US_MIN_PER_ID = 0.3
US_MAX_PER_ID = 10.0
US_RANGE_ID = 0.07  # an id in a bitmap of the primary key
US_SESSION = 5.0  # a session of the filter looked up in the (session_id, id) index
US_ROW = 3.0  # one of its messages read and checked
#: Walking more sessions than this is never chosen (listing them alone costs too much).
MAX_WALKED_SESSIONS = 2000

#: Seconds the column statistics read for the cost of the GIN index are kept.
STATS_TTL = 300.0


def parts(segments: list[bands.Segment], lowest: int, top: int, lo: int, hi: int
          ) -> list[tuple[bands.Segment, int, int, bool]]:
    """The segments holding ids ``lo``..``hi``: ``(segment, first id, last id, whole)``,
    newest first; ``whole`` when those are all of the segment's ids from ``lowest`` to
    ``top`` (its statement then needs no range of ids)."""
    out = []
    for seg in segments:
        end = top if seg.hi is None else min(top, seg.hi - 1)
        a, b = max(lo, seg.lo), min(hi, end)
        if a <= b:
            out.append((seg, a, b, a <= max(seg.lo, lowest) and b >= end))
    return out


def band_ids(seg: bands.Segment, lowest: int, top: int) -> int:
    """The ids of the store in ``seg`` (its index holds their postings)."""
    end = top if seg.hi is None else min(top, seg.hi - 1)
    return max(0, end - max(seg.lo, lowest) + 1)


def gin_cost(gin: tuple[float, float], segments: list[bands.Segment], lowest: int,
             top: int, lo: int, hi: int, us_per_id: float, total: int) -> float:
    """Estimated microseconds of the GIN indexes over ids ``lo``..``hi``: the posting
    lists of every band touched (whole, whatever part of it is wanted), a bitmap of the
    ids of a band read in part, the matches' rows; ids without an index are walked."""
    gin_us, candidates = gin
    cost = 0.0
    for seg, a, b, whole in parts(segments, lowest, top, lo, hi):
        if seg.index is None:
            cost += us_per_id * (b - a + 1)
            continue
        cost += gin_us * max(band_ids(seg, lowest, top), b - a + 1) / total
        if not whole:
            cost += US_RANGE_ID * (b - a + 1)
        cost += US_GIN_MATCH * candidates * (b - a + 1) / total
    return cost



class Plan:
    """The statements of a search's slices, with its filters."""

    def __init__(self, filters: Filters, tsquery: str, indexed: str) -> None:
        where = ["m.id BETWEEN %(lo)s AND %(hi)s"]
        self.args: dict[str, Any] = {"q": tsquery, "qi": indexed}
        if filters.session_id is not None:
            where.append("m.session_id = %(session)s")
            self.args["session"] = filters.session_id
            self.bounds = "FROM messages WHERE session_id = %(session)s"
        else:
            self.bounds = "FROM messages"
        if filters.roles:
            where.append("m.role = ANY(%(roles)s::text[])")
            self.args["roles"] = list(filters.roles)
        of_sessions = []
        if filters.sources:
            of_sessions.append("s.source = ANY(%(sources)s::text[])")
            self.args["sources"] = list(filters.sources)
        if filters.exclude_sources:
            of_sessions.append("s.source <> ALL(%(exclude)s::text[])")
            self.args["exclude"] = list(filters.exclude_sources)
        self.by_session = bool(of_sessions)
        self.of_sessions = " AND ".join(of_sessions) or "true"
        join = " JOIN sessions s ON s.id = m.session_id" if of_sessions else ""
        cond = " AND ".join(where + of_sessions)
        # IS TRUE: an expression the GIN index cannot serve, so the walk reads the
        # slice's ids newest first and stops at the LIMIT; the rank is computed for
        # the rows it returns only.
        match = "(m.content_tsv @@ %(q)s::tsquery) IS TRUE"
        self.walk = (f"SELECT m.id, ts_rank(m.content_tsv, %(q)s::tsquery, 1) FROM "
                     f"messages m{join} WHERE {cond} AND {match} "
                     "ORDER BY m.id DESC LIMIT %(limit)s")
        # One branch per band: its predicate written out (the planner proves its
        # partial index usable from it), the ids wanted of it, the filters.
        self.branch = (f"(SELECT m.id, m.content_tsv AS tsv FROM messages m{join} WHERE "
                       "{range} AND " + " AND ".join(where[1:] + of_sessions + [
                           "m.content_tsv @@ %(qi)s::tsquery"]
                           + ([] if indexed == tsquery else [match]))
                       + " ORDER BY m.id DESC LIMIT %(limit)s)")
        # The rank of the rows kept only: the bands may return many more.
        ranked = "SELECT id, ts_rank(tsv, %(q)s::tsquery, 1) FROM ({}) AS x"
        # Each session of the filter, its messages in the slice from the
        # (session_id, id) index: a rare source is never read among all messages.
        inner = " AND ".join(["m.session_id = s.id"] + where)
        self.by_sessions = ranked.format(
            f"SELECT m.id, m.content_tsv AS tsv FROM sessions s CROSS JOIN LATERAL "
            f"(SELECT m.id, m.content_tsv FROM messages m WHERE {inner} AND {match} "
            f"ORDER BY m.id DESC LIMIT %(limit)s) m WHERE {self.of_sessions} "
            "ORDER BY m.id DESC LIMIT %(limit)s")
        self.ranked = ranked
        # The messages holding the phrase's pairs (the index of pairs is the only one
        # the statement can use: the query itself is tested on each row, with IS TRUE),
        # then the filters; {range}: the slice's ids, unless it is every id.
        self.by_pairs = ranked.format(
            f"SELECT m.id, m.content_tsv AS tsv FROM messages m{join} WHERE "
            "sessiondb_pairs(m.content_tsv) @@ %(qp)s::tsquery{range} AND "
            + " AND ".join(where[1:] + of_sessions + [match])
            + " ORDER BY m.id DESC LIMIT %(limit)s") + " ORDER BY id DESC"

    def use_pairs(self, pair_query: str) -> None:
        """Let the slices be read by the index of pairs, asked ``pair_query``
        (:func:`.pairs.query`)."""
        self.args["qp"] = pair_query

    def gin(self, parts: list[tuple[bands.Segment, int, int, bool]]) -> str:
        """The statement reading ``parts`` (see :func:`parts`) from their bands."""
        branches = []
        for seg, a, b, whole in parts:
            # A band read whole needs no range; in part, the range lets the planner
            # intersect the band with a bitmap of the primary key (fewer rows read).
            # Ids without an index: the primary key's bitmap, each row checked.
            ranges = [seg.where] if seg.where else []
            if not whole or seg.index is None:
                ranges.append(f"m.id BETWEEN {a} AND {b}")
            branches.append(self.branch.replace("{range}", " AND ".join(ranges)))
        union = branches[0] if len(branches) == 1 else " UNION ALL ".join(branches)
        return self.ranked.format(f"SELECT id, tsv FROM ({union}) AS u "
                                  "ORDER BY id DESC LIMIT %(limit)s") + " ORDER BY id DESC"

    def sessions(self, conn: PgConn) -> tuple[int, int]:
        """The filter's sessions and their messages, counted up to one past
        :data:`MAX_WALKED_SESSIONS` sessions."""
        return conn.raw.execute(
            "SELECT count(*), coalesce(sum(message_count), 0)::bigint FROM (SELECT "
            f"message_count FROM sessions s WHERE {self.of_sessions} "
            f"LIMIT {MAX_WALKED_SESSIONS + 1}) x",
            self.args, prepare=False).fetchone()

    def slice(self, conn: PgConn, way: str, lo: int, hi: int, limit: int,
              parts: list[tuple[bands.Segment, int, int, bool]]) -> list[tuple[int, float]]:
        args = {**self.args, "lo": lo, "hi": hi, "limit": limit}
        if way == "walk":
            return conn.raw.execute(self.walk, args, prepare=False).fetchall()
        if way == "sessions":
            return conn.raw.execute(self.by_sessions, args, prepare=False).fetchall()
        # The GIN indexes (of the bands, or of the pairs): an index scan would be the
        # walk again, a sequential scan all of the table. Joining sessions (a source
        # filter): no hash join, which each band would build again from every session
        # of the filter (measured on a million messages, 3 bands: 11 ms, and 8 ms with
        # a nested loop looking up each row's session), and no parallel workers (the
        # planner's answer to the dearer joins: worse, 1-3 ms to start each).
        if way.startswith("pairs"):
            # Always bounded: the pairs index covers every message, not a band's, so
            # a slice that spans whole bands still must not read above ``hi`` (ids
            # an earlier slice returned) or below ``lo``.
            sql = self.by_pairs.replace("{range}", " AND m.id BETWEEN %(lo)s AND %(hi)s")
        else:
            sql = self.gin(parts)
        names = ["enable_indexscan", "enable_seqscan"]
        if self.by_session:
            names += ["enable_hashjoin", "enable_mergejoin"]
        settings = [(n, "off") for n in names] + [("max_parallel_workers_per_gather", "0")]
        old = conn.raw.execute(
            "SELECT " + ", ".join(f"current_setting('{n}'), set_config('{n}', '{v}', true)"
                                  for n, v in settings), prepare=False).fetchone()[::2]
        try:
            return conn.raw.execute(sql, args, prepare=False).fetchall()
        finally:
            if usable(conn):
                conn.raw.execute("SELECT " + ", ".join(
                    f"set_config('{n}', %s, true)" for n, _ in settings), old,
                    prepare=False)


def usable(conn: Any) -> bool:
    """Whether the transaction can still run statements (not failed by an error)."""
    return conn.raw.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


_STATS: dict[tuple[Any, ...], tuple[float, tuple[dict[str, float], float] | None]] = {}
_WORD_STATS_SQL = (
    "SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
    "WHERE schemaname = current_schema() AND tablename = 'messages' "
    "AND attname = 'content_tsv'")


def _shares(conn: PgConn, schema: str, sql: str) -> tuple[dict[str, float], float] | None:
    """The most common elements of a ``tsvector`` column and their share of rows, and
    the share of an element missing from them (half the rarest's, as PostgreSQL's own
    estimate), from ``pg_stats`` (cached for :data:`STATS_TTL` seconds); None when
    the column has no statistics yet."""
    info = conn.raw.info
    key = (info.host, info.port, info.dbname, schema, sql)
    cached = _STATS.get(key)
    if cached is None or cached[0] < time.monotonic():
        row = conn.raw.execute(sql, prepare=False).fetchone()
        found = None
        if row is not None and row[0] is not None:
            elems, freqs = row
            rarest = freqs[len(elems)] if len(freqs) > len(elems) else 0.0
            found = (dict(zip(elems, freqs)), rarest / 2)
        cached = (time.monotonic() + STATS_TTL, found)
        _STATS[key] = cached
    return cached[1]


def gin_estimate(conn: PgConn, schema: str,
                 groups: list[list[tuple[bool, list[tuple[str, bool]], str]]],
                 messages: int) -> tuple[float, float]:
    """Microseconds the GIN index takes to find every match of ``query`` (it reads
    whole posting lists, whatever the slice), and the number of rows it returns
    (each is read, and checked again for a phrase or NOT), estimated from the column's
    statistics (the most common lexemes and their share of messages; cached for
    :data:`STATS_TTL` seconds): an AND reads about the shortest list of its terms,
    an OR all of its groups', a prefix every list of its lexemes; a lexeme missing
    from the statistics is rarer than the rarest there."""
    share, rarest = _shares(conn, schema, _WORD_STATS_SQL) or ({}, 0.0)
    us = rows = 0.0
    for group in groups:
        # The index merges every list of a prefix's lexemes up front, but of the other
        # lexemes of an AND it reads the shortest list and skips through the longer
        # ones to each of its entries (a word in every message ANDed with a rare one
        # costs what the rare one does: summing the lists made a pasted paragraph
        # look a hundred times dearer than it is, and walk the whole table instead).
        # The rows it returns are those holding every term (taken as independent),
        # each of them all the lexemes of its phrase.
        group_us, group_rows = 0.0, 1.0
        plain: list[float] = []
        for negated, lexemes, _ in group:
            if negated:
                # The list of a negated word is read too, and the rows holding it are
                # left out (a negated phrase is checked on the rows instead).
                if len(lexemes) == 1 and not lexemes[0][1]:
                    part = share.get(lexemes[0][0], rarest)
                    plain.append(part)
                    group_rows *= 1.0 - part
                continue
            term_rows = 1.0
            for lexeme, prefix in lexemes:
                if prefix:
                    part = sum(f for e, f in share.items() if e.startswith(lexeme)) + rarest
                    group_us += part * US_PREFIX_TID
                else:
                    part = share.get(lexeme, rarest)
                    plain.append(part)
                term_rows = min(term_rows, part)
            group_rows *= term_rows
        if plain:
            group_us += min(plain) * len(plain) * US_TID
        us += group_us
        rows += group_rows
    return us * messages, rows * messages


def pairs_estimate(conn: PgConn, schema: str, chosen: list[list[tuple[str, str]]],
                   messages: int) -> tuple[float, float]:
    """Microseconds the index of pairs takes to find the candidates of a phrase search
    (the posting list of every key asked, :func:`.pairs.query`), and the rows it
    returns, estimated from the keys' statistics as :func:`gin_estimate` does from the
    words' (a key missing from them holds fewer messages than the rarest there:
    a rare pair's own, and those of the others hashed to it); before the index is
    analyzed, a pair counts as common as the rarer of its two words (never cheaper
    than it may be).

    :param chosen: per group, its pairs ``(pair, key)``.
    """
    stats = _shares(conn, schema, pairs.stats_sql())
    words, rarest_word = _shares(conn, schema, _WORD_STATS_SQL) or ({}, 0.0)

    def share(pair: str, key: str) -> float:
        if stats is not None:
            return stats[0].get(key, stats[1])
        a, _, b = pair.partition(" ")
        return min(words.get(a, rarest_word), words.get(b, rarest_word))

    marked = share("", pairs.MARKER) if stats is not None else 0.0
    us, rows = marked * US_TID, marked
    for group in chosen:
        parts = [share(pair, key) for pair, key in group]
        # As the words of an AND: the shortest list read, the others skipped through.
        us += min(parts) * len(parts) * US_TID
        rows += min(parts)
    return us * messages, min(rows, 1.0) * messages
