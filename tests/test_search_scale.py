"""Search at any size (#11): the window order (the best matches among the most recent),
paging through it, every filter against a brute-force oracle through both ways of
finding candidates, and hostile input. Small windows, spans and chunks stand in for the
real ones so that a few thousand messages exercise every path; no timings."""

from __future__ import annotations

import dataclasses
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import apsw
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessiondb import (SessionDB, search, search_costs, search_prefix, search_rank,
                       search_rows, search_walks)
from sessiondb.compat.hermes import SessionDB as HermesSessionDB
from sessiondb.text import sanitize_fts_query

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
         "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
SOURCES = ["cli"] * 10 + ["telegram"] * 5 + ["cron"] * 3 + ["slack"]
ROLES = ["user", "assistant", "tool"]


def _text(rng: random.Random) -> str:
    # Zipf-like: "alpha" in most messages, "papa" in a few percent, 100 fillers beyond
    # ("fi*": an OR of 100 words in every statement; 500 cost the suite about 100 s more of CPU).
    ranks = [int(rng.paretovariate(0.9)) - 1 for _ in range(rng.randint(3, 30))]
    return " ".join(WORDS[k] if k < len(WORDS) else f"filler{k % 100}" for k in ranks)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SessionDB, Path]]:
    """3,000 messages in 60 sessions, appended in random session order (so sessions'
    id ranges interleave), one source kept by a single session."""
    path = tmp_path_factory.mktemp("scale") / "state.db"
    rng = random.Random(11)
    db = SessionDB(path)
    sessions = [f"s{i:02d}" for i in range(60)]
    with db.transaction():
        for i, sid in enumerate(sessions):
            db.create_session(sid, "slack" if i == 7 else rng.choice(SOURCES[:-1]))
        for n in range(3000):
            # A few long-lived sessions get messages all along; the rest come in bursts.
            sid = rng.choice(sessions[:4]) if rng.random() < 0.2 else sessions[
                min(59, 4 + n * 56 // 3000 + rng.randint(-2, 2))]
            db.append_message(sid, rng.choice(ROLES),
                              _text(rng) + (" zulu" if n % 400 == 7 else ""))
    try:
        yield db, path
    finally:
        db.close()


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 25 within 300 ids, a first span of 40 ids, chunks of 7 messages,
    prefixes written out."""
    monkeypatch.setattr(search, "WINDOW", 25)
    monkeypatch.setattr(search, "HORIZON", HORIZON)
    monkeypatch.setattr(search_walks, "FIRST_SPAN", 40)
    monkeypatch.setattr(search_walks, "CHUNK", 7)
    # Every prefix written out as an OR of its words (FTS5's merge is cheaper in a
    # store this small, and keeps its own path: test_a_prefix_index_changes...).
    monkeypatch.setattr(search_prefix, "STATEMENTS", 0)


class Strategy(NamedTuple):
    """The strategy a test runs under, every answer ``search_costs.cheapest_way`` gave in
    it so far (forced or the cost model's), and the ranges of ids whose messages were
    tested one by one instead (``search_rows.newest_matches``)."""

    name: str
    asked: list[str]
    tested: list[tuple[int, int]]


@pytest.fixture(params=["join", "list", "sessions", "rows", "cost model", "join, sliced",
                        "list, sliced", "sessions, batched"])
def strategy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Strategy:
    """Force one way of finding the candidates after the first span when a source or
    session filter allows the choice, or let the cost model choose; "rows": the
    messages that pass the filters tested one by one, whatever that costs, for a query
    whose prefixes are written out (any other query has no row test, and takes the
    cheapest of the others); "sliced": the rest of the index walk in ascending slices;
    "batched": the session walk with every chunk close enough to the last to share its
    range query."""
    way, _, how = request.param.partition(", ")
    asked: list[str] = []
    tested: list[tuple[int, int]] = []
    choose = search_costs.cheapest_way if way == "cost model" else lambda *args: way

    def cheapest_way(*args: Any, **kwargs: Any) -> str:
        asked.append(choose(*args, **kwargs))
        return asked[-1]

    monkeypatch.setattr(search_costs, "cheapest_way", cheapest_way)
    newest_matches = search_rows.newest_matches

    def unbounded(conn, test, band, lo, hi, need, budget_us, *rest):  # noqa: ANN001
        tested.append((lo, hi))
        return newest_matches(conn, test, band, lo, hi, need,
                              float("inf") if way == "rows" else budget_us, *rest)

    monkeypatch.setattr(search_rows, "newest_matches", unbounded)
    if way == "rows":  # tested whatever the others are estimated to cost
        monkeypatch.setattr(search_rows, "US_TESTED", 0.0)
    if how == "sliced":
        monkeypatch.setattr(search_walks, "_SLICED_WALK", -1)
        monkeypatch.setattr(search_walks, "_US_READ_PER_MATCH", -1)
    if how == "batched":
        monkeypatch.setattr(search_walks, "_US_STATEMENT", 1e9)
    return Strategy(request.param, asked, tested)


#: The strategies that differ from another only in the way ``cheapest_way`` is made
#: to answer: "join", "list", "sessions" and "rows" from "cost model", "list, sliced"
#: from "join, sliced". Under a filter with no choice of way (no source or session filter)
#: nothing asks it (:func:`checks`), so they would run the very statements of the
#: strategy they differ from again: the tests leave those filters to the others.
ANSWER_ONLY = {"join", "list", "sessions", "rows", "list, sliced"}


def has_a_choice(kw: dict[str, Any]) -> bool:
    """Whether a search with these filters may choose its way (``search_walks.candidates``
    asks ``cheapest_way`` only under a source or session filter)."""
    return (kw.get("session_id") is not None or bool(kw.get("sources"))
            or bool(kw.get("exclude_sources")))


@contextmanager
def checks(strategy: Strategy, kw: dict[str, Any]) -> Iterator[bool]:
    """Whether this strategy checks these filters (False: one that runs the same
    statements does); around the searches of a filter with no choice of way, that
    nothing asked ``cheapest_way`` (what makes the strategies of :data:`ANSWER_ONLY`
    the same there)."""
    before = len(strategy.asked)
    yield not (strategy.name in ANSWER_ONLY and not has_a_choice(kw))
    if not has_a_choice(kw):
        assert strategy.asked[before:] == [], kw


#: The block of the ``small`` fixture: the store's 3,000 ids in ten and more windows.
HORIZON = 300


def oracle(path: Path, query: str, window: int, sources: list[str] | None = None,
           exclude_sources: list[str] | None = None, roles: list[str] | None = None,
           session_id: str | None = None, raw: bool = False,
           horizon: int = search.HORIZON) -> list[int]:
    """Every match in the documented order, from FTS5's own bm25 and a Python filter:
    newest first in windows of ``window`` within one block of ``horizon`` ids (ids 1
    to horizon, horizon + 1 to 2 * horizon, ...), best bm25 first within each, ties
    newest first. ``raw``: the query is FTS5 already (not sanitized)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        scores = dict(conn.execute(
            "SELECT rowid, bm25(messages_fts) FROM messages_fts WHERE messages_fts MATCH ?",
            (query if raw else sanitize_fts_query(query),)))
        meta = {r[0]: r[1:] for r in conn.execute(
            "SELECT m.id, m.session_id, m.role, s.source FROM messages m "
            "JOIN sessions s ON s.id = m.session_id")}
    finally:
        conn.close()

    def keep(rowid: int) -> bool:
        sid, role, source = meta[rowid]
        return ((sources is None or source in sources)
                and (not exclude_sources or source not in exclude_sources)
                and (not roles or role in roles)
                and (session_id is None or sid == session_id))

    newest = sorted((r for r in scores if keep(r)), reverse=True)
    ids = [r for r in meta if session_id is None or meta[r][0] == session_id]
    top = max(ids, default=0)
    out: list[int] = []
    while newest:
        block = (top - 1) // horizon * horizon + 1  # the first id of top's block
        part = [r for r in newest if r >= block][:window]
        out += sorted(part, key=lambda r: (scores[r], -r))
        newest = newest[len(part):]
        top = part[-1] - 1 if len(part) == window else block - 1
    return out


def found(db: SessionDB, query: str, **kw: Any) -> list[int]:
    return [h["id"] for h in db.search_messages(query, **kw)]


QUERIES = ["alpha", "charlie", "papa", "zulu", "zulu OR papa", '"alpha bravo"', "bravo delta",
           "charlie OR kilo", "alpha NOT bravo", "ju*", "alpha lima november",
           # prefixes of 100 words and of a few, alone, with other phrases, under NOT
           "fi*", "alpha ju*", "fi* NOT alpha", "alpha NOT fil*", '"alpha br"*']
FILTERS: list[dict[str, Any]] = [
    {}, {"sources": ["slack"]}, {"sources": ["cli", "cron"]}, {"sources": []},
    {"exclude_sources": ["cli"]}, {"exclude_sources": ["cli", "telegram", "cron"]},
    {"roles": ["tool"]}, {"roles": ["user", "assistant"]}, {"session_id": "s02"},
    {"session_id": "s40"}, {"session_id": "s07", "roles": ["user"]},
    {"session_id": "s07", "sources": ["cli"]}, {"session_id": "nope"},
    {"sources": ["slack", "cron"], "roles": ["assistant"]},
    {"exclude_sources": ["cli"], "roles": ["tool"], "sources": ["cron", "cli"]},
]


#: The oracle's answers on the module's store, which no test writes: the same for all
#: seven strategies, so worked out once per query and filter, not once per strategy.
_STORE_ORACLE: dict[tuple[Path, str, str], list[int]] = {}


def store_oracle(path: Path, query: str, kw: dict[str, Any]) -> list[int]:
    key = (path, query, repr(sorted(kw.items())))
    if key not in _STORE_ORACLE:
        _STORE_ORACLE[key] = oracle(path, query, 25, horizon=HORIZON, **kw)
    return list(_STORE_ORACLE[key])


@pytest.mark.parametrize("query", QUERIES)
def test_every_filter_matches_the_oracle(store, small, strategy, query: str) -> None:
    db, path = store
    for kw in FILTERS:
        with checks(strategy, kw) as checked:
            if checked:
                expected = store_oracle(path, query, kw)
                assert found(db, query, limit=None, **kw) == expected, kw
                assert found(db, query, limit=10, offset=20, **kw) == expected[20:30], kw
    if strategy.name == "rows" and "*" in query and '"' not in query:
        # The rows were tested one by one (under a source or session filter that kept
        # few of the first span's matches), not found another way. ('"alpha br"*' is
        # searched as the phrase "alpha br": the sanitizing drops a quoted phrase's star.)
        assert strategy.tested


def test_a_rare_sources_first_span_is_found_by_testing_its_messages(store, small,
                                                                      monkeypatch) -> None:
    """A query whose prefixes are written out (each statement starts with a seek per
    word) and a filter that keeps few messages: the first span is found by testing the
    filter's messages one by one, not by the index walk; a common source's span by the
    index walk. Either way the hits are the oracle's."""
    db, path = store
    spans: list[bool] = []
    span_by_rows = search_walks._span_by_rows

    def spy(*args: Any) -> Any:
        answer = span_by_rows(*args)
        spans.append(answer is not None)
        return answer

    monkeypatch.setattr(search_walks, "_span_by_rows", spy)
    for kw, by_rows in (({"sources": ["slack"]}, True), ({"session_id": "s07"}, True),
                        ({"sources": ["cli"]}, False)):
        for query in ("fi*", "fi* NOT alpha"):
            spans.clear()
            expected = store_oracle(path, query, kw)
            assert found(db, query, limit=None, **kw) == expected, (query, kw)
            assert found(db, query, limit=10, offset=20, **kw) == expected[20:30]
            assert spans and spans[0] is by_rows, (query, kw)


def test_a_phrase_after_not_is_not_counted_for_bm25(store, small, monkeypatch) -> None:
    """A phrase after NOT is in no match, so its term of bm25 is 0 whatever its IDF:
    it is not counted (a word in nearly every message: 1.3-1.8 ms a search on a million
    messages), and with one phrase left to score nothing is. Same order as the oracle."""
    db, path = store
    counted: list[list[bool]] = []
    idf = search_rank.idf

    def spy(conn, phrases, count, rows, skip=()):  # noqa: ANN001 - as wrapped
        counted.append(list(skip))
        return idf(conn, phrases, count, rows, skip)

    monkeypatch.setattr(search_rank, "idf", spy)
    for query, asked in (("alpha NOT bravo", []), ("alpha charlie NOT bravo",
                                                   [[False, False, True]]),
                         ("alpha charlie", [[False, False]])):
        counted.clear()
        assert found(db, query, limit=None) == store_oracle(path, query, {}), query
        assert counted == asked, query


@pytest.mark.parametrize("query", ["alpha", "bravo delta", "ju*", "charlie OR kilo"])
def test_pages_go_through_every_hit_once(store, small, strategy, query: str) -> None:
    db, _ = store
    for kw in ({}, {"sources": ["slack"]}, {"session_id": "s01"}, {"roles": ["tool"]}):
        with checks(strategy, kw) as checked:
            if not checked:
                continue
            everything = found(db, query, limit=None, **kw)
            assert len(everything) == len(set(everything))
            pages: list[int] = []
            # Pages of 37, prime to the window (25) and the block (300): they begin at
            # every offset within both, and straddle their edges.
            for offset in range(0, len(everything) + 37, 37):
                pages += found(db, query, limit=37, offset=offset, **kw)
            assert pages == everything, kw
            assert found(db, query, offset=len(everything), **kw) == []


def test_real_window_size_on_the_store(store) -> None:
    db, path = store
    for query in ("alpha", "bravo delta", "hotel"):
        expected = oracle(path, query, search.WINDOW)
        assert found(db, query, limit=None) == expected
        assert found(db, query, offset=100) == expected[100:120]


def test_best_match_within_the_window_and_only_there(db: SessionDB, monkeypatch) -> None:
    monkeypatch.setattr(search, "WINDOW", 3)
    db.create_session("s", "cli")
    strong = db.append_message("s", "user", "needle needle needle")  # oldest
    weak = [db.append_message("s", "user", f"needle {' '.join(['hay'] * k)}")
            for k in (9, 3, 6)]
    best_recent = db.append_message("s", "user", "needle needle hay")
    # The newest window is the 3 newest matches, best first; the strongest match of
    # all is older than it, so it leads the second window.
    assert found(db, "needle", limit=None) == [best_recent, weak[1], weak[2], strong,
                                                weak[0]]
    assert found(db, "needle", limit=2, offset=2) == [weak[2], strong]


def test_fewer_matches_than_a_window_are_simply_best_first(db: SessionDB) -> None:
    db.create_session("s", "cli")
    weak = db.append_message("s", "user", "apple banana cherry date elderberry fig")
    strong = db.append_message("s", "user", "apple apple apple banana cherry date")
    twin = db.append_message("s", "user", "apple apple apple banana cherry date")
    assert found(db, "apple") == [twin, strong, weak]  # equal scores: newest first
    assert found(db, "apple cherry") == [twin, strong, weak]


def test_a_session_filter_finds_old_messages_of_a_common_word(db: SessionDB,
                                                              monkeypatch) -> None:
    monkeypatch.setattr(search_walks, "CHUNK", 4)
    monkeypatch.setattr(search_walks, "FIRST_SPAN", 16)
    db.create_session("old", "cli")
    db.create_session("busy", "cli")
    db.create_session("rare", "slack")
    old = [db.append_message("old", "user", f"common word {i}") for i in range(10)]
    with db.transaction():
        for i in range(2000):
            db.append_message("busy", "assistant", f"common chatter {i}")
            if i % 400 == 0:
                db.append_message("rare", "tool", f"common rare {i}")
    assert sorted(found(db, "common", session_id="old", limit=None)) == old
    assert len(found(db, "common", sources=["slack"], limit=None)) == 5
    assert found(db, "chatter", session_id="old") == []
    assert found(db, "common", session_id="old", roles=["tool"]) == []


def test_multi_phrase_order_is_fts5_bm25_in_a_small_store(db: SessionDB) -> None:
    db.create_session("s", "cli")
    rng = random.Random(3)
    with db.transaction():
        for _ in range(300):
            db.append_message("s", "user", _text(rng))
    for query in ("alpha hotel", "bravo OR kilo", '"alpha alpha" charlie', "de* alpha"):
        assert found(db, query, limit=None) == oracle(db.path, query, search.WINDOW)


def test_hermes_facade_orders_by_the_same_window_rule(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(search, "WINDOW", 2)
    db = HermesSessionDB(tmp_path / "h.db")
    try:
        db.create_session("s", "cli")
        strong = db.append_message("s", "user", "apple apple apple")
        weak = db.append_message("s", "user", "apple pie crust and more words here")
        mid = db.append_message("s", "user", "apple apple crust")
        assert [h["id"] for h in db.search_messages("apple")] == [mid, weak, strong]
        assert [h["id"] for h in db.search_messages("apple", limit=1, offset=2)] == [strong]
        assert [h["id"] for h in db.search_messages("apple crust OR pie")] == oracle(
            db.path, "apple crust OR pie", 2, raw=True)
        # Prefixes, written out as ORs of words or (a column filter) left to FTS5.
        for query in ("app* cr*", "content:app* pie", "appl* NOT crust"):
            assert [h["id"] for h in db.search_messages(query)] == oracle(
                db.path, query, 2, raw=True), query
        assert db.search_messages("apple", source_filter=["cron"]) == []
        assert [h["id"] for h in db.search_messages("apple", role_filter=["user"],
                                                    exclude_sources=["cron"])] == [
            mid, weak, strong]
    finally:
        db.close()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.lists(st.sampled_from(list('"*-:()^ ab\x00') + WORDS[:6] +
                                     ["AND", "OR", "NOT", "zulu*"]), max_size=12).map("".join),
       kw=st.sampled_from(FILTERS), offset=st.sampled_from([0, 3, 24, 25, 26, 100]))
def test_hostile_queries_with_filters_never_raise(store, small, query, kw, offset) -> None:
    db, _ = store
    assert isinstance(db.search_messages(query, offset=offset, **kw), list)


def test_a_prefix_index_changes_the_time_not_the_hits(db: SessionDB, monkeypatch) -> None:
    # A prefix query runs fewer statements when no prefix= index covers it (each one
    # would merge whole doclists) and weighs its phrases alike; with one it runs as any
    # query. The same windows either way.
    monkeypatch.setattr(search, "WINDOW", 30)
    monkeypatch.setattr(search_walks, "FIRST_SPAN", 20)
    rng = random.Random(5)
    for sid, source in (("a", "cli"), ("b", "slack"), ("c", "cron")):
        db.create_session(sid, source)
    with db.transaction():
        for _ in range(600):
            db.append_message(rng.choice("abc"), rng.choice(ROLES), _text(rng))
    queries = [("al*", {}), ("br*", {"sources": ["slack"]}), ("alpha ju*", {}),
               ("alp* br*", {"roles": ["tool"]}), ("ki* OR li*", {"session_id": "c"})]
    without = [found(db, q, limit=None, **kw) for q, kw in queries]
    conn = apsw.Connection(str(db.path))
    conn.execute("DROP TABLE messages_fts; CREATE VIRTUAL TABLE messages_fts USING fts5("
                 "content, content='messages', content_rowid='id', prefix='2 3'); "
                 "INSERT INTO messages_fts(messages_fts) VALUES('rebuild')")
    conn.close()
    with_index = [found(db, q, limit=None, **kw) for q, kw in queries]
    assert all(without)
    for (query, _), before, after in zip(queries, without, with_index):
        if len(sanitize_fts_query(query).split()) == 1:  # one phrase: the same order
            assert after == before
        else:  # phrases weighted alike without the index, by frequency with it
            assert [set(after[i:i + 30]) for i in range(0, len(after), 30)] == [
                set(before[i:i + 30]) for i in range(0, len(before), 30)]


def test_context_of_long_neighbours_is_their_head(db: SessionDB, tmp_path: Path) -> None:
    # Long neighbours are read by their first bytes only (incremental BLOB I/O); the
    # context is the same as when the whole value was cut.
    db.create_session("s", "cli")
    db.append_message("s", "user", "é" * 100_000)
    hit = db.append_message("s", "assistant", "needle here")
    db.append_message("s", "tool", "\x00x" * 50_000)
    db.append_message("s", "user", None)
    [found_hit] = db.search_messages("needle")
    assert found_hit["id"] == hit
    assert found_hit["context"] == [
        {"role": "user", "content": "é" * 200}, {"role": "assistant", "content": "needle here"},
        {"role": "tool", "content": ("\x00x" * 100)[:200]}]
    hdb = HermesSessionDB(db.path)
    try:
        [h] = hdb.search_messages("needle")
        assert h["context"] == [
            {"role": "user", "content": "é" * 200},
            {"role": "assistant", "content": "needle here"},
            {"role": "tool", "content": ("\x00x" * 100)[:200]}]
    finally:
        hdb.close()


def test_a_written_out_prefix_under_a_rare_source_tests_its_messages() -> None:
    # The figures of "zg*" (103 words) with sources=["slack"] on the million-message
    # benchmark store: the first span of the newest table (1,024 ids, nearly all
    # matches, none of slack's) and slack's 195 sessions of 9,750 messages. Its session
    # walk (a statement per session, each starting with 103 seeks) took 60-90 ms;
    # testing slack's newest messages one by one, 21 ms.
    span = search_costs.Span(ids=1024, left=212544, matches=1003, kept=0, us_per_id=2.0)
    memo: dict[str, Any] = {"sessions": (195, 9750)}
    filters = search.Filters(sources=["slack"])
    args = (None, filters, 1000, span, 4635.0, 0.214, memo)
    costs = search_costs.way_costs(*args, True)
    assert min(costs, key=costs.__getitem__) == "rows"
    assert costs["rows"] < costs["sessions"] / 2
    assert "rows" not in search_costs.way_costs(*args)  # no row test: the others only
    assert search_costs.cheapest_way(*args) == "sessions"
    # No match in the span: no rate to go by, so no estimate.
    none = dataclasses.replace(span, matches=0)
    assert "rows" not in search_costs.way_costs(None, filters, 1000, none, 4635.0, 0.214,
                                                memo, True)


@pytest.mark.parametrize("query, kw, merged", [
    ("lexer", {}, False), ("lexer", {"sources": ["cli"]}, False),
    ("lexer", {"session_id": "far"}, False), ("lex*", {"sources": ["cli"]}, False),
    ("l*", {}, False), ("l*", {}, True)])
def test_ids_far_apart_cost_no_window_per_empty_block(tmp_path: Path, monkeypatch,
                                                       query: str, kw: dict, merged: bool
                                                       ) -> None:
    # An import keeps the ids it is given. Windows went down one block of 262,144 ids
    # at a time, a statement each, also through blocks holding no message: a store
    # with messages at ids 5 and 10**15 took hours to search. merged: the windows of a
    # one-letter prefix cut from one statement's rows (no row test). Windows of 2, and
    # texts that score by their count of the word, so that the windows' edges show.
    far = [5, 6, 10**9, 10**9 + 3, 10**12, 10**15, 10**15 + 1, 10**15 + 2]
    near = [7, 8, 10**9 + 1, 10**9 + 2]
    count = {i: 1 + n % 3 for ids in (far, near) for n, i in enumerate(ids)}
    with SessionDB(tmp_path / "s.db") as db:
        db.import_sessions([
            {"id": sid, "source": source, "started_at": 1.0, "messages": [
                {"id": i, "role": "user", "timestamp": 1.0,
                 "content": " ".join(["lexer"] * count[i])} for i in ids]}
            for sid, source, ids in (("far", "cli", far), ("near", "slack", near))])
        windows: list[int] = []
        block_start = search._block_start

        def counted(top: int, lo: int) -> int:
            windows.append(top)
            assert len(windows) < 1000, "a window per empty block"
            return block_start(top, lo)

        monkeypatch.setattr(search, "_block_start", counted)
        monkeypatch.setattr(search, "WINDOW", 2)
        if merged:
            monkeypatch.setattr(search, "_tested", lambda *args: None)
        # The documented order: windows of the 2 newest matches left in the block of
        # the newest, each best first (more of the word: a higher bm25), ties newest.
        matches, expected = sorted(far if kw else far + near, reverse=True), []
        while matches:
            block = (matches[0] - 1) // search.HORIZON * search.HORIZON + 1
            window = [m for m in matches if m >= block][:2]
            expected += sorted(window, key=lambda m: (-count[m], -m))
            matches = matches[len(window):]
        assert found(db, query, limit=None, **kw) == expected
        for offset in range(0, len(expected), 3):
            assert found(db, query, limit=3, offset=offset, **kw) == \
                expected[offset:offset + 3]
