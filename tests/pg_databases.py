"""Fresh databases for the tests of one server, made one test ahead and dropped behind.

A test's own database costs a ``CREATE DATABASE`` before it and a ``DROP DATABASE``
after it. Measured here (PostgreSQL 15, ``/dev/shm``, load average 4.5): 20-26 ms to
create, 31 ms to drop, and 102 ms to drop one that PgBouncer still holds server
connections to (``DROP ... WITH (FORCE)`` ends them, then polls every 100 ms until they
are gone). Neither is what a test is about, so a thread of the test process does both
while the tests run: it creates the next test's database during the current test and
drops the last one's. Every test still gets a database of its own, that no other test
ever saw: created from ``template0``, empty, or (``prepare``) a copy of one prepared once,
holding an empty store.

Plain Python, like :mod:`pgserver`; the fixture using it is ``pg_url``
(``tests/pg_fixtures.py``).
"""

from __future__ import annotations

import collections
import threading
from typing import Callable
from urllib.parse import urlsplit

from pgserver import PgServer

#: Drops allowed to wait; past that, give_back() drops the database itself, so that
#: databases of finished tests never pile up in memory (about 7.5 MB each).
MAX_PENDING_DROPS = 32
#: Threads dropping at once: a drop that had to end PgBouncer's connections mostly
#: sleeps (100 ms), and one thread could fall behind tests shorter than that.
DROPPERS = 2


class FreshDatabases:
    """Fresh databases of ``server``: :meth:`take` one, :meth:`give_back` it when done.

    The next database is made when a test gives its own back, so between two tests
    rather than during one (a test's first calls do not compete with a ``CREATE
    DATABASE``), by a thread of its own; other threads drop the old ones while the
    next tests run.

    :param server: the server; it may be stopped and started again between tests.
    :param prepare: given the URL of a new, empty database, fills it (a store's schema,
        say); then every database handed out is a copy of that one, made once (named
        ``template``), instead of an empty one.
    :param template: the name of that database.
    """

    def __init__(self, server: PgServer, prepare: Callable[[str], None] | None = None,
                 template: str = "prepared_template") -> None:
        self.server = server
        self._prepare, self._template = prepare, template
        self._prepared = False
        self._template_lock = threading.Lock()
        self._cond = threading.Condition()
        # A URL ready for the next test, or the exception that making it raised (the
        # server was down, say), so that take() makes its own and reports a real failure.
        self._ready: str | BaseException | None = None
        self._want = True  # a database to make ahead
        self._making = False
        self._drops: collections.deque[str] = collections.deque()
        self._stop = False
        self._threads = [threading.Thread(target=self._make_ahead, name="make-database",
                                          daemon=True)]
        self._threads += [threading.Thread(target=self._drop_behind, name="drop-database",
                                           daemon=True) for _ in range(DROPPERS)]
        for thread in self._threads:
            thread.start()

    def take(self) -> str:
        """The URL of a database nobody has used (the one made ahead, waited for if it
        is being made)."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready is not None
                                or not (self._making or self._want), timeout=60)
            made, self._ready = self._ready, None
        if isinstance(made, str):
            return made
        return self._create()

    def give_back(self, url: str) -> None:
        """Have the next test's database made, and the database of ``url`` dropped, in
        the background."""
        name = urlsplit(url).path.lstrip("/")
        with self._cond:
            self._want = True
            queued = len(self._drops) < MAX_PENDING_DROPS
            if queued:
                self._drops.append(name)
            self._cond.notify_all()
        if not queued:
            self._drop(name)

    def close(self) -> None:
        """Stop the threads once the drops asked for are done; a database made ahead
        goes with the server's data directory."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(60)

    def _make_ahead(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or (self._want and self._ready is None))
                if self._stop:
                    return
                self._want, self._making = False, True
            try:
                made: str | BaseException = self._create()
            except Exception as exc:  # noqa: BLE001 - take() makes its own then
                made = exc
            with self._cond:
                self._ready, self._making = made, False
                self._cond.notify_all()

    def _create(self) -> str:
        if self._prepare is None:
            return self.server.create_database()
        with self._template_lock:  # take() may make one while the thread makes one
            if not self._prepared:
                self.server.drop_database(self._template)  # one a failed prepare left
                url = self.server.create_database(self._template)
                self._prepare(url)
                self._prepared = True
        return self.server.create_database(template=self._template)

    def _drop_behind(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._drops)
                if not self._drops:
                    return  # stopped, nothing left to drop
                name = self._drops.popleft()
            self._drop(name)

    def _drop(self, name: str) -> None:
        if self.server.running:
            try:
                self.server.drop_database(name)
            except Exception:  # noqa: BLE001 - a server stopped meanwhile: its files go
                pass           # with its data directory
