"""Search latency on a million-message PostgreSQL store, per query shape.

Builds the store (or reuses it when it already holds ``--messages`` messages) in the
PostgreSQL database of the URL given, then times
:meth:`sessiondb.SessionDB.search_messages` through the public API: every shape once per
round, in a seeded shuffled order, after 3 warm-up rounds, and prints p50 / p90 / p99 /
max per shape::

    python -m sessiondb.bench.pg_scale_search postgresql://postgres@127.0.0.1:55440/postgres \\
        --rounds 100 [--only phrase] [--messages 1000000]

**The data** (the same shape as the SQLite scale benchmark's, drawn differently): 20,000
sessions of about 50 messages each (a message lies near the ids of its session; 5% go
to 20 long-lived sessions), sources cli 50%, telegram 25%, cron 15%, discord 9%, slack
1%, roles user 40%, assistant 40%, tool 20%. A message is 200-2000 bytes of words drawn
one by one, independently, with Zipf weights (rank ``r`` weighs ``1 / r``) from 50,000
syllable words: two common words are rarely adjacent, as in real text, which a slice of
one pre-drawn text (:mod:`sessiondb.bench.scale_data`) would not give. It is written by
``COPY`` from two processes, the bands of the GIN index (:mod:`sessiondb.pg.bands`)
built afterwards, then ``VACUUM ANALYZE``. A store built before the bands gets them
rolled in first (printed).

**The shapes** name words by their frequency rank, so the store needs no vocabulary
lookup: rank 1 is in nearly every message, rank 124 in about 12%, rank 350 in about
4%, rank 4,000 in about 0.4%, rank 45,000 in about 300 messages; the fraction actually
found is printed beside each. Everything the run depends on is printed first: versions,
the server's ``shared_buffers``, the machine's load average before and after.

psycopg is imported here only (the benchmark needs the ``postgres`` extra).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from typing import Any

import psycopg

import sessiondb
from sessiondb import SessionDB
from sessiondb.pg import bands

__all__ = ["build", "measure", "main"]

SESSIONS = 20_000
VOCABULARY = 50_000
LONG_LIVED = 20
SOURCES = (("cli", 50), ("telegram", 25), ("cron", 15), ("discord", 9), ("slack", 1))
ROLES = (("user", 40), ("assistant", 40), ("tool", 20))
_SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "de", "ve", "zu", "ba",
              "gor", "fin", "qua", "tel", "ex", "an", "or", "im", "st", "pl", "cr", "dr",
              "ol", "um", "in", "et", "ar", "is"]


def vocabulary() -> list[str]:
    """50,000 distinct words of syllables, the most frequent first (short ones first)."""
    rng = random.Random(1)
    words: dict[str, None] = {}
    while len(words) < VOCABULARY:
        n = 1 + min(3, int(len(words) ** 0.25 // 2)) + rng.randrange(2)
        words["".join(rng.choice(_SYLLABLES) for _ in range(n))] = None
    return list(words)


def _weighted(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    pick = rng.randrange(100)
    for name, weight in table:
        if pick < weight:
            return name
        pick -= weight
    return table[0][0]


def _session_of(i: int, rng: random.Random, sessions: int) -> int:
    if rng.random() < 0.05:
        return rng.randrange(LONG_LIVED)
    return min(sessions - 1, max(LONG_LIVED, i * sessions // _N[0] + rng.randint(-3, 3)))


_N = [1_000_000]  # messages of the store being built (read by _session_of in workers)


def _copy_part(url: str, schema: str, part: int, parts: int, total: int,
               sessions: int) -> None:
    """COPY messages ``part`` of ``parts`` (ids 1..total) into the store."""
    _N[0] = total
    words = vocabulary()
    cum = list(itertools.accumulate(1.0 / (r + 1) for r in range(VOCABULARY)))
    rng = random.Random(100 + part)
    lo, hi = part * total // parts, (part + 1) * total // parts
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{schema}"')
        with conn.cursor().copy("COPY messages (id, session_id, role, content, tool_name, "
                                "timestamp) FROM STDIN") as copy:
            for start in range(lo, hi, 5000):
                rows = []
                for i in range(start, min(hi, start + 5000)):
                    size = rng.randint(200, 2000)
                    # About 6.2 bytes a word with its space: draw enough, cut at size.
                    text = " ".join(rng.choices(words, cum_weights=cum, k=size // 5 + 8))
                    cut = text.find(" ", size)
                    role = _weighted(rng, ROLES)
                    rows.append(f"{i + 1}\ts{_session_of(i, rng, sessions):05d}\t{role}\t"
                                f"{text[:cut] if cut > 0 else text}\t"
                                f"{'shell' if role == 'tool' else chr(92) + 'N'}\t"
                                f"{1.7e9 + i * 0.5}\n")
                copy.write("".join(rows))


def build(url: str, schema: str, messages: int, sessions: int = SESSIONS) -> float:
    """Fill the (emptied) store with ``messages`` messages; returns the seconds taken."""
    began = time.monotonic()
    SessionDB(f"{url}{'&' if '?' in url else '?'}schema={schema}").close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{schema}"')
        conn.execute("TRUNCATE messages, sessions CASCADE")
        for name, *_ in conn.execute(bands.LAYOUT_SQL.format(table="messages")).fetchall():
            conn.execute(f'DROP INDEX "{name}"')  # built after the load, faster
        rng = random.Random(9)
        with conn.cursor().copy("COPY sessions (id, source, model, started_at) "
                                "FROM STDIN") as copy:
            for k in range(sessions):
                copy.write_row((f"s{k:05d}", _weighted(rng, SOURCES), f"model-{k % 3}",
                                1.7e9 + max(0, k * (messages // sessions) - 3) * 0.5))
    procs = [mp.Process(target=_copy_part, args=(url, schema, i, 2, messages, sessions))
             for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"a COPY worker failed (exit code {proc.exitcode})")
    print(f"  copied in {time.monotonic() - began:.0f}s", flush=True)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{schema}"')
        conn.execute("UPDATE sessions s SET message_count = c FROM (SELECT session_id, "
                     "count(*) c FROM messages GROUP BY 1) m WHERE m.session_id = s.id")
        conn.execute(f"SELECT setval('messages_id_seq', {messages})")
        conn.execute("SET maintenance_work_mem = '1GB'")
        # The bands a roll would lay out (sessiondb.pg.bands), built directly: nobody
        # else uses the store yet.
        start, wanted = bands.plan(1, messages, bands.BAND_IDS)
        for name, where in [(f"messages_fts_t{start}", f"id >= {start}")] + [
                (f"messages_fts_b{lo}_{hi}", f"id >= {lo} AND id < {hi}")
                for lo, hi in wanted]:
            conn.execute(f'CREATE INDEX "{name}" ON messages USING gin (content_tsv) '
                         f"WHERE {where}")
        print(f"  indexed ({len(wanted) + 1} bands) in {time.monotonic() - began:.0f}s",
              flush=True)
        conn.execute("VACUUM ANALYZE messages")
        conn.execute("VACUUM ANALYZE sessions")
    return time.monotonic() - began


def shapes() -> list[tuple[str, str | None, dict[str, Any]]]:
    """``(name, query, options)`` of every shape; a None query is 1,000 random
    characters, new each round."""
    w = vocabulary()
    common, common2, medium, medium2, medium3 = w[0], w[1], w[123], w[129], w[349]
    rare, rare2, rarer = w[3999], w[4099], w[44999]
    return [
        (f"common word ({common})", common, {}),
        ("common word, offset=100", common, {"offset": 100}),
        (f"medium word ({medium})", medium, {}),
        (f"medium word ({medium3})", medium3, {}),
        (f"rare word ({rare})", rare, {}),
        (f"rarer word ({rarer})", rarer, {}),
        ("absent word", "zzzabsent", {}),
        (f"two words ({medium2} {medium})", f"{medium2} {medium}", {}),
        (f'phrase, frequent ("{common} {common2}")', f'"{common} {common2}"', {}),
        (f'phrase, rarely adjacent ("{medium2} {medium}")', f'"{medium2} {medium}"', {}),
        (f"prefix ({medium[:3]}*)", f"{medium[:3]}*", {}),
        (f"prefix ({common[:2]}*)", f"{common[:2]}*", {}),
        (f"OR rare ({rare} OR {rare2})", f"{rare} OR {rare2}", {}),
        (f"OR medium ({medium} OR {medium3})", f"{medium} OR {medium3}", {}),
        (f"NOT ({common} NOT {medium})", f"{common} NOT {medium}", {}),
        (f"NOT ({medium} -{medium3})", f"{medium} -{medium3}", {}),
        (f"NOT, both common ({common} NOT {common2})", f"{common} NOT {common2}", {}),
        ("sources=[cli]", common, {"sources": ["cli"]}),
        ("sources=[slack] (1%)", common, {"sources": ["slack"]}),
        ("sources=[slack], medium word", medium, {"sources": ["slack"]}),
        ("exclude_sources=[cli]", common, {"exclude_sources": ["cli"]}),
        ("exclude all but slack", common,
         {"exclude_sources": ["cli", "telegram", "cron", "discord"]}),
        ("roles=[tool]", common, {"roles": ["tool"]}),
        ("roles=[tool], medium word", medium, {"roles": ["tool"]}),
        ("session_id (long-lived)", common, {"session_id": "s00007"}),
        ("session_id (about 50 msgs)", medium, {"session_id": "s12345"}),
        ("session_id + roles", medium3, {"session_id": "s00003", "roles": ["user"]}),
        ("sources+roles, offset=100", medium,
         {"sources": ["cli", "cron"], "roles": ["assistant"], "offset": 100}),
        ("garbage 1,000 chars", None, {}),
    ]


def garbage(rng: random.Random, words: list[str]) -> str:
    alphabet = (['a', 'b', '"', '(', ')', ':', '*', '-', '^', ' ', ' ', ' ', 'OR', 'NOT',
                 'AND', '\u00e9', '\u65e5', '\U0001F600'] + words[:3] + words[123:126])
    out = ""
    while len(out) < 1000:
        out += rng.choice(alphabet)
    return out[:1000]


def measure(url: str, schema: str, rounds: int, only: str = "", limit: int = 20
            ) -> dict[str, list[float]]:
    """Milliseconds of each shape's searches (``rounds`` each, warm-ups dropped);
    prints the table."""
    rng = random.Random(5)
    words = vocabulary()
    picked = [s for s in shapes() if only in s[0]]
    db = SessionDB(f"{url}{'&' if '?' in url else '?'}schema={schema}")
    times: dict[str, list[float]] = {name: [] for name, _, _ in picked}
    hits: dict[str, int] = {}
    try:
        for r in range(rounds + 3):
            order = picked[:]
            rng.shuffle(order)
            for name, query, options in order:
                text = garbage(rng, words) if query is None else query
                began = time.perf_counter()
                found = db.search_messages(text, limit=limit, **options)
                ms = (time.perf_counter() - began) * 1e3
                if r >= 3:
                    times[name].append(ms)
                    hits[name] = len(found)
    finally:
        db.close()
    print(f"{'shape':48s} {'hits':>4s} {'p50 ms':>7s} {'p90 ms':>7s} {'p99 ms':>7s} "
          f"{'max ms':>7s}")
    for name, _, _ in picked:
        xs = sorted(times[name])
        at = lambda q: xs[min(len(xs) - 1, int(len(xs) * q))]  # noqa: E731
        print(f"{name:48s} {hits[name]:4d} {statistics.median(xs):7.1f} {at(0.9):7.1f} "
              f"{at(0.99):7.1f} {xs[-1]:7.1f}", flush=True)
    return times


def _bands(url: str, schema: str) -> None:
    """Roll the bands of the GIN index in if due (a store built before them), so that
    no search starts a roll during the run; print them."""
    with psycopg.connect(url, autocommit=True) as conn:
        layout = conn.execute(bands.LAYOUT_SQL.format(table=f'"{schema}".messages'))
        names = [r[0] for r in layout.fetchall() if r[1]]
        top = conn.execute(f'SELECT coalesce(max(id), 0) FROM "{schema}".messages'
                           ).fetchone()[0]
        if bands.wants_roll(names, top):
            began = time.monotonic()
            print(f"rolling the bands in: {bands.roll(conn, schema)} "
                  f"({time.monotonic() - began:.0f}s)", flush=True)
            conn.execute(f'VACUUM ANALYZE "{schema}".messages')
            names = [r[0] for r in conn.execute(bands.LAYOUT_SQL.format(
                table=f'"{schema}".messages')).fetchall() if r[1]]
    segments = bands.layout(names)
    print(f"GIN index bands: {len(segments)} (" + ", ".join(
        f"{seg.lo}-" + ("" if seg.hi is None else str(seg.hi - 1))
        for seg in segments) + ")")


def _fractions(url: str, schema: str) -> None:
    """The share of messages holding each word the shapes use."""
    w = vocabulary()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'SET search_path = "{schema}"')
        total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        out = []
        for rank in (1, 2, 124, 130, 350, 4000, 4100, 45000):
            n = conn.execute("SELECT count(*) FROM messages WHERE content_tsv @@ "
                             "to_tsquery('simple', %s)", [w[rank - 1]]).fetchone()[0]
            out.append(f"{w[rank - 1]} (rank {rank}) {n / total:.2%}")
        n = conn.execute("SELECT count(*) FROM messages WHERE content_tsv @@ "
                         "to_tsquery('simple', %s)", [f"{w[129]} <-> {w[123]}"]).fetchone()[0]
        out.append(f'"{w[129]} {w[123]}" {n} messages')
    print("words: " + "; ".join(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="postgresql:// URL of the database (a schema of it "
                        "holds the store)")
    parser.add_argument("--schema", default="sessiondb")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--only", default="", help="only the shapes whose name holds this")
    parser.add_argument("--rebuild", action="store_true", help="build even if the store "
                        "already holds --messages messages")
    args = parser.parse_args(argv)
    with psycopg.connect(args.url, autocommit=True) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        found = conn.execute("SELECT to_regclass(%s)", [f"{args.schema}.messages"]
                             ).fetchone()[0]
        have = conn.execute(f'SELECT count(*) FROM "{args.schema}".messages'
                            ).fetchone()[0] if found else 0
    print(f"Python {platform.python_version()}, PostgreSQL {server}, psycopg "
          f"{psycopg.__version__}, sessiondb {sessiondb.__version__}; shared_buffers "
          f"{buffers}; {os.cpu_count()} CPUs")
    if args.rebuild or have != args.messages:
        print(f"building {args.messages} messages in schema {args.schema} ...", flush=True)
        print(f"  built in {build(args.url, args.schema, args.messages):.0f}s")
    _bands(args.url, args.schema)
    _fractions(args.url, args.schema)
    print(f"limit=20; rounds={args.rounds} (+3 warm-up), shapes shuffled each round; one "
          f"client; load average before: {os.getloadavg()[0]:.2f}", flush=True)
    measure(args.url, args.schema, args.rounds, args.only)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main(sys.argv[1:])
