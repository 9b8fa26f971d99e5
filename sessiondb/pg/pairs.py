"""The index of adjacent word pairs, which narrows a phrase search to the messages
holding its pairs.

A GIN index of the search column knows no positions: ``"a b"`` finds every message
holding both words and checks each one for the phrase. Two common words that are
rarely adjacent (each in 10% of a million messages, side by side in 74) cost 11,300
rows read and checked. So the *pairs* of adjacent lexemes of each message are indexed
too: ``sessiondb_pairs(content_tsv)`` (:data:`FUNCTION_SQL`) is a ``tsvector`` whose
lexemes are ``"a b"`` for every lexeme ``a`` at a position ``p`` of ``content_tsv``
and ``b`` at ``p + 1``, and the GIN index :data:`INDEX` on it (one over all messages:
a pair's posting list is short wherever the phrase is rare, and a common pair is
never read from it, see :func:`sessiondb.pg.slices.pairs_estimate`). A phrase's
search reads the lists of its pairs (:func:`tsquery`) and checks the phrase on the
messages found.

**Exact, never a guess.** The pairs come from ``content_tsv`` itself, so they are
the positions the phrase operator ``<->`` checks: a message matching ``a <-> b``
holds the pair ``"a b"``, and one matching ``a <-> b <-> c`` holds ``"a b"`` and
``"b c"``. Each half is cut to :data:`HALF` characters (the phrase's pairs are cut
the same way: a pair of long words stays small, and a cut pair only finds more
candidates). Two cases leave a message marked with the lexeme :data:`MARKER` instead
of (some of) its pairs, and every pair query finds the marked messages too (they are
checked like the others): words past position 16,383, which ``to_tsvector`` puts all
at 16,383 (so ``x <-> y`` matches for the word ``x`` at 16,382 and *any* word ``y``
after it), and pairs that would not fit in a ``tsvector`` (1 MB).

**Cost.** Every append computes the pairs of its message (about 80 us for 150 words
on the machine measured) and adds an entry per distinct pair to :data:`INDEX`, beside
the band's entry per distinct word. On a store holding messages the index is built
by the roll of the bands (:func:`sessiondb.pg.bands.roll`), with ``CREATE INDEX
CONCURRENTLY`` (writes go on), then the table analyzed for the pairs' statistics; until
it is valid a phrase is searched without it.
"""

from __future__ import annotations

import re
from typing import Callable

import psycopg

__all__ = ["INDEX", "FUNCTION_SQL", "HALF", "MARKER", "tsquery", "term_pairs", "state",
           "build", "stats_sql"]

#: The GIN index of the pairs, over all messages.
INDEX = "messages_fts_pairs"
#: Characters of each half of a pair (a longer lexeme is cut).
HALF = 24
#: The lexeme of a message whose pairs are not all indexed (words past position
#: 16,383, or too many pairs): found by every pair query.
MARKER = "*"
#: Pairs of a group of ANDed terms given to the index at most (the rest are checked on
#: the rows, with the whole query): the longest ones, likely the rarest.
INDEX_PAIRS = 4
#: Bytes of pairs above which a message is only marked (a tsvector holds 1 MB).
MAX_BYTES = 900_000

#: The function of the index's expression, created in the store's schema. SQL, not
#: PL/pgSQL: the positions unnested in the select list (a ProjectSet) cost half of a
#: lateral ``unnest`` per lexeme; the pairs are joined on position, not taken with
#: ``lead()``, which pairs a word with only one of several at the same position.
FUNCTION_SQL = f"""
CREATE FUNCTION sessiondb_pairs(v tsvector) RETURNS tsvector
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
WITH p AS MATERIALIZED (
    SELECT lexeme, pg_catalog.unnest(positions) AS pos FROM pg_catalog.unnest(v)),
x AS (
    SELECT pg_catalog.left(a.lexeme, {HALF}) || ' ' || pg_catalog.left(b.lexeme, {HALF})
           AS pair, b.pos
    FROM p a JOIN p b ON b.pos = a.pos + 1)
SELECT pg_catalog.array_to_tsvector(CASE
    WHEN pg_catalog.sum(pg_catalog.octet_length(pair) + 6) > {MAX_BYTES}
        THEN '{{"{MARKER}"}}'::text[]
    ELSE coalesce(pg_catalog.array_agg(pair) FILTER (WHERE pos < 16383), '{{}}')
        || CASE WHEN pg_catalog.max(pos) >= 16383 THEN '{{"{MARKER}"}}'::text[]
                ELSE '{{}}' END
    END)
FROM x
$$;
"""

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
    """The pairs of a term's tsquery (``'a' <-> 'b' <-> 'c'``: ``["a b", "b c"]``),
    each half cut to :data:`HALF` characters; none for a single word, or a term with
    another operator than ``<->``. A prefix lexeme pairs with nothing."""
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
    return [f"{a[:HALF]} {b[:HALF]}" for a, b in zip(lexemes, lexemes[1:])
            if a is not None and b is not None]


def tsquery(groups: list[list[tuple[bool, list[tuple[str, bool]], str]]]
            ) -> tuple[str, list[list[str]]] | None:
    """The query of :data:`INDEX` for a search's groups (see
    :class:`sessiondb.pg.search.Query`), and the pairs asked of each group; None when
    a group has no phrase of two words or more (its matches hold no pair known)."""
    chosen: list[list[str]] = []
    for group in groups:
        found = sorted({p for negated, _, term in group if not negated
                        for p in term_pairs(term)}, key=lambda p: (-len(p), p))
        if not found:
            return None
        chosen.append(found[:INDEX_PAIRS])
    text = " | ".join("(" + " & ".join(map(_quote, pairs)) + ")" for pairs in chosen)
    return f"{text} | {_quote(MARKER)}", chosen


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
    build, dropped first), then analyze ``messages`` for the pairs' statistics.

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
    # The pairs' statistics (pg_stats of the index's expression) are what the search
    # costs the index by; without them it takes a pair for as common as its words.
    conn.execute(f"ANALYZE {q}.messages")
    done.append("analyzed messages")
    return done


def stats_sql() -> str:
    """The statement reading the pairs' statistics (most common pairs and their share
    of messages) from ``pg_stats`` of :data:`INDEX` in the current schema."""
    return ("SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
            f"WHERE schemaname = current_schema() AND tablename = '{INDEX}'")
