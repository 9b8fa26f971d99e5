"""The search horizon (SQLite): windows of ranked matches that also end at the lower
end of their block of 'HORIZON' ids. Sparse matches spread over many windows (and many empty ones) in a
store of a few thousand messages with a small horizon, every offset (so pages that start
on a window's boundary, straddle one, or skip whole windows), a session whose ids span
the store, messages deleted between searches, a range not indexed yet, and searches
inside snapshot() and transaction(), each against the brute-force oracle of
test_search_scale. No timings; the statements a search runs are counted where the
horizon could multiply them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator

import apsw
import pytest
from test_search_rows import count_tested
from test_search_scale import found, oracle, strategy  # noqa: F401 (a fixture)

from sessiondb import SessionDB, search, search_prefix, search_walks

WINDOW, HORIZON = 5, 100
FILTERS: list[dict[str, Any]] = [
    {}, {"sources": ["slack"]}, {"exclude_sources": ["cli"]}, {"roles": ["tool"]},
    {"session_id": "long"}, {"session_id": "long", "roles": ["user"]},
    {"session_id": "late"}, {"sources": ["cli"], "roles": ["assistant", "tool"]},
]


@pytest.fixture
def horizon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of 5 within 100 ids, a first span of 16 ids, chunks of 4 messages."""
    monkeypatch.setattr(search, "WINDOW", WINDOW)
    monkeypatch.setattr(search, "HORIZON", HORIZON)
    monkeypatch.setattr(search_walks, "FIRST_SPAN", 16)
    monkeypatch.setattr(search_walks, "CHUNK", 4)


def _fill(db: SessionDB, rng: random.Random, count: int) -> None:
    """``count`` messages; "needle" in a few percent of them (runs of several, then
    none for hundreds of ids), "early" only in the first 40 messages and "late" only in
    the last 40, "zz" and "zy" everywhere. One session ("long") has messages from the
    first id to the last; "late" only near the end; a slack session in between."""
    sessions = ["long", "late", "slack1"] + [f"s{i}" for i in range(20)]
    db.create_session("long", "cron")
    db.create_session("late", "telegram")
    db.create_session("slack1", "slack")
    for i in range(20):
        db.create_session(f"s{i}", "cli" if i % 3 else "telegram")
    with db.transaction():
        for n in range(count):
            if n >= count - 150 and rng.random() < 0.3:
                sid = "late"
            elif rng.random() < 0.05:
                sid = "long"
            elif 800 <= n < 1400 and rng.random() < 0.1:
                sid = "slack1"
            else:
                sid = sessions[3 + (n // 150) % 20]
            words = ["zz", "zy"] + [f"w{rng.randint(0, 60)}" for _ in range(rng.randint(1, 8))]
            burst = (n // 50) % 9 in (0, 4)  # runs of matches, then hundreds of ids without
            if burst and rng.random() < 0.25:
                words += ["needle"] * rng.randint(1, 3)
            if n < 40:
                words.append("early")
            if n >= count - 40:
                words.append("late")
            if rng.random() < 0.02:
                words.remove("zy")  # "zz NOT zy": few matches among words in every message
            rng.shuffle(words)
            db.append_message(sid, rng.choice(["user", "assistant", "tool"]), " ".join(words))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[SessionDB, Path]]:
    path = tmp_path / "horizon.db"
    db = SessionDB(path)
    _fill(db, random.Random(7), 2000)
    try:
        yield db, path
    finally:
        db.close()


def _every_page(db: SessionDB, query: str, expected: list[int], **kw: Any) -> None:
    """Every offset, so that pages start on each window's first hit, straddle each
    boundary, and skip whole (and empty) windows."""
    for offset in range(len(expected) + 2):
        assert found(db, query, limit=3, offset=offset, **kw) == expected[offset:offset + 3], (
            offset, kw)
    assert found(db, query, limit=None, offset=len(expected) // 2, **kw) == expected[
        len(expected) // 2:], kw


@pytest.mark.parametrize("query", ["needle", "early", "late", "zz NOT zy", "needle OR late",
                                   "nothing"])
def test_sparse_matches_over_many_windows(store, horizon, query: str) -> None:
    db, path = store
    for kw in FILTERS:
        expected = oracle(path, query, WINDOW, horizon=HORIZON, **kw)
        assert found(db, query, limit=None, **kw) == expected, kw
        _every_page(db, query, expected, **kw)


@pytest.mark.parametrize("query", ["needle", "zz NOT zy"])
def test_every_way_of_finding_candidates_keeps_the_windows(store, horizon, strategy,
                                                           query: str) -> None:
    db, path = store
    for kw in FILTERS:
        expected = oracle(path, query, WINDOW, horizon=HORIZON, **kw)
        assert found(db, query, limit=None, **kw) == expected, kw
        for offset in range(0, len(expected) + 1, 2):
            assert found(db, query, limit=3, offset=offset, **kw) == expected[
                offset:offset + 3], (offset, kw)


def test_window_boundaries_follow_the_rule(store, horizon) -> None:
    # The oracle's rule, spelled out on the store itself: a window is full (WINDOW
    # matches, the next one starting below its oldest) or holds every match left in
    # its block of HORIZON ids (the next one starting in the block below).
    db, path = store
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        matches = [r[0] for r in conn.execute(
            "SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'needle' "
            "ORDER BY rowid DESC")]
        top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
    finally:
        conn.close()
    sizes = []
    while top > 0:
        block = (top - 1) // HORIZON * HORIZON + 1
        part = [r for r in matches if block <= r <= top][:WINDOW]
        sizes.append(len(part))
        top = part[-1] - 1 if len(part) == WINDOW else block - 1
    assert 0 in sizes and any(0 < s < WINDOW for s in sizes) and WINDOW in sizes
    everything = found(db, "needle", limit=None)
    at = 0
    for size in sizes:  # each window's hits are the oracle's, in bm25 order within it
        assert sorted(everything[at:at + size], reverse=True) == matches[at:at + size]
        at += size
    assert at == len(everything) == len(matches)


def test_deleted_messages_move_the_windows_as_the_rule_says(store, horizon) -> None:
    db, path = store
    before = found(db, "needle", limit=None)
    assert before == oracle(path, "needle", WINDOW, horizon=HORIZON)
    # The newest message (the start of the first window), a session spread over the
    # whole store, then the session holding most of the newest messages: each search is
    # the rule's over what is left.
    db.pop_message("late")
    assert found(db, "needle", limit=None) == oracle(path, "needle", WINDOW, horizon=HORIZON)
    assert db.delete_session("long")
    for kw in ({}, {"sources": ["slack"]}, {"session_id": "long"}):
        expected = oracle(path, "needle", WINDOW, horizon=HORIZON, **kw)
        assert found(db, "needle", limit=None, **kw) == expected, kw
        _every_page(db, "needle", expected, **kw)
    assert db.delete_session("late")
    for query in ("late", "needle"):
        expected = oracle(path, query, WINDOW, horizon=HORIZON)
        assert expected and found(db, query, limit=None) == expected, query


def test_an_empty_store_and_no_sources(tmp_path: Path, horizon) -> None:
    db = SessionDB(tmp_path / "empty.db")
    try:
        assert found(db, "needle", limit=None) == []
        assert found(db, "needle", offset=7) == []
        db.create_session("s", "cli")
        assert found(db, "needle", session_id="s", limit=None) == []
        hit = db.append_message("s", "user", "needle")
        assert found(db, "needle", limit=None) == [hit]
        assert found(db, "needle", sources=[], limit=None) == []
        assert found(db, "needle", offset=1) == []
    finally:
        db.close()


def test_pages_in_a_snapshot_ignore_messages_written_meanwhile(store, horizon) -> None:
    # Inside snapshot() every page is read as of its start: new messages (matches or
    # not) written by another handle meanwhile move no window.
    db, path = store
    expected = oracle(path, "needle", WINDOW, horizon=HORIZON)
    other = SessionDB(path)
    try:
        pages: list[int] = []
        with db.snapshot():
            for offset in range(0, len(expected) + 4, 4):
                pages += found(db, "needle", limit=4, offset=offset)
                other.append_message("late", "user", "needle" if offset % 8 else "noise")
        assert pages == expected
        assert found(db, "needle", limit=None) == oracle(path, "needle", WINDOW,
                                                         horizon=HORIZON)
    finally:
        other.close()


def test_inside_a_transaction_prefixes_are_fts5s_in_every_window(store, horizon) -> None:
    # In a write transaction a prefix is neither written out nor tested one by one: the
    # query runs as FTS5 reads it, merging whole doclists, window after window.
    db, path = store
    hit = db.append_message("late", "user", "needlework")
    with db.transaction():
        db.update_token_counts("late", input_tokens=1)  # a write: the write transaction
        for query, kw in (("needle*", {}), ("w1*", {"sources": ["slack"]}),
                          ("nee* NOT zy", {}), ("needle*", {"session_id": "long"})):
            expected = oracle(path, query, WINDOW, horizon=HORIZON, **kw)
            assert found(db, query, limit=None, **kw) == expected, (query, kw)
            assert found(db, query, limit=3, offset=WINDOW - 1, **kw) == expected[
                WINDOW - 1:WINDOW + 2], (query, kw)
        assert found(db, "needlework") == [hit]


@pytest.fixture
def one_by_one(monkeypatch: pytest.MonkeyPatch, horizon) -> list[int]:
    """Every one-letter prefix tested message by message whatever it costs (as on a
    large store); returns a list that grows by one per window answered that way."""
    return count_tested(monkeypatch)


def test_a_range_not_indexed_yet_is_left_to_fts5(store, one_by_one) -> None:
    # The pending range covers the newest window only: that window is FTS5's (and the
    # windows below it are cut from the same statement's rows); a session whose
    # messages all lie below the range is tested one by one. Either way, the rule's
    # order.
    db, path = store
    conn = apsw.Connection(str(path))
    try:
        top = conn.execute("SELECT max(id) FROM messages").fetchone()[0]
        conn.execute("INSERT INTO sessiondb_fts_pending (lo, hi) VALUES (?, ?)",
                     (top - 5, top + 5))
        for kw in ({}, {"sources": ["slack"]}, {"session_id": "long"}):
            expected = oracle(path, "z*", WINDOW, horizon=HORIZON, **kw)
            assert found(db, "z*", limit=None, **kw) == expected, kw
            assert found(db, "z*", limit=4, offset=3, **kw) == expected[3:7], kw
        assert one_by_one  # the session "long", whose newest message is below the range
    finally:
        conn.close()


def test_a_one_letter_prefix_tested_over_many_windows(store, one_by_one) -> None:
    db, path = store
    for query in ("z*", "z* NOT zy", "n* early"):
        for kw in FILTERS[:5]:
            expected = oracle(path, query, WINDOW, horizon=HORIZON, **kw)
            assert found(db, query, limit=None, **kw) == expected, (query, kw)
            assert found(db, query, limit=3, offset=WINDOW, **kw) == expected[
                WINDOW:WINDOW + 3], (query, kw)
    assert one_by_one


def _statements(monkeypatch: pytest.MonkeyPatch, path: Path, query: str, **kw: Any
                ) -> tuple[list[int], list[str]]:
    """The hits of a search by a new handle, and the SQL of every statement it ran."""
    ran: list[str] = []

    def trace(conn: apsw.Connection) -> None:
        conn.set_exec_trace(lambda cursor, sql, bindings: ran.append(sql) or True)

    monkeypatch.setattr(apsw, "connection_hooks", [*apsw.connection_hooks, trace])
    db = SessionDB(path)
    try:
        ran.clear()
        return found(db, query, **kw), list(ran)
    finally:
        db.close()


def test_a_merged_prefix_is_read_once_however_many_windows(store, horizon,
                                                           monkeypatch) -> None:
    # A prefix FTS5 merges (not written out, and its test one by one estimated dearer
    # than the merge) costs the merge in every statement whatever the statement's id
    # range (a one-letter prefix: about 1 s on a million messages): its windows are
    # cut from one statement, not one per window.
    _, path = store
    monkeypatch.setattr(search_prefix, "STATEMENTS", 10**9)
    monkeypatch.setattr(search_prefix, "merge_cost_us", lambda conn, match, table="messages_fts": 0.0)
    for query, kw in (("z*", {}), ("n*", {"roles": ["tool"]}), ("z*", {"sources": ["slack"]}),
                      ("z*", {"session_id": "long"}), ("z* NOT zy", {})):
        expected = oracle(path, query, WINDOW, horizon=HORIZON, **kw)
        hits, ran = _statements(monkeypatch, path, query, limit=None, **kw)
        assert hits == expected and len(expected) > 2 * WINDOW + 3, (query, kw)
        walks = [sql for sql in ran if "ORDER BY messages_fts.rowid" in sql]  # not the hits
        assert len(walks) == 1, (query, kw, walks)
        hits, _ = _statements(monkeypatch, path, query, limit=4, offset=2 * WINDOW - 1, **kw)
        assert hits == expected[2 * WINDOW - 1:2 * WINDOW + 3], (query, kw)


def test_the_filters_sessions_are_counted_once_per_search(store, horizon,
                                                          monkeypatch) -> None:
    # The cost model's count of the filter's sessions and messages does not depend on
    # the window: a search over twenty windows asks once.
    _, path = store
    for kw in ({"sources": ["slack"]}, {"exclude_sources": ["cli"]}, {"session_id": "long"}):
        hits, ran = _statements(monkeypatch, path, "nothing", limit=None, **kw)
        assert hits == []
        assert sum("sum(message_count)" in sql for sql in ran) <= 1, kw
        hits, ran = _statements(monkeypatch, path, "needle", limit=None, **kw)
        assert hits == oracle(path, "needle", WINDOW, horizon=HORIZON, **kw)
        assert sum("sum(message_count)" in sql for sql in ran) <= 1, kw


def test_pages_keep_their_windows_when_other_messages_are_appended(store, horizon) -> None:
    # Messages that do not match, appended between pages (an agent's own tool results
    # while it pages through a search), change no window: the blocks are fixed ranges
    # of ids, not counted from the newest id (which moved every window's lower end).
    db, _ = store
    everything = found(db, "zz NOT zy", limit=None)  # about 2 matches per 100 ids
    pages: list[int] = []
    for offset in range(0, len(everything), 3):
        pages += found(db, "zz NOT zy", limit=3, offset=offset)
        for _ in range(7):
            db.append_message("s1", "tool", "no match here")
    assert pages == everything
