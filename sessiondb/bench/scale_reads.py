"""The read side of the scale benchmark: which read measurements it runs, and helpers.

Listing, counts and pages are timed by :func:`sessiondb.bench.scale_listing.measure_listing`.
Search is timed by :func:`sessiondb.bench.scale_search.measure_search` where that module
exists; until then by :func:`stand_in_search`, which returns figures of the same shape
(``{"shapes": {name: {"p50_ms", "p99_ms", "max_ms", "hits", "n"}}, "terms": ...}``).
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any, Callable

import apsw

from ..writes import percentile

_QS = (("p50", 50), ("p90", 90), ("p99", 99))


def dist(samples: list[float]) -> dict[str, float]:
    """``p50``, ``p90``, ``p99`` and ``max`` of ``samples`` (seconds)."""
    out = {name: percentile(samples, q) for name, q in _QS}
    out["max"] = max(samples) if samples else 0.0
    return out


def sample_sessions(db_path: str, n: int = 100, seed: int = 1) -> list[str]:
    """Ids of up to ``n`` sessions that have messages, drawn with a seed (read-only)."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        ids = [r[0] for r in conn.execute(
            "SELECT id FROM sessions WHERE message_count > 0 ORDER BY id")]
    finally:
        conn.close()
    rng = random.Random(seed)
    return rng.sample(ids, min(n, len(ids)))


def measure_reads(db_path: str, repeats: int, seed: int) -> dict[str, Any]:
    """Time every search shape, then every listing, count and page shape.

    :returns: ``search`` and ``listing``, each the document its measuring function
        returns.
    """
    from .scale_listing import measure_listing
    try:
        from .scale_search import measure_search  # type: ignore[import-not-found]
    except ImportError:
        measure_search = stand_in_search
    print("  search ...", file=sys.stderr, flush=True)
    search = measure_search(db_path, repeats, seed=seed)
    print("  listing ...", file=sys.stderr, flush=True)
    listing = measure_listing(db_path, repeats, seed=seed)
    return {"search": search, "listing": listing}


def pick_words(db_path: str) -> dict[str, Any]:
    """The three words in most messages (``common``), one in about 1% (``mid``), one in
    about 0.03% (``rare``), from FTS5's own counts (an ``fts5vocab`` table of a read-only
    connection), with ``doc_fraction`` of each."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        conn.set_busy_timeout(10_000)
        conn.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, messages_fts, "
                     "row)")
        total = max(1, conn.execute("SELECT count(*) FROM messages").fetchone()[0])
        vocab = sorted(conn.execute("SELECT doc, term FROM temp.vocab WHERE term GLOB "
                                    "'[a-z]*'"), reverse=True)
    finally:
        conn.close()

    def near(fraction: float) -> str:
        return min(vocab, key=lambda r: abs(r[0] / total - fraction))[1]

    words = {"common": [t for _, t in vocab[:3]], "mid": near(0.01), "rare": near(0.0003)}
    docs = {t: d for d, t in vocab}
    words["doc_fraction"] = {t: round(docs[t] / total, 5)
                             for t in [*words["common"], words["mid"], words["rare"]]}
    return words


def stand_in_search(db_path: str, repeats: int, *, seed: int = 1) -> dict[str, Any]:
    """Time ``search_messages`` in every query shape (a stand-in for
    :func:`sessiondb.bench.scale_search.measure_search`, same figures).

    One warm-up call per shape, then ``repeats`` timed calls.
    """
    from .. import SessionDB

    terms = pick_words(db_path)
    ids = sample_sessions(db_path, 20, seed)
    a, b, _ = (terms["common"] * 3)[:3]
    rng = random.Random(seed)
    with SessionDB(db_path) as db:
        s = db.search_messages
        shapes: dict[str, Callable[[], Any]] = {
            "common word": lambda: s(a),
            "two-word phrase": lambda: s(f'"{a} {b}"'),
            "prefix 3 letters": lambda: s(a[:3] + "*"),
            "a OR b": lambda: s(f"{a} OR {b}"),
            "a NOT b": lambda: s(f"{a} NOT {b}"),
            "mid-frequency word": lambda: s(terms["mid"]),
            "rare word": lambda: s(terms["rare"]),
            "common word sources=[slack]": lambda: s(a, sources=["slack"]),
            "common word sources=[cli]": lambda: s(a, sources=["cli"]),
            "common word exclude_sources=[cli]": lambda: s(a, exclude_sources=["cli"]),
            "common word roles=[tool]": lambda: s(a, roles=["tool"]),
            "common word session_id": lambda: s(a, session_id=rng.choice(ids)),
            "common word offset=100": lambda: s(a, offset=100),
        }
        out: dict[str, Any] = {}
        for name, call in shapes.items():
            call()
            times, hits = [], 0
            for _ in range(repeats):
                t0 = time.perf_counter()
                hits += len(call())
                times.append(time.perf_counter() - t0)
            out[name] = {"p50_ms": round(percentile(times, 50) * 1000, 2),
                         "p99_ms": round(percentile(times, 99) * 1000, 2),
                         "max_ms": round(max(times) * 1000, 2), "hits": hits / repeats,
                         "n": repeats}
    return {"shapes": out, "terms": terms}
