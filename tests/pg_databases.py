"""Fresh databases for the tests of one server, made one test ahead and dropped behind.

A test's own database costs a ``CREATE DATABASE`` before it and a ``DROP DATABASE``
after it. Measured here (PostgreSQL 15, ``/dev/shm``, load average 4.5): 20-26 ms to
create, 31 ms to drop, and 102 ms to drop one that PgBouncer still holds server
connections to (``DROP ... WITH (FORCE)`` ends them, then polls every 100 ms until they
are gone). Neither is what a test is about, so a thread of the test process does both
while the tests run: it creates the next test's database during the current test and
drops the last one's. Every test still gets a database of its own, created from
``template0`` as before and empty, that no other test ever saw.

Plain Python, like :mod:`pgserver`; the fixture using it is ``pg_url``
(``tests/pg_fixtures.py``).
"""

from __future__ import annotations

import collections
import threading
from urllib.parse import urlsplit

from pgserver import PgServer

#: Drops allowed to wait for the thread; past that, give_back() drops the database
#: itself, so that databases of finished tests never pile up in memory.
MAX_PENDING_DROPS = 8


class FreshDatabases:
    """Fresh databases of ``server``: :meth:`take` one, :meth:`give_back` it when done.

    The next database is made when a test gives its own back, so between two tests
    rather than during one (a test's first calls do not compete with a ``CREATE
    DATABASE``); the drop follows, while the next test runs.

    :param server: the server; it may be stopped and started again between tests.
    """

    def __init__(self, server: PgServer) -> None:
        self.server = server
        self._cond = threading.Condition()
        # A URL ready for the next test, or the exception that making it raised (the
        # server was down, say), so that take() makes its own and reports a real failure.
        self._ready: str | BaseException | None = None
        self._want = True  # a database to make ahead
        self._making = False
        self._drops: collections.deque[str] = collections.deque()
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="fresh-databases",
                                        daemon=True)
        self._thread.start()

    def take(self) -> str:
        """The URL of a database nobody has used (the one made ahead, waited for if it
        is being made)."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready is not None
                                or not (self._making or self._want), timeout=60)
            made, self._ready = self._ready, None
        if isinstance(made, str):
            return made
        return self.server.create_database()

    def give_back(self, url: str) -> None:
        """Drop the database of ``url`` in the background, once the next test's is
        made."""
        name = urlsplit(url).path.lstrip("/")
        with self._cond:
            self._want = True
            if len(self._drops) < MAX_PENDING_DROPS:
                self._drops.append(name)
                self._cond.notify()
                return
            self._cond.notify()
        self._drop(name)

    def close(self) -> None:
        """Stop the thread once the drops asked for are done; a database made ahead
        goes with the server's data directory."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(60)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._drops
                                    or (self._want and self._ready is None))
                make = self._want and self._ready is None and not self._stop
                self._want = False
                if make:
                    self._making = True
                elif self._drops:
                    name = self._drops.popleft()
                else:
                    return  # stopped, nothing left to drop
            if make:  # the next test's database first: it may be waiting for it
                try:
                    made: str | BaseException = self.server.create_database()
                except Exception as exc:  # noqa: BLE001 - take() makes its own then
                    made = exc
                with self._cond:
                    self._ready, self._making = made, False
                    self._cond.notify_all()
            else:
                self._drop(name)

    def _drop(self, name: str) -> None:
        if self.server.running:
            try:
                self.server.drop_database(name)
            except Exception:  # noqa: BLE001 - a server stopped meanwhile: its files go
                pass           # with its data directory
