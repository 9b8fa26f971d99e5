"""Work claims: the half of :class:`~sessiondb.coordination.Coordination` that hands out
work items (see that module for leases, the rule both follow, and the caps).

**Work claims.** A queue of items (:meth:`WorkClaims.enqueue`) that workers claim
atomically (:meth:`WorkClaims.claim`: one ``BEGIN IMMEDIATE`` transaction, so no item is
ever claimed twice), complete, or fail; an item failed ``max_attempts`` times goes to the
dead letters. Every :meth:`WorkClaims.claim` first returns expired claims (and claims of
dead processes) to the queue, whatever else happens, so a full or busy pool can never stop
the reaper.
"""

from __future__ import annotations

import time
from dataclasses import astuple
from typing import Any, Callable

from .backend import Conn, Dialect, fetch as _fetch, first as _first, rows as _rows
from .errors import CapExceeded, InvalidArgument
from .holdings import (
    Claim, Holding, check_claim, check_holding, check_ttl, require_session, warn_near_cap,
)
from .process import holder_gone, this_process
from .text import (
    check_count, check_id, check_limit, check_number, check_seconds, check_text, from_json,
    to_json,
)

#: Seconds between checks of claim holders' processes by one instance's claim() calls.
PROCESS_CHECK_EVERY = 1.0
CLAIM_STATES = ("ready", "claimed", "done", "dead")
_CLAIM_COLUMNS = ("id, queue, payload, session_id, state, attempts, max_attempts, created_at, "
                  "available_at, token, owner, claimed_at, expires_at, finished_at, last_error")


class WorkClaims:
    """The work-claim methods of :class:`~sessiondb.SessionDB`, through
    :class:`~sessiondb.coordination.Coordination`, which holds their state (the caps,
    the time of the next check of holders' processes) and keeps holdings alive."""

    _execute_write: Callable[..., Any]
    _read: Callable[..., Any]
    _sql: Dialect
    _caps: dict[str, int | None]
    _next_process_check: float
    _given_back: Callable[[Holding, bool], bool]
    _extend: Callable[..., Any]

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
            return _return_claim(conn, claim.id, now, error, delay)

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
        if state is not None and state not in CLAIM_STATES:
            raise InvalidArgument(f"state must be one of {', '.join(CLAIM_STATES)}, "
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
        counts = dict.fromkeys(CLAIM_STATES, 0)
        counts.update(dict(rows))
        return counts


def _claim_record(row: dict[str, Any]) -> dict[str, Any]:
    row["payload"] = from_json(row["payload"])
    return row


def _claim_filter(queue: str | None, state: str | None) -> tuple[str, list]:
    terms = [(c, v) for c, v in (("queue", queue), ("state", state)) if v is not None]
    where = " AND ".join(f"{c} = ?" for c, _ in terms)
    return ("WHERE " + where if where else ""), [v for _, v in terms]


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


