"""Export, import (atomic, parents first) and pruning of old ended sessions."""

from __future__ import annotations

import json
import time
from pathlib import Path

import apsw
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sessiondb import (
    IntegrityViolation, InvalidArgument, InvalidArgumentType, SessionDB,
)

DAY = 86400.0
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def populate(db: SessionDB) -> None:
    db.create_session("root", "cli", model="m1", model_config={"t": 0.1},
                      system_prompt="sys", user_id="u", title="Root")
    db.create_session("child", "cli", parent_session_id="root", title="Root #2")
    db.create_session("other", "telegram")
    db.append_message("root", "user", "hello there", metadata={"k": [1, 2]})
    db.append_message("root", "assistant", None, tool_calls=[CALL], reasoning="r",
                      reasoning_details=[{"d": 1}], codex_reasoning_items=[{"c": 2}],
                      token_count=5, finish_reason="tool_calls")
    db.append_message("root", "tool", "result", tool_call_id="c1", tool_name="f")
    db.append_message("child", "user", "continued")
    db.append_message("other", "user", "elsewhere")
    db.update_token_counts("root", 10, 20, cache_read_tokens=1, estimated_cost_usd=0.5,
                           actual_cost_usd=0.25, cost_status="final",
                           billing_provider="p")
    db.end_session("root", "compressed")


@pytest.fixture
def fresh(tmp_path: Path):
    store = SessionDB(tmp_path / "fresh.db")
    yield store
    store.close()


def test_export_session_shape(db: SessionDB) -> None:
    populate(db)
    out = db.export_session("root")
    assert {k: v for k, v in out.items() if k != "messages"} == db.get_session("root")
    assert out["messages"] == db.get_messages("root")
    assert db.export_session("missing") is None
    json.dumps(out)  # JSON-ready


def test_export_all_oldest_first_and_by_source(db: SessionDB, make_session) -> None:
    make_session("new", 3.0)
    make_session("old", 1.0)
    make_session("mid", 2.0, source="telegram")
    assert [s["id"] for s in db.export_all()] == ["old", "mid", "new"]
    assert [s["id"] for s in db.export_all("telegram")] == ["mid"]
    assert db.export_all("none") == []


def test_round_trip_into_fresh_store_is_equal(db: SessionDB, fresh: SessionDB) -> None:
    populate(db)
    exported = db.export_all()
    assert fresh.import_sessions(json.loads(json.dumps(exported))) == 3
    assert fresh.export_all() == exported
    # The imported copy is a working store: counters, search and titles carry on.
    assert [h["session_id"] for h in fresh.search_messages("continued")] == ["child"]
    fresh.append_message("child", "assistant", None, tool_calls=[CALL, CALL])
    child = fresh.get_session("child")
    assert (child["message_count"], child["tool_call_count"]) == (2, 2)
    assert fresh.resolve_session_by_title("Root") == "child"


def test_round_trip_single_session(db: SessionDB, fresh: SessionDB) -> None:
    populate(db)
    one = db.export_session("other")
    assert fresh.import_sessions(one) == 1
    assert fresh.export_session("other") == one


def test_import_existing_id_is_atomic(db: SessionDB, fresh: SessionDB) -> None:
    populate(db)
    exported = db.export_all()
    fresh.create_session("other", "mine")
    with pytest.raises(IntegrityViolation):
        fresh.import_sessions(exported)
    assert fresh.session_count() == 1
    assert fresh.message_count() == 0
    assert fresh.get_session("other")["source"] == "mine"
    assert fresh.search_messages("hello") == []


def test_import_skip_existing(db: SessionDB, fresh: SessionDB) -> None:
    populate(db)
    fresh.create_session("other", "mine")
    assert fresh.import_sessions(db.export_all(), skip_existing=True) == 2
    assert fresh.get_session("other")["source"] == "mine"
    assert fresh.message_count("other") == 0
    assert fresh.export_session("root") == db.export_session("root")
    assert fresh.import_sessions(db.export_all(), skip_existing=True) == 0


def test_import_parents_before_children(db: SessionDB, fresh: SessionDB) -> None:
    db.create_session("a", "cli")
    db.create_session("b", "cli", parent_session_id="a")
    db.create_session("c", "cli", parent_session_id="b")
    exported = db.export_all()
    assert fresh.import_sessions(list(reversed(exported))) == 3
    assert fresh.export_all() == exported


def test_import_with_missing_parent_is_refused(fresh: SessionDB) -> None:
    data = [{"id": "ok", "source": "cli", "started_at": 1.0},
            {"id": "orphan", "source": "cli", "started_at": 2.0, "parent_session_id": "x"}]
    # Named (the foreign key error SQLite gives names no session).
    with pytest.raises(IntegrityViolation, match="session 'orphan' names parent 'x', which "
                       "is neither in the store nor in the import") as info:
        fresh.import_sessions(data)
    # The usual cause, and the way out, are named.
    assert "an export of one source leaves out parents of other sources" in str(info.value)
    assert fresh.session_count() == 0


def test_import_keeps_order_when_message_ids_are_taken(db: SessionDB,
                                                       fresh: SessionDB) -> None:
    db.create_session("s", "cli")
    for i in range(3):
        db.append_message("s", "user", f"m{i}")
    fresh.create_session("local", "cli")
    for i in range(5):
        fresh.append_message("local", "user", f"x{i}")
    fresh.import_sessions(db.export_all())
    got = fresh.get_messages("s")
    assert [m["content"] for m in got] == ["m0", "m1", "m2"]
    assert fresh.get_session("s")["message_count"] == 3


def test_minimal_import_gets_column_defaults(fresh: SessionDB) -> None:
    fresh.import_sessions({"id": "s", "source": "cli", "started_at": 5.0,
                           "messages": [{"role": "user", "content": "hi", "timestamp": 6.0}]})
    s = fresh.get_session("s")
    assert s["started_at"] == 5.0
    assert s["input_tokens"] == 0 and s["tool_call_count"] == 0
    fresh.append_message("s", "user", "more")
    fresh.update_token_counts("s", 3)
    s = fresh.get_session("s")
    assert s["input_tokens"] == 3
    assert fresh.message_count("s") == 2


@pytest.mark.parametrize("data, error", [
    ("not a list", InvalidArgumentType),
    (42, InvalidArgumentType),
    ([1, 2], InvalidArgumentType),
    ([{"source": "cli", "started_at": 1.0}], InvalidArgument),
    ([{"id": "s", "started_at": 1.0}], InvalidArgument),
    ([{"id": "s", "source": "cli"}], InvalidArgument),
    ([{"id": "s", "source": "cli", "started_at": 1.0}] * 2, InvalidArgument),
    ([{"id": "s", "source": "cli", "started_at": 1.0, "messages": "x"}], InvalidArgumentType),
    ([{"id": "s", "source": "cli", "started_at": 1.0,
       "messages": [{"role": "user", "content": "x"}]}], InvalidArgument),
    ([{"id": "s", "source": "cli", "started_at": 1.0,
       "messages": [{"content": "x", "timestamp": 1.0}]}], InvalidArgument),
], ids=["str", "int", "ints", "no-id", "no-source", "no-start", "dup", "messages-str",
        "msg-no-ts", "msg-no-role"])
def test_bad_import_data_writes_nothing(fresh: SessionDB, data, error) -> None:
    with pytest.raises(error):
        fresh.import_sessions(data)
    assert fresh.session_count() == 0


# -- prune --------------------------------------------------------------------------

@pytest.fixture
def aged(db: SessionDB, make_session) -> SessionDB:
    now = time.time()
    make_session("old_ended", now - 100 * DAY, ended_at=now - 99 * DAY)
    make_session("old_active", now - 100 * DAY)
    make_session("new_ended", now - 1 * DAY, ended_at=now - 1 * DAY)
    make_session("old_ended_recently", now - 100 * DAY, ended_at=now - 60)
    make_session("old_tg", now - 100 * DAY, source="telegram", ended_at=now - 99 * DAY)
    for sid in ("old_ended", "old_active", "new_ended"):
        db.append_message(sid, "user", f"text of {sid}")
    return db


def test_prune_old_ended_only(aged: SessionDB) -> None:
    assert aged.prune_sessions(90) == 3
    remaining = {s["id"] for s in aged.list_sessions(limit=None)}
    assert remaining == {"old_active", "new_ended"}
    assert aged.message_count() == 2
    assert aged.search_messages("old_ended") == []
    assert aged.prune_sessions(90) == 0


def test_prune_by_source(aged: SessionDB) -> None:
    assert aged.prune_sessions(90, source="telegram") == 1
    assert aged.get_session("old_tg") is None
    assert aged.get_session("old_ended") is not None


def test_prune_zero_days_never_touches_active(aged: SessionDB) -> None:
    assert aged.prune_sessions(0) == 4
    assert [s["id"] for s in aged.list_sessions(limit=None)] == ["old_active"]


def test_prune_keeps_parents_of_remaining_sessions(db: SessionDB, make_session) -> None:
    now = time.time()
    old, ended = now - 100 * DAY, now - 99 * DAY
    make_session("p_kept", old, ended_at=ended)
    make_session("active_child", old + 1, parent_session_id="p_kept")
    make_session("gp", old, ended_at=ended)
    make_session("p", old + 1, parent_session_id="gp", ended_at=ended)
    make_session("c", old + 2, parent_session_id="p", ended_at=ended)
    make_session("self", old, parent_session_id="self", ended_at=ended)
    assert db.prune_sessions(90) == 4
    assert {s["id"] for s in db.list_sessions(limit=None)} == {"p_kept", "active_child"}


@pytest.mark.sqlite_only
def test_prune_gives_space_back(db: SessionDB, make_session, db_path: Path) -> None:
    now = time.time()
    make_session("big", now - 100 * DAY, ended_at=now - 100 * DAY)
    for _ in range(50):
        db.append_message("big", "user", "x" * 20_000)
    size_before = db_path.stat().st_size + Path(str(db_path) + "-wal").stat().st_size
    assert db.prune_sessions(90) == 1
    db.checkpoint()
    reader = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert reader.execute("PRAGMA freelist_count").fetchone()[0] == 0
        pages = reader.execute("PRAGMA page_count").fetchone()[0]
        page_size = reader.execute("PRAGMA page_size").fetchone()[0]
    finally:
        reader.close()
    assert pages * page_size < size_before / 4


@pytest.mark.parametrize("days, error", [
    (-1, InvalidArgument), (float("nan"), InvalidArgument), (None, InvalidArgument),
    ("90", InvalidArgumentType), (True, InvalidArgumentType),
])
def test_prune_bad_days(aged: SessionDB, days, error) -> None:
    with pytest.raises(error):
        aged.prune_sessions(days)
    assert aged.session_count() == 5


def test_an_imported_id_leaves_room_for_the_messages_added_after_it(
        fresh: SessionDB, tmp_path: Path) -> None:
    # A message kept at id 2**63 - 1 made SQLite's AUTOINCREMENT refuse every later
    # insert into the store, as "database or disk is full". An import keeps ids up to
    # 2**62 - 1 and gives a higher one a new id, as it does a taken one; so the export
    # of a store that holds such ids still imports, and copies.
    from sessiondb.copy import copy_store
    from sessiondb.records import MAX_MESSAGE_ID
    fresh.import_sessions([{"id": "s", "source": "cli", "started_at": 1.0, "messages": [
        {"id": MAX_MESSAGE_ID, "role": "user", "content": "kept", "timestamp": 1.0}]}])
    after = fresh.append_message("s", "user", "next")
    assert after == MAX_MESSAGE_ID + 1
    fresh.import_sessions([{"id": "t", "source": "cli", "started_at": 2.0, "messages": [
        {"id": 2**63 - 1, "role": "user", "content": "moved", "timestamp": 2.0},
        {"id": 5, "role": "user", "content": "after it", "timestamp": 2.0}]}])
    # From the first id it cannot keep on, the session's messages take the next ids.
    assert [m["id"] for m in fresh.get_messages("t")] == [after + 1, after + 2]
    fresh.append_message("t", "user", "room left")
    exported = fresh.export_all()
    with SessionDB(tmp_path / "again.db") as again:
        assert again.import_sessions(exported) == 2
        assert [[m["content"] for m in again.get_messages(s)] for s in ("s", "t")] == [
            ["kept", "next"], ["moved", "after it", "room left"]]
        assert [m["id"] for m in again.get_messages("s")][0] == MAX_MESSAGE_ID
    copy_store(fresh.path, tmp_path / "copied.db")
    with SessionDB(tmp_path / "copied.db") as copied:
        assert copied.message_count() == 5


@pytest.mark.parametrize("field, value, error", [
    ("started_at", 2**1100, InvalidArgument), ("started_at", float("nan"), InvalidArgument),
    ("ended_at", "yesterday", InvalidArgumentType), ("input_tokens", -5, InvalidArgument),
    ("output_tokens", 2**64, InvalidArgument), ("estimated_cost_usd", float("inf"),
                                                InvalidArgument),
    ("title", "x" * 200, InvalidArgument), ("parent_session_id", ["p"], InvalidArgumentType),
    ("model", b"m", InvalidArgumentType), ("model_config", {1, 2}, InvalidArgumentType),
    ("messages", [{"role": "user", "timestamp": 1.0, "tool_name": "\ud800"}], InvalidArgument),
    ("messages", [{"role": "user", "timestamp": 1.0, "id": 2**63}], InvalidArgument),
    ("messages", [{"role": "user", "timestamp": 1.0, "metadata": object()}],
     InvalidArgumentType),
])
def test_every_imported_column_is_checked(fresh: SessionDB, field, value, error) -> None:
    # Previously only ids, times and content were: the rest reached SQLite raw
    # (OverflowError, "Bad binding argument", counters stored negative).
    with pytest.raises(error):
        fresh.import_sessions({"id": "s", "source": "cli", "started_at": 1.0, field: value})
    assert fresh.session_count() == 0


def test_imported_title_is_sanitized(fresh: SessionDB) -> None:
    fresh.import_sessions({"id": "s", "source": "cli", "started_at": 1.0,
                           "title": " a\u200b  b\n"})
    assert fresh.get_session("s")["title"] == "a b"


_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.text(alphabet="ab\u00e9\ud800", max_size=4), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


_COMMON = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "tool", "\u00e9", "", "r" * 300]),
    "timestamp": st.one_of(st.floats(), st.integers(min_value=0, max_value=9)),
    "content": st.one_of(st.none(), st.text(max_size=6), st.text(alphabet="ab", max_size=6)),
    "id": st.one_of(st.none(), st.integers(min_value=-1, max_value=2**64)),
})
_KEYS = st.sampled_from(
    ("id", "role", "timestamp", "token_count", "content", "tool_call_id", "tool_name",
     "finish_reason", "reasoning", "tool_calls", "reasoning_details",
     "codex_reasoning_items", "metadata", "other"))


@given(_COMMON, st.dictionaries(_KEYS, _VALUES, max_size=3))
@settings(max_examples=600, deadline=None)
@example({"role": "user", "timestamp": 1.0, "content": "a", "id": 2**63 - 1},
         {"token_count": 2**63 - 1})
@example({"role": "user", "timestamp": 1.0, "content": "a", "id": 2**63}, {})
@example({"role": "user", "timestamp": 1.0, "content": "a", "id": 2**62 - 1}, {})
@example({"role": "user", "timestamp": 1.0, "content": "a", "id": 2**62}, {})
@example({"role": "r" * 1024, "timestamp": -0.0, "content": "", "id": 0}, {})
@example({"role": "r" * 1025, "timestamp": 1.0, "content": None, "id": None}, {})
@example({"role": "user", "timestamp": 1, "content": "a\x00b", "id": None}, {})
@example({"role": "user", "timestamp": float("nan"), "content": "a", "id": True}, {})
@example({"role": "user", "timestamp": 1.0, "content": "a", "id": None}, {"token_count": True})
def test_a_message_is_checked_alike_on_the_fast_path_and_the_general_one(common, extra
                                                                         ) -> None:
    # The import checks the common message (ASCII text, no JSON columns) in one
    # expression and sends every other through the check functions: both must accept
    # the same messages, make the same row, and refuse with the same error.
    from sessiondb import records

    message = {**common, **extra}

    def outcome(check):
        try:
            row = check("s", dict(message))
        except (InvalidArgument, InvalidArgumentType) as exc:
            return type(exc), str(exc)
        return tuple((type(v), repr(v)) for v in row)  # 1 is not 1.0, -0.0 is not 0.0

    assert outcome(records._message_row) == outcome(records._checked_row)


def test_a_parent_that_started_after_its_children_is_exported_before_them(
        db: SessionDB, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Oldest first put such children before their parent, and an import of the export
    # held them (and their messages) waiting for it, refusing past 2,000 sessions or
    # 20,000 messages: a store's own export did not import. A parent that started
    # after its child now comes right before the child (its own late parent first).
    from sessiondb import bulk, export

    def session(sid: str, started: float, parent: str | None = None,
                source: str = "cli") -> dict:
        return {"id": sid, "source": source, "started_at": started,
                "parent_session_id": parent,
                "messages": [{"role": "user", "content": f"{sid} {n}", "timestamp": started}
                             for n in range(3)]}

    items = [session("grand", 300.0), session("parent", 200.0, "grand"),
             session("early", 50.0)] + \
        [session(f"child-{n}", 100.0 + n, "parent") for n in range(4)] + \
        [session("other", 150.0, "child-1"), session("slack-parent", 500.0, source="slack"),
         session("cli-child", 60.0, "slack-parent"),
         # Started together: which comes first is the database's order of the ids
         # (PostgreSQL's collation may put "a" before "B"; SQLite does not).
         session("a-par", 700.0), session("B-kid", 700.0, "a-par")]
    db.import_sessions(items)  # a list: placed parents first, whatever the times
    for batch in (export.EXPORT_BATCH_SESSIONS, 2):
        monkeypatch.setattr(export, "EXPORT_BATCH_SESSIONS", batch)
        exported = db.export_all()
        ids = [s["id"] for s in exported]
        assert sorted(ids) == sorted(s["id"] for s in items)  # each once
        for position, item in enumerate(exported):
            parent = item["parent_session_id"]
            assert parent is None or ids.index(parent) < position, (item["id"], ids)
        assert ids[:6] == ["early", "slack-parent", "cli-child", "grand", "parent",
                           "child-0"]
        # Of one source: a parent outside it is not exported, so nothing moves for it.
        assert [s["id"] for s in db.export_all("cli")][:3] == ["early", "cli-child",
                                                               "grand"]
    # The export imports as a stream with no child ever waiting for its parent.
    monkeypatch.setattr(bulk, "WAITING_SESSIONS", 0)
    monkeypatch.setattr(bulk, "WAITING_MESSAGES", 0)
    with SessionDB(tmp_path / "copy.db") as copy:
        copy.import_sessions(iter(db.iter_export()))
        assert [s["id"] for s in copy.export_all()] == ids


def test_parents_that_form_a_cycle_are_refused_by_name(fresh: SessionDB) -> None:
    # Previously: "session 'b' names parent 'a', which is neither in the store nor in
    # the import", though 'a' was in the import.
    cycle = [{"id": "a", "source": "cli", "started_at": 1.0, "parent_session_id": "c"},
             {"id": "b", "source": "cli", "started_at": 2.0, "parent_session_id": "a"},
             {"id": "c", "source": "cli", "started_at": 3.0, "parent_session_id": "b"}]
    for data in (cycle, iter(cycle)):  # a list, a stream
        with pytest.raises(IntegrityViolation, match=r"the parents of imported sessions "
                                                     r"'a', 'c', 'b' form a cycle"):
            fresh.import_sessions(data)
        assert fresh.session_count() == 0
    # Its own parent: no cycle.
    assert fresh.import_sessions([{"id": "self", "source": "cli", "started_at": 4.0,
                                   "parent_session_id": "self"}]) == 1
