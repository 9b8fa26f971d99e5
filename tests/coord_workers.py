"""Spawned workers for the coordination tests (leases, claims, revisions): module-level
functions, so that ``multiprocessing`` with spawn can import them."""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import apsw

from sessiondb import ClaimLost, LeaseLost, SessionDB, StaleRevision


def acquire_and_exit(path: str, name: str, results: Any) -> None:
    """Take a lease for an hour and exit without releasing it."""
    with SessionDB(path) as db:
        results.put(db.acquire_lease(name, "exited", ttl=3600).token)


def hold_lease(path: str, name: str, ttl: float, ready: Any, go: Any, results: Any,
               owner: str | None = None) -> None:
    """Take ``name`` with a heartbeat; after ``go``, try a fenced write and report how the
    heartbeat and the write fared (the test stops, kills or resumes this process)."""
    db = SessionDB(path)
    lease = db.acquire_lease(name, owner or f"holder-{os.getpid()}", ttl=ttl)
    lost: list[str] = []
    hb = db.heartbeat(lease, on_lost=lambda exc: lost.append(exc.reason))
    ready.put(lease.token)
    go.wait(600)
    # Resumed: the heartbeat's next renewal (due at once) finds the lease gone.
    deadline = time.monotonic() + 60
    while not hb.lost.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with db.fenced(lease):
            db.append_message("ledger", "holder", "written by a fenced-out holder")
        outcome = "written"
    except LeaseLost as exc:
        outcome = f"refused: {exc.reason}"
    hb.stop()
    results.put({"lost": lost, "outcome": outcome})
    db.close()


def race_for_lease(path: str, name: str, rounds: int, start: Any, results: Any) -> None:
    """Acquire ``name`` ``rounds`` times against the other racers; while holding it, write
    a ledger entry (token, when acquired, when done) through a fenced transaction."""
    db = SessionDB(path)
    owner = f"racer-{os.getpid()}"
    rng = random.Random(os.getpid())
    lost = []
    start.wait(60)
    for _ in range(rounds):
        lease = db.acquire_lease(name, owner, ttl=10, wait=120)
        time.sleep(rng.uniform(0, 0.003))  # the work done under the lease
        try:
            with db.fenced(lease):
                entry = {"token": lease.token, "acquired_at": lease.acquired_at,
                         "done_at": time.time(), "pid": os.getpid()}
                db.append_message("ledger", "holder", json.dumps(entry))
        except LeaseLost:
            lost.append(lease.token)
        db.release_lease(lease)
        time.sleep(rng.uniform(0, 0.002))
    results.put({"pid": os.getpid(), "lost": lost})
    db.close()


def claim_worker(path: str, queue: str, log_dir: str, ready: Any, results: Any) -> None:
    """Claim, work, complete (atomically with the work's result) until the queue is
    drained. Each claim is logged to a file of this worker's, line by line, so that a
    SIGKILL loses at most a partial last line (never a report on a shared queue)."""
    db = SessionDB(path)
    owner = f"worker-{os.getpid()}"
    rng = random.Random(os.getpid())
    ready.put(os.getpid())
    lost = 0
    with open(os.path.join(log_dir, f"{os.getpid()}.log"), "a", buffering=1) as log:
        while True:
            claim = db.claim(queue, owner, ttl=5)
            if claim is None:
                counts = db.queue_counts(queue)
                if counts["ready"] == 0 and counts["claimed"] == 0:
                    break
                time.sleep(0.01)
                continue
            log.write(f"{claim.id} {claim.token}\n")
            time.sleep(rng.uniform(0, 0.004))  # the work
            try:
                with db.fenced(claim):
                    db.append_message("results", "tool", str(claim.id))
                    db.complete_claim(claim)
            except ClaimLost:
                lost += 1
    results.put(("done", os.getpid(), lost))
    db.close()


def edit_prompt(path: str, session_id: str, marker: str, edits: int, start: Any,
                results: Any) -> None:
    """Read-modify-write the system prompt ``edits`` times with an expected revision,
    retrying on StaleRevision: no edit may be lost."""
    db = SessionDB(path)
    conflicts = 0
    start.wait(60)
    for i in range(edits):
        while True:
            session = db.get_session(session_id)
            prompt = (session["system_prompt"] or "") + f"[{marker}{i}]"
            try:
                db.update_system_prompt(session_id, prompt,
                                        expected_revision=session["revision"])
                break
            except StaleRevision:
                conflicts += 1
    results.put({"marker": marker, "conflicts": conflicts})
    db.close()


def claim_and_exit(path: str, queue: str, results: Any) -> None:
    """Claim an item for an hour and exit without completing it."""
    with SessionDB(path) as db:
        results.put(db.claim(queue, "exited", ttl=3600).id)


def hold_write_lock(path: str, ready: Any, go: Any) -> None:
    """A foreign writer (plain apsw, no sessiondb) that holds the write lock until ``go``."""
    conn = apsw.Connection(path)
    conn.execute("BEGIN EXCLUSIVE")
    ready.put(os.getpid())
    go.wait(600)
    conn.execute("ROLLBACK")
    conn.close()


def judge_without_descriptors(identity: tuple, results: Any) -> None:
    """Judge a live holder while this process has no file descriptor left (EMFILE)."""
    import resource

    from sessiondb.process import holder_gone
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        while True:
            held.append(open(os.devnull))
    except OSError as exc:
        exhausted = exc.errno
    verdict = holder_gone(*identity)
    for f in held:
        f.close()
    results.put((exhausted, verdict))
