"""Exhibit 9: files and permissions.

In public: transcripts readable by every user of the machine (a 0644 database in a 0755
directory), and a lock file that another user replaced with a symlink, so that the app
truncated one of the victim's files when it "created" its lock.

New directories are 0700 and every file sessiondb creates is 0600 (the store, its -wal
and -shm, the sidecars, a rescue copy); existing permissions are left alone; no sidecar
that is a symlink is ever followed; the default location follows platformdirs and the
``SESSIONDB_PATH`` override.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import apsw
import pytest

from sessiondb import DatabaseOpenError, SessionDB, WalDeletedError, schema
from sessiondb.connection import ENV_PATH, default_path


def mode(path: Path | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- where and how files are created ------------------------------------------------


def test_new_directory_is_0700_and_files_are_0600(tmp_path: Path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "new" / "state.db"
        db = SessionDB(path)
        db.create_session("s", "cli")
        db.append_message("s", "user", "hello")
        assert mode(path.parent) == 0o700
        assert mode(path) == 0o600
        assert mode(str(path) + "-wal") == 0o600
        assert mode(str(path) + "-shm") == 0o600
        assert mode(str(path) + ".sessiondb-gate") == 0o600
        db.close()
    finally:
        os.umask(old)


def test_existing_file_permissions_are_left_alone(tmp_path: Path):
    path = tmp_path / "shared.db"
    SessionDB(path).close()
    os.chmod(path, 0o640)
    SessionDB(path).close()
    assert mode(path) == 0o640


def test_sessiondb_path_environment_variable(tmp_path: Path, monkeypatch):
    target = tmp_path / "from-env" / "custom.db"
    monkeypatch.setenv(ENV_PATH, str(target))
    assert default_path() == target
    db = SessionDB()
    assert db.path == target
    db.create_session("s", "cli")
    db.close()
    assert target.exists()


def test_platformdirs_default_location(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(ENV_PATH, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "sessiondb" / "state.db"
    assert default_path() == expected
    with SessionDB() as db:
        assert db.path == expected
        db.create_session("s", "cli")
    assert expected.exists()
    assert mode(expected.parent) == 0o700
    assert mode(expected) == 0o600


def test_tilde_is_expanded(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with SessionDB("~/tilde.db") as db:
        assert db.path == tmp_path / "tilde.db"
    assert (tmp_path / "tilde.db").exists()


def test_a_symlinked_gate_sidecar_is_refused_not_followed(tmp_path: Path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"do not touch")
    (tmp_path / "state.db.sessiondb-gate").symlink_to(target)
    with pytest.raises(DatabaseOpenError, match="symbolic link") as info:
        SessionDB(tmp_path / "state.db")
    assert info.value.path == str(tmp_path / "state.db")
    assert target.read_bytes() == b"do not touch"


def make_v1_store(path: Path) -> None:
    """A store of schema v1 (sessiondb 0.1.0), which opening upgrades under the
    migration lock sidecar."""
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", "wal")
    conn.execute(schema.MIGRATIONS[0])
    conn.pragma("user_version", 1)
    conn.close()


def test_a_symlinked_migration_lock_is_refused_not_followed(tmp_path: Path, exhibit):
    path = tmp_path / "state.db"
    make_v1_store(path)
    victim = tmp_path / "victims-notes.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "state.db.sessiondb-migrate.lock").symlink_to(victim)
    with pytest.raises(DatabaseOpenError, match="migration lock sidecar") as info:
        SessionDB(path)
    assert info.value.path == str(path) and "remove it" in str(info.value)
    assert victim.read_bytes() == b"precious"  # neither truncated nor locked
    (tmp_path / "state.db.sessiondb-migrate.lock").unlink()
    with SessionDB(path) as db:  # once the symlink is gone, the upgrade runs
        assert db._engine._conn.pragma("user_version") == schema.SCHEMA_VERSION
    exhibit("a lock sidecar turned into a symlink by another user",
            "not followed (O_NOFOLLOW): DatabaseOpenError naming it, target untouched")


def test_a_rescue_copy_and_its_marker_are_private(tmp_path: Path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "state.db"
        db = SessionDB(path, checkpoint_every=0)
        db.create_session("s", "cli")
        db.append_message("s", "user", "a private transcript")
        subprocess.run(["rm", f"{path}-wal"], check=True)
        with pytest.raises(WalDeletedError) as info:
            db.append_message("s", "user", "refused")
        db.close()
    finally:
        os.umask(old)
    assert info.value.rescue is not None
    assert mode(info.value.rescue) == 0o600
    assert mode(info.value.marker) == 0o600
