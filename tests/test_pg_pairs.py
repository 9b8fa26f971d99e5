"""The index of adjacent word pairs (sessiondb.pg.pairs): phrase search results
identical to an oracle computed in SQL with the pairs read, with every other way and
the cost model's choice; messages whose pairs are not all indexed (words past position
16,383) still found; the migration of a version 2 store (the index
built by the roll, in the background); an older sessiondb refusing a version 3 store."""

from __future__ import annotations

import random
import uuid
from typing import Any, Iterator

import psycopg
import pytest
from test_pg_search import oracle_at

from sessiondb import SessionDB, doctor
from sessiondb.errors import SchemaTooNewError
from sessiondb.pg import bands, pairs
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


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 14)))


def _fill(db: SessionDB, n: int, rng: random.Random) -> None:
    for i, source in enumerate(["cli", "telegram", "cli", "slack"]):
        db.create_session(f"s{i}", source)
    with db.transaction():
        for _ in range(n):
            db.append_message(f"s{rng.randrange(4)}", rng.choice(["user", "tool"]),
                              _text(rng))


@pytest.fixture(scope="module")
def store() -> Iterator[tuple[SessionDB, str]]:
    """400 messages of eight words, in a fresh (version 3) store: the index of pairs
    was made by the migration."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    db = SessionDB(f"{URL}?schema={schema}")
    try:
        _fill(db, 400, random.Random(21))
        _sql(f'ANALYZE "{schema}".messages')  # the pairs' statistics
        yield db, schema
    finally:
        db.close()
        _sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ('"alpha bravo"', "'alpha' <-> 'bravo'", {}),
    ('"hotel golf"', "'hotel' <-> 'golf'", {}),
    ('"alpha bravo charlie"', "'alpha' <-> 'bravo' <-> 'charlie'", {}),
    ('"echo echo echo echo"', "'echo' <-> 'echo' <-> 'echo' <-> 'echo'", {}),
    ('delta "golf hotel"', "'delta' & 'golf' <-> 'hotel'", {}),
    ('"alpha bravo" OR "hotel delta"', "'alpha' <-> 'bravo' | 'hotel' <-> 'delta'", {}),
    ('"alpha bravo" -charlie', "'alpha' <-> 'bravo' & !'charlie'", {}),
    ('"alpha bravo" char*', "'alpha' <-> 'bravo' & 'char':*", {}),
    ('"alpha bravo"', "'alpha' <-> 'bravo'", {"sources": ["slack"]}),
    ('"bravo alpha"', "'bravo' <-> 'alpha'",
     {"exclude_sources": ["cli"], "roles": ["tool"]}),
    ('"charlie alpha"', "'charlie' <-> 'alpha'", {"session_id": "s2"}),
]


def _check(db: SessionDB, schema: str) -> None:
    """Every case, whole and in pages, equals the oracle."""
    for query, tsquery, filters in CASES:
        expected = oracle_at(URL, schema, tsquery, pg_search.WINDOW, **filters)
        got = [h["id"] for h in db.search_messages(query, limit=None, **filters)]
        assert got == expected, (query, filters)
        pages: list[int] = []
        for offset in range(0, len(expected) + 5, 5):
            pages += [h["id"] for h in db.search_messages(query, limit=5, offset=offset,
                                                          **filters)]
        assert pages == expected, (query, filters)


@pytest.fixture(params=["pairs", "pairs-all", "gin-all", "cost model"])
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Small windows and slices; one way forced after the first slice (where the query
    allows it), or the cost model's choice."""
    monkeypatch.setattr(pg_search, "WINDOW", 9)
    monkeypatch.setattr(pg_search, "FIRST_SLICE", 16)
    monkeypatch.setattr(bands, "start_roll", lambda *a: False)
    if request.param != "cost model":
        def pick(costs: dict[tuple[str, int], float]) -> tuple[str, int]:
            chosen = [key for key in costs if key[0] == request.param]
            return chosen[0] if chosen else min(costs, key=costs.__getitem__)
        monkeypatch.setattr(pg_search, "_cheapest", pick)
    return request.param


def test_phrases_equal_the_oracle(store: tuple[SessionDB, str], way: str) -> None:
    db, schema = store
    with psycopg.connect(URL, autocommit=True) as conn:
        assert pairs.state(conn, schema) == (True, False)
    _check(db, schema)


def test_a_slice_spanning_whole_bands_reads_only_its_ids(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The newest id one below a band's end (17,407: bands ``b0_16384`` and ``t16384``):
    the second slice spans whole bands, and the index of pairs covers every message,
    so it must still read only the slice's ids (it once read the first slice's again:
    each hit twice, older ones missed)."""
    # No roll of the bands: it would change the layout under test (and race the DROP).
    monkeypatch.setattr(bands, "start_roll", lambda *a: False)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    db = SessionDB(f"{URL}?schema={schema}")
    try:
        db.create_session("s", "cli")
        db.append_message("s", "user", "warm up")
        _sql(f'INSERT INTO "{schema}".messages (session_id, role, content, timestamp) '
             "SELECT 's', 'user', CASE WHEN g % 100 = 0 THEN 'alpha bravo here' "
             "ELSE 'alpha charlie bravo ' || g END, g FROM generate_series(2, 17407) g")
        _sql(f"UPDATE \"{schema}\".sessions SET message_count = 17407")
        _sql(f'ANALYZE "{schema}".messages')
        expected = oracle_at(URL, schema, "'alpha' <-> 'bravo'", pg_search.WINDOW)
        assert len(expected) == 174
        for limit in (20, None):
            got = [h["id"] for h in db.search_messages('"alpha bravo"', limit=limit)]
            assert got == expected[:limit]
    finally:
        db.close()
        _sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_the_pairs_of_a_query() -> None:
    assert pairs.term_pairs("'stor' <-> 'shiumim'") == ["stor shiumim"]
    assert pairs.term_pairs("'a' <-> 'b':* <-> 'c' <-> 'd'") == ["c d"]
    assert pairs.term_pairs("'word'") == []
    assert pairs.term_pairs("'a' <2> 'b'") == []
    assert pairs.term_pairs("'it''s' <-> 'a\\\\b'") == ["it's a\\b"]
    chosen = pairs.wanted([[(False, [], "'a' <-> 'b'"), (True, [], "'c' <-> 'd'")],
                           [(False, [], "'e' <-> 'f' <-> 'g'")]])
    assert chosen == [["a b"], ["e f", "f g"]]
    assert pairs.query(chosen, {"a b": "1f", "e f": "2", "f g": "3"}) == \
        "('1f') | ('2' & '3') | '*'"
    assert pairs.wanted([[(False, [], "'a' <-> 'b'")], [(False, [], "'c'")]]) is None


def _pair_query(schema: str, tsquery: str) -> str:
    """The query of the index of pairs for a phrase's tsquery, with the store's keys."""
    chosen = pairs.wanted([[(False, [], tsquery)]])
    assert chosen is not None
    with psycopg.connect(URL) as conn:
        conn.execute(f'SET search_path = "{schema}"')
        keys = conn.execute(pairs.KEYS_SQL, {"pairs": chosen[0]}).fetchone()[0]
    return pairs.query(chosen, dict(zip(chosen[0], keys)))


def test_every_phrase_match_holds_its_pairs(store: tuple[SessionDB, str]) -> None:
    """The function's pairs against the phrase operator, on every message: a message
    matching the phrase holds its pairs (quotes, backslashes and long words too), and
    the keys are those the search computes."""
    db, schema = store
    db.append_message("s0", "user", "it's a back\\slash and " + "é" * 30 + " ζeta end")
    for phrase in ["it's a", "a back\\slash", "é" * 30 + " ζeta", "alpha bravo",
                   "hotel hotel golf"]:
        lexed = _sql("SELECT phraseto_tsquery('simple', %s)::text", [phrase])[0][0]
        query = _pair_query(schema, lexed)
        rows = _sql(
            f'SELECT count(*) FILTER (WHERE content_tsv @@ %s::tsquery), count(*) FILTER '
            f'(WHERE content_tsv @@ %s::tsquery AND NOT "{schema}".sessiondb_pairs('
            f'content_tsv) @@ %s::tsquery) FROM "{schema}".messages',
            [lexed, lexed, query])
        assert rows[0][0] > 0 and rows[0][1] == 0, (phrase, rows)


def test_messages_with_pairs_unindexed_are_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """Words past position 16,383 all stand at 16,383 (a phrase of the word at 16,382
    and any of them matches): such messages are marked, and found by every phrase
    search."""
    monkeypatch.setattr(pg_search, "_cheapest", lambda costs: next(
        key for key in costs if key[0] == "pairs-all"))
    monkeypatch.setattr(bands, "start_roll", lambda *a: False)
    monkeypatch.setattr(pg_search, "FIRST_SLICE", 16)
    schema = f"t_{uuid.uuid4().hex[:16]}"
    try:
        with SessionDB(f"{URL}?schema={schema}") as db:
            db.create_session("s", "cli")
            rng = random.Random(5)
            long_words = " ".join(f"w{i}" for i in range(16_382)) + " lastword zz yy"
            # 10,000 words of 24 letters, two bytes each: still 10,000 keys at most
            many = " ".join("Ж" * 20 + "".join("абвгдежзий"[int(d)] for d in f"{i:04d}")
                            for i in range(10_000))
            with db.transaction():
                for _ in range(40):  # the first slice is walked: the long ones lie below
                    db.append_message("s", "user", _text(rng))
                long_id = db.append_message("s", "user", long_words)
                many_id = db.append_message("s", "user", many)
                for _ in range(40):
                    db.append_message("s", "user", _text(rng))
            marked = _sql(f'SELECT id FROM "{schema}".messages WHERE '
                          f'"{schema}".sessiondb_pairs(content_tsv) @@ %s::tsquery',
                          [_pair_query(schema, "'zz' <-> 'nothing'")])
            assert sorted(r[0] for r in marked) == [long_id]
            # 'w16381' stands at 16,382: with any word after it, a phrase to the tsvector
            for query, found in [('"w16381 yy"', [long_id]), ('"w100 w101"', [long_id]),
                                 (f'"{many.split()[7]} {many.split()[8]}"', [many_id])]:
                assert [h["id"] for h in db.search_messages(query)] == found, query
    finally:
        _sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _v2_store(schema: str, messages: int) -> None:
    """A store as schema version 2 made it, holding ``messages`` messages."""
    with psycopg.connect(URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path = "{schema}"')
        conn.execute(pg_schema.MIGRATIONS[0])
        conn.execute(pg_schema.MIGRATIONS[1])  # on an empty store: a band and a tail
        conn.execute("INSERT INTO sessiondb_meta VALUES ('schema_version', '2')")
        conn.execute("INSERT INTO sessions (id, source, started_at) VALUES "
                     "('s0', 'cli', 1), ('s1', 'telegram', 2), ('s2', 'cli', 3), "
                     "('s3', 'slack', 4)")
        rng = random.Random(8)
        rows = [(f"s{i % 4}", "user" if i % 3 else "tool", _text(rng), 1e9 + i)
                for i in range(messages)]
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO messages (session_id, role, content, timestamp) "
                            "VALUES (%s, %s, %s, %s)", rows)


def test_migration_of_a_version_2_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening migrates in one short transaction that builds no index; searches find
    the same without the index of pairs, start the roll, which builds it in the
    background; then the same again, through it."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    monkeypatch.setattr(pg_search, "WINDOW", 9)
    monkeypatch.setattr(pg_search, "FIRST_SLICE", 16)
    started: list[Any] = []
    monkeypatch.setattr(bands, "start_roll", lambda *a: started.append(a) or False)
    try:
        _v2_store(schema, 300)
        with SessionDB(f"{URL}?schema={schema}") as db:
            assert _sql(f'SELECT value FROM "{schema}".sessiondb_meta WHERE key = '
                        "'schema_version'") == [("3",)]
            with psycopg.connect(URL, autocommit=True) as conn:
                assert pairs.state(conn, schema) is None
            _check(db, schema)
            assert started  # a search asked for the roll
            with psycopg.connect(URL, autocommit=True) as conn:
                done = bands.roll(conn, schema)
                assert f"built {pairs.INDEX}" in done
                assert pairs.state(conn, schema) == (True, False)
            _check(db, schema)
            monkeypatch.setattr(pg_search, "_cheapest", lambda costs: next(
                key for key in costs if key[0] == "pairs-all"))
            _check(db, schema)
            db.append_message("s1", "user", "alpha bravo after the migration")
            assert db.search_messages('"alpha bravo after"')[0]["id"] == _sql(
                f'SELECT max(id) FROM "{schema}".messages')[0][0]
        report = doctor.check(f"{URL}?schema={schema}")
        assert report["index_health"] == "ok", report["index_health"]
    finally:
        _sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_an_interrupted_build_is_dropped_and_redone(store: tuple[SessionDB, str]) -> None:
    db, schema = store
    _sql("UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
         f"'\"{schema}\".{pairs.INDEX}'::regclass")
    with psycopg.connect(URL, autocommit=True) as conn:
        assert pairs.state(conn, schema) == (False, False)
        assert pairs.build(conn, schema) == [
            f"dropped invalid {pairs.INDEX}", f"built {pairs.INDEX}", "analyzed messages"]
        assert pairs.state(conn, schema) == (True, False)
        assert pairs.build(conn, schema) == []


def test_an_older_sessiondb_refuses_a_version_3_store(store: tuple[SessionDB, str],
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    _, schema = store
    monkeypatch.setattr(pg_schema, "SCHEMA_VERSION", 2)
    with pytest.raises(SchemaTooNewError):
        SessionDB(f"{URL}?schema={schema}")
