"""Processes for tests/test_bulk.py (spawned, so they live in an importable module)."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

from sessiondb import SessionDB

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray "
         "yankee zulu").split()


def session(i: int, messages: int, rng: random.Random, **fields: Any) -> dict[str, Any]:
    """An exported-looking session ``bulk-<i>`` (no message ids: the store gives them)."""
    return {"id": f"bulk-{i:05d}", "source": ("cli", "telegram")[i % 2],
            "started_at": 1_000_000.0 + i, "ended_at": 1_000_000.5 + i,
            "title": f"bulk title {i}" if i % 3 == 0 else None, **fields,
            "messages": [{"role": ("user", "assistant", "tool")[k % 3],
                          "content": " ".join(rng.choice(WORDS) for _ in range(30))
                          + f" marker{i}x{k}",
                          "timestamp": 1_000_000.0 + i + k / 1000,
                          "tool_calls": [{"id": f"c{k}"}] if k % 3 == 1 else None}
                         for k in range(messages)]}


def sessions(count: int, messages: int, seed: int = 1) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    for i in range(count):
        yield session(i, messages, rng)


def write_jsonl(path: Path, count: int, messages: int, seed: int = 1) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for item in sessions(count, messages, seed):
            fh.write(json.dumps(item) + "\n")


def appender(path: str, session_id: str, ready: Any, stop: Any, results: Any) -> None:
    """Append to ``session_id`` until ``stop``; put the acknowledged ids on ``results``."""
    acked: list[int] = []
    error = ""
    try:
        with SessionDB(path) as db:
            db.ensure_session(session_id, "appender")
            ready.set()
            n = 0
            while not stop.is_set() or n < 20:
                acked.append(db.append_message(session_id, "user", f"appended {n} kilo"))
                n += 1
                time.sleep(0.002)
    except BaseException as exc:  # reported, and the test fails on it
        error = f"{type(exc).__name__}: {exc}"
        ready.set()
    results.put((acked, error))


def importer(path: str, source: str, hold_timeout: float) -> None:
    """Import the JSON Lines file ``source`` (killed midway by the test)."""
    from sessiondb.jsonstream import read_items

    with SessionDB(path, hold_timeout=hold_timeout) as db, open(source, "rb") as fh:
        db.import_sessions(read_items(fh))
