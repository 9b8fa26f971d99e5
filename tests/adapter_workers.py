"""Worker functions for tests/test_adapter_tables.py (importable by spawned processes)."""

from __future__ import annotations

from sessiondb import SessionDB
from sessiondb.adapters.tables import AdapterTables, ensure_tables

DEMO = AdapterTables("demo", 1, {
    "sqlite": (
        "CREATE TABLE demo_items (session_id TEXT NOT NULL REFERENCES sessions(id) "
        "ON DELETE CASCADE, n INTEGER NOT NULL, body BLOB, PRIMARY KEY (session_id, n))",
        "CREATE INDEX demo_items_n ON demo_items(n)",
    ),
    "postgresql": (
        "CREATE TABLE demo_items (session_id text NOT NULL REFERENCES sessions(id) "
        "ON DELETE CASCADE, n bigint NOT NULL, body bytea, PRIMARY KEY (session_id, n))",
        "CREATE INDEX demo_items_n ON demo_items(n)",
    ),
})


def make_tables(path: str, barrier) -> None:
    """Open the store and make the demo tables, all workers at once (an error is the
    process's exit code)."""
    with SessionDB(path) as db:
        barrier.wait(timeout=60)
        ensure_tables(db, DEMO)
