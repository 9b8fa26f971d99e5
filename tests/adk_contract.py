"""The ADK session service contract (for tests/test_adapter_adk.py): what an ADK session
service does, written from ADK's public API and its own services' behaviour, as test
classes that a test module binds to a service with a ``service`` fixture (and, for
:class:`PersistentContract`, ``open_service``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from google.adk.errors._stale_session_error import StaleSessionError
from google.adk.errors.already_exists_error import AlreadyExistsError
from google.adk.events.event import Event
from google.adk.events.event_actions import EventActions
from google.adk.sessions.base_session_service import GetSessionConfig
from google.genai import types


APP = "weather"
run = asyncio.run


def said(author: str, text: str, **fields: Any) -> Event:
    """An event with one text part."""
    return Event(invocation_id="inv-1", author=author, content=types.Content(
        role="user" if author == "user" else "model", parts=[types.Part(text=text)]),
        **fields)


def texts(session) -> list[str]:
    return [e.content.parts[0].text for e in session.events]


# -- the contract: ADK's behaviour, checked against ADK's own services too ---------------

class ServiceContract:
    """Every test takes ``service`` (a fresh, empty service)."""

    def test_create_with_an_id_and_state_scoped_by_prefix(self, service) -> None:
        async def body() -> None:
            made = await service.create_session(
                app_name=APP, user_id="u1", session_id="s-1",
                state={"k": 1, "app:theme": "dark", "user:lang": "fr", "temp:t": 9})
            assert (made.id, made.app_name, made.user_id, made.events) == ("s-1", APP, "u1", [])
            assert made.state == {"k": 1, "app:theme": "dark", "user:lang": "fr"}
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s-1")
            assert got.state == made.state and got.events == []
            assert got.last_update_time == made.last_update_time > 0

        run(body())

    def test_generated_ids_and_an_existing_id(self, service) -> None:
        async def body() -> None:
            a = await service.create_session(app_name=APP, user_id="u1")
            b = await service.create_session(app_name=APP, user_id="u1")
            assert a.id and b.id and a.id != b.id
            with pytest.raises(AlreadyExistsError):
                await service.create_session(app_name=APP, user_id="u1", session_id=a.id)
            assert await service.get_session(app_name=APP, user_id="u1", session_id=b.id)
            blank = await service.create_session(app_name=APP, user_id="u1", session_id="  ")
            assert blank.id.strip() and blank.id not in (a.id, b.id)
            assert await service.get_session(app_name=APP, user_id="u1", session_id="") is None

        run(body())

    def test_no_session_is_none(self, service) -> None:
        async def body() -> None:
            await service.create_session(app_name=APP, user_id="u1", session_id="s-1")
            for app, user, sid in ((APP, "u1", "nope"), (APP, "u2", "s-1"), ("other", "u1", "s-1")):
                assert await service.get_session(app_name=app, user_id=user, session_id=sid) is None

        run(body())

    def test_list_by_user_and_by_app_least_recently_updated_first(self, service) -> None:
        async def body() -> None:
            for user, sid in (("u1", "s-1"), ("u1", "s-2"), ("u2", "s-3")):
                await service.create_session(app_name=APP, user_id=user, session_id=sid,
                                             state={"user:name": user})
            await service.create_session(app_name="other", user_id="u1", session_id="s-4")
            mine = await service.list_sessions(app_name=APP, user_id="u1")
            assert [s.id for s in mine.sessions] == ["s-1", "s-2"]
            every = await service.list_sessions(app_name=APP)
            assert [s.id for s in every.sessions] == ["s-1", "s-2", "s-3"]
            assert [s.state["user:name"] for s in every.sessions] == ["u1", "u1", "u2"]
            first = await service.get_session(app_name=APP, user_id="u1", session_id="s-1")
            await service.append_event(first, said("user", "hello"))
            every = await service.list_sessions(app_name=APP)
            assert [s.id for s in every.sessions] == ["s-2", "s-3", "s-1"]
            assert all(s.events == [] for s in every.sessions)
            assert (await service.list_sessions(app_name="none")).sessions == []

        run(body())

    def test_delete(self, service) -> None:
        async def body() -> None:
            for sid in ("s-1", "s-2"):
                await service.create_session(app_name=APP, user_id="u1", session_id=sid)
            await service.delete_session(app_name=APP, user_id="u2", session_id="s-1")  # not u2's
            await service.delete_session(app_name=APP, user_id="u1", session_id="s-1")
            await service.delete_session(app_name=APP, user_id="u1", session_id="missing")
            assert await service.get_session(app_name=APP, user_id="u1", session_id="s-1") is None
            listed = await service.list_sessions(app_name=APP, user_id="u1")
            assert [s.id for s in listed.sessions] == ["s-2"]

        run(body())

    def test_append_updates_the_session_object_and_the_store(self, service) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            event = said("user", "hello", actions=EventActions(state_delta={"k": "v"}))
            assert await service.append_event(session, event) is event
            assert session.events == [event] and session.state == {"k": "v"}
            assert session.last_update_time == event.timestamp
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == ["hello"] and got.state == {"k": "v"}
            assert got.last_update_time == session.last_update_time

        run(body())

    def test_the_update_time_is_the_last_events_timestamp(self, service) -> None:
        async def body() -> None:
            first = await service.create_session(app_name=APP, user_id="u1", session_id="s-1")
            second = await service.create_session(app_name=APP, user_id="u1",
                                                  session_id="s-2")
            early = first.last_update_time - 100  # an event stamped before both existed
            await service.append_event(second, said("user", "back-dated", timestamp=early))
            assert second.last_update_time == early
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s-2")
            assert got.last_update_time == early
            listed = await service.list_sessions(app_name=APP, user_id="u1")
            assert [(s.id, s.last_update_time) for s in listed.sessions] == [
                ("s-2", early), ("s-1", first.last_update_time)]
            await service.append_event(second, said("user", "next"))  # still current
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s-2")
            assert texts(got) == ["back-dated", "next"]

        run(body())

    def test_two_appends_to_one_session_object_at_once(self, service) -> None:
        # ADK's live mode does this: a background tool's answer is appended while the
        # live flow appends the user's content, both to invocation_context.session.
        async def body() -> None:
            await service.create_session(app_name=APP, user_id="u1", session_id="s")
            session = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            await asyncio.gather(
                service.append_event(session, said("user", "one")),
                service.append_event(session, said("weather", "two", actions=EventActions(
                    state_delta={"k": 2}))))
            assert sorted(texts(session)) == ["one", "two"] and session.state == {"k": 2}
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert sorted(texts(got)) == ["one", "two"] and got.state == {"k": 2}

        run(body())

    def test_a_session_id_is_unique_per_app_and_user(self, service) -> None:
        owners = ((APP, "u1"), (APP, "u2"), ("other", "u1"))

        async def get(app: str, user: str):
            return await service.get_session(app_name=app, user_id=user, session_id="s")

        async def body() -> None:
            for app, user in owners:
                made = await service.create_session(app_name=app, user_id=user,
                                                    session_id="s", state={"of": user})
                await service.append_event(made, said("user", f"{app}/{user}"))
            for app, user in owners:
                got = await get(app, user)
                assert (got.id, got.app_name, got.user_id) == ("s", app, user)
                assert got.state == {"of": user} and texts(got) == [f"{app}/{user}"]
            with pytest.raises(AlreadyExistsError):
                await service.create_session(app_name=APP, user_id="u2", session_id="s")
            listed = await service.list_sessions(app_name=APP)
            assert sorted((s.user_id, s.id) for s in listed.sessions) == [("u1", "s"),
                                                                           ("u2", "s")]
            await service.delete_session(app_name=APP, user_id="u2", session_id="s")
            assert await get(APP, "u2") is None
            assert texts(await get(APP, "u1")) == [f"{APP}/u1"]
            assert texts(await get("other", "u1")) == ["other/u1"]
            again = await service.create_session(app_name=APP, user_id="u2", session_id="s")
            assert again.events == [] and again.state == {}
            await service.append_event(again, said("user", "again"))
            assert texts(await get(APP, "u2")) == ["again"]
            assert texts(await get(APP, "u1")) == [f"{APP}/u1"]

        run(body())

    def test_partial_events_are_not_stored(self, service) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            chunk = said("weather", "Sun", partial=True,
                         actions=EventActions(state_delta={"k": 1}))
            assert await service.append_event(session, chunk) is chunk
            assert session.events == [] and session.state == {}
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert got.events == [] and got.state == {}

        run(body())

    def test_temp_keys_reach_the_session_object_only(self, service) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            event = said("weather", "ok", actions=EventActions(
                state_delta={"temp:scratch": 1, "k": 2}))
            await service.append_event(session, event)
            assert session.state == {"temp:scratch": 1, "k": 2}
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert got.state == {"k": 2}
            assert got.events[0].actions.state_delta == {"k": 2}

        run(body())

    def test_app_state_is_shared_by_the_app_user_state_by_the_user(self, service) -> None:
        async def body() -> None:
            for app, user, sid in ((APP, "u1", "a1"), (APP, "u1", "a2"), (APP, "u2", "b"),
                                   ("other", "u1", "o")):
                await service.create_session(app_name=app, user_id=user, session_id=sid)
            a1 = await service.get_session(app_name=APP, user_id="u1", session_id="a1")
            await service.append_event(a1, said("weather", "set", actions=EventActions(
                state_delta={"app:theme": "dark", "user:lang": "fr", "k": 1})))

            async def state(app: str, user: str, sid: str) -> dict:
                return (await service.get_session(app_name=app, user_id=user,
                                                  session_id=sid)).state

            assert await state(APP, "u1", "a1") == {"app:theme": "dark", "user:lang": "fr", "k": 1}
            assert await state(APP, "u1", "a2") == {"app:theme": "dark", "user:lang": "fr"}
            assert await state(APP, "u2", "b") == {"app:theme": "dark"}
            assert await state("other", "u1", "o") == {}
            listed = await service.list_sessions(app_name=APP)
            assert {s.id: s.state for s in listed.sessions} == {
                "a1": {"app:theme": "dark", "user:lang": "fr", "k": 1},
                "a2": {"app:theme": "dark", "user:lang": "fr"}, "b": {"app:theme": "dark"}}
            assert await service.get_user_state(app_name=APP, user_id="u1") == {"lang": "fr"}
            assert await service.get_user_state(app_name=APP, user_id="u2") == {}

        run(body())

    def test_events_round_trip(self, service) -> None:
        call = types.FunctionCall(id="c-1", name="get_weather", args={"city": "Paris"})
        answer = types.FunctionResponse(id="c-1", name="get_weather",
                                        response={"forecast": "sunny", "temp_c": 21.5})
        events = [
            said("user", "Weather in Paris? ünïcødé \U0001f326"),
            Event(invocation_id="inv-1", author="weather", content=types.Content(
                role="model", parts=[types.Part(text="Let me check."),
                                     types.Part(function_call=call)]),
                long_running_tool_ids={"c-1"},
                usage_metadata=types.GenerateContentResponseUsageMetadata(
                    prompt_token_count=12, candidates_token_count=5)),
            Event(invocation_id="inv-1", author="weather", content=types.Content(
                role="user", parts=[types.Part(function_response=answer)])),
            Event(invocation_id="inv-1", author="weather", branch="root.weather",
                  custom_metadata={"trace": {"span": 7}, "tags": ["a", "b"]},
                  actions=EventActions(state_delta={"last": "sunny", "n": 0.1 + 0.2},
                                       artifact_delta={"report.txt": 2},
                                       transfer_to_agent="planner", escalate=True,
                                       skip_summarization=True),
                  content=types.Content(role="model", parts=[types.Part(text="Sunny.")])),
            Event(invocation_id="inv-2", author="weather", error_code="RATE_LIMIT",
                  error_message="slow down", turn_complete=True),
        ]

        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            for event in events:
                await service.append_event(session, event)
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert [e.model_dump() for e in got.events] == [e.model_dump() for e in events]
            assert got.state == {"last": "sunny", "n": 0.1 + 0.2}

        run(body())

    def test_get_session_config(self, service) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s")
            base = session.last_update_time + 100
            for i in range(5):
                await service.append_event(session, said("user", f"m{i}", timestamp=base + i))

            async def get(**config: Any) -> list[str]:
                return texts(await service.get_session(
                    app_name=APP, user_id="u1", session_id="s",
                    config=GetSessionConfig(**config)))

            assert await get() == ["m0", "m1", "m2", "m3", "m4"]
            assert await get(num_recent_events=2) == ["m3", "m4"]
            assert await get(num_recent_events=0) == []
            assert await get(num_recent_events=50) == ["m0", "m1", "m2", "m3", "m4"]
            assert await get(after_timestamp=base + 3) == ["m3", "m4"]
            assert await get(after_timestamp=base + 2.5, num_recent_events=1) == ["m4"]
            with pytest.raises(ValueError):
                GetSessionConfig(num_recent_events=-1)

        run(body())


class PersistentContract(ServiceContract):
    """What a persistent service adds: a second instance sees it, stale objects are
    refused. ``open_service()`` opens another service on the same store."""

    def test_a_second_instance_reads_what_the_first_wrote(self, service, open_service) -> None:
        async def body() -> None:
            session = await service.create_session(app_name=APP, user_id="u1", session_id="s",
                                                   state={"user:lang": "fr"})
            await service.append_event(session, said("user", "hello"))
            got = await open_service().get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == ["hello"] and got.state == {"user:lang": "fr"}

        run(body())

    def test_a_stale_session_is_refused_and_nothing_written(self, service,
                                                            open_service) -> None:
        other = open_service()  # another process's service, in effect

        async def body() -> None:
            await service.create_session(app_name=APP, user_id="u1", session_id="s")
            mine = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            theirs = await other.get_session(app_name=APP, user_id="u1", session_id="s")
            await service.append_event(mine, said("user", "first"))
            late = said("user", "second", actions=EventActions(state_delta={"k": 1}))
            with pytest.raises(StaleSessionError) as caught:
                await other.append_event(theirs, late)
            assert isinstance(caught.value, ValueError)
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == ["first"] and got.state == {}

        run(body())

    def test_an_object_of_a_deleted_session_is_refused_once_the_id_is_made_again(
            self, service, open_service) -> None:
        other = open_service()

        async def body() -> None:
            old = await service.create_session(app_name=APP, user_id="u1", session_id="s",
                                               state={"plan": "old"})
            await service.append_event(old, said("user", "old-1"))
            await other.delete_session(app_name=APP, user_id="u1", session_id="s")
            new = await other.create_session(app_name=APP, user_id="u1", session_id="s",
                                             state={"plan": "new"})
            await other.append_event(new, said("user", "new-1"))  # as many as old had
            with pytest.raises(StaleSessionError):
                await service.append_event(old, said("user", "old-2", actions=EventActions(
                    state_delta={"plan": "the old object's"})))
            got = await service.get_session(app_name=APP, user_id="u1", session_id="s")
            assert texts(got) == ["new-1"] and got.state == {"plan": "new"}

        run(body())
