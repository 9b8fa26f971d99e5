"""Search over a full-text index cut into tables by id block (sessiondb.fts_tables)
answers exactly as over one table: the same hits in the same order, page by page, for
words, prefixes written out with each table's own words, prefixes merged or tested
row by row, NOT, OR and every filter; bm25 takes the whole index's rows and tokens, so
the order does not depend on how the index is cut. Two stores are filled alike, one
cut into tables of 200 ids (windows of 5 within blocks of 100 ids), the other not."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import pytest
from test_search_horizon import FILTERS, _fill
from test_search_scale import found, oracle

from sessiondb import SessionDB, fts_tables, search, search_walks

QUERIES = ["needle", "early", "late", "zz NOT zy", "needle OR late", "w1*", "w1* needle",
           "needle NOT w2*", "z*", "nothing"]


def small_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 5 within blocks of 100 ids, a first span of 16, chunks of 4."""
    monkeypatch.setattr(search, "WINDOW", 5)
    monkeypatch.setattr(search, "HORIZON", 100)
    monkeypatch.setattr(search_walks, "FIRST_SPAN", 16)
    monkeypatch.setattr(search_walks, "CHUNK", 4)


def small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Index tables of 200 ids, the tail sealed 20 ids before the next block."""
    monkeypatch.setattr(fts_tables, "BLOCK", 200)
    monkeypatch.setattr(fts_tables, "MARGIN", 20)


@pytest.fixture
def pair(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
         ) -> Iterator[tuple[SessionDB, SessionDB, Path]]:
    small_windows(monkeypatch)
    one = SessionDB(tmp_path / "one.db")
    _fill(one, random.Random(7), 2000)
    small_tables(monkeypatch)
    cut = SessionDB(tmp_path / "cut.db")
    _fill(cut, random.Random(7), 2000)
    cut.rebuild_search_index()
    try:
        yield one, cut, tmp_path / "one.db"
    finally:
        one.close()
        cut.close()


def _tables(db: SessionDB) -> list[fts_tables.Table]:
    return db._engine.read(fts_tables.tables)


def test_the_cut_index_answers_as_one_table(pair) -> None:
    one, cut, path = pair
    assert len(_tables(one)) == 1
    assert len(_tables(cut)) == 11  # ids 1-2000 in blocks of 200, and an empty tail
    for query in QUERIES:
        for kw in FILTERS:
            expected = found(one, query, limit=None, **kw)
            if not any(c in query for c in "*"):
                assert expected == oracle(path, query, 5, horizon=100, **kw), (query, kw)
            assert found(cut, query, limit=None, **kw) == expected, (query, kw)
            for offset in range(0, len(expected) + 2, 7):
                assert found(cut, query, limit=4, offset=offset, **kw) == expected[
                    offset:offset + 4], (query, kw, offset)


def test_snippets_and_hits_are_the_same(pair) -> None:
    one, cut, _ = pair
    for query in ("needle", "w1*", "z* needle"):
        a = one.search_messages(query, limit=30)
        b = cut.search_messages(query, limit=30)
        for hit in a + b:
            hit.pop("timestamp"), hit.pop("session_started")
        assert a == b, query


def test_appends_after_the_cut_roll_the_tail_and_stay_searchable(pair) -> None:
    one, cut, _ = pair
    for db in (one, cut):
        for n in range(300):  # past the next block: the tail is sealed once more
            db.append_message("late", "user", f"needle fresh{n % 7} zz")
    assert len(_tables(cut)) == 12
    for query in ("needle", "fresh3", "fresh*", "zz NOT zy"):
        assert found(cut, query, limit=None) == found(one, query, limit=None), query
