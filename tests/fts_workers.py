"""Spawned processes for tests/test_fts_tables.py (top-level, so ``spawn`` can import
them), and the store builder those tests share."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from maintenance_workers import kill_after
from sessiondb import SessionDB
from sessiondb.fts_tables import BLOCK

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def block(n: int) -> int:
    """The first id of the ``n``-th block of ids (0-based)."""
    return n * BLOCK + 1


def text(mid: int) -> str:
    """About 1 KB (FTS5 indexes a few thousand of these in a tiny hold bound's step,
    not tens of thousands as of short ones), with ``note <mid>`` to find it by."""
    filler = " ".join(WORDS[(mid * 7 + k * 5) % len(WORDS)] for k in range(150))
    return f"note {mid} {filler}"


def spread(runs: Sequence[tuple[int, int]], started_at: float = 1000.0,
           ended: bool = False) -> list[dict[str, Any]]:
    """Sessions to import, one per ``(first id, count)`` run of message ids: the import
    keeps exported ids that are free, so a store gets messages in any block in one
    cheap call."""
    return [{"id": f"s{first}", "source": "cli", "started_at": started_at + k,
             "ended_at": started_at + k + 1.0 if ended else None,
             "messages": [{"id": first + i, "role": "user", "content": text(first + i),
                           "timestamp": started_at + k} for i in range(count)]}
            for k, (first, count) in enumerate(runs)]


def build(path: Path | str, runs: Sequence[tuple[int, int]]) -> None:
    with SessionDB(path) as db:
        db.import_sessions(spread(runs))


def appender(path: str, go: Any, did: Any, stop: Any, results: Any, first: int) -> None:
    """Once ``go`` is set, append to a session of its own until ``stop`` is; ``did``
    is set after ``first`` appends. Reports the acknowledged ids and the errors (there
    must be none)."""
    acked: list[int] = []
    errors: list[str] = []
    with SessionDB(path) as db:
        db.ensure_session("writer", "probe")
        results.put("ready")
        go.wait(120)
        while not stop.is_set() or len(acked) < first:
            try:
                acked.append(db.append_message("writer", "user", f"probe {len(acked)} kilo"))
            except Exception as exc:  # reported to the test, which fails on any
                errors.append(repr(exc))
                if len(errors) > 20:
                    break
            if len(acked) == first:
                did.set()
    results.put((acked, errors))


def rebuild_and_die(path: str, task: str, steps: int, hold_timeout: float) -> None:
    """Rebuild the index and die by SIGKILL at the ``steps``-th report of ``task``."""
    with SessionDB(path, hold_timeout=hold_timeout) as db:
        db.rebuild_search_index(progress=kill_after(steps, task))
