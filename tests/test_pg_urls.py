"""A PostgreSQL URL wherever a path is accepted: ``AsyncSessionDB(url)`` and
``$SESSIONDB_PATH`` set to a URL."""

from __future__ import annotations

import asyncio

from sessiondb import AsyncSessionDB, SessionDB


def test_async_sessiondb_on_a_url(pg_url):
    async def main() -> tuple:
        async with AsyncSessionDB(pg_url) as db:
            await db.create_session("s-1", "gateway", title="Async on PostgreSQL")
            ids = [await db.append_message("s-1", "user", f"hello {n}") for n in range(3)]
            await asyncio.gather(*(db.append_message("s-1", "assistant", f"reply {n}")
                                   for n in range(5)))
            hits = await db.search_messages("hello")
            exported = [s async for s in db.iter_export()]
            return (db.path, await db.message_count("s-1"), ids, len(hits), exported,
                    (await db.stats())["backend"])

    path, count, ids, hits, exported, backend = asyncio.run(main())
    assert path == pg_url and backend == "postgresql"
    assert count == 8 and ids == sorted(ids) and hits == 3
    assert [s["id"] for s in exported] == ["s-1"] and len(exported[0]["messages"]) == 8


def test_sessiondb_path_may_be_a_url(pg_url, monkeypatch):
    monkeypatch.setenv("SESSIONDB_PATH", pg_url + "?schema=from_env")
    with SessionDB() as db:
        assert db.backend == "postgresql" and db.path == pg_url + "?schema=from_env"
        db.create_session("env-1", "cli")
    with SessionDB(pg_url + "?schema=from_env") as db:
        assert db.get_session("env-1") is not None
    with SessionDB(pg_url) as db:  # another schema, another store
        assert db.get_session("env-1") is None
