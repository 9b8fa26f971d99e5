"""Keeping a lease or claim alive, and bounding the work done under it.

:class:`Heartbeat` renews a lease (or extends a claim) from a thread every third of its
TTL and tells its owner as soon as the holding is lost: when a renewal is refused, and at
the latest when it expires without a renewal having succeeded (a timer, so a renewal
stuck behind a busy store cannot delay the news). ``on_lost`` is called, the ``lost``
event is set, and :meth:`Heartbeat.check` raises. Renewals are rows written through the
store's write path, not a connection's keep-alive, so a pooler that reaps an idle
connection cannot make a worker lose (and evict) its own job.

:class:`Deadline` bounds the work done under a lease or claim: when the time is up it
gives the slot back -- the lease is released, the claim is failed (back to the queue, or
to the dead letters when out of attempts) -- even while the work itself is still hung in a
call nobody can interrupt. Whatever that work writes later through
:meth:`~sessiondb.coordination.Coordination.fenced` is refused, since its token is no
longer current. :meth:`Deadline.call` runs the work in a helper thread and returns control
at the deadline (the hung call is left running in a daemon thread); a ``with`` block is not
interrupted, and :class:`~sessiondb.errors.DeadlineExceeded` is raised when it ends. Either
way, once the deadline has fired the block always ends in ``DeadlineExceeded``: the slot
was (or is being) given back.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

from .errors import (
    ClaimLost, ClosedError, DeadlineExceeded, InvalidArgument, LeaseLost, SessionDBError,
)
from .text import check_seconds

#: A Lease or a Claim (sessiondb.coordination), as this module sees them: a name, a
#: token, a ttl and an expiry. Written without importing coordination, which imports this.
Holding = Any


class Coordination(Protocol):
    """What a heartbeat and a deadline use of the store that handed out the holding."""

    _engine: Any

    def _extend(self, holding: Holding) -> Holding: ...
    def _gave_back(self, holding: Holding) -> bool: ...
    def _give_back(self, holding: Holding, why: str) -> None: ...

log = logging.getLogger("sessiondb")
T = TypeVar("T")


class Heartbeat:
    """Renews ``holding`` every ``interval`` seconds (default ``ttl / 3``) until stopped.

    Use it as a context manager, or call :meth:`stop`::

        with db.heartbeat(lease, on_lost=lambda exc: stop_event.set()) as hb:
            for step in work:
                hb.check()                      # raises LeaseLost once it is gone
                with db.fenced(hb.holding):
                    ...

    A renewal refused (:class:`~sessiondb.errors.LeaseLost`) ends it at once. A renewal
    that fails otherwise (the store busy past ``write_timeout``, a disk error) is retried;
    if the holding expires first, it is lost. Giving the holding back through the same
    store (release, complete, fail) ends the heartbeat quietly: that is no loss.

    :ivar lost: an event set when the holding is lost.
    :ivar error: the :class:`~sessiondb.errors.LeaseLost` that ended it, or None.
    :ivar renewals: how many renewals succeeded.
    """

    def __init__(self, db: "Coordination", holding: "Holding", *,
                 on_lost: Callable[[LeaseLost], Any] | None = None,
                 interval: float | None = None) -> None:
        self._interval = holding.ttl / 3 if interval is None else check_interval(interval,
                                                                                 holding.ttl)
        self._db = db
        self._holding = holding
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._guard = threading.Lock()
        self.lost = threading.Event()
        self.error: LeaseLost | None = None
        self.renewals = 0
        self._expiry: threading.Timer | None = None
        # When the holding lapses, on this host's monotonic clock: expires_at is on the
        # store's clock (the server's, on PostgreSQL), which this host's may not match.
        # Counted from before the call that took or renewed it, so never late.
        self._lapses = time.monotonic() + holding.ttl
        self._arm(holding, self._lapses)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"sessiondb-heartbeat-{holding.name}")
        self._thread.start()

    @property
    def holding(self) -> "Holding":
        """The lease or claim as last renewed (its ``expires_at`` moves on)."""
        with self._guard:
            return self._holding

    def check(self) -> None:
        """Raise :class:`~sessiondb.errors.LeaseLost` if the holding is lost, or has
        expired without a successful renewal."""
        if self.error is not None:
            raise self.error
        with self._guard:
            holding, lapses = self._holding, self._lapses
        if time.monotonic() >= lapses:
            raise _expired(holding)

    def stop(self) -> None:
        """Stop renewing (the holding stays until released or expired); idempotent."""
        self._stop.set()
        with self._guard:
            if self._expiry is not None:
                self._expiry.cancel()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _arm(self, holding: "Holding", lapses: float) -> None:
        """(Re)start the timer that declares the holding lost when it lapses (at
        ``lapses`` on the monotonic clock)."""
        timer = threading.Timer(max(0.0, lapses - time.monotonic()), self._on_expiry,
                                (holding,))
        timer.daemon = True
        with self._guard:
            if self._expiry is not None:
                self._expiry.cancel()
            self._expiry = timer
            self._lapses = lapses
        timer.start()

    def _on_expiry(self, holding: "Holding") -> None:
        if self.holding is holding and not self._stop.is_set():
            self._lose(_expired(holding))

    def _run(self) -> None:
        wait = self._interval
        while not self._stop.wait(wait) and not self.lost.is_set():
            holding = self.holding
            started = time.monotonic()
            try:
                renewed = self._db._extend(holding)
            except LeaseLost as exc:
                if not self._db._gave_back(holding):
                    self._lose(exc)
                return
            except ClosedError:
                self._lose(_lost(holding, "its SessionDB was closed, so it is no longer "
                                 "renewed"))
                return
            except SessionDBError as exc:
                log.warning("sessiondb: renewing %s failed, retrying: %s", holding.name, exc)
                wait = min(self._interval, max(0.01, (self._lapses - time.monotonic()) / 4))
                continue
            with self._guard:
                self._holding = renewed
            self._arm(renewed, started + renewed.ttl)
            self.renewals += 1
            wait = self._interval

    def _lose(self, exc: LeaseLost) -> None:
        with self._guard:
            if self.error is not None:
                return  # reported once
            self.error = exc
        self.lost.set()
        if self._on_lost is not None:
            try:
                self._on_lost(exc)
            except Exception:  # the owner's callback must not kill the report
                log.exception("sessiondb: the on_lost callback of %s raised", exc.name)


class Deadline:
    """Gives ``holding`` back ``seconds`` from now unless the work is done first.

    :ivar expired: an event set the moment the deadline passes (before the slot is given
        back, so that :meth:`call` returns at once).
    """

    def __init__(self, db: "Coordination", holding: "Holding", seconds: float) -> None:
        self.seconds = check_seconds("seconds", seconds)
        self._db = db
        self._holding = holding
        self._state = "running"  # -> "fired" (the timer won) or "done" (the work won)
        self._guard = threading.Lock()
        self.expired = threading.Event()
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def check(self) -> None:
        """Raise :class:`~sessiondb.errors.DeadlineExceeded` if the deadline has passed."""
        if self.expired.is_set():
            raise DeadlineExceeded(self._holding.name, self.seconds)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a helper thread and return its result, or raise
        :class:`~sessiondb.errors.DeadlineExceeded` at the deadline while a hung ``fn``
        goes on alone (its fenced writes refused). Past the deadline, ``fn`` is not run."""
        self.check()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["result"] = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller below
                outcome["error"] = exc

        worker = threading.Thread(target=run, daemon=True,
                                  name=f"sessiondb-bounded-{self._holding.name}")
        worker.start()
        while worker.is_alive() and not self.expired.is_set():
            worker.join(0.02)
        self.check()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def cancel(self) -> bool:
        """The work is done: keep the holding. Returns False when too late (the deadline
        fired, the slot is given back); idempotent."""
        with self._guard:
            if self._state == "running":
                self._state = "done"
                self._timer.cancel()
            return self._state == "done"

    def __enter__(self) -> "Deadline":
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self.cancel():
            return
        # Fired: leave the block once the slot is back (its give-back is bounded by
        # write_timeout), unless this thread's transaction() holds what it needs.
        if not self._db._engine.in_transaction:
            self._timer.join()
        if not isinstance(exc, DeadlineExceeded):
            raise DeadlineExceeded(self._holding.name, self.seconds) from exc

    def _expire(self) -> None:
        with self._guard:
            if self._state != "running":
                return
            self._state = "fired"
        self.expired.set()
        try:
            self._db._give_back(self._holding, f"deadline of {self.seconds:g}s passed")
        except Exception as exc:  # keep going: the holding lapses by its TTL anyway
            log.warning("sessiondb: giving back %s at its deadline failed (%s); it lapses "
                        "at its TTL", self._holding.name, exc)


def check_interval(interval: Any, ttl: float) -> float:
    """A heartbeat interval: positive and shorter than the TTL it has to beat."""
    number = check_seconds("interval", interval)
    if number >= ttl:
        raise InvalidArgument(f"interval must be shorter than the ttl ({ttl:g}s), got "
                              f"{number:g}s: the holding would lapse between renewals")
    return number


def _expired(holding: "Holding") -> LeaseLost:
    return _lost(holding, "it expired before a renewal succeeded")


def _lost(holding: "Holding", reason: str) -> LeaseLost:
    if hasattr(holding, "queue"):  # a Claim
        return ClaimLost(holding.id, holding.token, reason)  # type: ignore[union-attr]
    return LeaseLost(holding.name, holding.token, reason)
