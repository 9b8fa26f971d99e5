"""The search column's GIN indexes per band of ids (sessiondb.pg.bands): search results
identical to an oracle computed in SQL across band boundaries and with every way of
finding the matches, bands rolled in as ids grow (by a search, in the background), the
migration of a version 1 store, an interrupted build, a missing band.

Bands here are a few dozen ids wide, so that a few hundred messages cross many of them."""

from __future__ import annotations

import random
import time
import uuid
from typing import Any, Iterator

import psycopg
import pytest
from test_pg_search import oracle_at

from sessiondb import SessionDB, doctor
from sessiondb.errors import SchemaTooNewError
from sessiondb.pg import bands
from sessiondb.pg import schema as pg_schema
from sessiondb.pg import search as pg_search

URL = ""
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


@pytest.fixture(scope="module", autouse=True)
def _server(pg_server: Any) -> None:
    global URL
    URL = pg_server.url()


def _sql(statement: str, args: Any = None) -> list[tuple]:
    with psycopg.connect(URL, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else []


def _names(schema: str) -> dict[str, bool]:
    """The search column's GIN indexes: name -> valid."""
    rows = _sql(bands.LAYOUT_SQL.format(table=f'"{schema}".messages'))
    return {name: valid for name, valid, _, _ in rows}


def _roll(schema: str, band: int | None = None) -> list[str]:
    """A roll; with ``band``, first the single index of schema version 1 instead of
    the fresh store's bands, so that the roll lays out bands of that size."""
    if band is not None:
        with psycopg.connect(URL, autocommit=True) as conn:
            for (name,) in conn.execute(
                    "SELECT indexrelid::regclass::text FROM pg_index WHERE indrelid = "
                    f"'\"{schema}\".messages'::regclass").fetchall():
                if "fts" in name:
                    conn.execute(f"DROP INDEX {name}")
            conn.execute(f'CREATE INDEX idx_messages_fts ON "{schema}".messages '
                         "USING gin (content_tsv)")
    with psycopg.connect(URL, autocommit=True) as conn:
        return bands.roll(conn, schema, band)


def _fill(db: SessionDB, n: int, rng: random.Random, sessions: int = 12) -> None:
    sources = ["cli", "cli", "telegram", "cli", "cron", "slack"]
    for i in range(sessions):
        try:
            db.create_session(f"s{i:02d}", sources[i % len(sources)])
        except Exception:  # noqa: BLE001 - already there from an earlier fill
            pass
    with db.transaction():
        for _ in range(n):
            text = " ".join(WORDS[min(len(WORDS) - 1, int(rng.paretovariate(1.0)) - 1)]
                            for _ in range(rng.randint(2, 12)))
            db.append_message(f"s{rng.randrange(sessions):02d}",
                              rng.choice(["user", "assistant", "tool"]), text)


@pytest.fixture
def store() -> Iterator[tuple[SessionDB, str]]:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    db = SessionDB(f"{URL}?schema={schema}")
    try:
        yield db, schema
    finally:
        db.close()
        _sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def oracle(schema: str, tsquery: str, window: int, **filters: Any) -> list[int]:
    """Every match in the documented order, straight from the table."""
    return oracle_at(URL, schema, tsquery, window, **filters)


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("alpha", "'alpha'", {}),
    ("hotel", "'hotel'", {}),
    ("golf OR hotel", "'golf' | 'hotel'", {}),
    ('"alpha bravo"', "'alpha' <-> 'bravo'", {}),
    ("alpha -bravo", "'alpha' & !'bravo'", {}),
    ("alpha NOT alpha", "'alpha' & !'alpha'", {}),
    ("char*", "'char':*", {}),
    ("alpha", "'alpha'", {"sources": ["slack"]}),
    ("bravo", "'bravo'", {"exclude_sources": ["cli"], "roles": ["tool"]}),
    ("alpha", "'alpha'", {"session_id": "s03"}),
]


def _check(db: SessionDB, schema: str) -> None:
    """Every case, whole and in pages, equals the oracle."""
    for query, tsquery, filters in CASES:
        expected = oracle(schema, tsquery, pg_search.WINDOW, **filters)
        got = [h["id"] for h in db.search_messages(query, limit=None, **filters)]
        assert got == expected, (query, filters)
        pages: list[int] = []
        for offset in range(0, len(expected) + 7, 7):
            pages += [h["id"] for h in db.search_messages(query, limit=7, offset=offset,
                                                          **filters)]
        assert pages == expected, (query, filters)


@pytest.fixture(params=["walk", "gin", "gin-all", "sessions", "cost model"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Small windows and slices; one way forced after the first slice, or the cost
    model's choice."""
    monkeypatch.setattr(pg_search, "WINDOW", 9)
    monkeypatch.setattr(pg_search, "FIRST_SLICE", 16)
    monkeypatch.setattr(bands, "start_roll", lambda *a: False)  # the layout stays put
    if request.param != "cost model":
        def pick(costs: dict[tuple[str, int], float]) -> tuple[str, int]:
            chosen = [key for key in costs if key[0] == request.param]
            return chosen[0] if chosen else min(costs, key=costs.__getitem__)
        monkeypatch.setattr(pg_search, "_cheapest", pick)
    return request.param


def test_results_across_band_boundaries(store: tuple[SessionDB, str], way: str) -> None:
    db, schema = store
    _fill(db, 500, random.Random(3))
    done = _roll(schema, band=37)
    names = _names(schema)
    assert all(names.values())
    assert "messages_fts_t0" not in names and "idx_messages_fts" not in names
    # The tail starts at least half a band above the newest id; bands below it, the
    # older ones merged 8 to 1.
    assert set(names) == {"messages_fts_t555", "messages_fts_b0_296"} | {
        f"messages_fts_b{lo}_{lo + 37}" for lo in range(296, 555, 37)}
    assert "dropped idx_messages_fts" in done
    _check(db, schema)
    # Appends land in bands, then in the tail (nothing rolled yet): still the same.
    _fill(db, 120, random.Random(4))
    _check(db, schema)


def test_a_fresh_store_starts_with_a_band_and_a_tail(store: tuple[SessionDB, str]) -> None:
    db, schema = store
    assert _names(schema) == {f"messages_fts_b0_{bands.BAND_IDS}": True,
                              f"messages_fts_t{bands.BAND_IDS}": True}
    assert _sql(f'SELECT value FROM "{schema}".sessiondb_meta WHERE key = '
                "'schema_version'") == [(str(pg_schema.SCHEMA_VERSION),)]


def _wait_for_roll(schema: str, wanted: str, timeout: float = 30.0) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = _names(schema)
        if names.get(wanted) and not any(
                (n.startswith("messages_fts_t") or n == "idx_messages_fts") and n != wanted
                for n in names):
            return names
        time.sleep(0.05)
    raise AssertionError(f"no roll to {wanted}: {_names(schema)}; {bands.errors}")


def test_bands_roll_in_as_ids_grow(store: tuple[SessionDB, str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A search that finds the newest id near the tail rolls the bands forward in the
    background, with the store's band size; results never change meanwhile."""
    db, schema = store
    monkeypatch.setattr(pg_search, "WINDOW", 9)
    monkeypatch.setattr(bands, "ROLL_RETRY", 0.0)
    _fill(db, 40, random.Random(5))
    _roll(schema, band=20)
    assert "messages_fts_t60" in _names(schema)
    rng = random.Random(6)
    tails = []
    for _ in range(10):
        _fill(db, 25, rng)
        top = _sql(f'SELECT max(id) FROM "{schema}".messages')[0][0]
        _check(db, schema)  # a search: starts the roll when due
        tail = ((top + 10) // 20 + 1) * 20
        if bands.wants_roll([n for n, v in _names(schema).items() if v], top) or \
                f"messages_fts_t{tail}" in _names(schema):
            names = _wait_for_roll(schema, f"messages_fts_t{tail}")
            tails.append(tail)
            assert all(names.values())
        _check(db, schema)
    assert len(set(tails)) >= 4
    names = _names(schema)
    segments = bands.layout(list(names))
    assert segments[0][:2] == (tails[-1], None) and segments[-1].lo == 0
    assert all(seg.index for seg in segments)  # every id has its index
    assert "messages_fts_b0_160" in names  # eight bands merged into one
    assert len(names) == len(segments) <= 1 + 2 * bands.MERGE


def _v1_store(schema: str, messages: int, url: str = "") -> None:
    """A store as schema version 1 made it, holding ``messages`` messages."""
    with psycopg.connect(url or URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path = "{schema}"')
        conn.execute(pg_schema.MIGRATIONS[0])
        conn.execute("INSERT INTO sessiondb_meta VALUES ('schema_version', '1')")
        conn.execute("INSERT INTO sessions (id, source, started_at) VALUES "
                     "('s00', 'cli', 1), ('s01', 'slack', 2)")
        rng = random.Random(8)
        rows = [(f"s0{i % 2}", "user", " ".join(rng.choice(WORDS) for _ in range(6)),
                 1e9 + i) for i in range(messages)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO messages (session_id, role, content, timestamp) "
                            "VALUES (%s, %s, %s, %s)", rows)


def test_migration_of_a_version_1_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening migrates in one short transaction and keeps idx_messages_fts; the first
    search searches with it (same results) and rolls the bands in; once they are valid
    idx_messages_fts is dropped."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    monkeypatch.setattr(pg_search, "WINDOW", 9)
    monkeypatch.setattr(bands, "BAND_IDS", 50)
    started: list[Any] = []
    real_start = bands.start_roll
    monkeypatch.setattr(bands, "start_roll", lambda *a: started.append(a) or False)
    try:
        _v1_store(schema, 300)
        with SessionDB(f"{URL}?schema={schema}") as db:
            assert _sql(f'SELECT value FROM "{schema}".sessiondb_meta WHERE key = '
                        "'schema_version'") == [(str(pg_schema.SCHEMA_VERSION),)]
            assert _names(schema) == {"idx_messages_fts": True}
            _check(db, schema)  # through idx_messages_fts, as a tail from id 0
            assert started
            monkeypatch.setattr(bands, "start_roll", real_start)
            monkeypatch.setattr(bands, "ROLL_RETRY", 0.0)
            db.search_messages("alpha")
            names = _wait_for_roll(schema, "messages_fts_t350")
            assert "idx_messages_fts" not in names
            assert sorted(n for n in names if n.startswith("messages_fts_b")) == sorted(
                f"messages_fts_b{lo}_{lo + 50}" for lo in range(0, 350, 50))
            _check(db, schema)
        report = doctor.check(f"{URL}?schema={schema}")
        assert report["index_health"] == "ok", report["index_health"]
    finally:
        _sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_an_older_sessiondb_refuses_a_version_2_store(store: tuple[SessionDB, str],
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    _, schema = store
    monkeypatch.setattr(pg_schema, "SCHEMA_VERSION", 1)
    with pytest.raises(SchemaTooNewError):
        SessionDB(f"{URL}?schema={schema}")


def test_an_interrupted_build_is_dropped_and_redone(store: tuple[SessionDB, str]) -> None:
    db, schema = store
    _fill(db, 100, random.Random(9))
    _roll(schema, band=30)
    # What a CREATE INDEX CONCURRENTLY killed half way leaves: an invalid index.
    _sql("UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
         f"'\"{schema}\".messages_fts_b60_90'::regclass")
    assert _names(schema)["messages_fts_b60_90"] is False
    _check(db, schema)  # the band's ids are searched without it meanwhile
    done = _roll(schema)
    assert "dropped invalid messages_fts_b60_90" in done and \
        "built messages_fts_b60_90" in done
    assert all(_names(schema).values())
    _check(db, schema)


def test_ids_without_any_index_are_walked(store: tuple[SessionDB, str]) -> None:
    db, schema = store
    _fill(db, 100, random.Random(10))
    _roll(schema, band=30)
    _sql(f'DROP INDEX "{schema}".messages_fts_b30_60')
    _sql(f'DROP INDEX "{schema}".messages_fts_b0_30')
    _check(db, schema)
    assert bands.layout(["messages_fts_t150", "messages_fts_b90_120"]) == [
        bands.Segment(150, None, "m.id >= 150", "messages_fts_t150"),
        bands.Segment(120, 150, "", None),
        bands.Segment(90, 120, "m.id >= 90 AND m.id < 120", "messages_fts_b90_120"),
        bands.Segment(0, 90, "", None)]


def test_one_roll_at_a_time(store: tuple[SessionDB, str]) -> None:
    db, schema = store
    _fill(db, 50, random.Random(11))
    _sql(f'UPDATE "{schema}".sessiondb_meta SET value = %s WHERE key = '
         "'fts_roll_until'", [repr(time.time() + 60)])
    _sql(f'INSERT INTO "{schema}".sessiondb_meta VALUES (\'fts_roll_until\', %s) '
         "ON CONFLICT DO NOTHING", [repr(time.time() + 60)])
    assert _roll(schema, band=10) == []  # someone else holds the roll
    _sql(f'UPDATE "{schema}".sessiondb_meta SET value = %s WHERE key = '
         "'fts_roll_until'", [repr(time.time() - 1)])  # ... and died: it expired
    assert _roll(schema, band=10)
    assert _sql(f'SELECT value FROM "{schema}".sessiondb_meta WHERE key = '
                "'fts_roll_until'") == [("0",)]


def test_sixteen_processes_open_a_version_1_store_at_once(pg_url: str) -> None:
    """One of them migrates (found version 1 under the lock), in a transaction that
    changes no index on a store holding messages; the others find the current version."""
    from test_pg_isolation import race
    import pg_workers

    _v1_rows = 200
    _v1_store("sessiondb", _v1_rows, pg_url)
    reports = race(pg_url, "open_empty", 16, target=pg_workers.open_empty)
    found = sorted(report["found"][0] for report in reports.values())
    assert found == [1] + [pg_schema.SCHEMA_VERSION] * 15, reports
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT value FROM sessiondb.sessiondb_meta WHERE key = "
                            "'schema_version'").fetchone() == (
                                str(pg_schema.SCHEMA_VERSION),)
        assert conn.execute("SELECT count(*) FROM sessiondb.messages").fetchone() == (
            _v1_rows,)
        names = [r[0] for r in conn.execute(
            bands.LAYOUT_SQL.format(table="sessiondb.messages")).fetchall()]
    assert names == ["idx_messages_fts"]  # the bands come with the first search


def test_imported_ids_below_the_bands_are_found(store: tuple[SessionDB, str]) -> None:
    """Ids below every band (an import keeps ids where free) are read without an index
    until a roll covers them."""
    db, schema = store
    _fill(db, 100, random.Random(12))
    _sql(f'DELETE FROM "{schema}".messages WHERE id <= 40')
    _roll(schema, band=30)
    assert min(seg.lo for seg in bands.layout(list(_names(schema)))
               if seg.index) == 30
    _sql(f'INSERT INTO "{schema}".messages (id, session_id, role, content, timestamp) '
         "SELECT i, 's01', 'user', 'alpha imported ' || i, 1 FROM generate_series(5, 20) i")
    _check(db, schema)
    _roll(schema)
    assert min(seg.lo for seg in bands.layout(list(_names(schema)))
               if seg.index) == 0
    _check(db, schema)
