"""Leases and work claims as rows: the values the API hands out (:class:`Lease`,
:class:`Claim`), the caps on what one owner holds, and the pure functions of a
connection that check and change those rows inside a write. The methods that run them
through the write path are :class:`sessiondb.coordination.Coordination`'s (see that
module for the rules)."""

from __future__ import annotations

import warnings
from dataclasses import astuple, dataclass
from typing import Any, Union

from .backend import Conn, fetch as _fetch, first as _first
from .errors import (
    CapWarning, ClaimLost, ConfigurationError, InvalidArgumentType, LeaseHeld, LeaseLost,
    SessionNotFound,
)
from .process import Process, holder_gone, this_process
from .text import check_count, check_id, check_seconds, from_json

#: The default caps (see :class:`~sessiondb.coordination.Coordination`).
MAX_LEASES_PER_OWNER = 1000
MAX_CLAIMS_PER_OWNER = 100
#: The share of a cap at which a CapWarning is issued.
WARN_AT = 0.8
#: Seconds between checks of claim holders' processes by one instance's claim() calls.
PROCESS_CHECK_EVERY = 1.0
CLAIM_STATES = ("ready", "claimed", "done", "dead")


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
    """A work item claimed by ``owner``, as returned by :meth:`~sessiondb.coordination.Coordination.claim`.

    :ivar id: the item id (from :meth:`~sessiondb.coordination.Coordination.enqueue`).
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


def check_ttl(ttl: Any) -> float:
    return check_seconds("ttl", ttl)


def check_cap(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, or None for no cap")
    return value


def warn_near_cap(owner: str, kind: str, held: int, cap: int | None, depth: int) -> None:
    """Warn at 80% of the cap, pointing at the caller ``depth`` frames up from here."""
    if cap is not None and held >= WARN_AT * cap:
        warnings.warn(CapWarning(f"{owner!r} holds {held} {kind} of its cap of {cap} "
                                 f"({held / cap:.0%})"), stacklevel=depth + 1)



# -- checks inside a write (pure functions of a connection) -----------------------------

def check_holding(holding: Any, kind: type | tuple[type, ...]) -> Any:
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
    check_ttl(holding.ttl)
    return holding


CLAIM_COLUMNS = ("id, queue, payload, session_id, state, attempts, max_attempts, created_at, "
                  "available_at, token, owner, claimed_at, expires_at, finished_at, last_error")


def claim_record(row: dict[str, Any]) -> dict[str, Any]:
    row["payload"] = from_json(row["payload"])
    return row


def claim_filter(queue: str | None, state: str | None) -> tuple[str, list]:
    terms = [(c, v) for c, v in (("queue", queue), ("state", state)) if v is not None]
    where = " AND ".join(f"{c} = ?" for c, _ in terms)
    return ("WHERE " + where if where else ""), [v for _, v in terms]


def require_session(conn: Conn, session_id: str | None) -> None:
    if session_id is not None and _first(
            conn, "SELECT 1 FROM sessions WHERE id = ?", (session_id,)) is None:
        raise SessionNotFound(session_id)


def check_holding_row(conn: Conn, holding: Holding, now: float, lock: str = "") -> None:
    """:param lock: the dialect's ``for_update`` in a write (the row stays as checked
    until the write commits), ``""`` in a read."""
    if isinstance(check_holding(holding, (Lease, Claim)), Lease):
        check_lease(conn, holding, now, lock)
    else:
        check_claim(conn, holding, now, lock=lock)


def refuse_if_held(conn: Conn, name: str, owner: str, me: Process,
                    now: float, lock: str = "") -> tuple | None:
    """The lease's row, unless another holder has it live: then LeaseHeld. Another holder
    is another owner, or the same owner name in another process (a restarted agent must
    not inherit the token of a hung predecessor, which could then still write)."""
    row = conn.execute("SELECT token, owner, acquired_at, expires_at, host, boot_id, pid_ns, "
                       f"pid, pid_start FROM sessiondb_leases WHERE name = ?{lock}",
                       (name,)).fetchone()
    if row and row[1] is not None and row[3] > now and not held_by(row, owner, me, now) \
            and not holder_gone(*row[4:]):
        raise LeaseHeld(name, row[1], row[3], row[0])
    return row


def held_by(row: tuple | None, owner: str, me: Process, now: float) -> bool:
    """Whether the lease row is held, unexpired, by ``owner`` in this very process."""
    return row is not None and row[1] == owner and row[3] > now and tuple(row[4:]) == astuple(me)


def check_lease(conn: Conn, lease: Lease, now: float, lock: str = "") -> None:
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


def check_claim(conn: Conn, claim: Claim, now: float,
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


def reap(conn: Conn, now: float, processes: bool, skip_locked: str) -> int:
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
        return_claim(conn, item, now, why)
    return len(ids)


def return_claim(conn: Conn, claim_id: int, now: float, error: str | None,
                  delay: float = 0.0) -> str:
    """Give an item back after a failed attempt: to its queue, claimable after ``delay``,
    or to the dead letters once it has had ``max_attempts``. Returns the new state."""
    conn.execute("UPDATE sessiondb_claims SET state = CASE WHEN attempts >= max_attempts "
                 "THEN 'dead' ELSE 'ready' END, available_at = ?, last_error = ?, owner = NULL, "
                 "expires_at = NULL, finished_at = CASE WHEN attempts >= max_attempts THEN ? "
                 "END WHERE id = ?", (now + delay, error, now, claim_id))
    return _first(conn, "SELECT state FROM sessiondb_claims WHERE id = ?", (claim_id,))
