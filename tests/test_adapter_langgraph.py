"""sessiondb.adapters.langgraph: SessionDBSaver under real LangGraph graphs, sync and
async, across saver instances and processes, on SQLite, PostgreSQL and PgBouncer (#13).

Behaviour is checked against LangGraph's own in-memory saver where it can be: the same
graph run on both must show the same state and history.
"""

from __future__ import annotations

import asyncio
import operator
import subprocess
import sys
import threading
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.channels import DeltaChannel
from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.serde.types import INTERRUPT
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

from sessiondb import SessionDB
from sessiondb.adapters import langgraph_sql
from sessiondb.adapters.langgraph import SessionDBSaver
from sessiondb.bench.frameworks import run_case
from sessiondb.errors import (
    ClosedError, ConfigurationError, InvalidArgument, InvalidArgumentType,
)


class State(TypedDict):
    log: Annotated[list[str], operator.add]
    turns: int


def _graph(saver: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("plan", lambda s: {"log": ["plan"], "turns": s.get("turns", 0) + 1})
    builder.add_node("act", lambda s: {"log": [f"act {s['turns']}"]})
    builder.add_edge(START, "plan")
    builder.add_edge("plan", "act")
    builder.add_edge("act", END)
    return builder.compile(checkpointer=saver)


def _ask(state: State) -> dict[str, Any]:
    answer = interrupt("who is asking?")
    return {"log": [f"hello {answer}"]}


def _asking_graph(saver: Any) -> Any:
    builder = StateGraph(State)
    builder.add_node("ask", _ask)
    builder.add_edge(START, "ask")
    builder.add_edge("ask", END)
    return builder.compile(checkpointer=saver)


def _cfg(thread: str, **more: Any) -> dict[str, Any]:
    return {"configurable": {"thread_id": thread, **more}}


def _history(graph: Any, thread: str) -> list[tuple]:
    """A thread's history without its ids: what two savers must agree on."""
    return [(s.metadata["step"], s.metadata["source"], s.values, s.next)
            for s in graph.get_state_history(_cfg(thread))]


def _rows(db: SessionDB, thread: str) -> list[int]:
    return [db._read(lambda c: c.execute(f"SELECT count(*) FROM {t} WHERE thread_id = ?",
                                         (thread,)).fetchone()[0])
            for t in ("langgraph_checkpoints", "langgraph_blobs", "langgraph_writes")]


def _put(saver: SessionDBSaver, thread: str, n: int, ns: str = "", **meta: Any) -> list[dict]:
    """``n`` checkpoints of a chain, each changing one channel; their configs."""
    config: dict[str, Any] = _cfg(thread, checkpoint_ns=ns)
    versions: dict[str, Any] = {}
    stored = []
    for i in range(n):
        cp = empty_checkpoint()
        versions["count"] = saver.get_next_version(versions.get("count"), None)
        cp.update(id=str(uuid6(clock_seq=i)), channel_versions=dict(versions),
                  channel_values={"count": i})
        config = saver.put(config, cp, {"source": "loop", "step": i, **meta},
                           {"count": versions["count"]})
        stored.append(config)
    return stored


# -- graphs ---------------------------------------------------------------------------

def test_a_graph_resumes_its_thread_in_another_saver(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        first = _graph(saver).invoke({"log": ["hi"], "turns": 0}, _cfg("t-1"))
    assert first == {"log": ["hi", "plan", "act 1"], "turns": 1}
    with SessionDBSaver(db_path) as saver:  # as another process would
        graph = _graph(saver)
        again = graph.invoke({"log": ["again"]}, _cfg("t-1"))
        assert again == {"log": ["hi", "plan", "act 1", "again", "plan", "act 2"], "turns": 2}
        assert graph.get_state(_cfg("t-1")).values == again
        session = saver.db.get_session("t-1")
    assert (session["source"], session["message_count"]) == ("langgraph", 0)


def test_history_matches_langgraphs_in_memory_saver(db_path) -> None:
    memory = _graph(InMemorySaver())
    with SessionDBSaver(db_path) as saver:
        graph = _graph(saver)
        for g in (memory, graph):
            g.invoke({"log": ["a"], "turns": 0}, _cfg("h"))
            g.invoke({"log": ["b"]}, _cfg("h"))
            g.update_state(_cfg("h"), {"log": ["edited"]})
        ours = _history(graph, "h")
        assert ours == _history(memory, "h") and len(ours) == 9
        history = list(graph.get_state_history(_cfg("h")))
        for newer, older in zip(history, history[1:]):
            assert newer.parent_config["configurable"]["checkpoint_id"] == \
                older.config["configurable"]["checkpoint_id"]
        limited = list(graph.get_state_history(_cfg("h"), limit=2, before=history[3].config))
        assert [s.config for s in limited] == [s.config for s in history[4:6]]


def test_an_interrupt_is_resumed_by_another_saver(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        paused = _asking_graph(saver).invoke({"log": [], "turns": 0}, _cfg("ask"))
        assert paused["__interrupt__"][0].value == "who is asking?"
        assert _asking_graph(saver).get_state(_cfg("ask")).next == ("ask",)
    with SessionDBSaver(db_path) as saver:
        done = _asking_graph(saver).invoke(Command(resume="Ada"), _cfg("ask"))
    assert done == {"log": ["hello Ada"], "turns": 0}


def test_async_graph_and_the_coroutines(db_path) -> None:
    async def main() -> None:
        async with SessionDBSaver(db_path) as saver:
            graph = _graph(saver)
            await graph.ainvoke({"log": ["x"], "turns": 0}, _cfg("async"))
            out = await graph.ainvoke({"log": ["y"]}, _cfg("async"))
            assert out["turns"] == 2
            history = [s async for s in graph.aget_state_history(_cfg("async"))]
            assert len(history) == 8
            assert (await saver.aget_tuple(_cfg("async"))).checkpoint["id"] == \
                history[0].config["configurable"]["checkpoint_id"]
            await saver.acopy_thread("async", "async-copy")
            await saver.aprune(["async"], strategy="keep_latest")
            assert [t async for t in saver.alist(_cfg("async"))] == \
                [await saver.aget_tuple(_cfg("async"))]
            await saver.adelete_thread("async")
            assert (await graph.aget_state(_cfg("async"))).values == {}
            copied = await graph.aget_state(_cfg("async-copy"))
            assert copied.values == out
        with pytest.raises(ClosedError):
            await saver.aget_tuple(_cfg("async-copy"))

    asyncio.run(main())


def test_the_loop_runs_while_a_put_waits_for_the_thread(db_path) -> None:
    """A writer of another instance holds the thread's lock (SQLite: the write lock;
    PostgreSQL: the session's lock); the loop must go on meanwhile."""
    held, loop_ran = threading.Event(), threading.Event()
    with SessionDBSaver(db_path) as saver, SessionDB(db_path) as other:
        _put(saver, "busy", 1)

        def hold() -> None:
            with other.transaction():
                other.append_message("busy", "user", "holding the thread")
                held.set()
                loop_ran.wait(30)

        holder = threading.Thread(target=hold)
        holder.start()
        assert held.wait(30)

        async def main() -> None:
            cp = empty_checkpoint()
            put = asyncio.ensure_future(saver.aput(_cfg("busy", checkpoint_ns=""), cp, {}, {}))
            written = asyncio.ensure_future(saver.aput_writes(
                _cfg("busy", checkpoint_id=cp["id"]), [("ch", 1)], "t"))
            await asyncio.sleep(0)
            assert not put.done() and not written.done()
            loop_ran.set()  # only a running loop gets here
            await asyncio.wait_for(asyncio.gather(put, written), 30)
            assert len((await saver.aget_tuple(put.result())).pending_writes) == 1

        asyncio.run(main())
        holder.join()
    assert loop_ran.is_set()


def test_subgraph_checkpoints_live_in_their_namespace(db_path) -> None:
    inner = StateGraph(State)
    inner.add_node("inner", lambda s: {"log": ["inner"]})
    inner.add_edge(START, "inner")
    outer = StateGraph(State)
    outer.add_node("sub", inner.compile())
    outer.add_edge(START, "sub")
    with SessionDBSaver(db_path) as saver:
        graph = outer.compile(checkpointer=saver)
        assert graph.invoke({"log": [], "turns": 0}, _cfg("nested"))["log"] == ["inner"]
        everything = list(saver.list(_cfg("nested")))  # no namespace: all of them
        spaces = {t.config["configurable"]["checkpoint_ns"] for t in everything}
        assert "" in spaces and any(ns.startswith("sub:") for ns in spaces)
        assert [t.checkpoint["id"] for t in everything] == \
            sorted((t.checkpoint["id"] for t in everything), reverse=True)
        saver.delete_thread("nested")
        assert list(saver.list(_cfg("nested"))) == []
        assert _rows(saver.db, "nested") == [0, 0, 0]


def _extend(state: list, writes: list) -> list:
    return state + [x for w in writes for x in w]


class Items(TypedDict):
    items: Annotated[list, DeltaChannel(_extend, snapshot_frequency=5)]


def test_prune_keeps_what_delta_channels_are_rebuilt_from(db_path) -> None:
    builder = StateGraph(Items)
    builder.add_node("a", lambda s: {"items": [f"a{len(s['items'])}"]})
    builder.add_edge(START, "a")
    with SessionDBSaver(db_path) as saver:
        graph = builder.compile(checkpointer=saver)
        for i in range(6):  # 12 updates: the last snapshot was at 10, two since
            graph.invoke({"items": [f"in{i}"]}, _cfg("delta"))
        before = graph.get_state(_cfg("delta")).values
        assert saver.get_tuple(_cfg("delta")).metadata["counters_since_delta_snapshot"]
        saver.prune(["delta"])
        kept = list(saver.list(_cfg("delta")))
        assert 1 < len(kept) < 10
        assert graph.get_state(_cfg("delta")).values == before and len(before["items"]) == 12


# -- the thread as a session ----------------------------------------------------------

def test_deleting_or_pruning_the_session_removes_its_checkpoints(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        graph = _graph(saver)
        for thread in ("gone", "pruned", "kept"):
            graph.invoke({"log": [], "turns": 0}, _cfg(thread))
        assert all(_rows(saver.db, "gone"))
        assert saver.db.delete_session("gone")
        assert saver.get_tuple(_cfg("gone")) is None and _rows(saver.db, "gone") == [0, 0, 0]
        saver.db.end_session("pruned", "done")
        assert saver.db.prune_sessions(older_than_days=0) == 1
        assert _rows(saver.db, "pruned") == [0, 0, 0]
        assert graph.get_state(_cfg("kept")).values["turns"] == 1


def test_delete_thread_keeps_a_session_that_holds_more(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        _put(saver, "mine", 2)
        saver.db.create_session("shared", "cli", title="Notes")
        saver.db.append_message("shared", "user", "kept")
        _put(saver, "shared", 2)
        for thread in ("mine", "shared", "never-written"):
            saver.delete_thread(thread)
        assert saver.db.get_session("mine") is None
        assert saver.db.get_messages("shared")[0]["content"] == "kept"
        assert _rows(saver.db, "shared") == [0, 0, 0]


def test_copy_thread_forks_a_conversation(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        graph = _graph(saver)
        graph.invoke({"log": ["start"], "turns": 0}, _cfg("source"))
        saver.copy_thread("source", "fork")
        saver.copy_thread("nothing-here", "empty")
        assert saver.db.get_session("empty") is None
        graph.invoke({"log": ["fork"]}, _cfg("fork"))
        assert graph.get_state(_cfg("source")).values["turns"] == 1
        assert graph.get_state(_cfg("fork")).values["log"] == [
            "start", "plan", "act 1", "fork", "plan", "act 2"]
        assert saver.db.get_session("fork")["source"] == "langgraph"


# -- the saver's own rules ------------------------------------------------------------

def test_list_pages_filters_and_namespaces(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        stored = _put(saver, "long", 120, parity="odd")
        _put(saver, "long", 3, ns="child:1")
        ids = [c["configurable"]["checkpoint_id"] for c in stored]
        root = _cfg("long", checkpoint_ns="")
        assert [t.checkpoint["id"] for t in saver.list(root)] == ids[::-1]
        assert len(list(saver.list(_cfg("long")))) == 123
        assert [t.metadata["step"] for t in saver.list(root, filter={"step": 7})] == [7]
        assert len(list(saver.list(root, filter={"parity": "odd"}, limit=70))) == 70
        assert [t.checkpoint["id"] for t in saver.list(
            root, before={"configurable": {"checkpoint_id": ids[60]}}, limit=55)] == \
            ids[59:4:-1]
        assert list(saver.list(root, limit=0)) == []
        assert len(list(saver.list(None, filter={"parity": "odd"}))) == 120


def test_special_writes_replace_ordinary_ones_keep_the_first(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        config = _put(saver, "w", 1)[0]
        saver.put_writes(config, [("ch", "first")], "task", task_path="b")
        saver.put_writes(config, [("ch", "second")], "task", task_path="b")
        saver.put_writes(config, [(INTERRUPT, "ask once")], "task", task_path="b")
        saver.put_writes(config, [(INTERRUPT, "ask again")], "task", task_path="b")
        saver.put_writes(config, [("ch", "earlier path")], "other", task_path="a")
        assert saver.get_tuple(config).pending_writes == [
            ("other", "ch", "earlier path"), ("task", INTERRUPT, "ask again"),
            ("task", "ch", "first")]


def test_bad_inputs_raise_typed_errors_and_write_nothing(db_path) -> None:
    with SessionDBSaver(db_path) as saver:
        cp = empty_checkpoint()
        with pytest.raises(InvalidArgument, match="thread_id"):
            saver.put({"configurable": {}}, cp, {}, {})
        with pytest.raises(ValueError):
            saver.get_tuple({"configurable": {"checkpoint_ns": ""}})
        with pytest.raises(InvalidArgumentType):
            saver.put("t", cp, {}, {})
        with pytest.raises(InvalidArgumentType):
            saver.get_tuple({"configurable": {"thread_id": ["t"]}})
        with pytest.raises(InvalidArgumentType, match="JSON"):
            saver.put(_cfg("bad", checkpoint_ns=""), cp, {"when": object()}, {})
        with pytest.raises(InvalidArgument, match="checkpoint_id"):
            saver.put_writes(_cfg("bad", checkpoint_ns=""), [("ch", 1)], "task")
        with pytest.raises(InvalidArgumentType):
            saver.put_writes(_cfg("bad", checkpoint_id="x"), ["not a pair"], "task")
        with pytest.raises(InvalidArgument):
            saver.prune(["bad"], strategy="everything")
        with pytest.raises(InvalidArgumentType):
            saver.prune("bad")
        with pytest.raises(InvalidArgument):
            saver.list(None, limit=-1)
        assert saver.db.get_session("bad") is None and _rows(saver.db, "bad") == [0, 0, 0]
        assert saver.put(_cfg(7, checkpoint_ns=""), cp, {}, {})["configurable"][
            "thread_id"] == "7"


def test_an_open_store_stays_the_callers(db_path) -> None:
    with SessionDB(db_path) as db:
        with SessionDBSaver(db, source="agents") as saver:
            _put(saver, "t", 1)
        assert db.get_session("t")["source"] == "agents"  # still open
        with pytest.raises(ClosedError):  # but the saver is not
            saver.get_tuple(_cfg("t"))
        with pytest.raises(ConfigurationError):
            SessionDBSaver(db, write_timeout=5)
    with pytest.raises(InvalidArgumentType):
        SessionDBSaver(42)
    with SessionDBSaver.from_conn_string(str(db_path), write_timeout=5) as saver:
        assert saver.get_tuple(_cfg("t")).checkpoint["channel_values"] == {"count": 0}


def test_lookups_use_the_primary_keys(db_path, backend) -> None:
    """The statements ``get_tuple`` and ``list`` run read index ranges, never the thread
    (SQLite's plan; PostgreSQL's once it has statistics of a thread of 600 checkpoints)."""
    if backend == "pgbouncer":
        pytest.skip("the plans are the server's: the postgresql run checks them")
    with SessionDBSaver(db_path) as saver:
        stored = _put(saver, "big", 600)
        for config in stored:
            saver.put_writes(config, [("count", 1), ("other", 2)], "task")
        db, name = saver.db, saver.db.backend
        mid = stored[300]["configurable"]["checkpoint_id"]
        statements = [
            langgraph_sql.page_sql(thread_id="big", ns="", checkpoint_id=None, before=mid,
                                   after=None, size=50),
            (langgraph_sql.BLOBS[name], ['[["count", "x"]]', "big", ""]),
            (langgraph_sql.WRITES_BETWEEN, ["big", "", mid, mid]),
        ]
        if name == "postgresql":
            db._execute_write(lambda c: c.execute(
                "ANALYZE langgraph_checkpoints; ANALYZE langgraph_blobs; "
                "ANALYZE langgraph_writes"))
        explain = "EXPLAIN QUERY PLAN " if name == "sqlite" else "EXPLAIN "
        for sql, args in statements:
            plan = " ".join(str(r[-1]) for r in db._read(
                lambda c: c.execute(explain + sql, args).fetchall()))
            assert "SCAN langgraph" not in plan and "Seq Scan" not in plan, (sql, plan)
            assert "Hash" not in plan and ("SEARCH" in plan or "Index" in plan), (sql, plan)


def test_importing_the_tables_does_not_import_langgraph() -> None:
    code = ("import sys, sessiondb, sessiondb.adapters.langgraph_sql; "
            "assert not [m for m in sys.modules if m.startswith('langgraph')]")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- processes ------------------------------------------------------------------------

def test_eight_processes_checkpoint_one_thread(db_path, backend) -> None:
    """The frameworks benchmark's LangGraph case: every acknowledged checkpoint present
    once, each writer's listed in its order with its parent chain intact."""
    row = run_case("fw_langgraph", "sessiondb" if backend == "sqlite" else "sessiondb-pg",
                   str(db_path), writers=8, count=15, timeout=240)
    assert row["error_samples"] == []
    assert (row["errors"], row["lost"], row["duplicated"], row["out_of_order"]) == (0, 0, 0, 0)
    assert row["acknowledged"] == row["present"] == 8 * 15
