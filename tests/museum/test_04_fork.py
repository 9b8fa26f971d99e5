"""Exhibit 4: fork. An instance used in a child after ``os.fork()``: the child opens its
own connection and never touches the parent's (not even to close it), while the parent
keeps writing.

SQLite's per-process lock state is copied by fork(), so the store closes idle
connections just before it (both sides reopen on their next call) and refuses, with a
typed error, a file whose connection was mid-transaction at fork time. The children here
report through exit codes (``os._exit``), never by raising into pytest.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import apsw
import pytest

import workers

import sessiondb
import sessiondb.forks
from sessiondb import DatabaseOpenError, SessionDB

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")]


def run_child(body: Callable[[], int]) -> int:
    """Fork; the child runs ``body`` and exits with its return value (1 on exception)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = body()
        except BaseException:  # noqa: BLE001 - reported through the exit code
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = 120.0) -> int:
    """Exit code of the child; kill it and fail if it is still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("forked child hung")
        time.sleep(0.01)




def test_child_writes_through_the_same_instance_while_the_parent_writes(db_path: Path,
                                                                        exhibit):
    db = SessionDB(db_path)
    db.create_session("shared", "fork")
    db.append_message("shared", "user", "before the fork")
    before_fork = db._engine._conn
    count = 300

    def child() -> int:
        for i in range(count):
            db.append_message("shared", "user", f"c-{i}")
        db.create_session("child-own", "fork")
        if db._engine._conn is before_fork:
            return 10
        if db._engine._gate._pid != os.getpid():  # a gate descriptor of its own
            return 11
        db.close()
        return 0

    pid = run_child(child)
    for i in range(count):
        db.append_message("shared", "user", f"p-{i}")
    assert wait_child(pid) == 0
    db.append_message("shared", "user", "after the child")
    contents = [m["content"] for m in db.get_messages("shared")]
    expected = (["before the fork", "after the child"] + [f"c-{i}" for i in range(count)]
                + [f"p-{i}" for i in range(count)])
    assert sorted(contents) == sorted(expected)
    assert [c for c in contents if c.startswith("c-")] == [f"c-{i}" for i in range(count)]
    assert [c for c in contents if c.startswith("p-")] == [f"p-{i}" for i in range(count)]
    assert db.get_session("shared")["message_count"] == len(expected)
    assert db.get_session("child-own") is not None
    db.close()
    assert workers.integrity(db_path) == [("ok",)]
    exhibit("fork(): parent and child write through one SessionDB at once",
            "each side on its own connection; every write present, integrity ok",
            child_writes=count, parent_writes=count, lost=0)


def test_child_writes_survive_the_parent_closing_its_store(db_path: Path):
    """SQLite's per-process lock state is inherited by a fork child: a connection the
    child opens to a file the parent still had open joins that state and takes no real
    locks, so the parent closing its last connection may delete the -wal file under the
    child, and the child's later commits go to an unlinked file: lost as soon as the
    child exits without a final checkpoint (a crash, ``os._exit``). The store closes idle
    connections before fork() so that both sides start clean."""
    db = SessionDB(db_path)
    db.create_session("s", "fork")
    db.append_message("s", "user", "parent")
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()

    def child() -> int:
        os.close(to_child_w)
        os.close(from_child_r)
        db.append_message("s", "user", "child before")
        os.write(from_child_w, b"1")
        os.read(to_child_r, 1)  # the parent has closed its store
        db.append_message("s", "user", "child after")
        return 0  # exit without close, as a crash would: committed writes must survive

    pid = run_child(child)
    os.close(to_child_r)
    os.close(from_child_w)
    try:
        assert os.read(from_child_r, 1) == b"1"
        db.close()  # the parent's last connection to the file
        os.write(to_child_w, b"1")
        assert wait_child(pid) == 0
    finally:
        os.close(to_child_w)
        os.close(from_child_r)
    reader = SessionDB(db_path)
    assert [m["content"] for m in reader.get_messages("s")] == [
        "parent", "child before", "child after"]
    reader.close()
    assert workers.integrity(db_path) == [("ok",)]


def test_close_in_the_child_leaves_the_parent_alone(db_path: Path):
    db = SessionDB(db_path)
    db.create_session("s", "fork")

    def child() -> int:
        db.close()  # never used in the child: nothing of the parent's is touched
        db.close()
        return 0

    assert wait_child(run_child(child)) == 0
    db.append_message("s", "user", "still writing")
    assert db.message_count("s") == 1
    db.close()
    assert workers.integrity(db_path) == [("ok",)]


def test_fork_waits_for_another_threads_transaction(db_path: Path):
    """fork() from one thread while another is inside a transaction: the fork waits for
    the transaction to end (bounded by write_timeout), so the child starts clean and
    neither deadlocks on the instance lock nor inherits the parent's write lock."""
    db = SessionDB(db_path)
    db.create_session("s", "fork")
    inside = threading.Event()

    def hold() -> None:
        with db.transaction():
            db.append_message("s", "user", "parent in transaction")
            inside.set()
            time.sleep(0.3)
        db.append_message("s", "user", "parent after")

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(30)

    def child() -> int:
        db.append_message("s", "user", "child")
        return 0

    pid = run_child(child)
    holder.join(30)
    assert wait_child(pid) == 0
    contents = [m["content"] for m in db.get_messages("s")]
    assert contents[0] == "parent in transaction"
    assert sorted(contents[1:]) == ["child", "parent after"]
    db.close()
    assert workers.integrity(db_path) == [("ok",)]


def test_fork_inside_a_transaction_makes_the_file_unusable_in_the_child(db_path: Path):
    """Forking from inside a write transaction copies SQLite's lock state mid-write. The
    child gets a typed error (no hang, no write), never touches the inherited connection,
    and the parent's transaction commits normally."""
    db = SessionDB(db_path)
    db.create_session("s", "fork")
    parent_pid = os.getpid()
    used_in_child: list[str] = []

    def trace(cursor: apsw.Cursor, sql: str, bindings: object) -> bool:
        if os.getpid() != parent_pid:
            used_in_child.append(sql)
        return True

    def child() -> int:
        try:
            db.append_message("s", "user", "from the child")
            return 10
        except DatabaseOpenError:
            pass
        try:
            SessionDB(db_path).append_message("s", "user", "from a new instance")
            return 11
        except DatabaseOpenError:
            pass
        if used_in_child:
            return 12
        if inherited not in sessiondb.forks._INHERITED:  # kept referenced, never closed
            return 13
        db.close()
        return 0

    with db.transaction():
        db.append_message("s", "user", "parent")
        inherited = db._engine._conn
        inherited.exec_trace = trace
        pid = run_child(child)
    assert wait_child(pid) == 0
    inherited.exec_trace = None
    db.append_message("s", "user", "parent again")
    assert [m["content"] for m in db.get_messages("s")] == ["parent", "parent again"]
    db.close()
    assert workers.integrity(db_path) == [("ok",)]


def test_a_child_leaving_the_parents_transaction_block_touches_nothing(db_path: Path):
    """Forked inside ``transaction()``, the child unwinds the block too: it must neither
    commit nor roll back the parent's transaction (that would rewrite the shared WAL
    index under other writers), and the parent's transaction still commits."""
    db = SessionDB(db_path)
    db.create_session("s", "cli")
    with db.transaction():
        db.append_message("s", "user", "parent, inside")

        pid = os.fork()
        if pid == 0:  # the child leaves the block the parent is in
            code = 3
            try:
                db._engine._writes.finish(db._engine._conn, True)
            except sessiondb.ConfigurationError:
                code = 0
            except BaseException:  # noqa: BLE001 - reported through the exit code
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        db.append_message("s", "user", "parent, still inside")
    other = SessionDB(db_path, write_timeout=5)
    other.append_message("s", "user", "another writer after")
    assert [m["content"] for m in other.get_messages("s")] == [
        "parent, inside", "parent, still inside", "another writer after"]
    assert workers.integrity(db_path) == [("ok",)]
    other.close()
    db.close()


_FINALIZING_CHILD = r'''
import os, subprocess, sys
from sessiondb import SessionDB
path, writer_script = sys.argv[1], sys.argv[2]
db = SessionDB(path, checkpoint_every=0, wal_limit=0)
db.create_session("s1", "cli")
r, w = os.pipe()
try:
    with db.transaction():
        db.create_session("s2", "cli")
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)      # until the other writer has spilled frames into the WAL
            sys.exit(0)        # a normal exit: the interpreter finalizes every object
except Exception:
    if pid == 0:
        raise
os.close(r)
writer = subprocess.Popen([sys.executable, "-c", writer_script, path],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert writer.stdout.readline().startswith("spilled")
os.write(w, b"x")
os.waitpid(pid, 0)
writer.stdin.write("\n")
writer.stdin.flush()
print(writer.stdout.readline().strip())
sys.exit(writer.wait())
'''

_SPILLING_WRITER = r'''
import sys
import apsw
c = apsw.Connection(sys.argv[1])
c.set_busy_timeout(10000)
c.execute("PRAGMA cache_size=20")  # a small cache: the open transaction spills to the WAL
c.execute("BEGIN IMMEDIATE")
for i in range(400):
    c.execute("INSERT INTO messages(session_id, role, content, timestamp) "
              "VALUES('s1', 'user', ?, 0)", (f"{i}:" + "x" * 3000,))
print("spilled", flush=True)
sys.stdin.readline()
c.execute("COMMIT")
print("committed", flush=True)
'''


def test_a_child_forked_mid_transaction_never_closes_the_inherited_connection(
        tmp_path: Path):
    """The child leaves the parent's transaction() block and exits normally, so the
    interpreter finalizes every object; the inherited connection must not be closed (that
    would roll the parent's transaction back through the shared WAL index and corrupt a
    concurrent writer's spilled frames). Found in review; reproduced with a real writer."""
    import subprocess
    import sys
    path = tmp_path / "state.db"
    done = subprocess.run([sys.executable, "-c", _FINALIZING_CHILD, str(path),
                           _SPILLING_WRITER], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "committed"
    db = SessionDB(path)
    assert db.message_count("s1") == 400
    assert workers.integrity(path) == [("ok",)]
    db.close()
