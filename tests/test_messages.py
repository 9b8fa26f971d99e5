"""Messages: append, exact counters, field round trip, keyset pages, conversation, clear."""

from __future__ import annotations

import pytest

from sessiondb import (
    InvalidArgument, InvalidArgumentType, SessionDB, SessionNotFound,
)

CALL_A = {"id": "call_a", "type": "function",
          "function": {"name": "search", "arguments": '{"q": "x"}'}}
CALL_B = {"id": "call_b", "type": "function",
          "function": {"name": "read", "arguments": "{}"}}


@pytest.fixture
def sid(db: SessionDB) -> str:
    return db.create_session("s1", "cli")


def counters(db: SessionDB, session_id: str = "s1") -> tuple[int, int]:
    s = db.get_session(session_id)
    return s["message_count"], s["tool_call_count"]


def test_append_returns_increasing_ids(db: SessionDB, sid: str) -> None:
    db.create_session("s2", "cli")
    ids = [db.append_message(sid if i % 2 else "s2", "user", f"m{i}") for i in range(10)]
    assert all(isinstance(i, int) for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == 10


def test_ids_keep_increasing_after_delete(db: SessionDB, sid: str) -> None:
    first = db.append_message(sid, "user", "a")
    last = db.append_message(sid, "user", "b")
    db.clear_messages(sid)
    assert db.append_message(sid, "user", "c") > last > first


def test_counters_are_exact(db: SessionDB, sid: str) -> None:
    assert counters(db) == (0, 0)
    db.append_message(sid, "user", "hi")
    assert counters(db) == (1, 0)
    db.append_message(sid, "assistant", None, tool_calls=[CALL_A, CALL_B])
    assert counters(db) == (2, 2)
    db.append_message(sid, "tool", "result a", tool_call_id="call_a", tool_name="search")
    db.append_message(sid, "tool", "result b", tool_call_id="call_b", tool_name="read")
    assert counters(db) == (4, 2)
    db.append_message(sid, "assistant", None, tool_calls=CALL_A)  # a single call as a dict
    assert counters(db) == (5, 3)
    db.append_message(sid, "assistant", "no calls", tool_calls=[])
    assert counters(db) == (6, 3)
    db.append_message(sid, "assistant", "three", tool_calls=[CALL_A, CALL_B, CALL_A])
    assert counters(db) == (7, 6)
    assert db.message_count(sid) == 7


def test_all_fields_round_trip(db: SessionDB, sid: str) -> None:
    details = [{"type": "summary", "text": "thought"}]
    items = [{"id": "rs_1", "encrypted_content": "xyz"}]
    meta = {"latency_ms": 12, "nested": {"ok": True, "list": [1, 2.5, None]}}
    mid = db.append_message(
        sid, "assistant", "content ✓", tool_name="search", tool_calls=[CALL_A],
        tool_call_id="call_0", token_count=42, finish_reason="tool_calls",
        reasoning="because", reasoning_details=details, codex_reasoning_items=items,
        metadata=meta)
    (m,) = db.get_messages(sid)
    assert m["id"] == mid
    assert m["session_id"] == sid
    assert m["role"] == "assistant"
    assert m["content"] == "content ✓"
    assert m["tool_name"] == "search"
    assert m["tool_calls"] == [CALL_A]
    assert m["tool_call_id"] == "call_0"
    assert m["token_count"] == 42
    assert m["finish_reason"] == "tool_calls"
    assert m["reasoning"] == "because"
    assert m["reasoning_details"] == details
    assert m["codex_reasoning_items"] == items
    assert m["metadata"] == meta
    assert isinstance(m["timestamp"], float)


def test_defaults_are_none(db: SessionDB, sid: str) -> None:
    db.append_message(sid, "user")
    (m,) = db.get_messages(sid)
    for key in ("content", "tool_name", "tool_calls", "tool_call_id", "token_count",
                "finish_reason", "reasoning", "reasoning_details", "codex_reasoning_items",
                "metadata"):
        assert m[key] is None, key


def test_text_edge_values_round_trip(db: SessionDB, sid: str) -> None:
    texts = ["", "emoji 🎉 and 日本語", "x" * 100_000, "line\r\nbreak"]
    if db.backend == "sqlite":
        texts.insert(1, "nul\x00inside")
    for t in texts:
        db.append_message(sid, "user", t, reasoning=t)
    got = db.get_messages(sid)
    assert [m["content"] for m in got] == texts
    assert [m["reasoning"] for m in got] == texts


def test_a_nul_that_postgresql_cannot_store_is_refused_whole(db: SessionDB, sid: str) -> None:
    if db.backend == "sqlite":
        pytest.skip("SQLite stores U+0000 (test_text_edge_values_round_trip)")
    with pytest.raises(InvalidArgument, match="NUL"):
        db.append_message(sid, "user", "nul\x00inside")
    assert db.get_messages(sid) == [] and db.get_session(sid)["message_count"] == 0


def test_json_string_metadata_is_not_confused_with_json_text(db: SessionDB, sid: str) -> None:
    db.append_message(sid, "user", "x", metadata="[1, 2]", tool_calls="not a list")
    (m,) = db.get_messages(sid)
    assert m["metadata"] == "[1, 2]"
    assert m["tool_calls"] == "not a list"


def test_get_messages_missing_session_is_empty(db: SessionDB) -> None:
    assert db.get_messages("ghost") == []


def test_keyset_pagination(db: SessionDB, sid: str) -> None:
    db.create_session("other", "cli")
    for i in range(25):
        db.append_message(sid, "user", f"m{i}")
        db.append_message("other", "user", f"o{i}")
    pages, after = [], None
    while True:
        page = db.get_messages(sid, after_id=after, limit=10)
        if not page:
            break
        pages.append([m["content"] for m in page])
        after = page[-1]["id"]
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == [f"m{i}" for i in range(25)]
    all_msgs = db.get_messages(sid)
    assert [m["id"] for m in all_msgs] == sorted(m["id"] for m in all_msgs)
    assert db.get_messages(sid, after_id=all_msgs[-1]["id"]) == []
    assert db.get_messages(sid, limit=0) == []
    assert len(db.get_messages(sid, after_id=0)) == 25
    assert len(db.get_messages(sid, limit=-1)) == 25


def test_get_messages_rejects_bad_paging(db: SessionDB, sid: str) -> None:
    with pytest.raises(InvalidArgument):
        db.get_messages(sid, after_id=-1)
    with pytest.raises(InvalidArgumentType):
        db.get_messages(sid, after_id="5")
    with pytest.raises(InvalidArgumentType):
        db.get_messages(sid, limit="10")


def test_conversation_shape(db: SessionDB, sid: str) -> None:
    db.append_message(sid, "system", "sys", reasoning="ignored on system")
    db.append_message(sid, "user", "question", token_count=3, finish_reason="x")
    db.append_message(sid, "assistant", None, tool_calls=[CALL_A], reasoning="think",
                      reasoning_details=[{"a": 1}], codex_reasoning_items=[{"b": 2}])
    db.append_message(sid, "tool", "answer", tool_call_id="call_a", tool_name="search")
    db.append_message(sid, "assistant", "done", metadata={"m": 1})
    assert db.get_messages_as_conversation(sid) == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "question"},
        {"role": "assistant", "content": None, "tool_calls": [CALL_A], "reasoning": "think",
         "reasoning_details": [{"a": 1}], "codex_reasoning_items": [{"b": 2}]},
        {"role": "tool", "content": "answer", "tool_call_id": "call_a",
         "tool_name": "search"},
        {"role": "assistant", "content": "done"},
    ]
    assert db.get_messages_as_conversation("ghost") == []


def test_clear_messages_zeroes_counters_keeps_session(db: SessionDB, sid: str) -> None:
    db.set_session_title(sid, "Kept")
    db.update_token_counts(sid, 10, 20)
    db.end_session(sid, "done")
    db.append_message(sid, "user", "findme please")
    db.append_message(sid, "assistant", None, tool_calls=[CALL_A, CALL_B])
    db.clear_messages(sid)
    s = db.get_session(sid)
    assert (s["message_count"], s["tool_call_count"]) == (0, 0)
    assert s["title"] == "Kept"
    assert (s["input_tokens"], s["output_tokens"]) == (10, 20)
    assert s["end_reason"] == "done"
    assert db.get_messages(sid) == []
    assert db.search_messages("findme") == []
    db.append_message(sid, "user", "again")
    assert counters(db) == (1, 0)


def test_clear_leaves_other_sessions_alone(db: SessionDB, sid: str) -> None:
    db.create_session("s2", "cli")
    db.append_message(sid, "user", "a")
    db.append_message("s2", "user", "b", tool_calls=[CALL_A])
    db.clear_messages(sid)
    assert counters(db, "s2") == (1, 1)
    assert [m["content"] for m in db.get_messages("s2")] == ["b"]


@pytest.mark.parametrize("kwargs, error", [
    ({"tool_calls": [object()]}, InvalidArgumentType),
    ({"tool_calls": [{"x": float("nan")}]}, InvalidArgumentType),
    ({"metadata": {"when": object()}}, InvalidArgumentType),
    ({"metadata": {1j: 1}}, InvalidArgumentType),
    ({"reasoning_details": {1, 2}}, InvalidArgumentType),
    ({"codex_reasoning_items": b"bytes"}, InvalidArgumentType),
    ({"content": ["multimodal", "list"]}, InvalidArgumentType),
    ({"content": b"bytes"}, InvalidArgumentType),
    ({"content": "lone \ud800 surrogate"}, InvalidArgument),
    ({"reasoning": "\udfff"}, InvalidArgument),
    ({"token_count": -1}, InvalidArgument),
    ({"token_count": 2**63}, InvalidArgument),
    ({"token_count": 1.5}, InvalidArgumentType),
    ({"token_count": True}, InvalidArgumentType),
    ({"tool_name": 5}, InvalidArgumentType),
    ({"finish_reason": ["stop"]}, InvalidArgumentType),
], ids=["calls-object", "calls-nan", "metadata-object", "metadata-complex-key",
        "details-set", "items-bytes", "content-list", "content-bytes", "content-surrogate",
        "reasoning-surrogate", "tokens-negative", "tokens-huge", "tokens-float",
        "tokens-bool", "tool-name-int", "finish-reason-list"])
def test_failed_append_leaves_everything_unchanged(db: SessionDB, sid: str, kwargs,
                                                   error) -> None:
    db.append_message(sid, "user", "before", tool_calls=[CALL_A])
    before = db.get_session(sid)
    kwargs = {"content": "x", **kwargs}
    with pytest.raises(error):
        db.append_message(sid, "assistant", **kwargs)
    assert db.get_session(sid) == before
    assert [m["content"] for m in db.get_messages(sid)] == ["before"]


@pytest.mark.parametrize("role, error", [
    (None, InvalidArgument), ("", InvalidArgument), (7, InvalidArgumentType),
])
def test_bad_role_refused(db: SessionDB, sid: str, role, error) -> None:
    with pytest.raises(error):
        db.append_message(sid, role, "x")
    assert counters(db) == (0, 0)


def test_append_to_missing_session_writes_nothing(db: SessionDB, sid: str) -> None:
    with pytest.raises(SessionNotFound):
        db.append_message("ghost", "user", "x", tool_calls=[CALL_A])
    assert db.message_count() == 0
    assert counters(db) == (0, 0)


def test_pop_message_returns_the_newest_and_keeps_counters_exact(db: SessionDB,
                                                                  sid: str) -> None:
    db.append_message(sid, "user", "first")
    db.append_message(sid, "assistant", None, tool_calls=[CALL_A, CALL_B],
                      metadata={"k": [1, "ü"]}, token_count=7, reasoning="r")
    db.append_message(sid, "assistant", "single", tool_calls=CALL_A)  # a dict: one call
    stored = db.get_messages(sid)
    assert counters(db) == (3, 3)
    assert db.pop_message(sid) == stored[2]  # every field, as get_messages returned it
    assert counters(db) == (2, 2)
    assert db.pop_message(sid) == stored[1]
    assert counters(db) == (1, 0)
    assert db.get_messages(sid) == stored[:1]
    assert db.pop_message(sid) == stored[0]
    assert counters(db) == (0, 0) and db.message_count(sid) == 0


def test_pop_message_empty_missing_and_bad_ids(db: SessionDB, sid: str) -> None:
    assert db.pop_message(sid) is None
    assert counters(db) == (0, 0)
    with pytest.raises(SessionNotFound):
        db.pop_message("ghost")
    with pytest.raises(InvalidArgument):
        db.pop_message("")
    with pytest.raises(InvalidArgumentType):
        db.pop_message(7)


def test_pop_message_leaves_other_sessions_and_search_right(db: SessionDB, sid: str) -> None:
    db.create_session("s2", "cli")
    db.append_message(sid, "user", "keepme here")
    db.append_message("s2", "user", "other session", tool_calls=[CALL_A])
    db.append_message(sid, "assistant", "dropme soon")
    assert db.pop_message(sid)["content"] == "dropme soon"
    assert db.search_messages("dropme") == []
    assert [h["session_id"] for h in db.search_messages("keepme")] == [sid]
    assert counters(db, "s2") == (1, 1)
    assert db.message_count() == 2
    # The next append gets a new id, never the popped one's.
    assert db.append_message(sid, "user", "again") > db.get_messages("s2")[0]["id"]


def test_pop_message_in_a_rolled_back_transaction_changes_nothing(db: SessionDB,
                                                                  sid: str) -> None:
    db.append_message(sid, "assistant", "stays", tool_calls=[CALL_A])
    with pytest.raises(RuntimeError):
        with db.transaction():
            assert db.pop_message(sid)["content"] == "stays"
            raise RuntimeError("roll back")
    assert counters(db) == (1, 1)
    assert [m["content"] for m in db.get_messages(sid)] == ["stays"]
