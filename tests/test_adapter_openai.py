"""The OpenAI Agents SDK adapter: ``SessionDBSession`` behaves as the SDK's ``Session``
protocol and its ``SQLiteSession`` do (limits, settings, order, exact JSON, pop, clear),
is a sessiondb session (counters, search), keeps every caller off the event loop, works
under a real ``Runner``, and holds up with 8 processes writing one conversation."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from sessiondb import (
    AsyncSessionDB, ClosedError, ConfigurationError, InvalidArgument, InvalidArgumentType,
    SessionDB,
)
from sessiondb.adapters.openai_agents import ITEM_KEY, SessionDBSession
from sessiondb.bench import fw_openai
from sessiondb.bench.frameworks import run_case

SID = "conv-1"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str, n: int = 1) -> dict[str, Any]:
    """An assistant message as the Runner stores a model's output."""
    return {"id": f"msg_{n}", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}


CALL = {"type": "function_call", "call_id": "call_7", "name": "get_weather",
        "arguments": '{"city": "Paris"}', "id": "fc_7", "status": "completed"}
OUTPUT = {"type": "function_call_output", "call_id": "call_7", "output": "sunny, 21 °C"}
REASONING = {"type": "reasoning", "id": "rs_1",
             "summary": [{"type": "summary_text", "text": "the user wants weather"}]}


@pytest.fixture
def session(db: SessionDB) -> SessionDBSession:
    return SessionDBSession(SID, db)


def exact(items: list[Any]) -> str:
    """Items as JSON text: equal only if values and key order are."""
    return json.dumps(items, ensure_ascii=False)


def counters(db: SessionDB, sid: str = SID) -> tuple[int, int]:
    s = db.get_session(sid)
    return s["message_count"], s["tool_call_count"]


def rows_match_counters(db: SessionDB, sid: str = SID) -> bool:
    messages = db.get_messages(sid)
    calls = sum(len(m["tool_calls"] or []) for m in messages)
    return counters(db, sid) == (len(messages), calls)


# -- the protocol ----------------------------------------------------------------------

def test_it_is_an_sdk_session(
        session: SessionDBSession) -> None:
    from agents.memory import Session, SessionSettings

    assert isinstance(session, Session)
    assert session.session_id == SID
    assert session.session_settings == SessionSettings()


def test_add_then_get_returns_exactly_what_was_added_in_order(
        session: SessionDBSession) -> None:
    first = [user("hi"), assistant("hello"), REASONING]
    second = [CALL, OUTPUT, assistant("It is sunny.", 2)]
    run(session.add_items(first))
    run(session.add_items(second))
    got = run(session.get_items())
    assert got == first + second
    assert exact(got) == exact(first + second)


def test_json_round_trip_unicode_nested_large_and_key_order(session: SessionDBSession) -> None:
    odd = {"z": 1, "a": {"y": [1, 2.5, None, True, {"b": [], "a": {}}], "x": ""},
           "role": "user", "content": "emoji 🎉, 日本語, \u200b, tab\t, quote \" and \\"}
    big = {"role": "user", "content": [{"type": "input_text", "text": "x" * 300_000},
                                       {"type": "input_text", "text": "ünïcödé " * 1000}]}
    deep: dict[str, Any] = {"type": "custom"}
    node = deep
    for _ in range(100):
        node["n"] = {}
        node = node["n"]
    nul = {"role": "user", "content": "nul\x00inside and a lone \ud800 surrogate"}
    items = [odd, big, deep, nul]
    run(session.add_items(items))
    got = run(session.get_items())
    assert exact(got) == exact(items)
    assert list(got[0]) == ["z", "a", "role", "content"]


def test_limit_gives_the_latest_items_oldest_first(session: SessionDBSession) -> None:
    items = [user(f"m{i}") for i in range(10)]
    run(session.add_items(items))
    assert run(session.get_items(limit=3)) == items[-3:]
    assert run(session.get_items(limit=1)) == items[-1:]
    assert run(session.get_items(limit=10)) == items
    assert run(session.get_items(limit=50)) == items
    assert run(session.get_items(limit=0)) == []
    assert run(session.get_items(None)) == items


def test_settings_limit_is_the_default_and_an_explicit_limit_wins(db: SessionDB) -> None:
    from agents.memory import SessionSettings

    items = [user(f"m{i}") for i in range(6)]
    session = SessionDBSession(SID, db, session_settings=SessionSettings(limit=2))
    run(session.add_items(items))
    assert run(session.get_items()) == items[-2:]
    assert run(session.get_items(limit=4)) == items[-4:]
    assert run(session.get_items(limit=0)) == []
    by_dict = SessionDBSession(SID, db, session_settings={"limit": 3})
    assert by_dict.session_settings == SessionSettings(limit=3)
    assert run(by_dict.get_items()) == items[-3:]
    by_dict.session_settings = None  # back to the default: no limit
    assert by_dict.session_settings == SessionSettings()
    assert run(by_dict.get_items()) == items


def test_get_items_of_an_unknown_conversation_is_empty(db: SessionDB) -> None:
    assert run(SessionDBSession("never-written", db).get_items()) == []
    assert db.get_session("never-written") is None


def test_pop_returns_the_newest_item_and_none_when_empty(
        db: SessionDB, session: SessionDBSession) -> None:
    assert run(session.pop_item()) is None  # no session yet
    assert db.get_session(SID) is None
    items = [user("a"), CALL, OUTPUT]
    run(session.add_items(items))
    assert counters(db) == (3, 1)
    assert exact([run(session.pop_item())]) == exact([OUTPUT])
    assert exact([run(session.pop_item())]) == exact([CALL])
    assert counters(db) == (1, 0)
    assert run(session.get_items()) == [user("a")]
    assert run(session.pop_item()) == user("a")
    assert run(session.pop_item()) is None  # the session exists, empty
    assert counters(db) == (0, 0)


def test_clear_removes_the_items_and_keeps_the_session(
        db: SessionDB, session: SessionDBSession) -> None:
    run(session.clear_session())  # nothing to clear yet: no error, nothing made
    assert db.get_session(SID) is None
    run(session.add_items([user("a"), CALL]))
    db.set_session_title(SID, "Weather")
    run(session.clear_session())
    assert run(session.get_items()) == []
    assert counters(db) == (0, 0)
    assert db.get_session(SID)["title"] == "Weather"
    run(session.add_items([user("again")]))
    assert run(session.get_items()) == [user("again")]
    assert counters(db) == (1, 0)


def test_an_empty_add_writes_nothing(db: SessionDB, session: SessionDBSession) -> None:
    run(session.add_items([]))
    assert db.get_session(SID) is None


def test_two_conversations_on_one_store_are_independent(db: SessionDB) -> None:
    a, b = SessionDBSession("a", db), SessionDBSession("b", db)
    run(a.add_items([user("a1"), user("a2")]))
    run(b.add_items([user("b1")]))
    assert run(a.pop_item()) == user("a2")
    run(b.clear_session())
    assert run(a.get_items()) == [user("a1")]
    assert run(b.get_items()) == []
    assert (counters(db, "a"), counters(db, "b")) == ((1, 0), (0, 0))


# -- a sessiondb session ----------------------------------------------------------------

def test_the_conversation_is_a_sessiondb_session(db: SessionDB,
                                                 session: SessionDBSession) -> None:
    items = [user("What is the weather in Paris?"), REASONING, CALL, OUTPUT,
             assistant("Sunny and mild in Paris.")]
    run(session.add_items(items))
    s = db.get_session(SID)
    assert s["source"] == "openai-agents"
    assert counters(db) == (5, 1) and rows_match_counters(db)
    messages = db.get_messages(SID)
    assert [m["role"] for m in messages] == [
        "user", "reasoning", "function_call", "function_call_output", "assistant"]
    assert [m["content"] for m in messages] == [
        "What is the weather in Paris?", "the user wants weather", '{"city": "Paris"}',
        "sunny, 21 °C", "Sunny and mild in Paris."]
    assert (messages[2]["tool_name"], messages[2]["tool_call_id"]) == ("get_weather",
                                                                      "call_7")
    assert messages[2]["tool_calls"] == [{"type": "function_call", "id": "call_7",
                                          "name": "get_weather"}]
    assert messages[3]["tool_call_id"] == "call_7"
    assert [m["metadata"][ITEM_KEY] for m in messages] == items
    hits = db.search_messages("sunny")
    assert {h["session_id"] for h in hits} == {SID}
    assert {h["role"] for h in hits} == {"function_call_output", "assistant"}
    assert [s["id"] for s in db.list_sessions(source="openai-agents")] == [SID]


def test_source_is_chosen_by_the_caller(db: SessionDB) -> None:
    run(SessionDBSession(SID, db, source="gateway").add_items([user("x")]))
    assert db.get_session(SID)["source"] == "gateway"


def test_messages_written_by_other_means_read_as_plain_messages(
        db: SessionDB, session: SessionDBSession) -> None:
    run(session.add_items([user("from the sdk")]))
    db.append_message(SID, "assistant", "from sessiondb directly")
    db.append_message(SID, "system", None, metadata={"other": 1})
    assert run(session.get_items()) == [
        user("from the sdk"), {"role": "assistant", "content": "from sessiondb directly"},
        {"role": "system", "content": ""}]
    assert run(session.pop_item()) == {"role": "system", "content": ""}
    assert counters(db) == (2, 0)


# -- bad input: typed errors, nothing written -------------------------------------------

def assert_refused_whole(db: SessionDB, session: SessionDBSession, items: Any,
                         error: type) -> None:
    run(session.add_items([user("before")]))
    before = db.get_session(SID)
    with pytest.raises(error):
        run(session.add_items(items))
    assert run(session.get_items()) == [user("before")]
    assert db.get_session(SID) == before


@pytest.mark.parametrize("bad", [{1, 2}, float("nan"), object()], ids=["set", "nan", "object"])
def test_items_that_are_no_json_are_refused_whole(db: SessionDB, session: SessionDBSession,
                                                  bad: Any) -> None:
    assert_refused_whole(db, session, [user("ok"), {"role": "user", "content": bad}],
                         InvalidArgumentType)


@pytest.mark.sqlite_only  # refused before the store is reached
@pytest.mark.parametrize("items", [
    [user("ok"), "not a dict"], [user("ok"), None], user("a dict, not a list"), "text", None,
], ids=["str-item", "none-item", "dict", "str", "none"])
def test_items_that_are_no_list_of_dicts_are_refused_whole(
        db: SessionDB, session: SessionDBSession, items: Any) -> None:
    assert_refused_whole(db, session, items, InvalidArgumentType)


def test_a_bad_item_in_the_first_add_makes_no_session(db: SessionDB,
                                                      session: SessionDBSession) -> None:
    with pytest.raises(InvalidArgumentType, match="item 1 is not JSON-serializable"):
        run(session.add_items([user("ok"), {"x": object()}]))
    assert db.get_session(SID) is None


# Argument checks that run before the store is reached: SQLite only, nothing to compare.
@pytest.mark.sqlite_only
@pytest.mark.parametrize("limit, error", [
    (-1, InvalidArgument), ("3", InvalidArgumentType), (True, InvalidArgumentType),
    (1.5, InvalidArgumentType),
])
def test_bad_limits_are_refused(session: SessionDBSession, limit, error) -> None:
    with pytest.raises(error):
        run(session.get_items(limit=limit))


@pytest.mark.sqlite_only
def test_a_negative_settings_limit_is_refused(db: SessionDB) -> None:
    session = SessionDBSession(SID, db, session_settings={"limit": -2})
    with pytest.raises(InvalidArgument):
        run(session.get_items())


@pytest.mark.sqlite_only
@pytest.mark.parametrize("session_id, error", [
    ("", InvalidArgument), ("x" * 1025, InvalidArgument), (None, InvalidArgument),
    (42, InvalidArgumentType), ("lone \udc00", InvalidArgument),
])
def test_bad_session_ids_are_refused(db: SessionDB, session_id, error) -> None:
    with pytest.raises(error):
        SessionDBSession(session_id, db)


@pytest.mark.sqlite_only
def test_bad_stores_and_options_are_refused(db: SessionDB) -> None:
    with pytest.raises(InvalidArgumentType):
        SessionDBSession(SID, 42)
    with pytest.raises(ConfigurationError, match="write_timeout"):
        SessionDBSession(SID, db, write_timeout=5)
    with pytest.raises(InvalidArgument):
        SessionDBSession(SID, db, source="")


# -- the stores it runs on ---------------------------------------------------------------

def test_a_path_or_url_is_opened_on_first_use_and_owned(db_path: Any) -> None:
    session = SessionDBSession(SID, str(db_path), write_timeout=20)
    run(session.add_items([user("owned")]))
    assert run(session.get_items()) == [user("owned")]
    session.close()
    session.close()  # idempotent
    with pytest.raises(ClosedError):
        run(session.get_items())
    with pytest.raises(ClosedError):
        run(session.add_items([user("late")]))
    with SessionDB(db_path) as db:
        assert [m["content"] for m in db.get_messages(SID)] == ["owned"]


def test_a_shared_store_stays_open_after_close(db: SessionDB) -> None:
    session = SessionDBSession(SID, db)
    run(session.add_items([user("x")]))
    session.close()
    assert db.get_messages(SID)[0]["content"] == "x"  # the store was not closed


def test_an_async_store_is_used_through_its_worker_thread(db_path: Any) -> None:
    async def main() -> list[Any]:
        async with AsyncSessionDB(db_path) as adb:
            a, b = SessionDBSession("a", adb), SessionDBSession("b", adb)
            await asyncio.gather(a.add_items([user("a1"), user("a2")]),
                                 b.add_items([user("b1")]))
            assert await a.pop_item() == user("a2")
            assert (await adb.get_session("a"))["message_count"] == 1
            return [await a.get_items(), await b.get_items()]

    assert run(main()) == [[user("a1")], [user("b1")]]


@contextmanager
def conversation_held(db_path: Any) -> Iterator[tuple[threading.Event, list[bool]]]:
    """While the block runs, another store holds a write of the conversation open (until
    ``release`` is set, at most 5 s; ``holding[0]`` says whether it still does): writes
    of the same conversation wait for it, on every backend."""
    held, release, holding = threading.Event(), threading.Event(), [False]

    def hold() -> None:
        with SessionDB(db_path) as other:
            other.create_session(SID, "openai-agents")
            with other.transaction():
                other.append_message(SID, "user", "held")
                holding[0] = True
                held.set()
                release.wait(timeout=5)
                holding[0] = False

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(timeout=30)
        yield release, holding
    finally:
        release.set()
        thread.join()


def test_a_write_waiting_for_the_lock_never_blocks_the_event_loop(
        db_path: Any, session: SessionDBSession) -> None:
    async def main(release: threading.Event, holding: list[bool]) -> bool:
        task = asyncio.create_task(session.add_items([user("mine")]))
        await asyncio.sleep(0.2)  # the loop runs on while the write waits
        loop_ran_while_held = holding[0] and not task.done()
        release.set()
        await task
        return loop_ran_while_held

    with conversation_held(db_path) as (release, holding):
        assert run(main(release, holding))
    assert run(session.get_items()) == [{"role": "user", "content": "held"}, user("mine")]


def test_a_cancelled_add_returns_only_once_its_write_has_settled(
        db_path: Any, session: SessionDBSession) -> None:
    async def main(release: threading.Event) -> None:
        task = asyncio.create_task(session.add_items([user("mine")]))
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0.1)
        assert not task.done()  # still waiting for its write's outcome
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    with conversation_held(db_path) as (release, _):
        run(main(release))
    # The write went through: the caller was told "cancelled" only after it committed.
    assert run(session.get_items())[-1] == user("mine")


# -- under the SDK's Runner ---------------------------------------------------------------

def canned_model(outputs: list[Any]) -> Any:
    """A model of the SDK's ``Model`` interface that answers the n-th call with
    ``outputs[n]`` (a str: an assistant message; a dict: a function call) and records
    each call's input. The SDK has no network here, and needs none."""
    from agents import set_tracing_disabled
    from agents.items import ModelResponse
    from agents.models.interface import Model
    from agents.usage import Usage
    from openai.types.responses import (
        ResponseFunctionToolCall, ResponseOutputMessage, ResponseOutputText,
    )

    set_tracing_disabled(True)

    class CannedModel(Model):
        def __init__(self) -> None:
            self.inputs: list[Any] = []

        async def get_response(self, system_instructions, input, model_settings, tools,
                               output_schema, handoffs, tracing, *, previous_response_id,
                               conversation_id, prompt, **kwargs) -> ModelResponse:
            self.inputs.append(input)
            n = len(self.inputs)
            out = outputs[n - 1]
            if isinstance(out, dict):
                item: Any = ResponseFunctionToolCall(type="function_call", **out)
            else:
                text = ResponseOutputText(type="output_text", text=out, annotations=[])
                item = ResponseOutputMessage(id=f"msg_{n}", type="message",
                                             role="assistant", status="completed",
                                             content=[text])
            return ModelResponse(output=[item], usage=Usage(), response_id=None)

        def stream_response(self, *args, **kwargs):
            raise NotImplementedError

    return CannedModel()


def test_a_runner_stores_the_conversation_and_feeds_it_back(
        db: SessionDB, session: SessionDBSession) -> None:
    from agents import Agent, RunConfig, Runner, SessionSettings

    model = canned_model(["reply 1", "reply 2", "reply 3"])
    agent = Agent(name="assistant", instructions="Be brief.", model=model)

    async def main() -> list[Any]:
        first = await Runner.run(agent, "hi", session=session)
        second = await Runner.run(agent, "and again", session=session)
        limited = RunConfig(session_settings=SessionSettings(limit=2))
        third = await Runner.run(agent, "last", session=session, run_config=limited)
        return [first.final_output, second.final_output, third.final_output]

    assert run(main()) == ["reply 1", "reply 2", "reply 3"]
    expected = [user("hi"), assistant("reply 1"), user("and again"), assistant("reply 2", 2),
                user("last"), assistant("reply 3", 3)]
    assert run(session.get_items()) == expected
    assert model.inputs[0] == [user("hi")]
    assert model.inputs[1] == expected[:3]  # the stored conversation, fed back
    assert model.inputs[2] == expected[2:5]  # the run's limit: the latest 2 items
    assert [m["content"] for m in db.get_messages(SID)] == [
        "hi", "reply 1", "and again", "reply 2", "last", "reply 3"]
    assert counters(db) == (6, 0)


def test_a_runner_turn_with_a_tool_call_counts_the_call(
        db: SessionDB, session: SessionDBSession) -> None:
    from agents import Agent, Runner, function_tool

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    call = {"call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}',
            "id": "fc_1"}
    model = canned_model([call, "It is sunny in Paris."])
    agent = Agent(name="assistant", model=model, tools=[get_weather])
    assert run(Runner.run(agent, "Weather in Paris?", session=session)).final_output == (
        "It is sunny in Paris.")
    messages = db.get_messages(SID)
    assert [m["role"] for m in messages] == [
        "user", "function_call", "function_call_output", "assistant"]
    assert [m["content"] for m in messages] == [
        "Weather in Paris?", '{"city": "Paris"}', "sunny in Paris", "It is sunny in Paris."]
    assert (messages[1]["tool_name"], messages[1]["tool_call_id"]) == ("get_weather",
                                                                      "call_1")
    assert counters(db) == (4, 1) and rows_match_counters(db)
    assert model.inputs[1] == [m["metadata"][ITEM_KEY] for m in messages[:3]]
    assert {h["role"] for h in db.search_messages("sunny", session_id=SID)} == {
        "function_call_output", "assistant"}


# -- many processes -------------------------------------------------------------------------

def bench_target(backend: str, db_path: Any) -> tuple[str, str]:
    return ("sessiondb", str(db_path)) if backend == "sqlite" else ("sessiondb-pg", db_path)


def test_eight_processes_adding_to_one_conversation(backend: str, db_path: Any) -> None:
    name, target = bench_target(backend, db_path)
    row = run_case("fw_openai", name, target, writers=8, count=25)
    assert row["error_samples"] == [] and row["errors"] == 0
    assert (row["acknowledged"], row["present"]) == (200, 200)
    assert (row["lost"], row["duplicated"], row["out_of_order"]) == (0, 0, 0)
    with SessionDB(db_path) as db:
        assert counters(db, fw_openai.CONVERSATION) == (200, 0)
        assert rows_match_counters(db, fw_openai.CONVERSATION)


def pop_until_empty(target: str, barrier: Any, out: Any) -> None:
    """A spawned process: pop the conversation's items until there are none."""
    async def pop_all() -> list[Any]:
        session = SessionDBSession(SID, target)
        popped = []
        try:
            while (item := await session.pop_item()) is not None:
                popped.append(item)
        finally:
            session.close()
        return popped

    barrier.wait(timeout=60)
    out.put(asyncio.run(pop_all()))


def test_processes_popping_at_once_never_get_one_item_twice(db: SessionDB,
                                                            db_path: Any) -> None:
    items = [{"role": "user", "content": f"item {i}", "n": i} for i in range(120)]
    run(SessionDBSession(SID, db).add_items(items))
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=pop_until_empty, args=(str(db_path), barrier, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * 4
    popped = [item["n"] for result in results for item in result]
    assert sorted(popped) == list(range(120))  # every item once, none twice
    for result in results:  # each process popped newest first
        assert [item["n"] for item in result] == sorted((i["n"] for i in result),
                                                         reverse=True)
    assert counters(db) == (0, 0) and db.get_messages(SID) == []


@pytest.mark.sqlite_only
def test_importing_sessiondb_never_imports_the_sdk(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, sessiondb, sessiondb.adapters, sessiondb.adapters.openai_agents, "
            "sessiondb.bench.fw_openai; assert 'agents' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
