"""The rollback journal, opted in on a filesystem where WAL is unsafe
(``unsafe_filesystem="journal"``, sessiondb.filesystems): the whole API, many processes,
a killed writer, the hold bound, a full disk, and the trade-off (readers and writers
wait for each other). The filesystem is reported as NFS (tests/fakefs.py); on a real
FUSE mount, see tests/test_filesystems.py and the museum's exhibit 13.

Any other test module runs this way too:
``PYTHONPATH=tests/journal_mode SESSIONDB_UNSAFE_FILESYSTEM=journal pytest tests/...``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import apsw
import pytest

import fakefs
import workers
from sessiondb import (
    DatabaseBusyError, DiskFullError, HoldTimeout, SessionDB, WriteTimeout, filesystems,
)
from sessiondb.filesystems import ENV_POLICY

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(autouse=True)
def on_nfs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every store here is on NFS, and every process (spawned ones inherit the
    environment and call :func:`journal_worker`) opted in."""
    monkeypatch.setattr(filesystems, "examine", fakefs.on("nfs4", 0x6969))
    monkeypatch.setenv(ENV_POLICY, "journal")


def journal_worker(target: str, *args: Any) -> None:
    """Spawned: on NFS like the parent, then run ``workers.<target>(*args)``."""
    fakefs.install("nfs4", 0x6969)
    getattr(workers, target)(*args)


def test_pragmas_files_and_the_absent_checkpoint_machinery(tmp_path: Path):
    path = tmp_path / "state.db"
    with SessionDB(path, checkpoint_every=1, wal_limit=1024) as db:
        conn = db._engine._conn
        assert conn.pragma("journal_mode") == "delete"
        assert conn.pragma("synchronous") == 2  # FULL: durable without a WAL
        db.create_session("s", "cli")
        for i in range(30):
            db.append_message("s", "user", f"m{i} " + "x" * 2000)
        assert db.checkpoint(reset=True) == {"wal_frames": 0, "checkpointed_frames": 0}
        stats = db.stats()
        assert stats["journal_mode"] == "delete" and stats["wal_bytes"] == 0
        assert stats["filesystem"]["type"] == "nfs4"
        assert stats["checkpoint"]["passive_runs"] == 0
        assert stats["checkpoint"]["resets_ok"] == stats["checkpoint"]["resets_failed"] == 0
        names = sorted(os.listdir(tmp_path))
    assert not any(n.endswith(("-wal", "-shm", "-journal")) for n in names), names
    assert workers.integrity(path) == [("ok",)]


def test_the_whole_api(tmp_path: Path):
    path = tmp_path / "tour.db"
    workers.tour_api(path, on_open=lambda db: _assert_journal(db))
    assert workers.integrity(path) == [("ok",)]


def _assert_journal(db: SessionDB) -> None:
    assert db._engine._conn.pragma("journal_mode") == "delete"


@pytest.mark.slow
def test_many_processes_lose_nothing(tmp_path: Path):
    path = str(tmp_path / "state.db")
    SessionDB(path).close()
    results, start = SPAWN.Queue(), SPAWN.Event()
    reports = workers.run_all(SPAWN, journal_worker, [
        ("append_worker", path, w, 40, 10, results, start) for w in range(4)],
        results, start)
    acked = {mid for r in reports for mid, _ in r["acked"]}
    assert len(acked) == 160 and all(r["timeouts"] == r["failed"] == 0 for r in reports)
    with SessionDB(path) as db:
        ids = {m["id"] for m in db.get_messages("shared")}
        assert acked <= ids
        assert db.get_session("shared")["message_count"] == 160
        assert db.message_count() == 160 + 4 * 4
        assert db._engine._conn.pragma("journal_mode") == "delete"
    assert workers.integrity(path) == [("ok",)]


@pytest.mark.slow
def test_a_writer_killed_mid_transaction_is_rolled_back_from_its_journal(tmp_path: Path):
    path = str(tmp_path / "state.db")
    with SessionDB(path) as db:
        db.create_session("s", "cli")
        db.append_message("s", "user", "before")
    held, release = SPAWN.Event(), SPAWN.Event()
    holder = SPAWN.Process(target=journal_worker, args=(
        "transaction_holder_worker", path, held, release))
    holder.start()
    assert held.wait(60)
    assert os.path.exists(path + "-journal")  # its rollback journal, hot once it dies
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with SessionDB(path) as db:  # the next writer rolls the hot journal back
        db.append_message("s", "user", "after")
        assert [m["content"] for m in db.get_messages("s")] == ["before", "after"]
        assert db.get_session("s")["message_count"] == 2
    assert workers.integrity(path) == [("ok",)]


def test_readers_and_writers_wait_for_each_other(tmp_path: Path):
    """The trade-off: a reader's snapshot holds back every writer's commit until it
    ends (in WAL mode writers go on meanwhile)."""
    path = tmp_path / "state.db"
    reader = SessionDB(path)
    writer = SessionDB(path, write_timeout=0.5)
    try:
        writer.create_session("s", "cli")
        with reader.snapshot():
            assert reader.message_count() == 0
            started = time.monotonic()
            with pytest.raises(WriteTimeout):
                writer.append_message("s", "user", "waits for the reader")
            assert time.monotonic() - started >= 0.5
        writer.append_message("s", "user", "after the reader")
        assert reader.message_count() == 1
    finally:
        writer.close()
        reader.close()


def test_the_hold_bound(tmp_path: Path):
    path = tmp_path / "state.db"
    with SessionDB(path, hold_timeout=0.3) as db, SessionDB(path) as other:
        db.create_session("s", "cli")
        with pytest.raises(HoldTimeout):
            with db.transaction():
                db.append_message("s", "user", "too slow")
                time.sleep(0.6)
        other.append_message("s", "user", "goes on")
        assert [m["content"] for m in other.get_messages("s")] == ["goes on"]


def test_leaving_wal_needs_the_store_to_itself(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "state.db"
    monkeypatch.setenv(ENV_POLICY, "allow")
    wal = SessionDB(path)  # a process that opened it with WAL (an older sessiondb)
    wal.create_session("s", "cli")
    monkeypatch.setenv(ENV_POLICY, "journal")
    with pytest.raises(DatabaseBusyError, match="unsafe_filesystem='journal'"):
        SessionDB(path, write_timeout=0.3)
    wal.close()
    with SessionDB(path) as db:  # alone: switched, nothing lost
        assert db._engine._conn.pragma("journal_mode") == "delete"
        assert db.get_session("s") is not None


class FullDisk(apsw.VFS):
    """The platform's VFS, whose writes to the database or its journal fail with
    ENOSPC (``SQLITE_FULL``) while ``full`` is set."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.full = False
        self.failed = 0
        super().__init__(name, "")

    def xOpen(self, name: Any, flags: list[int]) -> apsw.VFSFile:
        vfs = self

        class File(apsw.VFSFile):
            def xWrite(self, data: Any, offset: int) -> None:
                if vfs.full and flags[0] & (apsw.SQLITE_OPEN_MAIN_DB
                                            | apsw.SQLITE_OPEN_MAIN_JOURNAL):
                    vfs.failed += 1
                    raise apsw.FullError("injected ENOSPC")
                super().xWrite(data, offset)

        return File("", name, flags)


def test_a_full_disk_fails_the_write_typed_and_the_instance_recovers(tmp_path: Path):
    vfs = FullDisk(f"journal-full-{os.getpid()}")
    try:
        with SessionDB(tmp_path / "state.db", vfs=vfs.name, write_timeout=2) as db:
            db.create_session("s", "cli")
            db.append_message("s", "user", "before")
            vfs.full = True
            for attempt in range(3):
                with pytest.raises(DiskFullError):
                    db.append_message("s", "user", "x" * 5000)
                with pytest.raises(DiskFullError):
                    with db.transaction():
                        db.append_message("s", "user", "in a block")
            assert vfs.failed >= 6
            vfs.full = False
            db.append_message("s", "user", "after")
            assert [m["content"] for m in db.get_messages("s")] == ["before", "after"]
            assert db.get_session("s")["message_count"] == 2
        assert workers.integrity(tmp_path / "state.db") == [("ok",)]
    finally:
        vfs.unregister()
