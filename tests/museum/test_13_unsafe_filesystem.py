"""Exhibit 13: a store on a filesystem where WAL breaks.

In public: ``state.db`` in a home directory on NFS or SMB ("locking protocol" errors,
then a malformed database), in a folder a container or VM shares with its host over
virtiofs or 9p (corrupt within a minute), on WSL's ``/mnt/c``, on a FUSE mount. WAL needs
shared memory and locks that every process sees coherently; these filesystems do not
give them to processes that see the files through different clients.

Reproduced with real FUSE mounts (tests/fusefs.py, a plain passthrough; skipped where
FUSE cannot be mounted): one directory mounted twice is two views of the same files,
each with its own page cache and locks, as a VM and its host (virtiofs, 9p) or two NFS
clients have. Plain SQLite with a writer on each view loses acknowledged writes.
sessiondb refuses to open a store there with a typed error that names the filesystem and
the remedies, and creates nothing; with the opt-in rollback journal, four processes
writing through one mount lose nothing. (The journal needs every process on one client:
through two views it loses writes too, which the figures below show.) The filesystems
this machine cannot mount (NFS, SMB, 9p, virtiofs ...) are classified from their
``statfs`` magics and mountinfo lines in tests/test_filesystems.py.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

import mounts
import workers
from sessiondb import SessionDB, UnsafeFilesystemError, doctor
from sessiondb.filesystems import ENV_POLICY

SPAWN = multiprocessing.get_context("spawn")
ROWS = 200
#: A writer of plain SQLite (apsw, no sessiondb): ROWS inserts, each its own transaction.
PLAIN_WRITER = """
import apsw, sys
conn = apsw.Connection(sys.argv[1])
conn.set_busy_timeout(5000)
acked = 0
for i in range(int(sys.argv[3])):
    try:
        conn.execute("INSERT INTO t VALUES (?)", (sys.argv[2] + str(i),))
        acked += 1
    except apsw.Error:
        pass
print(acked)
"""


def plain_sqlite_through_two_views(views: list[Path], mode: str) -> tuple[int, str]:
    """Two plain SQLite writers, one through each view; (acknowledged, what the store
    holds afterwards)."""
    name = f"plain-{mode}.db"
    conn = apsw.Connection(str(views[0] / name))
    conn.pragma("journal_mode", mode)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    procs = [subprocess.Popen([sys.executable, "-c", PLAIN_WRITER, str(view / name),
                               f"w{i}-", str(ROWS)], stdout=subprocess.PIPE, text=True)
             for i, view in enumerate(views)]
    acked = sum(int(p.communicate(timeout=120)[0].strip() or 0) for p in procs)
    try:
        conn = apsw.Connection(str(views[0] / name))
        held = f"{conn.execute('SELECT count(*) FROM t').fetchone()[0]} rows, integrity " \
               f"{conn.execute('PRAGMA integrity_check').fetchone()[0]}"
        conn.close()
    except apsw.Error as exc:
        held = f"unreadable: {exc}"
    return acked, held


@pytest.mark.slow
def test_a_store_on_two_views_of_one_directory(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch, exhibit):
    monkeypatch.delenv(ENV_POLICY, raising=False)
    with contextlib.ExitStack() as stack:
        views = [stack.enter_context(mounts.mounted("fuse", tmp_path, name))
                 for name in ("view-1", "view-2")]
        # Without sessiondb (figures only: how much is lost varies from run to run).
        wal_acked, wal_held = plain_sqlite_through_two_views(views, "wal")
        journal_acked, journal_held = plain_sqlite_through_two_views(views, "delete")
        for name in os.listdir(views[0]):
            os.unlink(views[0] / name)

        # sessiondb refuses on either view, and says what to do.
        for view in views:
            path = view / "agents" / "state.db"
            with pytest.raises(UnsafeFilesystemError) as caught:
                SessionDB(path)
            err = caught.value
            assert (err.filesystem, err.mount_point) == ("fuse.passfs", str(view))
            for words in ("fuse.passfs", "local disk", "postgresql://",
                          "unsafe_filesystem='journal'", "on this one machine"):
                assert words in str(err), words
            report = doctor.check(path)
            assert not report["ok"] and report["filesystem"]["verdict"] == "unsafe"
        assert os.listdir(views[0]) == []  # nothing created, not even the directory

        # Opted in (every process: the environment), all through one view.
        monkeypatch.setenv(ENV_POLICY, "journal")
        path = views[0] / "agents" / "state.db"
        SessionDB(path).close()
        results, start = SPAWN.Queue(), SPAWN.Event()
        reports = workers.run_all(SPAWN, workers.append_worker, [
            (str(path), w, 30, 10, results, start) for w in range(4)], results, start)
        acked = {mid for r in reports for mid, _ in r["acked"]}
        with SessionDB(path) as db:
            assert db.stats()["journal_mode"] == "delete"
            assert acked <= {m["id"] for m in db.get_messages("shared")}
            assert db.get_session("shared")["message_count"] == len(acked) == 120
        assert workers.integrity(path) == [("ok",)]
        assert not any(n.endswith(("-wal", "-shm")) for n in os.listdir(path.parent))
        assert doctor.check(path)["ok"]
    exhibit("a store on a FUSE filesystem, seen through two mounts (as a VM and its host)",
            "plain SQLite loses acknowledged writes; sessiondb: UnsafeFilesystemError "
            "naming fuse.passfs, nothing created; opted in to the rollback journal through "
            "one mount: 4 processes, nothing lost",
            plain_wal=f"{wal_acked} acknowledged, {wal_held}",
            plain_journal_two_views=f"{journal_acked} acknowledged, {journal_held}",
            sessiondb_journal_one_view=f"{len(acked)} acknowledged, {len(acked)} there")
