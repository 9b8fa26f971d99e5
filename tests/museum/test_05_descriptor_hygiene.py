"""Exhibit 5: descriptor hygiene. Nothing but SQLite opens, truncates, renames, deletes
or closes the database files.

Closing *any* descriptor of the database file drops every POSIX lock the process holds
on it (https://sqlite.org/howtocorrupt.html#_posix_advisory_locks_canceled_by_a_separate_thread_doing_close_),
so the library must never open the db, ``-wal``, ``-shm`` (or ``-journal``) path itself.
SQLite's own opens happen in C and are not seen by these traps; every Python-level door
to the file system is trapped during a full exercise of the API.
"""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import traceback
from pathlib import Path
from typing import Any, Callable

import apsw
import pytest

import workers
from sessiondb import DatabaseOpenError, SchemaTooNewError, SessionDB, WalDeletedError, doctor
from sessiondb.cli import main as cli


class FileTrap(BaseException):
    """Raised where the library touched a guarded file (a BaseException, so that no
    ``except Exception`` in the library can swallow it)."""


class Trap:
    """Wraps the Python-level file-system calls and records any that reach a guarded
    path, or a descriptor that refers to one."""

    SUFFIXES = ("", "-wal", "-shm", "-journal")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.mp = monkeypatch
        self.guarded: set[str] = set()
        self.violations: list[str] = []

    def guard(self, db_path: Path) -> None:
        base = os.path.realpath(db_path)
        self.guarded.update(base + suffix for suffix in self.SUFFIXES)

    def _hit_path(self, path: Any) -> bool:
        if isinstance(path, int):
            return self._hit_fd(path)
        try:
            name = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        return os.path.realpath(name) in self.guarded

    def _hit_fd(self, fd: int) -> bool:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return False
        return target in self.guarded

    def _fail(self, what: str, arg: Any) -> None:
        stack = "".join(traceback.format_stack(limit=8)[:-2])
        self.violations.append(f"{what}({arg!r})\n{stack}")
        raise FileTrap(f"{what}({arg!r}) touched a database file")

    def _wrap_path(self, module: Any, name: str, argc: int = 1) -> None:
        real: Callable = getattr(module, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for arg in args[:argc]:
                if self._hit_path(arg):
                    self._fail(f"{module.__name__}.{name}", arg)
            return real(*args, **kwargs)

        self.mp.setattr(module, name, wrapper)

    def _wrap_fd(self, module: Any, name: str) -> None:
        real: Callable = getattr(module, name)

        def wrapper(fd: int, *args: Any, **kwargs: Any) -> Any:
            if isinstance(fd, int) and self._hit_fd(fd):
                self._fail(f"{module.__name__}.{name}", fd)
            return real(fd, *args, **kwargs)

        self.mp.setattr(module, name, wrapper)

    def install(self) -> None:
        self._wrap_path(builtins, "open")
        self._wrap_path(io, "open")
        for name in ("open", "truncate", "remove", "unlink", "link", "symlink"):
            self._wrap_path(os, name)
        for name in ("rename", "replace"):
            self._wrap_path(os, name, argc=2)
        for name in ("fdopen", "ftruncate", "close", "fchmod", "fchown", "dup", "dup2"):
            self._wrap_fd(os, name)
        # chmod/chown by *path* are allowed (the new db is chmod-ed to 0600 by path);
        # through a descriptor they are not.
        for name in ("chmod", "chown"):
            real = getattr(os, name)

            def by_path_only(path: Any, *args: Any, _real: Callable = real,
                             _name: str = name, **kwargs: Any) -> Any:
                if isinstance(path, int) and self._hit_fd(path):
                    self._fail(f"os.{_name}", path)
                return _real(path, *args, **kwargs)

            self.mp.setattr(os, name, by_path_only)


def test_the_trap_sees_python_level_access(tmp_path: Path, monkeypatch):
    db_path = tmp_path / "guarded.db"
    db_path.write_bytes(b"")
    conn = apsw.Connection(str(db_path))  # SQLite's own opens: not trapped
    conn.pragma("journal_mode", "wal")
    trap = Trap(monkeypatch)
    trap.guard(db_path)
    trap.install()
    apsw.Connection(str(db_path)).close()
    for action in (lambda: open(db_path, "rb"),
                   lambda: io.open(str(db_path) + "-wal", "rb"),
                   lambda: os.open(str(db_path) + "-shm", os.O_RDONLY),
                   lambda: Path(str(db_path) + "-wal").unlink(),
                   lambda: os.truncate(db_path, 0),
                   lambda: os.rename(db_path, tmp_path / "moved.db")):
        with pytest.raises(FileTrap):
            action()
    monkeypatch.undo()
    fd = os.open(db_path, os.O_RDONLY)
    trap.install()
    with pytest.raises(FileTrap):
        os.close(fd)
    monkeypatch.undo()
    os.close(fd)
    conn.close()
    assert len(trap.violations) == 7


def test_no_python_level_access_to_database_files_during_the_api_tour(tmp_path: Path,
                                                                      monkeypatch, exhibit):
    main = tmp_path / "data" / "tour.db"  # directory and file created inside the trap
    not_a_db = tmp_path / "notes.txt"
    not_a_db.write_bytes(b"this is not a database\n" * 100)
    too_new = tmp_path / "newer.db"
    conn = apsw.Connection(str(too_new))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    foreign = tmp_path / "foreign.db"
    conn = apsw.Connection(str(foreign))
    conn.execute("CREATE TABLE accounts(id)")
    conn.close()

    trap = Trap(monkeypatch)
    for path in (main, not_a_db, too_new, foreign):
        trap.guard(path)
    trap.install()
    try:
        workers.tour_api(main)
        with SessionDB(main) as db:  # reopen once more: stats, checkpoint, close
            db.stats()
            db.checkpoint()
            db.export_all()
        # doctor (library and CLI, repair included) and the CLI's file commands
        assert doctor.check(main)["ok"] and doctor.check(main, repair=True)["ok"]
        dump = tmp_path / "dump.json"
        for argv in (["doctor"], ["doctor", "--repair"], ["stats"], ["list"],
                     ["export", "--output", str(dump)], ["import", "--skip-existing", str(dump)],
                     ["prune", "--days", "0", "--yes"]):
            assert cli([*argv, "--db", str(main)]) in (0, 1), argv
        for path in (not_a_db, too_new, foreign):
            assert not doctor.check(path)["ok"]
        with pytest.raises(DatabaseOpenError):
            SessionDB(not_a_db)
        with pytest.raises(SchemaTooNewError):
            SessionDB(too_new)
        with pytest.raises(DatabaseOpenError):
            SessionDB(foreign)
    except FileTrap:
        pass  # reported below with the offending call stacks
    finally:
        monkeypatch.undo()
    assert trap.violations == []
    exhibit("code that open()s/close()s the db file (drops SQLite's POSIX locks)",
            "traps on every Python file call: the whole API, CLI and doctor never do it",
            violations=len(trap.violations))


def test_no_python_level_access_when_a_wal_is_lost(tmp_path: Path, monkeypatch):
    """The rescue path (sessiondb.walguard) works through SQLite and sidecars only."""
    path = tmp_path / "state.db"
    db = SessionDB(path, checkpoint_every=0)
    db.create_session("s", "cli")
    db.append_message("s", "user", "acknowledged")
    subprocess.run(["rm", f"{path}-wal"], check=True)  # another process's doing
    trap = Trap(monkeypatch)
    trap.guard(path)
    trap.install()
    try:
        with pytest.raises(WalDeletedError):
            db.append_message("s", "user", "refused")
        db.close()
        with pytest.raises(WalDeletedError):
            SessionDB(path)
        assert not doctor.check(path)["ok"]
    except FileTrap:
        pass
    finally:
        monkeypatch.undo()
    assert trap.violations == []
