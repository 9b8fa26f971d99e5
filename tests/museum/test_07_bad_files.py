"""Exhibit 7: bad files.

In public: stores "repaired" into emptiness, a zero-byte ``state.db`` quietly turned into
a new empty store, a truncated file that crashed the app, a ``-wal`` deleted by a cleanup
script while the gateway was running (two histories, lost transcripts).

For each bad file sessiondb raises a typed error that names the path and says what to do,
changes nothing (the bytes of the file are compared before and after), and
``sessiondb doctor`` reports the same problem.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import apsw
import pytest

import workers
from sessiondb import (
    DatabaseOpenError, SchemaTooNewError, SessionDB, SessionDBError, WalDeletedError,
    doctor,
)

SPAWN = multiprocessing.get_context("spawn")
NOBODY = 65534


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_store(path: Path, messages: int = 200) -> None:
    with SessionDB(path) as db:
        db.create_session("s", "cli")
        for i in range(messages):
            db.append_message("s", "user", f"message {i} " + "x" * 200)


def directory(path: Path) -> None:
    path.mkdir()


def not_sqlite(path: Path) -> None:
    path.write_bytes(b"definitely not SQLite\n" * 500)


def zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def truncated(path: Path) -> None:
    make_store(path)
    os.truncate(path, path.stat().st_size // 2)  # the hostile world's doing


def newer_schema(path: Path) -> None:
    make_store(path, messages=1)
    conn = apsw.Connection(str(path))
    conn.pragma("user_version", 99)
    conn.close()


BAD_FILES: dict[str, tuple[Callable[[Path], None], type[Exception], str]] = {
    # kind: (make it, the error opening raises, words the advice must contain)
    "a directory": (directory, DatabaseOpenError, "pass the path of a file"),
    "not SQLite": (not_sqlite, DatabaseOpenError, "not a SQLite database"),
    "zero bytes": (zero_bytes, DatabaseOpenError, "empty file"),
    "truncated": (truncated, DatabaseOpenError, "sessiondb doctor"),
    "newer schema": (newer_schema, SchemaTooNewError, "upgrade sessiondb"),
}


def fingerprint(path: Path) -> object:
    if path.is_dir():
        return sorted(os.listdir(path))
    return digest(path), path.stat().st_size, path.stat().st_mtime_ns


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_a_bad_file_is_refused_with_advice_and_left_untouched(tmp_path: Path, kind: str,
                                                              exhibit):
    make, error, advice = BAD_FILES[kind]
    path = tmp_path / "state.db"
    make(path)
    before = fingerprint(path)
    with pytest.raises(error) as caught:
        SessionDB(path)
    err = caught.value
    assert isinstance(err, SessionDBError)
    assert err.path == str(path) and str(path) in str(err)
    assert advice in str(err)
    assert fingerprint(path) == before  # nothing overwritten, nothing "repaired"
    report = doctor.check(path)
    assert not report["ok"] and report["problems"]
    assert str(path) in report["problems"][0]
    assert fingerprint(path) == before
    exhibit(f"bad file: {kind}", f"{type(err).__name__}, file untouched, doctor reports it")


# -- permissions: checked as an unprivileged user --------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path is root-only when the
    suite runs as root)."""
    path = Path(tempfile.mkdtemp(prefix="sessiondb-perm-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def open_as_unprivileged(path: str, results) -> None:
    """Spawned: drop to ``nobody`` if running as root, then open and write."""
    if os.geteuid() == 0:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    try:
        with SessionDB(path) as db:
            db.create_session("x", "cli")
        results.put(("opened", ""))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        results.put((type(exc).__name__, str(exc)))


def open_elsewhere(path: Path) -> tuple[str, str]:
    results = SPAWN.Queue()
    proc = SPAWN.Process(target=open_as_unprivileged, args=(str(path), results))
    proc.start()
    outcome = workers.collect(results, [proc], 1, timeout=60)
    proc.join(60)
    assert proc.exitcode == 0 and outcome
    return outcome[0]


def hand_to_nobody(*paths: Path) -> None:
    if os.geteuid() == 0:
        for p in paths:
            os.chown(p, NOBODY, NOBODY)


@pytest.mark.parametrize("case", ["read-only directory, new store",
                                  "read-only directory, existing store",
                                  "store without write permission"])
def test_no_write_permission_is_a_typed_error_that_names_the_path(shared_dir: Path,
                                                                 case: str, exhibit):
    d = shared_dir / "data"
    d.mkdir()
    path = d / "state.db"
    if case != "read-only directory, new store":
        make_store(path, messages=3)
    hand_to_nobody(d, *d.iterdir())  # the store and its sidecars: the user's own files
    if case.startswith("read-only directory"):
        os.chmod(d, 0o500)
    else:
        os.chmod(path, 0o400)
    before = fingerprint(path) if path.exists() else None
    kind, message = open_elsewhere(path)
    os.chmod(d, 0o700)
    assert kind == "DatabaseOpenError", (kind, message)
    assert str(path) in message
    assert "writable" in message
    assert (fingerprint(path) if path.exists() else None) == before
    exhibit(f"no write permission: {case}", f"{kind} naming the path, nothing changed")


# -- a -wal deleted under a live connection --------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("deleted", [["-wal"], ["-wal", "-shm"]])
def test_a_wal_deleted_under_a_live_connection(tmp_path: Path, deleted: list[str], exhibit):
    """A cleanup script (another process) deletes the store's -wal (and -shm) while the
    gateway has it open with acknowledged writes not yet checkpointed. The gateway's next
    write raises WalDeletedError naming the path; everything it had acknowledged is in
    the rescue copy; every later open is refused until a person follows the advice; and
    following it loses nothing."""
    path = tmp_path / "state.db"
    db = SessionDB(path, checkpoint_every=0)  # keep the writes in the -wal
    db.create_session("s", "gateway")
    acknowledged = [db.append_message("s", "user", f"turn {i}") for i in range(40)]
    wal = Path(f"{path}-wal")
    assert wal.stat().st_size > 0
    db_bytes = digest(path)
    subprocess.run(["rm", "-f", *[f"{path}{suffix}" for suffix in deleted]], check=True)

    with pytest.raises(WalDeletedError) as caught:
        db.append_message("s", "user", "after the deletion")
    err = caught.value
    assert err.path == str(path) and str(path) in str(err)
    assert "move the rescue copy" in str(err) and err.marker in str(err)
    assert err.rescue and Path(err.rescue).exists()
    with pytest.raises(WalDeletedError):  # the instance stays stopped
        db.get_messages("s")
    db.close()  # never checkpoints the orphaned -wal over the database file
    assert digest(path) == db_bytes

    # Every later open, in this process or another, is refused and says why.
    with pytest.raises(WalDeletedError) as refused:
        SessionDB(path)
    assert err.rescue in str(refused.value)
    code = subprocess.run([sys.executable, "-c", f"from sessiondb import SessionDB; "
                           f"SessionDB({str(path)!r})"], capture_output=True, text=True)
    assert code.returncode != 0 and "WalDeletedError" in code.stderr
    report = doctor.check(path)
    assert not report["ok"] and "deleted or replaced" in report["problems"][0]

    # Follow the advice: move the store aside, the rescue copy into place, the marker away.
    aside = tmp_path / "aside"
    aside.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{path}{suffix}").exists():
            shutil.move(f"{path}{suffix}", aside)
    shutil.move(err.rescue, path)
    os.unlink(err.marker)
    with SessionDB(path) as db:
        ids = [m["id"] for m in db.get_messages("s")]
        assert ids == acknowledged  # nothing acknowledged was lost
        assert db.get_session("s")["message_count"] == len(acknowledged)
        db.append_message("s", "user", "business as usual")
    assert workers.integrity(path) == [("ok",)]
    assert doctor.check(path)["ok"]
    exhibit(f"{' and '.join('state.db' + s for s in deleted)} deleted under a live writer",
            "WalDeletedError at the next write, rescue copy, later opens refused",
            acknowledged=len(acknowledged), lost=0)


@pytest.mark.slow
def test_a_checkpoint_never_copies_an_orphaned_wal_over_another_process_write(
        tmp_path: Path):
    """The -wal/-shm are deleted; another process opens the store before the live one
    notices and commits a session. The live one's checkpoint() must not copy its orphaned
    frames over the database file (that erased the other process's write)."""
    path = tmp_path / "state.db"
    db = SessionDB(path, checkpoint_every=0, wal_limit=0)
    db.create_session("a", "cli")
    for i in range(20):
        db.append_message("a", "user", f"hello {i}")
    subprocess.run(["rm", f"{path}-wal", f"{path}-shm"], check=True)
    other = subprocess.run(
        [sys.executable, "-c", "from sessiondb import SessionDB\n"
         f"with SessionDB({str(path)!r}) as db:\n"
         "    db.create_session('b', 'cli'); db.append_message('b', 'user', 'from B')"],
        capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    before = digest(path)
    with pytest.raises(WalDeletedError):
        db.checkpoint()
    with pytest.raises(WalDeletedError):
        db.checkpoint(reset=True)
    db.close()
    assert digest(path) == before  # B's committed write is still in the file
