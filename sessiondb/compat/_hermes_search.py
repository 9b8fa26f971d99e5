"""``search_messages`` of :mod:`sessiondb.compat.hermes` on each backend, read in the
caller's read transaction.

Both take the query as hermes-agent's sanitizer left it (an FTS5 query, maybe invalid)
and return hermes-agent's hits: ``id``, ``session_id``, ``role``, ``snippet``,
``timestamp``, ``tool_name``, ``source``, ``model``, ``session_started``, ``context``.

- SQLite (:func:`sqlite_hits`): FTS5 itself, through :mod:`sessiondb.search` (its window
  order, bm25 with the phrases of hermes-agent's query); a query FTS5 refuses finds
  nothing.
- PostgreSQL (:func:`pg_hits`): a query FTS5 would refuse finds nothing, as on SQLite
  (FTS5 is asked, in memory: :func:`~sessiondb.compat._hermes_sql.fts5_syntax_ok`); a
  query it accepts is searched by :mod:`sessiondb.pg.search`, whose query language
  reads FTS5's (implicit AND, uppercase ``OR`` and ``NOT``, ``"phrases"``,
  ``prefix*``) once the column filters (``content:``, the only column) are dropped.
  Its order, tokens and snippets are PostgreSQL's (see the differences in
  :mod:`sessiondb.compat.hermes`); the context is hermes-agent's (below).

The context of a hit is hermes-agent's: the messages of its session whose ids are the
hit's id - 1, id and id + 1 (not the session's previous and next message, which
:mod:`sessiondb.search` gives), each ``{"role", "content"}`` with the first 200
characters.
"""

from __future__ import annotations

import re
from typing import Any

import apsw

from .. import search, search_index
from ..backend import Conn, Dialect, fetch as _fetch
from ..text import MAX_QUERY_LENGTH, NO_LIMIT, sanitize_fts_query
from . import _hermes_text as rules
from ._hermes_sql import fts5_syntax_ok

# The neighbours of a hit on SQLite: the bytes of a short one with its row, a long one's
# first 800 read by search.message_head (SQLite would read the whole value for a
# substr() of it).
_CONTEXT_SQL = ("SELECT role, id, octet_length(content), CASE WHEN octet_length(content) "
                "<= 800 THEN CAST(content AS BLOB) END FROM messages "
                "WHERE session_id = ? AND id BETWEEN ? AND ? ORDER BY id")
# The neighbours of every hit at once on PostgreSQL (substr() of a long value there
# reads only the slices it returns).
_PG_CONTEXT_SQL = ("SELECT hm.id, m.role, substr(m.content, 1, 200) FROM messages hm "
                   "JOIN messages m ON m.session_id = hm.session_id "
                   "AND m.id BETWEEN hm.id - 1 AND hm.id + 1 "
                   "WHERE hm.id IN {ids} ORDER BY hm.id, m.id")
_HIT_KEYS = ("id", "session_id", "role", "snippet", "timestamp", "tool_name", "source",
             "model", "session_started")
# A phrase of a hermes-agent query: a quoted string (maybe a prefix), or a bare word
# (maybe with a column filter and a star); the operators are not phrases.
_HERMES_PHRASE = re.compile(r'"[^"]*"\*?|[^\s"]+')
_COLUMN_FILTER = re.compile(r"^[^\s:\"]+:")
# A column filter in a query FTS5 accepted: the one column, or all but it ("-").
_CONTENT_FILTER = re.compile(r"(?i)(?<!\S)content\s*:\s*")
_NO_COLUMN = re.compile(r"(?i)(?<!\S)-content\s*:")


def hermes_phrases(match: str) -> list[str]:
    """The phrases of a sanitized hermes-agent query, each as an FTS5 query, for bm25's
    document frequencies (:func:`sessiondb.search.ranked_ids` checks that they fit the
    query, and weighs the phrases alike when not)."""
    return [_COLUMN_FILTER.sub("", word) for word in _HERMES_PHRASE.findall(match)
            if word not in ("AND", "OR", "NOT")]


def sqlite_hits(conn: apsw.Connection, path: Any, query: str, match: str,
                filters: search.Filters, limit: int, offset: int) -> list[dict[str, Any]]:
    """The hits on SQLite (FTS5); ``limit`` :data:`~sessiondb.text.NO_LIMIT` for all.

    :raises SearchIndexError: the index is marked damaged or being rebuilt.
    """
    search_index.raise_if_damaged(conn, path)
    terms = max(1, len(match.split()))
    try:
        ranked = search.ranked_ids(conn, match, filters,
                                   -1 if limit == NO_LIMIT else limit, offset,
                                   hermes_phrases(match))
        found = search.fetch_hits(conn, match, ranked, terms)
    except apsw.SQLError as exc:
        if "malformed" in str(exc) or "corrupt" in str(exc):
            raise  # damage, not syntax: SearchIndexError (the caller)
        return []  # not valid FTS5 after sanitizing: the original's []
    hits = [dict(zip(_HIT_KEYS, row)) for row in found]
    for hit in hits:
        if hit["snippet"] is None:  # too long for FTS5's snippet()
            hit["snippet"] = search.long_message_snippet(
                conn, hit["id"], sanitize_fts_query(query[:MAX_QUERY_LENGTH]))
        try:
            hit["context"] = [
                {"role": role, "content": rules.head_text(search.message_head(
                    conn, rowid, size, inline, 4 * 200), 200)}
                for role, rowid, size, inline in _fetch(conn, _CONTEXT_SQL, (
                    hit["session_id"], hit["id"] - 1, hit["id"] + 1))]
        except apsw.Error:
            hit["context"] = []
    return hits


def pg_query(match: str) -> str | None:
    """The query for :mod:`sessiondb.pg.search` of a sanitized hermes-agent query: None
    when the original found nothing for it (FTS5 refuses it; or it excludes the only
    column, ``-content:``, which the original answered with nothing when the query had
    no OR), else the query without its column filters (``content:`` names the only
    column; quoted text is left alone)."""
    if not fts5_syntax_ok(match):
        return None
    parts = match.split('"')
    if any(_NO_COLUMN.search(part) for part in parts[::2]):
        return None
    parts[::2] = [_CONTENT_FILTER.sub("", part) for part in parts[::2]]
    return '"'.join(parts)


def pg_hits(conn: Conn, sql: Dialect, path: Any, query: str, filters: search.Filters,
            limit: int, offset: int) -> list[dict[str, Any]]:
    """The hits on PostgreSQL of ``query`` (as :func:`pg_query` gives it), with
    hermes-agent's context; ``limit`` :data:`~sessiondb.text.NO_LIMIT` for all.

    :raises InvalidArgument: the query is longer than 1,000 characters.
    """
    hits = sql.search(conn, path, query, filters, limit, offset)  # type: ignore[attr-defined]
    if not hits:
        return []
    around: dict[int, list[dict[str, Any]]] = {hit["id"]: [] for hit in hits}
    for rowid, role, content in _fetch(conn, _PG_CONTEXT_SQL.format(ids=sql.in_id_list),
                                       (sql.list_arg(around),)):
        around[rowid].append({"role": role, "content": content or ""})
    for hit in hits:
        hit["context"] = around[hit["id"]]
    return hits
