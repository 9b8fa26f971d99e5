"""Spawned workers for the PostgreSQL fault and isolation tests (``test_pg_faults.py``,
``test_pg_isolation.py``): module-level functions, so that ``multiprocessing`` with spawn
can import them (``tests/`` is on ``sys.path``).

A worker reports through a queue and fails by raising: only sessiondb's own errors
(:class:`~sessiondb.errors.SessionDBError`) are caught and counted, so a raw psycopg
error, or any other surprise, ends the process with a non-zero exit code, which every
test asserts. Times are ``time.time()``: the processes share one clock with the test,
so a call's start and end can be set against the moment a fault was injected.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any

from sessiondb import (
    DeadlineExceeded, LeaseLost, PoolWarning, SessionDB, SessionDBError, StaleRevision,
    TitleConflict,
)


def backend_pid(db: SessionDB) -> int:
    """The server process of the connection this thread's transaction() block holds (or
    of a pooled one, outside a block)."""
    return db._engine.read(lambda c: c.execute("SELECT pg_backend_pid()").fetchone()[0])


def sleep_until(at: float) -> None:
    """Start together: every racer is handed the same wall-clock moment."""
    time.sleep(max(0.0, at - time.time()))


# -- writers under a fault --------------------------------------------------------------

def append_until(url: str, session_id: str, writer: int, stop: Any, results: Any,
                 options: dict[str, Any]) -> None:
    """Append ``w<writer>-<i>`` to the session until ``stop`` is set. Every call is
    recorded as ``(start, end, outcome)``: the message id, or the name of the typed error;
    every acknowledged ``(id, content)`` is reported."""
    db = SessionDB(url, **options)
    calls: list[tuple[float, float, Any]] = []
    acked: list[tuple[int, str]] = []
    i = 0
    while not stop.is_set():
        content = f"w{writer}-{i}"
        i += 1
        started = time.time()
        try:
            mid = db.append_message(session_id, "user", content)
        except SessionDBError as exc:
            calls.append((started, time.time(), type(exc).__name__))
            time.sleep(0.05)
            continue
        calls.append((started, time.time(), mid))
        acked.append((mid, content))
        time.sleep(0.01)
    db.close()
    results.put({"writer": writer, "calls": calls, "acked": acked})


def hold_row_lock(url: str, session_id: str, hold_timeout: float, ready: Any, go: Any,
                  results: Any) -> None:
    """Open a transaction() block, append (which locks the session's row), report ready,
    and stall inside the block until ``go`` (the test kills or stops us meanwhile)."""
    db = SessionDB(url, hold_timeout=hold_timeout)
    outcome = "committed"
    try:
        with db.transaction():
            db.append_message(session_id, "holder", "written by the stalled holder")
            ready.put({"pid": os.getpid(), "backend": backend_pid(db),
                       "ready_at": time.time()})
            go.wait(600)
    except SessionDBError as exc:
        outcome = type(exc).__name__
    results.put({"outcome": outcome, "ended_at": time.time()})
    db.close()


def partitioned_holder(url: str, session_id: str, hold_timeout: float, ready: Any,
                       go: Any, thawed: Any, results: Any) -> None:
    """Through the proxy: open a transaction() block, append, report ready; after ``go``
    (the proxy is frozen by then) append again, into the partition. Report how that
    ended and when; after ``thawed``, write once more through the same instance."""
    db = SessionDB(url, hold_timeout=hold_timeout, write_timeout=5)
    report: dict[str, Any] = {"outcome": "committed"}
    try:
        with db.transaction():
            report["began"] = time.time()
            db.append_message(session_id, "holder", "before the partition")
            ready.put({"backend": backend_pid(db), "ready_at": time.time()})
            go.wait(60)
            report["sent"] = time.time()
            db.append_message(session_id, "holder", "into the partition")
    except SessionDBError as exc:
        report["outcome"] = type(exc).__name__
    report["failed_at"] = time.time()
    results.put(report)
    thawed.wait(60)
    started = time.time()
    mid = db.append_message(session_id, "holder", "after the thaw")
    results.put({"after_thaw": mid, "took": time.time() - started})
    db.close()


def hold_through_pooler(url: str, name: str, ttl: float, seconds: float,
                        ledger: str, results: Any) -> None:
    """Hold a lease and a claim with heartbeats for ``seconds`` through a pooler, writing
    a fenced ledger entry every second; report renewals, losses and fenced writes."""
    db = SessionDB(url)
    owner = f"holder-{os.getpid()}"
    lease = db.acquire_lease(name, owner, ttl=ttl)
    db.enqueue(f"queue-{name}")
    claim = db.claim(f"queue-{name}", owner, ttl=ttl)
    assert claim is not None
    lost: list[str] = []
    fenced, refused, errors = 0, 0, []
    with db.heartbeat(lease, on_lost=lambda e: lost.append(str(e))) as beat_lease, \
            db.heartbeat(claim, on_lost=lambda e: lost.append(str(e))) as beat_claim:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not lost:
            time.sleep(1.0)
            try:
                with db.fenced(beat_lease.holding):
                    db.append_message(ledger, "holder", f"{name} {lease.token} {fenced}")
                fenced += 1
            except LeaseLost as exc:
                refused += 1
                lost.append(f"fenced write refused: {exc}")
            except SessionDBError as exc:  # a typed error; the holding must survive it
                errors.append(type(exc).__name__)
        renewals = (beat_lease.renewals, beat_claim.renewals)
    held = db.get_lease(name)
    with db.fenced(claim):
        db.complete_claim(claim)
    released = db.release_lease(lease)
    db.close()
    results.put({"name": name, "token": lease.token, "claim_token": claim.token,
                 "renewals": renewals, "lost": lost, "fenced": fenced, "refused": refused,
                 "errors": errors, "held_at_end": held is not None and held.token
                 == lease.token and held.owner == owner, "released": released})


def hung_holders(url: str, session_id: str, holders: int, ready: Any, release: Any,
                 results: Any) -> None:
    """Fill this instance's pool with hung holders and report what the other calls of
    this instance got meanwhile.

    ``holders`` threads (as many as the pool has connections) each claim an item and run
    their work under a deadline (:meth:`~sessiondb.SessionDB.deadline`); the work opens a
    transaction() block, appends to the session ``<session_id>-<n>``, and hangs in it
    until ``release``, holding its pooled connection. Meanwhile this process's other
    calls must end in a typed error within ``write_timeout``, never hang."""
    write_timeout, hold = 2.0, 1.0
    db = SessionDB(url, pool_size=holders, write_timeout=write_timeout, hold_timeout=hold)
    claims = [db.claim("jobs", f"hung-{i}", ttl=3.0) for i in range(holders)]
    inside = threading.Barrier(holders + 1)
    outcomes: list[str] = []

    def work(n: int) -> None:
        with db.transaction():
            db.append_message(f"{session_id}-{n}", "assistant", f"partial answer {n}")
            inside.wait(30)
            release.wait(120)  # the model call that never returns

    def holder(n: int, claim: Any) -> None:
        try:
            db.deadline(claim, 1.5).call(work, n)
            outcomes.append("finished")
        except DeadlineExceeded:
            outcomes.append("DeadlineExceeded")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=holder, args=(n, c), daemon=True)
                   for n, c in enumerate(claims)]
        for t in threads:
            t.start()
        inside.wait(30)
        pool = dict(db._engine.stats()["pool"])
        ready.put({"claims": [(c.id, c.token, c.expires_at) for c in claims],
                   "pool": pool, "at": time.time()})
        calls: list[tuple[str, float, str]] = []
        for what, call in (("append_message", lambda: db.append_message(
                f"{session_id}-0", "user", "a call of the same instance")),
                ("claim", lambda: db.claim("jobs", "same-instance")),
                ("get_session", lambda: db.get_session(f"{session_id}-0"))):
            started = time.monotonic()
            try:
                call()
                outcome = "ok"
            except SessionDBError as exc:
                outcome = type(exc).__name__
            calls.append((what, time.monotonic() - started, outcome))
        for t in threads:
            t.join(30)
        pool_warnings = sum(issubclass(w.category, PoolWarning) for w in caught)
    results.put({"calls": calls, "outcomes": outcomes, "pool": pool,
                 "pool_warnings": pool_warnings, "write_timeout": write_timeout})
    release.wait(120)
    # The hung work has returned: its connections come back (the server ended their
    # sessions), and this instance writes again.
    deadline = time.monotonic() + 30
    while True:
        try:
            mid = db.append_message(f"{session_id}-0", "user", "the instance writes again")
            break
        except SessionDBError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    results.put({"recovered": mid, "pool_after": dict(db._engine.stats()["pool"])})
    db.close()


# -- racers (isolation) -----------------------------------------------------------------

def race(url: str, phase: str, racer: int, ready: Any, start: Any, at: Any,
         results: Any) -> None:
    """One racer of ``phase``: open the store, say ready, and once ``start`` is set run
    at the wall-clock moment ``at.value`` with the others; report what it got (typed
    errors by name)."""
    db = SessionDB(url)
    ready.put(racer)
    start.wait(120)
    sleep_until(at.value)
    try:
        results.put((racer, RACES[phase](db, racer, at.value)))
    finally:
        db.close()


def _create_same_id(db: SessionDB, racer: int, at: float) -> Any:
    db.create_session("same", f"racer-{racer}", model=f"model-{racer}")
    return db.append_message("same", "user", f"racer {racer}")


def _take_same_title(db: SessionDB, racer: int, at: float) -> Any:
    try:
        db.create_session(f"s{racer}", "racer", title="The one title")
        return "created"
    except TitleConflict:
        return "TitleConflict"


def _retitle_to_same(db: SessionDB, racer: int, at: float) -> Any:
    try:
        return "set" if db.set_session_title(f"s{racer}", "The second title") else "missing"
    except TitleConflict:
        return "TitleConflict"


#: Rounds of :func:`_same_expected_revision`, and seconds between their starts.
ROUNDS, ROUND_S = 6, 0.25


def _same_expected_revision(db: SessionDB, racer: int, at: float) -> Any:
    """Rounds of one read, then one update with the revision read, every racer in step:
    who read the same revision updates with the same expected_revision, and at most one
    of them may win. Returns ``(revision read, revision after or None)`` per round."""
    outcomes = []
    for round_ in range(ROUNDS):
        sleep_until(at + round_ * ROUND_S)
        revision = db.get_session("doc")["revision"]
        sleep_until(at + round_ * ROUND_S + ROUND_S / 2)
        try:
            after = db.update_system_prompt("doc", f"racer {racer} round {round_}",
                                            expected_revision=revision)
            outcomes.append((revision, after))
        except StaleRevision:
            outcomes.append((revision, None))
    return outcomes


def _append_many(db: SessionDB, racer: int, at: float) -> Any:
    """150 appends to the shared session (every third with a tool call), and a session
    of its own, titled, every 25; report the acknowledged ids."""
    acked, created = [], []
    for i in range(150):
        content = f"p{racer}-m{i}"
        acked.append((db.append_message("shared", "user", content,
                                        tool_calls=[{"id": "a"}] if i % 3 == 0 else None),
                      content))
        if i % 25 == 0:
            sid = f"p{racer}-s{i}"
            db.create_session(sid, "racer", title=f"racer {racer} session {i}")
            db.append_message(sid, "assistant", f"own {sid}")
            created.append(sid)
    return {"acked": acked, "created": created, "timeouts": db.stats()["timeouts"]}


RACES = {"create_same_id": _create_same_id, "take_same_title": _take_same_title,
         "retitle_to_same": _retitle_to_same,
         "same_expected_revision": _same_expected_revision, "append_many": _append_many}


def open_empty(url: str, racer: int, ready: Any, start: Any, at: Any,
               results: Any) -> None:
    """Open a store in an empty database at ``at.value`` with the others; report the
    schema version each look found (0 under the migration lock: this process created
    the schema)."""
    import sessiondb.pg.schema as pg_schema
    found: list[int] = []
    ensure = pg_schema.ensure_schema

    def recording(*args: Any, **kwargs: Any) -> int:
        found.append(ensure(*args, **kwargs))
        return found[-1]

    pg_schema.ensure_schema = recording  # type: ignore[assignment]
    ready.put(racer)
    start.wait(120)
    sleep_until(at.value)
    db = SessionDB(url)
    try:
        db.create_session(f"opener-{racer}", "racer")
        results.put((racer, {"found": found, "version": db.stats()["schema_version"]}))
    finally:
        db.close()


# -- fencing and liveness ---------------------------------------------------------------

def acquire_as_host(url: str, name: str, host: str, ttl: float, results: Any) -> None:
    """Take ``name`` as a process of the machine ``host`` (its host name is all that
    says where a holder runs) and exit without releasing it."""
    import sessiondb.process

    sessiondb.process.socket.gethostname = lambda: host  # type: ignore[assignment]
    with SessionDB(url) as db:
        lease = db.acquire_lease(name, f"on-{host}", ttl=ttl)
    results.put((lease.token, lease.expires_at))


def hold_with_skewed_clock(url: str, name: str, skew: float, ttl: float, seconds: float,
                           results: Any) -> None:
    """Hold ``name`` with a heartbeat for ``seconds`` on a host whose clock is ``skew``
    seconds off the server's; report whether the heartbeat reported a loss."""
    real = time.time
    time.time = lambda: real() + skew  # type: ignore[assignment]
    db = SessionDB(url)
    lease = db.acquire_lease(name, "skewed", ttl=ttl)
    lost: list[str] = []
    with db.heartbeat(lease, on_lost=lambda e: lost.append(e.reason)) as beat:
        time.sleep(seconds)
        renewals = beat.renewals
    held = db.get_lease(name)
    db.close()
    results.put({"lost": lost, "renewals": renewals,
                 "held": held is not None and held.token == lease.token})
