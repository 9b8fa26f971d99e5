"""The PostgreSQL engine's connections: a bounded psycopg pool whose waits end in typed
errors (:mod:`sessiondb.pg.engine` takes a connection for one transaction and gives it
back).

A wait for a connection is bounded by the caller's deadline and ends in
:class:`~sessiondb.errors.WriteTimeout` when every connection is in use, in
:class:`~sessiondb.errors.ConnectionLost` when the pool had room but no connection could
be made (the server is down or unreachable); at :data:`POOL_WARN_AT` of the pool in use a
:class:`~sessiondb.errors.PoolWarning` is issued. Every connection has TCP keepalives and
a TCP user timeout, so a dead peer is found even mid-statement.
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import psycopg
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from ..errors import ClosedError, ConnectionLost, DatabaseOpenError, PoolWarning, WriteTimeout
from ..writes import WriteCounters

#: Share of the pool in use at which a PoolWarning is issued.
POOL_WARN_AT = 0.8
_INHERITED: list[Any] = []  # pools of a parent process: never closed by a fork child


class BoundedPool:
    """At most ``size`` connections to ``url`` (shown as ``path`` in messages).

    :param app: the ``application_name`` of its connections.
    :param pooler: no server-side prepared statements (a pooler in transaction mode).
    :param timeout: seconds to connect, and to open the pool.
    :param counters: the engine's; a wait that found every connection in use is counted
        in ``timeouts``.
    :raises DatabaseOpenError: no connection could be made within ``timeout``.
    """

    def __init__(self, url: str, path: str, size: int, app: str, *, pooler: bool,
                 timeout: float, counters: WriteCounters) -> None:
        self._url, self._path, self.size, self._app = url, path, size, app
        self._pooler, self._timeout, self._counters = pooler, timeout, counters
        self.in_use = 0
        self._warned = False
        self._count_lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ConnectionPool:
        timeout = self._timeout
        kwargs: dict[str, Any] = {
            # Transactions are begun explicitly, with their settings, in one round trip.
            "autocommit": True,
            "application_name": self._app,
            # Dead peers are found in ~20 s even when nothing is being sent...
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
            "keepalives_count": 3,
            # ... and when something is: keepalives are not sent while data waits for
            # its acknowledgement (a partition mid-statement), retransmissions go on
            # for about 15 minutes unless this bounds them (milliseconds).
            "tcp_user_timeout": 20_000,
            "connect_timeout": max(2, int(min(timeout, 10))),
        }
        if self._pooler:
            kwargs["prepare_threshold"] = None  # a pooler may not keep prepared statements
        try:
            pool = ConnectionPool(self._url, min_size=1, max_size=self.size,
                                  kwargs=kwargs, timeout=timeout, open=False,
                                  name=f"sessiondb-{id(self):x}", reconnect_timeout=timeout)
            pool.open(wait=True, timeout=timeout)
        except PoolTimeout as exc:
            raise DatabaseOpenError(
                f"cannot connect to {self._path} within {timeout:g}s: is the server running "
                "and the URL right (user, password, host, port, database)?",
                self._path) from exc
        except psycopg.Error as exc:
            raise DatabaseOpenError(f"cannot connect to {self._path}: {exc}",
                                    self._path) from exc
        return pool

    @contextmanager
    def connection(self, deadline: float) -> Iterator[psycopg.Connection]:
        """A pooled connection until the block ends; the wait is bounded by ``deadline``."""
        waited = time.monotonic()
        try:
            raw = self._pool.getconn(timeout=max(0.001, deadline - time.monotonic()))
        except PoolClosed as exc:  # closed by another thread meanwhile
            raise ClosedError(f"SessionDB({self._path!r}) is closed; open a new "
                              "SessionDB") from exc
        except PoolTimeout as exc:
            waited = time.monotonic() - waited
            if self.in_use < self.size:
                # The pool had room for another connection and none could be made: the
                # server is down or unreachable, which "pool in use" would misreport.
                raise ConnectionLost(
                    f"could not connect to the server within {waited:.2f}s ({self._path}): "
                    "it is down, restarting or unreachable; nothing was written; later "
                    "calls reconnect", self._path) from exc
            self._counters.timeouts += 1
            raise WriteTimeout(waited, 1,
                               f"all {self.size} connections of the pool were in use; "
                               "raise pool_size or use fewer threads") from exc
        try:
            self._count(+1)
            yield raw
        finally:
            self._count(-1)
            self._pool.putconn(raw)

    def after_fork(self) -> None:
        """In a fork child: a pool of its own (the parent's connections share their
        sockets with the parent and are never touched here, not even closed)."""
        pool = self._new_pool()  # first: if it fails, the next call tries again
        _INHERITED.append(self._pool)
        self._pool = pool
        self._count_lock = threading.Lock()
        self.in_use, self._warned = 0, False

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self.in_use += delta
            warn = False
            if self.in_use >= POOL_WARN_AT * self.size and self.size > 1:
                warn, self._warned = not self._warned, True
            elif self.in_use <= self.size // 2:
                # Warned again only after use fell to half: a pool hovering at its
                # threshold warns once, not at every call.
                self._warned = False
        if warn:
            # Pointing at the engine's call: this frame, connection(), its
            # contextmanager, the engine's _connection() and its contextmanager.
            warnings.warn(PoolWarning(
                f"{self.in_use} of {self.size} connections of the pool of "
                f"{self._path} are in use; raise pool_size if calls start timing out"),
                stacklevel=6)

    def figures(self) -> dict[str, Any]:
        """``stats()["pool"]``: the bound, the connections in use, psycopg's counts."""
        pool = self._pool.get_stats()
        return {"size": self.size, "in_use": self.in_use,
                "open": pool.get("pool_size", 0),
                "available": pool.get("pool_available", 0),
                "waiting": pool.get("requests_waiting", 0),
                "waited": pool.get("requests_queued", 0),
                "wait_timeouts": pool.get("requests_errors", 0),
                "connections_lost": pool.get("connections_lost", 0)}

    def close(self) -> None:
        """Close the connections (in the process that opened them only)."""
        self._pool.close()
