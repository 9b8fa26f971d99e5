"""AsyncSessionDB (#5): the same API as coroutines, run in order on one worker thread,
with the event loop never waiting on SQLite. Real files, a real foreign process holding
the write lock; tick counts, never wall-clock bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import multiprocessing
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest

import workers
from sessiondb.aio import AsyncHeartbeat
from sessiondb import (
    AsyncSessionDB, Claim, ClaimLost, ClosedError, ConfigurationError, DatabaseOpenError,
    Deadline, Heartbeat, IntegrityViolation, InvalidArgument, InvalidArgumentType, Lease,
    LeaseHeld, LeaseLost, SessionDB, SessionNotFound, StaleRevision, TitleConflict,
)

SPAWN = multiprocessing.get_context("spawn")


def public_methods() -> set[str]:
    return {n for n in dir(SessionDB) if not n.startswith("_")
            and inspect.isfunction(inspect.getattr_static(SessionDB, n))}


def test_every_public_method_has_an_awaitable_twin_with_its_signature_and_doc(db_path):
    wrapped = public_methods() - NOT_WRAPPED - {"heartbeat"}
    assert len(wrapped) >= 30
    for name in wrapped:
        method = getattr(AsyncSessionDB, name)
        assert method.__doc__ == getattr(SessionDB, name).__doc__, name
        assert inspect.signature(method) == inspect.signature(getattr(SessionDB, name)), name

    async def main() -> None:  # each returns a coroutine, queued at the call
        async with AsyncSessionDB(db_path) as adb:
            calls = [adb.session_count(), adb.run(lambda db: 1),
                     adb.transaction(lambda db: 2)]
            assert all(inspect.iscoroutine(c) for c in calls)
            assert await asyncio.gather(*calls) == [0, 1, 2]

    asyncio.run(main())
    # The exceptions are AsyncSessionDB's own: close, heartbeat (an AsyncHeartbeat), and
    # transaction taking a function.
    assert not hasattr(AsyncSessionDB, "snapshot") and not hasattr(AsyncSessionDB, "fenced")
    assert inspect.iscoroutinefunction(AsyncSessionDB.close)
    assert getattr(AsyncSessionDB.transaction, "__wrapped__", None) is None


# -- the same results and errors as the sync API ----------------------------------------

# Context managers: used through run() (see the README); iter_export is an async iterator.
NOT_WRAPPED = {"close", "transaction", "snapshot", "fenced", "iter_export"}


class Last:
    """An argument that stands for the last Lease or Claim this run got back."""

    def __init__(self, kind: type) -> None:
        self.kind = kind


LEASE, CLAIM = Last(Lease), Last(Claim)


def resolve(args: tuple, last: dict) -> tuple:
    return tuple(last.get(a.kind) if isinstance(a, Last) else a for a in args)


# Every wrapped method at least once, in an order that makes each call meaningful; the
# failing calls must raise the same typed error, with the same message.
SCRIPT: list[tuple[str, tuple, dict]] = [
    ("create_session", ("root", "cli"), {"model": "m1", "title": "Project"}),
    ("ensure_session", ("child", "api"), {"parent_session_id": "root"}),
    ("create_session", ("orphan", "cli"), {"parent_session_id": "nobody"}),
    ("append_message", ("root", "user", "hello world"), {"tool_calls": [{"id": "1"}]}),
    ("append_message", ("root", "assistant", "hello again"), {"metadata": {"k": 1}}),
    ("append_message", ("missing", "user", "x"), {}),
    ("append_message", ("root", "user", "x"), {"tool_calls": object()}),
    ("get_session", ("root",), {}),
    ("list_sessions", (), {"limit": 5}),
    ("list_sessions", (), {"limit": 1.5}),
    ("get_messages", ("root",), {"after_id": 1}),
    ("get_messages_as_conversation", ("root",), {}),
    ("search_messages", ("hello",), {}),
    ("search_messages", ("x" * 1001,), {}),
    ("resolve_session_id", ("ro",), {}),
    ("session_count", (), {}),
    ("message_count", ("root",), {}),
    ("set_session_title", ("child", "Project #2"), {}),
    ("set_session_title", ("child", "Project"), {}),
    ("get_session_title", ("child",), {}),
    ("get_session_by_title", ("Project",), {}),
    ("resolve_session_by_title", ("Project",), {}),
    ("get_next_title_in_lineage", ("Project",), {}),
    ("update_system_prompt", ("root", "be brief"), {}),
    ("set_model", ("root", "m2", {"t": 2}), {}),
    ("update_token_counts", ("root", 10, 20), {"estimated_cost_usd": 0.5}),
    ("set_token_counts", ("root", 5, 6), {}),
    ("end_session", ("child", "done"), {}),
    ("reopen_session", ("child",), {}),
    ("update_session", ("root",), {"expected_revision": 2, "system_prompt": "x"}),
    ("update_session", ("root",), {"expected_revision": 2, "system_prompt": "y"}),
    ("acquire_lease", ("job", "a"), {"ttl": 30}),
    ("acquire_lease", ("job", "b"), {}),
    ("renew_lease", (LEASE,), {"ttl": 60}),
    ("get_lease", ("job",), {}),
    ("list_leases", (), {}),
    ("heartbeat", (LEASE,), {}),
    ("deadline", (LEASE, 60), {}),
    ("release_lease", (LEASE,), {}),
    ("renew_lease", (LEASE,), {}),
    ("acquire_session", ("root", "agent"), {}),
    ("session_holder", ("root",), {}),
    ("enqueue", ("q", {"n": 1}), {"session_id": "root"}),
    ("claim", ("q", "w"), {}),
    ("extend_claim", (CLAIM,), {}),
    ("complete_claim", (CLAIM,), {}),
    ("complete_claim", (CLAIM,), {}),
    ("enqueue", ("q",), {}),
    ("claim", ("q", "w"), {}),
    ("fail_claim", (CLAIM, "boom"), {}),
    ("claim", ("q", "w"), {}),
    ("release_claim", (CLAIM,), {}),
    ("reap_claims", (), {}),
    ("get_claim", (1,), {}),
    ("queue_counts", (), {}),
    ("list_claims", ("q",), {"state": "ready"}),
    ("requeue_claim", (1,), {}),
    ("purge_claims", (), {"older_than_days": 0}),
    ("export_session", ("root",), {}),
    ("export_all", (), {}),
    ("import_sessions", ({"id": "imported", "source": "cli", "started_at": 5.0},), {}),
    ("import_sessions", ({"id": "imported", "source": "cli", "started_at": 5.0},), {}),
    ("pop_message", ("child",), {}),
    ("pop_message", ("ghost",), {}),
    ("clear_messages", ("child",), {}),
    ("delete_session", ("root",), {}),
    ("delete_session", ("child",), {}),
    ("prune_sessions", (), {"older_than_days": 0, "dry_run": True}),
    ("prune_sessions", (), {"older_than_days": 0}),
    ("rebuild_search_index", (), {}),
    ("reclaim_space", (), {}),
    ("optimize_search_index", (), {}),
    ("checkpoint", (), {}),
    ("stats", (), {}),
]
CLOCK_FIELDS = {"started_at", "ended_at", "timestamp", "session_started", "last_active",
                "acquired_at", "expires_at", "created_at", "available_at", "claimed_at",
                "finished_at"}
CLOCK_ORDERED = {"list_sessions", "export_all"}  # ordered by started_at first
ERRORS = {SessionNotFound, InvalidArgumentType, InvalidArgument, TitleConflict,
          IntegrityViolation, StaleRevision, LeaseHeld, LeaseLost, ClaimLost}
_CLOCK = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \(\d+\.\d+\)")


def normalized(value: Any, path: Path) -> Any:
    """A result with its clock readings and the store's path taken out."""
    if dataclasses.is_dataclass(value):  # a Lease or a Claim
        return type(value).__name__, normalized(dataclasses.asdict(value), path)
    if isinstance(value, (Heartbeat, AsyncHeartbeat)):
        return "Heartbeat"
    if isinstance(value, Deadline):
        return "Deadline"
    if isinstance(value, dict):
        return {k: type(v).__name__ if k in CLOCK_FIELDS else normalized(v, path)
                for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v, path) for v in value]
    return value


def outcome(call: Any, path: Path, name: str, last: dict) -> Any:
    try:
        result = call()
    except Exception as exc:  # compared below: type and message
        return type(exc), _CLOCK.sub("<time>", str(exc).replace(str(path), "<path>"))
    if isinstance(result, (Lease, Claim)):
        last[type(result)] = result
    elif isinstance(result, Heartbeat):
        result.stop()
    elif isinstance(result, AsyncHeartbeat):
        result._heartbeat.stop()
    elif isinstance(result, Deadline):
        result.cancel()
    if name == "stats":  # figures of this instance's own writes and waits
        return sorted(result)
    if name in CLOCK_ORDERED:
        result = sorted(result, key=lambda item: item["id"])
    return normalized(result, path)


def test_results_and_typed_errors_equal_the_sync_api(tmp_path: Path):
    assert {name for name, _, _ in SCRIPT} == public_methods() - NOT_WRAPPED
    sync_path, async_path = tmp_path / "sync.db", tmp_path / "async.db"
    last: dict = {}
    with SessionDB(sync_path) as db:
        expected = [outcome(lambda: getattr(db, n)(*resolve(a, last), **k), sync_path, n, last)
                    for n, a, k in SCRIPT]

    async def main() -> list[Any]:
        last.clear()
        async with AsyncSessionDB(async_path) as adb:
            got = []
            for n, a, k in SCRIPT:
                try:
                    result = await getattr(adb, n)(*resolve(a, last), **k)
                except Exception as exc:
                    got.append(outcome(lambda: (_ for _ in ()).throw(exc), async_path, n,
                                       last))
                else:
                    got.append(outcome(lambda: result, async_path, n, last))
            return got

    got = asyncio.run(main())
    assert got == expected
    raised = {o[0] for o in expected if isinstance(o, tuple) and isinstance(o[0], type)}
    assert raised == ERRORS  # the script did exercise each typed error


def test_run_and_transaction_run_on_the_worker_thread_atomically(db_path: Path):
    def turn(db: SessionDB, text: str) -> int:
        mid = db.append_message("s", "assistant", text)
        db.update_token_counts("s", output_tokens=7)
        return mid

    def failing_turn(db: SessionDB) -> None:
        db.append_message("s", "assistant", "never stored")
        db.append_message("missing", "user", "x")  # SessionNotFound: all rolled back

    async def main() -> None:
        async with AsyncSessionDB(db_path) as adb:
            await adb.create_session("s", "gateway")
            assert await adb.run(lambda db: threading.current_thread().name) != \
                threading.current_thread().name
            mid = await adb.transaction(turn, "done")
            assert (await adb.get_messages("s"))[-1]["id"] == mid
            with pytest.raises(SessionNotFound):
                await adb.transaction(failing_turn)
            session = await adb.get_session("s")
            assert (session["message_count"], session["output_tokens"]) == (1, 7)
            assert await adb.run(lambda db, a, b: a + b, 2, 3) == 5

    asyncio.run(main())


# -- order, concurrency, loops ----------------------------------------------------------


def test_a_thousand_concurrent_calls_run_in_the_order_they_were_issued(db_path: Path):
    async def main() -> None:
        adb = await AsyncSessionDB.open(db_path)
        await adb.create_session("s", "gateway")
        ids = await asyncio.gather(*[adb.append_message("s", "user", f"m{i}")
                                     for i in range(1000)])
        assert all(a < b for a, b in zip(ids, ids[1:]))
        stored = await adb.get_messages("s", limit=None)
        assert [m["content"] for m in stored] == [f"m{i}" for i in range(1000)]
        await adb.close()

    asyncio.run(main())


def test_usable_from_two_loops_one_after_the_other_and_two_threads_at_once(db_path: Path):
    adb = asyncio.run(AsyncSessionDB.open(db_path))
    asyncio.run(adb.create_session("s", "gateway"))
    assert asyncio.run(adb.append_message("s", "user", "from the second loop")) == 1

    async def burst(tag: str) -> list[int]:
        return list(await asyncio.gather(*[adb.append_message("s", "user", f"{tag}{i}")
                                           for i in range(200)]))

    results: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda t=t: results.__setitem__(t, asyncio.run(
        burst(t)))) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results["a"] + results["b"]) == list(range(2, 402))
    assert asyncio.run(adb.message_count("s")) == 401
    asyncio.run(adb.close())


# -- the loop never waits on another process's write lock --------------------------------


@pytest.mark.slow
def test_the_loop_keeps_running_while_a_write_waits_for_another_process(db_path: Path):
    with SessionDB(db_path) as db:
        db.create_session("s", "cli")
    held, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=workers.transaction_holder_worker,
                           args=(str(db_path), held, release))
    holder.start()
    try:
        assert held.wait(60), "the holder never took the write lock"

        async def main() -> tuple[int, int]:
            async with AsyncSessionDB(db_path, write_timeout=60) as adb:
                write = asyncio.ensure_future(adb.append_message("s", "user", "gateway"))
                ticks = 0
                while ticks < 50:  # the write cannot finish: the lock is the holder's
                    await asyncio.sleep(0.001)
                    ticks += 1
                    assert not write.done()
                release.set()
                mid = await write
                return ticks, mid

        ticks, mid = asyncio.run(main())
        holder.join(60)
        assert holder.exitcode == 0
    finally:
        release.set()
        if holder.is_alive():
            holder.kill()
    assert ticks == 50
    rows = workers.read_only(db_path, "SELECT id, content FROM messages ORDER BY id")
    assert rows == [(1, "the holder's write"), (mid, "gateway")]


def test_a_heartbeat_stops_without_blocking_the_loop_while_a_renewal_waits(db_path: Path):
    """Stopping waits for the renewal in flight, which waits for another process's write
    lock: through AsyncHeartbeat the loop goes on ticking meanwhile."""
    SessionDB(db_path).close()
    held, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=workers.transaction_holder_worker,
                           args=(str(db_path), held, release), kwargs={"create": True})

    async def main() -> int:
        async with AsyncSessionDB(db_path, write_timeout=60) as adb:
            lease = await adb.acquire_lease("job", "gateway", ttl=30)
            hb = await adb.heartbeat(lease, interval=0.01)
            holder.start()
            assert await asyncio.to_thread(held.wait, 60)
            await asyncio.sleep(0.1)  # a renewal is due every 10 ms: one waits for the lock
            stopping = asyncio.ensure_future(hb.stop())
            ticks = 0
            while ticks < 50:
                await asyncio.sleep(0.001)
                ticks += 1
            release.set()  # had stop() blocked the loop, the holder would give up (exit 3)
            await stopping
            assert not hb.lost.is_set()
            return ticks

    try:
        assert asyncio.run(main()) == 50
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0


def test_calls_are_queued_when_made_not_when_first_awaited(db_path: Path):
    async def main() -> list[str]:
        async with AsyncSessionDB(db_path) as adb:
            created = asyncio.create_task(adb.create_session("s", "cli"))
            await adb.append_message("s", "user", "after the create")  # no SessionNotFound
            await created
            late, early = adb.append_message("s", "user", "b"), adb.append_message("s", "user", "c")
            await asyncio.gather(early, late)
            return [m["content"] for m in await adb.get_messages("s")]

    assert asyncio.run(main()) == ["after the create", "b", "c"]


def test_a_function_raising_stop_iteration_gets_an_error_not_a_hang(db_path: Path):
    async def main() -> None:
        async with AsyncSessionDB(db_path) as adb:
            bad = asyncio.ensure_future(adb.run(lambda db: next(iter([]))))
            assert await adb.session_count() == 0  # in order: bad has run by now
            # Its result is in the loop's queue; waking its task may take a step or two.
            for _ in range(10):
                if bad.done():
                    break
                await asyncio.sleep(0)
            assert bad.done()
            with pytest.raises(RuntimeError, match="StopIteration"):
                await bad

    asyncio.run(main())


def test_calling_the_instance_from_its_own_worker_is_refused(db_path: Path):
    async def main() -> None:
        async with AsyncSessionDB(db_path) as adb:
            def close_here(db: SessionDB) -> None:
                asyncio.run(adb.close())

            with pytest.raises(ConfigurationError, match="own worker thread"):
                await adb.run(close_here)
            assert await adb.session_count() == 0  # still usable

    asyncio.run(main())


def test_an_instance_nobody_closed_is_collected_and_closed(db_path: Path):
    import gc
    import weakref

    async def open_and_forget() -> "weakref.ref[AsyncSessionDB]":
        adb = await AsyncSessionDB.open(db_path)
        await adb.create_session("s", "cli")
        return weakref.ref(adb)

    before = len(aio_threads())
    with pytest.warns(ResourceWarning, match="never closed"):
        ref = asyncio.run(open_and_forget())
        gc.collect()
    assert ref() is None
    workers.wait_for(lambda: len(aio_threads()) == before)
    with SessionDB(db_path) as db:
        assert db.session_count() == 1


# -- close, errors, cancellation --------------------------------------------------------


def test_close_runs_queued_calls_first_is_idempotent_and_ends_the_thread(db_path: Path):
    async def main() -> AsyncSessionDB:
        adb = await AsyncSessionDB.open(db_path)
        await adb.create_session("s", "gateway")
        pending = [asyncio.ensure_future(adb.append_message("s", "user", str(i)))
                   for i in range(100)]
        await asyncio.sleep(0)  # every append is queued
        await asyncio.gather(adb.close(), adb.close())
        assert sorted(await asyncio.gather(*pending)) == list(range(1, 101))
        await adb.close()
        for call in (adb.message_count(), adb.run(len), adb.transaction(len)):
            with pytest.raises(ClosedError):
                await call
        with pytest.raises(ClosedError):
            async with adb:
                pass
        return adb

    adb = asyncio.run(main())
    assert not adb._thread.is_alive()
    assert workers.read_only(db_path, "SELECT COUNT(*) FROM messages") == [(100,)]


def test_calls_before_open_and_failed_opens_raise_typed_errors(tmp_path: Path):
    async def main() -> None:
        with pytest.raises(ClosedError):
            await AsyncSessionDB(tmp_path / "state.db").get_session("s")
        with pytest.raises(DatabaseOpenError):
            await AsyncSessionDB.open(tmp_path)  # a directory
        with pytest.raises(ConfigurationError):
            async with AsyncSessionDB(tmp_path / "state.db", write_timeout=-1):
                pass
        await AsyncSessionDB(tmp_path / "never-opened.db").close()

    asyncio.run(main())
    assert not aio_threads()  # the failed opens' threads ended
    assert not (tmp_path / "never-opened.db").exists()


def aio_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sessiondb-aio")]


def test_a_cancelled_open_closes_what_it_opened(db_path: Path):
    async def main() -> None:
        opening = asyncio.ensure_future(AsyncSessionDB.open(db_path))
        await asyncio.sleep(0)  # the worker thread is started, the open job queued
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening

    asyncio.run(main())
    assert not aio_threads()
    with SessionDB(db_path) as db:  # the store was opened (and closed) all the same
        assert db.session_count() == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_gets_closed_error_instead_of_a_hang(db_path: Path):
    adb = asyncio.run(AsyncSessionDB.open(db_path))
    pid = os.fork()
    if pid == 0:  # the child: no worker thread here
        code = 3
        try:
            asyncio.run(adb.message_count())
        except ClosedError:
            asyncio.run(adb.close())  # returns: the parent's thread and store are left alone
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert asyncio.run(adb.message_count()) == 0  # the parent's instance works on
    asyncio.run(adb.close())
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_cancelled_call_is_skipped_if_not_started_else_completed(db_path: Path):
    gate, started = threading.Event(), threading.Event()

    def blocker(db: SessionDB) -> None:
        started.set()
        gate.wait(30)
        db.append_message("s", "user", "started, then cancelled")

    async def main() -> None:
        async with AsyncSessionDB(db_path) as adb:
            await adb.create_session("s", "gateway")
            running = asyncio.ensure_future(adb.run(blocker))
            queued = asyncio.ensure_future(adb.append_message("s", "user", "skipped"))
            while not started.is_set():
                await asyncio.sleep(0.001)
            running.cancel()
            queued.cancel()
            while not queued.done():  # the cancellation reaches the queue first
                await asyncio.sleep(0)
            gate.set()
            for task in (running, queued):
                with pytest.raises(asyncio.CancelledError):
                    await task
            messages = await adb.get_messages("s")  # runs after both, in queue order
            assert [m["content"] for m in messages] == ["started, then cancelled"]

    asyncio.run(main())
