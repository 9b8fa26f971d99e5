"""The FIFO write gate with real processes, real kernel locks and SIGKILL.

Nothing here asserts timing. Where a test needs "the waiter is queued now", it reads the
gate's ticket counter from the sidecar file (a waiter has queued once it holds a ticket).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import struct
import threading
import time
from pathlib import Path

import pytest

import workers
from sessiondb import SessionDB, WriteTimeout
from sessiondb.gate import FifoGate, GateTimeout, NullGate, make_gate, ofd_locks_available

pytestmark = pytest.mark.skipif(not ofd_locks_available(), reason="needs Linux OFD locks")

SPAWN = multiprocessing.get_context("spawn")


def gate_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db.sessiondb-gate"


def tickets_issued(path: Path) -> int:
    """The gate's ``next`` counter (read-only peek at the sidecar)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        raw = os.pread(fd, 8, 8)
    finally:
        os.close(fd)
    return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0




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
    gate = FifoGate(gate_path(tmp_path))
    for _ in range(100):
        waited, contended = gate.acquire(1.0)
        assert not contended
        gate.release()
    assert oct(os.stat(gate.path).st_mode & 0o777) == "0o600"
    gate.close()


def test_two_gates_in_one_process_exclude_each_other(tmp_path: Path):
    """OFD locks belong to the open file description, not the process."""
    a, b = FifoGate(gate_path(tmp_path)), FifoGate(gate_path(tmp_path))
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
    a, b = FifoGate(gate_path(tmp_path)), FifoGate(gate_path(tmp_path))
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
    issued = tickets_issued(Path(str(db_path) + ".sessiondb-gate"))
    done: list[int] = []
    writer = threading.Thread(target=lambda: done.append(
        second.append_message("s", "user", "second")))
    writer.start()
    workers.wait_for(lambda: tickets_issued(Path(str(db_path) + ".sessiondb-gate")) > issued)
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


def test_null_gate_and_make_gate(tmp_path: Path):
    gate = NullGate()
    assert gate.acquire(0.0) == (0.0, False)
    gate.release()
    gate.close()
    assert isinstance(make_gate(tmp_path / "x.db", enabled=False), NullGate)
    fifo = make_gate(tmp_path / "x.db")
    assert isinstance(fifo, FifoGate)
    assert fifo.path == tmp_path / "x.db.sessiondb-gate"
    fifo.close()


def test_a_timed_out_waiter_gives_up_its_place(tmp_path: Path):
    holder, impatient, patient = (FifoGate(gate_path(tmp_path)) for _ in range(3))
    holder.acquire(1.0)
    for _ in range(3):  # three abandoned tickets between the holder and the next waiter
        with pytest.raises(GateTimeout):
            impatient.acquire(0.05)
    waiter = Acquirer(patient, 30.0)
    issued = tickets_issued(holder.path)
    waiter.start()
    workers.wait_for(lambda: tickets_issued(holder.path) > issued)
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
    gate = FifoGate(gate_path(tmp_path))
    gate.acquire(1.0)
    pid = os.fork()
    if pid == 0:  # child: the parent holds the gate, so we must time out, not barge in
        code = 1
        try:
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
def test_a_holder_killed_while_holding_frees_the_gate(tmp_path: Path):
    path = gate_path(tmp_path)
    proc, _ = start_holder(path)
    try:
        gate = FifoGate(path)
        with pytest.raises(GateTimeout):
            gate.acquire(0.1)
        waiter = Acquirer(gate, 30.0)
        issued = tickets_issued(path)
        waiter.start()
        workers.wait_for(lambda: tickets_issued(path) > issued)  # queued behind the holder
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
        issued = tickets_issued(path)
        queued.start()
        workers.wait_for(lambda: tickets_issued(path) > issued)  # it holds a ticket: queued
        os.kill(queued.pid, signal.SIGKILL)
        queued.join(30)
        assert not entered.is_set()
        gate = FifoGate(path)
        waiter = Acquirer(gate, 30.0)
        issued = tickets_issued(path)
        waiter.start()
        workers.wait_for(lambda: tickets_issued(path) > issued)
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
        gate = FifoGate(path)
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
        gate = FifoGate(path)
        issued = tickets_issued(path)

        def send_once_queued() -> None:
            workers.wait_for(lambda: tickets_issued(path) > issued)
            os.kill(os.getpid(), signal.SIGUSR1)

        sender = threading.Thread(target=send_once_queued)
        sender.start()
        with pytest.raises(Interrupted):
            gate.acquire(30.0)
        sender.join()
        release.set()
        holder.join(30)
        assert holder.exitcode == 0
        other = FifoGate(path)
        other.acquire(10.0)  # GateTimeout here: the interrupted ticket was left behind
        other.release()
        gate.acquire(1.0)  # and the interrupted gate itself is usable again
        gate.release()
        gate.close()
        other.close()
    finally:
        signal.signal(signal.SIGUSR1, previous)
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
            # write is handed on by the gate's idle thread within IDLE_RELEASE):
            assert db._engine._gate._ticket is None or db._engine._gate._kept
            assert db._engine._conn.get_autocommit()
            assert not db._engine._writes.active
    finally:
        signal.signal(signal.SIGUSR1, previous)
    reports = workers.collect(results, [rival], 1)
    rival.join(60)
    assert rival.exitcode == 0 and len(reports) == 1
    assert interrupted > 0
    present = [m["content"] for m in db.get_messages("mine")]
    assert set(acked) <= set(present) <= set(attempted)
    assert len(present) == len(set(present))
    assert db.get_session("mine")["message_count"] == len(present)
    other = SessionDB(db_path, write_timeout=5)
    other.append_message("mine", "user", "after")  # the gate is free
    other.close()
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
