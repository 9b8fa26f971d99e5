"""Full-text search: filters, snippet, context, paging, and hostile queries."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessiondb import InvalidArgument, SessionDB
from sessiondb.text import sanitize_fts_query


@pytest.fixture
def corpus(db: SessionDB) -> SessionDB:
    db.create_session("a", "cli", model="m-a")
    db.create_session("b", "telegram")
    db.create_session("c", "discord")
    db.append_message("a", "user", "how do I deploy the docker container")
    db.append_message("b", "user", "unrelated chatter about lunch")
    db.append_message("a", "assistant", "use the chat-send tool to deploy quickly")
    db.append_message("b", "assistant", "deploy the rocket to orbit")
    db.append_message("a", "tool", "deploy finished: status ok", tool_name="shell")
    db.append_message("c", "user", "apple banana cherry")
    db.append_message("c", "user", "apple only here")
    db.append_message("c", "user", "send chat backwards")
    return db


def ids(hits: list[dict]) -> list[tuple[str, str]]:
    return sorted((h["session_id"], h["role"]) for h in hits)


def test_basic_hit_shape(corpus: SessionDB) -> None:
    (hit,) = corpus.search_messages("rocket")
    assert set(hit) >= {"id", "session_id", "role", "snippet", "timestamp", "tool_name",
                        "source", "model", "session_started", "context"}
    assert hit["session_id"] == "b"
    assert hit["role"] == "assistant"
    assert hit["source"] == "telegram"
    assert hit["snippet"] == "deploy the >>>rocket<<< to orbit"
    assert hit["session_started"] == corpus.get_session("b")["started_at"]
    msg = [m for m in corpus.get_messages("b") if m["id"] == hit["id"]][0]
    assert hit["timestamp"] == msg["timestamp"]


def test_search_is_case_insensitive_and_finds_all(corpus: SessionDB) -> None:
    assert ids(corpus.search_messages("DEPLOY")) == [
        ("a", "assistant"), ("a", "tool"), ("a", "user"), ("b", "assistant")]


def test_tool_name_and_model_in_hit(corpus: SessionDB) -> None:
    (hit,) = corpus.search_messages("finished")
    assert hit["tool_name"] == "shell"
    assert hit["model"] == "m-a"


def test_filters(corpus: SessionDB) -> None:
    q = "deploy"
    assert ids(corpus.search_messages(q, sources=["telegram"])) == [("b", "assistant")]
    assert ids(corpus.search_messages(q, sources=["cli", "telegram"])) == ids(
        corpus.search_messages(q))
    assert corpus.search_messages(q, sources=[]) == []
    assert ids(corpus.search_messages(q, exclude_sources=["cli"])) == [("b", "assistant")]
    assert ids(corpus.search_messages(q, exclude_sources=[])) == ids(corpus.search_messages(q))
    assert ids(corpus.search_messages(q, roles=["user", "tool"])) == [
        ("a", "tool"), ("a", "user")]
    assert ids(corpus.search_messages(q, session_id="b")) == [("b", "assistant")]
    assert corpus.search_messages(q, session_id="missing") == []
    assert ids(corpus.search_messages(q, sources=["cli"], roles=["assistant"])) == [
        ("a", "assistant")]


def test_limit_offset(corpus: SessionDB) -> None:
    everything = corpus.search_messages("deploy", limit=None)
    assert len(everything) == 4
    assert [h["id"] for h in corpus.search_messages("deploy", limit=2)] == \
        [h["id"] for h in everything[:2]]
    assert [h["id"] for h in corpus.search_messages("deploy", limit=2, offset=2)] == \
        [h["id"] for h in everything[2:]]
    assert corpus.search_messages("deploy", offset=4) == []
    assert corpus.search_messages("deploy", limit=0) == []


def test_snippet_marks_every_match_and_elides_long_content(db: SessionDB) -> None:
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


def test_each_hit_of_a_page_gets_its_own_sessions_context(db: SessionDB) -> None:
    # The contexts of a page are read together: each hit gets its own session's
    # neighbours, whatever its session's id looks like (a number, quotes, NUL, JSON).
    ids = ["plain", "42", 'say "hi"', '["a", 1]', "é😀"]
    if db.backend == "sqlite":  # PostgreSQL text cannot hold U+0000
        ids.append("nul\x00inside")
    for sid in ids:
        db.create_session(sid, "cli")
    for n in range(3):
        for sid in ids:
            db.append_message(sid, "user", f"{sid} turn {n}" + (" needle" if n == 1 else ""))
    hits = db.search_messages("needle", limit=None)
    assert sorted(h["session_id"] for h in hits) == sorted(ids)
    for hit in hits:
        sid = hit["session_id"]
        assert [c["content"] for c in hit["context"]] == [
            f"{sid} turn 0", f"{sid} turn 1 needle", f"{sid} turn 2"], sid


def test_phrases_and_operators(corpus: SessionDB) -> None:
    # A balanced quoted phrase stays a phrase: adjacent tokens in order.
    assert ids(corpus.search_messages('"chat send"')) == [("a", "assistant")]
    assert ids(corpus.search_messages("chat send")) == [("a", "assistant"), ("c", "user")]
    # Hyphenated words match as adjacent tokens, not as "chat NOT send".
    assert ids(corpus.search_messages("chat-send")) == [("a", "assistant")]
    assert len(corpus.search_messages("apple OR rocket")) == 3
    assert len(corpus.search_messages("apple AND banana")) == 1
    assert len(corpus.search_messages("apple NOT banana")) == 1
    assert len(corpus.search_messages("apple banana")) == 1
    assert len(corpus.search_messages("app*")) == 2
    assert len(corpus.search_messages("dock*")) == 1


HOSTILE = [
    '"', '""', '"""', '"unbalanced', 'unbalanced"', 'a "b c', '"deploy" "', '" deploy',
    "'", "it's", "-", "--", "-deploy", "deploy-", "a--b", "deploy - docker",
    "AND", "OR", "NOT", "AND deploy", "deploy AND", "deploy OR", "NOT deploy", "deploy NOT",
    "deploy AND AND docker", "deploy OR OR", "AND OR NOT", "NOT NOT", "deploy AND NOT",
    "(", ")", "(deploy", "deploy)", "((deploy)", "deploy ) (", "()",
    "*", "**", "*deploy", "deploy**", "* *", "dep*loy",
    ":", "content:", "content:deploy", ":deploy", "a:b:c", "rowid:1", "messages_fts:x",
    "^", "^deploy", "deploy^", "+", "{deploy}", "NEAR(deploy docker)", "NEAR/2",
    "deploy;", "'; DROP TABLE messages; --", "\\", "%", "_", "@user", "#tag", "$x",
    "", " ", "\t\n", "   \u3000 ",
    "nul\x00byte", '"nul\x00in phrase"', "\x00", "\x01\x02",
    "😀", "日本語", "\u200b", "\ufeff", "\u0301", "²",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_never_raise(corpus: SessionDB, query: str) -> None:
    hits = corpus.search_messages(query)
    assert isinstance(hits, list)


@pytest.mark.parametrize("query", ["", " ", "\t\n", '"', "*", "AND", "OR NOT", "()", ":"])
def test_queries_with_nothing_searchable_are_empty(corpus: SessionDB, query: str) -> None:
    assert corpus.search_messages(query) == []
    assert sanitize_fts_query(query) == ""


@pytest.mark.parametrize("query, expected", [
    ('"deploy', 4), ('deploy"', 4), ("(deploy", 4), ("deploy)", 4), ("deploy AND", 4),
    ("AND deploy", 4), ("NOT deploy", 4), ("deploy OR OR docker", 4), ("deploy*", 4),
    ("^deploy", 4), ("deploy -", 4), ("deploy AND AND docker", 1),
])
def test_hostile_queries_still_search_the_words(corpus: SessionDB, query: str,
                                                expected: int) -> None:
    assert len(corpus.search_messages(query)) == expected


def test_sanitizer_keeps_balanced_phrases() -> None:
    assert sanitize_fts_query('"exact phrase" loose') == '"exact phrase" "loose"'
    assert sanitize_fts_query('"a b" OR "c d"') == '"a b" OR "c d"'
    assert sanitize_fts_query('"a: (b" c') == '"a: (b" "c"'


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=40))
def test_any_text_query_returns_a_list(corpus: SessionDB, query: str) -> None:
    assert isinstance(corpus.search_messages(query), list)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.lists(st.sampled_from(
    ['"', "(", ")", "*", ":", "^", "-", "+", "AND", "OR", "NOT", "NEAR", "deploy", "chat",
     "content", " ", "\x00", "'", "{", "}", ",", "."]), max_size=12).map("".join))
def test_any_operator_soup_returns_a_list(corpus: SessionDB, query: str) -> None:
    assert isinstance(corpus.search_messages(query), list)


@pytest.mark.sqlite_only  # its text holds U+0000, which PostgreSQL refuses
def test_long_message_gets_a_linear_snippet(db: SessionDB) -> None:
    # FTS5's snippet() is quadratic in the matches of a message (100,000: 45 s); past a
    # budget the snippet is made in Python, with the same shape.
    db.create_session("s", "cli")
    db.append_message("s", "user", "\x00word " * 150_000 + "needle Café tail")
    db.append_message("s", "user", "after")
    (hit,) = db.search_messages("cafe needle")
    assert hit["snippet"].startswith("...") and hit["snippet"].endswith("tail")
    assert ">>>needle<<< >>>Café<<<" in hit["snippet"]
    assert hit["context"][0]["content"] == ("\x00word " * 34)[:200]  # NULs kept
    (hit,) = db.search_messages("word")
    assert hit["snippet"].startswith(">>>word<<< \x00>>>word<<<")


def test_query_length_limit(corpus: SessionDB) -> None:
    assert corpus.search_messages("deploy " + " " * 993)
    with pytest.raises(InvalidArgument, match="1001 characters"):
        corpus.search_messages("deploy " * 143)


def test_many_sources_and_roles(corpus: SessionDB) -> None:
    many = ["cli"] + [f"x{i}" for i in range(40_000)]  # past SQLite's 32,766 variables
    hits = corpus.search_messages("deploy", sources=many, roles=many + ["user", "tool"])
    assert ids(hits) == [("a", "tool"), ("a", "user")]
    assert {s["id"] for s in corpus.list_sessions(exclude_sources=many)} == {"b", "c"}
