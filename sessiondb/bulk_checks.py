"""The checks of an import that are not a session's own values (those are
:mod:`sessiondb.records`'): sessions already in the store, parents missing or forming a
cycle, titles taken. A list is checked as a whole before anything is written; a stream
step by step (:mod:`sessiondb.bulk`).
"""

from __future__ import annotations

from typing import Any, Callable

from . import records
from .backend import Conn, Dialect
from .errors import IntegrityViolation

Write = Callable[[Callable[[Conn], Any]], Any]
Read = Callable[..., Any]


def refuse_cycle(rows: list[dict[str, Any]], done: str) -> None:
    """Refuse sessions whose parents form a cycle: none of them can go in first."""
    cycle = records.parent_cycle(rows)
    if cycle is not None:
        raise IntegrityViolation(
            f"the parents of imported sessions {', '.join(map(repr, cycle))} form a "
            f"cycle (each names the next as its parent); {done}")


def present(conn: Conn, sql: Dialect, ids: list[str]) -> set[str]:
    """Which of ``ids`` are sessions of the store."""
    if not ids:
        return set()
    return {r[0] for r in conn.execute(
        f"SELECT id FROM sessions WHERE id IN {sql.in_list}", (sql.list_arg(ids),))}


def check_titles(conn: Conn, sql: Dialect, work: list[dict[str, Any]], done: str
                  ) -> None:
    """Refuse a title that another session has (in the store, or earlier in the step):
    the unique index would refuse it anyway, without saying which session."""
    titled = [(row["title"], row["id"]) for row in work if row.get("title") is not None]
    if not titled:
        return
    taken = dict(conn.execute(f"SELECT title, id FROM sessions WHERE title IN {sql.in_list}",
                              (sql.list_arg([t for t, _ in titled]),)).fetchall())
    for title, sid in titled:
        other = taken.setdefault(title, sid)
        if other != sid:
            raise IntegrityViolation(f"session {sid!r} has the title {title!r}, which "
                                     f"session {other!r} already has; {done}")


def check_list(rows: list[dict[str, Any]], *, sql: Dialect, write: Write, read: Read,
                skip_existing: bool) -> list[dict[str, Any]]:
    """A list is checked against the store before anything is written, so that a
    conflict leaves the store untouched, as an import in one transaction would: an
    existing session (unless ``skip_existing``, which drops it), a missing parent, a
    title taken. The last two are left for SQLite to refuse, in a transaction that is
    rolled back (:func:`_probe`), so that the error is the one a single transaction
    would have raised.

    :returns: the rows to import, parents first.
    """
    ids = [r["id"] for r in rows]
    titles = [r["title"] for r in rows if r.get("title") is not None]
    parents = list({r.get("parent_session_id") for r in rows} - {None})

    def look(conn: Conn) -> tuple[set[str], set[str], set[str]]:
        return (present(conn, sql, ids), present(conn, sql, parents),
                {r[0] for r in conn.execute(
                    f"SELECT title FROM sessions WHERE title IN {sql.in_list}",
                    (sql.list_arg(titles),))} if titles else set())

    existing, known, titled = read(look, snapshot=True)
    if existing:
        if not skip_existing:
            sid = next(r["id"] for r in rows if r["id"] in existing)
            raise IntegrityViolation(f"session {sid!r} already exists; nothing was imported "
                                     "(pass skip_existing=True, or --skip-existing to "
                                     "sessiondb import, to import only the new ones)")
        rows = [r for r in rows if r["id"] not in existing]
    refuse_cycle(rows, "nothing was imported")
    order = records.parents_first(rows)
    by_id = {r["id"]: r for r in order}
    coming = set(by_id) | known
    holders: dict[str, str] = {}
    doomed: set[str] = set()
    orphans: list[dict[str, Any]] = []
    for row in order:
        sid, parent, title = row["id"], row.get("parent_session_id"), row.get("title")
        if parent is not None and parent != sid and parent not in coming:
            doomed.add(sid)
            orphans.append(row)
        if title is not None:
            if title in titled:
                doomed.add(sid)
            elif title in holders:
                doomed.update((sid, holders[title]))
            holders.setdefault(title, sid)
    if doomed:
        # The doomed sessions with their imported ancestors, so that each meets the
        # refusal it is doomed to, not a missing parent.
        needed = set()
        for sid in doomed:
            while sid in by_id and sid not in needed:
                needed.add(sid)
                sid = by_id[sid].get("parent_session_id")
        try:
            _probe(write, [r for r in order if r["id"] in needed])
        except IntegrityViolation as exc:
            if not orphans or "FOREIGN KEY" not in str(exc).upper():
                raise
            # SQLite's (or PostgreSQL's) text names no session: this one does, with
            # the same cause.
            raise IntegrityViolation(
                f"{missing_parent(orphans[0]['id'], orphans[0]['parent_session_id'])}; "
                "nothing was imported") from (exc.__cause__ or exc)
    return order


def missing_parent(session_id: str, parent: str) -> str:
    """What an error says of a session whose parent is neither in the store nor in the
    import, with the usual cause (an export of one source) and what to do."""
    return (f"session {session_id!r} names parent {parent!r}, which is neither in the "
            "store nor in the import (an export of one source leaves out parents of "
            "other sources: import the parent's sessions first, or export every source)")


class _Clean(Exception):
    """Rolls a probe back when SQLite did not refuse it."""


def _probe(write: Write, rows: list[dict[str, Any]]) -> None:
    """Insert the session rows (without their messages) that the checks expect SQLite
    to refuse, in a transaction that is always rolled back:
    SQLite's refusal propagates (a constraint error, translated); if it accepts them
    (the store changed since the check), nothing is kept and the import goes on."""

    def insert(conn: Conn) -> None:
        for row in rows:
            columns = [c for c in row if c != "messages"]
            conn.execute(f"INSERT INTO sessions ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' * len(columns))})", [row[c] for c in columns])
        raise _Clean

    try:
        write(insert)
    except _Clean:
        pass
