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
writer's previous acknowledged checkpoint (a broken chain). The writers' acknowledged
sequence numbers reach ``verify`` through a ledger of small files in the temporary
directory (the writers are other processes), so ``lost`` counts acknowledged
checkpoints missing, not failed writes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import sqlite3
import tempfile
import time
from typing import Any

NAME = "LangGraph"
BACKENDS = ("sessiondb", "sessiondb-pg", "SqliteSaver")
#: The thread every writer checkpoints.
THREAD = "bench-thread"
_MESSAGE = ("Summarise the incident timeline for the on-call review: when the first alert "
            "fired, which dashboards showed the queue growing, who paged the storage team, "
            "what the rollback changed and how long the backlog took to drain; end with "
            "three follow-ups and an owner for each of them.")


class _Ledger:
    """The acknowledged sequence numbers of each writer, one JSON file per writer in a
    directory named after the target (a file path or a URL)."""

    def __init__(self, target: str) -> None:
        digest = hashlib.sha256(target.encode()).hexdigest()[:16]
        self.dir = os.path.join(tempfile.gettempdir(), f"sessiondb-fw-langgraph-{digest}")

    def reset(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)

    def write(self, writer: int, acked: list[int]) -> None:
        with open(os.path.join(self.dir, f"{writer}.json"), "w") as out:
            json.dump(acked, out)

    def read(self, writers: int) -> dict[int, list[int]]:
        acked = {}
        for writer in range(writers):
            path = os.path.join(self.dir, f"{writer}.json")
            if os.path.exists(path):
                with open(path) as f:
                    acked[writer] = json.load(f)
        shutil.rmtree(self.dir, ignore_errors=True)
        return acked


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


def prepare(backend: str, target: str) -> None:
    """Make the saver's tables once, as an app's first start would (``SqliteSaver``
    makes them at its first write; a setup race of 8 first writes is not what this
    measures), and an empty ledger."""
    saver = _open(backend, target)
    try:
        if backend == "SqliteSaver":
            saver.setup()
    finally:
        _close(backend, saver)
    _Ledger(target).reset()


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
    # Imported before the first write's clock starts: importing LangGraph takes seconds
    # with 8 processes starting at once, and is no write's wait.
    importlib.import_module("langgraph.checkpoint.base")
    importlib.import_module("langgraph.checkpoint.sqlite" if backend == "SqliteSaver"
                            else "sessiondb.adapters.langgraph")
    errors: list[str] = []
    waits: list[float] = []
    acked: list[int] = []
    saver = None
    config: dict[str, Any] = {"configurable": {"thread_id": THREAD, "checkpoint_ns": ""}}
    versions: dict[str, Any] = {}
    try:
        for seq in range(count):
            try:  # opened once, as an app opens its checkpointer at start: not a write
                saver = saver or _open(backend, target)
            except Exception as exc:  # this write fails; the next one opens again
                errors.append(f"open: {type(exc).__name__}: {exc}")
                continue
            started = time.monotonic()
            try:
                cp, new = checkpoint(saver, writer, seq, dict(versions))
                config = saver.put(config, cp, {"source": "loop", "step": seq,
                                                "writer": writer, "seq": seq}, new)
                versions = dict(cp["channel_versions"])
                acked.append(seq)
            except Exception as exc:  # the table counts it; the writer goes on
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                waits.append(time.monotonic() - started)
    finally:
        if saver is not None:
            try:
                _close(backend, saver)
            except Exception as exc:
                errors.append(f"close: {type(exc).__name__}: {exc}")
        _Ledger(target).write(writer, acked)
    return {"ok": len(acked), "errors": errors, "waits": waits}


def verify(backend: str, target: str, writers: int, count: int) -> dict[str, Any]:
    """The thread's checkpoints against what each writer says was acknowledged (see the
    module docstring for what out of order means here)."""
    listed = _listed(backend, target)  # (writer, seq, checkpoint_id, parent_id), newest first
    acked = _Ledger(target).read(writers)
    ids = {(w, s): cid for w, s, cid, _ in listed}
    present = set(ids)
    out_of_order = 0
    for writer in range(writers):
        mine = [(s, parent) for w, s, _, parent in listed if w == writer]
        seqs = [s for s, _ in mine]
        done = sorted(acked.get(writer, ()))
        chain_ok = all(
            parent == (ids.get((writer, max(p for p in done if p < s)))
                       if any(p < s for p in done) else None)
            for s, parent in mine)
        if seqs != sorted(seqs, reverse=True) or not chain_ok:
            out_of_order += 1
    wanted = {(w, s) for w, seqs in acked.items() for s in seqs}
    return {"present": len(listed), "lost": len(wanted - present),
            "duplicated": len(listed) - len(present), "out_of_order": out_of_order}


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
