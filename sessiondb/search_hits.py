"""The hits of a search, once :mod:`sessiondb.search` has chosen them: their rows, a
snippet of each, and the messages around it.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import apsw

from . import fts_tables, records
from .backend import fetch as _fetch, first as _first
from . import search_prefix
from .text import plain_snippet

#: An FTS5 statement's start (its seek in every segment; microseconds, measured on a
#: million-message store).
US_STATEMENT = 150.0
# A list argument as one bound JSON array: ``IN (?, ?, ...)`` fails past SQLite's
# 32,766 variables, and its statement text grows with the list.
IN_LIST = "(SELECT value FROM json_each(?))"
# snippet() for a message while its bytes x query phrases stay under this (at most
# ~10,000 matches: under a second even when every word matches); see fetch_hits.
SNIPPET_BUDGET = 20_000
# Bytes of the hits' texts read for their words, so that the hits of a prefix written
# as an OR of many words are read by a query of only the words they hold (its start
# costs a seek per word); see fetch_hits.
WORDS_OF_HITS = 256_000
_PLAIN_SNIPPET_SCAN = 1_000_000  # bytes of a long message searched for its snippet
#: Bytes of a context message read (200 characters are at most 800 bytes).
CONTEXT_BYTES = 800
# The context of each hit of a page: the previous message, the hit and the next one of
# its session, each as (the hit's id, role, id, size, its bytes when they are few; see
# message_head), in one statement for the page (one per hit took 1.7-1.9 ms a page of
# 20, this 0.2-0.3 ms, measured on a million messages).
_CONTEXT_SQL = (
    "WITH h(k, sid, hid) AS (SELECT key, value ->> 0, value ->> 1 FROM json_each(?)) "
    "SELECT h.hid, m.role, m.id, octet_length(m.content), CASE WHEN "
    f"octet_length(m.content) <= {CONTEXT_BYTES} THEN CAST(m.content AS BLOB) END "
    "FROM h CROSS JOIN messages m WHERE m.id IN ("
    " (SELECT id FROM messages WHERE session_id = h.sid AND id < h.hid ORDER BY id DESC"
    "  LIMIT 1), h.hid,"
    " (SELECT id FROM messages WHERE session_id = h.sid AND id > h.hid ORDER BY id LIMIT 1))"
    " AND m.session_id = h.sid ORDER BY h.k, m.id"
)
_HIT_SQL = (
    "SELECT m.id, m.session_id, m.role, CASE WHEN octet_length(m.content) * ? <= ? "
    "THEN snippet(messages_fts, 0, '>>>', '<<<', '...', 40) END, m.timestamp, "
    "m.tool_name, s.source, s.model, s.started_at FROM messages_fts "
    "CROSS JOIN messages m ON m.id = messages_fts.rowid "
    "JOIN sessions s ON s.id = m.session_id WHERE messages_fts MATCH ? "
    # The unary plus keeps the list away from FTS5, which would run the whole query
    # once per listed id (a prefix query: a full doclist merge each time).
    f"AND messages_fts.rowid BETWEEN ? AND ? AND +messages_fts.rowid IN {IN_LIST}"
)


class Page(NamedTuple):
    """One page of hits, as :func:`sessiondb.search.ranked_ids` returns it."""

    ids: list[int]  #: message ids, in the window order
    scan_us: float  #: estimated microseconds per id of a range read (for fetch_hits)
    #: the query as run (its prefixes written out, see sessiondb.search_prefix), or None
    match: str | None = None
    statement_us: float = 0.0  #: a statement's start beyond any statement's, for it
    #: the hits were found by testing messages (sessiondb.search_rows): read them from
    #: the tables, their snippets made by FTS5 over a table of their texts alone
    from_texts: bool = False


def fetch_hits(conn: apsw.Connection, match: str, page: Page, terms: int) -> list[tuple]:
    """The rows of the hits of ``page``, in its order: ``(id, session_id, role, snippet,
    timestamp, tool_name, source, model, started_at)``; ``snippet`` is None for a message
    too long for FTS5's ``snippet()`` (see :func:`long_message_snippet`).

    Hits are read by range queries, one per group of hits close enough that reading the
    ids between them costs less than another query's start (by the pace the walk
    showed), or a single one when every query merges whole doclists. A query whose
    prefixes the page wrote out as ORs of words (:mod:`sessiondb.search_prefix`) is
    written again with only the words of the hits' texts: among them it matches the
    same rows with the same phrase occurrences, so the same snippets, and starts faster.
    A page marked ``from_texts`` (hits found by :mod:`sessiondb.search_rows`) is read
    from the tables, the snippets made by FTS5 over a temporary table of the hits'
    texts alone: the same snippets for the queries that module tests, without the
    merge of a prefix's doclists.

    FTS5's ``snippet()`` takes time that grows with the square of the matches in a
    message (a 10 MB one: hours, holding a read transaction); each phrase of the query
    can match every word, so past a budget of ``terms`` x bytes it is not called.
    (``octet_length``, because ``length()`` stops at a NUL.)

    :param terms: the number of phrases of ``match``, for that budget.
    """
    if page.from_texts:
        return _hits_from_texts(conn, match, page.ids, terms)
    rows: dict[int, tuple] = {}
    by_table: dict[str, list[int]] = {}
    for rowid in sorted(page.ids):
        by_table.setdefault(fts_tables.table_for(conn, rowid).name, []).append(rowid)
    single = len(by_table) == 1 and len(fts_tables.tables(conn)) == 1
    for table, ids in by_table.items():
        as_run, start_us = page.match or match, page.statement_us
        if not single:  # the page's query is written out with one table's words
            expansion = search_prefix.expand(conn, match, table=table)
            as_run, start_us = (match, 0.0) if expansion is None else (
                expansion.match, expansion.statement_us)
        rows.update(_table_hits(conn, table, match, as_run, start_us, page.scan_us, ids,
                                terms))
    return [rows[i] for i in page.ids if i in rows]


def _table_hits(conn: apsw.Connection, table: str, match: str, as_run: str,
                start_us: float, scan_us: float, ids: list[int], terms: int
                ) -> dict[int, tuple]:
    """The rows of the hits ``ids`` (sorted) of one index table, by id (see
    :func:`fetch_hits`); ``as_run``: the query as the search ran it on that table."""
    rows: dict[int, tuple] = {}
    run = as_run
    if ids and start_us > US_STATEMENT:
        words = search_prefix.words_of(conn, ids, WORDS_OF_HITS)
        narrowed = None if words is None else search_prefix.expand(conn, match, words,
                                                                   table=table)
        if narrowed is not None:
            run, start_us = narrowed.match, narrowed.statement_us
    gap = (US_STATEMENT + start_us) / max(scan_us, 1e-9)
    groups = [ids] if ids and search_prefix.merges_doclists(conn, run) else _clusters(ids, gap)
    sql = fts_tables.on(table, _HIT_SQL)
    for group in groups:
        for row in _fetch(conn, sql, (terms, SNIPPET_BUDGET, run, group[0], group[-1],
                                      json.dumps(group))):
            rows[row[0]] = row
    missing = [i for i in ids if i not in rows]
    if missing and run != as_run:  # not expected: ask the whole query
        for row in _fetch(conn, sql, (terms, SNIPPET_BUDGET, as_run, missing[0],
                                      missing[-1], json.dumps(missing))):
            rows[row[0]] = row
    return rows


_TEXTS_SQL = (
    "SELECT m.id, m.session_id, m.role, NULL, m.timestamp, m.tool_name, s.source, s.model, "
    "s.started_at, CASE WHEN octet_length(m.content) * ? <= ? THEN 1 END FROM messages m "
    f"JOIN sessions s ON s.id = m.session_id WHERE m.id IN {IN_LIST}"
)
# A table of the hits' texts alone, for their snippets: FTS5's snippet() of a message
# depends on its text and the query's phrase instances in it, which for the queries
# sessiondb.search_rows can test are given by the text alone (see there); so it is the
# snippet over the whole index, without reading the index (a prefix's merge of
# doclists over every message).
_SNIPPETS = "temp.sessiondb_snippets"


def _hits_from_texts(conn: apsw.Connection, match: str, ids: list[int], terms: int
                     ) -> list[tuple]:
    """The rows of hits as :func:`fetch_hits` gives them, read from the tables, their
    snippets made by FTS5 over a temporary table of their texts (under the same
    budget)."""
    rows = {row[0]: row for row in _fetch(conn, _TEXTS_SQL, (terms, SNIPPET_BUDGET,
                                                              json.dumps(ids)))}
    wanted = [i for i in ids if i in rows and rows[i][9]]
    snippets: dict[int, str] = {}
    if wanted:
        conn.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS {_SNIPPETS} USING fts5(content)")
        try:
            conn.execute(f"INSERT INTO {_SNIPPETS} (rowid, content) SELECT id, content FROM "
                         f"messages WHERE id IN {IN_LIST}", (json.dumps(wanted),))
            snippets = dict(_fetch(
                conn, f"SELECT rowid, snippet(sessiondb_snippets, 0, '>>>', '<<<', '...', "
                      f"40) FROM {_SNIPPETS} WHERE sessiondb_snippets MATCH ?", (match,)))
        finally:
            conn.execute(f"DELETE FROM {_SNIPPETS}")
    return [(*rows[i][:3], snippets.get(i), *rows[i][4:9]) for i in ids if i in rows]


def complete_hits(conn: apsw.Connection, hits: list[dict[str, Any]], match: str) -> None:
    """Give each hit of :func:`sessiondb.search.search_messages` its ``context`` (the
    previous message of its session, itself and the next one, each
    :data:`CONTEXT_BYTES` at most), and its snippet when FTS5's was not made.

    :param match: a query as :func:`~sessiondb.text.sanitize_fts_query` returns it.
    """
    around: dict[int, list[dict[str, Any]]] = {hit["id"]: [] for hit in hits}
    if hits:
        pairs = json.dumps([[hit["session_id"], hit["id"]] for hit in hits])
        for hit_id, role, rowid, size, inline in _fetch(conn, _CONTEXT_SQL, (pairs,)):
            around[hit_id].append(records.context_item((role, _decode(message_head(
                conn, rowid, size, inline, CONTEXT_BYTES)))))
    for hit in hits:
        if hit["snippet"] is None:
            hit["snippet"] = long_message_snippet(conn, hit["id"], match)
        hit["context"] = around[hit["id"]]


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
