"""sessiondb.adapters.adk: Google ADK's ``BaseSessionService`` on sessiondb (#13).

:class:`ServiceContract` (``tests/adk_contract.py``) is what an ADK session service
does, written from ADK's public API and its own services' behaviour; it runs against
sessiondb's service (on SQLite, PostgreSQL and through PgBouncer) and against ADK's own
``InMemorySessionService`` and ``SqliteSessionService`` as references, so each
expectation is ADK's, not ours.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import subprocess
import sys
import threading
from typing import Any, AsyncGenerator, Callable

import pytest
from google.adk.agents import LlmAgent
from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.errors.session_not_found_error import SessionNotFoundError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.models import BaseLlm, LlmRequest, LlmResponse
from google.adk.runners import Runner
from google.adk.sessions import InMemorySessionService
from google.adk.sessions.sqlite_session_service import SqliteSessionService
from google.adk.tools.tool_context import ToolContext
from google.genai import types
from pydantic import Field

from sessiondb import AsyncSessionDB, SessionDB
from sessiondb.adapters.adk import SessionDBSessionService, StaleSession
from sessiondb.backend import session_lock_key
from sessiondb.bench import fw_adk
from sessiondb.bench.frameworks import run_case
from sessiondb.errors import (
    ClosedError, InvalidArgument, InvalidArgumentType, SessionNotFound, StaleRevision,
)
from sessiondb.text import MAX_ID_LENGTH

from adk_contract import APP, PersistentContract, ServiceContract, run, said, texts


class HeldLock:
    """Another instance holding a session's lock in a write transaction, on a thread of
    its own (what a concurrent append does), after running ``then(conn)`` under it;
    taken when made, until :meth:`release`."""

    def __init__(self, other: SessionDB, session_id: str,
                 then: Callable[[Any], object] = lambda conn: None) -> None:
        held, self._release = threading.Event(), threading.Event()

        def write(conn: Any) -> None:
            other._sql.lock(conn, session_lock_key(session_id))
            then(conn)

        def hold() -> None:
            with other.transaction():
                other._execute_write(write)
                held.set()
                self._release.wait(10)

        self._thread = threading.Thread(target=hold)
        self._thread.start()
        held.wait(10)

    def release(self) -> None:
        self._release.set()
        self._thread.join()


class TestInMemoryReference(ServiceContract):
    """ADK's own in-memory service: the reference of the contract."""

    @pytest.fixture
    def service(self) -> InMemorySessionService:
        return InMemorySessionService()


class TestSqliteReference(PersistentContract):
    """ADK's own SqliteSessionService: the reference of the persistent contract."""

    @pytest.fixture
    def open_service(self, tmp_path) -> Callable[[], SqliteSessionService]:
        return lambda: SqliteSessionService(str(tmp_path / "adk.db"))

    @pytest.fixture
    def service(self, open_service) -> SqliteSessionService:
        return open_service()


class TestSessionDB(PersistentContract):
    """sessiondb's service on every backend: the contract, and what sessiondb adds."""

    @pytest.fixture
    def open_service(self, db_path) -> Any:
        opened: list[SessionDBSessionService] = []

        def make() -> SessionDBSessionService:
            opened.append(SessionDBSessionService(db_path))
            return opened[-1]

        yield make
        for service in opened:
            run(service.close())

    @pytest.fixture
    def service(self, open_service) -> SessionDBSessionService:
        return open_service()

    def test_an_adk_session_is_a_sessiondb_session(self, service, db: SessionDB) -> None:
        call = types.FunctionCall(id="c-1", name="get_weather", args={"city": "Paris"})
        answer = types.FunctionResponse(id="c-1", name="get_weather",
                                        response={"forecast": "drizzle"})

        async def body() -> list[Event]:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            events = [said("user", "Weather in Paris?"),
                      Event(invocation_id="i", author="weather", content=types.Content(
                          role="model", parts=[types.Part(function_call=call)])),
                      Event(invocation_id="i", author="weather", content=types.Content(
                          role="user", parts=[types.Part(function_response=answer)])),
                      said("weather", "Drizzle, take an umbrella.")]
            for event in events:
                await service.append_event(session, event)
            return events

        events = run(body())
        row = db.get_session("s")
        assert (row["source"], row["user_id"], row["message_count"],
                row["tool_call_count"]) == ("adk", "u1", 4, 1)
        messages = db.get_messages("s")
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
        assert messages[1]["tool_calls"] == [{"id": "c-1", "name": "get_weather",
                                              "args": {"city": "Paris"}}]
        assert (messages[2]["tool_name"], messages[2]["tool_call_id"]) == ("get_weather", "c-1")
        assert json.loads(messages[2]["content"]) == {"forecast": "drizzle"}
        assert [m["timestamp"] for m in messages] == [e.timestamp for e in events]
        assert [m["metadata"] for m in messages] == [
            json.loads(e.model_dump_json(exclude_none=True)) for e in events]
        assert {h["session_id"] for h in db.search_messages("umbrella")} == {"s"}
        assert {h["role"] for h in db.search_messages("drizzle")} == {"tool", "assistant"}

    def test_an_id_taken_in_the_store_gets_a_sessiondb_id_of_its_own(
            self, service, db: SessionDB) -> None:
        db.create_session("cli-1", "cli")
        owners = ((APP, "u1", "s"), (APP, "u2", "s"), ("other", "u1", "s"),
                  (APP, "u1", "cli-1"))

        def tag(app: str, user: str) -> str:
            return hashlib.sha256(json.dumps([app, user]).encode()).hexdigest()[:8]

        async def body() -> None:
            for app, user, sid in owners:
                made = await service.create_session(app_name=app, user_id=user,
                                                    session_id=sid)
                await service.append_event(made, said("user", f"{app}/{user}"))

        run(body())
        ids = ["s", f"s~{tag(APP, 'u2')}", f"s~{tag('other', 'u1')}", f"cli-1~{tag(APP, 'u1')}"]
        for store_id, (app, user, _) in zip(ids, owners):
            row = db.get_session(store_id)
            assert (row["source"], row["user_id"], row["message_count"]) == ("adk", user, 1)
            assert [m["content"] for m in db.get_messages(store_id)] == [f"{app}/{user}"]
        assert (db.get_session("cli-1")["source"], db.get_messages("cli-1")) == ("cli", [])

        async def again() -> None:
            await service.delete_session(app_name=APP, user_id="u2", session_id="s")
            await service.delete_session(app_name=APP, user_id="u1", session_id="s")
            # The ADK id is free again: the next session of that id takes it.
            await service.create_session(app_name=APP, user_id="u3", session_id="s")
            got = await service.get_session(app_name="other", user_id="u1", session_id="s")
            assert texts(got) == ["other/u1"]

        run(again())
        assert db.get_session(ids[1]) is None
        assert db.get_session("s")["user_id"] == "u3"
        assert db.session_count() == 4

    def test_a_derived_id_fits_and_goes_on_when_it_is_taken_too(
            self, service, db: SessionDB) -> None:
        long = "x" * MAX_ID_LENGTH
        tag = "~" + hashlib.sha256(json.dumps([APP, "u2"]).encode()).hexdigest()[:8]
        db.create_session("s" + tag, "cli")

        async def body() -> None:
            for sid in (long, "s"):
                for user in ("u1", "u2"):
                    await service.create_session(app_name=APP, user_id=user, session_id=sid)
            for sid in (long, "s"):
                assert await service.get_session(app_name=APP, user_id="u2", session_id=sid)

        run(body())
        assert db.get_session(long[:MAX_ID_LENGTH - len(tag)] + tag)["user_id"] == "u2"
        assert db.get_session("s" + tag + "~2")["user_id"] == "u2"

    def test_the_stale_error_is_sessiondbs_too_and_changes_nothing(
            self, service, db: SessionDB) -> None:
        async def body() -> None:
            await service.create_session(app_name=APP, user_id="u1", session_id="s")
            mine = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            theirs = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            await service.append_event(mine, said("user", "first"))
            late = said("user", "late", actions=EventActions(
                state_delta={"temp:x": 1, "app:y": 2, "k": 3}))
            before = (theirs.model_dump(), theirs._storage_update_marker, late.model_dump())
            with pytest.raises(StaleRevision) as caught:
                await service.append_event(theirs, late)
            assert isinstance(caught.value, StaleSessionError)
            assert (caught.value.session_id, caught.value.expected,
                    caught.value.actual) == ("s", 0, 1)
            assert (theirs.model_dump(), theirs._storage_update_marker,
                    late.model_dump()) == before
            # Re-read and retry: what an ADK app does.
            fresh = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            await service.append_event(fresh, late)
            assert fresh.state == {"temp:x": 1, "app:y": 2, "k": 3}

        run(body())
        assert db.get_session("s")["message_count"] == 2
        assert [m["content"] for m in db.get_messages("s")] == ["first", "late"]

    def test_the_check_is_made_under_the_sessions_lock(self, service, db_path) -> None:
        # Another instance holds the session's lock while it moves the revision (what a
        # concurrent append does); an append made meanwhile with an object read before
        # waits for the lock, then finds the new revision: refused, not interleaved. The
        # event loop runs on meanwhile (the append waits on a worker thread).
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            holder = HeldLock(other, "s", then=lambda conn: conn.execute(
                "UPDATE adk_sessions SET revision = revision + 1 WHERE session_id = 's'"))
            append = asyncio.create_task(service.append_event(session, said("user", "hi")))
            for _ in range(5):
                await asyncio.sleep(0.01)  # returns only if the loop is free
            waited = not append.done()
            holder.release()
            with pytest.raises(StaleSession) as caught:
                await append
            assert waited and (caught.value.expected, caught.value.actual) == (0, 1)

        with SessionDB(db_path) as other:
            run(body())
            assert other.message_count() == 0

    def test_a_cancelled_append_ends_first_and_leaves_the_object_in_step(
            self, service, db_path) -> None:
        # Another instance holds the session's lock, so the append waits inside its
        # write; it is cancelled meanwhile: it still ends (stored, and applied to the
        # object) before the cancellation is raised, and the object stays current.
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            holder = HeldLock(other, "s")
            append = asyncio.create_task(service.append_event(session, said("user", "hi")))
            await asyncio.sleep(0.05)
            append.cancel()
            await asyncio.sleep(0.05)
            assert not append.done()  # waits for its write
            holder.release()
            with pytest.raises(asyncio.CancelledError):
                await append
            assert texts(session) == ["hi"]
            await service.append_event(session, said("user", "next"))  # not stale
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == ["hi", "next"]

        with SessionDB(db_path) as other:
            run(body())

    def test_calls_never_wait_for_the_loops_default_executor(self, service) -> None:
        # The application's own work (DNS lookups among it) runs there: a busy default
        # executor must not hold the service's calls, nor they it.
        async def body() -> None:
            loop = asyncio.get_running_loop()
            loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
            busy = threading.Event()
            blocked = loop.run_in_executor(None, busy.wait, 120)
            try:
                session = await asyncio.wait_for(service.create_session(
                    app_name=APP, user_id="u1", session_id="s"), 60)
                await asyncio.wait_for(service.append_event(session, said("user", "hi")), 60)
                got = await asyncio.wait_for(service.get_session(
                    app_name=APP, user_id="u1", session_id="s"), 60)
                assert texts(got) == ["hi"]
            finally:
                busy.set()
                await blocked

        run(body())

    def test_a_session_object_from_elsewhere_is_checked_by_its_last_event(
            self, service) -> None:
        # A Session without our marker (built by hand, or by another service): its
        # last event must be the session's, whatever its last_update_time says (event
        # timestamps are the caller's, so they may go back or repeat).
        async def body() -> None:
            made = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            copy = made.model_copy(deep=True)
            copy._storage_update_marker = None
            await service.append_event(copy, said("user", "one"))  # neither has one
            copy._storage_update_marker, copy.last_update_time = None, 0.0
            await service.append_event(copy, said("user", "two", timestamp=1.0))
            old = made.model_copy(deep=True)
            old._storage_update_marker, old.last_update_time = None, 1e12
            with pytest.raises(StaleSession) as caught:
                await service.append_event(old, said("user", "three"))
            assert (caught.value.expected, caught.value.actual) == (None, 2)
            behind = copy.model_copy(deep=True, update={"events": copy.events[:1]})
            behind._storage_update_marker = None
            with pytest.raises(StaleSession):
                await service.append_event(behind, said("user", "three"))
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == ["one", "two"]

        run(body())

    def test_an_object_of_a_session_made_anew_is_refused_at_any_revision(
            self, service) -> None:
        async def body() -> None:
            old = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            await service.delete_session(app_name=APP, user_id="u1", session_id="s")
            await service.create_session(app_name=APP, user_id="u1", session_id="s")
            with pytest.raises(StaleSession) as caught:
                await service.append_event(old, said("user", "late"))
            assert (caught.value.recreated, caught.value.expected,
                    caught.value.actual) == (True, 0, 0)
            assert "deleted and made anew" in str(caught.value)
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert got.events == []

        run(body())

    def test_many_appends_to_one_object_at_once_are_stored_in_order(
            self, service, db: SessionDB) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            events = [said("user", f"m{i}", actions=EventActions(state_delta={"n": i}))
                      for i in range(10)]
            await asyncio.gather(*(service.append_event(session, e) for e in events))
            assert texts(session) == [f"m{i}" for i in range(10)]
            assert session.state == {"n": 9} and service._appending == {}
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == texts(session) and got.state == {"n": 9}
            assert got._storage_update_marker == session._storage_update_marker
            # Another object of the session is another reader: behind, and refused.
            other = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            with pytest.raises(StaleSession):
                await asyncio.gather(service.append_event(session, said("user", "a")),
                                     service.append_event(other, said("user", "b")))

        run(body())
        assert [m["content"] for m in db.get_messages("s")][-1] == "a"

    def test_an_event_appended_again_is_stored_once(self, service, db: SessionDB) -> None:
        async def body() -> None:
            await service.create_session(app_name=APP, user_id="u1", session_id="s")
            first = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            retry = first.model_copy(deep=True)  # the object a failed call left behind
            event = said("user", "once", actions=EventActions(state_delta={"k": 1}))
            await service.append_event(first, event)  # the attempt whose answer was lost
            assert await service.append_event(retry, event) is event
            # Caught up, as if its first attempt had answered: current, not stale.
            assert (texts(retry), retry.state) == (["once"], {"k": 1})
            assert retry._storage_update_marker == first._storage_update_marker
            assert retry.last_update_time == event.timestamp
            assert await service.append_event(first, event) is event  # holds it already
            assert texts(first) == ["once"]
            await service.append_event(retry, said("user", "next"))
            # Not the newest any more: the object is left as it is (and stays stale).
            assert await service.append_event(first, event) is event
            assert texts(first) == ["once"]
            with pytest.raises(StaleSession):
                await service.append_event(first, said("user", "late"))
            other = said("user", "same id, other text")
            other.id = event.id
            with pytest.raises(AlreadyExistsError):
                await service.append_event(retry, other)

        run(body())
        assert db.get_session("s")["message_count"] == 2

    def test_appending_to_a_session_that_is_gone(self, service, db: SessionDB) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            await service.delete_session(app_name=APP, user_id="u1", session_id="s")
            with pytest.raises(SessionNotFoundError) as caught:
                await service.append_event(session, said("user", "anyone?"))
            assert isinstance(caught.value, SessionNotFound)
            stranger = session.model_copy(update={"user_id": "u2", "id": "t"})
            await service.create_session(app_name=APP, user_id="u1", session_id="t")
            with pytest.raises(SessionNotFound):
                await service.append_event(stranger, said("user", "not mine"))

        run(body())
        assert db.message_count() == 0

    def test_sessiondb_delete_and_prune_remove_everything(self, service, db: SessionDB) -> None:
        async def body(sid: str) -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id=sid,
                                                    state={"user:lang": "fr"})
            await service.append_event(session, said("user", "hello"))

        def count(table: str) -> int:
            return db._read(lambda c: c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

        run(body("s-1"))
        run(body("s-2"))
        assert db.delete_session("s-1")
        db.end_session("s-2")
        assert db.prune_sessions(older_than_days=0) == 1
        assert (count("adk_sessions"), count("adk_events"), count("messages")) == (0, 0, 0)
        assert run(service.get_session(app_name=APP, user_id="u1", session_id="s-2")) is None
        assert run(service.list_sessions(app_name=APP)).sessions == []
        assert run(service.get_user_state(app_name=APP, user_id="u1")) == {"lang": "fr"}

    def test_bad_arguments_are_refused_with_nothing_written(self, service, db: SessionDB) -> None:
        async def body() -> None:
            with pytest.raises(InvalidArgumentType):
                await service.create_session(app_name=1, user_id="u1")
            with pytest.raises(InvalidArgumentType):
                await service.create_session(app_name=APP, user_id="u1", state=[("k", 1)])
            with pytest.raises(InvalidArgument):
                await service.create_session(app_name=APP, user_id="u1", session_id="x" * 2000)
            with pytest.raises(InvalidArgumentType):
                await service.append_event({"id": "s"}, said("user", "hi"))
            made = await service.create_session(app_name=APP, user_id="u1", session_id="  s  ")
            assert made.id == "s"  # stripped, as ADK's services do
            nul = said("user", "a\x00b")
            await service.append_event(made, nul)
            got = await service.get_session(app_name=APP, user_id="u1", session_id=" s ")
            assert texts(got) == ["a\x00b"]  # the event keeps it; the message text drops it

        run(body())
        assert db.session_count() == 1
        assert [m["content"] for m in db.get_messages("s")] == ["ab"]

    def test_it_takes_a_store_an_async_store_or_a_path(self, db_path) -> None:
        async def use(service: SessionDBSessionService, sid: str) -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id=sid)
            await service.append_event(session, said("user", sid))

        with SessionDB(db_path) as db:
            service = SessionDBSessionService(db, source="gateway")
            run(use(service, "given"))
            run(service.close())
            assert db.get_session("given")["source"] == "gateway"  # still open
            with pytest.raises(ClosedError):  # but the service is closed
                run(service.get_session(app_name=APP, user_id="u1", session_id="given"))

        async def with_async() -> None:
            async with AsyncSessionDB(db_path) as adb:
                service = SessionDBSessionService(adb)
                await use(service, "async")
                await service.close()
                assert (await adb.get_session("async"))["message_count"] == 1
                with pytest.raises(ClosedError):
                    await service.list_sessions(app_name=APP)

        run(with_async())
        owned = SessionDBSessionService(db_path)
        run(use(owned, "owned"))
        run(owned.close())
        with pytest.raises(ClosedError):
            run(owned.get_session(app_name=APP, user_id="u1", session_id="owned"))
        with pytest.raises(InvalidArgumentType):
            SessionDBSessionService(42)

    @pytest.mark.sqlite_only
    def test_importing_sessiondb_does_not_import_adk(self) -> None:
        code = ("import sys, sessiondb, sessiondb.adapters, sessiondb.bench.fw_adk; "
                "print(sorted(m for m in sys.modules if m.startswith('google.adk')))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        assert out.stdout.strip() == "[]"


# -- a real Runner with an LlmAgent, driven by a model that replies from a script ----------

class ScriptedModel(BaseLlm):
    """A model that returns the next canned response, and keeps the requests it got."""

    model: str = "scripted"
    replies: list[LlmResponse] = Field(default_factory=list)
    requests: list[LlmRequest] = Field(default_factory=list)

    async def generate_content_async(self, llm_request: LlmRequest,
                                     stream: bool = False) -> AsyncGenerator[LlmResponse, None]:
        self.requests.append(llm_request)
        yield self.replies.pop(0)


def get_weather(city: str, tool_context: ToolContext) -> dict:
    """The forecast for a city."""
    tool_context.state["user:last_city"] = city
    tool_context.state["temp:looked_up"] = True
    return {"city": city, "forecast": "sunny"}


def reply(*parts: types.Part) -> LlmResponse:
    return LlmResponse(content=types.Content(role="model", parts=list(parts)))


def ask(runner: Runner, session_id: str, text: str) -> list[Event]:
    async def body() -> list[Event]:
        message = types.Content(role="user", parts=[types.Part(text=text)])
        return [e async for e in runner.run_async(user_id="u1", session_id=session_id,
                                                  new_message=message)]

    return run(body())


def test_a_runner_stores_a_conversation_and_another_service_resumes_it(
        db_path, db: SessionDB) -> None:
    model = ScriptedModel(replies=[
        reply(types.Part(function_call=types.FunctionCall(
            id="c-1", name="get_weather", args={"city": "Paris"}))),
        reply(types.Part(text="Sunny in Paris.")),
        reply(types.Part(text="Still sunny tomorrow.")),
    ])
    agent = LlmAgent(name="forecaster", model=model, tools=[get_weather],
                     output_key="last_answer")
    first = SessionDBSessionService(db_path)
    session = run(first.create_session(app_name=APP, user_id="u1"))
    ask(Runner(app_name=APP, agent=agent, session_service=first), session.id,
        "Weather in Paris?")
    run(first.close())

    second = SessionDBSessionService(db_path)
    resumed = run(second.get_session(app_name=APP, user_id="u1", session_id=session.id))
    assert [e.author for e in resumed.events] == ["user", "forecaster", "forecaster",
                                                  "forecaster"]
    assert resumed.events[2].content.parts[0].function_response.response == {
        "city": "Paris", "forecast": "sunny"}
    assert resumed.state == {"user:last_city": "Paris", "last_answer": "Sunny in Paris."}
    ask(Runner(app_name=APP, agent=agent, session_service=second), session.id,
        "And tomorrow?")
    history = [p.text for c in model.requests[-1].contents for p in c.parts if p.text]
    assert history[:2] == ["Weather in Paris?", "Sunny in Paris."]
    assert history[-1] == "And tomorrow?"
    final = run(second.get_session(app_name=APP, user_id="u1", session_id=session.id))
    assert final.state["last_answer"] == "Still sunny tomorrow."
    run(second.close())
    assert (db.get_session(session.id)["message_count"],
            db.get_session(session.id)["tool_call_count"]) == (6, 1)


# -- eight processes, one session -------------------------------------------------------

@pytest.mark.slow
def test_eight_processes_append_to_one_session(db_path, backend) -> None:
    bench_backend = "sessiondb" if backend == "sqlite" else "sessiondb-pg"
    row = run_case("fw_adk", bench_backend, str(db_path), writers=8, count=12)
    assert (row["acknowledged"], row["errors"], row["lost"], row["duplicated"],
            row["out_of_order"]) == (96, 0, 0, 0, 0), row["error_samples"]
    found = fw_adk.details(bench_backend, str(db_path))
    assert (found["events"], found["interleaved"]) == (96, 0)
    print(f"{backend}: {found['stale_retries']} stale appends re-read and retried")


@pytest.mark.slow
@pytest.mark.sqlite_only
def test_adks_own_sqlite_service_runs_in_the_benchmark(tmp_path) -> None:
    row = run_case("fw_adk", "SqliteSessionService", str(tmp_path / "adk.db"), writers=2,
                   count=4)
    assert row["acknowledged"] + row["errors"] == 8
    assert row["present"] >= row["acknowledged"] - row["lost"]
