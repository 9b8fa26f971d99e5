"""sessiondb.adapters.worker: the store and threads behind the adapters' calls.

The loop's default executor stays free while calls wait behind another process's write
lock; an owned store opens at the first call, off the loop; an ``AsyncSessionDB`` runs
the calls on its own thread; a closed worker refuses calls, after letting the calls
already made complete; a cancelled write completes before the cancellation is raised;
a forked child gets threads of its own. Then the same promises through the adapters
that use it (OpenAI Agents SDK, LangGraph)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import apsw
import pytest

from sessiondb import AsyncSessionDB, ClosedError, ConfigurationError, SessionDB
from sessiondb.adapters import worker as worker_module
from sessiondb.adapters.worker import Worker, settled
from sessiondb.errors import InvalidArgumentType

CALLS = 12  # more than the 4 threads the tests give the loop's default executor
HOLD = 5.0  # seconds a lock is held at most, if the test does not let it go first


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def new_store(path: Path) -> Path:
    SessionDB(path).close()
    return path


class Held:
    """A lock another process holds: until ``release`` is set, or ``HOLD`` seconds at
    most; ``released`` is set as it lets go."""

    def __init__(self) -> None:
        self.release, self.released = threading.Event(), threading.Event()
        self.held = threading.Event()

    def wait(self) -> None:
        self.held.set()
        self.release.wait(HOLD)
        self.released.set()


@contextmanager
def holding(hold: Callable[[Held], None]) -> Iterator[Held]:
    lock = Held()
    thread = threading.Thread(target=hold, args=(lock,))
    thread.start()
    try:
        assert lock.held.wait(30)
        yield lock
    finally:
        lock.release.set()
        thread.join()


def sqlite_write_lock(path: Path) -> Any:
    """Another connection (as another process would) holds the store's write lock:
    ``BEGIN IMMEDIATE``."""
    def hold(lock: Held) -> None:
        conn = apsw.Connection(str(path))
        conn.execute("BEGIN IMMEDIATE")
        lock.wait()
        conn.execute("COMMIT")
        conn.close()

    return holding(hold)


def session_lock(url: str, session_id: str) -> Any:
    """Another store holds a write of ``session_id`` open (its lock, on PostgreSQL)."""
    def hold(lock: Held) -> None:
        with SessionDB(url) as other:
            other.create_session(session_id, "holder")
            with other.transaction():
                other.append_message(session_id, "user", "held")
                lock.wait()

    return holding(hold)


async def executor_free_while_calls_wait(calls: Callable[[], list[Any]],
                                         lock: Held) -> None:
    """Start the calls (each waits for ``lock``), then run a trivial function on the
    loop's default executor (4 threads): it must run while the lock is held and every
    call still waits, not after the lock is let go."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(4))
    tasks = [asyncio.ensure_future(c) for c in calls()]
    for _ in range(5):
        await asyncio.sleep(0.05)  # the calls are handed to their threads and start
    ran_while_held = await asyncio.wait_for(
        loop.run_in_executor(None, lambda: not lock.released.is_set()), 60)
    waiting = sum(not t.done() for t in tasks)
    lock.release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert ran_while_held and waiting == len(tasks)
    assert [r for r in results if isinstance(r, BaseException)] == []


def append(db: SessionDB, session_id: str, text: str) -> int:
    db.create_session(session_id, "test")
    return db.append_message(session_id, "user", text)


# -- the worker ---------------------------------------------------------------------------

def test_the_default_executor_stays_free_while_calls_wait_for_the_write_lock(
        tmp_path: Path) -> None:
    path = new_store(tmp_path / "state.db")
    worker = Worker(path, {"write_timeout": 60}, name="Test")
    with sqlite_write_lock(path) as lock:
        run(executor_free_while_calls_wait(
            lambda: [worker.write(append, f"s-{n}", "x") for n in range(CALLS)], lock))
    worker.close()
    with SessionDB(path) as db:
        assert len(db.list_sessions()) == CALLS


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore::sessiondb.PoolWarning")  # 8 of 8 in use: expected
def test_the_default_executor_stays_free_on_postgresql(pg_url: str) -> None:
    with SessionDB(pg_url) as db:
        worker = Worker(db, {}, name="Test")
        assert worker._threads() == 8  # the pool's size: 8 calls wait, 4 queue
        with session_lock(pg_url, "busy") as lock:
            run(executor_free_while_calls_wait(
                lambda: [worker.write(append, "busy", "x") for _ in range(CALLS)], lock))
        worker.close()
        assert db.get_session("busy")["message_count"] == CALLS + 1
    owned = Worker(pg_url, {"pool_size": 3}, name="Test")
    assert owned._threads() == 3
    assert run(owned.run(lambda db: db.backend)) == "postgresql"
    owned.close()


@pytest.fixture
def opened_on(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the threads the workers open their stores on, in order."""
    names: list[str] = []

    class Recorded(SessionDB):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            names.append(threading.current_thread().name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(worker_module, "SessionDB", Recorded)
    return names


def test_an_owned_store_opens_at_the_first_call_off_the_loop(
        tmp_path: Path, opened_on: list[str]) -> None:
    path = tmp_path / "state.db"
    prepared: list[SessionDB] = []

    async def main() -> str:
        worker = Worker(path, {"write_timeout": 20}, name="Test", prepare=prepared.append)
        assert not path.exists() and opened_on == []  # constructing does no I/O
        try:
            await asyncio.gather(*(worker.run(append, f"s-{n}", "x") for n in range(3)))
            return await worker.run(lambda db: threading.current_thread().name)
        finally:
            await worker.aclose()

    thread = run(main())
    assert thread.startswith("sessiondb-Test") and opened_on == [thread]  # once
    assert len(prepared) == 4 and len(set(map(id, prepared))) == 1  # before each call
    assert threading.current_thread().name not in opened_on


def test_sync_calls_run_on_the_calling_thread(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    worker = Worker(str(path), {}, name="Test")
    assert not path.exists()
    assert worker.call(lambda db, a, b: (threading.get_ident(), a + b), 1, 2) == (
        threading.get_ident(), 3)
    assert isinstance(worker.store(), SessionDB) and worker.owned
    worker.close()
    with pytest.raises(ClosedError):
        worker.call(append, "s", "x")
    with pytest.raises(ClosedError):
        worker.store()


def test_bad_stores_and_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentType):
        Worker(42, {}, name="Test")  # type: ignore[arg-type]
    with SessionDB(tmp_path / "state.db") as db:
        with pytest.raises(ConfigurationError, match="write_timeout"):
            Worker(db, {"write_timeout": 5}, name="Test")
        with pytest.raises(ConfigurationError):
            Worker(AsyncSessionDB(tmp_path / "state.db"), {"pool_size": 2}, name="Test")


def test_close_refuses_calls_after_the_calls_already_made_complete(tmp_path: Path) -> None:
    path = new_store(tmp_path / "state.db")

    async def main(release: threading.Event) -> None:
        worker = Worker(path, {"write_timeout": 60}, name="Test")
        pending = asyncio.ensure_future(worker.write(append, "s", "made before close"))
        await asyncio.sleep(0.1)
        closing = asyncio.ensure_future(worker.aclose())
        await asyncio.sleep(0.1)
        assert not closing.done() and not pending.done()  # the loop runs meanwhile
        with pytest.raises(ClosedError):
            await worker.run(append, "s", "made after close")
        release.set()
        assert await pending == 1
        await closing
        await worker.aclose()  # idempotent
        assert worker.closed and worker._db is None

    with sqlite_write_lock(path) as lock:
        run(main(lock.release))
    with SessionDB(path) as db:
        assert [m["content"] for m in db.get_messages("s")] == ["made before close"]


def test_a_shared_store_stays_open_and_the_worker_refuses_calls(tmp_path: Path) -> None:
    with SessionDB(tmp_path / "state.db") as db:
        worker = Worker(db, {}, name="Test")
        assert run(worker.run(append, "s", "x")) == 1 and not worker.owned
        worker.close()
        with pytest.raises(ClosedError):
            run(worker.run(append, "s", "y"))
        with pytest.raises(ClosedError):
            worker.call(append, "s", "y")
        assert db.get_session("s")["message_count"] == 1  # the store is open


def test_a_cancelled_write_completes_before_the_cancellation_is_raised(
        tmp_path: Path) -> None:
    path = new_store(tmp_path / "state.db")
    worker = Worker(path, {"write_timeout": 60}, name="Test")

    async def main(release: threading.Event) -> None:
        write = asyncio.ensure_future(worker.write(append, "s", "cancelled"))
        queued = asyncio.ensure_future(worker.write(append, "s", "cancelled too"))
        read = asyncio.ensure_future(worker.run(lambda db: db.get_messages("s")))
        await asyncio.sleep(0.2)
        for task in (write, queued, read):
            task.cancel()
        await asyncio.sleep(0.1)
        assert read.cancelled()  # a read is skipped (it had not started)
        assert not write.done() and not queued.done()  # waiting for their outcome
        release.set()
        for task in (write, queued):
            with pytest.raises(asyncio.CancelledError):
                await task

    with sqlite_write_lock(path) as lock:
        run(main(lock.release))
    assert [m["content"] for m in worker.call(lambda db: db.get_messages("s"))] == [
        "cancelled", "cancelled too"]
    worker.close()


def test_settled_raises_the_calls_error_when_not_cancelled() -> None:
    async def fails() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        run(settled(fails()))


def test_an_async_store_runs_the_calls_on_its_thread(tmp_path: Path) -> None:
    prepared: list[SessionDB] = []

    async def main() -> None:
        async with AsyncSessionDB(tmp_path / "state.db") as adb:
            worker = Worker(adb, {}, name="Test", prepare=prepared.append)
            assert worker.store() is adb
            names = await asyncio.gather(*(worker.run(lambda db: (
                append(db, "s", "x"), threading.current_thread().name)[1])
                for _ in range(3)))
            assert {n.split("-")[1] for n in names} == {"aio"}
            sync = await asyncio.to_thread(worker.call, lambda db, n: (
                threading.current_thread().name, n), 7)
            assert sync == (names[0], 7)  # on the AsyncSessionDB's thread, waited for
            worker.close()
            with pytest.raises(ClosedError):
                await worker.run(append, "s", "y")
            assert (await adb.get_session("s"))["message_count"] == 3  # still open
        assert len(prepared) == 4

    run(main())


def test_a_forked_child_gets_threads_of_its_own(tmp_path: Path) -> None:
    path = new_store(tmp_path / "state.db")
    worker = Worker(path, {}, name="Test")
    assert run(worker.run(append, "s", "parent")) == 1  # the parent's thread exists
    pid = os.fork()
    if pid == 0:  # the child: the parent's pool would never run the call
        code = 1
        try:
            run(asyncio.wait_for(worker.write(append, "s", "child"), 60))
            worker.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert run(worker.run(append, "s", "parent again")) == 3  # the parent's still work
    assert [m["content"] for m in worker.call(lambda db: db.get_messages("s"))] == [
        "parent", "child", "parent again"]
    worker.close()


# -- through the adapters ---------------------------------------------------------------

def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def checkpoint_args(saver: Any, thread: str, n: int = 0) -> tuple:
    """The arguments of ``put`` for a checkpoint of ``thread`` in the root namespace."""
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    cp = empty_checkpoint()
    version = saver.get_next_version(None, None)
    cp.update(id=str(uuid6(clock_seq=n)), channel_versions={"count": version},
              channel_values={"count": n})
    return ({"configurable": {"thread_id": thread, "checkpoint_ns": ""}}, cp,
            {"source": "loop", "step": n}, {"count": version})


def openai_session(db: Any, session_id: str, **options: Any) -> Any:
    from sessiondb.adapters.openai_agents import SessionDBSession

    return SessionDBSession(session_id, db, **options)


def saver(db: Any, **options: Any) -> Any:
    from sessiondb.adapters.langgraph import SessionDBSaver

    return SessionDBSaver(db, **options)


def test_the_adapters_leave_the_default_executor_free(tmp_path: Path) -> None:
    path = new_store(tmp_path / "state.db")
    with SessionDB(path, write_timeout=60) as db:
        sessions = [openai_session(db, f"c{n}") for n in range(CALLS)]
        with sqlite_write_lock(path) as lock:  # sessions sharing a SessionDB
            run(executor_free_while_calls_wait(
                lambda: [s.add_items([user("hi")]) for s in sessions], lock))
        assert len(db.list_sessions(source="openai-agents")) == CALLS
    owned = saver(str(path), write_timeout=60)
    with sqlite_write_lock(path) as lock:  # a saver opening its store, on its thread
        run(executor_free_while_calls_wait(
            lambda: [owned.aput(*checkpoint_args(owned, f"t{n}")) for n in range(CALLS)],
            lock))
    assert len(list(owned.list(None))) == CALLS
    owned.close()


@pytest.mark.postgres
@pytest.mark.filterwarnings("ignore::sessiondb.PoolWarning")  # 8 of 8 in use: expected
def test_the_adapters_leave_the_default_executor_free_on_postgresql(pg_url: str) -> None:
    session = openai_session(pg_url, "busy")
    with session_lock(pg_url, "busy") as lock:
        run(executor_free_while_calls_wait(
            lambda: [session.add_items([user(f"m{n}")]) for n in range(CALLS)], lock))
    assert len(run(session.get_items())) == CALLS + 1
    session.close()
    with SessionDB(pg_url) as db:
        shared = saver(db)
        with session_lock(pg_url, "thread") as lock:
            run(executor_free_while_calls_wait(
                lambda: [shared.aput(*checkpoint_args(shared, "thread", n))
                         for n in range(CALLS)], lock))
        assert len(list(shared.list({"configurable": {"thread_id": "thread"}}))) == CALLS
        shared.close()


def test_the_adapters_open_their_store_at_the_first_call_off_the_loop(
        tmp_path: Path, opened_on: list[str]) -> None:
    a, b = tmp_path / "a.db", tmp_path / "b.db"

    async def main() -> None:
        session = openai_session(a, "c")
        async with saver(b) as checkpointer:  # made on the loop: no I/O there
            assert not a.exists() and not b.exists() and opened_on == []
            await session.add_items([user("hi")])
            args = checkpoint_args(checkpointer, "t")
            assert (await checkpointer.aput(*args))["configurable"]["thread_id"] == "t"
            assert (await checkpointer.aget_tuple(args[0])).checkpoint["id"] == \
                args[1]["id"]
        session.close()

    run(main())
    assert [name.split("_")[0] for name in opened_on] == [
        "sessiondb-SessionDBSession", "sessiondb-SessionDBSaver"]
    sync = saver(tmp_path / "c.db")  # sync use: opened on the caller's thread
    assert not (tmp_path / "c.db").exists()
    args = checkpoint_args(sync, "t")
    sync.put(*args)
    assert sync.get_tuple(args[0]).checkpoint["id"] == args[1]["id"]
    assert opened_on[-1] == threading.current_thread().name
    sync.close()


def test_the_adapters_accept_an_async_store(tmp_path: Path) -> None:
    from typing import TypedDict

    from langgraph.graph import START, StateGraph

    class State(TypedDict):
        turns: int

    builder = StateGraph(State)
    builder.add_node("agent", lambda state: {"turns": state["turns"] + 1})
    builder.add_edge(START, "agent")
    config = {"configurable": {"thread_id": "t-1"}}

    async def main() -> None:
        async with AsyncSessionDB(tmp_path / "state.db") as adb:
            session = openai_session(adb, "c")
            async with saver(adb) as checkpointer:
                assert checkpointer.db is adb
                graph = builder.compile(checkpointer=checkpointer)
                await asyncio.gather(session.add_items([user("hi")]),
                                     graph.ainvoke({"turns": 0}, config))
                assert (await graph.ainvoke(None, config)) == {"turns": 1}
                # The sync API, from another thread, waits for its turn on adb's thread.
                latest = await asyncio.to_thread(checkpointer.get_tuple, config)
                assert latest.checkpoint["channel_values"] == {"turns": 1}
                assert await session.get_items() == [user("hi")]
            session.close()
            for call in (session.get_items(), checkpointer.aget_tuple(config)):
                with pytest.raises(ClosedError):
                    await call
            with pytest.raises(ClosedError):
                checkpointer.get_tuple(config)
            assert [s["id"] for s in await adb.list_sessions(source="langgraph")] == ["t-1"]

    run(main())


def test_closed_adapters_refuse_calls_on_owned_and_shared_stores(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with SessionDB(path) as db:
        for store in (db, path):
            session, checkpointer = openai_session(store, "c"), saver(store)
            run(session.add_items([user("x")]))
            args = checkpoint_args(checkpointer, "t")
            checkpointer.put(*args)
            session.close()
            checkpointer.close()
            for call in (lambda: run(session.add_items([])), lambda: run(session.pop_item()),
                         lambda: checkpointer.get_tuple(args[0]),
                         lambda: run(checkpointer.aput(*args)), lambda: checkpointer.db):
                with pytest.raises(ClosedError):
                    call()
        assert db.get_session("c")["message_count"] == 2  # the shared one is open


def test_a_cancelled_checkpoint_is_written_before_the_cancellation_is_raised(
        tmp_path: Path) -> None:
    path = new_store(tmp_path / "state.db")
    checkpointer = saver(path, write_timeout=60)
    args = checkpoint_args(checkpointer, "t")

    async def main(release: threading.Event) -> None:
        put = asyncio.ensure_future(checkpointer.aput(*args))
        await asyncio.sleep(0.2)
        put.cancel()
        await asyncio.sleep(0.1)
        assert not put.done()  # waiting for the write's outcome
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await put

    with sqlite_write_lock(path) as lock:
        run(main(lock.release))
    assert checkpointer.get_tuple(args[0]).checkpoint["id"] == args[1]["id"]
    checkpointer.close()


def test_a_forked_child_checkpoints_on_threads_of_its_own(tmp_path: Path) -> None:
    checkpointer = saver(tmp_path / "state.db")
    first = checkpoint_args(checkpointer, "t", 0)
    run(checkpointer.aput(*first))  # the parent's thread exists
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run(asyncio.wait_for(checkpointer.aput(*checkpoint_args(checkpointer, "t", 1)),
                                 60))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    run(checkpointer.aput(*checkpoint_args(checkpointer, "t", 2)))
    assert [t.metadata["step"] for t in checkpointer.list(first[0])] == [2, 1, 0]
    checkpointer.close()
