"""The read side of the scale benchmark: every search, listing and count shape, timed.

Each shape is one public call. After one warm-up round the shapes run ``repeats``
rounds, in a seeded shuffled order each round (so that no shape always follows the same
one and inherits its cache), and every call is timed end to end with
``time.perf_counter``. Calls that pick a session draw it from a sample of the store's
sessions, another each round.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections import Counter
from typing import Any, Callable

import apsw

from ..writes import percentile

Shape = tuple[str, str, Callable[[random.Random], Any]]

_QS = (("p50", 50), ("p90", 90), ("p99", 99))
_WORD = re.compile(r"[a-z0-9]+")


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


def words_from_store(db: Any, session_ids: list[str]) -> dict[str, str]:
    """Search words taken from a sample of the store's messages, when the caller does not
    know the vocabulary: the two most frequent words, the most frequent phrase of two
    different words, a word of sample rank about 50 (``mid``), and the longest word seen
    once (``rare``: rare in the sample, not necessarily in the store)."""
    counts: Counter[str] = Counter()
    pairs: Counter[tuple[str, str]] = Counter()
    for sid in session_ids[:10]:
        for m in db.get_messages(sid, limit=50):
            words = _WORD.findall((m["content"] or "").lower())
            counts.update(words)
            pairs.update(p for p in zip(words, words[1:]) if p[0] != p[1])
    ranked = [w for w, _ in counts.most_common()] or ["a", "b"]
    once = sorted((w for w, c in counts.items() if c == 1), key=lambda w: (-len(w), w))
    phrase = pairs.most_common(1)[0][0] if pairs else (ranked[0], ranked[-1])
    return {"common": ranked[0], "second": ranked[min(1, len(ranked) - 1)],
            "phrase": " ".join(phrase), "prefix": ranked[0][:3] + "*",
            "mid": ranked[min(50, len(ranked) - 1)],
            "rare": once[0] if once else ranked[-1]}


def run_shapes(shapes: list[Shape], repeats: int, seed: int, label: str
               ) -> dict[str, dict[str, Any]]:
    """Time every shape: one warm-up round, then ``repeats`` shuffled rounds.

    :returns: per shape name, ``call`` (what was called), ``latency_s`` (``p50``,
        ``p90``, ``p99``, ``max``), ``repeats`` and ``results`` (the length of the first
        answer: hits, sessions, or the count itself).
    """
    rng = random.Random(seed)
    out: dict[str, dict[str, Any]] = {}
    times: dict[str, list[float]] = {name: [] for name, _, _ in shapes}
    for name, call, fn in shapes:  # warm-up, and the size of each answer
        answer = fn(rng)
        out[name] = {"call": call, "results": answer if isinstance(answer, int)
                     else len(answer)}
    order = list(shapes)
    shown = time.monotonic()
    for r in range(repeats):
        rng.shuffle(order)
        for name, _, fn in order:
            t0 = time.perf_counter()
            fn(rng)
            times[name].append(time.perf_counter() - t0)
        if time.monotonic() - shown >= 2.0:
            shown = time.monotonic()
            print(f"    {label}: round {r + 1}/{repeats}", file=sys.stderr, flush=True)
    for name, entry in out.items():
        entry["latency_s"] = dist(times[name])
        entry["repeats"] = len(times[name])
    return out


def measure_search(db_path: str, repeats: int, *, words: dict[str, str] | None = None,
                   seed: int = 1) -> dict[str, dict[str, Any]]:
    """Time ``search_messages`` in every query shape on the store at ``db_path``.

    :param words: ``common``, ``second``, ``phrase``, ``prefix``, ``mid``, ``rare``
        (see :meth:`~sessiondb.bench.scale_data.Corpus.search_words`); taken from a
        sample of the store when None.
    :returns: per shape, as :func:`run_shapes` returns it, plus ``words``.
    """
    from sessiondb import SessionDB

    ids = sample_sessions(db_path, seed=seed)
    with SessionDB(db_path) as db:
        w = words or words_from_store(db, ids)
        common, phrase = w["common"], f'"{w["phrase"]}"'
        s = db.search_messages
        shapes: list[Shape] = [
            ("common", f"search_messages({common!r})", lambda r: s(common)),
            ("phrase", f"search_messages({phrase!r})", lambda r: s(phrase)),
            ("prefix", f"search_messages({w['prefix']!r})", lambda r: s(w["prefix"])),
            ("or", f"search_messages('{common} OR {w['second']}')",
             lambda r: s(f"{common} OR {w['second']}")),
            ("not", f"search_messages('{common} NOT {w['second']}')",
             lambda r: s(f"{common} NOT {w['second']}")),
            ("mid", f"search_messages({w['mid']!r})", lambda r: s(w["mid"])),
            ("rare", f"search_messages({w['rare']!r})", lambda r: s(w["rare"])),
            ("common_sources", f"search_messages({common!r}, sources=['telegram', "
             "'discord'])", lambda r: s(common, sources=["telegram", "discord"])),
            ("common_rare_source", f"search_messages({common!r}, sources=['slack'])",
             lambda r: s(common, sources=["slack"])),
            ("common_exclude_sources", f"search_messages({common!r}, "
             "exclude_sources=['cli'])", lambda r: s(common, exclude_sources=["cli"])),
            ("common_roles", f"search_messages({common!r}, roles=['assistant'])",
             lambda r: s(common, roles=["assistant"])),
            ("common_session", f"search_messages({common!r}, session_id=<one of "
             f"{len(ids)}>)", lambda r: s(common, session_id=r.choice(ids))),
            ("common_offset_100", f"search_messages({common!r}, offset=100)",
             lambda r: s(common, offset=100)),
        ]
        out = run_shapes(shapes, repeats, seed, "search")
    out["words"] = dict(w)
    return out


def measure_listing(db_path: str, repeats: int, *, seed: int = 1
                    ) -> dict[str, dict[str, Any]]:
    """Time ``list_sessions`` (every filter, a deep page), the counts and
    ``get_messages`` pages on the store at ``db_path``.

    :returns: per shape, as :func:`run_shapes` returns it.
    """
    from sessiondb import SessionDB

    ids = sample_sessions(db_path, seed=seed)
    with SessionDB(db_path) as db:
        deep = min(10_000, db.session_count() // 2)
        ls = db.list_sessions
        shapes: list[Shape] = [
            ("list", "list_sessions()", lambda r: ls()),
            ("list_source", "list_sessions('telegram')", lambda r: ls("telegram")),
            ("list_rare_source", "list_sessions('slack')", lambda r: ls("slack")),
            ("list_exclude_sources", "list_sessions(exclude_sources=['cli'])",
             lambda r: ls(exclude_sources=["cli"])),
            ("list_active", "list_sessions(active=True)", lambda r: ls(active=True)),
            ("list_ended", "list_sessions(active=False)", lambda r: ls(active=False)),
            ("list_deep_page", f"list_sessions(offset={deep})", lambda r: ls(offset=deep)),
            ("list_source_deep_page", f"list_sessions('telegram', offset={deep // 4})",
             lambda r: ls("telegram", offset=deep // 4)),
            ("session_count", "session_count()", lambda r: db.session_count()),
            ("session_count_source", "session_count('telegram')",
             lambda r: db.session_count("telegram")),
            ("message_count", "message_count()", lambda r: db.message_count()),
            ("message_count_session", f"message_count(<one of {len(ids)}>)",
             lambda r: db.message_count(r.choice(ids))),
            ("get_session", f"get_session(<one of {len(ids)}>)",
             lambda r: [db.get_session(r.choice(ids))]),
            ("get_messages", f"get_messages(<one of {len(ids)}>, limit=50)",
             lambda r: db.get_messages(r.choice(ids), limit=50)),
        ]
        return run_shapes(shapes, repeats, seed, "listing")
