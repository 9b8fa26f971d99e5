"""LangGraph's published conformance suite (``langgraph-checkpoint-conformance``) against
SessionDBSaver, on SQLite and on PostgreSQL: every base capability and every optional
one the saver implements (copy_thread, delete_for_runs, prune) must pass (#13)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES
from langgraph.checkpoint.conformance.report import CapabilityReport, ProgressCallbacks

from sessiondb.adapters.langgraph import SessionDBSaver


def _validate(name: str, target: Any) -> CapabilityReport:
    """Run the suite, which makes a fresh saver for each capability (``target()``: a
    fresh SQLite file each; a URL: one database, the suite's threads being random
    uuids); print its report."""
    @checkpointer_test(name=name)
    async def saver() -> AsyncIterator[SessionDBSaver]:
        async with SessionDBSaver(target() if callable(target) else target) as s:
            yield s

    report = asyncio.run(validate(saver, progress=ProgressCallbacks.verbose()))
    report.print_report()
    return report


def _check(report: CapabilityReport) -> None:
    """Every capability detected and passed (the printed report shows with ``-rA`` or
    ``-s``, and with any failure)."""
    failures = {name: r.failures for name, r in report.results.items() if r.failures}
    assert failures == {}
    assert {name for name, r in report.results.items() if r.detected and r.passed} == \
        {c.value for c in ALL_CAPABILITIES}
    assert report.conformance_level() == "FULL"


def test_conformance_on_sqlite(tmp_path: Path) -> None:
    files = (tmp_path / f"store-{n}.db" for n in itertools.count())
    _check(_validate("SessionDBSaver (SQLite)", lambda: next(files)))


@pytest.mark.postgres
def test_conformance_on_postgresql(pg_url: str) -> None:
    _check(_validate("SessionDBSaver (PostgreSQL)", pg_url))
