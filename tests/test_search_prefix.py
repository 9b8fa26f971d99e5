"""Prefix queries written as an OR of the index's words (sessiondb.search_prefix): the
words read from FTS5's own b-tree are every word of the index with the prefix, in
stores of many segments, multi-page doclists and deletions; the rewrite matches exactly
the rows FTS5 matches for the original query; and what it leaves to FTS5."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import apsw
import pytest
from test_search_scale import found, oracle

from sessiondb import SessionDB, search, search_hits, search_prefix, search_walks

WORDS = ["alpha", "alps", "alpine", "bravo", "brave", "école", "écrire", "Über", "übel",
         "straße", "straßen", "δέλτα", "δεσμός", "日本語", "x_y", "quote"]


def _words(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(2, 12)):
        r = rng.random()
        if r < 0.4:
            out.append(rng.choice(WORDS))
        elif r < 0.7:  # many words sharing a prefix, most of them rare
            out.append(f"pre{rng.randint(0, 700)}x")
        else:
            out.append(f"w{rng.randint(0, 3000)}")
    return " ".join(out)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """4,000 messages written in 80 transactions (a segment each: automerge off) into
    an index of 128-byte pages (doclists over many pages), then a tenth of the sessions
    deleted (deletion entries not merged away)."""
    path = tmp_path_factory.mktemp("prefix") / "state.db"
    rng = random.Random(7)
    with SessionDB(path) as db:
        conn = apsw.Connection(str(path))
        conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES('pgsz', 128);"
                     "INSERT INTO messages_fts(messages_fts, rank) VALUES('automerge', 0);"
                     "INSERT INTO messages_fts(messages_fts, rank) VALUES('crisismerge', 200)")
        conn.close()
        for batch in range(80):
            with db.transaction():
                sid = f"s{batch:02d}"
                db.create_session(sid, "cli" if batch % 3 else "slack")
                for _ in range(50):
                    db.append_message(sid, rng.choice(["user", "tool"]), _words(rng))
        for batch in range(0, 80, 10):
            db.delete_session(f"s{batch:02d}")
    yield path


@pytest.fixture(autouse=True)
def written_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prefix written out (in a store this small FTS5's merge is cheaper)."""
    monkeypatch.setattr(search_prefix, "STATEMENTS", 0)


def _vocabulary(conn: apsw.Connection) -> list[str]:
    conn.execute("CREATE VIRTUAL TABLE IF NOT EXISTS temp.vocab USING "
                 "fts5vocab(main, messages_fts, row)")
    return [r[0] for r in conn.execute("SELECT term FROM temp.vocab")]


def _rows(conn: apsw.Connection, match: str) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?", (match,))]


def test_the_words_read_are_every_word_with_the_prefix(store: Path) -> None:
    conn = apsw.Connection(str(store), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        segments = conn.execute("SELECT count(DISTINCT segid) FROM messages_fts_idx"
                                ).fetchone()[0]
        assert segments > 20
        vocabulary = _vocabulary(conn)
        prefixes = {w[:n] for w in vocabulary for n in (1, 2, 3, 4)} | {"zz", "pre7", "ü"}
        with conn:
            for prefix in sorted(prefixes):
                listed = search_prefix.prefix_words(conn, prefix)
                assert listed is not None and listed.pages >= 0
                words = listed.words
                expected = [w for w in vocabulary if w.startswith(prefix)]
                assert set(expected) <= set(words), prefix
                for extra in set(words) - set(expected):  # deleted: matches nothing
                    assert _rows(conn, f'"{extra}"') == []
    finally:
        conn.close()


def test_a_page_read_between_two_keys_gives_its_words_between_them(tmp_path: Path
                                                                    ) -> None:
    """The reading of a leaf page stops at the first word past the range: the same
    words as the whole page's, filtered, on pages of words of every length (one of
    more than 127 bytes has a length of two bytes, and may share as many)."""
    rng = random.Random(3)
    conn = apsw.Connection(str(tmp_path / "t.db"))
    conn.execute("CREATE VIRTUAL TABLE t USING fts5(c);"
                 "INSERT INTO t(t, rank) VALUES('pgsz', 512)")
    stems = ["a" * 130, "ab", "b" * 200, "é"]
    with conn:
        for _ in range(300):
            conn.execute("INSERT INTO t(c) VALUES(?)", (" ".join(
                rng.choice(stems) + str(rng.randint(0, 400)) for _ in range(20)),))
    pages = [bytes(r[0]) for r in conn.execute("SELECT block FROM t_data WHERE id > 10")]
    assert len(pages) > 20
    for page in pages:
        every = search_prefix.leaf_words(page)
        assert every == sorted(every)
        for low, high in ((b"0a", b"0a\xff"), (b"0" + b"a" * 130 + b"1", b"0b"),
                          (b"0b", None), (b"0", b"0ab"), (b"1", None)):
            assert search_prefix.leaf_words(page, low, high) == [
                w for w in every if w >= low and (high is None or w < high)]
    conn.close()


def test_more_words_than_the_limit_are_left_to_fts5(store: Path, monkeypatch) -> None:
    monkeypatch.setattr(search_prefix, "MAX_WORDS", 50)
    conn = apsw.Connection(str(store), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert search_prefix.prefix_words(conn, "pre") is None
        assert search_prefix.expand(conn, '"pre"*') is None
        assert search_prefix.expand(conn, '"alp"*').match.startswith('("alpha" OR')
    finally:
        conn.close()


REWRITTEN = ['"pre1"*', "pre1*", '"alp"*', "al*", '"alpha pre"*', "alpha pre1*",
             "alpha pre1* bravo", '"bravo" "pre2"* "alps"', "pre* NOT alpha",
             "alpha NOT pre1* bravo", "alpha NOT pre1* AND bravo", "pre1* OR bravo*",
             "(pre1* OR alps) AND (br* OR w1*)", "pre1* alpha OR bravo pre2*",
             '"é"*', "ecr*", '"über"*', "ub*", "stra*", '"straß"*', "δε*", '"ΔΈΛ"*',
             "日本*", "x_*", "x_y*", '"x y"*', "nothing* OR alpha", "alpha nothing*",
             'alpha "quo"*', "w1* NOT w10*", "alpha\u00a0pre1*", "bravo\u3000alp*"]


@pytest.mark.parametrize("query", REWRITTEN)
def test_the_rewrite_matches_what_fts5_matches(store: Path, query: str) -> None:
    conn = apsw.Connection(str(store), flags=apsw.SQLITE_OPEN_READONLY)
    conn.register_fts5_function("test_phrase_count", lambda api: api.phrase_count)
    try:
        with conn:
            expansion = search_prefix.expand(conn, query)
            assert expansion is not None and "*" not in expansion.match
            rows = _rows(conn, query)
            assert sorted(_rows(conn, expansion.match)) == sorted(rows)
            if rows:  # FTS5 tells the phrases of a query through a row it matches
                assert len(expansion.groups) == _phrase_count(conn, query)
                assert sum(expansion.groups) == _phrase_count(conn, expansion.match)
    finally:
        conn.close()


def _phrase_count(conn: apsw.Connection, match: str) -> int:
    return conn.execute("SELECT test_phrase_count(messages_fts) FROM messages_fts WHERE "
                        "messages_fts MATCH ? LIMIT 1", (match,)).fetchone()[0]


@pytest.mark.parametrize("query", [
    "alpha", '"pre1"', "NEAR(pre1* alpha)", "content:pre1*", "^pre1*", "pre1 + alp*",
    "-content: al*", "OR* alpha", "pre1 *", "{content}: al*", "alp*.", "alpha AND",
    "alpha\x0cal*"])
def test_syntax_it_does_not_handle_is_left_to_fts5(store: Path, query: str) -> None:
    conn = apsw.Connection(str(store), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert search_prefix.expand(conn, query) is None
    finally:
        conn.close()


def test_nothing_is_rewritten_in_a_write_transaction(store: Path) -> None:
    # Words written in this transaction are still in FTS5's memory, not in its tables.
    conn = apsw.Connection(str(store))
    try:
        assert search_prefix.expand(conn, "al*") is not None
        with conn:
            conn.execute("DELETE FROM sessions WHERE 0")
            assert search_prefix.expand(conn, "al*") is None
    finally:
        conn.close()


def test_a_table_with_its_own_tokenizer_is_left_to_fts5(tmp_path: Path) -> None:
    conn = apsw.Connection(str(tmp_path / "t.db"))
    conn.execute("CREATE VIRTUAL TABLE messages_fts USING fts5(content, tokenize='ascii');"
                 "INSERT INTO messages_fts VALUES('alpha alps')")
    try:
        assert search_prefix.expand(conn, "al*") is None
    finally:
        conn.close()


def test_a_prefix_index_of_the_length_is_used_instead(tmp_path: Path) -> None:
    conn = apsw.Connection(str(tmp_path / "t.db"))
    conn.execute("CREATE VIRTUAL TABLE messages_fts USING fts5(content, prefix='2');"
                 "INSERT INTO messages_fts VALUES('alpha alps bravo')")
    try:
        assert search_prefix.expand(conn, "al*") is None
        expansion = search_prefix.expand(conn, "al* bra*")
        assert expansion is not None
        assert expansion.match == '(al* AND ("bravo"))'
        assert expansion.groups == (1, 1)
    finally:
        conn.close()


@pytest.mark.parametrize("query", ["pre1*", "al*", "alpha pre1*", "É*", "über*", "stra*",
                                   '"ΔΈΛ"*', "日本*", "pre* NOT alpha", "alpha NOT pre1*",
                                   "pre2* OR bravo", "x_*"])
def test_search_order_matches_the_oracle(store: Path, monkeypatch, query: str) -> None:
    monkeypatch.setattr(search, "WINDOW", 40)
    monkeypatch.setattr(search_walks, "FIRST_SPAN", 64)
    with SessionDB(store) as db:
        for kw in ({}, {"sources": ["slack"]}, {"roles": ["tool"]}, {"session_id": "s07"},
                   {"exclude_sources": ["slack"], "roles": ["user"]}):
            expected = oracle(store, query, 40, **kw)
            assert found(db, query, limit=None, **kw) == expected, kw
            # Pages of 17 over the first windows, then of 170 (each page of this
            # index of tiny pages and many segments costs about 0.1 s): every hit is
            # still read once, and pages still cross the windows' edges.
            pages, offset = [], 0
            while offset < len(expected) + 17:
                size = 17 if offset < 102 else 170
                pages += found(db, query, limit=size, offset=offset, **kw)
                offset += size
            assert pages == expected, kw


@pytest.mark.parametrize("query", ["pre1*", "alpha pre*", "pre* NOT alpha", "alpha NOT pre2*",
                                   "É*", "pre2* OR bravo"])
def test_hits_read_with_the_words_they_hold_are_the_same(store: Path, monkeypatch,
                                                         query: str) -> None:
    # The hits are read by a query of only the words of their texts: the same rows,
    # snippets and contexts as with every word of the prefix.
    with SessionDB(store) as db:
        narrowed = db.search_messages(query, limit=50)
        monkeypatch.setattr(search_hits, "WORDS_OF_HITS", 0)
        whole = db.search_messages(query, limit=50)
    assert narrowed and narrowed == whole


def test_a_prefix_is_written_out_when_its_seeks_cost_less_than_the_merge(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()
    cheaper = search_prefix._cheaper_written_out
    # On a million messages: 83 words of 3,900 pages (105 ms merged, 3.7 ms a start);
    # 2,293 words of 8,200 pages (one letter: about 1 s merged, 0.1 s a start).
    assert cheaper(search_prefix.PrefixWords(["w"] * 83, 3862))
    assert not cheaper(search_prefix.PrefixWords(["w"] * 2293, 8239))
    assert not cheaper(search_prefix.PrefixWords(["w"] * 500, 40))  # rare words


def test_a_prefix_merged_or_written_out_gives_the_same_hits(store: Path,
                                                            monkeypatch) -> None:
    # The same hits; with one phrase the same order (with more, merged prefixes weigh
    # every phrase alike: see sessiondb.search).
    queries = ["pre1*", "É*", "alpha pre*", "pre* NOT alpha", "pre2* OR bravo"]
    with SessionDB(store) as db:
        written = [[h["id"] for h in db.search_messages(q, limit=None)] for q in queries]
        monkeypatch.setattr(search_prefix, "STATEMENTS", 10**9)
        merged = [[h["id"] for h in db.search_messages(q, limit=None)] for q in queries]
    for query, a, b in zip(queries, written, merged):
        assert a and (a == b if " " not in query else sorted(a) == sorted(b)), query


def test_the_words_counted_from_the_index_alone_bound_the_words(store: Path,
                                                                monkeypatch) -> None:
    # A prefix of many words is known to be merged without reading its words (60-75
    # ms for one letter on a million messages): the pages are those prefix_words
    # counts, the bound at most its words, and the decision never differs from the
    # one made of the words.
    monkeypatch.setattr(search_prefix, "STATEMENTS", 10)
    conn = apsw.Connection(str(store))
    try:
        prefixes = {word[:n] for word in _vocabulary(conn) for n in (1, 2)}
        merged = 0
        for prefix in sorted(prefixes):
            listed = search_prefix.prefix_words(conn, prefix)
            pages, least = search_prefix._extent(conn, prefix)
            if listed is None:
                continue
            assert pages == listed.pages and least <= len(listed.words), prefix
            if search_prefix._surely_merged(conn, prefix):
                merged += 1
                assert not search_prefix._cheaper_written_out(listed), prefix
        assert merged  # "p" and "pr": 700 words of "pre"
    finally:
        conn.close()
