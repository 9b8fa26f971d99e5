"""The frameworks benchmark's LangGraph case (:mod:`.frameworks`): 8 processes writing
checkpoints of one thread at once, through
:class:`sessiondb.adapters.langgraph.SessionDBSaver` on a SQLite file (``sessiondb``) or
a PostgreSQL URL (``sessiondb-pg``), and through LangGraph's own ``SqliteSaver`` on a
file (``SqliteSaver``), made as its documentation shows:
``SqliteSaver(sqlite3.connect(path, check_same_thread=False))``, one per process.

Each write is one ``saver.put`` of a checkpoint as a graph's superstep makes it: new
versions of two channels (the step's message, about 300 characters, and a counter),
metadata naming the writer and its sequence number, and as parent the writer's previous
acknowledged checkpoint, so every writer grows its own chain of the thread, as 8 runs
of one thread at once would. No retries besides the saver's own; every error is caught
and counted, never ending the run, and the next write goes on from the last
acknowledged checkpoint. Every write's time is recorded, a failed one included; opening
the saver (once per process, before its first write, as an app opens it at start) is
not a write, and a failure to open fails that write.

``verify`` lists the thread newest first (by checkpoint id: LangGraph's ids are uuid6,
increasing within a process) and finds each checkpoint's writer and sequence number in
its metadata. A writer is *out of order* when its checkpoints are not listed in the
reverse of the order it wrote them, or when one of them does not name, as parent, the
writer's previous acknowledged checkpoint (a broken chain).
"""

from __future__ import annotations

import importlib
import sqlite3
from typing import Any

from .frameworks import Writes, tally

NAME = "LangGraph"
BACKENDS = ("sessiondb", "sessiondb-pg", "SqliteSaver")
#: The thread every writer checkpoints.
THREAD = "bench-thread"
_MESSAGE = ("Summarise the incident timeline for the on-call review: when the first alert "
            "fired, which dashboards showed the queue growing, who paged the storage team, "
            "what the rollback changed and how long the backlog took to drain; end with "
            "three follow-ups and an owner for each of them.")


def _open(backend: str, target: str) -> Any:
    if backend == "SqliteSaver":
        from langgraph.checkpoint.sqlite import SqliteSaver

        return SqliteSaver(sqlite3.connect(target, check_same_thread=False))
    from ..adapters.langgraph import SessionDBSaver

    return SessionDBSaver(target)


def _close(backend: str, saver: Any) -> None:
    if backend == "SqliteSaver":
        saver.conn.close()
    else:
        saver.close()


def load(backend: str) -> None:
    """Import LangGraph (seconds, with 8 processes starting at once): no write's wait."""
    importlib.import_module("langgraph.checkpoint.base")
    importlib.import_module("langgraph.checkpoint.sqlite" if backend == "SqliteSaver"
                            else "sessiondb.adapters.langgraph")


def prepare(backend: str, target: str) -> None:
    """Make the saver's tables once, as an app's first start would (``SqliteSaver``
    makes them at its first write; a setup race of 8 first writes is not what this
    measures)."""
    saver = _open(backend, target)
    try:
        if backend == "SqliteSaver":
            saver.setup()
    finally:
        _close(backend, saver)


def checkpoint(saver: Any, writer: int, seq: int, versions: dict[str, Any]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write ``seq`` of ``writer``: the checkpoint and its new channel versions (the
    running ``versions`` of the writer's chain are advanced)."""
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.base.id import uuid6

    new = {ch: saver.get_next_version(versions.get(ch), None) for ch in ("messages", "step")}
    versions.update(new)
    cp = empty_checkpoint()
    cp.update(id=str(uuid6(clock_seq=seq)), channel_versions=dict(versions),
              channel_values={"messages": f"w{writer} #{seq}: {_MESSAGE}", "step": seq},
              versions_seen={"agent": dict(versions)})
    return cp, new


def work(backend: str, target: str, writer: int, count: int) -> dict[str, Any]:
    """``count`` checkpoints of the thread, one after another (see the module docstring)."""
    writes = Writes()
    saver = None
    config: dict[str, Any] = {"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}}
    versions: dict[str, Any] = {}
    try:
        for seq in range(count):
            try:  # opened once, as an app opens its checkpointer at start: not a write
                saver = saver or _open(backend, target)
            except Exception as exc:  # this write fails; the next one opens again
                writes.error(exc, "open: ")
                continue
            with writes.attempt(seq):
                cp, new = checkpoint(saver, writer, seq, dict(versions))
                config = saver.put(config, cp, {"source": "loop", "step": seq,
                                                "writer": writer, "seq": seq}, new)
                versions = dict(cp["channel_versions"])
    finally:
        if saver is not None:
            try:
                _close(backend, saver)
            except Exception as exc:
                writes.error(exc, "close: ")
    return writes.result()


def verify(backend: str, target: str, acked: dict[int, list[int]]) -> dict[str, Any]:
    """The thread's checkpoints against what each writer says was acknowledged (see the
    module docstring for what out of order means here)."""
    listed = _listed(backend, target)  # (writer, seq, checkpoint_id, parent_id), newest first
    figures = tally(((w, s) for w, s, _, _ in listed), acked, newest_first=True)
    ids = {(w, s): cid for w, s, cid, _ in listed}
    broken = set()
    for w, s, _, parent in listed:
        earlier = [p for p in acked.get(w, ()) if p < s]
        if parent != (ids.get((w, max(earlier))) if earlier else None):
            broken.add(w)
    if broken:  # a writer counts once, whether its order or its chain is off
        order = tally(((w, s) for w, s, _, _ in listed if w not in broken), acked,
                      newest_first=True)["out_of_order"]
        figures["out_of_order"] = order + len(broken)
    return figures


def _listed(backend: str, target: str) -> list[tuple[int, int, str, str | None]]:
    saver = _open(backend, target)
    try:
        out = []
        for t in saver.list({"configurable": {"thread_id": THREAD}}):
            if "writer" in t.metadata:
                parent = t.parent_config["configurable"]["checkpoint_id"] \
                    if t.parent_config else None
                out.append((t.metadata["writer"], t.metadata["seq"],
                            t.config["configurable"]["checkpoint_id"], parent))
        return out
    finally:
        _close(backend, saver)
