"""An exception raised by a signal handler at every point of a write, one point at a time:
of a plain write, a failing one, a ``transaction()`` block, a WAL reset, and the pause
between two steps of long work.

A Python signal handler (Ctrl-C's KeyboardInterrupt, or any handler that raises) runs at
the next point where the interpreter checks for pending work: as a Python function is
entered, and as a call into C returns (and at the back edge of a loop). Those are the
points a *profile function* sees (:func:`sys.setprofile`: ``"call"`` and
``"c_return"``), and an exception raised by a profile function propagates from that
point as the handler's would. So instead of hoping that a timer's signal lands in a window
of a few bytecodes (``test_gate.py::test_interrupts_anywhere_in_a_write_leave_nothing_behind``
does that, at random), each test here first counts the points of sessiondb's own code in
one write, then runs one write per point with an exception raised exactly there. The
profile function is the interpreter's own hook; no OS object is replaced.

Whatever was interrupted, nothing may be left behind: the gate's ticket is free or kept
for this process's next write (and then handed on by the idle thread), no transaction is
open, and every acknowledged write is there exactly once. The sweeps of :class:`Sweep`
also check the instance lock, the checkpointer's lock, gate handle and door, and that
the instance goes on working (a new block and a plain write).

Only sessiondb's own files are swept, not contextlib's frames around its context
managers: an exception landing there (at the entry of a ``with`` block's ``__exit__``,
where nothing of the block can catch it) leaves the block's generator to be closed by
garbage collection (see ``Engine.transaction``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

import workers
from workers import open_gate
from sessiondb import SessionDB, SessionNotFound

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX fcntl locks")

PACKAGE = os.sep + "sessiondb" + os.sep


class Interrupted(BaseException):
    """What the signal handler raises, like KeyboardInterrupt."""


class InterruptAt:
    """A profile function raising :class:`Interrupted` at the ``target``-th point of
    sessiondb's code (a function entered, or a C call returning, in a frame of the
    package); ``target`` 0 only counts the points."""

    def __init__(self, target: int) -> None:
        self.target, self.seen, self.where = target, 0, ""
        self.thrown_into: Any = None

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call":
            # A generator resumed by throw() (contextlib's __exit__ after an exception
            # in its block) goes straight to its handlers: CPython checks for pending
            # signals at no point between. A profile function's exception at its "call"
            # event, though, would unwind it without running them, which no signal
            # handler can do: that point is not counted.
            thrower = getattr(arg, "__self__", None)
            if getattr(arg, "__name__", "") == "throw" and hasattr(thrower, "gi_frame"):
                self.thrown_into = thrower
            return
        if event == "call" and self.thrown_into is not None:
            thrown, self.thrown_into = self.thrown_into, None
            if frame is thrown.gi_frame:
                return
        if event in ("call", "c_return") and PACKAGE in frame.f_code.co_filename:
            self.seen += 1
            if self.seen == self.target:
                self.where = (f"{event} {Path(frame.f_code.co_filename).name}:"
                              f"{frame.f_lineno} {frame.f_code.co_name}")
                raise Interrupted(self.where)

    def run(self, write: Callable[[], None]) -> bool:
        """Run ``write`` under this profile function; True if it was acknowledged."""
        sys.setprofile(self)
        try:
            write()
            return True
        except Interrupted:
            return False
        finally:
            sys.setprofile(None)


def assert_nothing_left_behind(db: SessionDB, other_gate: Any, where: str) -> None:
    gate = db._engine._gate
    with gate._mu:  # the idle thread clears both fields under it
        assert gate._ticket is None or gate._kept, f"gate held, not kept, after {where}"
    assert db._engine._conn.get_autocommit(), f"transaction open after {where}"
    assert not db._engine._writes.active, f"still inside a write after {where}"
    # A turn kept for this process's next write is handed on by the idle thread ...
    workers.wait_for(lambda: gate._ticket is None)
    # ... and then the gate is free for every other handle, in the kernel too.
    other_gate.acquire(10.0)
    other_gate.release()


@pytest.mark.parametrize("turn", ["kept", "left"])
def test_an_interrupt_at_any_point_of_a_write_leaves_nothing_behind(db_path: Path,
                                                                     turn: str):
    """``kept``: each write's release keeps the turn for a next write (the process wrote
    at once before); ``left``: it leaves the gate at once (the process pauses between
    writes). The two release paths differ, so both are swept."""
    db = SessionDB(db_path, write_timeout=10)
    db.ensure_session("s", "signals")
    gate = db._engine._gate
    other_gate = open_gate(Path(str(db_path) + ".sessiondb-gate"))
    acked, attempted = [], []

    def write(content: str) -> Callable[[], None]:
        def append() -> None:
            # The turn heuristics' state, so that this write's release keeps the turn or
            # leaves, whatever the sweep's own pace between writes.
            with gate._mu:
                gate._gap, gate._released_at = (0.0 if turn == "kept" else 1.0), 0.0
            db.append_message("s", "user", content)
        return append

    counter = InterruptAt(0)
    assert counter.run(write("count"))
    acked.append("count")
    attempted.append("count")
    assert counter.seen > 50, counter.seen  # the sweep below reaches the whole write
    interrupted = 0
    for target in range(1, counter.seen + 1):
        content = f"w{target}"
        attempted.append(content)
        at = InterruptAt(target)
        if at.run(write(content)):
            acked.append(content)
        else:
            interrupted += 1
        assert_nothing_left_behind(db, other_gate, at.where or "no interrupt")
    assert interrupted > 50
    workers.assert_interrupted_writes_accounted(db, db_path, "s", acked, attempted)
    other_gate.close()
    db.close()


# -- transaction() blocks, checkpoints, and the pause of long work ---------------------------

class Refused(Exception):
    """What a transaction() block's own body raises."""


def assert_no_ticket_recorded(gate: Any, where: str) -> None:
    """With classic locks, the process's record of tickets (sessiondb.gate_posix) names
    none of this handle's once it left: a stale one would keep another handle of this
    process waiting for it for good."""
    handle = gate._file
    sidecar = getattr(handle, "_sidecar", None)
    if sidecar is not None:
        # Under the gate's _mu too: the idle thread hands a kept turn on under it, and
        # forgets the ticket before it unlocks the slot and then the record.
        with gate._mu, sidecar.mu:
            assert handle not in sidecar.tickets.values(), f"ticket recorded after {where}"


class Sweep:
    """One attempt per interruption point of ``attempt`` (a callable made for a label),
    each followed by the checks of :func:`assert_nothing_left_behind` and more: nothing
    of this instance's is held (its instance lock, the checkpointer's lock, gate and
    door), and a new ``transaction()`` and a plain write succeed. A failing point is
    recorded with where it was interrupted and the instance opened anew, so that one run
    lists every failing point."""

    def __init__(self, db_path: Path, **options: Any) -> None:
        self.path, self.options = db_path, dict(write_timeout=10, **options)
        self.db = SessionDB(db_path, **self.options)
        self.db.ensure_session("s", "signals")
        self.other_gate = open_gate(Path(str(db_path) + ".sessiondb-gate"))
        self.acked: list[str] = []
        self.attempted: list[str] = []
        self.never: list[str] = []  # written by blocks that raised: never committed
        self.failures: list[str] = []
        self.checks = 0

    def run(self, attempt: Callable[[str], Callable[[], None]], least: int) -> int:
        """Sweep every point of ``attempt``; returns how many were interrupted."""
        counter = InterruptAt(0)
        assert counter.run(attempt("count")), "the attempt fails uninterrupted"
        assert counter.seen >= least, counter.seen  # the sweep reaches the whole attempt
        self.check("no interrupt")
        interrupted = 0
        for target in range(1, counter.seen + 1):
            at = InterruptAt(target)
            try:
                interrupted += not at.run(attempt(f"p{target}"))
            except Exception as exc:  # noqa: BLE001 - an error the interrupt caused
                interrupted += 1
                self.failures.append(f"{at.where}: the attempt raised {exc!r}")
            self.check(at.where or "no interrupt")
        return interrupted

    def check(self, where: str) -> None:
        try:
            self._check(where)
        except Exception as exc:  # noqa: BLE001 - recorded, and the run goes on
            self.failures.append(f"{where}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}")
            self._reopen()

    def _check(self, where: str) -> None:
        engine = self.db._engine
        assert not engine._lock._is_owned(), f"instance lock held after {where}"
        ckpt = engine._checkpoints
        assert not ckpt._reset_mu.locked(), f"checkpointer's lock held after {where}"
        if ckpt._gate is not None:
            assert ckpt._gate._ticket is None, f"checkpointer's gate held after {where}"
            assert_no_ticket_recorded(ckpt._gate, where)
            assert self.other_gate.close_door(0), f"reader room's door shut after {where}"
            self.other_gate.open_door()
        assert engine._writes._tx is None, f"transaction recorded after {where}"
        assert_nothing_left_behind(self.db, self.other_gate, where)
        assert_no_ticket_recorded(engine._gate, where)
        self.checks += 1
        tx, plain = f"tx {self.checks}", f"plain {self.checks}"
        self.attempted.extend((tx, plain))
        with self.db.transaction():
            self.db.append_message("s", "user", tx)
        self.acked.append(tx)
        self.db.append_message("s", "user", plain)
        self.acked.append(plain)
        # The next attempt starts with the gate free (not in a kept turn), so that the
        # points it goes through do not depend on the idle thread's pace.
        workers.wait_for(lambda: engine._gate._ticket is None)

    def _reopen(self) -> None:
        """Repair what the failure left (only for the sweep to go on) and open anew."""
        engine = self.db._engine
        if engine._checkpoints._reset_mu.locked():
            engine._checkpoints._reset_mu.release()
        while engine._lock._is_owned():
            engine._lock.release()
        self.db.close()  # rolls back an open transaction; closes (and leaves) the gates
        self.db = SessionDB(self.path, **self.options)

    def finish(self) -> None:
        assert not self.failures, (f"{len(self.failures)} points left something behind:\n"
                                   + "\n".join(self.failures))
        present = {m["content"] for m in self.db.get_messages("s")}
        assert not present & set(self.never), "a block that raised was committed"
        workers.assert_interrupted_writes_accounted(self.db, self.path, "s", self.acked,
                                                    self.attempted)
        self.other_gate.close()
        self.db.close()


@pytest.mark.parametrize("body, turn", [("commits", "kept"), ("commits", "left"),
                                        ("raises", "left")])
def test_an_interrupt_at_any_point_of_a_transaction_leaves_nothing_behind(
        db_path: Path, body: str, turn: str):
    """A ``transaction()`` block of two writes, interrupted at every point of its begin,
    its calls and its commit (``commits``, the turn kept or left as in the sweep of a
    write), or of a block whose own body raises after a write (``raises``: the rollback)."""
    sweep = Sweep(db_path)
    gate = sweep.db._engine._gate

    def attempt(label: str) -> Callable[[], None]:
        def block() -> None:
            db = sweep.db
            with gate._mu:
                gate._gap, gate._released_at = (0.0 if turn == "kept" else 1.0), 0.0
            contents = [f"{label}/1", f"{label}/2"][:1 if body == "raises" else 2]
            (sweep.never if body == "raises" else sweep.attempted).extend(contents)
            try:
                with db.transaction():
                    for content in contents:
                        db.append_message("s", "user", content)
                    if body == "raises":
                        raise Refused(label)
            except Refused:
                return
            sweep.acked.extend(contents)
        return block

    assert sweep.run(attempt, 100) > 100
    sweep.finish()


def test_an_interrupt_at_any_point_of_a_wal_reset_leaves_nothing_behind(db_path: Path):
    """``checkpoint(reset=True)`` after a write: the checkpointer's own gate handle, its
    lock and the reader room's door."""
    sweep = Sweep(db_path)

    def attempt(label: str) -> Callable[[], None]:
        sweep.attempted.append(label)
        sweep.db.append_message("s", "user", label)  # uninterrupted: frames to copy
        sweep.acked.append(label)
        return lambda: sweep.db.checkpoint(reset=True) and None
    assert sweep.run(attempt, 30) > 30
    sweep.finish()


def test_an_interrupt_at_any_point_of_a_pause_for_pollers_leaves_nothing_behind(
        db_path: Path):
    """The pause between two steps of long work, which holds the instance's write gate
    (``Engine._pause_for_pollers``, :func:`sessiondb.maintenance.run_steps`)."""
    sweep = Sweep(db_path)
    assert sweep.run(lambda label: lambda: sweep.db._engine._pause_for_pollers(0.001),
                     5) > 5
    sweep.finish()


def test_an_interrupt_at_any_point_of_a_failing_write_leaves_nothing_behind(db_path: Path):
    """A write whose own callback raises (a message for a session that does not exist):
    the write path's handler rolls back and leaves, whatever lands in it."""
    sweep = Sweep(db_path)

    def attempt(label: str) -> Callable[[], None]:
        def write() -> None:
            try:
                sweep.db.append_message("missing", "user", label)
            except SessionNotFound:
                pass
        return write
    assert sweep.run(attempt, 50) > 50
    sweep.finish()
