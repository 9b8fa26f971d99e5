"""Leases and work claims as the API hands them out (:class:`Lease`, :class:`Claim`),
the caps on what one owner may hold, and the checks of a holding's row inside a write:
what :mod:`sessiondb.coordination` (leases) and :mod:`sessiondb.claims` (work claims)
share."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Union

from .backend import Conn, first as _first
from .errors import (
    CapWarning, ClaimLost, ConfigurationError, InvalidArgumentType, LeaseLost,
    SessionNotFound,
)
from .text import check_count, check_id, check_seconds

#: The default caps (see :class:`~sessiondb.coordination.Coordination`).
MAX_LEASES_PER_OWNER = 1000
MAX_CLAIMS_PER_OWNER = 100
#: The share of a cap at which a CapWarning is issued.
WARN_AT = 0.8


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
    """A work item claimed by ``owner``, as returned by :meth:`~sessiondb.claims.WorkClaims.claim`.

    :ivar id: the item id (from :meth:`~sessiondb.claims.WorkClaims.enqueue`).
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


def check_holding_row(conn: Conn, holding: Holding, now: float, lock: str = "") -> None:
    """:param lock: the dialect's ``for_update`` in a write (the row stays as checked
    until the write commits), ``""`` in a read."""
    if isinstance(check_holding(holding, (Lease, Claim)), Lease):
        check_lease(conn, holding, now, lock)
    else:
        check_claim(conn, holding, now, lock=lock)


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


def require_session(conn: Conn, session_id: str | None) -> None:
    if session_id is not None and _first(
            conn, "SELECT 1 FROM sessions WHERE id = ?", (session_id,)) is None:
        raise SessionNotFound(session_id)
