"""Shared fixtures: every test gets its own store under ``tmp_path``."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from sessiondb import SessionDB


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where this test's store lives (not created yet)."""
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
