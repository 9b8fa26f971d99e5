"""The ``durability`` option: ``"full"`` (the default) or ``"normal"``, validated, the
same through every public class, and what it sets on each backend. What each setting
survives is proven by the failure museum's exhibit 12 (``tests/museum/
test_12_power_loss.py``); this file checks the wiring."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sessiondb import AsyncSessionDB, ConfigurationError, SessionDB
from sessiondb.compat.hermes import SessionDB as HermesSessionDB


def pragmas(db) -> tuple[int, int]:
    return _pragmas(db._engine._conn)


def _pragmas(conn) -> tuple[int, int]:
    return conn.pragma("synchronous"), conn.pragma("fullfsync")


def test_full_is_the_default_and_syncs_every_commit(tmp_path: Path):
    with SessionDB(tmp_path / "a.db") as db:
        assert pragmas(db) == (2, 1)  # synchronous=FULL, fullfsync on (macOS)
        assert db.stats()["durability"] == "full"
        # The background reset's own connection is configured the same way.
        conn = db._engine._new_connection()
        try:
            assert _pragmas(conn) == (2, 1)
        finally:
            conn.close()


def test_normal_syncs_at_checkpoints_only(tmp_path: Path):
    with SessionDB(tmp_path / "a.db", durability="normal") as db:
        assert pragmas(db) == (1, 0)
        assert db.stats()["durability"] == "normal"
        db.create_session("s", "cli")
    with SessionDB(tmp_path / "a.db") as db:  # a per-instance choice, not the file's
        assert pragmas(db) == (2, 1)
        assert db.get_session("s") is not None


@pytest.mark.parametrize("bad", ["FULL", "off", "extra", "", None, 1, True])
def test_other_values_are_refused_typed_before_anything_is_created(tmp_path: Path, bad):
    with pytest.raises(ConfigurationError, match="durability must be 'full' or 'normal'"):
        SessionDB(tmp_path / "a.db", durability=bad)
    assert not (tmp_path / "a.db").exists()


def test_the_facades_take_it_too(tmp_path: Path):
    hermes = HermesSessionDB(tmp_path / "h.db", durability="normal")
    try:
        assert pragmas(hermes) == (1, 0)
    finally:
        hermes.close()

    async def main() -> int:
        async with AsyncSessionDB(tmp_path / "a.db", durability="normal") as db:
            return (await db.stats())["durability"]
    assert asyncio.run(main()) == "normal"
    with pytest.raises(ConfigurationError):
        HermesSessionDB(tmp_path / "h2.db", durability="fast")


@pytest.mark.parametrize("durability, expected", [("full", "on"), ("normal", "off")])
def test_on_postgresql_normal_turns_synchronous_commit_off_per_transaction(
        pg_url: str, durability: str, expected: str):
    """``full`` leaves the server's setting alone (``on`` in the test server, as by
    default); ``normal`` sets ``synchronous_commit = off`` in each transaction only
    (``SET LOCAL``), so nothing outlives it on a pooled connection."""
    with SessionDB(pg_url, durability=durability) as db:
        assert db.stats()["durability"] == durability
        show = "SHOW synchronous_commit"
        assert db._read(lambda c: c.execute(show).fetchall()) == [(expected,)]
        seen = []
        db._execute_write(lambda c: seen.extend(c.execute(show).fetchall()))
        assert seen == [(expected,)]
        db.create_session("s", "cli")
        assert db.get_session("s") is not None
    with pytest.raises(ConfigurationError):
        SessionDB(pg_url, durability="off")
