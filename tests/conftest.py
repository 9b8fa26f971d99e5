"""Shared fixtures: every test gets its own store under ``tmp_path``; and the failure
museum's figures table (see ``tests/museum/conftest.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from sessiondb import SessionDB
from sessiondb.compat import hermes
from sessiondb.gate import GATE_ENV, gate_kind as resolve_gate, ofd_locks_available
from sessiondb.gate_posix import posix_locks_available
from sessiondb.compat.hermes import SessionDB as HermesSessionDB

# The test PostgreSQL server, PgBouncer and a freezable proxy (tests/pg_fixtures.py).
pytest_plugins = ["pg_fixtures"]


# -- the contract suite: these files run against both backends -------------------------

#: Test modules whose tests taking ``db``/``db_path`` run on SQLite and on PostgreSQL
#: (tests about SQLite files, locks or the WAL are marked ``sqlite_only`` in them).
CONTRACT = {
    "test_accounting", "test_claims", "test_leases", "test_messages", "test_revisions",
    "test_sessions", "test_titles", "test_transaction", "test_export_import",
    "test_listing", "test_search", "test_snapshot", "test_errors",
    "test_compat_hermes_api", "test_compat_hermes_search",
}


#: The framework adapters' test modules (#13): the same three runs as the contract files
#: (SQLite, PostgreSQL, PostgreSQL through PgBouncer), for tests taking ``db_path``.
ADAPTERS = {"test_adapter_tables", "test_adapter_openai", "test_adapter_langgraph",
            "test_adapter_adk"}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "sqlite_only: a contract-file test about SQLite itself")


def pytest_xdist_auto_num_workers(config) -> int | None:
    """``-n auto``: one worker more than the CPUs. Many tests mostly wait (on spawned
    processes, a lock holder's sleep, a PostgreSQL server), and a worker per CPU left
    part of the CPU time idle; ``$PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when
    set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # xdist's own hook reads it
    if not hasattr(os, "sched_getaffinity"):
        return None
    return len(os.sched_getaffinity(0)) + 1


#: The contract files that also run a third time, through PgBouncer in transaction mode
#: recycling its server connections every 2 s (``pooler=1`` in the URL): all of them.
POOLER_CONTRACT = CONTRACT


#: The write gate's suite: every test of these modules runs once per kind of gate this
#: platform has (on Linux OFD locks and classic POSIX locks), chosen through
#: ``$SESSIONDB_GATE``, which spawned and forked workers inherit.
GATE_SUITE = {
    "test_gate", "test_gate_interrupts", "test_turns", "test_write_path",
    "test_01_sigkill_chaos",
    "test_02_stuck_writer", "test_04_fork", "test_09_files_and_permissions",
}
GATE_KINDS = [kind for kind, there in (("ofd", ofd_locks_available()),
                                       ("posix", posix_locks_available())) if there]


def pytest_generate_tests(metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in GATE_SUITE and "gate_kind" in metafunc.fixturenames:
        metafunc.parametrize("gate_kind", GATE_KINDS, indirect=True)
    if "backend" not in metafunc.fixturenames:
        return
    if (module in CONTRACT or module in ADAPTERS) and not metafunc.definition.get_closest_marker(
            "sqlite_only"):
        backends = ["sqlite", "postgresql"] + (
            ["pgbouncer"] if module in POOLER_CONTRACT or module in ADAPTERS else [])
        metafunc.parametrize("backend", backends, indirect=True)


def pytest_collection_modifyitems(items) -> None:
    # The contract files' PostgreSQL runs reach the server through db_path at run time,
    # so the postgres marker (which .ci/run counts) is given to them here.
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("backend", "sqlite") != "sqlite":
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(autouse=True)
def gate_kind(request, monkeypatch) -> str:
    """The kind of write gate this test's stores use: its parameter in the gate suite
    (:data:`GATE_SUITE`, set as ``$SESSIONDB_GATE``), else whatever ``"auto"`` picks."""
    kind = getattr(request, "param", None)
    if kind is None:
        return resolve_gate("auto")
    monkeypatch.setenv(GATE_ENV, kind)
    return kind


@pytest.fixture
def backend(request) -> str:
    """``"sqlite"``; ``"postgresql"`` for the contract files' second run, ``"pgbouncer"``
    for their third (:data:`POOLER_CONTRACT`)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture
def db_path(backend: str, tmp_path: Path, request) -> Any:
    """Where this test's store lives: a file, not created yet; for PostgreSQL the URL of
    a fresh database of the test server holding an empty store (its schema made:
    ``pg_store_url``); for PgBouncer the URL of one through the shared pooler, with
    ``pooler=1`` (no server-side prepared statements)."""
    return _store_path(backend, tmp_path, request, "pg_store_url", "pgbouncer_store_url")


@pytest.fixture
def empty_db_path(backend: str, tmp_path: Path, request) -> Any:
    """``db_path``, but on PostgreSQL and PgBouncer a database with no store in it yet,
    for the tests of a store's first opens (its schema's making)."""
    return _store_path(backend, tmp_path, request, "pg_url", "pgbouncer_url")


def _store_path(backend: str, tmp_path: Path, request, pg: str, pgbouncer: str) -> Any:
    if backend == "postgresql":
        return request.getfixturevalue(pg)
    if backend == "pgbouncer":
        url = request.getfixturevalue(pgbouncer)
        return url + ("&" if "?" in url else "?") + "pooler=1"
    return tmp_path / "state.db"


@pytest.fixture
def db(db_path: Path) -> Iterator[SessionDB]:
    """A fresh store, closed after the test."""
    store = SessionDB(db_path)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def make_session(db: SessionDB):
    """Create a session with a chosen ``started_at`` (via import, so order-dependent tests
    never rely on the clock): ``make_session("a", started_at=100.0, source="cli", ...)``."""

    def make(session_id: str, started_at: float = 1_000.0, source: str = "cli",
             **fields) -> str:
        db.import_sessions({"id": session_id, "source": source, "started_at": started_at,
                            **fields})
        return session_id

    return make


# -- the failure museum's figures -------------------------------------------------------

MUSEUM_KEY = "museum"


@pytest.fixture
def exhibit(record_property) -> Callable[..., None]:
    """Record one row of the museum table: ``exhibit("SIGKILL chaos", "ledger exact,
    integrity ok", kills=163, lost=0)``. Rows travel in the test report, so they reach
    the xdist controller, which prints them at the end of the run."""

    def record(fault: str, outcome: str, **figures: Any) -> None:
        record_property(MUSEUM_KEY, {"fault": fault, "outcome": outcome,
                                     "figures": figures})

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    rows = []
    for report in terminalreporter.stats.get("passed", []):
        if getattr(report, "when", None) != "call":
            continue
        for key, row in getattr(report, "user_properties", []):
            if key == MUSEUM_KEY:
                rows.append((report.nodeid.split("::")[0].rsplit("/", 1)[-1], row))
    if not rows:
        return
    terminalreporter.section("failure museum: fault -> what happened -> figures")
    for exhibit_file, row in sorted(rows, key=lambda r: r[0]):
        figures = ", ".join(f"{k}={v}" for k, v in row["figures"].items())
        terminalreporter.write_line(
            f"{exhibit_file}: {row['fault']} -> {row['outcome']}"
            + (f" -> {figures}" if figures else ""))


# -- sessiondb.compat.hermes (#6) --------------------------------------------------------

class FakeClock:
    """What ``time.time()`` returns inside :mod:`sessiondb.compat.hermes`: set ``now``."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    """The clock of the hermes facade, under the test's control (so ordering tests never
    depend on the real clock)."""
    fake = FakeClock()
    monkeypatch.setattr(hermes, "time", fake)
    return fake


@pytest.fixture
def hdb(db_path: Path) -> Iterator[HermesSessionDB]:
    """A fresh store opened through the hermes-agent facade (a file; in the contract
    files' PostgreSQL run, a URL), closed after the test."""
    store = HermesSessionDB(db_path)
    try:
        yield store
    finally:
        store.close()
