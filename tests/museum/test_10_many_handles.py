"""Exhibit 10, many handles: 50 instances on one path in one process, opened and closed
in a loop while other processes write. No descriptor or thread is left behind, no lock
is lost, nothing is corrupted.

SQLite's locks on a database are POSIX advisory locks, and POSIX drops *all* of a
process's locks on a file when *any* of its descriptors for that file is closed
(https://sqlite.org/howtocorrupt.html#_posix_advisory_locks_canceled_by_a_separate_thread_doing_close_).
SQLite's unix VFS works around that within one process (it shares one lock table per
file and defers closing a descriptor while the process still holds locks), so the
danger is a library that opens or closes the file behind SQLite's back. The proof is a
foreign process: while one long-lived instance here holds a write transaction, dozens
of other instances on the same path are opened, used and closed, and after every close
a plain apsw connection in another process must still be refused the write lock
(``BEGIN IMMEDIATE`` with busy timeout 0 raises ``BusyError``).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

import museum_workers
import workers
from sessiondb import SessionDB

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")

INSTANCES = 50
CYCLES = 8
FOREIGN_WRITERS = 2


def open_fds() -> set[tuple[int, str]]:
    """This process's descriptors, as (number, what it refers to)."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.add((int(fd), os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:  # the descriptor listdir itself used, closed meanwhile
            continue
    return out


def fds_under(directory: Path) -> list[str]:
    """Names of the files under ``directory`` this process has a descriptor for."""
    return sorted(os.path.basename(target) for _, target in open_fds()
                  if target.startswith(str(directory) + os.sep))


def posix_locks(files: dict[int, str]) -> set[tuple[str, str, int, int]]:
    """This process's POSIX locks on ``files`` (inode -> label), from ``/proc/locks``:
    {(label, READ|WRITE, first byte, last byte)}. Read without opening any of them."""
    pid = str(os.getpid())
    out = set()
    with open("/proc/locks") as table:
        for line in table:
            f = line.split()
            if f[1] == "->" or f[1] != "POSIX" or f[4] != pid:
                continue  # blocked waiters, OFD and flock locks, other processes
            label = files.get(int(f[5].rsplit(":", 1)[1]))
            if label is not None:
                out.add((label, f[3], int(f[6]), int(f[7])))
    return out




def covered(lock: tuple[str, str, int, int], locks: set[tuple[str, str, int, int]]) -> bool:
    """True when ``locks`` still hold ``lock``'s bytes, as it is or stronger: the kernel
    keeps one record per run of a process's adjacent locks of one type, so a lock that
    this process takes next to a held one (another handle's checkpoint lock at byte 121
    of the -shm beside the write lock at 120) merges the two into one record, which
    compared as a tuple looked like a lost lock."""
    label, kind, first, last = lock
    return any(other[0] == label and other[1] in (kind, "WRITE") and other[2] <= first
               and other[3] >= last for other in locks)


def test_fifty_instances_in_a_loop_leak_nothing_and_lose_no_lock(tmp_path: Path, exhibit):
    path = tmp_path / "state.db"
    # Warm-up: whatever sessiondb starts once per process (not per instance) exists from
    # here on, so the before/after figures below compare like with like.
    with SessionDB(path) as warm:
        warm.create_session("cycles", "local")
        warm.append_message("cycles", "user", "warm-up")
    workers.wait_for(lambda: fds_under(tmp_path) == [], timeout=10)

    stop, results = SPAWN.Event(), SPAWN.Queue()
    ready = [SPAWN.Event() for _ in range(FOREIGN_WRITERS)]
    writers = [SPAWN.Process(target=museum_workers.steady_writer,
                             args=(str(path), w, stop, ready[w], results))
               for w in range(FOREIGN_WRITERS)]
    probe_end, probe_far_end = SPAWN.Pipe()
    prober = SPAWN.Process(target=museum_workers.lock_probe, args=(str(path), probe_far_end))

    def probe() -> tuple[str, str]:
        probe_end.send("probe")
        assert probe_end.poll(30), "the lock probe did not answer"
        return probe_end.recv()

    own: list[tuple[int, str]] = []     # (id, content) acknowledged to this process
    reports: list[dict] = []
    per_cycle_fds: list[int] = []
    threads_peak = 0
    held_probes: list[tuple[str, str]] = []
    resident = None
    try:
        for p in (*writers, prober):
            p.start()
        for event in ready:
            assert event.wait(60), "a foreign writer never started"
        # Compared by identity, so that whatever an earlier test of this worker process
        # leaves behind (or lets go of meanwhile) cannot pass for ours.
        gc.collect()
        threads_before, fds_before = set(threading.enumerate()), open_fds()

        def new_threads() -> list[str]:
            return sorted(t.name for t in threading.enumerate() if t not in threads_before)

        resident = SessionDB(path)
        # Many handles, opened and closed in a loop, while the foreign writers write.
        for cycle in range(CYCLES):
            handles = [SessionDB(path) for _ in range(INSTANCES)]
            for n, db in enumerate(handles):
                content = f"c{cycle}-i{n}"
                own.append((db.append_message("cycles", "user", content), content))
                if n % 10 == 0:
                    assert db.get_session("cycles")["message_count"] >= len(own)
                    with db.snapshot():
                        db.message_count("cycles")
            threads_peak = max(threads_peak, threading.active_count())
            for db in handles:
                db.close()
            per_cycle_fds.append(len(fds_under(tmp_path)))
        stop.set()
        # Drain before joining: a child blocks on exit until its queued data is read.
        reports = workers.collect(results, writers, FOREIGN_WRITERS)
        for p in writers:
            p.join(60)

        # No lost locks: with the writers gone, the probe gets the lock (a control), then
        # loses it to the resident's transaction for as long as the block lasts, however
        # many other handles come and go meanwhile, and gets it again afterwards.
        assert probe() == ("acquired", "acquired")
        files = {os.stat(f"{path}{suffix}").st_ino: f"db{suffix}" for suffix in ("", "-shm")}
        with resident.transaction():
            own.append((resident.append_message("cycles", "user", "held-first"), "held-first"))
            # The locks SQLite holds for the block (seen in /proc/locks: a read lock on
            # the db file, the WAL write lock on -shm) must outlive every close below.
            held_locks = posix_locks(files)
            lost_locks: list[set] = []

            def check_locks() -> None:
                now = posix_locks(files)
                missing = {lock for lock in held_locks if not covered(lock, now)}
                if missing:
                    lost_locks.append(missing)
                held_probes.append(probe())

            handles = [SessionDB(path) for _ in range(INSTANCES)]
            for db in handles:
                db.get_session("cycles")
                with db.snapshot():
                    db.message_count()
            check_locks()
            for db in handles:
                db.close()
                check_locks()
            for _ in range(10):  # one at a time, too: open, read, close
                with SessionDB(path) as db:
                    db.list_sessions()
                check_locks()
            own.append((resident.append_message("cycles", "user", "held-last"), "held-last"))
        assert probe() == ("acquired", "acquired")
        resident.close()

        try:  # helper threads end asynchronously after close (within ~50 ms)
            workers.wait_for(lambda: new_threads() == [], timeout=10)
        except AssertionError:
            pass  # reported below, by name
        threads_left, threads_after = new_threads(), threading.active_count()
        fds_after = open_fds()
        leftover = fds_under(tmp_path)
        probe_end.send("quit")
        assert probe_end.poll(30) and probe_end.recv() == "bye"
        prober.join(30)
    finally:
        if resident is not None:
            resident.close()
        stop.set()
        for p in (*writers, prober):
            if p.is_alive():
                p.kill()
                p.join(10)

    assert [p.exitcode for p in (*writers, prober)] == [0] * (FOREIGN_WRITERS + 1)
    assert len(reports) == FOREIGN_WRITERS
    assert [r for r in (r["timeouts"] + r["failed"] for r in reports) if r] == []
    assert {(f, kind) for f, kind, _, _ in held_locks} >= {("db", "READ"), ("db-shm", "WRITE")}
    assert lost_locks == [], f"this process lost locks it held: {lost_locks[:3]}"
    bad = [p for p in held_probes if p != ("busy", "busy")]
    assert bad == [], f"a foreign process got (or failed oddly at) the write lock: {bad[:3]}"
    # Nothing left behind: no descriptor of the store, and as many descriptors and
    # helper threads as before the first handle of the loop.
    assert leftover == []
    assert fds_after - fds_before == set()
    # While the resident instance is open SQLite keeps the closed handles' descriptors of
    # the db file for reuse (closing them would drop the resident's locks): a constant
    # number, not a growing one.
    assert max(per_cycle_fds) == per_cycle_fds[0], f"descriptors grew: {per_cycle_fds}"
    assert threads_left == []
    # Every acknowledged write, ours and theirs, is there under its id; counters exact.
    foreign = [(mid, content) for r in reports for mid, content in r["acked"]]
    with SessionDB(path) as db:
        stored = {m["id"]: m["content"] for sid in ["cycles"] + [r["session"] for r in reports]
                  for m in db.get_messages(sid)}
        assert [(mid, c) for mid, c in own + foreign if stored.get(mid) != c] == []
        assert db.get_session("cycles")["message_count"] == len(own) + 1  # + the warm-up
        for r in reports:
            assert db.get_session(r["session"])["message_count"] == len(r["acked"])
        assert db.message_count() == len(own) + len(foreign) + 1
    assert workers.integrity(path) == [("ok",)]
    exhibit("many handles",
            "no fd or thread left, write lock never lost, every write there, integrity ok",
            cycles=CYCLES, instances=INSTANCES, opened=(CYCLES + 1) * INSTANCES + 10,
            fds_before=len(fds_before), fds_after=len(fds_after),
            store_fds_between_cycles=max(per_cycle_fds),
            threads_before=len(threads_before), threads_after=threads_after,
            threads_peak=threads_peak, foreign_writes=len(foreign), own_writes=len(own),
            lock_checks=len(held_probes), locks_held=len(held_locks))
