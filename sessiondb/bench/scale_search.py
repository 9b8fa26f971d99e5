"""Search latency on a large store, per query shape: ``measure_search(db_path, repeats)``.

Every shape of the scale issue is timed through the public API
(:meth:`sessiondb.SessionDB.search_messages`): a common word, a two-word phrase, prefixes
of 1, 2, 3 and 4 letters, ``a OR b``, ``a NOT b`` (``b`` in a third of the messages, and
``b`` in nearly all of them), a mid-frequency word and a rare word,
each alone and with ``sources`` (a rare and a common source), ``exclude_sources``,
``roles``, ``session_id`` and ``offset=100``. The words are picked by their document
frequency (an ``fts5vocab`` table over the index), so any store works; the first call of
each shape is a warm-up and is not counted.

It uses nothing but the public API and apsw, so the same file measures an older
sessiondb too::

    python sessiondb/bench/scale_search.py STORE.db --repeats 20 [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from typing import Any, Callable

import apsw

__all__ = ["measure_search", "pick_terms", "main"]


def pick_terms(db_path: str, seed: int = 1) -> dict[str, Any]:
    """Words, sources and sessions to search for, chosen from the store itself.

    :returns: ``common`` (the 3 words in most messages), ``mid`` (3 in about 1.3% of
        them), ``rare`` (3 in about 0.03%), ``or`` (pairs in about a third), the rarest
        and the most common ``source``, and 20 random ``sessions``, with
        ``doc_fraction`` of every word.
    """
    conn = apsw.Connection(db_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        # Every table of the index (cut into tables by id block since 0.8).
        try:
            from sessiondb.fts_tables import tables
            names = [t.name for t in tables(conn)]
        except ImportError:  # an older sessiondb: one table
            names = ["messages_fts"]
        docs: dict[str, int] = {}
        for n, name in enumerate(names):
            conn.execute(f"CREATE VIRTUAL TABLE temp.bench_vocab_{n} USING "
                         f"fts5vocab(main, {name}, row)")
            for doc, term in conn.execute(f"SELECT doc, term FROM temp.bench_vocab_{n} "
                                          "WHERE term GLOB '[a-z]*'"):
                docs[term] = docs.get(term, 0) + doc
        total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
        vocab = sorted(((doc, term) for term, doc in docs.items()), reverse=True)
        sources = [r[0] for r in conn.execute(
            "SELECT source FROM sessions GROUP BY source ORDER BY count(*)")]
        session_ids = [r[0] for r in conn.execute("SELECT id FROM sessions")]
    finally:
        conn.close()

    def near(fraction: float, count: int) -> list[str]:
        at = min(range(len(vocab)), key=lambda i: abs(vocab[i][0] / total - fraction))
        return [term for _, term in vocab[at:at + count]]

    rng = random.Random(seed)
    picked = {
        "common": [term for _, term in vocab[:3]],
        "mid": near(0.013, 3),
        "rare": near(0.0003, 3),
        "or": near(0.33, 6),
        "source_rare": sources[0],
        "source_common": sources[-1],
        "sessions": rng.sample(session_ids, min(20, len(session_ids))),
        "messages": total,
    }
    fractions = {term: doc / total for doc, term in vocab}
    picked["doc_fraction"] = {t: round(fractions[t], 5) for key in ("common", "mid", "rare",
                                                                     "or") for t in picked[key]}
    return picked


def _queries(t: dict[str, Any]) -> dict[str, Callable[[int], str]]:
    c, o = t["common"], t["or"]
    return {
        "common word": lambda i: c[i % 3],
        "two-word phrase": lambda i: f'"{c[i % 3]} {c[(i + 1) % 3]}"',
        # Thousands of words, one of them in nearly every message.
        "prefix 1 letter": lambda i: c[i % 3][:1] + "*",
        "prefix 2 letters": lambda i: c[i % 3][:2] + "*",
        "prefix 3 letters": lambda i: c[i % 3][:3] + "*",
        "prefix 4 letters": lambda i: c[i % 3][:4] + "*",
        "a OR b": lambda i: f"{o[2 * (i % 3)]} OR {o[2 * (i % 3) + 1]}",
        "a NOT b": lambda i: f"{c[i % 3]} NOT {o[2 * (i % 3)]}",
        # Few results from two words in nearly every message: FTS5 reads the doclist of
        # the first to find the messages without the second.
        "a NOT b, b everywhere": lambda i: f"{c[1 + i % 2]} NOT {c[0]}",
        "mid-frequency word": lambda i: t["mid"][i % 3],
        "rare word": lambda i: t["rare"][i % 3],
    }


def _variants(t: dict[str, Any]) -> dict[str, Callable[[int], dict[str, Any]]]:
    return {
        "": lambda i: {},
        f"sources=[{t['source_rare']}]": lambda i: {"sources": [t["source_rare"]]},
        f"sources=[{t['source_common']}]": lambda i: {"sources": [t["source_common"]]},
        f"exclude_sources=[{t['source_common']}]":
            lambda i: {"exclude_sources": [t["source_common"]]},
        "roles=[tool]": lambda i: {"roles": ["tool"]},
        "session_id": lambda i: {"session_id": t["sessions"][i % len(t["sessions"])]},
        "offset=100": lambda i: {"offset": 100},
    }


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``samples``; 0.0 when empty."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure_search(db_path: str, repeats: int = 20, *, seed: int = 1,
                   only: list[str] | None = None, grep: str | None = None
                   ) -> dict[str, Any]:
    """Time every query shape ``repeats`` times (plus one warm-up call each).

    :param db_path: a sessiondb store with messages; it is only read (opening it may
        bring its schema up to date).
    :param only: shape names (keys of the result's ``shapes``) to time; None: all.
    :param grep: time only the shapes whose name contains this text.
    :returns: ``{"shapes": {name: {"p50_ms", "p99_ms", "max_ms", "hits", "n"}}, "terms":
        ..., "versions": ...}``; a shape's name is the query shape, then its filter.
    """
    import sessiondb

    terms = pick_terms(db_path, seed)
    shapes: dict[str, Any] = {}
    db = sessiondb.SessionDB(db_path)
    try:
        for qname, query in _queries(terms).items():
            for vname, variant in _variants(terms).items():
                name = f"{qname} {vname}".strip()
                if (only is not None and name not in only) or (grep and grep not in name):
                    continue
                db.search_messages(query(0), **variant(0))  # warm-up
                times, hits = [], 0
                for i in range(repeats):
                    q, kw = query(i), variant(i)
                    start = time.perf_counter()
                    hits += len(db.search_messages(q, **kw))
                    times.append((time.perf_counter() - start) * 1000)
                shapes[name] = {"p50_ms": round(percentile(times, 50), 2),
                                "p99_ms": round(percentile(times, 99), 2),
                                "max_ms": round(max(times), 2), "hits": hits / repeats,
                                "n": repeats}
    finally:
        db.close()
    return {"shapes": shapes, "terms": terms, "versions": {
        "python": platform.python_version(), "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(), "sessiondb": getattr(sessiondb, "__version__", "?")}}


def table(doc: dict[str, Any]) -> str:
    """The figures as a readable table."""
    lines = [f"{'shape':58s} {'p50 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} {'hits':>5s}"]
    for name, f in doc["shapes"].items():
        lines.append(f"{name:58s} {f['p50_ms']:8.2f} {f['p99_ms']:8.2f} {f['max_ms']:8.2f} "
                     f"{f['hits']:5.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("db", help="the store (only read)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", action="append", help="one shape name (repeatable)")
    parser.add_argument("--grep", help="only the shapes whose name contains this text")
    parser.add_argument("--json", dest="json_file", help="write the figures to this file")
    args = parser.parse_args(argv)
    doc = measure_search(args.db, args.repeats, seed=args.seed, only=args.only,
                         grep=args.grep)
    print(json.dumps(doc["versions"]), file=sys.stderr)
    print(table(doc))
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
