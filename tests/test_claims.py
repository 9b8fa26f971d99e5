"""The work-claim queue: enqueue, claim, complete, fail with retries and dead letters, the
reaper that runs on every claim, caps, the deadline helper (issue #5). One process here;
16 claimers with kills are in ``test_coordination_mp.py``."""

from __future__ import annotations

import multiprocessing
import threading
import time
import warnings
from pathlib import Path

import pytest

import coord_workers
import workers
from sessiondb import (
    CapExceeded, CapWarning, Claim, ClaimLost, DeadlineExceeded, InvalidArgument,
    InvalidArgumentType, SessionDB, SessionNotFound,
)

SPAWN = multiprocessing.get_context("spawn")


def expire(claim: Claim) -> None:
    workers.wait_for(lambda: time.time() > claim.expires_at)


def test_items_are_claimed_oldest_first_with_their_payload(db: SessionDB) -> None:
    db.create_session("chat-1", "telegram")
    first = db.enqueue("jobs", {"prompt": "hi"}, session_id="chat-1")
    second = db.enqueue("jobs", [1, 2])
    db.enqueue("other", "x")
    a = db.claim("jobs", "w1", ttl=30)
    b = db.claim("jobs", "w2", ttl=30)
    assert (a.id, a.payload, a.session_id, a.owner, a.token, a.attempts) == (
        first, {"prompt": "hi"}, "chat-1", "w1", 1, 1)
    assert (b.id, b.payload, b.session_id) == (second, [1, 2], None)
    assert db.claim("jobs", "w1") is None  # nothing ready: None, not an error
    assert db.queue_counts("jobs") == {"ready": 0, "claimed": 2, "done": 0, "dead": 0}
    assert db.queue_counts() == {"ready": 1, "claimed": 2, "done": 0, "dead": 0}


def test_complete_is_once_and_can_be_atomic_with_the_work(db: SessionDB) -> None:
    db.create_session("chat-1", "telegram")
    item = db.enqueue("jobs", session_id="chat-1")
    claim = db.claim("jobs", "agent", ttl=30)
    with db.fenced(claim):
        db.append_message("chat-1", "assistant", "answer")
        db.complete_claim(claim)
    got = db.get_claim(item)
    assert got["state"] == "done" and got["finished_at"] is not None and got["owner"] is None
    with pytest.raises(ClaimLost, match="done"):
        db.complete_claim(claim)
    with pytest.raises(ClaimLost):
        with db.fenced(claim):
            db.append_message("chat-1", "assistant", "twice")
    assert db.message_count("chat-1") == 1


def test_a_failed_item_is_retried_then_dead_lettered(db: SessionDB) -> None:
    item = db.enqueue("jobs", max_attempts=2)
    assert db.fail_claim(db.claim("jobs", "w"), "boom") == "ready"
    claim = db.claim("jobs", "w")
    assert claim.attempts == 2 and claim.token == 2
    assert db.fail_claim(claim, "boom again") == "dead"
    got = db.get_claim(item)
    assert (got["state"], got["attempts"], got["last_error"]) == ("dead", 2, "boom again")
    assert db.claim("jobs", "w") is None
    assert db.queue_counts("jobs")["dead"] == 1


def test_a_retry_delay_keeps_the_item_back(db: SessionDB) -> None:
    db.enqueue("jobs")
    db.fail_claim(db.claim("jobs", "w"), retry_delay=3600)
    assert db.claim("jobs", "w") is None
    assert db.queue_counts("jobs")["ready"] == 1
    db.enqueue("later", delay=3600)
    assert db.claim("later", "w") is None


def test_release_gives_back_without_counting_the_attempt(db: SessionDB) -> None:
    item = db.enqueue("jobs", max_attempts=1)
    claim = db.claim("jobs", "w")
    assert db.release_claim(claim) is True
    assert db.release_claim(claim) is False
    again = db.claim("jobs", "w")
    assert (again.id, again.attempts, again.token) == (item, 1, 2)


def test_an_expired_claim_returns_to_the_queue_at_the_next_poll(db: SessionDB) -> None:
    item = db.enqueue("jobs")
    slow = db.claim("jobs", "slow", ttl=0.05)
    expire(slow)
    fast = db.claim("jobs", "fast", ttl=30)  # the poll reaps first, then claims
    assert (fast.id, fast.token, fast.attempts) == (item, 2, 2)
    with pytest.raises(ClaimLost, match="claimed again"):
        db.complete_claim(slow)
    with pytest.raises(ClaimLost):
        db.fail_claim(slow)
    assert db.get_claim(item)["owner"] == "fast"


def test_an_expired_claim_cannot_be_completed_even_before_it_is_reaped(db: SessionDB) -> None:
    item = db.enqueue("jobs")
    claim = db.claim("jobs", "w", ttl=0.05)
    expire(claim)
    with pytest.raises(ClaimLost, match="expired"):
        db.complete_claim(claim)
    with pytest.raises(ClaimLost, match="expired"):
        db.extend_claim(claim)
    assert db.fail_claim(claim, "gave up") == "ready"  # giving back still works
    assert db.get_claim(item)["state"] == "ready"


def test_extend_keeps_a_claim(db: SessionDB) -> None:
    db.enqueue("jobs")
    claim = db.claim("jobs", "w", ttl=30)
    longer = db.extend_claim(claim, ttl=600)
    assert longer.ttl == 600 and longer.expires_at > claim.expires_at
    assert db.reap_claims() == 0
    db.complete_claim(longer)


@pytest.mark.filterwarnings("ignore::sessiondb.CapWarning")
def test_the_reaper_runs_even_when_the_caller_is_at_its_cap(db_path: Path) -> None:
    """The pool-full trap: stale work must go back although every slot is busy."""
    with SessionDB(db_path, max_claims_per_owner=1) as db:
        # The busy worker claims first: a claim after the 50 ms one could find it
        # lapsed already (a slow machine, a pooler) and reap and take it itself.
        db.enqueue("jobs")
        stuck = db.enqueue("jobs")
        db.claim("jobs", "busy-worker", ttl=30)
        hung = db.claim("jobs", "crashed-worker", ttl=0.05)
        assert hung.id == stuck
        expire(hung)
        db.enqueue("jobs")
        with pytest.raises(CapExceeded) as info:
            db.claim("jobs", "busy-worker")
        assert (info.value.kind, info.value.held, info.value.cap) == ("claims", 1, 1)
        got = db.get_claim(stuck)
        assert (got["state"], got["last_error"]) == ("ready", "the claim expired")
        assert db.claim("jobs", "idle-worker").id == stuck


def test_a_claim_of_a_process_that_died_is_reaped_before_its_ttl(db_path: Path) -> None:
    with SessionDB(db_path) as db:
        item = db.enqueue("jobs")
    results = SPAWN.Queue()
    workers.run_all(SPAWN, coord_workers.claim_and_exit, [(str(db_path), "jobs", results)],
                    results)
    with SessionDB(db_path) as db:
        assert db.get_claim(item)["state"] == "claimed"  # TTL an hour away
        claim = db.claim("jobs", "successor")
        assert (claim.id, claim.token) == (item, 2)
        assert db.get_claim(item)["owner"] == "successor"


def test_claim_caps_warn_then_refuse(db_path: Path) -> None:
    with SessionDB(db_path, max_claims_per_owner=5) as db, \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(7):
            db.enqueue("jobs")
        held = [db.claim("jobs", "w") for _ in range(5)]
        assert [str(w.message).split(" (")[0] for w in seen] == [
            "'w' holds 4 claims of its cap of 5", "'w' holds 5 claims of its cap of 5"]
        assert all(w.filename == __file__ for w in seen)
        with pytest.raises(CapExceeded):
            db.claim("jobs", "w")
        assert db.queue_counts("jobs")["ready"] == 2  # nothing taken
        db.complete_claim(held[0])
        assert db.claim("jobs", "w") is not None
        figures = db.stats()["coordination"]
        assert figures["owners"] == {"w": {"leases": 0, "claims": 5}}
        assert figures["claims"] == {"ready": 1, "claimed": 5, "done": 1, "dead": 0}
        assert figures["caps"]["max_claims_per_owner"] == 5


def test_deadline_returns_a_hung_claim_to_the_queue(db: SessionDB) -> None:
    item = db.enqueue("jobs", max_attempts=3)
    claim = db.claim("jobs", "w", ttl=3600)
    hang = threading.Event()
    with pytest.raises(DeadlineExceeded):
        with db.deadline(claim, 0.2) as bound:
            bound.call(hang.wait, 60)
    got = db.get_claim(item)
    assert (got["state"], got["attempts"]) == ("ready", 1)
    assert "deadline" in got["last_error"]
    with pytest.raises(ClaimLost):
        db.complete_claim(claim)
    assert db.claim("jobs", "w2").id == item  # the slot is free now, not in an hour
    hang.set()


def test_a_deadline_in_a_with_block_raises_when_the_block_ends(db: SessionDB) -> None:
    db.enqueue("jobs")
    claim = db.claim("jobs", "w", ttl=3600)
    with pytest.raises(DeadlineExceeded):
        with db.deadline(claim, 0.05) as bound:
            workers.wait_for(bound.expired.is_set)
    assert db.queue_counts("jobs")["ready"] == 1


@pytest.mark.parametrize("call, error", [
    (lambda db: db.enqueue(""), InvalidArgument),
    (lambda db: db.enqueue("q", {1, 2}), InvalidArgumentType),
    (lambda db: db.enqueue("q", max_attempts=0), InvalidArgument),
    (lambda db: db.enqueue("q", delay=-1), InvalidArgument),
    (lambda db: db.claim("q", "w", ttl=0), InvalidArgument),
    (lambda db: db.claim("q", ""), InvalidArgument),
    (lambda db: db.complete_claim("1"), InvalidArgumentType),
    (lambda db: db.get_claim("1"), InvalidArgumentType),
    (lambda db: db.deadline(Claim(1, "q", None, None, "w", 1, 1, 5, 30.0, 2e9), 0),
     InvalidArgument),
])
def test_bad_queue_arguments_are_refused(db: SessionDB, call, error: type) -> None:
    db.enqueue("q")
    db.claim("q", "w")
    before = db.queue_counts()
    with pytest.raises(error):
        call(db)
    assert db.queue_counts() == before


def test_a_claim_from_a_rolled_back_transaction_cannot_complete_anothers(
        db: SessionDB) -> None:
    item = db.enqueue("jobs")
    with pytest.raises(KeyError):
        with db.transaction():
            phantom = db.claim("jobs", "w1")
            raise KeyError("the transaction fails")
    real = db.claim("jobs", "w2")
    assert (real.id, real.token) == (phantom.id, phantom.token) == (item, 1)
    with pytest.raises(ClaimLost):
        db.complete_claim(phantom)
    assert db.release_claim(phantom) is False
    assert db.get_claim(item)["owner"] == "w2"


def test_a_heartbeat_keeps_a_claim_and_stops_quietly_once_it_is_complete(
        db: SessionDB) -> None:
    item = db.enqueue("jobs")
    claim = db.claim("jobs", "w", ttl=1.0)
    lost = []
    with db.heartbeat(claim, interval=0.05, on_lost=lost.append) as hb:
        workers.wait_for(lambda: time.time() > claim.expires_at + 0.5)
        assert db.reap_claims() == 0
        db.complete_claim(hb.holding)
        workers.wait_for(lambda: not hb._thread.is_alive())
    assert lost == [] and db.get_claim(item)["state"] == "done"


def test_work_for_a_missing_session_is_refused(db: SessionDB) -> None:
    with pytest.raises(SessionNotFound):
        db.enqueue("jobs", session_id="missing")
    with pytest.raises(InvalidArgument):
        db.enqueue("jobs", session_id="")
    assert db.queue_counts() == {"ready": 0, "claimed": 0, "done": 0, "dead": 0}


def test_polls_that_take_nothing_do_not_warn(db_path: Path) -> None:
    with SessionDB(db_path, max_claims_per_owner=5) as db, \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(4):
            db.enqueue("jobs")
            db.claim("jobs", "w")
        assert len(seen) == 1  # at 4 of 5
        for _ in range(3):
            assert db.claim("jobs", "w") is None
        assert len(seen) == 1


def test_dead_letters_can_be_listed_requeued_and_purged(db: SessionDB) -> None:
    poison = db.enqueue("jobs", {"bad": True}, max_attempts=1)
    fine = db.enqueue("jobs")
    db.enqueue("other")
    assert db.fail_claim(db.claim("jobs", "w"), "cannot parse") == "dead"
    [dead] = db.list_claims("jobs", "dead")
    assert (dead["id"], dead["payload"], dead["last_error"]) == (poison, {"bad": True},
                                                                 "cannot parse")
    assert [c["id"] for c in db.list_claims(state="ready")] == [fine, fine + 1]
    assert [c["id"] for c in db.list_claims(limit=1, offset=1)] == [fine]
    assert db.requeue_claim(fine) is False  # not a dead letter
    assert db.requeue_claim(poison, max_attempts=3) is True
    again = db.claim("jobs", "w")
    assert (again.id, again.attempts, again.max_attempts) == (poison, 1, 3)
    db.complete_claim(again)
    assert db.purge_claims(older_than_days=1) == 0  # finished just now
    assert db.purge_claims(older_than_days=0, queue="other") == 0
    assert db.purge_claims(older_than_days=0) == 1
    assert db.get_claim(poison) is None
    assert db.queue_counts() == {"ready": 2, "claimed": 0, "done": 0, "dead": 0}
    with pytest.raises(InvalidArgument):
        db.list_claims(state="lost")
    with pytest.raises(InvalidArgument):
        db.purge_claims(-1)
