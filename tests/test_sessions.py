"""Sessions: create, ensure, get, list, end/reopen, delete, lineage, model, lookups, counts."""

from __future__ import annotations

import time

import pytest

from sessiondb import IntegrityViolation, InvalidArgumentType, SessionDB, SessionNotFound

SESSION_KEYS = {
    "id", "source", "user_id", "model", "model_config", "system_prompt",
    "parent_session_id", "started_at", "ended_at", "end_reason", "message_count",
    "tool_call_count", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens", "reasoning_tokens", "billing_provider", "billing_base_url",
    "billing_mode", "estimated_cost_usd", "actual_cost_usd", "cost_status", "cost_source",
    "pricing_version", "title",
}


# -- create / ensure / get -----------------------------------------------------------

def test_create_returns_id_and_get_has_every_key(db: SessionDB) -> None:
    before = time.time()
    assert db.create_session("s1", "cli") == "s1"
    after = time.time()
    s = db.get_session("s1")
    assert s is not None
    assert SESSION_KEYS <= set(s)
    assert s["id"] == "s1"
    assert s["source"] == "cli"
    assert s["title"] is None
    assert s["message_count"] == 0
    assert s["tool_call_count"] == 0
    assert s["ended_at"] is None
    assert s["end_reason"] is None
    assert s["parent_session_id"] is None
    assert isinstance(s["started_at"], float)
    # The wall clock may step, but not by more than this while the test runs.
    assert before - 5 <= s["started_at"] <= after + 5
    for key in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
                "reasoning_tokens"):
        assert s[key] == 0


def test_create_with_fields(db: SessionDB) -> None:
    db.create_session("s1", "cli", model="m-1", model_config={"temperature": 0.5},
                      system_prompt="be brief", user_id="u1", title="  My   title ")
    s = db.get_session("s1")
    assert s["model"] == "m-1"
    assert s["model_config"] == {"temperature": 0.5}
    assert s["system_prompt"] == "be brief"
    assert s["user_id"] == "u1"
    assert s["title"] == "My title"


def test_create_same_id_twice_is_a_noop(db: SessionDB) -> None:
    db.create_session("s1", "cli", model="first")
    original = db.get_session("s1")
    assert db.create_session("s1", "telegram", model="second", title="T",
                             system_prompt="x") == "s1"
    assert db.get_session("s1") == original
    assert db.session_count() == 1


def test_create_unknown_field_is_a_type_error(db: SessionDB) -> None:
    with pytest.raises(InvalidArgumentType) as info:
        db.create_session("s1", "cli", colour="blue")
    assert isinstance(info.value, TypeError)
    assert "colour" in str(info.value)
    assert db.get_session("s1") is None


def test_ensure_creates_then_leaves_alone(db: SessionDB) -> None:
    assert db.ensure_session("s1") == "s1"
    s = db.get_session("s1")
    assert s["source"] == "unknown"
    db.end_session("s1", "done")
    ended = db.get_session("s1")
    db.ensure_session("s1", "cli", model="m")
    assert db.get_session("s1") == ended


def test_get_missing_is_none(db: SessionDB) -> None:
    assert db.get_session("nope") is None
    assert db.get_session("") is None


def test_get_returns_a_fresh_copy(db: SessionDB) -> None:
    db.create_session("s1", "cli", model_config={"a": [1]})
    s = db.get_session("s1")
    s["model_config"]["a"].append(2)
    s["title"] = "changed"
    assert db.get_session("s1")["model_config"] == {"a": [1]}
    assert db.get_session("s1")["title"] is None


# -- list -------------------------------------------------------------------------------

def test_list_newest_first_with_limit_offset(db: SessionDB, make_session) -> None:
    for i in range(5):
        make_session(f"s{i}", started_at=1000.0 + i)
    ids = [s["id"] for s in db.list_sessions()]
    assert ids == ["s4", "s3", "s2", "s1", "s0"]
    assert [s["id"] for s in db.list_sessions(limit=2)] == ["s4", "s3"]
    assert [s["id"] for s in db.list_sessions(limit=2, offset=2)] == ["s2", "s1"]
    assert [s["id"] for s in db.list_sessions(limit=10, offset=4)] == ["s0"]
    assert db.list_sessions(offset=5) == []
    assert len(db.list_sessions(limit=None)) == 5
    assert len(db.list_sessions(limit=-1)) == 5
    assert db.list_sessions(limit=0) == []


def test_list_default_limit_is_20(db: SessionDB, make_session) -> None:
    for i in range(25):
        make_session(f"s{i:02d}", started_at=1000.0 + i)
    assert len(db.list_sessions()) == 20


def test_list_filters_source_and_exclude(db: SessionDB, make_session) -> None:
    make_session("a", 1.0, source="cli")
    make_session("b", 2.0, source="telegram")
    make_session("c", 3.0, source="discord")
    assert [s["id"] for s in db.list_sessions("cli")] == ["a"]
    assert [s["id"] for s in db.list_sessions(source="telegram")] == ["b"]
    assert [s["id"] for s in db.list_sessions(exclude_sources=["cli", "discord"])] == ["b"]
    assert [s["id"] for s in db.list_sessions(exclude_sources=[])] == ["c", "b", "a"]
    assert db.list_sessions("cli", exclude_sources=["cli"]) == []
    assert db.list_sessions("nothing") == []


def test_list_active_filter(db: SessionDB, make_session) -> None:
    make_session("open", 1.0)
    make_session("closed", 2.0)
    db.end_session("closed", "user_exit")
    assert [s["id"] for s in db.list_sessions(active=True)] == ["open"]
    assert [s["id"] for s in db.list_sessions(active=False)] == ["closed"]
    assert [s["id"] for s in db.list_sessions(active=None)] == ["closed", "open"]


def test_list_row_has_title_counts_preview_last_active(db: SessionDB, make_session) -> None:
    make_session("s1", started_at=1000.0, title="Hello")
    db.append_message("s1", "system", "system text")
    db.append_message("s1", "assistant", "assistant first")
    db.append_message("s1", "user", "first\nuser\r\nmessage")
    db.append_message("s1", "user", "second user message")
    last = db.get_messages("s1")[-1]["timestamp"]
    (row,) = db.list_sessions()
    assert SESSION_KEYS <= set(row)
    assert row["title"] == "Hello"
    assert row["message_count"] == 4
    assert row["preview"] == "first user  message"
    assert row["last_active"] == last


def test_list_preview_truncated_to_60_plus_ellipsis(db: SessionDB, make_session) -> None:
    make_session("exact", 3.0)
    make_session("long", 2.0)
    make_session("none", 1.0)
    db.append_message("exact", "user", "x" * 60)
    db.append_message("long", "user", "y" * 61)
    db.append_message("none", "assistant", "only assistant")
    rows = {r["id"]: r for r in db.list_sessions()}
    assert rows["exact"]["preview"] == "x" * 60
    assert rows["long"]["preview"] == "y" * 60 + "..."
    assert rows["none"]["preview"] == ""


def test_list_last_active_without_messages_is_started_at(db: SessionDB, make_session) -> None:
    make_session("s1", started_at=1234.5)
    (row,) = db.list_sessions()
    assert row["last_active"] == 1234.5


# -- end / reopen ----------------------------------------------------------------------

def test_end_with_reason_and_twice(db: SessionDB) -> None:
    db.create_session("s1", "cli")
    db.end_session("s1", "user_exit")
    s = db.get_session("s1")
    assert s["ended_at"] is not None and s["end_reason"] == "user_exit"
    first_end = s["ended_at"]
    db.end_session("s1", "compressed")
    s = db.get_session("s1")
    assert s["end_reason"] == "compressed"
    assert isinstance(s["ended_at"], float)
    assert s["ended_at"] >= first_end - 5  # overwritten, not cleared
    db.end_session("s1")
    assert db.get_session("s1")["end_reason"] is None


def test_reopen_clears_ended_state(db: SessionDB) -> None:
    db.create_session("s1", "cli")
    db.end_session("s1", "done")
    db.reopen_session("s1")
    s = db.get_session("s1")
    assert s["ended_at"] is None and s["end_reason"] is None
    assert [r["id"] for r in db.list_sessions(active=True)] == ["s1"]


# -- delete ----------------------------------------------------------------------------

def test_delete_removes_session_and_messages(db: SessionDB) -> None:
    db.create_session("s1", "cli")
    db.create_session("s2", "cli")
    db.append_message("s1", "user", "needle one")
    db.append_message("s2", "user", "needle two")
    assert db.delete_session("s1") is True
    assert db.get_session("s1") is None
    assert db.get_messages("s1") == []
    assert db.message_count() == 1
    assert [h["session_id"] for h in db.search_messages("needle")] == ["s2"]


def test_delete_missing_returns_false(db: SessionDB) -> None:
    assert db.delete_session("nope") is False
    db.create_session("s1", "cli")
    assert db.delete_session("s1") is True
    assert db.delete_session("s1") is False


def test_delete_parent_refused_and_rolled_back(db: SessionDB) -> None:
    db.create_session("parent", "cli")
    db.append_message("parent", "user", "keep me")
    db.create_session("child", "cli", parent_session_id="parent")
    with pytest.raises(IntegrityViolation):
        db.delete_session("parent")
    assert db.get_session("parent")["message_count"] == 1
    assert [m["content"] for m in db.get_messages("parent")] == ["keep me"]
    # Once the child is gone the parent can go.
    assert db.delete_session("child") is True
    assert db.delete_session("parent") is True


def test_delete_self_parented_session(db: SessionDB) -> None:
    db.create_session("s1", "cli", parent_session_id="s1")
    assert db.get_session("s1")["parent_session_id"] == "s1"
    assert db.delete_session("s1") is True


# -- system prompt, lineage, model ------------------------------------------------------

def test_update_system_prompt(db: SessionDB) -> None:
    db.create_session("s1", "cli", system_prompt="old")
    db.update_system_prompt("s1", "new prompt")
    assert db.get_session("s1")["system_prompt"] == "new prompt"
    db.update_system_prompt("s1", None)
    assert db.get_session("s1")["system_prompt"] is None


def test_parent_lineage(db: SessionDB) -> None:
    db.create_session("root", "cli")
    db.create_session("mid", "cli", parent_session_id="root")
    db.create_session("leaf", "cli", parent_session_id="mid")
    chain, sid = [], "leaf"
    while sid is not None:
        chain.append(sid)
        sid = db.get_session(sid)["parent_session_id"]
    assert chain == ["leaf", "mid", "root"]


def test_missing_parent_raises_and_writes_nothing(db: SessionDB) -> None:
    with pytest.raises(SessionNotFound) as info:
        db.create_session("child", "cli", parent_session_id="ghost")
    assert info.value.session_id == "ghost"
    assert db.get_session("child") is None
    assert db.session_count() == 0


def test_set_model_and_config(db: SessionDB) -> None:
    db.create_session("s1", "cli")
    db.set_model("s1", "gpt-x", {"temperature": 0.2, "tools": ["a", "b"]})
    s = db.get_session("s1")
    assert s["model"] == "gpt-x"
    assert s["model_config"] == {"temperature": 0.2, "tools": ["a", "b"]}
    db.set_model("s1", "other")
    s = db.get_session("s1")
    assert s["model"] == "other" and s["model_config"] is None


# -- resolve_session_id ----------------------------------------------------------------

def test_resolve_exact_and_unique_prefix(db: SessionDB) -> None:
    db.create_session("20240101_abc", "cli")
    db.create_session("20240101_abd", "cli")
    db.create_session("20240202_xyz", "cli")
    assert db.resolve_session_id("20240101_abc") == "20240101_abc"
    assert db.resolve_session_id("20240202") == "20240202_xyz"
    assert db.resolve_session_id("20240101_ab") is None  # ambiguous
    assert db.resolve_session_id("2024") is None
    assert db.resolve_session_id("nothing") is None


def test_resolve_exact_wins_over_prefix(db: SessionDB) -> None:
    db.create_session("abc", "cli")
    db.create_session("abcdef", "cli")
    assert db.resolve_session_id("abc") == "abc"
    assert db.resolve_session_id("abcd") == "abcdef"


def test_resolve_is_ascii_case_insensitive(db: SessionDB) -> None:
    db.create_session("ABCdef", "cli")
    assert db.resolve_session_id("abc") == "ABCdef"
    assert db.resolve_session_id("ABCDEF") == "ABCdef"


def test_resolve_like_wildcards_are_literal(db: SessionDB) -> None:
    db.create_session("a%b_1", "cli")
    db.create_session("axbx2", "cli")
    db.create_session("back\\slash", "cli")
    assert db.resolve_session_id("a%") == "a%b_1"
    assert db.resolve_session_id("a%b_") == "a%b_1"
    assert db.resolve_session_id("a_") is None  # '_' is not "any character"
    assert db.resolve_session_id("%") is None
    assert db.resolve_session_id("_") is None
    assert db.resolve_session_id("back\\") == "back\\slash"
    assert db.resolve_session_id("back\\s") == "back\\slash"
    assert db.resolve_session_id("ax") == "axbx2"


# -- counts --------------------------------------------------------------------------

def test_session_count(db: SessionDB) -> None:
    assert db.session_count() == 0
    db.create_session("a", "cli")
    db.create_session("b", "cli")
    db.create_session("c", "telegram")
    assert db.session_count() == 3
    assert db.session_count("cli") == 2
    assert db.session_count(source="telegram") == 1
    assert db.session_count("none") == 0


def test_message_count(db: SessionDB) -> None:
    assert db.message_count() == 0
    db.create_session("a", "cli")
    db.create_session("b", "cli")
    db.append_message("a", "user", "1")
    db.append_message("a", "assistant", "2")
    db.append_message("b", "user", "3")
    assert db.message_count() == 3
    assert db.message_count("a") == 2
    assert db.message_count("b") == 1
    assert db.message_count("missing") == 0


# -- writes to a missing session ------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda db: db.end_session("ghost", "x"),
    lambda db: db.reopen_session("ghost"),
    lambda db: db.update_system_prompt("ghost", "p"),
    lambda db: db.set_model("ghost", "m"),
    lambda db: db.append_message("ghost", "user", "hi"),
    lambda db: db.clear_messages("ghost"),
    lambda db: db.update_token_counts("ghost", 1, 1),
    lambda db: db.set_token_counts("ghost", 1, 1),
], ids=["end", "reopen", "system_prompt", "set_model", "append", "clear", "update_tokens",
        "set_tokens"])
def test_writes_to_missing_session_raise(db: SessionDB, call) -> None:
    with pytest.raises(SessionNotFound) as info:
        call(db)
    assert info.value.session_id == "ghost"
    assert db.session_count() == 0
    assert db.message_count() == 0
