"""The index of adjacent word pairs, which narrows a phrase search to the messages
holding its pairs.

A GIN index of the search column knows no positions: ``"a b"`` finds every message
holding both words and checks each one for the phrase. Two common words that are
rarely adjacent (each in 10% of a million messages, side by side in 74) cost 11,300
rows read and checked. So the *pairs* of adjacent lexemes of each message are indexed
too: ``sessiondb_pairs(content_tsv)`` (:data:`FUNCTION_SQL`) is a ``tsvector`` of the
*keys* of the pairs ``"a b"`` of a lexeme ``a`` at a position ``p`` of ``content_tsv``
and ``b`` at ``p + 1``, a key being the pair's hash in :data:`KEYS` buckets, and the
GIN index :data:`INDEX` is on it (one over all messages: a rare pair's posting list is
short everywhere, and a common pair is never read from it, see
:func:`sessiondb.pg.slices.pairs_estimate`). A phrase's search reads the lists of its
pairs' keys (:func:`wanted`, :data:`KEYS_SQL`, :func:`query`) and checks the phrase on
the messages found.

**Keys, not the pairs themselves.** A million messages of about 150 words hold tens
of millions of distinct pairs, most of them once: indexed as text, 3.0 GB, as big as
the table (measured). Hashed into :data:`KEYS` buckets, the index keeps few keys with
long, well compressed posting lists, and a phrase's candidates are the messages of its
buckets: its own, plus on average (pairs in the store) / :data:`KEYS` others, each
checked against the phrase and left out. The hash is ``hashtextextended``, the one
PostgreSQL keeps stable across versions for hash partitioning.

**Exact, never a guess.** The pairs come from ``content_tsv`` itself, so they are
the positions the phrase operator ``<->`` checks: a message matching ``a <-> b``
holds the key of ``"a b"``, and one matching ``a <-> b <-> c`` those of ``"a b"``
and ``"b c"``. Words past position 16,383, which ``to_tsvector`` puts all at 16,383
(so ``x <-> y`` matches for the word ``x`` at 16,382 and *any* word ``y`` after it),
are paired with nothing; such a message is marked with the lexeme :data:`MARKER`
instead, which every pair query finds (its messages are checked like the others).
A message has at most 16,382 pairs: the keys always fit in a ``tsvector``.

**Cost.** Every append computes the keys of its message's pairs and adds an entry
per distinct key to :data:`INDEX`, beside the band's entry per distinct word: measured
on a message of about 1 KB (150 words), 55 us for the keys and 1.1 ms for the whole
append instead of 0.5 ms, one process; the index of a million messages takes 929 MB. On a store holding messages the index is
built by the roll of the bands (:func:`sessiondb.pg.bands.roll`), with ``CREATE INDEX
CONCURRENTLY`` (writes go on), then the table analyzed for the keys' statistics; until
it is valid a phrase is searched without it.
"""

from __future__ import annotations

import re
from typing import Callable

import psycopg

__all__ = ["INDEX", "FUNCTION_SQL", "KEYS", "KEYS_SQL", "MARKER", "wanted", "query",
           "term_pairs", "state", "build", "stats_sql"]

#: The GIN index of the pairs' keys, over all messages.
INDEX = "messages_fts_pairs"
#: Buckets the pairs are hashed into (a power of two).
KEYS = 1 << 22
#: The lexeme of a message whose pairs are not all indexed (words past position
#: 16,383): found by every pair query.
MARKER = "*"
#: Pairs of a group of ANDed terms given to the index at most (the rest are checked on
#: the rows, with the whole query): the longest ones, likely the rarest.
INDEX_PAIRS = 4

#: The functions of the index's expression, created in the store's schema. SQL, not
#: PL/pgSQL: the positions unnested in the select list (a ProjectSet) cost half of a
#: lateral ``unnest`` per lexeme; the pairs are joined on position, not taken with
#: ``lead()``, which pairs a word with only one of several at the same position.
FUNCTION_SQL = f"""
CREATE FUNCTION sessiondb_pair_key(pair text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
SELECT pg_catalog.to_hex(pg_catalog.hashtextextended(pair, 0) & {KEYS - 1})
$$;
CREATE FUNCTION sessiondb_pairs(v tsvector) RETURNS tsvector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
WITH p AS MATERIALIZED (
    SELECT lexeme, pg_catalog.unnest(positions) AS pos FROM pg_catalog.unnest(v))
SELECT pg_catalog.array_to_tsvector(
    coalesce(pg_catalog.array_agg(pg_catalog.to_hex(pg_catalog.hashtextextended(
        a.lexeme || ' ' || b.lexeme, 0) & {KEYS - 1})) FILTER (WHERE b.pos < 16383), '{{}}')
    || CASE WHEN pg_catalog.max(b.pos) >= 16383 THEN '{{"{MARKER}"}}'::text[]
            ELSE '{{}}' END)
FROM p a JOIN p b ON b.pos = a.pos + 1
$$;
"""
#: The keys of the pairs ``%(pairs)s`` (a text array), in their order.
KEYS_SQL = ("SELECT coalesce(array_agg(sessiondb_pair_key(p) ORDER BY n), '{}') "
            "FROM unnest(%(pairs)s::text[]) WITH ORDINALITY AS u(p, n)")

# A term's tsquery as phraseto_tsquery writes it: quoted lexemes ('' and \ escaped),
# a prefix's :*, joined by <->.
_LEXEME = re.compile(r"\s*'((?:[^'\\]|''|\\.)*)'(:\*)?\s*")
_FOLLOWED = re.compile(r"<->")
_ESCAPE = re.compile(r"''|\\(.)", re.S)


def _unquote(text: str) -> str:
    return _ESCAPE.sub(lambda m: "'" if m.group(0) == "''" else m.group(1), text)


def _quote(lexeme: str) -> str:
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def term_pairs(term: str) -> list[str]:
    """The pairs of a term's tsquery (``'a' <-> 'b' <-> 'c'``: ``["a b", "b c"]``);
    none for a single word, or a term with another operator than ``<->``. A prefix
    lexeme pairs with nothing."""
    lexemes: list[str | None] = []
    at = 0
    while True:
        m = _LEXEME.match(term, at)
        if m is None:
            return []
        lexemes.append(None if m.group(2) else _unquote(m.group(1)))
        at = m.end()
        if at == len(term):
            break
        op = _FOLLOWED.match(term, at)
        if op is None:
            return []
        at = op.end()
    return [f"{a} {b}" for a, b in zip(lexemes, lexemes[1:])
            if a is not None and b is not None]


def wanted(groups: list[list[tuple[bool, list[tuple[str, bool]], str]]]
           ) -> list[list[str]] | None:
    """The pairs asked of :data:`INDEX` for each of a search's groups (see
    :class:`sessiondb.pg.search.Query`); None when a group has no phrase of two words
    or more (its matches hold no pair known)."""
    chosen: list[list[str]] = []
    for group in groups:
        found = sorted({p for negated, _, term in group if not negated
                        for p in term_pairs(term)}, key=lambda p: (-len(p), p))
        if not found:
            return None
        chosen.append(found[:INDEX_PAIRS])
    return chosen


def query(chosen: list[list[str]], keys: dict[str, str]) -> str:
    """The tsquery of :data:`INDEX` for the pairs of :func:`wanted`, given their keys
    (:data:`KEYS_SQL`): each group's keys ANDed, the groups and :data:`MARKER` ORed."""
    text = " | ".join("(" + " & ".join(_quote(keys[p]) for p in group) + ")"
                      for group in chosen)
    return f"{text} | {_quote(MARKER)}"


def state(conn: psycopg.Connection, schema: str) -> tuple[bool, bool] | None:
    """Whether :data:`INDEX` is valid, and whether a build of it runs; None if absent."""
    return conn.execute(
        "SELECT i.indisvalid, EXISTS (SELECT 1 FROM "
        "pg_catalog.pg_stat_progress_create_index p WHERE p.index_relid = c.oid) "
        "FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s", [schema, INDEX]).fetchone()


def build(conn: psycopg.Connection, schema: str,
          say: Callable[[str], None] = lambda _: None) -> list[str]:
    """Build :data:`INDEX` if it is missing (an invalid one, left by an interrupted
    build, dropped first), then analyze ``messages`` for the keys' statistics.

    :param conn: an autocommit connection; statements name the schema.
    :returns: what was done.
    """
    q = f'"{schema}"'
    found = state(conn, schema)
    done: list[str] = []
    if found is not None and (found[0] or found[1]):
        return done
    if found is not None:
        conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS {q}."{INDEX}"')
        done.append(f"dropped invalid {INDEX}")
    say(f"building {INDEX}")
    try:
        conn.execute(f'CREATE INDEX CONCURRENTLY "{INDEX}" ON {q}.messages '
                     f"USING gin ({q}.sessiondb_pairs(content_tsv))")
    except psycopg.errors.DuplicateTable:
        return done  # built by someone who rolled without the claim (it expired)
    done.append(f"built {INDEX}")
    # The keys' statistics (pg_stats of the index's expression) are what the search
    # costs the index by; without them it takes a pair for as common as its words.
    conn.execute(f"ANALYZE {q}.messages")
    done.append("analyzed messages")
    return done


def stats_sql() -> str:
    """The statement reading the keys' statistics (most common keys and their share
    of messages) from ``pg_stats`` of :data:`INDEX` in the current schema."""
    return ("SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
            f"WHERE schemaname = current_schema() AND tablename = '{INDEX}'")
