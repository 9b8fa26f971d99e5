"""sessiondb.compat.hermes search_messages against the hermes-agent specification (its
section 8.1): the query sanitizer step by step, query semantics, invalid queries, filters,
order and paging, result shape, snippets, context (#6).

A contract file (tests/conftest.py): the tests taking ``hdb`` run on SQLite and on
PostgreSQL (#12); where PostgreSQL's full-text search differs by design (documented in
sessiondb.compat.hermes), a test says so by ``backend``.
"""

from __future__ import annotations

import sqlite3

import pytest

import sessiondb
from sessiondb.compat.hermes import SessionDB

HIT_KEYS = ["id", "session_id", "role", "snippet", "timestamp", "tool_name", "source",
            "model", "session_started", "context"]


@pytest.mark.parametrize("query, expected", [
    # 1. quoted phrases are kept verbatim, interior untouched
    ('"a (b) c-d" e-f', '"a (b) c-d" "e-f"'),
    ('"one" two "three*"', '"one" two "three*"'),
    ('"quoted"*', '"quoted"*'),
    ('say "hi', 'say  hi'),  # a final odd quote is a special
    ('"', ''), ('""', '""'),
    # 2. specials become spaces, other whitespace is not collapsed
    ("(a+b)", "a b"), ("{x}^y", "x  y"), ("a  \t b", "a  \t b"),
    # 3. stars
    ("a * b", "a  b"), ("*foo", "foo"), ("deploy**", "deploy*"), ("a *b", "a b"),
    ("***", ""), ("x**y", "x*y"),
    # 4. dangling operators, once at each end, any case
    ("and hello or", "hello"), ("OR", ""), ("AND", ""), ("NOT", ""), ("NOT NOT", "NOT"),
    ("AND OR hello", "OR hello"), ("foo  and  ", "foo"), ("and-on", "-on"),
    ("OR-gate", "-gate"), ("ANDROID", "ANDROID"), ("andy", "andy"),
    ("a AND b", "a AND b"), ("hello or world", "hello or world"), ("a NOT", "a"),
    ("a or or", "a or"),
    # 5. hyphenated compounds are quoted
    ("chat-send", '"chat-send"'), ("a-b-c d", '"a-b-c" d'), ("x--y", "x--y"),
    ("-foo", "-foo"), ("foo-*", "foo-*"), ("ünï-côde_1-2", '"ünï-côde_1-2"'),
    # 6. trimmed
    ("  hello  ", "hello"),
])
def test_sanitize_fts5_query(query, expected):
    assert SessionDB._sanitize_fts5_query(query) == expected


def test_a_query_holding_the_placeholder_text_is_not_confused():
    assert SessionDB._sanitize_fts5_query('\x00Q0\x00 "a b"') == '\x00Q0\x00 "a b"'
    assert SessionDB._sanitize_fts5_query('\ue000Q0\ue000 "x"') == '\ue000Q0\ue000 "x"'


@pytest.fixture
def corpus(hdb, clock):
    """Three sessions of different sources, models and roles."""
    texts = [
        ("fox", "s1", "user", "The quick brown fox jumps over the lazy dog"),
        ("docker", "s1", "assistant", "Deployment of the Dockerfile went fine, café au lait"),
        ("hello", "s2", "user", "hello world, run chat-send now"),
        ("goodbye", "s2", "tool", "hello or goodbye: snake_case output"),
        ("chat", "s3", "assistant", "chat and send are separate words here"),
    ]
    for sid, source in (("s1", "cli"), ("s2", "telegram"), ("s3", "cron")):
        hdb.create_session(sid, source, model=f"model-{sid}")
    ids = {}
    for i, (name, sid, role, content) in enumerate(texts):
        clock.now = 2000.0 + i
        ids[name] = hdb.append_message(sid, role, content)
    return ids


def found(db: SessionDB, query: str, **kw) -> list[int]:
    return sorted(h["id"] for h in db.search_messages(query, **kw))


def test_query_semantics(hdb, corpus, backend):
    assert found(hdb, "FOX") == [corpus["fox"]]  # case-insensitive
    # diacritics removed by FTS5's unicode61; PostgreSQL's 'simple' keeps them
    assert found(hdb, "cafe") == ([corpus["docker"]] if backend == "sqlite" else [])
    assert found(hdb, "café") == [corpus["docker"]]
    assert found(hdb, "quick dog") == [corpus["fox"]]  # implicit AND
    assert found(hdb, "quick hello") == []
    assert found(hdb, "hello or world") == []  # lowercase "or" is a term
    assert found(hdb, "hello or goodbye") == [corpus["goodbye"]]
    assert found(hdb, "fox OR goodbye") == [corpus["fox"], corpus["goodbye"]]
    assert found(hdb, "hello NOT goodbye") == [corpus["hello"]]
    assert found(hdb, "deploy*") == [corpus["docker"]]  # prefix
    assert found(hdb, '"quick brown"') == [corpus["fox"]]  # phrase
    assert found(hdb, '"brown quick"') == []
    assert found(hdb, "content:lazy") == [corpus["fox"]]  # column filter
    assert found(hdb, "CONTENT:lazy") == [corpus["fox"]]
    assert found(hdb, 'content:"lazy dog"') == [corpus["fox"]]
    assert found(hdb, "-content:lazy") == []  # every column but the only one
    assert found(hdb, "snake") == [corpus["goodbye"]]  # _ separates tokens
    assert found(hdb, "chat-send") == [corpus["hello"]]  # adjacent tokens, as a phrase
    assert found(hdb, "chat send") == [corpus["hello"], corpus["chat"]]


@pytest.mark.parametrize("query", [
    "", "   ", "\t\n", "***", '"', "AND", "OR", "NOT", "hello.", "it's", "@user",
    "foo:bar", "-hello", "NOT NOT", "AND OR hello", '""', "hello/world", "a|b",
    "x=1", "hello,", "50%", "[x]", "~hello", "#tag", "$x", "a;b", "a<b", "a?", "a\\b",
    "a`b", "a!", "a&b",
])
def test_invalid_or_empty_queries_return_an_empty_list(hdb, corpus, query):
    assert hdb.search_messages(query) == []


def test_filters(hdb, corpus):
    q = "hello OR fox OR chat OR Dockerfile"
    every = found(hdb, q)
    assert every == sorted(corpus.values())
    assert found(hdb, q, source_filter=None) == every
    assert found(hdb, q, source_filter=[]) == []  # [] matches nothing
    assert found(hdb, q, source_filter=["cli", "cron"]) == [
        corpus["fox"], corpus["docker"], corpus["chat"]]
    assert found(hdb, q, exclude_sources=[]) == every  # [] filters nothing
    assert found(hdb, q, exclude_sources=["cli"]) == [
        corpus["hello"], corpus["goodbye"], corpus["chat"]]
    assert found(hdb, q, role_filter=[]) == every
    assert found(hdb, q, role_filter=["assistant", "tool"]) == [
        corpus["docker"], corpus["goodbye"], corpus["chat"]]
    assert found(hdb, q, source_filter=["telegram"], exclude_sources=["cli"],
                 role_filter=["user"]) == [corpus["hello"]]


def test_result_shape(hdb, corpus):
    [hit] = hdb.search_messages("lazy")
    assert list(hit) == HIT_KEYS
    assert hit == {
        "id": corpus["fox"], "session_id": "s1", "role": "user",
        "snippet": "The quick brown fox jumps over the >>>lazy<<< dog",
        "timestamp": 2000.0, "tool_name": None, "source": "cli", "model": "model-s1",
        "session_started": 1000.0,
        "context": [
            {"role": "user", "content": "The quick brown fox jumps over the lazy dog"},
            {"role": "assistant",
             "content": "Deployment of the Dockerfile went fine, café au lait"}],
    }


def test_snippet_highlights(hdb, corpus, backend):
    def snippet(query: str) -> str:
        return hdb.search_messages(query)[0]["snippet"]

    assert snippet("separate") == "chat and send are >>>separate<<< words here"
    assert snippet("docker*") == "Deployment of the >>>Dockerfile<<< went fine, café au lait"
    hits = {h["id"]: h["snippet"] for h in hdb.search_messages("chat send")}
    assert hits[corpus["hello"]] == "hello world, run >>>chat<<<->>>send<<< now"
    if backend == "sqlite":  # FTS5 wraps a phrase as one span
        assert snippet("chat-send") == "hello world, run >>>chat-send<<< now"
        assert snippet('"run chat"') == "hello world, >>>run chat<<<-send now"
        assert snippet('"quick brown"') == "The >>>quick brown<<< fox jumps over the lazy dog"
    else:  # ts_headline wraps each word; a phrase into a hyphenated word is not found
        assert snippet("chat-send") == "hello world, run >>>chat<<<->>>send<<< now"
        assert hdb.search_messages('"run chat"') == []
        assert snippet('"quick brown"') == "The >>>quick<<< >>>brown<<< fox jumps over the lazy dog"


def test_tokens_and_query_length(hdb, backend):
    """PostgreSQL's parser keeps file names and versions whole, and its search takes
    queries of up to 1,000 characters (documented differences)."""
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "edit foo.py for v1.2")
    assert len(hdb.search_messages('"foo.py"')) == 1
    assert len(hdb.search_messages("foo")) == (1 if backend == "sqlite" else 0)
    long_query = "edit " + "x" * 1000
    if backend == "sqlite":
        assert hdb.search_messages(long_query) == []
    else:
        with pytest.raises(sessiondb.InvalidArgument):
            hdb.search_messages(long_query)


def test_snippet_of_long_content_is_cut_to_40_tokens(hdb):
    hdb.create_session("s", "cli")
    words = [f"w{i}" for i in range(200)]
    words[100] = "needle"
    hdb.append_message("s", "user", " ".join(words))
    snippet = hdb.search_messages("needle")[0]["snippet"]
    assert snippet.startswith("...") and snippet.endswith("...")
    assert ">>>needle<<<" in snippet
    assert len(snippet.strip(".").split()) <= 40


def test_snippet_of_a_very_long_message_is_still_made(hdb):
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "filler " * 5000 + "needle " + "filler " * 5000)
    [hit] = hdb.search_messages("needle")
    assert ">>>needle<<<" in hit["snippet"]
    assert hit["snippet"].startswith("...") and hit["snippet"].endswith("...")


def test_ranking_and_paging(hdb, clock):
    hdb.create_session("s", "cli")
    weak = hdb.append_message("s", "user", "apple banana cherry date elderberry fig")
    strong = hdb.append_message("s", "user", "apple apple apple banana cherry date")
    assert [h["id"] for h in hdb.search_messages("apple")] == [strong, weak]
    assert [h["id"] for h in hdb.search_messages("apple", limit=1)] == [strong]
    assert [h["id"] for h in hdb.search_messages("apple", limit=1, offset=1)] == [weak]
    assert [h["id"] for h in hdb.search_messages("apple", limit=-1)] == [strong, weak]
    with pytest.raises(sqlite3.IntegrityError):
        hdb.search_messages("apple", limit=None)


def test_context_is_the_neighbouring_ids_of_the_same_session(hdb):
    hdb.create_session("a", "cli")
    hdb.create_session("b", "cli")
    first = hdb.append_message("a", "user", "needle first")
    hdb.append_message("b", "user", "other session")
    hdb.append_message("a", "system", None)
    match = hdb.append_message("a", "assistant", "needle " + "x" * 300)
    hdb.append_message("a", "tool", "é" * 250)
    hdb.append_message("b", "user", "unrelated")
    hits = {h["id"]: h["context"] for h in hdb.search_messages("needle")}
    assert hits[first] == [{"role": "user", "content": "needle first"}]  # 1 entry
    assert hits[match] == [
        {"role": "system", "content": ""},
        {"role": "assistant", "content": ("needle " + "x" * 300)[:200]},
        {"role": "tool", "content": "é" * 200},
    ]


def test_search_sees_messages_after_updates_and_deletes(hdb):
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "ephemeral words")
    assert len(hdb.search_messages("ephemeral")) == 1
    hdb.clear_messages("s")
    assert hdb.search_messages("ephemeral") == []


@pytest.mark.sqlite_only  # PostgreSQL's index is a column of the row: nothing to damage
def test_a_damaged_index_is_reported_not_answered_with_an_empty_list(hdb):
    from sessiondb import SearchIndexError, search_index
    hdb.create_session("s", "cli")
    hdb.append_message("s", "user", "words")
    hdb._execute_write(search_index.mark_damaged)
    with pytest.raises(SearchIndexError):
        hdb.search_messages("words")
