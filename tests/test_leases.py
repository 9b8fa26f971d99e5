"""Leases: fencing tokens, expiry, reclaiming a dead holder's lease, fenced writes, caps,
session leases, the heartbeat and the deadline helper (issue #5).

One process here, except where a holder must really have died; the races of many
processes are in ``test_coordination_mp.py``. Expiry is waited for with ``wait_for`` (a
bound, never a timing assertion).
"""

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
    CapExceeded, CapWarning, DeadlineExceeded, InvalidArgument, InvalidArgumentType, Lease,
    LeaseHeld, LeaseLost, SessionDB, SessionNotFound,
)

SPAWN = multiprocessing.get_context("spawn")


def expire(lease: Lease) -> None:
    workers.wait_for(lambda: time.time() > lease.expires_at)


def test_tokens_increase_across_holders_and_releases(db: SessionDB) -> None:
    a = db.acquire_lease("job", "a", ttl=30)
    assert (a.name, a.owner, a.token, a.ttl) == ("job", "a", 1, 30.0)
    assert a.acquired_at < a.expires_at
    assert db.release_lease(a) is True
    b = db.acquire_lease("job", "b", ttl=30)
    assert db.release_lease(b) and db.release_lease(b) is False
    c = db.acquire_lease("job", "a", ttl=30)
    assert [a.token, b.token, c.token] == [1, 2, 3]
    assert db.acquire_lease("other", "a").token == 1  # per name


def test_a_held_lease_answers_who_holds_it_until_when(db: SessionDB) -> None:
    a = db.acquire_lease("job", "gateway", ttl=30)
    with pytest.raises(LeaseHeld) as info:
        db.acquire_lease("job", "agent-7")
    err = info.value
    assert (err.name, err.holder, err.token, err.expires_at) == ("job", "gateway", 1,
                                                                 a.expires_at)
    assert "held by 'gateway' until" in str(err)
    assert db.get_lease("job") == a


def test_acquiring_again_as_the_holder_renews_with_the_same_token(db: SessionDB) -> None:
    a = db.acquire_lease("job", "a", ttl=30)
    again = db.acquire_lease("job", "a", ttl=60)
    assert again.token == a.token and again.acquired_at == a.acquired_at
    assert again.expires_at > a.expires_at and again.ttl == 60


def test_an_expired_lease_is_taken_over_and_its_holder_fenced_out(db: SessionDB) -> None:
    db.create_session("s", "cli")
    old = db.acquire_lease("job", "a", ttl=0.05)
    expire(old)
    assert db.get_lease("job") is None
    new = db.acquire_lease("job", "b", ttl=30)
    assert new.token == old.token + 1
    with pytest.raises(LeaseLost) as info:
        with db.fenced(old):
            db.append_message("s", "assistant", "stale write")
    assert "taken over by 'b'" in str(info.value) and info.value.token == old.token
    with pytest.raises(LeaseLost):
        db.renew_lease(old)
    assert db.release_lease(old) is False  # cannot release the successor's lease
    assert db.message_count("s") == 0
    with db.fenced(new):
        db.append_message("s", "assistant", "current holder")
    assert db.message_count("s") == 1


def test_an_expired_lease_cannot_be_renewed_even_if_nobody_took_it(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=0.05)
    expire(lease)
    with pytest.raises(LeaseLost, match="expired"):
        db.renew_lease(lease)
    with pytest.raises(LeaseLost, match="expired"):
        with db.fenced(lease):
            pass
    assert db.release_lease(lease) is True  # giving back works while the token is current


def test_renew_extends_from_now(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=30)
    renewed = db.renew_lease(lease, ttl=120)
    assert renewed.token == lease.token and renewed.ttl == 120
    assert renewed.expires_at > lease.expires_at
    assert db.get_lease("job").expires_at == renewed.expires_at


def test_wait_retries_until_the_holder_lets_go(db: SessionDB) -> None:
    first = db.acquire_lease("job", "a", ttl=30)
    threading.Timer(0.2, db.release_lease, (first,)).start()
    second = db.acquire_lease("job", "b", ttl=30, wait=30)
    assert second.owner == "b" and second.token == 2


def test_a_lease_of_a_process_that_exited_is_reclaimed_before_its_ttl(db_path: Path) -> None:
    SessionDB(db_path).close()
    results = SPAWN.Queue()
    [token] = workers.run_all(SPAWN, coord_workers.acquire_and_exit,
                              [(str(db_path), "job", results)], results)
    # The row still says "held for an hour"; its holder is known to have ended.
    if isinstance(db_path, Path):
        assert workers.read_only(db_path, "SELECT owner, expires_at > unixepoch() FROM "
                                          "sessiondb_leases") == [("exited", 1)]
    with SessionDB(db_path) as db:
        assert db.get_lease("job") is None and db.list_leases() == []
        lease = db.acquire_lease("job", "successor", ttl=30)
        assert lease.token == token + 1


def test_list_and_get_show_live_leases_only(db: SessionDB) -> None:
    a = db.acquire_lease("x", "a", ttl=30)
    b = db.acquire_lease("y", "b", ttl=30)
    short = db.acquire_lease("z", "a", ttl=0.05)
    expire(short)
    assert db.list_leases() == [a, b]
    assert db.list_leases(owner="a") == [a]
    assert db.get_lease("z") is None and db.get_lease("nope") is None


def test_session_leases(db: SessionDB) -> None:
    db.create_session("chat-1", "telegram")
    lease = db.acquire_session("chat-1", "agent-1", ttl=30)
    assert lease.name == "session:chat-1"
    assert db.session_holder("chat-1") == lease
    with pytest.raises(LeaseHeld):
        db.acquire_session("chat-1", "agent-2")
    with pytest.raises(SessionNotFound):
        db.acquire_session("missing", "agent-1")
    db.release_lease(lease)
    assert db.session_holder("chat-1") is None


def test_lease_caps_warn_at_80_percent_and_refuse_at_the_cap(db_path: Path) -> None:
    with SessionDB(db_path, max_leases_per_owner=5) as db, \
            warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        leases = [db.acquire_lease(f"l{i}", "greedy") for i in range(3)]
        assert seen == []
        leases.append(db.acquire_lease("l3", "greedy"))
        assert [w.category for w in seen] == [CapWarning]
        assert "4 leases of its cap of 5" in str(seen[0].message)
        assert seen[0].filename == __file__  # points at the caller
        leases.append(db.acquire_lease("l4", "greedy"))
        with pytest.raises(CapExceeded) as info:
            db.acquire_lease("l5", "greedy")
        assert (info.value.owner, info.value.kind, info.value.held, info.value.cap) == (
            "greedy", "leases", 5, 5)
        assert db.get_lease("l5") is None
        assert db.acquire_lease("l0", "greedy").token == 1  # renewing is not a new lease
        db.acquire_lease("m0", "modest")  # the cap is per owner
        db.release_lease(leases[0])
        db.acquire_lease("l5", "greedy")
        figures = db.stats()["coordination"]
        assert figures["owners"]["greedy"] == {"leases": 5, "claims": 0}
        assert figures["caps"]["max_leases_per_owner"] == 5
        assert figures["leases_held"] == 6


@pytest.mark.parametrize("kwargs, error", [
    ({"ttl": 0}, InvalidArgument), ({"ttl": -1}, InvalidArgument),
    ({"ttl": float("nan")}, InvalidArgument), ({"ttl": "10"}, InvalidArgumentType),
    ({"wait": -1}, InvalidArgument), ({"ttl": 10**12}, InvalidArgument),
])
def test_bad_lease_arguments_are_refused(db: SessionDB, kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        db.acquire_lease("job", "a", **kwargs)
    assert db.get_lease("job") is None


def test_bad_names_owners_and_leases_are_refused(db: SessionDB) -> None:
    with pytest.raises(InvalidArgument):
        db.acquire_lease("", "a")
    with pytest.raises(InvalidArgumentType):
        db.acquire_lease("job", 5)
    with pytest.raises(InvalidArgumentType):
        db.renew_lease("job")
    with pytest.raises(InvalidArgument):
        db.release_lease(Lease("job", "a", 2**64, 30.0, 0.0, 1.0))
    with pytest.raises(InvalidArgumentType):
        with db.fenced(object()):
            pass


def test_heartbeat_keeps_a_lease_past_many_ttls_and_reports_its_loss(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=1.0)
    lost = []
    with db.heartbeat(lease, on_lost=lost.append, interval=0.1) as hb:
        workers.wait_for(lambda: time.time() > lease.expires_at + 2.0)
        hb.check()  # still ours, three TTLs later
        assert hb.renewals >= 1 and hb.holding.expires_at > lease.expires_at
        with pytest.raises(LeaseHeld):
            db.acquire_lease("job", "b")
        db.release_lease(hb.holding)  # from outside: the next renewal must find out
        workers.wait_for(hb.lost.is_set)
        assert len(lost) == 1 and isinstance(lost[0], LeaseLost)
        with pytest.raises(LeaseLost):
            hb.check()


def test_heartbeat_on_a_lost_lease_fails_at_once(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=30)
    db.release_lease(lease)
    with pytest.raises(LeaseLost):
        db.heartbeat(lease)


def test_deadline_releases_a_lease_while_the_work_hangs(db: SessionDB) -> None:
    db.create_session("s", "cli")
    lease = db.acquire_lease("job", "a", ttl=3600)
    hang = threading.Event()
    with pytest.raises(DeadlineExceeded) as info:
        with db.deadline(lease, 0.2) as bound:
            bound.call(hang.wait, 60)  # a model call that never returns
    assert info.value.name == "job" and info.value.seconds == 0.2
    assert db.get_lease("job") is None  # the slot is free at once, not in an hour
    assert db.acquire_lease("job", "b").token == lease.token + 1
    with pytest.raises(LeaseLost):
        with db.fenced(lease):  # the hung work's late write
            db.append_message("s", "assistant", "too late")
    hang.set()
    assert db.message_count("s") == 0


def test_work_done_within_the_deadline_keeps_the_lease(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=3600)
    with db.deadline(lease, 30) as bound:
        assert bound.call(lambda x: x * 2, 21) == 42
    assert not bound.expired.is_set()
    assert db.get_lease("job") == lease
    with pytest.raises(ZeroDivisionError):  # the work's own error comes through
        with db.deadline(lease, 30) as bound:
            bound.call(lambda: 1 / 0)


def test_closing_the_store_ends_its_heartbeats_as_lost(db_path: Path) -> None:
    db = SessionDB(db_path)
    lease = db.acquire_lease("job", "a", ttl=0.3)
    hb = db.heartbeat(lease)
    db.close()
    workers.wait_for(hb.lost.is_set)
    assert "closed" in hb.error.reason
    hb.stop()


def test_a_deadline_firing_while_the_block_writes_still_ends_it_in_deadline_exceeded(
        db: SessionDB) -> None:
    """The timer waits for the block's write lock to give the lease back; the block must
    not then end as if in time (and lose its lease behind the caller's back)."""
    db.create_session("s", "cli")
    lease = db.acquire_lease("job", "a", ttl=3600)
    with pytest.raises(DeadlineExceeded):
        with db.deadline(lease, 0.05) as bound:
            with db.fenced(lease):
                db.append_message("s", "assistant", "written in time")
                workers.wait_for(bound.expired.is_set)
    workers.wait_for(lambda: db.get_lease("job") is None)
    assert db.message_count("s") == 1


def test_call_after_the_deadline_does_not_start_the_work(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=3600)
    started = []
    with pytest.raises(DeadlineExceeded):
        with db.deadline(lease, 0.01) as bound:
            workers.wait_for(bound.expired.is_set)
            bound.call(started.append, 1)
    assert started == []


def test_bad_heartbeat_and_deadline_arguments_write_nothing(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=30)
    for interval in (30, 31, 0, -1, 1e300, float("nan")):
        with pytest.raises(InvalidArgument):
            db.heartbeat(lease, interval=interval)
    with pytest.raises(InvalidArgumentType):
        db.heartbeat(lease, interval="1")
    for seconds in (0, -1, 1e300, float("inf")):
        with pytest.raises(InvalidArgument):
            db.deadline(lease, seconds)
    assert db.get_lease("job") == lease  # not even renewed


def test_fenced_inside_a_transaction_checks_and_joins_it(db: SessionDB) -> None:
    db.create_session("s", "cli")
    lease = db.acquire_lease("job", "a", ttl=30)
    with db.transaction():
        db.append_message("s", "user", "before")
        with db.fenced(lease):
            db.append_message("s", "assistant", "fenced")
    assert db.message_count("s") == 2
    db.release_lease(lease)
    with db.transaction():
        db.append_message("s", "user", "kept")
        with pytest.raises(LeaseLost):
            with db.fenced(lease):
                pass
    assert db.message_count("s") == 3


def test_a_lease_from_a_rolled_back_acquisition_is_not_a_lease(db: SessionDB) -> None:
    with pytest.raises(KeyError):
        with db.transaction():
            phantom = db.acquire_lease("job", "a", ttl=30)
            raise KeyError("the transaction fails")
    assert db.get_lease("job") is None
    real = db.acquire_lease("job", "a", ttl=30)
    assert real.token == phantom.token  # the token was never handed out...
    with pytest.raises(LeaseLost):  # ...but the phantom cannot act as the real lease
        with db.fenced(phantom):
            pass
    assert db.release_lease(phantom) is False and db.get_lease("job") == real


def test_giving_back_under_a_heartbeat_is_no_loss(db: SessionDB) -> None:
    lease = db.acquire_lease("job", "a", ttl=30)
    lost = []
    with db.heartbeat(lease, interval=0.01, on_lost=lost.append) as hb:
        assert db.release_lease(hb.holding)
        time.sleep(0.1)  # a few renewal attempts after the release
    assert lost == [] and not hb.lost.is_set()
