"""The FIFO write gate with real processes, real kernel locks and SIGKILL.

Every test runs once per kind of gate the platform has (on Linux: OFD locks, and the
portable gate of classic POSIX locks), through ``$SESSIONDB_GATE`` (``GATE_SUITE`` in
``conftest.py``); workers open their gates with ``workers.open_gate``, which follows it.

Nothing here asserts timing. Where a test needs "the waiter is queued now", it watches
the gate's queue depth (:meth:`FifoGate.queue_depth`: tickets issued and not done), read
through a gate of the test's own: with classic locks, opening and closing the sidecar
file directly would drop the test process's locks on it (see
``test_opening_and_closing_the_sidecar_file``).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import workers
from workers import open_gate
from sessiondb import ConfigurationError, SessionDB, WriteTimeout
from sessiondb import gate as gate_module
from sessiondb import gate_posix
from sessiondb.gate import (
    GATE_ENV, FifoGate, GateTimeout, NullGate, gate_kind as resolve, make_gate,
    ofd_locks_available,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX fcntl locks")

SPAWN = multiprocessing.get_context("spawn")


def gate_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db.sessiondb-gate"


def queued_beyond(gate: FifoGate, depth: int) -> None:
    """Wait until more than ``depth`` writers hold or wait for the gate."""
    workers.wait_for(lambda: gate.queue_depth() > depth)


class Acquirer(threading.Thread):
    """Acquire a gate in a thread and keep the outcome."""

    def __init__(self, gate: FifoGate, timeout: float) -> None:
        super().__init__(daemon=True)
        self.gate, self.timeout = gate, timeout
        self.result: tuple[float, bool] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.gate.acquire(self.timeout)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def start_holder(path: Path):
    held, release = SPAWN.Event(), SPAWN.Event()
    proc = SPAWN.Process(target=workers.gate_hold_worker, args=(str(path), held, release))
    proc.start()
    assert held.wait(60), "holder never entered the gate"
    return proc, release


def kill(proc) -> None:
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)


# -- in one process --------------------------------------------------------------------


def test_uncontended_acquire_and_release(tmp_path: Path):
    gate = open_gate(gate_path(tmp_path))
    for _ in range(100):
        waited, contended = gate.acquire(1.0)
        assert not contended
        gate.release()
    assert oct(os.stat(gate.path).st_mode & 0o777) == "0o600"
    gate.close()


def test_two_gates_in_one_process_exclude_each_other(tmp_path: Path):
    """OFD locks belong to the open file description, not the process."""
    a, b = open_gate(gate_path(tmp_path)), open_gate(gate_path(tmp_path))
    a.acquire(1.0)
    with pytest.raises(GateTimeout) as caught:
        b.acquire(0.2)
    assert caught.value.waited_s >= 0.2
    a.release()
    assert b.acquire(1.0)
    b.release()
    a.close()
    b.close()


def test_acquiring_twice_is_refused_and_keeps_the_gate_held(tmp_path: Path):
    a, b = open_gate(gate_path(tmp_path)), open_gate(gate_path(tmp_path))
    a.acquire(1.0)
    with pytest.raises(RuntimeError):
        a.acquire(1.0)
    with pytest.raises(GateTimeout):
        b.acquire(0.1)
    a.release()
    b.acquire(1.0)
    b.release()
    a.close()
    b.close()


def test_two_sessiondb_instances_in_one_process_queue_at_the_gate(db_path: Path):
    first, second = SessionDB(db_path), SessionDB(db_path, write_timeout=30)
    first.create_session("s", "cli")
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with first.transaction():
            first.append_message("s", "user", "first")
            inside.set()
            leave.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(30)
    depth = first._engine._gate.queue_depth()
    done: list[int] = []
    writer = threading.Thread(target=lambda: done.append(
        second.append_message("s", "user", "second")))
    writer.start()
    queued_beyond(first._engine._gate, depth)
    leave.set()
    holder.join()
    writer.join()
    assert done
    stats = second.stats()
    assert stats["contended_writes"] == 1
    assert stats["retries"] == 0  # it waited in the gate, not in SQLite's busy loop
    assert [m["content"] for m in second.get_messages("s")] == ["first", "second"]
    first.close()
    second.close()


def test_null_gate_and_make_gate(tmp_path: Path, gate_kind: str):
    gate = NullGate()
    assert gate.acquire(0.0) == (0.0, False)
    gate.release()
    gate.close()
    assert gate.kind == "none" and gate.queue_depth() == 0
    assert isinstance(make_gate(tmp_path / "x.db", False), NullGate)
    assert isinstance(make_gate(tmp_path / "x.db", "none"), NullGate)
    fifo = make_gate(tmp_path / "x.db")
    assert isinstance(fifo, FifoGate) and fifo.kind == gate_kind
    assert fifo.path == tmp_path / "x.db.sessiondb-gate"
    fifo.close()


def test_choosing_the_gate(db_path: Path, monkeypatch):
    """The option picks the gate, "auto" defers to $SESSIONDB_GATE, bad values and kinds
    the platform lacks are typed errors, and stats() names the gate in use."""
    monkeypatch.delenv(GATE_ENV, raising=False)
    best = "ofd" if ofd_locks_available() else "posix"
    assert resolve("auto") == resolve(True) == best
    assert resolve(False) == resolve("none") == "none"
    assert resolve("posix") == "posix"
    monkeypatch.setenv(GATE_ENV, "posix")
    assert resolve("auto") == "posix" and resolve(False) == "none"
    with SessionDB(db_path) as db:
        assert db.stats()["gate"] == "posix"
    monkeypatch.setenv(GATE_ENV, "none")
    with SessionDB(db_path) as db:
        assert db.stats()["gate"] == "none"
    monkeypatch.setenv(GATE_ENV, "sideways")
    with pytest.raises(ConfigurationError, match=GATE_ENV):
        SessionDB(db_path)
    monkeypatch.delenv(GATE_ENV)
    for bad in ("sideways", 1, None, "OFD"):
        with pytest.raises(ConfigurationError, match="gate must be one of"):
            SessionDB(db_path, gate=bad)
    with SessionDB(db_path, gate="posix") as db:
        assert db.stats()["gate"] == "posix"
    monkeypatch.setattr(gate_module, "ofd_locks_available", lambda: False)
    assert resolve("auto") == "posix"  # macOS, the BSDs
    with pytest.raises(ConfigurationError, match="'ofd' needs Linux"):
        SessionDB(db_path, gate="ofd")
    monkeypatch.setattr(gate_module, "posix_locks_available", lambda: False)
    assert resolve("auto") == "none"  # Windows
    with pytest.raises(ConfigurationError, match="'posix' needs fcntl"):
        resolve("posix")


@pytest.mark.skipif(not ofd_locks_available(), reason="needs both kinds of lock")
def test_one_process_cannot_mix_the_kinds_on_one_store(db_path: Path):
    """Closing the OFD gate's descriptor would drop the classic gate's locks."""
    with SessionDB(db_path, gate="ofd") as first:
        with pytest.raises(ConfigurationError, match="already uses the 'ofd' write gate"):
            SessionDB(db_path, gate="posix")
        first.create_session("s", "cli")
    with SessionDB(db_path, gate="posix") as second:  # fine once the other is closed
        with pytest.raises(ConfigurationError, match="already uses the 'posix'"):
            SessionDB(db_path, gate="ofd")
        second.append_message("s", "user", "in")


class Orderly(threading.Thread):
    """Enter a gate, note the order of entry, leave."""

    def __init__(self, gate: FifoGate, index: int, order: list[int]) -> None:
        super().__init__(daemon=True)
        self.gate, self.index, self.order = gate, index, order

    def run(self) -> None:
        self.gate.acquire(30.0)
        self.order.append(self.index)
        self.gate.release()


def test_fifo_order_among_instances_of_one_process(tmp_path: Path):
    """Writers of one process are served in the order they came: each has a ticket of its
    own (classic locks: a ticket of the process waits for an earlier one of the process
    inside it, not in the kernel)."""
    holder = open_gate(gate_path(tmp_path))
    holder.acquire(1.0)
    gates = [open_gate(gate_path(tmp_path)) for _ in range(5)]
    order: list[int] = []
    threads = []
    for i, gate in enumerate(gates):
        depth = holder.queue_depth()
        threads.append(Orderly(gate, i, order))
        threads[-1].start()
        queued_beyond(holder, depth)
    holder.release()
    for t in threads:
        t.join(30)
    assert order == list(range(5))
    for gate in [holder, *gates]:
        gate.close()


def test_the_reader_room_between_instances_of_one_process(tmp_path: Path):
    """Snapshot readers and a checkpointer of one process meet at the door and in the
    room as they would across processes (classic locks: counted in the process)."""
    reader, other_reader, checkpointer = (open_gate(gate_path(tmp_path)) for _ in range(3))
    assert reader.enter_room(1.0) and other_reader.enter_room(1.0)
    assert checkpointer.close_door(1.0)
    assert not checkpointer.empty_room(0.02)  # two readers inside
    reader.leave_room()
    assert not checkpointer.empty_room(0.02)  # one still inside
    assert not reader.enter_room(0.02)        # the door is shut
    other_reader.leave_room()
    assert checkpointer.empty_room(1.0)
    assert not other_reader.close_door(0.02)  # one checkpointer at a time
    checkpointer.open_door()
    assert reader.enter_room(1.0)
    assert other_reader.close_door(1.0) and not other_reader.empty_room(0.02)
    reader.close()  # closing gives its place in the room back
    assert other_reader.empty_room(1.0)
    other_reader.open_door()
    for gate in (other_reader, checkpointer):
        gate.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_one_descriptor_per_sidecar_per_process(db_path: Path, gate_kind: str):
    """Classic locks: every instance shares the process's one descriptor of the sidecar,
    so closing an instance never closes a descriptor the others' locks live on."""
    sidecar = os.path.realpath(str(db_path) + ".sessiondb-gate")

    def descriptors() -> int:
        return sum(1 for fd in os.listdir("/proc/self/fd")
                   if os.path.realpath(f"/proc/self/fd/{fd}") == sidecar)

    stores = [SessionDB(db_path) for _ in range(3)]
    for db in stores:
        db.checkpoint(reset=True)  # each store's checkpointer opens a gate of its own
    assert descriptors() == (1 if gate_kind == "posix" else 6)
    for db in stores:
        db.close()
    assert descriptors() == 0


def test_a_timed_out_waiter_gives_up_its_place(tmp_path: Path):
    holder, impatient, patient = (open_gate(gate_path(tmp_path)) for _ in range(3))
    holder.acquire(1.0)
    for _ in range(3):  # three abandoned tickets between the holder and the next waiter
        with pytest.raises(GateTimeout):
            impatient.acquire(0.05)
    waiter = Acquirer(patient, 30.0)
    depth = holder.queue_depth()
    waiter.start()
    queued_beyond(holder, depth)
    holder.release()
    waiter.join(30)
    assert waiter.error is None and waiter.result is not None
    assert waiter.result[1] is True  # it really had to queue
    with pytest.raises(GateTimeout):
        impatient.acquire(0.05)  # the patient one holds it now
    patient.release()
    impatient.acquire(1.0)
    impatient.release()
    # The abandoned waits end once their predecessor left, and each gate's waiter
    # thread ends with the gate: nothing is left running.
    for g in (holder, impatient, patient):
        g.close()
    workers.wait_for(lambda: not any(t.name == "sessiondb-gate-wait" for t in threading.enumerate()))


def test_a_child_after_fork_does_not_share_the_parents_ticket(tmp_path: Path):
    gate = open_gate(gate_path(tmp_path))
    gate.acquire(1.0)
    pid = os.fork()
    if pid == 0:  # child: the parent holds the gate, so we must time out, not barge in
        code = 1
        try:
            if gate_posix._REGISTRY:  # classic locks: the parent's records stay behind
                os._exit(3)
            gate.acquire(0.2)
        except GateTimeout:
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.release()
    pid = os.fork()
    if pid == 0:  # child: the gate is free, and the child's release lets others in
        try:
            gate.acquire(5.0)
            gate.release()
            gate.close()
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    gate.acquire(1.0)
    gate.release()
    gate.close()


# -- across processes ------------------------------------------------------------------


@pytest.mark.slow
def test_mutual_exclusion_across_processes(tmp_path: Path):
    procs_n, rounds = 6, 150
    log = tmp_path / "gate.log"
    start = SPAWN.Event()
    procs = [SPAWN.Process(target=workers.gate_cycle_worker,
                           args=(str(gate_path(tmp_path)), str(log), rounds, seed, start))
             for seed in range(procs_n)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * procs_n
    lines = log.read_text().splitlines()
    assert len(lines) == 2 * procs_n * rounds
    for i in range(0, len(lines), 2):
        enter, leave = lines[i].split(), lines[i + 1].split()
        assert enter[0] == "enter" and leave[0] == "exit", (i, lines[i:i + 2])
        assert enter[1] == leave[1], (i, lines[i:i + 2])
    per_pid: dict[str, int] = {}
    for line in lines[::2]:
        per_pid[line.split()[1]] = per_pid.get(line.split()[1], 0) + 1
    assert sorted(per_pid.values()) == [rounds] * procs_n


@pytest.mark.slow
def test_fifo_order_across_processes(tmp_path: Path):
    """Processes are let in in the order they queued."""
    path, log = gate_path(tmp_path), tmp_path / "order.log"
    holder, release = start_holder(path)
    observer = open_gate(path)
    procs = []
    try:
        for i in range(4):
            depth = observer.queue_depth()
            procs.append(SPAWN.Process(target=workers.gate_order_worker,
                                       args=(str(path), i, str(log))))
            procs[-1].start()
            queued_beyond(observer, depth)
        release.set()
        for p in [holder, *procs]:
            p.join(60)
        assert [p.exitcode for p in [holder, *procs]] == [0] * 5
        assert log.read_text().split() == ["0", "1", "2", "3"]
    finally:
        observer.close()
        for p in [holder, *procs]:
            kill(p)


def try_from_another_process(path: Path, timeout: float = 0.3) -> str:
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=workers.gate_try_worker, args=(str(path), timeout, results))
    proc.start()
    try:
        outcome = results.get(timeout=60)
    finally:
        proc.join(30)
        kill(proc)
    assert proc.exitcode == 0
    return outcome


@pytest.mark.slow
def test_closing_another_instance_drops_nothing(tmp_path: Path):
    """An instance of the process holds the gate while others of the same sidecar are
    opened, used and closed: the gate stays held for every other process."""
    path = gate_path(tmp_path)
    holder = open_gate(path)
    holder.acquire(1.0)
    for _ in range(3):
        other = open_gate(path)
        with pytest.raises(GateTimeout):
            other.acquire(0.02)
        assert other.enter_room(1.0)
        other.leave_room()
        other.close()
    assert try_from_another_process(path) == "timeout"
    holder.release()
    assert try_from_another_process(path, 30.0) == "entered"
    holder.close()


@pytest.mark.slow
@pytest.mark.skipif(not ofd_locks_available(), reason="needs both kinds of lock")
def test_processes_using_different_kinds_exclude_each_other(tmp_path: Path, gate_kind: str,
                                                            monkeypatch):
    """Linux makes OFD and classic locks conflict: a process forcing one kind and a
    process forcing the other share one queue."""
    path = gate_path(tmp_path)
    holder = open_gate(path)  # this test's kind
    holder.acquire(1.0)
    monkeypatch.setenv(GATE_ENV, "posix" if gate_kind == "ofd" else "ofd")  # the worker's
    assert try_from_another_process(path) == "timeout"
    holder.release()
    assert try_from_another_process(path, 30.0) == "entered"
    holder.close()

@pytest.mark.slow
def test_opening_and_closing_the_sidecar_file(tmp_path: Path, gate_kind: str):
    """Code of the process opens and closes the sidecar file itself. OFD locks belong to
    the gate's descriptor: nothing is dropped. Classic locks belong to the process, and
    POSIX drops them all on any close of the file: this is the portable gate's residual
    hazard (documented, like the one SQLite has with its database file). What holds
    even then: another process may get in beside the holder (SQLite's write lock still
    serializes their writes), nothing errs or wedges, and the queue is whole again from
    the next entry on."""
    path = gate_path(tmp_path)
    holder = open_gate(path)
    holder.acquire(1.0)
    os.close(os.open(path, os.O_RDONLY))
    assert try_from_another_process(path) == ("timeout" if gate_kind == "ofd" else "entered")
    holder.release()
    holder.acquire(1.0)  # the next entry: excluded again
    assert try_from_another_process(path) == "timeout"
    holder.release()
    assert try_from_another_process(path, 30.0) == "entered"
    holder.close()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks")
def test_a_deadlock_refused_by_the_kernel_is_retried_in_place(tmp_path: Path,
                                                             gate_kind: str):
    """A process holds the gate and waits in the kernel for a lock the test process
    holds (its snapshot reader's room byte, as an application's own lock would be); the
    test's writer queues behind it. With classic locks the kernel judges per process and
    refuses that wait (EDEADLK: each process holds what the other waits for, although
    the test's reader would leave on its own); the gate waits a moment and asks again,
    keeping its ticket, so a process that queued after it still comes after it. OFD
    locks have no deadlock detection: the waiter simply sleeps until the holder leaves."""
    path, log = gate_path(tmp_path), tmp_path / "order.log"
    gate = open_gate(path)
    assert gate.enter_room(1.0)
    held = SPAWN.Event()
    holder = SPAWN.Process(target=workers.gate_deadlock_worker, args=(str(path), held))
    holder.start()
    late = None
    try:
        assert held.wait(60)
        # the holder is asleep in the kernel, waiting for the room byte
        workers.wait_for(lambda: blocked_in_the_kernel(holder.pid))
        depth = gate.queue_depth()
        waiter = Acquirer(gate, 60.0)
        waiter.start()
        queued_beyond(gate, depth)
        if gate_kind == "posix":
            workers.wait_for(lambda: gate.deadlock_retries > 0)
        depth = gate.queue_depth()
        late = SPAWN.Process(target=workers.gate_order_worker, args=(str(path), 2, str(log)))
        late.start()
        queued_beyond(gate, depth)
        gate.leave_room()  # the holder gets its byte, leaves the gate: our turn
        waiter.join(60)
        assert waiter.error is None and waiter.result is not None and waiter.result[1]
        with open(log, "a") as fh:
            fh.write("1\n")
        gate.release()
        for p in (holder, late):
            p.join(60)
        assert holder.exitcode == 0 and late.exitcode == 0
        assert log.read_text().split() == ["1", "2"]  # the place in line was kept
        assert (gate.deadlock_retries > 0) == (gate_kind == "posix")
    finally:
        gate.close()
        kill(holder)
        if late is not None:
            kill(late)


def blocked_in_the_kernel(pid: int) -> bool:
    """Whether process ``pid`` waits for a record lock (a ``->`` line of /proc/locks)."""
    return any("->" in line and f" {pid} " in line
               for line in Path("/proc/locks").read_text().splitlines())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="needs /proc/locks")
def test_two_tickets_of_one_process_around_another_s_are_no_deadlock(tmp_path: Path,
                                                                     gate_kind: str):
    """This process holds ticket 1 (instance A), another process queues with ticket 2,
    then this process queues again with ticket 3 (instance B). With classic locks the
    kernel sees this process wait for the other while the other waits for it, and
    refuses B's wait (EDEADLK): B asks again until ticket 2 has left, and comes after it."""
    path, log = gate_path(tmp_path), tmp_path / "order.log"
    first, second = open_gate(path), open_gate(path)
    first.acquire(1.0)
    other = SPAWN.Process(target=workers.gate_order_worker, args=(str(path), 2, str(log)))
    depth = first.queue_depth()
    other.start()
    try:
        queued_beyond(first, depth)
        if gate_kind == "posix":  # (/proc/locks shows no pid for OFD locks)
            workers.wait_for(lambda: blocked_in_the_kernel(other.pid))
        waiter = Acquirer(second, 60.0)
        depth = first.queue_depth()
        waiter.start()
        queued_beyond(first, depth)
        if gate_kind == "posix":
            workers.wait_for(lambda: second.deadlock_retries > 0)
        first.release()
        waiter.join(60)
        assert waiter.error is None and waiter.result is not None and waiter.result[1]
        with open(log, "a") as fh:
            fh.write("3\n")
        second.release()
        other.join(60)
        assert other.exitcode == 0
        assert log.read_text().split() == ["2", "3"]
        assert (second.deadlock_retries > 0) == (gate_kind == "posix")
    finally:
        first.close()
        second.close()
        kill(other)


@pytest.mark.slow
def test_a_holder_killed_while_holding_frees_the_gate(tmp_path: Path):
    path = gate_path(tmp_path)
    proc, _ = start_holder(path)
    try:
        gate = open_gate(path)
        with pytest.raises(GateTimeout):
            gate.acquire(0.1)
        waiter = Acquirer(gate, 30.0)
        depth = gate.queue_depth()
        waiter.start()
        queued_beyond(gate, depth)  # queued behind the holder
        os.kill(proc.pid, signal.SIGKILL)
        waiter.join(30)
        assert waiter.error is None and waiter.result is not None
        assert waiter.result[1] is True
        gate.release()
        gate.close()
    finally:
        kill(proc)
    assert proc.exitcode == -signal.SIGKILL


@pytest.mark.slow
def test_a_waiter_killed_while_queued_does_not_block_those_behind_it(tmp_path: Path):
    path = gate_path(tmp_path)
    holder, release = start_holder(path)
    entered = SPAWN.Event()
    queued = SPAWN.Process(target=workers.gate_wait_worker, args=(str(path), 60.0, entered))
    try:
        gate = open_gate(path)
        depth = gate.queue_depth()
        queued.start()
        queued_beyond(gate, depth)  # it holds a ticket: queued
        os.kill(queued.pid, signal.SIGKILL)
        queued.join(30)
        assert not entered.is_set()
        waiter = Acquirer(gate, 30.0)
        depth = gate.queue_depth()
        waiter.start()
        queued_beyond(gate, depth)
        release.set()
        waiter.join(30)
        assert waiter.error is None and waiter.result is not None
        gate.release()
        gate.close()
        holder.join(30)
        assert holder.exitcode == 0
    finally:
        kill(holder)
        kill(queued)
    assert queued.exitcode == -signal.SIGKILL


@pytest.mark.slow
def test_a_killed_holder_frees_the_gate_even_if_its_forked_child_lives_on(tmp_path: Path):
    """A fork child inherits the gate's descriptor, and with it the parent's OFD locks;
    unless the child lets go of it, a parent killed while holding the gate would wedge
    every writer until the child exits."""
    path = gate_path(tmp_path)
    held, results = SPAWN.Event(), SPAWN.Queue()
    proc = SPAWN.Process(target=workers.gate_hold_then_fork_worker,
                         args=(str(path), held, results))
    proc.start()
    child = None
    try:
        assert held.wait(60)
        child = results.get(timeout=30)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        os.kill(child, 0)  # the child is still alive
        gate = open_gate(path)
        gate.acquire(10.0)  # WriteTimeout-style failure here means the child holds it
        gate.release()
        gate.close()
    finally:
        kill(proc)
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.slow
def test_null_gate_fallback_writes_correctly_under_contention(db_path: Path):
    SessionDB(db_path, gate=False).close()
    procs_n, count = 4, 150
    results, start = SPAWN.Queue(), SPAWN.Event()
    reports = workers.run_all(SPAWN, workers.append_worker,
                              [(str(db_path), w, count, 50, results, start, False)
                               for w in range(procs_n)], results, start)
    db = SessionDB(db_path, gate=False)
    contents = [m["content"] for m in db.get_messages("shared")]
    expected = {f"p{w}-m{i}" for w in range(procs_n) for i in range(count)}
    assert sorted(contents) == sorted(expected)
    assert db.get_session("shared")["message_count"] == procs_n * count
    for report in reports:
        assert report["timeouts"] == 0 and report["failed"] == 0
    assert db._engine._conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()


class Interrupted(BaseException):
    """Raised by a signal handler, like KeyboardInterrupt from Ctrl-C."""


def test_a_waiter_thread_that_ended_is_started_again(tmp_path: Path, monkeypatch):
    """A signal handler's exception landing inside ``Thread.start()`` can end the gate's
    new waiter thread before it serves a wait (seen in a loop of queued acquires and
    signals, a few times in 40,000). The gate must not keep queueing its waits for a
    thread that is gone: each would last its whole timeout."""
    path = gate_path(tmp_path)
    holder, release = start_holder(path)
    real = FifoGate._waiter_loop
    ended: list[int] = []

    def first_one_ends(self, waits) -> None:  # the first waiter thread serves nothing
        if not ended:
            ended.append(1)
            return
        real(self, waits)

    monkeypatch.setattr(FifoGate, "_waiter_loop", first_one_ends)
    gate = open_gate(path)
    try:
        with pytest.raises(GateTimeout):
            gate.acquire(0.3)  # its wait was queued for the thread that ended
        assert ended
        threading.Timer(0.3, release.set).start()
        waited, _ = gate.acquire(30.0)  # queued behind the holder, then served
        gate.release()
        assert waited < 25  # before: GateTimeout after 30 s
        holder.join(30)
        assert holder.exitcode == 0
    finally:
        gate.close()
        kill(holder)


@pytest.mark.slow
def test_a_waiter_interrupted_by_a_signal_gives_up_its_place(tmp_path: Path):
    """Ctrl-C (or any exception raised by a signal handler) while a writer is queued
    must not leave its ticket behind: that would wedge every writer of every process."""
    path = gate_path(tmp_path)
    holder, release = start_holder(path)

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        gate = open_gate(path)
        depth = gate.queue_depth()

        def send_once_queued() -> None:
            queued_beyond(gate, depth)
            os.kill(os.getpid(), signal.SIGUSR1)

        sender = threading.Thread(target=send_once_queued)
        sender.start()
        with pytest.raises(Interrupted):
            gate.acquire(30.0)
        sender.join()
        release.set()
        holder.join(30)
        assert holder.exitcode == 0
        other = open_gate(path)
        other.acquire(10.0)  # GateTimeout here: the interrupted ticket was left behind
        other.release()
        gate.acquire(1.0)  # and the interrupted gate itself is usable again
        gate.release()
        gate.close()
        other.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)
        kill(holder)


def test_a_signal_that_lands_outside_the_waiting_thread_still_interrupts_the_wait(
        tmp_path: Path):
    """A signal that arrives just before the caller's thread starts its blocking wait
    (or that the kernel hands to another thread) interrupts no system call: its Python
    handler runs only when the main thread next runs Python code. The kernel is made to
    hand it to another thread here (the main thread blocks it): the queued writer still
    gets its handler's exception at once, not when its wait times out."""
    path = gate_path(tmp_path)
    holder, release = start_holder(path)

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    gate = open_gate(path)
    depth = gate.queue_depth()

    def send_once_queued() -> None:
        queued_beyond(gate, depth)
        os.kill(os.getpid(), signal.SIGUSR1)  # only this thread takes it: see below

    sender = threading.Thread(target=send_once_queued)
    sender.start()  # (a thread keeps the signal mask it started with)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        start = time.monotonic()
        with pytest.raises(Interrupted):
            gate.acquire(100.0)
        # Not a timing test: without slices the wait ends at its timeout, 100 s (the
        # holder holds for up to 120 s).
        assert time.monotonic() - start < 50
        sender.join()
        release.set()
        holder.join(30)
        other = open_gate(path)
        try:
            other.acquire(10.0)  # the interrupted ticket was not left behind
            other.release()
        finally:
            other.close()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, previous)
        gate.close()
        kill(holder)


@pytest.mark.slow
def test_interrupts_anywhere_in_a_write_leave_nothing_behind(db_path: Path):
    """Exceptions raised by a signal handler at random moments of contended writes
    (another process writes all the while): whatever was interrupted, the gate is not
    left held, no transaction stays open, and every acknowledged write is there. A
    write interrupted after its COMMIT may be present without an acknowledgement."""
    import random
    SessionDB(db_path).close()
    results, start = SPAWN.Queue(), SPAWN.Event()
    rival = SPAWN.Process(target=workers.append_worker,
                          args=(str(db_path), 0, 400, 1000, results, start))
    rival.start()
    db = SessionDB(db_path, write_timeout=10)
    db.ensure_session("mine", "signals")
    rng = random.Random(11)

    def interrupt(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGUSR1, interrupt)
    acked, attempted, interrupted = [], [], 0
    start.set()
    try:
        for i in range(150):
            delay = rng.uniform(0, 0.003)
            timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGUSR1))
            content = f"i{i}"
            try:
                timer.start()
                attempted.append(content)
                db.append_message("mine", "user", content)
                acked.append(content)
                timer.join()
                time.sleep(0.001)  # let a late signal land here, inside the try
            except Interrupted:
                interrupted += 1
                timer.join()
                try:
                    time.sleep(0.001)
                except Interrupted:
                    pass
            # Whatever happened, nothing is left behind (a turn kept after a short
            # write is handed on by the gate's idle thread within IDLE_RELEASE). Read
            # under the gate's lock: the idle thread clears ``_kept`` and then the
            # ticket, both under it, and a read in between saw a ticket not kept.
            gate = db._engine._gate
            with gate._mu:
                assert gate._ticket is None or gate._kept
            assert db._engine._conn.get_autocommit()
            assert not db._engine._writes.active
    finally:
        signal.signal(signal.SIGUSR1, previous)
    reports = workers.collect(results, [rival], 1)
    rival.join(60)
    assert rival.exitcode == 0 and len(reports) == 1
    assert interrupted > 0
    workers.assert_interrupted_writes_accounted(db, db_path, "mine", acked, attempted)
    db.close()


@pytest.mark.slow
def test_write_timeout_while_another_process_holds_the_gate(db_path: Path):
    """A SessionDB write queued behind a stuck holder (a process that took the gate and
    stopped) gives up with WriteTimeout, and writes flow again once the holder dies."""
    db = SessionDB(db_path, write_timeout=0.3)
    db.create_session("s", "cli")
    proc, _ = start_holder(Path(str(db_path) + ".sessiondb-gate"))
    try:
        with pytest.raises(WriteTimeout) as caught:
            db.append_message("s", "user", "stuck")
        assert caught.value.waited_s >= 0.3
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        db.append_message("s", "user", "free")
    finally:
        kill(proc)
    assert [m["content"] for m in db.get_messages("s")] == ["free"]
    db.close()
