"""TEMPORARY: the maintenance calls of the scale benchmark, falling back to the old API
while the streaming/stepped one is not there yet. Removed once it lands."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator


@dataclass
class _P:
    task: str
    done: int
    total: int | None
    unit: str
    elapsed_s: float


def import_sessions(db: Any, items: Iterable[dict[str, Any]],
                    progress: Callable[[Any], None]) -> int:
    if "progress" in inspect.signature(db.import_sessions).parameters:
        return db.import_sessions(items, progress=progress)
    t0 = time.perf_counter()
    done = 0
    batch: list[dict[str, Any]] = []
    for item in items:
        batch.append(item)
        if len(batch) == 20:
            done += db.import_sessions(batch)
            batch = []
            progress(_P("import", done, None, "sessions", time.perf_counter() - t0))
    if batch:
        done += db.import_sessions(batch)
    progress(_P("import", done, None, "sessions", time.perf_counter() - t0))
    return done


def iter_export(db: Any) -> Iterator[dict[str, Any]]:
    if hasattr(db, "iter_export"):
        yield from db.iter_export()
        return
    ids = db._read(lambda c: [r[0] for r in c.execute(
        "SELECT id FROM sessions ORDER BY started_at, id")])
    for sid in ids:
        item = db.export_session(sid)
        if item is not None:
            yield item


def prune_sessions(db: Any, days: float, progress: Callable[[Any], None]) -> int:
    return db.prune_sessions(older_than_days=days, progress=progress)


def rebuild_search_index(db: Any, progress: Callable[[Any], None]) -> int:
    return db.rebuild_search_index(progress=progress)


def reclaim_space(db: Any, progress: Callable[[Any], None]) -> dict[str, Any]:
    return db.reclaim_space(progress=progress)
