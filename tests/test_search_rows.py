"""Search by testing messages one by one (sessiondb.search_rows), the way a prefix FTS5
would merge whole doclists for is found (a one-letter prefix on a large store): the
same hits in the same order as FTS5's answer, against a brute-force oracle, through
every filter, pages and offsets; the same snippets; shapes it does not test, and walks
estimated dearer than the merge, left to FTS5. Small windows and bands stand in for the
real ones; no timings."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import apsw
import pytest
from test_search_scale import found, oracle

from sessiondb import SessionDB, search, search_prefix, search_rows

WORDS = ["alpha", "alps", "amber", "bravo", "brave", "beta", "charlie", "école", "écrire",
         "Über", "übel", "delta", "zulu"]
FILTERS: list[dict[str, Any]] = [
    {}, {"sources": ["slack"]}, {"sources": ["cli", "cron"]}, {"exclude_sources": ["cli"]},
    {"roles": ["tool"]}, {"session_id": "s03"}, {"session_id": "s05", "roles": ["user"]},
    {"exclude_sources": ["slack"], "roles": ["user", "tool"]},
]


def _text(rng: random.Random, n: int) -> str:
    words = ["alpha"] if rng.random() < 0.97 else []  # "alpha" nearly everywhere
    for _ in range(rng.randint(2, 14)):
        r = rng.random()
        words.append(rng.choice(WORDS[:-1]) if r < 0.5 else
                     f"{rng.choice('abcxyz')}{rng.randint(0, 300)}" if r < 0.9 else
                     rng.choice(["Alpha,", "ALPS!", "b-side", "x_y", "Écho"]))
    if n % 97 == 5:
        words.append("zulu")
    rng.shuffle(words)
    return " ".join(words)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SessionDB, Path]]:
    """1,200 messages in 24 sessions appended in random order, one slack session."""
    path = tmp_path_factory.mktemp("rows") / "state.db"
    rng = random.Random(5)
    db = SessionDB(path)
    sessions = [f"s{i:02d}" for i in range(24)]
    with db.transaction():
        for i, sid in enumerate(sessions):
            db.create_session(sid, "slack" if i == 5 else rng.choice(["cli", "cli", "cron",
                                                                       "telegram"]))
        for n in range(1200):
            db.append_message(rng.choice(sessions), rng.choice(["user", "assistant", "tool"]),
                              _text(rng, n))
    try:
        yield db, path
    finally:
        db.close()


@pytest.fixture
def tested(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Windows of 25, bands from 16 ids, every prefix merged by FTS5 and so tested
    row by row whatever it costs; returns a list that grows by one per search answered
    that way."""
    monkeypatch.setattr(search, "WINDOW", 25)
    return count_tested(monkeypatch)


def count_tested(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bands from 16 ids and every prefix merged by FTS5, so tested row by row whatever
    it costs; returns a list that grows by one per walk answered that way."""
    monkeypatch.setattr(search_rows, "FIRST_BAND", 16)
    monkeypatch.setattr(search_prefix, "STATEMENTS", 10**9)
    monkeypatch.setattr(search_prefix, "merge_cost_us", lambda conn, match, table="messages_fts": 1e12)
    answered: list[int] = []
    walk = search_rows.newest_matches

    def counted(*args: Any) -> Any:
        rows = walk(*args)
        if rows is not None:
            answered.append(1)
        return rows

    monkeypatch.setattr(search_rows, "newest_matches", counted)
    return answered


@pytest.mark.parametrize("horizon", [search.HORIZON, 150])
@pytest.mark.parametrize("query", ["a*", "é*", "b* NOT alpha"])
def test_one_phrase_matches_the_oracle(store, tested, monkeypatch, query: str,
                                       horizon: int) -> None:
    db, path = store
    monkeypatch.setattr(search, "HORIZON", horizon)  # 150: the 1,200 ids in 8 and more
    for kw in FILTERS:
        expected = oracle(path, query, 25, horizon=horizon, **kw)
        assert found(db, query, limit=None, **kw) == expected, kw
        assert found(db, query, limit=10, offset=20, **kw) == expected[20:30], kw
        assert found(db, query, limit=7, offset=45, **kw) == expected[45:52], kw
    assert tested


@pytest.mark.parametrize("query", ["alpha b*", "a* NOT alpha", "x* OR zulu",
                                   "b* AND charlie x* NOT delta NOT ü*"])
def test_several_phrases_give_what_fts5_gives(store, tested, monkeypatch,
                                              query: str) -> None:
    # With more than one phrase a merged prefix weighs every phrase alike (see
    # sessiondb.search), so the oracle of FTS5's bm25 is not this order: FTS5's own
    # answer through the same code is; its set of hits is the oracle's.
    db, path = store
    filters = FILTERS[::2]
    rows = {str(kw): found(db, query, limit=None, **kw) for kw in filters}
    pages = {str(kw): found(db, query, limit=10, offset=20, **kw) for kw in filters}
    hits = db.search_messages(query, limit=30)
    assert tested
    monkeypatch.setattr(search_rows, "parse", lambda conn, match: None)
    for kw in filters:
        everything = found(db, query, limit=None, **kw)
        assert rows[str(kw)] == everything, kw
        assert sorted(everything) == sorted(oracle(path, query, 25, **kw)), kw
        assert pages[str(kw)] == everything[20:30], kw
    assert hits == db.search_messages(query, limit=30)  # snippets and contexts too


def test_snippets_are_fts5s(store, tested, monkeypatch) -> None:
    db, _ = store
    tested_hits = db.search_messages("a*", limit=40, offset=3)
    assert tested and tested_hits
    monkeypatch.setattr(search_rows, "parse", lambda conn, match: None)
    assert tested_hits == db.search_messages("a*", limit=40, offset=3)


@pytest.mark.parametrize("query", ["(a* OR bravo) charlie", "a* NOT bravo charlie",
                                   "a* OR bravo charlie", "NEAR(a* bravo)", "a* AND OR b",
                                   "content: a*", "^a*"])
def test_shapes_it_does_not_test_are_left_to_fts5(store, query: str) -> None:
    _, path = store
    conn = apsw.Connection(str(path))
    try:
        assert search_rows.parse(conn, query) is None
        assert search_rows.parse(conn, "a* NOT bravo AND charlie") is not None
    finally:
        conn.close()


def test_a_walk_dearer_than_the_merge_is_left_to_fts5(store, tested, monkeypatch) -> None:
    db, path = store
    # A first band is tested (the rate of matches is unknown), then the rest of the
    # walk is estimated to cost more than the merge; the hits are the same. (The walk
    # of a window of 25 "a*" costs less than a band of 16 messages: a merge estimated
    # at 50 microseconds is cheaper.)
    monkeypatch.setattr(search_prefix, "merge_cost_us", lambda conn, match, table="messages_fts": 50.0)
    everything = found(db, "zulu a*", limit=None)
    assert everything and sorted(everything) == sorted(oracle(path, "zulu a*", 25))
    assert found(db, "a*", limit=None) == oracle(path, "a*", 25)
    assert not tested


def test_messages_not_indexed_yet_are_left_to_fts5(store, tested) -> None:
    db, path = store
    conn = apsw.Connection(str(path))
    try:
        top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
        # A range over every message and past them (so over every window): nothing is
        # waiting, but the walk cannot know.
        conn.execute("INSERT INTO sessiondb_fts_pending (lo, hi) VALUES (?, ?)",
                     (0, top + 5))
        assert found(db, "a*", limit=None) == oracle(path, "a*", 25)
        assert not tested
    finally:
        conn.execute("DELETE FROM sessiondb_fts_pending")
        conn.close()
