"""A search's query as it is run on each table of the full-text index
(:mod:`sessiondb.fts_tables`): its prefixes written out with that table's words
(:mod:`sessiondb.search_prefix`), or tested row by row (:mod:`sessiondb.search_rows`).
Used by :mod:`sessiondb.search`."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import apsw

from . import search_prefix, search_rows
from .search_prefix import merges_doclists
from .search_rank import rank_sql


class Run(NamedTuple):
    """A query as it is run: its FTS5 text, the SQL of its rows' rank data, and what a
    statement of it costs to start beyond any statement's (see
    :mod:`sessiondb.search_prefix`)."""

    match: str
    rank: str = rank_sql(None)
    statement_us: float = 0.0


class Queries:
    """The query as run on each table of the index (:mod:`sessiondb.fts_tables`): its
    prefixes written out with that table's words (:mod:`sessiondb.search_prefix`), or
    tested row by row (:mod:`sessiondb.search_rows`); made when a window first reaches
    the table."""

    def __init__(self, conn: apsw.Connection, match: str) -> None:
        self.conn, self.match = conn, match
        self._made: dict[str, tuple[Run, search_rows.RowTest | None, bool]] = {}
        self._costs: dict[str, float] = {}
        self._tests: dict[str, search_rows.RowTest | None] = {}

    def run(self, table: str) -> tuple[Run, search_rows.RowTest | None]:
        """The query as run on ``table``, and its row test when its statements would
        merge whole doclists and its shape can be tested."""
        if table not in self._made:
            conn, match = self.conn, self.match
            expansion = search_prefix.expand(conn, match, table=table)
            run = Run(match) if expansion is None else Run(
                expansion.match, rank_sql(search_prefix.group_spec(expansion.groups)),
                expansion.statement_us)
            test = None
            if expansion is None and merges_doclists(conn, match):
                test = search_rows.parse(conn, match)
            self._made[table] = (run, test, expansion is not None)
        return self._made[table][:2]

    def row_test(self, table: str) -> search_rows.RowTest | None:
        """The row test of a query whose prefixes are written out on ``table`` (None for
        any other query, or a shape that cannot be tested): one way of finding the
        matches of a filter that keeps few of them, where each statement of a walk of
        its sessions would start with a seek per word (:func:`sessiondb.search.
        _candidates`)."""
        if table not in self._tests:
            self.run(table)
            written_out = self._made[table][2]
            self._tests[table] = search_rows.parse(self.conn, self.match) if written_out \
                else None
        return self._tests[table]

    def merge_cost_us(self, table: str) -> float:
        """FTS5's merge of the query's prefixes on ``table``, estimated (once per
        table)."""
        if table not in self._costs:
            self._costs[table] = search_prefix.merge_cost_us(self.conn, self.match, table)
        return self._costs[table]

    def phrases(self, table: str, phrases: Sequence[str] | None) -> Sequence[str] | None:
        """The query's phrases as run on ``table`` (for bm25's document frequencies);
        None when its statements merge whole doclists (they would be counted at that
        cost)."""
        run = self.run(table)[0]
        if merges_doclists(self.conn, run.match):
            return None
        if self._made[table][2] and phrases is not None and len(phrases) > 1:
            return [getattr(search_prefix.expand(self.conn, p, table=table), "match", p)
                    for p in phrases]
        return phrases
