"""Coordination under real processes (issue #5): 16 racers for one lease, a holder
SIGKILLed, a holder SIGSTOPped past its TTL and resumed, 16 claimers with kills, and
concurrent editors with expected revisions.

Asserted: exit codes, ledgers, exact counts, integrity. Never a timing: waits are bounds.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import coord_workers
import workers
from sessiondb import LeaseHeld, LeaseLost, SessionDB

pytestmark = pytest.mark.slow

SPAWN = multiprocessing.get_context("spawn")


def ledger(db: SessionDB, session_id: str) -> list[str]:
    return [m["content"] for m in db.get_messages(session_id)]


def test_sixteen_processes_racing_for_one_lease_never_hold_it_together(db_path: Path) -> None:
    racers, rounds = 16, 8
    with SessionDB(db_path) as db:
        db.create_session("ledger", "test")
    results, start = SPAWN.Queue(), SPAWN.Event()
    reports = workers.run_all(SPAWN, coord_workers.race_for_lease,
                              [(str(db_path), "the-lease", rounds, start, results)] * racers,
                              results, start)
    with SessionDB(db_path) as db:
        entries = [json.loads(c) for c in ledger(db, "ledger")]
        final = db.get_lease("the-lease")
    lost = sorted(t for r in reports for t in r["lost"])
    tokens = [e["token"] for e in entries]
    # Every acquisition got the next token: gap-free, each once (a holder whose fenced
    # write was refused reports its token as lost; none is expected with a 10 s TTL).
    assert sorted(tokens + lost) == list(range(1, racers * rounds + 1))
    assert lost == []
    # In the order of the writes, tokens strictly increase, and each holding ended
    # before the next one began: never two holders at once.
    assert tokens == sorted(tokens)
    for before, after in zip(entries, entries[1:]):
        assert before["done_at"] < after["acquired_at"], (before, after)
    assert len({e["pid"] for e in entries}) == racers
    assert final is None  # all released
    assert workers.integrity(db_path) == [("ok",)]


def test_a_sigkilled_holder_is_taken_over_before_its_ttl(db_path: Path) -> None:
    SessionDB(db_path).close()
    ready, go, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=coord_workers.hold_lease,
                           args=(str(db_path), "job", 3600, ready, go, results))
    holder.start()
    token = ready.get(timeout=60)
    with SessionDB(db_path) as db:
        with pytest.raises(LeaseHeld):  # alive: its lease stands
            db.acquire_lease("job", "successor")
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(30)
        assert holder.exitcode == -signal.SIGKILL
        lease = db.acquire_lease("job", "successor", ttl=30)  # an hour before its TTL
        assert lease.token == token + 1
    assert workers.integrity(db_path) == [("ok",)]


def test_a_sigstopped_holder_loses_its_lease_after_the_ttl_and_is_fenced_out(
        db_path: Path) -> None:
    ttl = 6.0
    with SessionDB(db_path) as db:
        db.create_session("ledger", "test")
    ready, go, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    holder = SPAWN.Process(target=coord_workers.hold_lease,
                           args=(str(db_path), "job", ttl, ready, go, results))
    holder.start()
    token = ready.get(timeout=60)
    with SessionDB(db_path) as db:
        # Stop it between two heartbeats (every ttl/3), never while it writes: a renewal
        # just committed, and its gate turn (20 ms at most) has ended.
        first = db.get_lease("job").expires_at
        workers.wait_for(lambda: db.get_lease("job").expires_at != first, timeout=60)
        time.sleep(0.3)
        os.kill(holder.pid, signal.SIGSTOP)
        try:
            with pytest.raises(LeaseHeld):  # stopped but alive: not reclaimable early
                db.acquire_lease("job", "successor")
            stopped_lease = db.get_lease("job")
            workers.wait_for(lambda: time.time() > stopped_lease.expires_at, timeout=60)
            successor = db.acquire_lease("job", "successor", ttl=60)
            assert successor.token == token + 1
        finally:
            os.kill(holder.pid, signal.SIGCONT)
        go.set()
        report = workers.collect(results, [holder], 1, timeout=120)
        holder.join(60)
        assert holder.exitcode == 0 and len(report) == 1
        assert report[0]["outcome"].startswith("refused: taken over by 'successor'")
        assert len(report[0]["lost"]) == 1  # the heartbeat told its owner
        with db.fenced(successor):
            db.append_message("ledger", "holder", "written by the successor")
        assert ledger(db, "ledger") == ["written by the successor"]
    assert workers.integrity(db_path) == [("ok",)]


def test_sixteen_claimers_with_kills_complete_every_item_exactly_once(db_path: Path) -> None:
    items, claimers, kills = 200, 16, 4
    with SessionDB(db_path) as db:
        db.create_session("results", "test")
        ids = [db.enqueue("jobs", {"n": i}, max_attempts=kills + 2) for i in range(items)]
    ready, results = SPAWN.Queue(), SPAWN.Queue()
    logs = db_path.parent / "claims"
    logs.mkdir()
    procs = [SPAWN.Process(target=coord_workers.claim_worker,
                           args=(str(db_path), "jobs", str(logs), ready, results))
             for _ in range(claimers)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    # SIGKILL some claimers while they work (mid-claim, mid-commit: wherever they are).
    rng = random.Random(5)
    victims = rng.sample(procs, kills)
    with SessionDB(db_path) as db:
        for victim in victims:
            workers.wait_for(lambda: db.queue_counts("jobs")["done"] > 0, timeout=120)
            time.sleep(rng.uniform(0, 0.05))
            os.kill(victim.pid, signal.SIGKILL)
    survivors = [p for p in procs if p not in victims]
    reports = workers.collect(results, procs, claimers, timeout=240)
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in survivors] == [0] * len(survivors)
    assert {p.exitcode for p in victims} <= {0, -signal.SIGKILL}
    assert len(reports) >= len(survivors)

    claims = [tuple(line.split()) for log in logs.iterdir()
              for line in log.read_text().splitlines() if len(line.split()) == 2]
    assert len(claims) >= items
    assert len(claims) == len(set(claims))  # no (item, token) handed out twice
    with SessionDB(db_path) as db:
        assert db.queue_counts("jobs") == {"ready": 0, "claimed": 0, "done": items, "dead": 0}
        completed = Counter(int(c) for c in ledger(db, "results"))
        states = {db.get_claim(i)["state"] for i in ids}
    assert completed == Counter(ids)  # every item's result exactly once, none lost
    assert states == {"done"}
    assert workers.integrity(db_path) == [("ok",)]


def test_concurrent_editors_with_expected_revisions_lose_no_update(db_path: Path) -> None:
    editors, edits = 4, 25
    with SessionDB(db_path) as db:
        db.create_session("doc", "test")
    results, start = SPAWN.Queue(), SPAWN.Event()
    reports = workers.run_all(
        SPAWN, coord_workers.edit_prompt,
        [(str(db_path), "doc", f"e{e}-", edits, start, results) for e in range(editors)],
        results, start)
    with SessionDB(db_path) as db:
        session = db.get_session("doc")
    prompt = session["system_prompt"]
    for e in range(editors):
        for i in range(edits):
            assert prompt.count(f"[e{e}-{i}]") == 1
    assert session["revision"] == editors * edits
    print("conflicts per editor:", [r["conflicts"] for r in reports])


def test_the_same_owner_name_in_another_process_does_not_inherit_the_lease(
        db_path: Path) -> None:
    """A restarted agent under a fixed name must not get the token of its hung
    predecessor (which could then still write through it)."""
    SessionDB(db_path).close()
    ready, go, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    old = SPAWN.Process(target=coord_workers.hold_lease,
                        args=(str(db_path), "job", 3600, ready, go, results, "agent-7"))
    old.start()
    try:
        token = ready.get(timeout=60)
        with SessionDB(db_path) as db:
            with pytest.raises(LeaseHeld) as info:
                db.acquire_lease("job", "agent-7")
            assert info.value.holder == "agent-7"
            os.kill(old.pid, signal.SIGKILL)
            old.join(30)
            assert db.acquire_lease("job", "agent-7").token == token + 1
    finally:
        if old.is_alive():
            old.kill()


def test_a_live_holder_is_not_judged_gone_when_proc_cannot_be_read(db_path: Path) -> None:
    """Out of descriptors, /proc cannot be read: that says nothing about the holder."""
    from dataclasses import astuple

    from sessiondb.process import this_process
    results = SPAWN.Queue()
    [(error, gone)] = workers.run_all(SPAWN, coord_workers.judge_without_descriptors,
                                      [(astuple(this_process()), results)], results)
    assert error == errno.EMFILE
    assert gone is False


UNSHARE_HOLDER = """
import sys, time
from sessiondb import SessionDB
db = SessionDB(sys.argv[1])
db.acquire_lease("job", "contained", ttl=3600)
db.enqueue("jobs")
db.claim("jobs", "contained", ttl=3600)
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_holder_in_another_pid_namespace_keeps_its_lease_until_the_ttl(
        db_path: Path) -> None:
    """Containers sharing the volume and the host name: the holder's pid means nothing
    in this pid namespace, so it must not be judged by it."""
    SessionDB(db_path).close()
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) here")
    holder = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", UNSHARE_HOLDER,
         str(db_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        line = holder.stdout.readline()
        if line.strip() != "ready":
            pytest.skip(f"cannot start a process in a new pid namespace here: "
                        f"{holder.stderr.read()[-300:]}")
        with SessionDB(db_path) as db:
            rows = workers.read_only(db_path, "SELECT pid FROM sessiondb_leases")
            assert rows == [(1,)]  # its pid inside its own namespace
            with pytest.raises(LeaseHeld):
                db.acquire_lease("job", "outside")
            assert db.reap_claims() == 0
            assert db.queue_counts("jobs")["claimed"] == 1
    finally:
        holder.stdin.close()
        holder.wait(60)


def test_a_heartbeat_reports_the_loss_at_expiry_while_the_store_is_held(
        db_path: Path) -> None:
    """A foreign writer holds the write lock, so renewals wait (up to write_timeout, two
    minutes here); the owner must hear that the lease lapsed when it lapsed, not then."""
    SessionDB(db_path).close()
    ready, go = SPAWN.Queue(), SPAWN.Event()
    with SessionDB(db_path, write_timeout=120) as db:
        lease = db.acquire_lease("job", "a", ttl=1.0)
        hb = db.heartbeat(lease, interval=0.2)
        blocker = SPAWN.Process(target=coord_workers.hold_write_lock,
                                args=(str(db_path), ready, go))
        blocker.start()
        try:
            ready.get(timeout=60)
            workers.wait_for(hb.lost.is_set, timeout=60)
            assert "expired before a renewal succeeded" in hb.error.reason
            with pytest.raises(LeaseLost):
                hb.check()
        finally:
            go.set()
            blocker.join(60)
        hb.stop()
        assert blocker.exitcode == 0
