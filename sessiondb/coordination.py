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
import warnings
from contextlib import contextmanager
from functools import partial
from dataclasses import astuple, dataclass, replace
from typing import Any, Callable, Iterator, Union

from .bounded import Deadline, Heartbeat, check_interval
from .process import Process, holder_gone, this_process
from .backend import Conn, Dialect, Engine, fetch as _fetch, first as _first, rows as _rows
from .errors import (
    CapExceeded, CapWarning, ClaimLost, ConfigurationError, InvalidArgument,
    InvalidArgumentType, LeaseHeld, LeaseLost, SessionNotFound,
)
from .text import (
    check_count, check_id, check_limit, check_number, check_seconds, check_text, from_json,
    to_json,
)

#: The default caps (see :class:`Coordination`).
MAX_LEASES_PER_OWNER = 1000
MAX_CLAIMS_PER_OWNER = 100
#: The share of a cap at which a CapWarning is issued.
WARN_AT = 0.8
#: Seconds between checks of claim holders' processes by one instance's claim() calls.
PROCESS_CHECK_EVERY = 1.0
_CLAIM_STATES = ("ready", "claimed", "done", "dead")
_UPSERT = ", ".join(f"{c} = excluded.{c}" for c in (
    "token", "owner", "ttl", "acquired_at", "expires_at", "host", "boot_id", "pid_ns", "pid",
    "pid_start"))


@dataclass(frozen=True)
class Lease:
    """A lease held by ``owner``, as returned by acquire and renew.

    :ivar name: the lease name (``session:<id>`` for a session lease).
    :ivar owner: who holds it.
    :ivar token: the fencing token: larger than every token handed out for this name before.
    :ivar ttl: the seconds each renewal extends it by.
    :ivar acquired_at: when this holder got it (epoch seconds).
    :ivar expires_at: when it lapses unless renewed (epoch seconds).
    """

    name: str
    owner: str
    token: int
    ttl: float
    acquired_at: float
    expires_at: float


@dataclass(frozen=True)
class Claim:
    """A work item claimed by ``owner``, as returned by :meth:`Coordination.claim`.

    :ivar id: the item id (from :meth:`Coordination.enqueue`).
    :ivar queue: its queue.
    :ivar payload: the payload given to enqueue (decoded JSON).
    :ivar session_id: the session it is about, if any.
    :ivar owner: who claimed it.
    :ivar token: counts the item's claims; fences this claim against later ones.
    :ivar attempts: claims so far, this one included.
    :ivar max_attempts: the attempts after which a failure sends it to the dead letters.
    :ivar ttl: the seconds a claim (and each extension) lasts.
    :ivar expires_at: when the claim lapses and the item goes back to the queue.
    """

    id: int
    queue: str
    payload: Any
    session_id: str | None
    owner: str
    token: int
    attempts: int
    max_attempts: int
    ttl: float
    expires_at: float

    @property
    def name(self) -> str:
        return f"claim:{self.id}"


Holding = Union[Lease, Claim]


def _check_ttl(ttl: Any) -> float:
    return check_seconds("ttl", ttl)


def _check_cap(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, or None for no cap")
    return value


def _warn_near_cap(owner: str, kind: str, held: int, cap: int | None, depth: int) -> None:
    """Warn at 80% of the cap, pointing at the caller ``depth`` frames up from here."""
    if cap is not None and held >= WARN_AT * cap:
        warnings.warn(CapWarning(f"{owner!r} holds {held} {kind} of its cap of {cap} "
                                 f"({held / cap:.0%})"), stacklevel=depth + 1)


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
        self._caps = {"leases": _check_cap("max_leases_per_owner", max_leases_per_owner),
                      "claims": _check_cap("max_claims_per_owner", max_claims_per_owner)}
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
        ttl, wait = _check_ttl(ttl), check_seconds("wait", wait, zero=True)
        me = this_process()
        cap = self._caps["leases"]

        def write(conn: Conn) -> tuple[Lease, int]:
            # The lease's writers queue on its name, and the cap's count on the owner.
            self._sql.lock(conn, f"lease:{name}", f"owner:{owner}")
            _require_session(conn, session_id)
            now = self._sql.now(conn)
            # FOR UPDATE: a renewal of the lease in flight is waited for and seen.
            row = _refuse_if_held(conn, name, owner, me, now, self._sql.for_update)
            token, acquired = (row[0], row[2]) if row else (0, None)
            held = _first(conn, "SELECT COUNT(*) FROM sessiondb_leases WHERE owner = ? "
                                "AND expires_at > ? AND name != ?", (owner, now, name))
            if cap is not None and held >= cap:
                raise CapExceeded(owner, "leases", held, cap)
            if not _held_by(row, owner, me, now):  # a new holding: a new token
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
                self._read(lambda conn: _refuse_if_held(conn, name, owner, me, self._sql.now(conn)))
                lease, held = self._execute_write(write)
            except LeaseHeld as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise
                pause = min(remaining, max(0.0, exc.expires_at - time.time()) + 0.001,
                            random.uniform(0.02, 0.1))
                time.sleep(pause)
                continue
            _warn_near_cap(owner, "leases", held, cap, depth=3)
            return lease

    def renew_lease(self, lease: Lease, ttl: float | None = None) -> Lease:
        """Extend the lease by ``ttl`` (default: its own) from now.

        :raises LeaseLost: it expired, was released, or another holder has it now.
        """
        return self._extend(_check_holding(lease, Lease), ttl)

    def release_lease(self, lease: Lease) -> bool:
        """Give the lease up (the next acquire gets a larger token).

        :returns: False when it was no longer this holder's (taken over meanwhile).
        """
        lease = _check_holding(lease, Lease)

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
        _check_holding(holding, (Lease, Claim))
        check = partial(_check_holding_row, holding=holding)
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
            _require_session(conn, session_id)
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
        ttl = _check_ttl(ttl)
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
            _reap(conn, now, processes, self._sql.skip_locked)
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
        _warn_near_cap(owner, "claims", held, cap, depth=2)
        return claim

    def complete_claim(self, claim: Claim) -> None:
        """Mark the item done. Do it in the same :meth:`fenced` block as the work's
        writes to make them one atomic step::

            with db.fenced(claim):
                db.append_message(claim.session_id, "assistant", answer)
                db.complete_claim(claim)

        :raises ClaimLost: the claim expired or the item went back to the queue.
        """
        claim = _check_holding(claim, Claim)

        def write(conn: Conn) -> None:
            now = self._sql.now(conn)
            _check_claim(conn, claim, now, lock=self._sql.for_update)
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
        claim = _check_holding(claim, Claim)
        error = check_text("error", error)
        delay = check_seconds("retry_delay", retry_delay, zero=True)

        def write(conn: Conn) -> str:
            now = self._sql.now(conn)
            _check_claim(conn, claim, now, giving_back=True, lock=self._sql.for_update)
            return _return_claim(conn, claim.id, now, error, delay)

        state = self._execute_write(write)
        self._given_back(claim, True)
        return state

    def release_claim(self, claim: Claim) -> bool:
        """Put the item back in the queue without counting the attempt (e.g. at shutdown).

        :returns: False when it was no longer this claim's.
        """
        claim = _check_holding(claim, Claim)

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
        return self._extend(_check_holding(claim, Claim), ttl)

    def reap_claims(self) -> int:
        """Return expired claims and claims of dead processes to their queues (or to the
        dead letters); :meth:`claim` does this on every call. Returns how many."""
        return self._execute_write(lambda conn: _reap(conn, self._sql.now(conn), True, self._sql.skip_locked))

    def get_claim(self, claim_id: int) -> dict[str, Any] | None:
        """The item as a dict (``state`` is ready, claimed, done or dead), or None."""
        claim_id = check_count("claim_id", claim_id)
        rows = self._read(lambda c: _rows(
            c, f"SELECT {_CLAIM_COLUMNS} FROM sessiondb_claims WHERE id = ?", (claim_id,)))
        return _claim_record(rows[0]) if rows else None

    def list_claims(self, queue: str | None = None, state: str | None = None, *,
                    limit: int | None = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Items as :meth:`get_claim` gives them, oldest first: of one queue and/or one
        state (``"dead"``: the dead letters, with their ``last_error``)."""
        queue = check_text("queue", queue)
        state = check_text("state", state)
        if state is not None and state not in _CLAIM_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(_CLAIM_STATES)}, "
                                  f"not {state!r}")
        limit, offset = check_limit(limit, offset)
        where, args = _claim_filter(queue, state)
        rows = self._read(lambda c: _rows(
            c, f"SELECT {_CLAIM_COLUMNS} FROM sessiondb_claims {where} ORDER BY id "
               "LIMIT ? OFFSET ?", [*args, limit, offset]))
        return [_claim_record(r) for r in rows]

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
        where, args = _claim_filter(check_text("queue", queue), None)
        where = (where + " AND" if where else "WHERE") + \
            " state IN ('done', 'dead') AND finished_at < ?"

        def write(conn: Conn) -> int:
            conn.execute(f"DELETE FROM sessiondb_claims {where}",
                         [*args, self._sql.now(conn) - days * 86400])
            return conn.changes()

        return self._execute_write(write)

    def queue_counts(self, queue: str | None = None) -> dict[str, int]:
        """Items per state (ready, claimed, done, dead), in one queue or in all."""
        where, args = _claim_filter(check_text("queue", queue), None)
        rows = self._read(lambda c: _fetch(
            c, f"SELECT state, COUNT(*) FROM sessiondb_claims {where} GROUP BY state", args))
        counts = dict.fromkeys(_CLAIM_STATES, 0)
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
        _check_holding(holding, (Lease, Claim))
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
        _check_holding(holding, (Lease, Claim))
        check_seconds("seconds", seconds)
        self._read(lambda conn: _check_holding_row(conn, holding, self._sql.now(conn)))
        return Deadline(self, holding, seconds)

    def _extend(self, holding: Holding, ttl: float | None = None) -> Any:
        """Renew a lease or extend a claim by ``ttl`` (default: its own) from now."""
        ttl = holding.ttl if ttl is None else _check_ttl(ttl)
        table, column, key = (("sessiondb_leases", "name", holding.name)
                              if isinstance(holding, Lease) else
                              ("sessiondb_claims", "id", holding.id))
        sql = f"UPDATE {table} SET expires_at = ?, ttl = ? WHERE {column} = ?"

        def write(conn: Conn) -> Holding:
            now = self._sql.now(conn)
            _check_holding_row(conn, holding, now, self._sql.for_update)
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
            counts = dict.fromkeys(_CLAIM_STATES, 0)
            counts.update(dict(_fetch(conn, "SELECT state, COUNT(*) FROM sessiondb_claims "
                                            "GROUP BY state")))
            return {"leases_held": sum(o["leases"] for o in owners.values()),
                    "claims": counts, "owners": dict(sorted(owners.items())),
                    "caps": {f"max_{k}_per_owner": v for k, v in self._caps.items()}}

        return self._read(read, snapshot=True)


# -- checks inside a write (pure functions of a connection) -----------------------------

def _check_holding(holding: Any, kind: type | tuple[type, ...]) -> Any:
    """A Lease or Claim as the API hands them out (they are plain dataclasses, so one
    may have been built or unpickled with anything in it)."""
    if not isinstance(holding, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InvalidArgumentType(f"expected a {names}, not {type(holding).__name__}")
    if isinstance(holding, Lease):
        check_id("lease name", holding.name)
    else:
        check_count("claim id", holding.id)
    check_id("owner", holding.owner)
    check_count("token", holding.token)
    _check_ttl(holding.ttl)
    return holding


_CLAIM_COLUMNS = ("id, queue, payload, session_id, state, attempts, max_attempts, created_at, "
                  "available_at, token, owner, claimed_at, expires_at, finished_at, last_error")


def _claim_record(row: dict[str, Any]) -> dict[str, Any]:
    row["payload"] = from_json(row["payload"])
    return row


def _claim_filter(queue: str | None, state: str | None) -> tuple[str, list]:
    terms = [(c, v) for c, v in (("queue", queue), ("state", state)) if v is not None]
    where = " AND ".join(f"{c} = ?" for c, _ in terms)
    return ("WHERE " + where if where else ""), [v for _, v in terms]


def _require_session(conn: Conn, session_id: str | None) -> None:
    if session_id is not None and _first(
            conn, "SELECT 1 FROM sessions WHERE id = ?", (session_id,)) is None:
        raise SessionNotFound(session_id)


def _check_holding_row(conn: Conn, holding: Holding, now: float, lock: str = "") -> None:
    """:param lock: the dialect's ``for_update`` in a write (the row stays as checked
    until the write commits), ``""`` in a read."""
    if isinstance(_check_holding(holding, (Lease, Claim)), Lease):
        _check_lease(conn, holding, now, lock)
    else:
        _check_claim(conn, holding, now, lock=lock)


def _refuse_if_held(conn: Conn, name: str, owner: str, me: Process,
                    now: float, lock: str = "") -> tuple | None:
    """The lease's row, unless another holder has it live: then LeaseHeld. Another holder
    is another owner, or the same owner name in another process (a restarted agent must
    not inherit the token of a hung predecessor, which could then still write)."""
    row = conn.execute("SELECT token, owner, acquired_at, expires_at, host, boot_id, pid_ns, "
                       f"pid, pid_start FROM sessiondb_leases WHERE name = ?{lock}",
                       (name,)).fetchone()
    if row and row[1] is not None and row[3] > now and not _held_by(row, owner, me, now) \
            and not holder_gone(*row[4:]):
        raise LeaseHeld(name, row[1], row[3], row[0])
    return row


def _held_by(row: tuple | None, owner: str, me: Process, now: float) -> bool:
    """Whether the lease row is held, unexpired, by ``owner`` in this very process."""
    return row is not None and row[1] == owner and row[3] > now and tuple(row[4:]) == astuple(me)


def _check_lease(conn: Conn, lease: Lease, now: float, lock: str = "") -> None:
    row = conn.execute("SELECT token, owner, expires_at, acquired_at FROM sessiondb_leases "
                       f"WHERE name = ?{lock}", (lease.name,)).fetchone()
    if row is None or row[0] != lease.token:
        raise LeaseLost(lease.name, lease.token,
                        f"taken over by {row[1]!r} with token {row[0]}" if row and row[1]
                        else "released and taken again since" if row else "it does not exist")
    # The same token, owner and acquisition time: a Lease from an acquisition that was
    # rolled back (inside a failed transaction()) can match token and owner only.
    if row[1] != lease.owner or row[3] != lease.acquired_at:
        raise LeaseLost(lease.name, lease.token, "released")
    if row[2] <= now:
        raise LeaseLost(lease.name, lease.token, f"expired {now - row[2]:.3f}s ago")


def _check_claim(conn: Conn, claim: Claim, now: float,
                 giving_back: bool = False, lock: str = "") -> None:
    row = conn.execute("SELECT token, state, expires_at, owner FROM sessiondb_claims "
                       f"WHERE id = ?{lock}", (claim.id,)).fetchone()
    if row is None:
        raise ClaimLost(claim.id, claim.token, "the item does not exist")
    if row[0] != claim.token or row[1] != "claimed" or row[3] != claim.owner:
        raise ClaimLost(claim.id, claim.token,
                        f"the item is {row[1]} now" + (" (claimed again since)"
                                                       if row[0] != claim.token else ""))
    if not giving_back and row[2] <= now:
        raise ClaimLost(claim.id, claim.token, f"the claim expired {now - row[2]:.3f}s ago")


def _reap(conn: Conn, now: float, processes: bool, skip_locked: str) -> int:
    """Return expired claims -- and, if ``processes``, claims of holders on this host whose
    process has ended -- to their queues (out of attempts: to the dead letters); each
    counts as a failed attempt. The expired ones come from an index; judging processes
    reads /proc once per live claim of this host, so callers do it at a bounded rate.

    :param skip_locked: the dialect's clause that passes over rows another transaction
        is changing (a holder completing its claim right now: it decides)."""
    ids = [(i, "the claim expired") for (i,) in _fetch(
        conn, "SELECT id FROM sessiondb_claims WHERE state = 'claimed' AND expires_at <= ?"
              + skip_locked, (now,))]
    if processes:
        rows = _fetch(conn, "SELECT id, host, boot_id, pid_ns, pid, pid_start FROM "
                            "sessiondb_claims WHERE state = 'claimed' AND expires_at > ? AND "
                            "host = ?" + skip_locked, (now, this_process().host))
        ids += [(r[0], "the claiming process ended") for r in rows if holder_gone(*r[1:])]
    for item, why in ids:
        _return_claim(conn, item, now, why)
    return len(ids)


def _return_claim(conn: Conn, claim_id: int, now: float, error: str | None,
                  delay: float = 0.0) -> str:
    """Give an item back after a failed attempt: to its queue, claimable after ``delay``,
    or to the dead letters once it has had ``max_attempts``. Returns the new state."""
    conn.execute("UPDATE sessiondb_claims SET state = CASE WHEN attempts >= max_attempts "
                 "THEN 'dead' ELSE 'ready' END, available_at = ?, last_error = ?, owner = NULL, "
                 "expires_at = NULL, finished_at = CASE WHEN attempts >= max_attempts THEN ? "
                 "END WHERE id = ?", (now + delay, error, now, claim_id))
    return _first(conn, "SELECT state FROM sessiondb_claims WHERE id = ?", (claim_id,))


