"""The PostgreSQL test infrastructure itself: a real server, a real PgBouncer, a proxy that
freezes, and the fixtures' skip/fail/report behaviour (tests/pgserver.py,
tests/pg_fixtures.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pgserver import PgServer

try:
    import psycopg
except ImportError:  # the fixtures skip, or fail under SESSIONDB_REQUIRE_POSTGRES=1
    psycopg = None

TESTS = Path(__file__).parent


def connect(url: str, **kw):
    # prepare_threshold=None: PgBouncer 1.18 cannot pool server-side prepared statements.
    return psycopg.connect(url, autocommit=True, connect_timeout=5, prepare_threshold=None,
                           **kw)


def test_a_fresh_database_per_test(pg_server: PgServer, pg_url: str):
    with connect(pg_url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        assert conn.execute("SELECT sum(x) FROM t").fetchone() == (3,)
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    other = pg_server.create_database()
    assert other != pg_url
    assert pg_server.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
                          db=urlsplit(other).path[1:]) == [(0,)]


def test_the_server_does_not_run_as_root(pg_server: PgServer):
    uid = int(next(line for line in Path(f"/proc/{pg_server.pid}/status").read_text()
                   .splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0
    assert pg_server.psql("SHOW max_connections") == [("300",)]
    assert pg_server.psql("SHOW synchronous_commit") == [("on",)]


def test_committed_data_survives_stop_and_kill(make_pg_server):
    server = make_pg_server()
    url = server.create_database()
    with connect(url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1)")
    port = server.port
    server.restart()
    assert server.port == port
    with connect(url) as conn:
        conn.execute("INSERT INTO t VALUES (2)")  # acknowledged, then the server dies
        old_pid = server.pid
        server.kill()  # with this client still connected to its orphaned backend
        assert not server.running
    server.start()
    assert server.pid != old_pid
    with connect(url) as conn:
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]


def test_pgbouncer_pools_per_transaction_and_recycles(make_pgbouncer, pg_url: str):
    bouncer = make_pgbouncer(server_lifetime=1, server_idle_timeout=1)
    config = {row[0]: row[1] for row in bouncer.admin("SHOW CONFIG")}
    assert config["pool_mode"] == "transaction"
    with connect(bouncer.url(urlsplit(pg_url).path[1:])) as conn:
        with conn.transaction():  # one server connection for a whole transaction
            first = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            time.sleep(1.2)
            assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == first
        seen, deadline = {first}, time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            seen.add(conn.execute("SELECT pg_backend_pid()").fetchone()[0])
    assert len(seen) >= 2, "server_lifetime=1 never replaced the server connection"


def test_the_shared_pgbouncer(pgbouncer, pgbouncer_url: str):
    with connect(pgbouncer_url) as conn:
        conn.execute("CREATE TABLE t (x int)")
        with conn.transaction():
            conn.execute("INSERT INTO t VALUES (1)")
            conn.execute("SET LOCAL statement_timeout = '5s'")
            assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (1,)
    assert urlsplit(pgbouncer_url).port == pgbouncer.port


def test_a_frozen_proxy_holds_a_query_without_closing_anything(pg_server, pg_url,
                                                               freezable_proxy):
    proxy = freezable_proxy(pg_url)
    with connect(proxy.url(pg_url)) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        proxy.freeze()
        result: list = []
        query = threading.Thread(
            target=lambda: result.append(conn.execute("SELECT pg_backend_pid(), 42")
                                         .fetchone()))
        query.start()
        query.join(1.0)
        assert query.is_alive() and not result  # the client's own timeout fires here
        assert not conn.closed and proxy.connections == 1
        assert pg_server.psql("SELECT state FROM pg_stat_activity WHERE pid = %s",
                              params=[backend]) == [("idle",)]
        proxy.thaw()
        query.join(10)
        assert result == [(backend, 42)]


def test_a_frozen_proxy_times_out_new_connections(pg_url, freezable_proxy):
    proxy = freezable_proxy(pg_url)
    proxy.freeze()
    started = time.monotonic()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(proxy.url(pg_url), connect_timeout=2)  # psycopg's minimum
    assert 1.5 < time.monotonic() - started < 10
    proxy.thaw()
    with connect(proxy.url(pg_url)) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_the_proxy_serves_many_connections_and_resets_them(pg_url, freezable_proxy):
    proxy = freezable_proxy(pg_url)
    conns = [connect(proxy.url(pg_url)) for _ in range(60)]
    try:
        barrier = threading.Barrier(len(conns))
        results: list = []

        def work(conn) -> None:
            barrier.wait()
            results.append(conn.execute("SELECT pg_sleep(0.2), length(repeat('x', 200000))")
                           .fetchone()[1])

        threads = [threading.Thread(target=work, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert results == [200000] * len(conns)
        assert proxy.connections == len(conns)
        proxy.reset()
        for conn in conns:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    finally:
        for conn in conns:
            conn.close()


# -- the fixtures' behaviour when PostgreSQL is missing, and the CI report --------------

PROBE = """
def test_needs_postgres(pg_url):
    pass

def test_needs_postgres_too(pg_server):
    pass

def test_plain():
    pass
"""


def run_pytest(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess,
                                                                 str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    report = tmp_path / "report.txt"
    report.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SESSIONDB_", "PYTEST_"))}
    # No plugin autoloading (xdist named instead): the frameworks' pytest plugins
    # (langsmith's, hypothesis's, anyio's) cost about 2 s of CPU in each pytest process
    # started here, and play no part in what is tested.
    environ.update(PYTHONPATH=str(TESTS), SESSIONDB_PG_REPORT=str(report),
                   PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "pg_fixtures", "-p", "xdist",
         "-p", "no:cacheprovider", "-q", "-rs", "test_probe.py", *args],
        cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)
    return proc, report.read_text().strip() if report.exists() else ""


@pytest.mark.slow
def test_the_report_counts_passed_postgres_tests_across_workers(pg_server, tmp_path: Path):
    proc, report = run_pytest(tmp_path, "-n", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert report == "2"


@pytest.mark.slow
def test_no_postgres_skips_or_fails_as_asked(pg_server, tmp_path: Path):
    # pg_server: only where PostgreSQL and psycopg are, so the reasons below are the
    # missing binaries.
    proc, report = run_pytest(tmp_path, SESSIONDB_PG_BINDIR=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 2 skipped" in proc.stdout
    assert "no PostgreSQL server binaries" in proc.stdout
    assert report == "0"

    proc, report = run_pytest(tmp_path, SESSIONDB_PG_BINDIR=str(tmp_path),
                              SESSIONDB_REQUIRE_POSTGRES="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 2 errors" in proc.stdout
    assert "SESSIONDB_REQUIRE_POSTGRES=1" in proc.stdout
    assert report == "0"
