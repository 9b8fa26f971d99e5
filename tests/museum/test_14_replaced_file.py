"""Exhibit 14: the store file replaced under a live process.

In public: a backup "restored" with ``mv backup.db state.db`` (or ``rsync``, or a sync
tool that writes a copy and renames it over) while the gateway kept running. The
gateway went on writing into the old file, which had no name any more: every turn it
acknowledged from then on was gone at its next restart. Worse, the old file's ``-wal``
stayed at the path, and the next process to open the restored file read the old
file's pages from it: the restore silently did not happen (shown below with plain
SQLite), or mixed the two files.

sessiondb compares the file's identity (device, inode) at every write transaction
(:mod:`sessiondb.replacement`): the live instance's next write raises
:class:`StoreReplacedError` and writes nothing, every later call of it too; the file
that replaced the store, the old file and the ``-wal`` are left byte for byte as they
were; later opens are refused until a person has moved the old ``-wal`` aside (the error
says how), and ``sessiondb doctor`` says what happened. Following the advice gives the
restored backup, exactly.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

import workers
from sessiondb import SessionDB, StoreReplacedError, doctor


def digest(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def backup_with_copy(live: SessionDB, path: Path, target: Path) -> None:
    """A file copy of the store (taken while it is idle and checkpointed)."""
    live.checkpoint(reset=True)
    shutil.copy(path, target)


def backup_with_apsw(live: SessionDB, path: Path, target: Path) -> None:
    """SQLite's online backup API, through a connection of its own."""
    dest, src = apsw.Connection(str(target)), apsw.Connection(str(path),
                                                             flags=apsw.SQLITE_OPEN_READONLY)
    try:
        with dest.backup("main", src, "main") as b:
            b.step()
    finally:
        src.close()
        dest.close()


@pytest.mark.parametrize("backup, how", [
    (backup_with_copy, "a copy renamed over it"),
    (backup_with_apsw, "a backup made with apsw's backup API restored over it")])
def test_a_store_replaced_under_a_live_writer(tmp_path: Path, backup, how: str, exhibit):
    path = tmp_path / "state.db"
    live = SessionDB(path, checkpoint_every=0)  # its latest writes stay in the -wal
    live.create_session("s", "gateway")
    for i in range(20):
        live.append_message("s", "user", f"turn {i}")
    saved = tmp_path / "backup.db"
    backup(live, path, saved)
    after_backup = [live.append_message("s", "user", f"later turn {i}") for i in range(30)]
    old = tmp_path / "old-inode.db"
    os.link(path, old)  # keeps the old file reachable, to compare it afterwards
    restore = tmp_path / "restore.db"
    shutil.copy(saved, restore)
    subprocess.run(["mv", str(restore), str(path)], check=True)  # the restore
    wal = Path(f"{path}-wal")
    before = {"new": digest(path), "old": digest(old), "wal": digest(wal)}

    with pytest.raises(StoreReplacedError) as caught:
        live.append_message("s", "user", "after the restore")
    err = caught.value
    assert err.path == str(path) and str(path) in str(err)
    assert err.was == (os.stat(old).st_dev, os.stat(old).st_ino)
    assert err.now == (os.stat(path).st_dev, os.stat(path).st_ino)
    assert "Nothing was written to the old file" in str(err) and err.marker in str(err)
    with pytest.raises(StoreReplacedError):  # the instance stays stopped
        live.get_messages("s")
    live.close()  # and never checkpoints into the old file
    assert {"new": digest(path), "old": digest(old), "wal": digest(wal)} == before

    # What plain SQLite makes of it: the old file's pages, read from the -wal on top of
    # the restored file: the restore did not happen.
    assert workers.read_only(path, "SELECT count(*) FROM messages") == [(50,)]
    # sessiondb refuses to open it until a person has looked, in any process.
    with pytest.raises(StoreReplacedError, match="refusing to open"):
        SessionDB(path)
    code = subprocess.run([sys.executable, "-c", "from sessiondb import SessionDB; "
                           f"SessionDB({str(path)!r})"], capture_output=True, text=True)
    assert code.returncode != 0 and "StoreReplacedError" in code.stderr
    report = doctor.check(path)
    assert not report["ok"] and "was replaced by another file" in report["problems"][0]
    assert report["replaced"]["pid"] == os.getpid()
    assert {"new": digest(path), "old": digest(old)} == {k: before[k] for k in ("new", "old")}

    # The advice: stop every process, move the -wal and -shm aside, delete the marker.
    aside = tmp_path / "aside"
    aside.mkdir()
    for suffix in ("-wal", "-shm"):
        shutil.move(f"{path}{suffix}", aside)
    os.unlink(err.marker)
    with SessionDB(path) as db:
        assert [m["content"] for m in db.get_messages("s")] == [f"turn {i}"
                                                                for i in range(20)]
        db.append_message("s", "user", "business as usual")
    assert workers.integrity(path) == [("ok",)]
    assert doctor.check(path)["ok"]
    exhibit(f"store replaced under a live writer: {how}",
            "StoreReplacedError at the next write, nothing written anywhere, opens refused "
            "until the old -wal is moved aside; then exactly the backup",
            acknowledged_after_backup=len(after_backup), written_after_restore=0,
            stale_rows_plain_sqlite_would_show=50 - 20)


def test_a_store_moved_away_under_a_live_writer(tmp_path: Path, exhibit):
    """``mv state.db elsewhere``: the live instance must not keep writing to it, and the
    next open must not quietly make a new, empty store at the path."""
    path = tmp_path / "state.db"
    live = SessionDB(path)
    live.create_session("s", "cli")
    live.append_message("s", "user", "hello")
    elsewhere = tmp_path / "moved.db"
    subprocess.run(["mv", str(path), str(elsewhere)], check=True)
    moved = digest(elsewhere)
    with pytest.raises(StoreReplacedError) as caught:
        live.append_message("s", "user", "lost?")
    assert caught.value.now is None and "moved away or deleted" in str(caught.value)
    live.close()
    assert digest(elsewhere) == moved and not path.exists()
    with pytest.raises(StoreReplacedError):
        SessionDB(path)
    assert not path.exists()  # no empty store made in its place
    exhibit("store moved away under a live writer",
            "StoreReplacedError, the moved file untouched, no empty store at the path")


def test_a_replacement_during_a_write_is_reported_by_its_commit(tmp_path: Path):
    """The file is replaced while a transaction() block runs: its commit lands in the old
    file (SQLite holds it open), so the call raises instead of acknowledging it."""
    path = tmp_path / "state.db"
    live = SessionDB(path)
    live.create_session("s", "cli")
    spare = tmp_path / "spare.db"
    live.checkpoint(reset=True)
    shutil.copy(path, spare)
    with pytest.raises(StoreReplacedError) as caught:
        with live.transaction():
            live.append_message("s", "user", "in flight")
            subprocess.run(["mv", str(spare), str(path)], check=True)
    assert "had just committed into the old file" in str(caught.value)
    live.close()
    os.unlink(caught.value.marker)
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    with SessionDB(path) as db:
        assert db.get_messages("s") == []  # not in the file at the path: reported above


def test_the_same_file_moved_away_and_back_is_not_a_replacement(tmp_path: Path):
    path = tmp_path / "state.db"
    with SessionDB(path) as db:
        db.create_session("s", "cli")
        subprocess.run(["mv", str(path), str(tmp_path / "x.db")], check=True)
        subprocess.run(["mv", str(tmp_path / "x.db"), str(path)], check=True)
        db.append_message("s", "user", "still the same file")
        assert db.message_count() == 1
    assert not Path(f"{path}.sessiondb-replaced").exists()


def test_a_checkpoint_after_the_replacement_copies_nothing(tmp_path: Path):
    path = tmp_path / "state.db"
    live = SessionDB(path, checkpoint_every=0)
    live.create_session("s", "cli")
    live.checkpoint(reset=True)  # its background reset connection exists now
    for i in range(10):
        live.append_message("s", "user", f"m{i}")
    fresh = tmp_path / "fresh.db"
    SessionDB(fresh).close()
    os.replace(fresh, path)
    before = digest(path), digest(f"{path}-wal")
    with pytest.raises(StoreReplacedError):
        live.checkpoint(reset=True)
    live.close()
    assert (digest(path), digest(f"{path}-wal")) == before
