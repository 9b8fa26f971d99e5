"""Many spawned processes sharing one file: every acknowledged write is there exactly once.

Asserted: exit codes, exact counts, ``integrity_check``, no surfaced error. Never timing.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

import workers
from sessiondb import SessionDB
from sessiondb.schema import SCHEMA_VERSION

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")




def test_eight_processes_append_to_one_session(db_path: Path):
    procs_n, count, every = 8, 500, 25
    results, start = SPAWN.Queue(), SPAWN.Event()
    reports = workers.run_all(SPAWN, workers.append_worker,
                              [(str(db_path), w, count, every, results, start)
                               for w in range(procs_n)], results, start)

    db = SessionDB(db_path)
    messages = db.get_messages("shared")
    by_id = {m["id"]: m["content"] for m in messages}
    contents = [m["content"] for m in messages]
    expected = [f"p{w}-m{i}" for w in range(procs_n) for i in range(count)]
    assert len(contents) == len(set(contents)) == procs_n * count  # exactly once
    assert set(contents) == set(expected)
    for report in sorted(reports, key=lambda r: r["worker"]):
        assert report["timeouts"] == 0 and report["failed"] == 0
        for mid, content in report["acked"]:  # every acknowledged id holds its content
            assert by_id[mid] == content
        # A worker's own messages appear in the order it wrote them.
        own = [m["id"] for m in messages if m["content"].startswith(f"p{report['worker']}-m")]
        assert own == sorted(own)
        assert own == [mid for mid, _ in report["acked"]]
    shared = db.get_session("shared")
    assert shared["message_count"] == procs_n * count
    assert shared["tool_call_count"] == 0
    created = [sid for r in reports for sid in r["created"]]
    assert len(created) == procs_n * (count // every)
    for sid in created:
        session = db.get_session(sid)
        assert session["message_count"] == 1 and session["tool_call_count"] == 2
    assert db.session_count() == 1 + len(created)
    assert db.message_count() == procs_n * count + len(created)
    # The full-text index agrees with the table.
    assert len(db.search_messages("p3-m17")) >= 1
    db.close()
    assert workers.integrity(db_path) == [("ok",)]


def test_sixteen_processes_open_one_fresh_file_at_once(tmp_path: Path):
    path = tmp_path / "fresh" / "state.db"  # neither the directory nor the file exists
    procs_n = 16
    results, start = SPAWN.Queue(), SPAWN.Event()
    procs = [SPAWN.Process(target=workers.open_fresh_worker, args=(str(path), start, results))
             for _ in range(procs_n)]
    for p in procs:
        p.start()
    time.sleep(0.5)  # not needed for correctness: lets most children reach the start line
    start.set()
    reports = workers.collect(results, procs, procs_n)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * procs_n
    assert len(reports) == procs_n
    # Racing creators may each build a private copy; exactly one is linked into place,
    # and none is left behind.
    assert sum(r["creates"] for r in reports) >= 1
    assert {r["user_version"] for r in reports} == {SCHEMA_VERSION}
    assert not [n for n in os.listdir(path.parent) if ".sessiondb-new-" in n]
    db = SessionDB(path)
    assert db.session_count() == procs_n
    assert int(db._engine._conn.pragma("user_version")) == SCHEMA_VERSION
    assert int(db._engine._conn.pragma("auto_vacuum")) == 2  # incremental, set before WAL
    db.close()
    assert workers.integrity(path) == [("ok",)]
    assert oct(os.stat(path.parent).st_mode & 0o777) == "0o700"
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
