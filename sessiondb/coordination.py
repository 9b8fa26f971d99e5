"""Coordination between a gateway and its agents: leases with fencing tokens, work claims,
caps per owner. Everything is rows in the store, written through the one write path, and
nothing is tied to a connection's lifetime (a pooler reaping a connection, or a process
reconnecting, changes nothing).

**Leases.** :meth:`Coordination.acquire_lease` gives a named lease to one owner for a TTL
and returns a :class:`Lease` whose ``token`` strictly increases across all holders of that
name (the row outlives its holders, so a token is never handed out twice). A lease lapses
at ``expires_at`` unless renewed; one whose holder process is gone (same host: the pid is
not running, or runs another program started later, or the machine rebooted) can be taken
before that. A write made inside :meth:`Coordination.fenced` runs only while the lease is
still the caller's, so a holder that was paused past its TTL and taken over gets
:class:`~sessiondb.errors.LeaseLost` instead of clobbering its successor's work.

**Work claims.** A queue of items (:meth:`Coordination.enqueue`) that workers claim
atomically (:meth:`Coordination.claim`: one ``BEGIN IMMEDIATE`` transaction, so no item is
ever claimed twice), complete, or fail; an item failed ``max_attempts`` times goes to the
dead letters. Every :meth:`Coordination.claim` first returns expired claims (and claims of
dead processes) to the queue, whatever else happens, so a full or busy pool can never stop
the reaper.

**The rule for both.** Giving back (release, fail) works while your token is current.
Acting as the holder (renew, complete, a fenced write) also needs the lease or claim not to
have expired: after ``expires_at`` it is not yours any more, even if nobody has taken it.

**Caps.** An owner may hold at most ``max_leases_per_owner`` live leases and
``max_claims_per_owner`` claims; at 80% a :class:`~sessiondb.errors.CapWarning` is issued,
at the cap :class:`~sessiondb.errors.CapExceeded` is raised and nothing is taken.

Times are wall-clock (``time.time()``), shared by the processes of one machine; a holder's
process identity is only judged on its own host (other hosts' leases lapse by TTL only).
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager
from functools import partial
from dataclasses import astuple, replace
from typing import Any, Callable, Iterator

from .bounded import Deadline, Heartbeat, check_interval
from .process import holder_gone, this_process
from .backend import Conn, Dialect, Engine, fetch as _fetch, first as _first, rows as _rows
from .errors import CapExceeded, ClaimLost, InvalidArgument, LeaseHeld, LeaseLost
# Lease, Claim and the caps are part of this module's interface (sessiondb exports them).
from .holdings import (
    CLAIM_COLUMNS, CLAIM_STATES, MAX_CLAIMS_PER_OWNER, MAX_LEASES_PER_OWNER,
    PROCESS_CHECK_EVERY, Claim, Holding, Lease, check_cap, check_claim, check_holding,
    check_holding_row, check_ttl, claim_filter, claim_record, held_by, reap,
    refuse_if_held, require_session, return_claim, warn_near_cap,
)
from .text import (
    check_count, check_id, check_limit, check_number, check_seconds, check_text, from_json,
    to_json,
)

_UPSERT = ", ".join(f"{c} = excluded.{c}" for c in (
    "token", "owner", "ttl", "acquired_at", "expires_at", "host", "boot_id", "pid_ns", "pid",
    "pid_start"))


class Coordination:
    """Leases, session ownership, work claims and caps (see the module docstring), the
    part of :class:`~sessiondb.SessionDB` that coordinates processes. It is written over
    the instance's engine (``_execute_write``, ``_read``, ``_sql``), like the rest of the
    rules; the options are those of :class:`~sessiondb.SessionDB`."""

    _execute_write: Callable[..., Any]
    _read: Callable[..., Any]
    _sql: Dialect
    _engine: Engine
    transaction: Callable[[], Any]

    def __init__(self, max_leases_per_owner: int | None = MAX_LEASES_PER_OWNER,
                 max_claims_per_owner: int | None = MAX_CLAIMS_PER_OWNER) -> None:
        self._caps = {"leases": check_cap("max_leases_per_owner", max_leases_per_owner),
                      "claims": check_cap("max_claims_per_owner", max_claims_per_owner)}
        self._next_process_check = 0.0
        self._returned: dict[tuple[str, int], None] = {}  # see _given_back

    # -- leases -----------------------------------------------------------------------
    def acquire_lease(self, name: str, owner: str, ttl: float = 30.0, *,
                      wait: float = 0.0) -> Lease:
        """Take the lease ``name`` for ``owner`` for ``ttl`` seconds.

        Acquiring a lease the same owner already holds in this process renews it (same
        token); the same owner name in another process is another holder. A lease
        that has expired, or whose holder process has died on this machine, is taken over
        with a new, larger token.

        :param wait: seconds to keep trying while someone else holds it (default 0: one try).
        :returns: the lease; pass it to :meth:`renew_lease`, :meth:`release_lease`,
            :meth:`fenced` and :meth:`heartbeat`.
        :raises LeaseHeld: someone else holds it (``.holder``, ``.expires_at``).
        :raises CapExceeded: ``owner`` already holds ``max_leases_per_owner`` leases.
        """
        return self._acquire(check_id("name", name), owner, ttl, wait)

    def acquire_session(self, session_id: str, owner: str, ttl: float = 30.0, *,
                        wait: float = 0.0) -> Lease:
        """Take the session's lease (``session:<id>``): one agent drives a conversation
        at a time. Same rules as :meth:`acquire_lease`.

        :raises SessionNotFound: the session does not exist.
        """
        session_id = check_id("session_id", session_id)
        return self._acquire(f"session:{session_id}", owner, ttl, wait, session_id)

    def session_holder(self, session_id: str) -> Lease | None:
        """The live lease on the session, or None when nobody drives it."""
        return self.get_lease(f"session:{check_id('session_id', session_id)}")

    def _acquire(self, name: str, owner: str, ttl: float, wait: float,
                 session_id: str | None = None) -> Lease:
        owner = check_id("owner", owner)
        ttl, wait = check_ttl(ttl), check_seconds("wait", wait, zero=True)
        me = this_process()
        cap = self._caps["leases"]

        def write(conn: Conn) -> tuple[Lease, int]:
            # The lease's writers queue on its name, and the cap's count on the owner.
            self._sql.lock(conn, f"lease:{name}", f"owner:{owner}")
            require_session(conn, session_id)
            now = self._sql.now(conn)
            # FOR UPDATE: a renewal of the lease in flight is waited for and seen.
            row = refuse_if_held(conn, name, owner, me, now, self._sql.for_update)
            token, acquired = (row[0], row[2]) if row else (0, None)
            held = _first(conn, "SELECT COUNT(*) FROM sessiondb_leases WHERE owner = ? "
                                "AND expires_at > ? AND name != ?", (owner, now, name))
            if cap is not None and held >= cap:
                raise CapExceeded(owner, "leases", held, cap)
            if not held_by(row, owner, me, now):  # a new holding: a new token
                token, acquired = token + 1, now
            conn.execute(
                "INSERT INTO sessiondb_leases (name, token, owner, ttl, acquired_at, "
                "expires_at, host, boot_id, pid_ns, pid, pid_start) "
                f"VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (name) DO UPDATE SET {_UPSERT}",
                (name, token, owner, ttl, acquired, now + ttl, *astuple(me)))
            return Lease(name, owner, token, ttl, acquired, now + ttl), held + 1

        # Inside transaction() this process holds the write lock, so nobody can let go
        # meanwhile: waiting would only hold everyone else up.
        deadline = time.monotonic() + (0.0 if self._engine.in_transaction else wait)
        while True:
            try:
                # A read first: a waiter polling a held lease must not queue for the
                # write lock every time (the write decides, under the lock).
                self._read(lambda conn: refuse_if_held(conn, name, owner, me, self._sql.now(conn)))
                lease, held = self._execute_write(write)
            except LeaseHeld as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                pause = min(remaining, max(0.0, exc.expires_at - time.time()) + 0.001,
                            random.uniform(0.02, 0.1))
                time.sleep(pause)
                continue
            warn_near_cap(owner, "leases", held, cap, depth=3)
            return lease

    def renew_lease(self, lease: Lease, ttl: float | None = None) -> Lease:
        """Extend the lease by ``ttl`` (default: its own) from now.

        :raises LeaseLost: it expired, was released, or another holder has it now.
        """
        return self._extend(check_holding(lease, Lease), ttl)

    def release_lease(self, lease: Lease) -> bool:
        """Give the lease up (the next acquire gets a larger token).

        :returns: False when it was no longer this holder's (taken over meanwhile).
        """
        lease = check_holding(lease, Lease)

        def write(conn: Conn) -> bool:
            self._sql.lock(conn, f"lease:{lease.name}")
            conn.execute("UPDATE sessiondb_leases SET owner = NULL, expires_at = NULL, "
                         "pid = NULL WHERE name = ? AND token = ? AND owner = ? AND "
                         "acquired_at = ?", (lease.name, lease.token, lease.owner,
                                             lease.acquired_at))
            return conn.changes() > 0

        return self._given_back(lease, self._execute_write(write))

    def get_lease(self, name: str) -> Lease | None:
        """The live lease called ``name`` (held, not expired, its holder not known to have
        ended), or None."""
        leases = self._live_leases("name = ?", [check_id("name", name)])
        return leases[0] if leases else None

    def list_leases(self, owner: str | None = None) -> list[Lease]:
        """The live leases (of one owner, or all), by name."""
        owner = check_text("owner", owner)
        return self._live_leases("owner = ?", [owner]) if owner is not None \
            else self._live_leases("TRUE", [])

    def _live_leases(self, where: str, args: list) -> list[Lease]:
        rows = self._read(lambda c: _fetch(
            c, "SELECT name, owner, token, ttl, acquired_at, expires_at, host, boot_id, pid_ns, "
               f"pid, pid_start FROM sessiondb_leases WHERE {where} AND owner IS NOT NULL AND "
               "expires_at > ? ORDER BY name", [*args, self._sql.now(c)]))
        return [Lease(*r[:6]) for r in rows if not holder_gone(*r[6:])]

    @contextmanager
    def fenced(self, holding: Holding) -> Iterator["Coordination"]:
        """A :meth:`transaction` that runs only if ``holding`` (a lease or a claim) is
        still the caller's when it begins::

            with db.fenced(lease):
                db.append_message(sid, "assistant", text)

        The check runs under the write lock, held until the block commits, and a successor
        needs that lock to take over: so no write of a fenced-out holder can land after its
        successor's acquire (the block may commit a little after ``expires_at``, before
        anyone could take over). Inside an open :meth:`transaction` it checks and joins it.

        :raises LeaseLost: the lease expired or was taken over (``ClaimLost`` for a
            claim); nothing of the block was written.
        """
        check_holding(holding, (Lease, Claim))
        check = partial(check_holding_row, holding=holding)
        if self._engine.in_transaction:  # inside transaction(): check, and go on in it
            self._execute_write(lambda conn: check(conn, now=self._sql.now(conn),
                                                   lock=self._sql.for_update))
            yield self
            return
        with self.transaction():
            self._execute_write(lambda conn: check(conn, now=self._sql.now(conn),
                                                   lock=self._sql.for_update))
            yield self

    # -- work claims ------------------------------------------------------------------
    def enqueue(self, queue: str, payload: Any = None, *, session_id: str | None = None,
                max_attempts: int = 5, delay: float = 0.0) -> int:
        """Put a work item in ``queue``; returns its id.

        :param payload: any JSON-serializable value, given back in the :class:`Claim`.
        :param session_id: the session the work is about (a gateway -> agent handoff).
        :param max_attempts: claims after which a failure sends it to the dead letters.
        :param delay: seconds before it may be claimed.
        :raises SessionNotFound: ``session_id`` names no session.
        """
        queue = check_id("queue", queue)
        body = to_json("payload", payload)
        session_id = None if session_id is None else check_id("session_id", session_id)
        if check_count("max_attempts", max_attempts) < 1:
            raise InvalidArgument("max_attempts must be at least 1")
        delay = check_seconds("delay", delay, zero=True)

        def write(conn: Conn) -> int:
            require_session(conn, session_id)
            now = self._sql.now(conn)
            conn.execute("INSERT INTO sessiondb_claims (queue, payload, session_id, "
                         "max_attempts, created_at, available_at) VALUES (?,?,?,?,?,?)",
                         (queue, body, session_id, max_attempts, now, now + delay))
            return conn.last_insert_rowid()

        return self._execute_write(write)

    def claim(self, queue: str, owner: str, ttl: float = 60.0) -> Claim | None:
        """Claim the oldest ready item of ``queue`` for ``owner`` for ``ttl`` seconds.

        Before anything else it returns expired claims, and claims whose process died, to
        their queues (or to the dead letters when out of attempts) -- on every call, also
        when the owner is at its cap.

        :returns: the claim, or None when no item is ready.
        :raises CapExceeded: ``owner`` already holds ``max_claims_per_owner`` claims
            (the expired ones were still returned).
        """
        queue, owner = check_id("queue", queue), check_id("owner", owner)
        ttl = check_ttl(ttl)
        me = this_process()
        cap = self._caps["claims"]

        # Whether holders' processes are checked too: at most once a second per instance
        # (reading /proc for every live claim on every poll would hold the write lock).
        processes = time.monotonic() >= self._next_process_check
        if processes:
            self._next_process_check = time.monotonic() + PROCESS_CHECK_EVERY

        def write(conn: Conn) -> tuple[Claim | None, int]:
            self._sql.lock(conn, f"owner:{owner}")  # the cap's count
            now = self._sql.now(conn)
            reap(conn, now, processes, self._sql.skip_locked)
            held = _first(conn, "SELECT COUNT(*) FROM sessiondb_claims WHERE state = "
                                "'claimed' AND owner = ?", (owner,))
            if cap is not None and held >= cap:
                return None, held  # raised after commit: the reaping must stay
            row = conn.execute(
                "SELECT id FROM sessiondb_claims WHERE queue = ? AND state = 'ready' AND "
                f"available_at <= ? ORDER BY id LIMIT 1{self._sql.skip_locked}",
                (queue, now)).fetchone()
            if row is None:
                return None, held
            rows = _rows(conn, (
                "UPDATE sessiondb_claims SET state = 'claimed', token = token + 1, "
                "attempts = attempts + 1, owner = ?, ttl = ?, claimed_at = ?, expires_at = ?, "
                "host = ?, boot_id = ?, pid_ns = ?, pid = ?, pid_start = ? WHERE id = ? RETURNING "
                "id, queue, payload, session_id, owner, token, attempts, max_attempts, ttl, "
                "expires_at"),
                (owner, ttl, now, now + ttl, *astuple(me), row[0]))
            r = rows[0]
            r["payload"] = from_json(r["payload"])
            return Claim(**r), held + 1

        claim, held = self._execute_write(write)
        if claim is None:
            if cap is not None and held >= cap:
                raise CapExceeded(owner, "claims", held, cap)
            return None
        warn_near_cap(owner, "claims", held, cap, depth=2)
        return claim

    def complete_claim(self, claim: Claim) -> None:
        """Mark the item done. Do it in the same :meth:`fenced` block as the work's
        writes to make them one atomic step::

            with db.fenced(claim):
                db.append_message(claim.session_id, "assistant", answer)
                db.complete_claim(claim)

        :raises ClaimLost: the claim expired or the item went back to the queue.
        """
        claim = check_holding(claim, Claim)

        def write(conn: Conn) -> None:
            now = self._sql.now(conn)
            check_claim(conn, claim, now, lock=self._sql.for_update)
            conn.execute("UPDATE sessiondb_claims SET state = 'done', finished_at = ?, "
                         "owner = NULL, expires_at = NULL WHERE id = ?", (now, claim.id))
            return True

        self._given_back(claim, self._execute_write(write))

    def fail_claim(self, claim: Claim, error: str | None = None, *,
                   retry_delay: float = 0.0) -> str:
        """Give the item back after a failed attempt: to the queue (claimable again after
        ``retry_delay`` seconds), or to the dead letters when it has had ``max_attempts``.

        :returns: the item's new state, ``"ready"`` or ``"dead"``.
        :raises ClaimLost: the item is no longer this claim's (it was reaped meanwhile).
        """
        claim = check_holding(claim, Claim)
        error = check_text("error", error)
        delay = check_seconds("retry_delay", retry_delay, zero=True)

        def write(conn: Conn) -> str:
            now = self._sql.now(conn)
            check_claim(conn, claim, now, giving_back=True, lock=self._sql.for_update)
            return return_claim(conn, claim.id, now, error, delay)

        state = self._execute_write(write)
        self._given_back(claim, True)
        return state

    def release_claim(self, claim: Claim) -> bool:
        """Put the item back in the queue without counting the attempt (e.g. at shutdown).

        :returns: False when it was no longer this claim's.
        """
        claim = check_holding(claim, Claim)

        def write(conn: Conn) -> bool:
            conn.execute("UPDATE sessiondb_claims SET state = 'ready', attempts = attempts "
                         "- 1, owner = NULL, expires_at = NULL WHERE id = ? AND token = ? "
                         "AND owner = ? AND state = 'claimed'",
                         (claim.id, claim.token, claim.owner))
            return conn.changes() > 0

        return self._given_back(claim, self._execute_write(write))

    def extend_claim(self, claim: Claim, ttl: float | None = None) -> Claim:
        """Extend the claim by ``ttl`` (default: its own) from now.

        :raises ClaimLost: it expired or the item went back to the queue.
        """
        return self._extend(check_holding(claim, Claim), ttl)

    def reap_claims(self) -> int:
        """Return expired claims and claims of dead processes to their queues (or to the
        dead letters); :meth:`claim` does this on every call. Returns how many."""
        return self._execute_write(lambda conn: reap(conn, self._sql.now(conn), True, self._sql.skip_locked))

    def get_claim(self, claim_id: int) -> dict[str, Any] | None:
        """The item as a dict (``state`` is ready, claimed, done or dead), or None."""
        claim_id = check_count("claim_id", claim_id)
        rows = self._read(lambda c: _rows(
            c, f"SELECT {CLAIM_COLUMNS} FROM sessiondb_claims WHERE id = ?", (claim_id,)))
        return claim_record(rows[0]) if rows else None

    def list_claims(self, queue: str | None = None, state: str | None = None, *,
                    limit: int | None = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Items as :meth:`get_claim` gives them, oldest first: of one queue and/or one
        state (``"dead"``: the dead letters, with their ``last_error``)."""
        queue = check_text("queue", queue)
        state = check_text("state", state)
        if state is not None and state not in CLAIM_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(CLAIM_STATES)}, "
                                  f"not {state!r}")
        limit, offset = check_limit(limit, offset)
        where, args = claim_filter(queue, state)
        rows = self._read(lambda c: _rows(
            c, f"SELECT {CLAIM_COLUMNS} FROM sessiondb_claims {where} ORDER BY id "
               "LIMIT ? OFFSET ?", [*args, limit, offset]))
        return [claim_record(r) for r in rows]

    def requeue_claim(self, claim_id: int, *, max_attempts: int | None = None) -> bool:
        """Put a dead letter back in its queue with its attempts reset (after fixing
        what made it fail); ``max_attempts`` replaces its limit if given.

        :returns: False when the item is not a dead letter.
        """
        claim_id = check_count("claim_id", claim_id)
        if max_attempts is not None and check_count("max_attempts", max_attempts) < 1:
            raise InvalidArgument("max_attempts must be at least 1")

        def write(conn: Conn) -> bool:
            conn.execute("UPDATE sessiondb_claims SET state = 'ready', attempts = 0, "
                         "max_attempts = COALESCE(?, max_attempts), available_at = ?, "
                         "finished_at = NULL WHERE id = ? AND state = 'dead'",
                         (max_attempts, self._sql.now(conn), claim_id))
            return conn.changes() > 0

        return self._execute_write(write)

    def purge_claims(self, older_than_days: float = 7, queue: str | None = None) -> int:
        """Delete done and dead items finished more than ``older_than_days`` ago (the
        queue table would otherwise only grow); returns how many. Lease rows are never
        deleted: they keep each name's last fencing token."""
        days = check_number("older_than_days", older_than_days)
        assert days is not None
        if days < 0:
            raise InvalidArgument(f"older_than_days must be >= 0, got {days}")
        where, args = claim_filter(check_text("queue", queue), None)
        where = (where + " AND" if where else "WHERE") + \
            " state IN ('done', 'dead') AND finished_at < ?"

        def write(conn: Conn) -> int:
            conn.execute(f"DELETE FROM sessiondb_claims {where}",
                         [*args, self._sql.now(conn) - days * 86400])
            return conn.changes()

        return self._execute_write(write)

    def queue_counts(self, queue: str | None = None) -> dict[str, int]:
        """Items per state (ready, claimed, done, dead), in one queue or in all."""
        where, args = claim_filter(check_text("queue", queue), None)
        rows = self._read(lambda c: _fetch(
            c, f"SELECT state, COUNT(*) FROM sessiondb_claims {where} GROUP BY state", args))
        counts = dict.fromkeys(CLAIM_STATES, 0)
        counts.update(dict(rows))
        return counts

    # -- keeping a holding alive, bounding the work under it ---------------------------
    def heartbeat(self, holding: Holding, *,
                  on_lost: Callable[[LeaseLost], Any] | None = None,
                  interval: float | None = None) -> Heartbeat:
        """Start renewing ``holding`` (a lease or a claim) from a thread every ``interval``
        seconds (default: a third of its TTL); see :class:`~sessiondb.bounded.Heartbeat`.

        The first renewal runs before this returns, so a holding already lost raises
        here rather than in the thread.

        :param on_lost: called (from the heartbeat thread) with the
            :class:`~sessiondb.errors.LeaseLost` as soon as the holding is lost: a renewal
            refused, or the holding expired before a renewal succeeded.
        :param interval: seconds between renewals, shorter than the TTL.
        :raises LeaseLost: the holding is not the caller's any more (``ClaimLost``).
        """
        check_holding(holding, (Lease, Claim))
        if interval is not None:
            check_interval(interval, holding.ttl)
        return Heartbeat(self, self._extend(holding), on_lost=on_lost, interval=interval)

    def deadline(self, holding: Holding, seconds: float) -> Deadline:
        """Give ``holding`` back after ``seconds`` unless the work is done by then (the
        lease is released, the claim failed back to its queue); see
        :class:`~sessiondb.bounded.Deadline`::

            with db.deadline(claim, 120) as d:
                answer = d.call(call_the_model, prompt)   # DeadlineExceeded at 120 s
                with db.fenced(claim):
                    db.append_message(claim.session_id, "assistant", answer)
                    db.complete_claim(claim)

        :raises LeaseLost: the holding is not the caller's any more (``ClaimLost``).
        """
        check_holding(holding, (Lease, Claim))
        check_seconds("seconds", seconds)
        self._read(lambda conn: check_holding_row(conn, holding, self._sql.now(conn)))
        return Deadline(self, holding, seconds)

    def _extend(self, holding: Holding, ttl: float | None = None) -> Any:
        """Renew a lease or extend a claim by ``ttl`` (default: its own) from now."""
        ttl = holding.ttl if ttl is None else check_ttl(ttl)
        table, column, key = (("sessiondb_leases", "name", holding.name)
                              if isinstance(holding, Lease) else
                              ("sessiondb_claims", "id", holding.id))
        sql = f"UPDATE {table} SET expires_at = ?, ttl = ? WHERE {column} = ?"

        def write(conn: Conn) -> Holding:
            now = self._sql.now(conn)
            check_holding_row(conn, holding, now, self._sql.for_update)
            conn.execute(sql, (now + ttl, ttl, key))
            return replace(holding, ttl=ttl, expires_at=now + ttl)

        return self._execute_write(write)

    def _given_back(self, holding: Holding, done: bool) -> bool:
        """Note a holding given back through this instance (its heartbeat then stops
        quietly instead of reporting a loss); returns ``done``."""
        if done:
            self._returned[(holding.name, holding.token)] = None
            while len(self._returned) > 4096:
                del self._returned[next(iter(self._returned))]
        return done

    def _gave_back(self, holding: Holding) -> bool:
        return (holding.name, holding.token) in self._returned

    def _give_back(self, holding: Holding, why: str) -> None:
        if isinstance(holding, Lease):
            self.release_lease(holding)
        else:
            try:
                self.fail_claim(holding, why)
            except ClaimLost:
                pass  # already back in the queue

    # -- figures ----------------------------------------------------------------------
    def _coordination_stats(self) -> dict[str, Any]:
        """Live leases, claims per state, what each owner holds, and the caps."""

        def read(conn: Conn) -> dict[str, Any]:
            now = self._sql.now(conn)
            owners: dict[str, dict[str, int]] = {}
            for owner, n in _fetch(conn, "SELECT owner, COUNT(*) FROM sessiondb_leases WHERE "
                                         "owner IS NOT NULL AND expires_at > ? GROUP BY owner",
                                   (now,)):
                owners.setdefault(owner, {"leases": 0, "claims": 0})["leases"] = n
            for owner, n in _fetch(conn, "SELECT owner, COUNT(*) FROM sessiondb_claims WHERE "
                                         "state = 'claimed' GROUP BY owner"):
                owners.setdefault(owner, {"leases": 0, "claims": 0})["claims"] = n
            counts = dict.fromkeys(CLAIM_STATES, 0)
            counts.update(dict(_fetch(conn, "SELECT state, COUNT(*) FROM sessiondb_claims "
                                            "GROUP BY state")))
            return {"leases_held": sum(o["leases"] for o in owners.values()),
                    "claims": counts, "owners": dict(sorted(owners.items())),
                    "caps": {f"max_{k}_per_owner": v for k, v in self._caps.items()}}

        return self._read(read, snapshot=True)
