"""An exception raised by a signal handler at every point of a write, one point at a time.

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
open, and every acknowledged write is there exactly once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

import workers
from workers import open_gate
from sessiondb import SessionDB

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

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
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
