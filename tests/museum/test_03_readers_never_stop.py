"""Exhibit 3, readers that never stop: a foreign process always has a read transaction
open, and still the WAL stays under its bound while writes keep flowing.

A PASSIVE checkpoint cannot copy the frames a reader's snapshot still needs, so with
readers that are never all idle a store's ``-wal`` file grows without bound (gigabytes
in seconds). Here a foreign process (plain apsw, not sessiondb, so it knows nothing of
the reader room) keeps two 0.3 s read transactions open in turns, a half period apart,
each committing only once the other holds one: at every moment at least one snapshot
is open. The reset policy (:mod:`sessiondb.checkpoint`) must keep the ``-wal`` file under
``wal_limit`` while a writer appends ~4x that much. Asserted: the bound (sampled with
``os.stat`` by the test and after every write by the writer, never opened), every write
present, no timeout, integrity; and that the readers really overlapped throughout.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

import museum_workers
import workers
from sessiondb import SessionDB

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")


def uncovered(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Longest stretch of [start, end] that no interval covers (0.0: always covered)."""
    gap, reached = 0.0, start
    for began, ended in sorted(intervals):
        if began > reached:
            gap = max(gap, min(began, end) - reached)
        reached = max(reached, ended)
        if reached >= end:
            return gap
    return max(gap, end - reached)


def test_wal_stays_bounded_while_foreign_readers_never_stop(tmp_path: Path, exhibit):
    path = tmp_path / "state.db"
    wal_limit = 8 * 1024 * 1024
    count, size = 600, 4000  # ~36 MB of WAL without resets (measured): 4x the limit
    SessionDB(path, wal_limit=wal_limit).close()
    stop, ready, reader_results = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    reader = SPAWN.Process(target=workers.overlapping_readers,
                           args=(str(path), 0.3, stop, ready, reader_results))
    writer_results = SPAWN.Queue()
    writer = SPAWN.Process(target=museum_workers.bounded_wal_writer,
                           args=(str(path), count, size, wal_limit, writer_results))
    wal = Path(str(path) + "-wal")
    peak, samples = 0, 0
    report = reads = None
    try:
        reader.start()
        assert ready.wait(60), "the readers never started"
        writer.start()
        while writer.is_alive() and writer_results.empty():
            try:
                peak = max(peak, os.stat(wal).st_size)
            except FileNotFoundError:
                pass
            samples += 1
            time.sleep(0.005)
        report = (workers.collect(writer_results, [writer], 1) or [None])[0]
        writer.join(60)
    finally:
        stop.set()
        # Drain before joining: a child blocks on exit until its queued data is read.
        reads = (workers.collect(reader_results, [reader], 1, timeout=60) or [None])[0]
        reader.join(60)
        for proc in (reader, writer):
            if proc.is_alive():
                proc.kill()
                proc.join(10)
    assert writer.exitcode == 0 and reader.exitcode == 0
    assert report is not None and reads is not None
    assert reads["errors"] == []
    assert samples > 10
    # The premise: from the writer's first write to its last, a read transaction of the
    # foreign process was open at every moment, and each reader came round repeatedly.
    intervals = [iv for per_reader in reads["intervals"] for iv in per_reader]
    assert uncovered(intervals, report["began"], report["ended"]) == 0.0
    assert min(len(per_reader) for per_reader in reads["intervals"]) >= 2
    # The promise: the bound holds, and the writer was never refused.
    peak = max(peak, report["wal_peak"])
    assert peak < wal_limit, f"-wal reached {peak} bytes (limit {wal_limit})"
    cp = report["checkpoint"]
    assert cp["resets_ok"] >= 1
    assert report["timeouts"] == 0 and report["writes"] >= count
    db = SessionDB(path)
    try:
        assert db.message_count("big") == count
        assert db.get_session("big")["message_count"] == count
        assert [m["id"] for m in db.get_messages("big")] == report["ids"]
    finally:
        db.close()
    assert workers.integrity(path) == [("ok",)]
    exhibit("foreign readers never stop",
            "WAL bounded, every write there, no timeout",
            wal_peak_bytes=peak, wal_limit=wal_limit,
            wal_peak_pct=round(100 * peak / wal_limit, 1), writes=count,
            resets_ok=cp["resets_ok"], resets_failed=cp["resets_failed"],
            longest_write_s=round(report["longest_call_s"], 3),
            longest_lock_wait_s=round(report["lock_wait_max_s"], 3),
            read_txns=len(intervals), duration_s=round(report["ended"] - report["began"], 1))
