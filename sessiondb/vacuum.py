"""Giving free pages back to the file system in short steps (SQLite; a store made with
incremental auto-vacuum, as sessiondb makes them).

:class:`Vacuum` moves pages from the end of the file into free slots and truncates it
(``PRAGMA incremental_vacuum``, https://sqlite.org/pragma.html#pragma_incremental_vacuum).
SQLite finds a free page at the end of the file by walking the freelist from its head,
so on a long freelist (a million pages after a large prune) each such page costs
milliseconds, and giving a million pages back took a quarter of an hour. A prune
therefore gives pages back as it frees them (:func:`give_back`): once the freelist
passes :data:`RECLAIM_AT` pages, a step first vacuums it down (the pages it moves are
found near the head of a short list), then goes on with its work. (A rebuild of the
full-text index has no pages to give back: it writes the new index into the old one's,
see :func:`sessiondb.search_index.catch_up`.)
"""

from __future__ import annotations

import time
from typing import Any

#: Free pages past which a step that frees pages gives pages back first.
RECLAIM_AT = 4096
_RECLAIM_SHARE = 0.6  # of such a step's time the vacuum may take, its own work the rest
_STATEMENT_S = 0.004  # what one incremental_vacuum statement aims at (it cannot stop early)
_FIRST_PAGES = 16     # pages of the first statement, before the cost per page is known
_MAX_PAGES = 4096


class Vacuum:
    """``PRAGMA incremental_vacuum`` in statements sized to the measured cost of a page:
    a statement runs to completion, and moving a page costs from microseconds (a leaf
    of a table) to milliseconds (a free page deep in a long freelist, an interior page
    with hundreds of children), so each aims at :data:`_STATEMENT_S` at the cost per page
    of the last one."""

    def __init__(self) -> None:
        self.pages = _FIRST_PAGES
        self.off = False  # the store has no incremental auto-vacuum: nothing to give back

    def run(self, conn: Any, deadline: float, floor: int = 0) -> int:
        """Give pages back until ``deadline`` or until ``floor`` pages are left free;
        returns the pages given back (0 when none or the store cannot)."""
        freed = 0
        free = int(conn.pragma("freelist_count"))
        while free > floor and not self.off:
            started = time.monotonic()
            conn.execute(f"PRAGMA incremental_vacuum({min(self.pages, free - floor)})"
                         ).fetchall()
            spent = time.monotonic() - started
            left = int(conn.pragma("freelist_count"))
            moved = free - left
            if moved <= 0:  # auto_vacuum is off: only a full VACUUM could shrink the file
                self.off = True
                break
            freed, free = freed + moved, left
            per_page = max(spent / moved, 1e-7)
            # Twice the last at most: the cost per page varies along the file.
            self.pages = max(1, min(_MAX_PAGES, 2 * self.pages,
                                    int(_STATEMENT_S / per_page)))
            if time.monotonic() >= deadline:
                break
        return freed


def give_back(vacuum: Vacuum | None, conn: Any, deadline: float) -> int:
    """At the start of a step that frees pages: while the freelist holds more than
    :data:`RECLAIM_AT` pages, give pages back for up to :data:`_RECLAIM_SHARE` of the
    step's time (down to a quarter of that threshold), leaving the rest to the step's
    own work. Nothing with no ``vacuum`` or on a store that cannot. Returns the pages
    given back."""
    if (vacuum is not None and not vacuum.off
            and int(conn.pragma("freelist_count")) > RECLAIM_AT):
        now = time.monotonic()
        return vacuum.run(conn, now + _RECLAIM_SHARE * (deadline - now), RECLAIM_AT // 4)
    return 0
