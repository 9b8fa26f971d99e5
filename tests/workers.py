"""Worker functions for the multi-process tests, plus the shared API tour.

``multiprocessing`` with the "spawn" start method imports its targets by name in a fresh
interpreter, so every worker lives at the top level of this importable module (pytest
puts ``tests/`` on ``sys.path``, and spawn hands ``sys.path`` to its children). A worker
reports failure by raising: the child then exits non-zero and the test asserts
``exitcode == 0``. Results travel back through a queue, never through files in the CWD.
"""

from __future__ import annotations

import fcntl
import os
import queue
import random
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import apsw

from sessiondb import SessionDB
from sessiondb.compat.hermes import SessionDB as HermesSessionDB
from sessiondb.gate import FifoGate, GateTimeout, gate_kind
from sessiondb.gate_locks import ROOM


def read_only(path: Path, sql: str) -> list[tuple]:
    """The rows of ``sql``, through a read-only connection of its own (not sessiondb)."""
    conn = apsw.Connection(str(path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def integrity(path: Path) -> list[tuple]:
    """``PRAGMA integrity_check`` through a read-only connection of its own."""
    return read_only(path, "PRAGMA integrity_check")


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll until ``predicate()`` is true (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the bound")
        time.sleep(0.002)


def run_all(spawn: Any, target: Callable[..., None], arg_lists: list[tuple],
            results: Any, start: Any | None = None) -> list[Any]:
    """Start one spawned process per argument tuple, release them together through
    ``start`` (an Event, if given), collect one report each, join them, and assert that
    every process exited 0 and reported."""
    procs = [spawn.Process(target=target, args=args) for args in arg_lists]
    for p in procs:
        p.start()
    if start is not None:
        start.set()
    # Drain before joining: a child blocks on exit until its queued data is read.
    reports = collect(results, procs, len(procs))
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert len(reports) == len(procs)
    return reports


def collect(results: Any, procs: list[Any], expected: int, timeout: float = 240) -> list[Any]:
    """Read up to ``expected`` results, returning early once every process has exited
    (a worker that died reports nothing; its exit code tells the test why)."""
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(out) < expected and time.monotonic() < deadline:
        try:
            out.append(results.get(timeout=0.5))
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                try:  # a child flushes its queue before it exits: drain what is left
                    while len(out) < expected:
                        out.append(results.get(timeout=0.5))
                except queue.Empty:
                    pass
                break
    return out


# -- gate workers ----------------------------------------------------------------------


def assert_interrupted_writes_accounted(db: SessionDB, path: Path, session_id: str,
                                        acked: list[str], attempted: list[str]) -> None:
    """After writes interrupted at random: every acknowledged one is there once, none
    that was not attempted, the counter exact, and the gate free for another
    instance. (One interrupted after its COMMIT may be there unacknowledged.)"""
    present = [m["content"] for m in db.get_messages(session_id)]
    assert set(acked) <= set(present) <= set(attempted)
    assert len(present) == len(set(present))
    assert db.get_session(session_id)["message_count"] == len(present)
    other = SessionDB(path, write_timeout=5)
    other.append_message(session_id, "user", "after")  # the gate is free
    other.close()


def open_gate(gate_path: str | Path) -> FifoGate:
    """A gate on the sidecar, of the kind ``$SESSIONDB_GATE`` names (the gate suite's
    parameter, inherited by every worker process), else of the platform's best kind."""
    return FifoGate(Path(gate_path), gate_kind())


def gate_cycle_worker(gate_path: str, log_path: str, rounds: int, seed: int,
                      start: Any) -> None:
    """Enter the gate ``rounds`` times; log ``enter``/``exit`` lines (O_APPEND) inside."""
    rng = random.Random(seed)
    gate = open_gate(gate_path)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    pid = os.getpid()
    start.wait(60)
    for _ in range(rounds):
        gate.acquire(60.0)
        try:
            os.write(fd, f"enter {pid}\n".encode())
            if rng.random() < 0.3:
                time.sleep(rng.uniform(0, 0.002))  # give a rival the chance to barge in
            os.write(fd, f"exit {pid}\n".encode())
        finally:
            gate.release()
    os.close(fd)
    gate.close()


def gate_hold_worker(gate_path: str, held: Any, release: Any) -> None:
    """Take the gate, say so, keep it until ``release`` is set (or the process is killed)."""
    gate = open_gate(gate_path)
    gate.acquire(30.0)
    held.set()
    if not release.wait(120):
        raise SystemExit(3)
    gate.release()
    gate.close()


def gate_wait_worker(gate_path: str, timeout: float, entered: Any) -> None:
    """Queue for the gate (killed while queued by the test, or let in)."""
    gate = open_gate(gate_path)
    gate.acquire(timeout)
    entered.set()
    gate.release()
    gate.close()


def gate_hold_then_fork_worker(gate_path: str, held: Any, results: Any) -> None:
    """Take the gate, fork a child that outlives us (sleeping), report its pid, wait to
    be killed. The child must not keep our gate ticket alive."""
    gate = open_gate(gate_path)
    gate.acquire(30.0)
    inherited = gate._file.fd
    pid = os.fork()
    if pid == 0:  # the child: touch nothing of the gate, just live on
        # Close every other inherited descriptor (multiprocessing's sentinel pipe among
        # them, so the parent's death is visible to the test) but leave the gate's as the
        # fork left it: whether it is still open is what the test is about.
        os.closerange(3, inherited)
        os.closerange(inherited + 1, 4096)
        time.sleep(60)
        os._exit(0)
    results.put(pid)
    held.set()
    time.sleep(120)
    raise SystemExit(3)


def gate_order_worker(gate_path: str, index: int, log_path: str) -> None:
    """Queue for the gate; once in, append ``index`` to the log (O_APPEND) and leave."""
    gate = open_gate(gate_path)
    gate.acquire(60.0)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{index}\n".encode())
    finally:
        os.close(fd)
        gate.release()
        gate.close()


def gate_try_worker(gate_path: str, timeout: float, results: Any) -> None:
    """Try to enter the gate within ``timeout``; report "entered" or "timeout"."""
    gate = open_gate(gate_path)
    try:
        gate.acquire(timeout)
    except GateTimeout:
        results.put("timeout")
    else:
        results.put("entered")
        gate.release()
    gate.close()


def gate_deadlock_worker(gate_path: str, held: Any) -> None:
    """Hold the gate, then wait in the kernel (a blocking classic lock, as an
    application's own lock would) for the reader-room byte that the test process holds:
    a process waiting for the test process while holding the slot the test's writer must
    wait on. Leave once the room byte is had."""
    gate = open_gate(gate_path)
    gate.acquire(30.0)
    held.set()
    fcntl.lockf(gate._file.fd, fcntl.LOCK_EX, 1, ROOM)  # F_SETLKW
    fcntl.lockf(gate._file.fd, fcntl.LOCK_UN, 1, ROOM)
    gate.release()
    gate.close()


# -- store workers ---------------------------------------------------------------------


def append_worker(path: str, worker: int, count: int, session_every: int,
                  results: Any, start: Any, gate: bool = True) -> None:
    """Append ``count`` messages ``p<worker>-m<i>`` to the shared session, creating a
    session of its own every ``session_every`` messages; report acknowledged ids."""
    db = SessionDB(path, gate=gate)
    start.wait(60)
    db.ensure_session("shared", "mp")
    acked: list[tuple[int, str]] = []
    created: list[str] = []
    for i in range(count):
        content = f"p{worker}-m{i}"
        acked.append((db.append_message("shared", "user", content), content))
        if i % session_every == 0:
            sid = f"p{worker}-s{i}"
            db.create_session(sid, "mp", title=f"worker {worker} session {i}")
            db.append_message(sid, "assistant", f"own {sid}",
                              tool_calls=[{"id": "a"}, {"id": "b"}])
            created.append(sid)
    stats = db.stats()
    db.close()
    results.put({"worker": worker, "acked": acked, "created": created,
                 "timeouts": stats["timeouts"], "failed": stats["failed_writes"]})


def open_fresh_worker(path: str, start: Any, results: Any) -> None:
    """Open a brand-new file at the same moment as the others; count the schema
    creations this process executed (seen by apsw's exec tracer)."""
    creates: list[str] = []

    def hook(conn: apsw.Connection) -> None:
        def trace(cursor: Any, sql: str, bindings: Any) -> bool:
            if sql.strip().upper().startswith("CREATE TABLE SESSIONS"):
                creates.append(sql)
            return True
        conn.exec_trace = trace

    apsw.connection_hooks.append(hook)
    start.wait(60)
    db = SessionDB(path)
    db.create_session(f"s{os.getpid()}", "fresh")
    version = int(db._engine._conn.pragma("user_version"))
    db.close()
    results.put({"pid": os.getpid(), "creates": len(creates), "user_version": version})


# -- the API tour ----------------------------------------------------------------------

#: Every public method of SessionDB that :func:`tour_api` calls.
TOURED: set[str] = set()


class Tour:
    """Delegates to a SessionDB and notes which public methods were called."""

    def __init__(self, db: SessionDB) -> None:
        self._db = db

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_"):
            TOURED.add(name)
        return getattr(self._db, name)


def tour_api(path: Path, on_open: Callable[[SessionDB], None] = lambda db: None) -> None:
    """Call every public method of SessionDB at least once (writes, reads, errors,
    close and reopen), so that traps installed around it see the whole library."""
    from sessiondb import IntegrityViolation, SessionNotFound, TitleConflict

    raw = SessionDB(path, checkpoint_every=5, wal_limit=256 * 1024)
    on_open(raw)
    db = Tour(raw)
    assert db.backend == "sqlite" and db.path == path
    db.create_session("root", "cli", model="m1", model_config={"t": 1},
                      system_prompt="be brief", user_id="u", title="Project")
    db.ensure_session("root", "cli")
    db.ensure_session("child", "api", parent_session_id="root")
    db.create_session("old", "cron")
    for i in range(12):
        db.append_message("root", "user" if i % 2 == 0 else "assistant", f"hello world {i}",
                          tool_calls=[{"id": str(i)}] if i % 3 == 0 else None,
                          metadata={"i": i}, token_count=i)
    db.append_message("child", "tool", "result", tool_name="grep", tool_call_id="0")
    db.append_message("old", "user", "ancient history")
    try:
        db.append_message("missing", "user", "x")
    except SessionNotFound:
        pass
    db.get_session("root")
    db.list_sessions()
    db.list_sessions(source="cli", exclude_sources=["cron"], active=True, limit=5)
    db.get_messages("root", after_id=1, limit=3)
    db.get_messages_as_conversation("root")
    db.search_messages('hello "world" AND (x OR -y* :')
    db.search_messages("hello", sources=["cli"], roles=["user"], session_id="root")
    db.resolve_session_id("ro")
    db.session_count()
    db.session_count("cli")
    db.message_count()
    db.message_count("root")
    db.set_session_title("child", "Project #2")
    try:
        db.set_session_title("child", "Project")
    except TitleConflict:
        pass
    db.get_session_title("child")
    db.get_session_by_title("Project")
    db.resolve_session_by_title("Project")
    db.get_next_title_in_lineage("Project")
    db.update_system_prompt("root", "be verbose")
    db.set_model("root", "m2", {"t": 2})
    db.update_token_counts("root", 10, 20, cache_read_tokens=1, estimated_cost_usd=0.5,
                           model="m3", billing_provider="p", cost_status="ok")
    db.update_token_counts("root", 1, 2, absolute=True)
    db.set_token_counts("root", 5, 6, reasoning_tokens=7, actual_cost_usd=1.0)
    with db.transaction():
        raw.append_message("root", "assistant", "inside a transaction")
        raw.update_token_counts("root", 1, 1)
        try:
            raw.append_message("missing", "user", "undone alone")
        except SessionNotFound:
            pass
    try:
        with db.transaction():
            raw.append_message("root", "user", "rolled back")
            raise KeyError("abandon")
    except KeyError:
        pass
    db.end_session("old", "done")
    db.end_session("child", "done")
    db.reopen_session("child")
    exported = db.export_session("root")
    everything = db.export_all()
    db.export_all(source="cli")
    assert list(db.iter_export()) == everything
    with db.snapshot():
        db.list_sessions()
        db.get_messages("root")
    db.checkpoint()
    db.stats()
    db.pop_message("child")
    db.clear_messages("child")
    tour_coordination(db, raw)
    try:
        db.delete_session("root")  # has a child
    except IntegrityViolation:
        pass
    db.delete_session("child")
    db.delete_session("nobody")
    db.close()
    db.close()

    raw = SessionDB(path, checkpoint_every=5, wal_limit=256 * 1024)
    on_open(raw)
    db = Tour(raw)
    db.prune_sessions(older_than_days=0)
    db.prune_sessions(older_than_days=0, source="cli")
    db.prune_sessions(older_than_days=0, dry_run=True)
    db.rebuild_search_index()
    db.reclaim_space()
    db.optimize_search_index()
    db.delete_session("root")
    assert exported is not None
    assert db.import_sessions(exported) == 1
    assert db.import_sessions(everything, skip_existing=True) >= 1
    try:
        db.import_sessions(exported)
    except IntegrityViolation:
        pass
    with db.transaction():
        raw.create_session("late", "cli")
    db.stats()
    db.checkpoint()
    db.close()


def tour_coordination(db: Any, raw: SessionDB) -> None:
    """The coordination API (leases, claims, revisions, heartbeat, deadline) once each."""
    from sessiondb import ClaimLost, DeadlineExceeded, LeaseHeld, LeaseLost, StaleRevision

    revision = db.update_session("root", title="Project renamed", system_prompt="p")
    try:
        db.update_session("root", expected_revision=revision - 1, title="stale")
    except StaleRevision:
        pass
    lease = db.acquire_lease("tour", "owner-a", ttl=30)
    try:
        db.acquire_lease("tour", "owner-b")
    except LeaseHeld:
        pass
    lease = db.renew_lease(lease)
    with db.fenced(lease):
        raw.append_message("root", "assistant", "fenced")
    db.get_lease("tour")
    db.list_leases()
    db.list_leases(owner="owner-a")
    with db.heartbeat(lease, interval=0.01) as hb:
        while hb.renewals == 0:
            time.sleep(0.01)
    db.release_lease(lease)
    try:
        db.renew_lease(lease)
    except LeaseLost:
        pass
    session_lease = db.acquire_session("root", "agent-1", ttl=30)
    db.session_holder("root")
    db.release_lease(session_lease)
    item = db.enqueue("tour-q", {"n": 1}, session_id="root", max_attempts=2)
    db.enqueue("tour-q", [2])
    claim = db.claim("tour-q", "worker-1", ttl=30)
    claim = db.extend_claim(claim)
    db.fail_claim(claim, "try again")
    claim = db.claim("tour-q", "worker-1", ttl=30)
    with db.fenced(claim):
        raw.append_message("root", "assistant", "worked on it")
        raw.complete_claim(claim)
    try:
        db.complete_claim(claim)
    except ClaimLost:
        pass
    claim = db.claim("tour-q", "worker-1", ttl=30)
    db.release_claim(claim)
    claim = db.claim("tour-q", "worker-1", ttl=30)
    try:
        with db.deadline(claim, 0.01) as bound:
            bound.call(time.sleep, 0.5)
    except DeadlineExceeded:
        pass
    db.reap_claims()
    db.get_claim(item)
    db.list_claims("tour-q", "dead")
    dead = db.enqueue("tour-q", max_attempts=1)
    while db.get_claim(dead)["state"] != "dead":
        db.fail_claim(db.claim("tour-q", "worker-1", ttl=30), "poison")
    db.requeue_claim(dead)
    db.purge_claims(0)
    db.queue_counts()
    db.queue_counts("tour-q")


# -- turn and reader-room workers -------------------------------------------------------


def burst_writer_worker(path: str, count: int, start: Any, results: Any) -> None:
    """Append ``count`` tiny messages back to back (the writes that form gate turns)."""
    db = SessionDB(path, write_timeout=30)
    db.ensure_session(f"burst-{os.getpid()}", "test")
    start.wait(60)
    for i in range(count):
        db.append_message(f"burst-{os.getpid()}", "user", f"b{i}")
    results.put(("done", os.getpid(), db.stats()["lock_wait_max_s"]))
    db.close()


def snapshot_reader_worker(path: str, hold_s: float, stop: Any, ready: Any,
                           results: Any) -> None:
    """Hold ``snapshot()`` blocks of ``hold_s`` back to back through the library (a TUI's
    long read, cooperating with WAL resets) until ``stop``."""
    db = SessionDB(path)
    snapshots = 0
    ready.set()
    while not stop.is_set():
        with db.snapshot():
            db.message_count()
            time.sleep(hold_s)
        snapshots += 1
    results.put(snapshots)
    db.close()


def overlapping_readers(path: str, hold_s: float, stop: Any, ready: Any,
                        results: Any) -> None:
    """A foreign process (plain apsw, not sessiondb) that always has a read transaction
    open: two connections each run ``BEGIN; SELECT; hold; COMMIT`` back to back, a half
    period apart, and a reader commits only once the other one holds a transaction of
    its own (a hand-off, so the overlap holds by construction, however the machine
    schedules us). Reports every transaction as (snapshot taken, about to commit)
    in ``time.monotonic()`` seconds, which is one clock for every process of the host.
    """
    intervals: list[list[tuple[float, float]]] = [[], []]
    cond = threading.Condition()
    open_now = [0]
    started = [threading.Event(), threading.Event()]
    errors: list[str] = []

    def reader(n: int) -> None:
        try:
            conn = apsw.Connection(path)
            conn.set_busy_timeout(5000)
            if n == 1:
                started[0].wait(30)
                time.sleep(hold_s / 2)
            while not stop.is_set():
                conn.execute("BEGIN")
                conn.execute("SELECT COUNT(*) FROM messages").fetchall()  # the snapshot
                began = time.monotonic()
                with cond:
                    open_now[0] += 1
                    cond.notify_all()
                started[n].set()
                time.sleep(hold_s)
                with cond:  # hand off: leave only while the other reader is inside
                    while open_now[0] < 2 and not stop.is_set():
                        cond.wait(0.05)
                    open_now[0] -= 1
                    ended = time.monotonic()
                conn.execute("COMMIT")
                intervals[n].append((began, ended))
            conn.close()
        except BaseException:
            errors.append(traceback.format_exc())
            started[n].set()
            raise

    threads = [threading.Thread(target=reader, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for event in started:
        event.wait(30)
    ready.set()
    for t in threads:
        t.join()
    results.put({"intervals": intervals, "errors": errors})


def hermes_facade_worker(path: str, results: Any) -> None:
    """Through the hermes-agent facade (#6): report what it sees of the session the
    parent wrote with sessiondb.SessionDB, then write one session of its own."""
    with HermesSessionDB(Path(path)) as db:
        seen = db.get_session("core-1")
        messages = db.get_messages("core-1")
        db.create_session("hermes-1", "telegram", model="m", model_config={"t": 0.2})
        db.set_session_title("hermes-1", "From the facade")
        db.append_message("hermes-1", "user", "written through the hermes facade",
                          tool_calls=[{"id": "c1"}])
        db.update_token_counts("hermes-1", 10, 5, estimated_cost_usd=0.5)
    results.put({"seen": seen, "messages": messages})


def transaction_holder_worker(path: str, held: Any, release: Any, create: bool = False
                              ) -> None:
    """Write one message inside a ``transaction()`` block and keep the write lock (and
    the gate) until ``release`` is set (at most 30 s): a foreign writer to wait behind.
    ``create``: make the session "s" first."""
    db = SessionDB(path, hold_timeout=60)
    if create:
        db.ensure_session("s", "cli")
    with db.transaction():
        db.append_message("s", "assistant", "the holder's write")
        held.set()
        if not release.wait(30):
            raise SystemExit(3)
    db.close()
