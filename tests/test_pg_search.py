"""Full-text search on PostgreSQL (sessiondb.pg.search): the shapes of query, hostile
text, snippets, filters, paging through the window order against an oracle computed
in SQL, every way of finding the matches, and a 10 MB message.

Runs against the test PostgreSQL server (tests/pg_fixtures.py), each store in a schema
of its own."""

from __future__ import annotations

import random
import time
import uuid
from typing import Any, Iterator

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessiondb import InvalidArgument, SessionDB
from sessiondb.pg import search as pg_search

URL = ""  # the test server's, set by _server


@pytest.fixture(scope="module", autouse=True)
def _server(pg_server: Any) -> None:
    global URL
    URL = pg_server.url()


def _fresh(url: str) -> tuple[SessionDB, str]:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    sep = "&" if "?" in url else "?"
    return SessionDB(f"{url}{sep}schema={schema}"), schema


def _drop(schema: str) -> None:
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def db() -> Iterator[SessionDB]:
    """A fresh store in a schema of its own, dropped after the test."""
    store, schema = _fresh(URL)
    try:
        yield store
    finally:
        store.close()
        _drop(schema)


@pytest.fixture(scope="module")
def corpus() -> Iterator[SessionDB]:
    """The SQLite search tests' corpus (read only)."""
    store, schema = _fresh(URL)
    store.create_session("a", "cli", model="m-a")
    store.create_session("b", "telegram")
    store.create_session("c", "discord")
    store.append_message("a", "user", "how do I deploy the docker container")
    store.append_message("b", "user", "unrelated chatter about lunch")
    store.append_message("a", "assistant", "use the chat-send tool to deploy quickly")
    store.append_message("b", "assistant", "deploy the rocket to orbit")
    store.append_message("a", "tool", "deploy finished: status ok", tool_name="shell")
    store.append_message("c", "user", "apple banana cherry")
    store.append_message("c", "user", "apple only here")
    store.append_message("c", "user", "send chat backwards")
    try:
        yield store
    finally:
        store.close()
        _drop(schema)


def ids(hits: list[dict]) -> list[tuple[str, str]]:
    return sorted((h["session_id"], h["role"]) for h in hits)


# -- shapes, filters, snippets, context -------------------------------------------------

def test_basic_hit_shape(corpus: SessionDB) -> None:
    (hit,) = corpus.search_messages("rocket")
    assert list(hit) == ["id", "session_id", "role", "snippet", "timestamp", "tool_name",
                         "source", "model", "session_started", "context"]
    assert (hit["session_id"], hit["role"], hit["source"]) == ("b", "assistant", "telegram")
    assert hit["snippet"] == "deploy the >>>rocket<<< to orbit"
    assert hit["session_started"] == corpus.get_session("b")["started_at"]
    assert isinstance(hit["id"], int) and isinstance(hit["timestamp"], float)
    (hit,) = corpus.search_messages("finished")
    assert (hit["tool_name"], hit["model"]) == ("shell", "m-a")


def test_words_phrases_prefixes_and_operators(corpus: SessionDB) -> None:
    assert ids(corpus.search_messages("DEPLOY")) == [
        ("a", "assistant"), ("a", "tool"), ("a", "user"), ("b", "assistant")]
    assert ids(corpus.search_messages('"chat send"')) == [("a", "assistant")]
    assert ids(corpus.search_messages("chat send")) == [("a", "assistant"), ("c", "user")]
    assert ids(corpus.search_messages("chat-send")) == [("a", "assistant")]
    assert len(corpus.search_messages("apple OR rocket")) == 3
    assert len(corpus.search_messages("apple AND banana")) == 1
    assert len(corpus.search_messages("apple banana")) == 1
    assert len(corpus.search_messages("apple NOT banana")) == 1
    assert len(corpus.search_messages("apple -banana")) == 1
    assert len(corpus.search_messages('deploy NOT "the rocket"')) == 3
    assert len(corpus.search_messages("app*")) == 2
    assert len(corpus.search_messages("dock*")) == 1
    assert len(corpus.search_messages("chat-se*")) == 1
    # An operator or a minus with no term before it is not one.
    assert len(corpus.search_messages("NOT deploy")) == 4
    assert len(corpus.search_messages("-deploy")) == 4
    assert len(corpus.search_messages("apple OR NOT rocket")) == 3


def test_filters(corpus: SessionDB) -> None:
    q = "deploy"
    assert ids(corpus.search_messages(q, sources=["telegram"])) == [("b", "assistant")]
    assert ids(corpus.search_messages(q, sources=["cli", "telegram"])) == ids(
        corpus.search_messages(q))
    assert corpus.search_messages(q, sources=[]) == []
    assert ids(corpus.search_messages(q, exclude_sources=["cli"])) == [("b", "assistant")]
    assert ids(corpus.search_messages(q, exclude_sources=[])) == ids(
        corpus.search_messages(q))
    assert ids(corpus.search_messages(q, roles=["user", "tool"])) == [
        ("a", "tool"), ("a", "user")]
    assert ids(corpus.search_messages(q, roles=[])) == ids(corpus.search_messages(q))
    assert ids(corpus.search_messages(q, session_id="b")) == [("b", "assistant")]
    assert corpus.search_messages(q, session_id="missing") == []
    assert ids(corpus.search_messages(q, sources=["cli"], roles=["assistant"])) == [
        ("a", "assistant")]


def test_limit_offset_and_limit_none(corpus: SessionDB) -> None:
    everything = corpus.search_messages("deploy", limit=None)
    assert len(everything) == 4
    assert [h["id"] for h in corpus.search_messages("deploy", limit=2)] == \
        [h["id"] for h in everything[:2]]
    assert [h["id"] for h in corpus.search_messages("deploy", limit=2, offset=2)] == \
        [h["id"] for h in everything[2:]]
    assert corpus.search_messages("deploy", offset=4) == []
    assert corpus.search_messages("deploy", limit=0) == []
    assert corpus.search_messages("deploy", limit=None, offset=3) == everything[3:]


def test_snippets(db: SessionDB) -> None:
    db.create_session("s", "cli")
    words = " ".join(f"w{i}" for i in range(200))
    db.append_message("s", "user", words + " needle " + words)
    (hit,) = db.search_messages("needle")
    assert ">>>needle<<<" in hit["snippet"]
    assert hit["snippet"].startswith("...") and hit["snippet"].endswith("...")
    assert len(hit["snippet"].split()) <= 42
    db.append_message("s", "user", "two two")
    (hit,) = db.search_messages("two")
    assert hit["snippet"] == ">>>two<<< >>>two<<<"
    db.append_message("s", "user", "first words then a prefixed matchword here")
    (hit,) = db.search_messages("matchw*")
    assert hit["snippet"] == "first words then a prefixed >>>matchword<<< here"


def test_context_is_neighbours_in_same_session(db: SessionDB) -> None:
    db.create_session("a", "cli")
    db.create_session("b", "cli")
    db.append_message("a", "user", "first")
    db.append_message("b", "user", "noise one")
    db.append_message("a", "assistant", "middle needle")
    db.append_message("b", "user", "noise two")
    db.append_message("a", "user", "last " + "z" * 300)
    (hit,) = db.search_messages("needle")
    assert hit["context"] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "middle needle"},
        {"role": "user", "content": ("last " + "z" * 300)[:200]},
    ]
    (hit,) = db.search_messages("first")
    assert [c["content"] for c in hit["context"]] == ["first", "middle needle"]


# -- hostile text -------------------------------------------------------------------

HOSTILE = [
    '"', '""', '"""', '"unbalanced', 'unbalanced"', 'a "b c', '"deploy" "', '" deploy',
    "'", "it's", "-", "--", "-deploy", "deploy-", "a--b", "deploy - docker",
    "AND", "OR", "NOT", "AND deploy", "deploy AND", "deploy OR", "NOT deploy", "deploy NOT",
    "deploy AND AND docker", "deploy OR OR", "AND OR NOT", "NOT NOT", "deploy AND NOT",
    "(", ")", "(deploy", "deploy)", "((deploy)", "deploy ) (", "()", "!deploy",
    "deploy & !",
    "*", "**", "*deploy", "deploy**", "* *", "dep*loy", "deploy:*", "'deploy':*", "<->",
    "deploy <-> docker", "deploy <2> docker", "a|b", "a&b", "!!", "\\", "\\'", "''''",
    ":", "content:", "content:deploy", ":deploy", "a:b:c", "deploy:A", "deploy:*AB",
    "^", "+", "{deploy}", "NEAR(deploy docker)", "'; DROP TABLE messages; --", "%", "%s",
    "%(q)s", "?", "$1", "_", "@user", "#tag", "", " ", "\t\n", "   \u3000 ",
    "nul\x00byte", '"nul\x00in phrase"', "\x00", "\x01\x02", "😀", "日本語", "\u200b",
    "\ufeff", "\u0301", "²", "foo.py", "user@example.com", "v1.2.3", "http://x.y/z?a=b",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(corpus: SessionDB, query: str) -> None:
    assert isinstance(corpus.search_messages(query), list)


@pytest.mark.parametrize("query", ["", " ", "\t\n", '"', "*", "AND", "OR NOT", "()", ":",
                                   "-", "!!", "<->"])
def test_queries_with_nothing_searchable_are_empty(corpus: SessionDB, query: str) -> None:
    assert corpus.search_messages(query) == []


@pytest.mark.parametrize("query, expected", [
    ('"deploy', 4), ('deploy"', 4), ("(deploy", 4), ("deploy)", 4), ("deploy AND", 4),
    ("AND deploy", 4), ("NOT deploy", 4), ("deploy OR OR docker", 4), ("deploy*", 4),
    ("^deploy", 4), ("deploy -", 4), ("deploy AND AND docker", 1), ("deploy:*", 4),
    ("!deploy", 4), ("deploy & docker", 1), ("'deploy'", 4),
])
def test_hostile_queries_still_search_the_words(corpus: SessionDB, query: str,
                                                expected: int) -> None:
    assert len(corpus.search_messages(query)) == expected


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=40))
def test_any_text_returns_a_list(corpus: SessionDB, query: str) -> None:
    assert isinstance(corpus.search_messages(query), list)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.lists(st.sampled_from(
    ['"', "(", ")", "*", ":", "^", "-", "+", "!", "&", "|", "<->", "'", "\\", "AND", "OR",
     "NOT", "deploy", "chat", " ", "\x00", "{", "}", ",", ".", "😀"]), max_size=14)
    .map("".join))
def test_any_operator_soup_returns_a_list(corpus: SessionDB, query: str) -> None:
    assert isinstance(corpus.search_messages(query), list)


def test_a_thousand_characters_of_garbage(corpus: SessionDB) -> None:
    rng = random.Random(3)
    alphabet = 'ab"():*-^!&|<>\' ORNTAD deploy chat \u00e9\u65e5\U0001F600\\%?'
    for _ in range(5):
        assert isinstance(corpus.search_messages(
            "".join(rng.choice(alphabet) for _ in range(1000))), list)
    assert corpus.search_messages("deploy " + " " * 993)
    with pytest.raises(InvalidArgument, match="1001 characters"):
        corpus.search_messages("deploy " * 143)


def test_a_message_is_found_by_its_own_text_as_a_phrase(db: SessionDB) -> None:
    db.create_session("s", "cli")
    texts = ["use sessiondb.pg.search with user@example.com at v1.2.3, okay?",
             "C'est déjà l'été: naïve café", "path /usr/bin/env -- x_y-z (a+b)*c",
             "日本語のテキスト 😀 emoji", "chat-send it's O'Brien's \\backslash"]
    added = {text: db.append_message("s", "user", text) for text in texts}
    for text, message_id in added.items():
        assert [h["id"] for h in db.search_messages('"' + text + '"')] == [message_id]


# -- the window order, paging, the ways of finding matches -----------------------------

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@pytest.fixture(scope="module")
def ordered() -> Iterator[tuple[SessionDB, str]]:
    """400 messages in 12 sessions of 3 sources, appended in random session order."""
    store, schema = _fresh(URL)
    rng = random.Random(7)
    sources = ["cli", "cli", "telegram", "cli", "cron"] * 2 + ["slack", "cli"]
    for i, source in enumerate(sources):
        store.create_session(f"s{i:02d}", source)
    with store.transaction():
        for n in range(400):
            text = " ".join(WORDS[min(len(WORDS) - 1, int(rng.paretovariate(1.0)) - 1)]
                            for _ in range(rng.randint(2, 12)))
            store.append_message(f"s{rng.randrange(len(sources)):02d}",
                                 rng.choice(["user", "assistant", "tool"]), text)
    try:
        yield store, schema
    finally:
        store.close()
        _drop(schema)


def oracle(schema: str, tsquery: str, window: int, **filters: Any) -> list[int]:
    """Every match in the documented order, from PostgreSQL directly: newest first in
    windows, best ts_rank first within each, ties newest first."""
    return oracle_at(URL, schema, tsquery, window, **filters)


def oracle_at(url: str, schema: str, tsquery: str, window: int, **filters: Any) -> list[int]:
    """:func:`oracle` against the server at ``url`` (shared with tests/test_pg_bands.py)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            f'SELECT m.id, ts_rank(m.content_tsv, %s::tsquery, 1), m.session_id, m.role, '
            f's.source FROM "{schema}".messages m JOIN "{schema}".sessions s '
            "ON s.id = m.session_id WHERE m.content_tsv @@ %s::tsquery ORDER BY m.id DESC",
            [tsquery, tsquery]).fetchall()
    keep = [r for r in rows
            if (filters.get("sources") is None or r[4] in filters["sources"])
            and r[4] not in (filters.get("exclude_sources") or [])
            and (not filters.get("roles") or r[3] in filters["roles"])
            and filters.get("session_id") in (None, r[2])]
    out: list[int] = []
    for i in range(0, len(keep), window):
        out += [r[0] for r in sorted(keep[i:i + window], key=lambda r: (-r[1], -r[0]))]
    return out


@pytest.fixture(params=["walk", "gin", "gin-all", "sessions", "cost model"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Small windows and slices; and one way of finding matches forced after the first
    slice (the sessions way where a source filter allows it), or the cost model's."""
    monkeypatch.setattr(pg_search, "WINDOW", 9)
    monkeypatch.setattr(pg_search, "FIRST_SLICE", 16)
    if request.param != "cost model":
        def pick(costs: dict[tuple[str, int], float]) -> tuple[str, int]:
            chosen = [key for key in costs if key[0] == request.param]
            return chosen[0] if chosen else min(costs, key=costs.__getitem__)
        monkeypatch.setattr(pg_search, "_cheapest", pick)
    return request.param


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("alpha", "'alpha'", {}),
    ("hotel", "'hotel'", {}),
    ("golf OR hotel", "'golf' | 'hotel'", {}),
    ('"alpha bravo"', "'alpha' <-> 'bravo'", {}),
    ("alpha -bravo", "'alpha' & !'bravo'", {}),
    ("char*", "'char':*", {}),
    ("alpha", "'alpha'", {"sources": ["slack"]}),
    ("alpha", "'alpha'", {"sources": ["cli", "cron"], "roles": ["tool"]}),
    ("bravo", "'bravo'", {"exclude_sources": ["cli"]}),
    ("alpha", "'alpha'", {"roles": ["user"]}),
    ("alpha", "'alpha'", {"session_id": "s03"}),
    ("delta", "'delta'", {"session_id": "s10", "sources": ["slack"]}),
]


@pytest.mark.parametrize("query, tsquery, filters", CASES)
def test_pages_follow_the_window_order(ordered: tuple[SessionDB, str], way: str,
                                       query: str, tsquery: str,
                                       filters: dict[str, Any]) -> None:
    db, schema = ordered
    expected = oracle(schema, tsquery, 9, **filters)
    assert [h["id"] for h in db.search_messages(query, limit=None, **filters)] == expected
    pages: list[int] = []
    for offset in range(0, len(expected) + 7, 7):
        pages += [h["id"] for h in db.search_messages(query, limit=7, offset=offset,
                                                      **filters)]
    assert pages == expected  # no repeat, no skip, across windows
    assert [h["id"] for h in db.search_messages(query, limit=4, offset=16, **filters)] \
        == expected[16:20]


def test_window_order_with_the_real_window(db: SessionDB) -> None:
    """1,200 matches: the first page is the best of the newest 1,000 only, the oldest
    200 come after them."""
    db.create_session("s", "cli")
    with db.transaction():
        db.append_message("s", "user", "needle " * 50)  # the oldest
        for i in range(1_199):
            db.append_message("s", "user", f"needle filler{i} " + "x " * (i % 5))
    expected = oracle(db.path.rsplit("schema=", 1)[1], "'needle'", 1000)
    first = db.search_messages("needle", limit=20)
    assert [h["id"] for h in first] == expected[:20]
    assert all(h["id"] > 200 for h in first)
    second = db.search_messages("needle", limit=1000, offset=1000)
    assert [h["id"] for h in second] == expected[1000:]
    assert len(second) == 200 and 1 in [h["id"] for h in second]


# -- a 10 MB message ----------------------------------------------------------------

def test_ten_megabyte_message(db: SessionDB) -> None:
    db.create_session("s", "cli")
    body = "opening needle " + "filler words go on " * 600 + "deepword here " \
        + "more filler text " * 620_000
    assert len(body) > 10_000_000
    db.append_message("s", "user", body)
    db.append_message("s", "user", "after")
    started = time.monotonic()
    (hit,) = db.search_messages("needle")
    assert time.monotonic() - started < 1.0
    assert hit["snippet"].startswith("opening >>>needle<<<") and \
        hit["snippet"].endswith("...")
    assert hit["context"][0]["content"] == body[:200]
    started = time.monotonic()
    (hit,) = db.search_messages("deepword")  # past the head given to ts_headline
    assert time.monotonic() - started < 1.0
    assert ">>>deepword<<<" in hit["snippet"]
    assert db.search_messages("filler", limit=None)[0]["id"] == hit["id"]
